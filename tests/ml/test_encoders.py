"""The encoder registry: configs, checkpoints (safe formats only), tags, device handling."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from ml.encoders import (
    PRODUCTION_ENCODER,
    TINY_ENCODER,
    EncoderConfigError,
    build_model,
    encoder_tag,
    load_encoder,
    resolve_config,
    resolve_device,
)
from ml.encoders.checkpoint import file_sha256, load_state_dict, save_state_dict


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A safetensors checkpoint of the tiny config, seeded differently from the default init."""
    _, _, model, _ = build_model(TINY_ENCODER, seed=7)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_state_dict(model, path)
    return path, model


def test_production_default_is_an_open_clip_config():
    name, config = resolve_config(PRODUCTION_ENCODER)
    assert name == "ViT-H-14"
    assert config["embed_dim"] == 1024


def test_tiny_encoder_builds_offline_and_embeds_normalised_vectors():
    encoder = load_encoder(TINY_ENCODER, device="cpu")
    assert encoder.is_tiny and not encoder.trained
    assert encoder.tag == "imagegem-tiny@init-seed0"
    images = encoder.encode_image_tensors(torch.randn(3, 3, encoder.image_size, encoder.image_size))
    texts = encoder.encode_token_tensors(encoder.tokenizer(["a dog", "", "星空の城"]))
    assert images.shape == (3, encoder.embed_dim) and texts.shape == (3, encoder.embed_dim)
    assert torch.allclose(images.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_same_seed_same_weights_other_seed_other_weights():
    a = build_model(TINY_ENCODER, seed=1)[2].state_dict()
    b = build_model(TINY_ENCODER, seed=1)[2].state_dict()
    c = build_model(TINY_ENCODER, seed=2)[2].state_dict()
    key = "visual.conv1.weight"
    assert torch.equal(a[key], b[key])
    assert not torch.equal(a[key], c[key])


def test_json_config_file_is_registered_under_its_stem(tmp_path):
    _, tiny = resolve_config(TINY_ENCODER)
    custom = json.loads(json.dumps(tiny))
    custom["embed_dim"] = 32
    path = tmp_path / "my-clip.json"
    path.write_text(json.dumps(custom))
    encoder = load_encoder(str(path), device="cpu")
    assert encoder.name == "my-clip" and encoder.embed_dim == 32


@pytest.mark.parametrize("bad", ["no-such-model", "/nowhere/model.json"])
def test_unknown_config_is_a_clear_error(bad):
    with pytest.raises(EncoderConfigError, match="no-such-model|does not exist"):
        resolve_config(bad)


def test_safetensors_checkpoint_loads_and_sets_the_tag(tiny_checkpoint):
    path, source = tiny_checkpoint
    encoder = load_encoder(TINY_ENCODER, checkpoint=path, device="cpu")
    digest = file_sha256(path)
    assert encoder.checkpoint_sha256 == digest
    assert encoder.tag == f"imagegem-tiny@{digest[:16]}" == encoder_tag("imagegem-tiny", digest)
    assert encoder.trained
    key = "visual.conv1.weight"
    assert torch.equal(encoder.model.state_dict()[key], source.state_dict()[key])


def test_torch_checkpoint_with_wrapper_and_ddp_prefix_loads(tiny_checkpoint, tmp_path):
    _, source = tiny_checkpoint
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    path = tmp_path / "epoch_3.pt"
    torch.save(wrapped, path)
    encoder = load_encoder(TINY_ENCODER, checkpoint=path, device="cpu")
    key = "text_projection"
    assert torch.equal(encoder.model.state_dict()[key], source.state_dict()[key])


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_with_code_is_refused_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict(path)
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["model.ckpt", "model.pkl", "model"])
def test_other_formats_are_refused_by_name(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="unsupported format"):
        load_state_dict(path)


def test_missing_and_corrupt_checkpoints_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_encoder(TINY_ENCODER, checkpoint=tmp_path / "nothing.safetensors", device="cpu")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_encoder(TINY_ENCODER, checkpoint=garbage, device="cpu")


def test_wrong_architecture_names_file_config_and_mismatch(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    _, tiny = resolve_config(TINY_ENCODER)
    wider = json.loads(json.dumps(tiny))
    wider["embed_dim"] = 48
    config = tmp_path / "wider-clip.json"
    config.write_text(json.dumps(wider))
    with pytest.raises(ValueError) as err:
        load_encoder(str(config), checkpoint=path, device="cpu")
    message = str(err.value)
    assert "tiny.safetensors" in message and "wider-clip" in message
    assert "shape mismatch" in message and "text_projection" in message


def test_missing_keys_are_reported(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    _, source = tiny_checkpoint
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("visual.")}
    path = tmp_path / "text-only.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing key\(s\) \(visual\."):
        load_encoder(TINY_ENCODER, checkpoint=path, device="cpu")


def test_device_and_precision_are_validated():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="precision"):
        load_encoder(TINY_ENCODER, device="cpu", precision="fp8")
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_cpu_runs_fp32_whatever_precision_is_asked():
    encoder = load_encoder(TINY_ENCODER, device="cpu", precision="bf16")
    out = encoder.encode_image_tensors(torch.randn(1, 3, 64, 64))
    assert out.dtype == torch.float32
    assert encoder.describe()["precision"] == "fp32"
