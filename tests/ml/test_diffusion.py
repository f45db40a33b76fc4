"""The base diffusion pipeline: the offline CLIP tokenizer, building the tiny pipeline
(deterministic, idempotent, atomic) and loading folders safely, with errors that name them."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ml.diffusion import (
    MARKER,
    TINY_CONFIG,
    PipelineFolderError,
    build_tiny_pipeline,
    clip_bpe_vocab,
    is_tiny,
    load_pipeline,
)

# Shared with tests/ml/test_dpo.py: the tiny pipeline is built once per session.
_BUILT: dict[str, Path] = {}


def shared_tiny_pipeline(factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline (seed 0), built on first use in a session temp folder."""
    if "folder" not in _BUILT:
        _BUILT["folder"] = build_tiny_pipeline(factory.mktemp("tiny-sd") / "pipeline", seed=0)
    return _BUILT["folder"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(tiny: Path):
    return load_pipeline(tiny)


def _copy(tiny: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "copy"))


# ---------------------------------------------------------------------------------------------
# Tokenizer

PROMPTS = [
    "a photo of a cat",
    "Hello, world! It's a (masterpiece:1.2), best-quality; 8k   HDR... #art @user",
    "café naïve über — «quotes» 100% <lora:style_v2:0.8>",
    " ".join(["an extremely long prompt about mountains, rivers and the sea"] * 12),
]


def test_offline_tokenizer_matches_open_clip(pipe) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    expected = reference(PROMPTS)  # [n, 77], zero padded, truncated to end with <eot>
    for row, prompt in enumerate(PROMPTS):
        ids = pipe.tokenizer(prompt, truncation=True, max_length=77).input_ids
        want = expected[row].tolist()
        want = want[: want.index(reference.eot_token_id) + 1]
        assert ids == want, prompt
    long_ids = pipe.tokenizer(PROMPTS[-1], truncation=True, max_length=77).input_ids
    assert len(long_ids) == 77 and long_ids[0] == 49406 and long_ids[-1] == 49407
    padded = pipe.tokenizer(["a cat"], padding="max_length", max_length=77).input_ids[0]
    assert len(padded) == 77 and padded[-1] == pipe.tokenizer.pad_token_id == 49407


def test_rebuilt_vocab_is_clips_vocab() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    vocab, merges = clip_bpe_vocab()
    reference = SimpleTokenizer().encoder
    renamed = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}
    assert len(vocab) == len(reference) == 49408
    assert {renamed.get(k, k): v for k, v in vocab.items()} == reference
    assert len(merges) == 48894 and merges[0] == ("i", "n")


# ---------------------------------------------------------------------------------------------
# Building


def test_build_load_round_trip(tiny: Path, pipe) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    for name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny / name).exists(), name
    assert not list(tiny.rglob("*.bin")), "weights must be safetensors only"
    marker = json.loads((tiny / MARKER).read_text())
    assert marker["tiny_model"] is True and marker["seed"] == 0
    assert marker["config"] == json.loads(json.dumps(TINY_CONFIG))
    assert is_tiny(tiny)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.safety_checker is None
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == TINY_CONFIG["resolution"]
    names = {name.rsplit(".", 1)[-1] for name, _ in pipe.unet.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= names
    assert any(name.endswith("attn2.to_out.0") for name, _ in pipe.unet.named_modules())
    # The tiny VAE is deterministic and its latents have about unit variance.
    images = torch.rand((4, 3, 32, 32)) * 2 - 1
    with torch.no_grad():
        dist = pipe.vae.encode(images).latent_dist
    assert float(dist.std.max()) < 1e-2
    assert 0.3 < float(dist.mean.std() * pipe.vae.config.scaling_factor) < 3.0


def test_same_seed_same_weights_other_seed_replaces(tiny: Path, tmp_path: Path) -> None:
    other = build_tiny_pipeline(tmp_path / "again", seed=0)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (other / part).read_bytes() == (tiny / part).read_bytes(), part
    reseeded = build_tiny_pipeline(other, seed=1)
    assert reseeded == other and json.loads((other / MARKER).read_text())["seed"] == 1
    part = "unet/diffusion_pytorch_model.safetensors"
    assert (other / part).read_bytes() != (tiny / part).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["again"], "temp folders left behind"


def test_rebuild_reuses_a_complete_folder(tiny: Path) -> None:
    weights = tiny / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns, weights.stat().st_ino
    assert build_tiny_pipeline(tiny, seed=0) == tiny
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == before


def test_build_refuses_to_overwrite_another_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(PipelineFolderError, match="refusing to overwrite"):
        build_tiny_pipeline(folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# ---------------------------------------------------------------------------------------------
# Loading errors


def test_load_missing_folder_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-pipeline"
    with pytest.raises(FileNotFoundError, match="no-such-pipeline"):
        load_pipeline(missing)


def test_load_folder_without_model_index(tmp_path: Path) -> None:
    folder = tmp_path / "not-diffusers"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(PipelineFolderError, match="not-diffusers.*no model_index.json"):
        load_pipeline(folder)
    assert not is_tiny(folder)


def test_load_refuses_pickled_weights_without_unpickling(tiny: Path, tmp_path: Path) -> None:
    folder = _copy(tiny, tmp_path)
    canary = tmp_path / "unpickled.txt"

    class Payload:
        def __reduce__(self):  # unpickling this calls open(canary, "w"): creates the file
            return (open, (str(canary), "w"))

    # Beside safetensors a pickle is never read...
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    load_pipeline(folder)
    assert not canary.exists()
    # ...and alone it is refused.
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(PipelineFolderError, match=r"copy.*'unet'.*pickle") as info:
        load_pipeline(folder)
    assert "diffusion_pytorch_model.bin" in str(info.value)
    assert not canary.exists()


def test_load_names_the_component_with_a_broken_config(tiny: Path, tmp_path: Path) -> None:
    folder = _copy(tiny, tmp_path)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["down_block_types"] = ["NoSuchDownBlock2D", "DownBlock2D"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(PipelineFolderError, match=r"copy.*component 'unet' does not load"):
        load_pipeline(folder)


def test_load_names_the_component_with_weights_of_another_architecture(
    tiny: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny, tmp_path)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_size"] = 48  # the saved weights are 32 wide
    config_path.write_text(json.dumps(config))
    with pytest.raises(PipelineFolderError, match=r"component 'text_encoder' does not load"):
        load_pipeline(folder)


def test_load_rejects_an_unreadable_model_index(tiny: Path, tmp_path: Path) -> None:
    folder = _copy(tiny, tmp_path)
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(PipelineFolderError, match="model_index.json: unreadable"):
        load_pipeline(folder)
    index = json.loads((tiny / "model_index.json").read_text())
    del index["scheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineFolderError, match="no 'scheduler' component"):
        load_pipeline(folder)


def test_load_rejects_bad_dtype_and_device(tiny: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_pipeline(tiny, dtype=torch.int8)
    with pytest.raises(ValueError, match="device"):
        load_pipeline(tiny, device="tpu")


def test_is_tiny_reads_the_marker(tiny: Path, tmp_path: Path) -> None:
    folder = _copy(tiny, tmp_path)
    assert is_tiny(folder)
    os.remove(folder / MARKER)
    assert not is_tiny(folder)
    (folder / MARKER).write_text('{"tiny_model": false}')
    assert not is_tiny(folder)
