"""Diffusion-DPO on the tiny pipeline: the loss by hand, config checks, decoding, a short
training run on a learnable synthetic preference, save → load into the base → generate,
determinism, budgets and bad input.

The synthetic preference: winners share one colour layout (blue over green, split
horizontally), losers another (red beside yellow, split vertically), each with pixel noise and
the same captions, so a LoRA can learn it and held-out pairs (other noise) measure it."""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ml.diffusion import PipelineFolderError, load_pipeline
from ml.dpo import (
    DPO_CONFIG,
    LORA_WEIGHTS,
    DPOConfig,
    DPOResult,
    PreferencePair,
    decode_image,
    dpo_loss,
    generate,
    save_dpo_lora,
    to_model_range,
    train_dpo_lora,
)
from ml.encoders.checkpoint import file_sha256
from tests.ml.test_diffusion import shared_tiny_pipeline

LOG2 = math.log(2.0)
# 60 steps of 8 pairs: held-out implicit accuracy ~0.8 on four seeds (0.95 by 100 steps).
FAST = DPOConfig(steps=60, time_budget_s=None, heldout_every=20, device="cpu", seed=0)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _layout(rng: np.random.Generator, winner: bool) -> bytes:
    a = np.zeros((32, 32, 3))
    if winner:
        a[:16], a[16:] = (0.2, 0.4, 0.9), (0.2, 0.8, 0.2)
    else:
        a[:, :16], a[:, 16:] = (0.9, 0.3, 0.1), (0.9, 0.9, 0.2)
    a = np.clip(a + rng.normal(0, 0.15, a.shape), 0, 1)
    return _png((a * 255).astype(np.uint8))


def _pairs(seed: int, n: int) -> list[PreferencePair]:
    rng = np.random.default_rng(seed)
    return [
        PreferencePair(f"a picture number {i % 4}", _layout(rng, True), _layout(rng, False))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(tiny: Path) -> DPOResult:
    """One training run shared by the tests below; its set holds one pair with an
    undecodable winner and one with identical images, both to be skipped and counted."""
    good = _pairs(0, 32)
    bad = [
        PreferencePair("broken", b"not an image at all", good[0].loser),
        PreferencePair("same", good[1].winner, good[1].winner),
    ]
    return train_dpo_lora(tiny, [*good, *bad], FAST, heldout=_pairs(100, 16))


@pytest.fixture(scope="module")
def saved(trained: DPOResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_dpo_lora(trained, tmp_path_factory.mktemp("dpo") / "lora")


# ---------------------------------------------------------------------------------------------
# The loss


def test_dpo_loss_at_the_reference_is_log2_with_no_accuracy() -> None:
    mse = torch.tensor([0.9, 1.3, 0.2])
    loss, accuracy, inside = dpo_loss(mse, mse + 0.1, mse, mse + 0.1, beta=5000.0)
    assert torch.equal(inside, torch.zeros(3))
    assert float(loss) == pytest.approx(LOG2)
    assert float(accuracy) == 0.0  # a tie is not a win


def test_dpo_loss_by_hand() -> None:
    model_w = torch.tensor([0.9, 1.0, 1.0])
    model_l = torch.tensor([1.0, 1.2, 0.8])
    ref_w = torch.tensor([1.0, 1.0, 1.0])
    ref_l = torch.tensor([1.0, 1.0, 1.0])
    loss, accuracy, inside = dpo_loss(model_w, model_l, ref_w, ref_l, beta=4.0)
    # inside = -β/2 ((m_w - r_w) - (m_l - r_l)) = -2 * ([-0.1, 0, 0] - [0, 0.2, -0.2])
    assert inside.tolist() == pytest.approx([0.2, 0.4, -0.4])
    expected = np.mean([math.log1p(math.exp(-v)) for v in (0.2, 0.4, -0.4)])
    assert float(loss) == pytest.approx(expected)
    assert float(accuracy) == pytest.approx(2 / 3)


def test_dpo_loss_signs() -> None:
    ref = torch.tensor([1.0])
    base, _, _ = dpo_loss(ref, ref, ref, ref, beta=100.0)
    better_on_winner, acc, _ = dpo_loss(ref - 0.01, ref, ref, ref, beta=100.0)
    worse_on_loser, _, _ = dpo_loss(ref, ref + 0.01, ref, ref, beta=100.0)
    better_on_loser, acc_l, _ = dpo_loss(ref, ref - 0.01, ref, ref, beta=100.0)
    assert float(better_on_winner) < float(base) and float(acc) == 1.0
    assert float(worse_on_loser) < float(base)
    assert float(better_on_loser) > float(base) and float(acc_l) == 0.0
    # A larger β makes the same improvement count more.
    stronger, _, _ = dpo_loss(ref - 0.01, ref, ref, ref, beta=1000.0)
    assert float(stronger) < float(better_on_winner)


def test_dpo_loss_gradient_pushes_the_winner_mse_down() -> None:
    model_w = torch.tensor([1.0, 0.5], requires_grad=True)
    model_l = torch.tensor([1.0, 0.5], requires_grad=True)
    loss, _, _ = dpo_loss(model_w, model_l, torch.ones(2), torch.ones(2), beta=10.0)
    loss.backward()
    assert (model_w.grad > 0).all() and (model_l.grad < 0).all()


def test_dpo_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(torch.ones(2), torch.ones(3), torch.ones(2), torch.ones(2), beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(torch.ones(2), torch.ones(2), torch.ones(2), torch.ones(2), beta=0.0)


# ---------------------------------------------------------------------------------------------
# Config and decoding


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("beta", 0.0),
        ("beta", float("nan")),
        ("rank", 0),
        ("lora_alpha", -1.0),
        ("lr", 0.0),
        ("steps", 0),
        ("batch_size", 0),
        ("resolution", 30),
        ("precision", "fp8"),
        ("time_budget_s", 0.0),
        ("heldout_every", -1),
        ("heldout_draws", 0),
        ("threads", 0),
        ("max_grad_norm", 0.0),
    ],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        DPOConfig(**{field: value})


def test_config_alpha_defaults_to_rank_and_sd15_preset() -> None:
    assert DPOConfig(rank=8).alpha == 8.0
    assert DPOConfig(rank=8, lora_alpha=16).alpha == 16.0
    sd15 = DPOConfig.sd15(steps=5)
    assert (sd15.beta, sd15.resolution, sd15.precision, sd15.steps) == (5000.0, 512, "bf16", 5)


def test_decode_resizes_the_shorter_side_and_centre_crops(tmp_path: Path) -> None:
    picture = np.zeros((40, 80, 3), dtype=np.uint8)  # 80 wide, 40 high
    picture[:, 16:64] = 255  # the centre 48 columns are white: the 40 px crop sees only them
    path = tmp_path / "wide.png"
    path.write_bytes(_png(picture))
    for source in (path, str(path), path.read_bytes()):
        decoded = decode_image(source, 32)
        assert decoded.shape == (3, 32, 32) and decoded.dtype == np.uint8
        assert decoded.min() == 255  # the crop is the white centre only
        assert decode_image(source, 16).shape == (3, 16, 16)
    grey = Image.new("L", (16, 16), 0)
    buffer = io.BytesIO()
    grey.save(buffer, format="JPEG")
    values = to_model_range(torch.from_numpy(decode_image(buffer.getvalue(), 32)))
    assert values.shape == (3, 32, 32) and float(values.max()) < -0.95
    with pytest.raises(OSError):
        decode_image(b"garbage", 32)


# ---------------------------------------------------------------------------------------------
# Training


def test_training_learns_the_preference(trained: DPOResult) -> None:
    assert trained.steps == 60 and trained.stop_reason == "steps"
    assert trained.n_pairs == 32 and trained.n_heldout == 16
    assert trained.skipped == {"undecodable_winner": 1, "identical_images": 1}
    assert trained.tiny_model is True and trained.precision == "fp32"
    # θ starts as the reference: log 2 and no held-out accuracy, then it learns.
    assert trained.loss_curve[0][1] == pytest.approx(LOG2, abs=1e-6)
    assert trained.heldout_curve[0] == (0, 0.0)
    assert [s for s, _ in trained.heldout_curve] == [0, 20, 40, 60]
    assert trained.heldout_accuracy > 0.6
    assert trained.heldout_loss_curve[-1][1] < LOG2
    assert trained.final_loss < LOG2
    metrics = trained.metrics()
    assert metrics["heldout_implicit_accuracy"] == trained.heldout_accuracy
    assert metrics["skipped"] == trained.skipped and metrics["tiny_model"] is True


def test_lora_state_dict_is_in_diffusers_format(trained: DPOResult) -> None:
    keys = sorted(trained.lora_state_dict)
    assert keys and all(k.startswith("unet.") and ".lora." in k for k in keys)
    modules = {k.split(".lora.")[0].rsplit(".", 1)[-1] for k in keys}
    assert modules == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    ups = [v for k, v in trained.lora_state_dict.items() if k.endswith("lora.up.weight")]
    assert ups and all(float(v.abs().max()) > 0 for v in ups)  # trained away from zero
    assert trained.lora_state_dict[keys[0]].dtype == torch.float32


def test_save_writes_weights_and_config(trained: DPOResult, saved: Path, tiny: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == [DPO_CONFIG, LORA_WEIGHTS]
    document = json.loads((saved / DPO_CONFIG).read_text())
    assert document["tiny_model"] is True
    assert document["base_model"] == str(tiny.resolve())
    assert document["sha256"] == file_sha256(saved / LORA_WEIGHTS)
    assert document["config"]["beta"] == FAST.beta and document["lora"]["r"] == FAST.rank
    assert document["metrics"]["heldout_implicit_accuracy"] == trained.heldout_accuracy
    assert document["curves"]["loss"][0] == [1, pytest.approx(LOG2, abs=1e-5)]
    with safe_open(str(saved / LORA_WEIGHTS), "pt") as handle:
        assert sorted(handle.keys()) == sorted(trained.lora_state_dict)
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == FAST.alpha
    # Saving again replaces the folder; a foreign non-empty folder is refused.
    assert save_dpo_lora(trained, saved) == saved
    assert sorted(p.name for p in saved.iterdir()) == [DPO_CONFIG, LORA_WEIGHTS]
    foreign = saved.parent / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        save_dpo_lora(trained, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_saved_lora_loads_into_the_base_and_changes_generation(
    trained: DPOResult, saved: Path, tiny: Path
) -> None:
    prompts = ["a picture number 1", "a picture number 2"]
    before = generate(tiny, prompts, steps=4, seed=3)
    again = generate(tiny, prompts, steps=4, seed=3)
    after = generate(tiny, prompts, lora_folder=saved, steps=4, seed=3)
    assert len(before) == len(after) == 2 and before[0].size == (32, 32)
    for first, second in zip(before, again, strict=True):  # same seeds, same images
        assert np.array_equal(np.asarray(first), np.asarray(second))
    assert not np.array_equal(np.asarray(before[0]), np.asarray(after[0]))
    # The loaded adapter is the trained one, with its alpha.
    pipe = load_pipeline(tiny)
    pipe.load_lora_weights(str(saved))
    (config,) = pipe.unet.peft_config.values()
    assert config.r == FAST.rank and config.lora_alpha == FAST.alpha
    key = next(k for k in trained.lora_state_dict if k.endswith("to_q.lora.up.weight"))
    module = pipe.unet.get_submodule(key.removeprefix("unet.").split(".lora.")[0])
    (loaded,) = module.lora_B.values()
    assert torch.equal(loaded.weight.detach(), trained.lora_state_dict[key])


def test_lora_alpha_survives_save_and_load(tiny: Path, tmp_path: Path) -> None:
    config = DPOConfig(steps=1, batch_size=2, rank=2, lora_alpha=8, time_budget_s=None)
    result = train_dpo_lora(tiny, _pairs(11, 2), replace(config, device="cpu"))
    folder = save_dpo_lora(result, tmp_path / "alpha")
    pipe = load_pipeline(tiny)
    pipe.load_lora_weights(str(folder))
    (adapter,) = pipe.unet.peft_config
    module = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert module.scaling[adapter] == 8 / 2


def test_adapters_disabled_is_the_reference(saved: Path, tiny: Path) -> None:
    base = load_pipeline(tiny)
    tuned = load_pipeline(tiny)
    tuned.load_lora_weights(str(saved))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    states = torch.randn((2, 77, 32), generator=generator)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        reference = base.unet(latents, t, states).sample
        adapted = tuned.unet(latents, t, states).sample
        tuned.unet.disable_adapters()
        disabled = tuned.unet(latents, t, states).sample
        tuned.unet.enable_adapters()
    assert not torch.equal(adapted, reference)
    assert torch.equal(disabled, reference)


def test_deterministic_and_gradient_checkpointing_is_equivalent(
    tiny: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pairs = _pairs(5, 6)
    config = DPOConfig(steps=3, batch_size=4, time_budget_s=None, device="cpu", log_every_s=0)
    log = logging.getLogger("test.dpo")
    with caplog.at_level(logging.INFO, logger="test.dpo"):
        plain = train_dpo_lora(tiny, pairs, config, log=log)
    checkpointed = train_dpo_lora(tiny, pairs, replace(config, gradient_checkpointing=True))
    other_seed = train_dpo_lora(tiny, pairs, replace(config, seed=1))
    assert len(plain.loss_curve) == 3
    losses = [v for _, v in plain.loss_curve]
    assert losses == pytest.approx([v for _, v in checkpointed.loss_curve], abs=1e-6)
    assert plain.lora_state_dict.keys() == checkpointed.lora_state_dict.keys()
    for key, value in plain.lora_state_dict.items():
        assert torch.allclose(value, checkpointed.lora_state_dict[key], atol=1e-6), key
    assert losses[1:] != pytest.approx([v for _, v in other_seed.loss_curve][1:], abs=1e-6)
    assert plain.heldout_curve == [] and plain.heldout_accuracy is None
    progress = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
    assert progress and "ETA" in progress[-1] and "loss" in progress[-1]


def test_time_budget_stops_training(tiny: Path) -> None:
    budget = 4.0
    config = DPOConfig(steps=100_000, batch_size=2, time_budget_s=budget, device="cpu")
    result = train_dpo_lora(tiny, _pairs(7, 4), config, heldout=_pairs(8, 2))
    assert result.stop_reason == "time_budget"
    assert 0 < result.steps < 100_000
    assert result.seconds < budget + 3.0
    assert result.heldout_curve[-1][0] == result.steps  # the final evaluation still ran


def test_v_prediction_scheduler(tiny: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny, tmp_path / "vpred"))
    config_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config_path.read_text())
    scheduler["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(scheduler))
    config = DPOConfig(steps=2, batch_size=2, time_budget_s=None, device="cpu")
    result = train_dpo_lora(folder, _pairs(9, 2), config)
    assert result.prediction_type == "v_prediction" and result.steps == 2
    assert len(result.loss_curve) == 2 and all(math.isfinite(v) for _, v in result.loss_curve)
    scheduler["prediction_type"] = "sample"
    config_path.write_text(json.dumps(scheduler))
    with pytest.raises(ValueError, match="only epsilon and v_prediction"):
        train_dpo_lora(folder, _pairs(9, 2), config)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_no_pairs_or_no_usable_pairs(tiny: Path) -> None:
    config = DPOConfig(steps=1, device="cpu")
    with pytest.raises(ValueError, match="no preference pairs"):
        train_dpo_lora(tiny, [], config)
    unusable = [
        PreferencePair("x", b"garbage", b"garbage"),
        PreferencePair("y", _pairs(0, 1)[0].winner, Path("/no/such/image.png")),
    ]
    with pytest.raises(ValueError, match="no usable training pairs.*undecodable") as info:
        train_dpo_lora(tiny, unusable, config)
    assert "'undecodable_winner': 1" in str(info.value)
    assert "'undecodable_loser': 1" in str(info.value)
    with pytest.raises(TypeError, match="not a PreferencePair"):
        train_dpo_lora(tiny, [("caption", b"a", b"b")], config)  # type: ignore[list-item]


def test_bad_base_folder_fails_by_name(tmp_path: Path) -> None:
    config = DPOConfig(steps=1, device="cpu")
    with pytest.raises(FileNotFoundError, match="missing-base"):
        train_dpo_lora(tmp_path / "missing-base", _pairs(0, 2), config)
    (tmp_path / "empty-base").mkdir()
    with pytest.raises(PipelineFolderError, match="empty-base.*model_index.json"):
        train_dpo_lora(tmp_path / "empty-base", _pairs(0, 2), config)


def test_generate_refuses_missing_and_pickled_loras(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-lora"):
        generate(tiny, ["a"], lora_folder=tmp_path / "no-lora")
    folder = tmp_path / "pickled"
    folder.mkdir()
    canary = tmp_path / "unpickled.txt"

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    (folder / "pytorch_lora_weights.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        generate(tiny, ["a"], lora_folder=folder)
    assert not canary.exists()
    with pytest.raises(ValueError, match="no prompts"):
        generate(tiny, [])
