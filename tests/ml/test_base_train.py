"""ml.base_train: the tiny base's short denoising training — it learns (the loss falls), the
folder it writes loads like any pipeline with only the UNet changed, the budgets hold (and
always buy at least one step), and bad input is counted or refused."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ml.base_train import BaseTrainConfig, train_base
from ml.diffusion import MARKER, load_pipeline
from tests.ml.test_diffusion import shared_tiny_pipeline

FAST = BaseTrainConfig(steps=40, batch_size=8, time_budget_s=None, device="cpu", seed=0)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    a = np.zeros((32, 32, 3))
    a[:16], a[16:] = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)  # two flat halves: learnable
    buffer = io.BytesIO()
    Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


EXAMPLES = [(_png(i), f"two colours number {i % 3}") for i in range(16)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(tiny: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("base-train") / "base"
    return train_base(tiny, [*EXAMPLES, (b"not an image", "broken")], out, FAST)


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    [weights] = (folder / "unet").glob("*.safetensors")
    return load_file(str(weights))


def test_the_loss_falls_and_the_undecodable_image_is_counted(trained):
    assert trained.steps == FAST.steps and trained.stop_reason == "steps"
    assert trained.n_images == len(EXAMPLES) and trained.skipped == {"undecodable": 1}
    losses = [v for _, v in trained.loss_curve]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    metrics = trained.metrics()
    assert metrics["final_loss"] < metrics["first_loss"] and metrics["steps"] == FAST.steps


def test_the_folder_loads_with_only_the_unet_changed_and_notes_the_training(tiny, trained):
    pipe = load_pipeline(trained.folder, device="cpu")
    assert pipe.unet is not None
    before, after = _unet(tiny), _unet(trained.folder)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for part in ("vae", "text_encoder"):
        [a] = (tiny / part).glob("*.safetensors")
        [b] = (trained.folder / part).glob("*.safetensors")
        assert a.read_bytes() == b.read_bytes()
    marker = json.loads((trained.folder / MARKER).read_text())
    assert marker["base_training"]["steps"] == FAST.steps
    assert marker["base_training"]["images"] == len(EXAMPLES)
    assert not list(trained.folder.parent.glob(".base.train-*"))  # the temporary is gone


def test_the_same_seed_gives_the_same_unet(tiny, trained, tmp_path):
    again = train_base(tiny, [*EXAMPLES, (b"not an image", "broken")], tmp_path / "b", FAST)
    first, second = _unet(trained.folder), _unet(again.folder)
    assert first.keys() == second.keys() and len(first) > 10
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_budget_spent_on_setup_still_trains_one_step(tiny, tmp_path):
    config = BaseTrainConfig(steps=1_000, batch_size=8, time_budget_s=0.01, device="cpu")
    result = train_base(tiny, EXAMPLES, tmp_path / "out", config)
    assert result.steps == 1 and result.stop_reason == "time_budget"
    assert len(result.loss_curve) == 1 and result.metrics()["final_loss"] is not None


def test_a_time_budget_bounds_the_call(tiny, tmp_path):
    config = BaseTrainConfig(steps=100_000, batch_size=8, time_budget_s=6.0, device="cpu")
    result = train_base(tiny, EXAMPLES, tmp_path / "out", config)
    assert result.stop_reason == "time_budget" and 1 < result.steps < 100_000
    assert result.seconds < 6.0 + 3.0  # the estimate of one step, plus the save


def test_progress_is_logged_with_rate_and_eta(tiny, tmp_path, caplog):
    config = BaseTrainConfig(steps=12, batch_size=4, time_budget_s=None, log_every_s=0.0)
    with caplog.at_level(logging.INFO, logger="ml.base_train"):
        train_base(tiny, EXAMPLES, tmp_path / "out", config)
    lines = [r.getMessage() for r in caplog.records]
    assert any("steps/s" in m and "ETA" in m for m in lines)
    assert any(m.startswith("train_base: 12 steps on 16 images") for m in lines)


def test_too_few_usable_images_is_an_error_that_says_why(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"1 usable images of 3 .*undecodable.*need at least 2"):
        train_base(tiny, [EXAMPLES[0], (b"junk", "x"), (b"", "y")], tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()


def test_a_missing_base_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_base(tmp_path / "nowhere", EXAMPLES, tmp_path / "out", FAST)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", 0.0, "lr must be > 0"),
        ("lr", float("nan"), "lr must be > 0"),
        ("steps", 0, "batch_size and steps"),
        ("resolution", 20, "multiple of 8"),
        ("caption_dropout", 1.0, "caption_dropout"),
        ("time_budget_s", 0.0, "time_budget_s"),
    ],
)
def test_bad_configs_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        BaseTrainConfig(**{field: value})
