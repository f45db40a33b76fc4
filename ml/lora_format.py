"""kohya / A1111 LoRA files for SD 1.5: key layout, shapes, state dicts, safe reading.

A kohya LoRA (the layout kohya-ss sd-scripts writes) holds three tensors per adapted module::

    <name>.lora_down.weight   [r, in]     (1x1 conv: [r, in, 1, 1])
    <name>.lora_up.weight     [out, r]    (1x1 conv: [out, r, 1, 1])
    <name>.alpha              []          ΔW = up @ down * alpha / r  (alpha missing/0 → r)

with ``<name>`` = ``lora_unet_<diffusers module path, dots → underscores>`` or
``lora_te_text_model_encoder_layers_<i>_<module>``. The SD 1.5 set is 192 UNet modules (16
transformer blocks x 12) plus 72 text-encoder modules (12 layers x 6); `sd15_modules` lists them
at any channel widths (the sample writes them scaled down: 320/640/1280 → 8/16/32, text 768 → 16).

Reading is safetensors only. `sniff_format` / `refusal_reason` recognise pickles (protocol
header ``\\x80``) and zip archives (``PK\\x03\\x04``, torch's format) by their first bytes, and
`.ckpt/.pt/.pth/.bin/.pkl` names and ``PickleTensor`` declarations; such files are refused and
never unpickled. `parse_safetensors_header` validates the 8-byte length + JSON header strictly
before any tensor is touched; `load_lora` fails loudly on any key that is not part of the
layout (no silent partial loads).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# -- layout ------------------------------------------------------------------------------------

DOWN_SUFFIX = ".lora_down.weight"
UP_SUFFIX = ".lora_up.weight"
ALPHA_SUFFIX = ".alpha"
UNET_PREFIX = "lora_unet_"
TEXT_PREFIX = "lora_te_"
NETWORK_MODULE = "networks.lora"


@dataclass(frozen=True)
class Sd15Widths:
    """Channel widths of an SD 1.5-shaped network: the UNet levels and the text width."""

    unet: tuple[int, int, int] = (320, 640, 1280)
    text: int = 768

    def __post_init__(self) -> None:
        if len(self.unet) != 3 or min(self.unet) < 1 or self.text < 1:
            raise ValueError(f"invalid widths {self}")


SD15_WIDTHS = Sd15Widths()
# The sample's files: every width divided by 40 (UNet) and 48 (text); a few KB per rank unit.
SAMPLE_WIDTHS = Sd15Widths(unet=(8, 16, 32), text=16)

# UNet transformer blocks of SD 1.5: (diffusers path of the Transformer2DModel, level 0..2).
_SD15_UNET_BLOCKS: tuple[tuple[str, int], ...] = (
    *((f"down_blocks_{b}_attentions_{a}", b) for b in range(3) for a in range(2)),
    ("mid_block_attentions_0", 2),
    *((f"up_blocks_{b}_attentions_{a}", 3 - b) for b in range(1, 4) for a in range(3)),
)
# Module kinds of one UNet transformer block (12) and one text-encoder layer (6).
UNET_KINDS: tuple[str, ...] = (
    "proj_in",
    "proj_out",
    "attn1_to_q",
    "attn1_to_k",
    "attn1_to_v",
    "attn1_to_out_0",
    "attn2_to_q",
    "attn2_to_k",
    "attn2_to_v",
    "attn2_to_out_0",
    "ff_net_0_proj",
    "ff_net_2",
)
TEXT_KINDS: tuple[str, ...] = (
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
    "mlp_fc1",
    "mlp_fc2",
)
TEXT_LAYERS = 12
# The weights2weights module set: to_q / to_v of attn1 and attn2 in every UNet block (64).
W2W_KINDS: tuple[str, ...] = ("attn1_to_q", "attn1_to_v", "attn2_to_q", "attn2_to_v")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its kohya name (no suffix), shapes and kind."""

    name: str
    kind: str  # one of UNET_KINDS / TEXT_KINDS
    in_features: int
    out_features: int
    conv: bool = False  # SD 1.5's proj_in / proj_out are 1x1 convolutions

    @property
    def is_unet(self) -> bool:
        """True for ``lora_unet_`` modules (False: text encoder)."""
        return self.name.startswith(UNET_PREFIX)

    def down_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of ``lora_down.weight`` at ``rank``."""
        return (rank, self.in_features, 1, 1) if self.conv else (rank, self.in_features)

    def up_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of ``lora_up.weight`` at ``rank``."""
        return (self.out_features, rank, 1, 1) if self.conv else (self.out_features, rank)

    def params(self, rank: int) -> int:
        """Values in the module's down + up tensors."""
        return rank * (self.in_features + self.out_features)


def _unet_shapes(kind: str, c: int, text: int) -> tuple[int, int, bool]:
    """(in, out, conv) of a UNet module kind in a block of width ``c``."""
    if kind in ("proj_in", "proj_out"):
        return c, c, True
    if kind in ("attn2_to_k", "attn2_to_v"):
        return text, c, False
    if kind == "ff_net_0_proj":
        return c, 8 * c, False  # GEGLU: value and gate halves
    if kind == "ff_net_2":
        return 4 * c, c, False
    return c, c, False


def _text_shapes(kind: str, t: int) -> tuple[int, int]:
    if kind == "mlp_fc1":
        return t, 4 * t
    if kind == "mlp_fc2":
        return 4 * t, t
    return t, t


def sd15_modules(
    widths: Sd15Widths = SD15_WIDTHS,
    *,
    unet: bool = True,
    text_encoder: bool = True,
    kinds: Collection[str] | None = None,
) -> tuple[LoraModule, ...]:
    """The SD 1.5 LoRA modules in kohya order (UNet blocks, then text-encoder layers).

    ``kinds`` keeps only those module kinds (e.g. `W2W_KINDS`); ``unet`` / ``text_encoder``
    drop a whole half. At `SD15_WIDTHS` the full set is 264 modules and 589,824 values per
    unit of rank.
    """
    unknown = set(kinds or ()) - set(UNET_KINDS) - set(TEXT_KINDS)
    if unknown:
        raise ValueError(f"unknown module kinds: {sorted(unknown)}")
    out: list[LoraModule] = []
    if unet:
        for block, level in _SD15_UNET_BLOCKS:
            c = widths.unet[level]
            for kind in UNET_KINDS:
                if kinds is not None and kind not in kinds:
                    continue
                n_in, n_out, conv = _unet_shapes(kind, c, widths.text)
                path = (
                    f"{block}_{kind}"
                    if kind.startswith("proj")
                    else (f"{block}_transformer_blocks_0_{kind}")
                )
                out.append(LoraModule(UNET_PREFIX + path, kind, n_in, n_out, conv))
    if text_encoder:
        for layer in range(TEXT_LAYERS):
            for kind in TEXT_KINDS:
                if kinds is not None and kind not in kinds:
                    continue
                n_in, n_out = _text_shapes(kind, widths.text)
                name = f"{TEXT_PREFIX}text_model_encoder_layers_{layer}_{kind}"
                out.append(LoraModule(name, kind, n_in, n_out))
    return tuple(out)


def split_key(key: str) -> tuple[str, str]:
    """(module name, "down" | "up" | "alpha") of a kohya tensor key; raises on other keys."""
    for suffix, part in ((DOWN_SUFFIX, "down"), (UP_SUFFIX, "up"), (ALPHA_SUFFIX, "alpha")):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part
    raise LoraFormatError(f"key {key!r} is not a kohya LoRA tensor")


def tensor_keys(module: LoraModule | str) -> tuple[str, str, str]:
    """The (down, up, alpha) keys of a module."""
    name = module if isinstance(module, str) else module.name
    return name + DOWN_SUFFIX, name + UP_SUFFIX, name + ALPHA_SUFFIX


# -- layers and state dicts --------------------------------------------------------------------


@dataclass(frozen=True)
class LoraLayer:
    """The factors of one module: down [r, in(,1,1)], up [out, r(,1,1)], alpha."""

    down: np.ndarray
    up: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        """r: rows of ``down``."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r (alpha 0 or missing counts as r)."""
        return (self.alpha or self.rank) / self.rank

    def delta(self) -> np.ndarray:
        """ΔW = up @ down * alpha / r as a float64 [out, in] matrix."""
        up = self.up.reshape(self.up.shape[0], -1).astype(np.float64)
        down = self.down.reshape(self.down.shape[0], -1).astype(np.float64)
        return up @ down * self.scale


def build_state_dict(
    layers: Mapping[str, LoraLayer], dtype: np.dtype | type = np.float16
) -> dict[str, np.ndarray]:
    """The kohya state dict of ``layers`` (module name → factors), every tensor in ``dtype``."""
    state: dict[str, np.ndarray] = {}
    for name, layer in layers.items():
        if not name.startswith((UNET_PREFIX, TEXT_PREFIX)):
            raise ValueError(f"not a kohya module name: {name!r}")
        _check_factors(name, layer.down, layer.up)
        down_key, up_key, alpha_key = tensor_keys(name)
        state[down_key] = np.ascontiguousarray(layer.down, dtype=dtype)
        state[up_key] = np.ascontiguousarray(layer.up, dtype=dtype)
        state[alpha_key] = np.array(layer.alpha, dtype=dtype)
    return state


def _check_factors(name: str, down: np.ndarray, up: np.ndarray) -> None:
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraFormatError(f"{name}: down {down.shape} / up {up.shape} are not 2-d or 4-d")
    if down.ndim == 4 and (down.shape[2:] != (1, 1) or up.shape[2:] != (1, 1)):
        raise LoraFormatError(f"{name}: only 1x1 conv factors are supported, got {down.shape}")
    if up.shape[1] != down.shape[0] or down.shape[0] < 1:
        raise LoraFormatError(f"{name}: rank of up {up.shape} != rank of down {down.shape}")


def kohya_metadata(
    rank: int, alpha: float, base_model_version: str, **extra: str
) -> dict[str, str]:
    """``__metadata__`` of a kohya file (all values are strings)."""
    alpha_text = str(int(alpha)) if float(alpha).is_integer() else repr(float(alpha))
    meta = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": alpha_text,
        "ss_base_model_version": base_model_version,
    }
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


_SAFETENSORS_DTYPES: dict[str, str] = {"<f2": "F16", "<f4": "F32", "<f8": "F64"}


def safetensors_bytes(
    state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise float tensors to safetensors bytes in the reference writer's layout
    (``safetensors.numpy.save``: wider dtypes first, then by name; header padded with spaces
    to a multiple of 8), with ``__metadata__`` keys sorted so that the bytes are
    deterministic (the reference writer emits them in hash-map order)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    chunks: list[bytes] = []
    offset = 0
    arrays = {name: np.asarray(value) for name, value in state.items()}
    for name in sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n)):
        array = arrays[name]
        dtype = _SAFETENSORS_DTYPES.get(array.dtype.newbyteorder("<").str)
        if dtype is None or array.dtype.byteorder == ">":
            raise ValueError(f"{name}: unsupported dtype {array.dtype}")
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def save_lora_bytes(
    layers: Mapping[str, LoraLayer],
    metadata: Mapping[str, str] | None = None,
    dtype: np.dtype | type = np.float16,
) -> bytes:
    """The safetensors bytes of a kohya LoRA (deterministic for the same input)."""
    return safetensors_bytes(build_state_dict(layers, dtype), metadata)


# -- refusing pickles ---------------------------------------------------------------------------

PICKLE_EXTENSIONS: tuple[str, ...] = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PICKLE_FORMATS: tuple[str, ...] = ("PickleTensor",)
ZIP_MAGIC = b"PK\x03\x04"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class LoraFormatError(ValueError):
    """A file is not a readable, well-formed kohya safetensors LoRA."""


class RefusedFormatError(LoraFormatError):
    """A file is (or declares itself as) a pickle / zip format and is refused unread."""


def sniff_format(head: bytes) -> str:
    """What the first bytes of a file look like: "pickle", "zip", "safetensors" or "unknown".

    Pickles start with the PROTO opcode ``\\x80`` and a protocol number 2..5 (protocol 0/1
    files start with an opcode such as ``(``, ``}`` or ``c``; they are caught as not
    safetensors). Torch's default ``torch.save`` output is a zip archive.
    """
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(ZIP_MAGIC) or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def refusal_reason(
    file_name: str | None = None, declared_format: str | None = None, head: bytes | None = None
) -> str | None:
    """Why a file must not be read (declared pickle format, pickle extension, pickle/zip
    content), or None. Only looks at names and the first bytes; never parses content."""
    if declared_format and declared_format.strip() in PICKLE_FORMATS:
        return f"refused: declared format {declared_format.strip()}"
    if file_name:
        lower = file_name.strip().lower()
        for ext in PICKLE_EXTENSIONS:
            if lower.endswith(ext):
                return f"refused: pickle extension {ext}"
    if head is not None:
        kind = sniff_format(head)
        if kind == "pickle":
            return "refused: pickle content"
        if kind == "zip":
            return "refused: zip (torch pickle) content"
    return None


# -- safetensors header --------------------------------------------------------------------------

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_NUMPY_DTYPES: dict[str, str] = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data section (after the header)
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: tensors, ``__metadata__`` and where the data starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_size: int  # bytes of the JSON header (the 8-byte length excluded)

    @property
    def data_start(self) -> int:
        """Byte offset of the data section in the file."""
        return 8 + self.header_size

    @property
    def data_size(self) -> int:
        """Bytes of tensor data the header describes."""
        return max((t.end for t in self.tensors.values()), default=0)

    @property
    def file_size(self) -> int:
        """The size a file with this header must have."""
        return self.data_start + self.data_size


def header_length(head: bytes) -> int:
    """The JSON header length stored in the first 8 bytes (raises on a bad length)."""
    if len(head) < 8:
        raise LoraFormatError("file shorter than the 8-byte safetensors length prefix")
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > MAX_HEADER_BYTES:
        raise LoraFormatError(f"safetensors header length {n} out of range")
    return n


def parse_safetensors_header(prefix: bytes, file_size: int | None = None) -> SafetensorsHeader:
    """Validate the header at the start of ``prefix`` (which must hold the whole header).

    Checks: refusal sniffing first (pickle/zip), then the length prefix, UTF-8 JSON object,
    string-only ``__metadata__``, known dtypes, integer shapes, ``data_offsets`` that match
    dtype x shape, tile the data section without gaps or overlaps, and (with ``file_size``)
    end exactly at the end of the file.
    """
    reason = refusal_reason(head=prefix[:16])
    if reason:
        raise RefusedFormatError(reason)
    n = header_length(prefix)
    if len(prefix) < 8 + n:
        raise LoraFormatError(f"truncated header: need {8 + n} bytes, have {len(prefix)}")
    try:
        raw = json.loads(prefix[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoraFormatError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise LoraFormatError("header is not a JSON object")
    metadata_raw = raw.pop("__metadata__", {}) or {}
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise LoraFormatError("__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise LoraFormatError(f"tensor {name!r}: malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise LoraFormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise LoraFormatError(f"tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise LoraFormatError(f"tensor {name!r}: bad data_offsets {offsets!r}")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]  # exact: no int64 overflow
        if offsets[1] - offsets[0] != expected:
            raise LoraFormatError(
                f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for {dtype}{shape}"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            raise LoraFormatError("tensor data has gaps or overlaps")
        position = info.end
    header = SafetensorsHeader(tensors, dict(metadata_raw), n)
    if file_size is not None and file_size != header.file_size:
        raise LoraFormatError(f"file is {file_size} bytes, header describes {header.file_size}")
    return header


# -- reading ------------------------------------------------------------------------------------


@dataclass
class LoadedLora:
    """A kohya LoRA read from safetensors: its layers and ``__metadata__``."""

    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: str = "F16"

    @property
    def rank(self) -> int:
        """The largest rank of its layers (0 when empty)."""
        ranks = {layer.rank for layer in self.layers.values()}
        return max(ranks) if ranks else 0


def _read_source(source: str | os.PathLike[str] | bytes) -> tuple[bytes, str | None]:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), None
    path = Path(source)
    reason = refusal_reason(file_name=path.name)
    if reason:
        raise RefusedFormatError(reason)
    with path.open("rb") as f:
        head = f.read(16)
        reason = refusal_reason(head=head)
        if reason:
            raise RefusedFormatError(reason)
        return head + f.read(), path.name


def load_lora(
    source: str | os.PathLike[str] | bytes,
    *,
    modules: Iterable[LoraModule] | None = None,
) -> LoadedLora:
    """Read a kohya LoRA from a ``.safetensors`` path or bytes; never unpickles.

    Refuses pickle names/content (`RefusedFormatError`), validates the header, and fails
    (`LoraFormatError`) on any key outside the layout, a module missing its down or up
    tensor, a rank mismatch, a non-scalar alpha, or (with ``modules``) a module that is not
    in the given set or has other shapes.
    """
    data, _ = _read_source(source)
    header = parse_safetensors_header(data, file_size=len(data))
    known = {m.name: m for m in modules} if modules is not None else None
    grouped: dict[str, dict[str, np.ndarray]] = {}
    dtypes: set[str] = set()
    body = memoryview(data)[header.data_start :]
    for key, info in header.tensors.items():
        name, part = split_key(key)
        if not name.startswith((UNET_PREFIX, TEXT_PREFIX)):
            raise LoraFormatError(f"key {key!r} has no lora_unet_/lora_te_ prefix")
        if info.dtype not in _NUMPY_DTYPES:
            raise LoraFormatError(f"key {key!r}: unsupported dtype {info.dtype}")
        dtypes.add(info.dtype)
        array = np.frombuffer(body[info.begin : info.end], dtype=_NUMPY_DTYPES[info.dtype])
        grouped.setdefault(name, {})[part] = array.reshape(info.shape)
    layers: dict[str, LoraLayer] = {}
    for name, parts in grouped.items():
        if "down" not in parts or "up" not in parts:
            raise LoraFormatError(f"module {name!r} lacks its lora_down or lora_up tensor")
        down, up = parts["down"], parts["up"]
        _check_factors(name, down, up)
        alpha_array = parts.get("alpha")
        if alpha_array is not None and alpha_array.size != 1:
            raise LoraFormatError(f"module {name!r}: alpha is not a scalar")
        alpha = float(alpha_array.reshape(())) if alpha_array is not None else 0.0
        if known is not None:
            module = known.get(name)
            if module is None:
                raise LoraFormatError(f"module {name!r} is not in the expected module set")
            rank = down.shape[0]
            if down.shape != module.down_shape(rank) or up.shape != module.up_shape(rank):
                raise LoraFormatError(
                    f"module {name!r}: shapes {down.shape}/{up.shape} do not match "
                    f"{module.down_shape(rank)}/{module.up_shape(rank)}"
                )
        layers[name] = LoraLayer(down=down, up=up, alpha=alpha)
    dtype = dtypes.pop() if len(dtypes) == 1 else ("mixed" if dtypes else "F16")
    return LoadedLora(layers=layers, metadata=header.metadata, dtype=dtype)


# -- rank-1 reduction ---------------------------------------------------------------------------


def rank1_reduce(layer: LoraLayer) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-1 approximation of ΔW as (up_vec [out], down_vec [in]).

    ΔW ≈ σ u vᵀ → up_vec = √σ u, down_vec = √σ v (equal norms). The joint sign of (u, v) is
    fixed so that the down vector has a non-negative sum (ties: first non-zero entry positive).
    """
    up = layer.up.reshape(layer.up.shape[0], -1).astype(np.float64) * np.sqrt(layer.scale)
    down = layer.down.reshape(layer.down.shape[0], -1).astype(np.float64) * np.sqrt(layer.scale)
    # SVD of up @ down through the small r x r core (r ≪ in, out).
    q_up, r_up = np.linalg.qr(up)  # up = q_up r_up
    q_down, r_down = np.linalg.qr(down.T)  # down.T = q_down r_down
    u_core, s, vt_core = np.linalg.svd(r_up @ r_down.T)
    u = q_up @ u_core[:, 0]
    v = q_down @ vt_core[0]
    total = v.sum()
    if abs(total) < 1e-12:
        nonzero = np.flatnonzero(np.abs(v) > 1e-12)
        total = v[nonzero[0]] if nonzero.size else 1.0
    if total < 0:
        u, v = -u, -v
    root = np.sqrt(s[0])
    return root * u, root * v


def flatten_rank1(
    layers: Mapping[str, LoraLayer], modules: Sequence[LoraModule], missing: str = "zeros"
) -> np.ndarray:
    """The weights2weights vector of a LoRA: per module in ``modules`` order, the rank-1
    [down_vec (in), up_vec (out)] concatenated. Missing modules are zeros (``missing="zeros"``)
    or an error (``missing="raise"``)."""
    parts: list[np.ndarray] = []
    for module in modules:
        layer = layers.get(module.name)
        if layer is None:
            if missing != "zeros":
                raise LoraFormatError(f"module {module.name!r} missing")
            parts.append(np.zeros(module.in_features + module.out_features))
            continue
        up_vec, down_vec = rank1_reduce(layer)
        if down_vec.size != module.in_features or up_vec.size != module.out_features:
            raise LoraFormatError(f"module {module.name!r}: shape does not match the module set")
        parts += [down_vec, up_vec]
    return np.concatenate(parts) if parts else np.zeros(0)
