"""kohya LoRA layout, safetensors writing/reading, refusal of pickles, rank-1 reduction."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stnp
from safetensors import safe_open

from ml import lora_format as lf


def _layers(
    modules: tuple[lf.LoraModule, ...], rank: int, seed: int = 0
) -> dict[str, lf.LoraLayer]:
    rng = np.random.default_rng(seed)
    return {
        m.name: lf.LoraLayer(
            down=rng.standard_normal(m.down_shape(rank)),
            up=rng.standard_normal(m.up_shape(rank)),
            alpha=float(rank) / 2,
        )
        for m in modules
    }


# --- layout -----------------------------------------------------------------------------------


def test_sd15_module_set_matches_the_reference_counts() -> None:
    modules = lf.sd15_modules()
    assert len(modules) == 264 and len({m.name for m in modules}) == 264
    unet = [m for m in modules if m.is_unet]
    assert len(unet) == 192 and len(modules) - len(unet) == 72
    assert sum(m.params(1) for m in modules) == 589_824
    assert sum(m.params(1) for m in unet) == 423_936
    w2w = lf.sd15_modules(text_encoder=False, kinds=lf.W2W_KINDS)
    assert len(w2w) == 64 and sum(m.params(1) for m in w2w) == 99_648
    names = {m.name: m for m in modules}
    q = names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert (q.in_features, q.out_features, q.conv) == (320, 320, False)
    k = names["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"]
    assert (k.in_features, k.out_features) == (768, 1280)
    ff = names["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"]
    assert (ff.in_features, ff.out_features) == (320, 2560)
    ff2 = names["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"]
    assert (ff2.in_features, ff2.out_features) == (5120, 1280)
    proj = names["lora_unet_down_blocks_1_attentions_1_proj_in"]
    assert proj.conv and proj.down_shape(4) == (4, 640, 1, 1) and proj.up_shape(4) == (640, 4, 1, 1)
    fc1 = names["lora_te_text_model_encoder_layers_11_mlp_fc1"]
    assert (fc1.in_features, fc1.out_features) == (768, 3072)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names


def test_scaled_widths_keep_the_structure() -> None:
    small = lf.sd15_modules(lf.SAMPLE_WIDTHS)
    full = lf.sd15_modules()
    assert [m.name for m in small] == [m.name for m in full]
    ratio = {
        (f.in_features // s.in_features, f.out_features // s.out_features)
        for s, f in zip(small, full, strict=True)
        if s.is_unet and "attn2_to_k" not in s.name and "attn2_to_v" not in s.name
    }
    assert ratio == {(40, 40)}
    assert sum(m.params(1) for m in small) == 13_952
    with pytest.raises(ValueError, match="unknown module kinds"):
        lf.sd15_modules(kinds=("attn3_to_q",))


# --- writing / reading ------------------------------------------------------------------------


def test_state_dict_round_trips_through_safetensors(tmp_path: Path) -> None:
    modules = lf.sd15_modules(lf.SAMPLE_WIDTHS)
    layers = _layers(modules, rank=3)
    meta = lf.kohya_metadata(3, 1.5, "sd_v1", ss_output_name="x")
    data = lf.save_lora_bytes(layers, meta, np.float32)
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="numpy") as f:  # the reference reader accepts it
        assert f.metadata() == meta
        assert len(f.keys()) == 3 * len(modules)
    loaded = lf.load_lora(path, modules=modules)
    assert loaded.metadata["ss_network_module"] == "networks.lora"
    assert loaded.metadata["ss_network_alpha"] == "1.5" and loaded.dtype == "F32"
    for name, layer in layers.items():
        got = loaded.layers[name]
        np.testing.assert_allclose(got.down, layer.down, rtol=1e-6)
        np.testing.assert_allclose(got.up, layer.up, rtol=1e-6)
        assert got.alpha == 1.5 and got.rank == 3
    assert lf.load_lora(data).layers.keys() == layers.keys()  # from bytes too


def test_writer_matches_the_reference_writer_byte_for_byte() -> None:
    layers = _layers(lf.sd15_modules(lf.SAMPLE_WIDTHS, kinds=lf.W2W_KINDS), rank=2)
    state = lf.build_state_dict(layers, np.float16)
    meta = {"ss_network_module": "networks.lora"}
    assert lf.safetensors_bytes(state, meta) == stnp.save(state, metadata=meta)
    assert lf.safetensors_bytes(state) == stnp.save(state)


def _header_bytes(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\x00" * 4, "shorter"),
        (struct.pack("<Q", 1) + b"{", "out of range"),
        (struct.pack("<Q", 10**12) + b"{}", "out of range"),
        (struct.pack("<Q", 100) + b"{}", "truncated header"),
        (struct.pack("<Q", 4) + b"[1] ", "JSON object"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "UTF-8 JSON"),
        (_header_bytes({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 2]}}), "dtype"),
        (_header_bytes({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 2]}}), "bytes for"),
        (
            _header_bytes(
                {
                    "a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
                    "b": {"dtype": "F16", "shape": [1], "data_offsets": [4, 6]},
                }
            ),
            "gaps",
        ),
        (_header_bytes({"__metadata__": {"k": 1}}), "strings"),
        (_header_bytes({"a": {"dtype": "F16", "shape": [-1], "data_offsets": [0, 2]}}), "shape"),
        (_header_bytes({"a": {"dtype": "F16", "shape": [1]}}), "malformed"),
        (
            _header_bytes({"a": {"dtype": "U8", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}),
            "bytes for",
        ),
    ],
)
def test_malformed_headers_are_rejected(blob: bytes, match: str) -> None:
    with pytest.raises(lf.LoraFormatError, match=match):
        lf.parse_safetensors_header(blob)


def test_header_must_describe_the_whole_file() -> None:
    good = lf.safetensors_bytes({"lora_unet_x.alpha": np.array(1.0, dtype=np.float32)})
    assert lf.parse_safetensors_header(good, file_size=len(good)).file_size == len(good)
    with pytest.raises(lf.LoraFormatError, match="describes"):
        lf.parse_safetensors_header(good + b"extra", file_size=len(good) + 5)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"model.diffusion_model.x": np.zeros((2, 2), np.float16)}, "not a kohya LoRA tensor"),
        ({"unet_x.lora_down.weight": np.zeros((1, 2), np.float16)}, "prefix"),
        ({"lora_unet_x.lora_down.weight": np.zeros((1, 2), np.float16)}, "lacks"),
        (
            {
                "lora_unet_x.lora_down.weight": np.zeros((2, 4), np.float16),
                "lora_unet_x.lora_up.weight": np.zeros((4, 3), np.float16),
            },
            "rank",
        ),
        (
            {
                "lora_unet_x.lora_down.weight": np.zeros((2, 4), np.float16),
                "lora_unet_x.lora_up.weight": np.zeros((4, 2), np.float16),
                "lora_unet_x.alpha": np.zeros(2, np.float16),
            },
            "scalar",
        ),
    ],
)
def test_loading_fails_loudly_on_keys_outside_the_layout(state: dict, match: str) -> None:
    with pytest.raises(lf.LoraFormatError, match=match):
        lf.load_lora(lf.safetensors_bytes(state))


def test_loading_checks_shapes_against_a_module_set() -> None:
    modules = lf.sd15_modules(lf.SAMPLE_WIDTHS, kinds=lf.W2W_KINDS)
    layers = _layers(modules, rank=1)
    data = lf.save_lora_bytes(layers)
    loaded = lf.load_lora(data, modules=modules)
    assert list(loaded.layers) == [m.name for m in modules]
    assert modules and all(loaded.layers[m.name].rank == 1 for m in modules)
    with pytest.raises(lf.LoraFormatError, match="not in the expected module set"):
        lf.load_lora(data, modules=modules[:-1])
    with pytest.raises(lf.LoraFormatError, match="do not match"):
        lf.load_lora(data, modules=lf.sd15_modules(kinds=lf.W2W_KINDS))  # full widths


# --- refusing pickles -------------------------------------------------------------------------


def _torch_style_zip(payload: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    return buffer.getvalue()


def test_pickles_and_zips_are_recognised_by_their_first_bytes() -> None:
    payload = pickle.dumps({"a": 1}, protocol=2)
    assert lf.sniff_format(payload) == "pickle"
    assert lf.sniff_format(pickle.dumps({"a": 1}, protocol=5)) == "pickle"
    assert lf.sniff_format(_torch_style_zip(payload)) == "zip"
    assert lf.sniff_format(lf.safetensors_bytes({"x": np.zeros(1, np.float16)})) == "safetensors"
    assert lf.sniff_format(b"<html>") == "unknown"
    for name, ext in (
        ("x.ckpt", ".ckpt"),
        ("x.PT", ".pt"),
        ("x.bin", ".bin"),
        ("x.pth", ".pth"),
        ("x.pkl", ".pkl"),
        (" y.pickle ", ".pickle"),
    ):
        assert lf.refusal_reason(file_name=name) == f"refused: pickle extension {ext}"
    assert lf.refusal_reason("x.safetensors", "PickleTensor") == (
        "refused: declared format PickleTensor"
    )
    assert lf.refusal_reason("x.safetensors", "SafeTensor", b"\x80\x04rest") == (
        "refused: pickle content"
    )
    assert lf.refusal_reason("x.safetensors", "SafeTensor", b"PK\x03\x04") == (
        "refused: zip (torch pickle) content"
    )
    assert lf.refusal_reason("x.safetensors", "SafeTensor", b"\x10\x00\x00\x00") is None
    assert lf.refusal_reason() is None  # nothing known: nothing to refuse on


class _Boom:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_load_lora_refuses_pickles_without_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"lora_unet_x.alpha": _Boom(marker)}, protocol=2)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    cases = {
        "disguised.safetensors": payload,
        "zipped.safetensors": _torch_style_zip(payload),
        "named.ckpt": lf.safetensors_bytes({"x": np.zeros(1, np.float16)}),
        "named.pt": payload,
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(lf.RefusedFormatError):
            lf.load_lora(path)
    with pytest.raises(lf.RefusedFormatError):
        lf.load_lora(payload)
    with pytest.raises(lf.RefusedFormatError):
        lf.parse_safetensors_header(payload)
    assert not marker.exists()


# --- rank-1 reduction -------------------------------------------------------------------------


def test_rank1_reduce_is_the_top_singular_pair_with_a_fixed_sign() -> None:
    rng = np.random.default_rng(3)
    down, up = rng.standard_normal((3, 12)), rng.standard_normal((7, 3))
    layer = lf.LoraLayer(down=down, up=up, alpha=1.5)
    up_vec, down_vec = lf.rank1_reduce(layer)
    u, s, vt = np.linalg.svd(up @ down * 1.5 / 3)
    np.testing.assert_allclose(
        np.outer(up_vec, down_vec), s[0] * np.outer(u[:, 0], vt[0]), atol=1e-10
    )
    assert np.isclose(np.linalg.norm(up_vec), np.linalg.norm(down_vec))
    assert down_vec.sum() >= 0
    flipped = lf.rank1_reduce(lf.LoraLayer(down=-down, up=-up, alpha=1.5))
    np.testing.assert_allclose(flipped[1], down_vec, atol=1e-10)  # same sign after a flip
    no_alpha = lf.LoraLayer(down=down, up=up, alpha=0.0)
    assert no_alpha.scale == 1.0


def test_flatten_rank1_uses_the_w2w_layout() -> None:
    modules = lf.sd15_modules(lf.SAMPLE_WIDTHS, text_encoder=False, kinds=lf.W2W_KINDS)
    layers = _layers(modules, rank=2)
    vector = lf.flatten_rank1(layers, modules)
    assert vector.shape == (sum(m.in_features + m.out_features for m in modules),)
    first = modules[0]
    up_vec, down_vec = lf.rank1_reduce(layers[first.name])
    np.testing.assert_allclose(vector[: first.in_features], down_vec)
    np.testing.assert_allclose(
        vector[first.in_features : first.in_features + first.out_features], up_vec
    )
    partial = dict(list(layers.items())[1:])
    assert not lf.flatten_rank1(partial, modules)[: first.in_features].any()
    with pytest.raises(lf.LoraFormatError, match="missing"):
        lf.flatten_rank1(partial, modules, missing="raise")
