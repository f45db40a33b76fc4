"""Vectorised text builders for the sample generator (numpy + pyarrow.compute, no row loops).

Everything here turns integer arrays into Arrow string arrays: hex digests, UUIDs, BlurHash-like
strings, mixed-radix vocabulary words, and "YYYY-MM-DD HH:MM:SS" timestamps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warehouse.schema import RELEASE_TIMESTAMP_FORMAT

_HEX_LOWER = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_UPPER = np.frombuffer(b"0123456789ABCDEF", dtype=np.uint8)
# BlurHash's base-83 alphabet.
_BASE83 = np.frombuffer(
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#$%*+,-.:;=?@[]^_{|}~",
    dtype=np.uint8,
)


def fixed_width_strings(chars: np.ndarray) -> pa.StringArray:
    """Turn an (n, width) uint8 matrix of ASCII codes into n strings of that width."""
    chars = np.ascontiguousarray(chars, dtype=np.uint8)
    n_rows, width = chars.shape
    offsets = np.arange(n_rows + 1, dtype=np.int64) * width
    if offsets[-1] < 2**31 - 1:
        return pa.StringArray.from_buffers(
            n_rows, pa.py_buffer(offsets.astype(np.int32).tobytes()), pa.py_buffer(chars.tobytes())
        )
    large = pa.LargeStringArray.from_buffers(
        n_rows, pa.py_buffer(offsets.tobytes()), pa.py_buffer(chars.tobytes())
    )
    return large.cast(pa.string())


def hex_chars(random_bytes: np.ndarray, upper: bool = False) -> np.ndarray:
    """(n, k) uint8 bytes → (n, 2k) uint8 ASCII hex digits."""
    table = _HEX_UPPER if upper else _HEX_LOWER
    n_rows, n_bytes = random_bytes.shape
    out = np.empty((n_rows, 2 * n_bytes), dtype=np.uint8)
    out[:, 0::2] = table[random_bytes >> 4]
    out[:, 1::2] = table[random_bytes & 0x0F]
    return out


def hex_strings(random_bytes: np.ndarray, upper: bool = False) -> pa.StringArray:
    """(n, k) uint8 bytes → n hex strings of 2k characters."""
    return fixed_width_strings(hex_chars(random_bytes, upper))


def uuid4_strings(random_bytes: np.ndarray) -> pa.StringArray:
    """(n, 16) uint8 bytes → n UUID version-4 strings "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx"."""
    raw = np.array(random_bytes, dtype=np.uint8, copy=True)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    digits = hex_chars(raw)
    dash = np.full((raw.shape[0], 1), ord("-"), dtype=np.uint8)
    parts = [
        digits[:, 0:8],
        dash,
        digits[:, 8:12],
        dash,
        digits[:, 12:16],
        dash,
        digits[:, 16:20],
        dash,
        digits[:, 20:32],
    ]
    return fixed_width_strings(np.hstack(parts))


def base83_chars(values: np.ndarray, n_digits: int) -> np.ndarray:
    """Non-negative integers → (n, n_digits) uint8 ASCII base-83 digits, most significant first."""
    values = np.asarray(values, dtype=np.int64)
    out = np.empty((values.shape[0], n_digits), dtype=np.uint8)
    rest = values.copy()
    for position in range(n_digits - 1, -1, -1):
        out[:, position] = _BASE83[rest % 83]
        rest //= 83
    return out


def blurhash_like(rgb: np.ndarray, rng: np.random.Generator) -> pa.StringArray:
    """BlurHash-shaped strings (4x3 components, 28 chars) whose DC term encodes `rgb`.

    `rgb` is an (n, 3) integer array of average colours; the AC terms are random. The strings
    follow BlurHash's layout (size flag, max-AC, 4-char DC colour, 11 x 2-char AC terms) so a
    BlurHash decoder yields an image of roughly that average colour.
    """
    n_rows = rgb.shape[0]
    rgb = np.clip(np.asarray(rgb, dtype=np.int64), 0, 255)
    size_flag = np.full(n_rows, (4 - 1) + (3 - 1) * 9, dtype=np.int64)
    max_ac = rng.integers(5, 40, size=n_rows)
    dc_value = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    ac_values = rng.integers(0, 19 * 19 * 19, size=(n_rows, 11))
    parts = [base83_chars(size_flag, 1), base83_chars(max_ac, 1), base83_chars(dc_value, 4)]
    parts += [base83_chars(ac_values[:, j], 2) for j in range(11)]
    return fixed_width_strings(np.hstack(parts))


def mixed_radix_digits(keys: np.ndarray, radices: Sequence[int]) -> list[np.ndarray]:
    """Digits of `keys` in the mixed radix `radices` (least significant digit first).

    The last digit is not reduced, so keys beyond the product of the radices keep distinct
    digit tuples (the caller decides how to spell an overflowing last digit).
    """
    rest = np.asarray(keys, dtype=np.int64).copy()
    digits: list[np.ndarray] = []
    for radix in radices[:-1]:
        digits.append(rest % radix)
        rest //= radix
    digits.append(rest)
    return digits


def scramble(keys: np.ndarray, modulus: int, salt: int = 0) -> np.ndarray:
    """A bijection of [0, modulus) (affine map with a multiplier coprime to `modulus`).

    Used to spread consecutive keys over a vocabulary space so that neighbouring ids do not
    differ only in their last word.
    """
    if modulus <= 1:
        return np.zeros_like(np.asarray(keys, dtype=np.int64))
    multiplier = _coprime_multiplier(modulus, salt)
    offset = (salt * 7919 + 12345) % modulus
    keys = np.asarray(keys, dtype=np.int64)
    # Python ints avoid int64 overflow for huge moduli; vectorised path for the usual ones.
    if multiplier * modulus < 2**62:
        return (keys * multiplier + offset) % modulus
    return np.array([(int(k) * multiplier + offset) % modulus for k in keys], dtype=np.int64)


def _coprime_multiplier(modulus: int, salt: int) -> int:
    candidate = 2_654_435_761 % modulus + salt * 2 + 1
    while np.gcd(candidate, modulus) != 1:
        candidate += 1
    return candidate % modulus or 1


def take_strings(vocab: Sequence[str | None], indices: np.ndarray) -> pa.Array:
    """vocab[indices] as an Arrow string array (negative indices → null)."""
    vocab_array = pa.array(list(vocab), type=pa.string())
    indices = np.asarray(indices, dtype=np.int64)
    mask = indices < 0
    index_array = pa.array(np.where(mask, 0, indices), mask=mask if mask.any() else None)
    return pc.take(vocab_array, index_array)


def int_strings(values: np.ndarray) -> pa.Array:
    """Integers → their decimal text."""
    return pc.cast(pa.array(np.asarray(values, dtype=np.int64)), pa.string())


def timestamp_strings(epoch_seconds: np.ndarray) -> pa.Array:
    """Seconds since 1970-01-01 → "YYYY-MM-DD HH:MM:SS" text."""
    stamps = pa.array(np.asarray(epoch_seconds, dtype=np.int64).astype("datetime64[s]"))
    return pc.strftime(stamps, format=RELEASE_TIMESTAMP_FORMAT)


def join(
    parts: Sequence[pa.Array | str], separator: str = "", skip_nulls: bool = False
) -> pa.Array:
    """Element-wise concatenation of string arrays (and scalars) with `separator`."""
    handling = "skip" if skip_nulls else "emit_null"
    return pc.binary_join_element_wise(*parts, separator, null_handling=handling)


def wrap_weighted(text: pa.Array, weights: pa.Array) -> pa.Array:
    """A1111 attention syntax: "(text:w)" where `weights` is non-empty, else `text` unchanged."""
    weighted = join(["(", text, ":", weights, ")"])
    return pc.if_else(pc.equal(weights, ""), text, weighted)
