"""Batched CLIP inference: the decoding policy, batches that survive bad images, text dedup and
truncation counts, Arrow storage of vectors, the throughput measurement."""

from __future__ import annotations

import io
import logging
import struct
import time
import warnings
import zlib

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile

from ml.embed import (
    DecodedBatch,
    ImageBatches,
    ImageRejected,
    bare_image_loop,
    decode_image,
    embed_images,
    embed_texts,
    embedding_throughput,
    from_arrow_vectors,
    to_arrow_vectors,
    tokenize_counting_truncation,
)
from ml.encoders import TINY_ENCODER, load_encoder

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(TINY_ENCODER, device="cpu")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def halves(left: tuple, right: tuple, mode: str = "RGB", size=(40, 20)) -> Image.Image:
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def close(pixel, expected, tolerance: int = 6) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected, strict=True))


def png_claiming(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR (and its CRC) is patched to claim ``width`` x ``height``."""
    data = bytearray(encode(noise(8, 8), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


class MemoryReader:
    """A picklable custom reader (paths are keys of an in-memory dict)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def __call__(self, path: str) -> bytes:
        if path not in self.blobs:
            raise FileNotFoundError(path)
        return self.blobs[path]


# -- decoding policy: rejections ---------------------------------------------------------------


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageRejected) as err:
        decode_image(data, **kwargs)
    assert isinstance(err.value, ValueError)
    assert str(err.value) == err.value.reason
    return err.value.reason


def test_zero_bytes_is_an_empty_file():
    assert reason_of(b"") == "empty file"


def test_garbage_is_not_a_decodable_image_with_a_stable_reason():
    garbage = b"\x00this is not an image, only some bytes" * 4
    assert reason_of(garbage) == "not a decodable image (unknown format)"
    assert reason_of(garbage) == reason_of(bytes(garbage))  # no object addresses in the text


def test_corrupt_pixel_data_behind_a_valid_header_names_the_format():
    data = bytearray(encode(noise(32, 32), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start : start + 40] = b"\xff" * 40  # zlib stream destroyed, chunk CRC now wrong too
    reason = reason_of(bytes(data))
    assert reason.startswith("not a decodable image (PNG: ")
    assert "0x" not in reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
def test_a_file_cut_in_half_is_truncated_not_half_decoded(fmt):
    data = encode(noise(64, 64), fmt)
    assert reason_of(data[: len(data) // 2]) == "truncated image"


def test_truncated_images_switched_on_elsewhere_is_refused_loudly(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(noise(), "JPEG"))


@pytest.mark.parametrize(("size", "expected"), [((1, 1), "1 x 1"), ((100, 4), "100 x 4")])
def test_tiny_images_are_too_small(size, expected):
    assert reason_of(encode(Image.new("RGB", size, RED), "PNG")) == f"image too small ({expected})"


def test_min_side_is_a_parameter():
    data = encode(Image.new("RGB", (10, 10), RED), "PNG")
    assert decode_image(data, min_side=10).size == (10, 10)
    assert reason_of(data, min_side=11) == "image too small (10 x 10)"


@pytest.fixture
def load_calls(monkeypatch):
    """Records every ImageFile.load: a size refusal must come before any pixel is decoded."""
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (20_000, 20_000),  # over twice PIL's bomb limit: Image.open itself raises
        (12_000, 10_000),  # between PIL's warning and error limits
        (7_000, 6_000),  # under PIL's limits, over max_pixels (40 M)
    ],
)
def test_huge_headers_are_refused_before_decoding(width, height, load_calls):
    data = png_claiming(width, height)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert reason_of(data) == f"image too large ({width} x {height})"
    assert load_calls == []
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []


def test_max_pixels_is_checked_from_the_header(load_calls):
    data = encode(noise(20, 30), "PNG")
    assert reason_of(data, max_pixels=599) == "image too large (20 x 30)"
    assert load_calls == []
    assert decode_image(data, max_pixels=600).size == (20, 30)
    assert (20, 30) in load_calls


# -- decoding policy: conversions --------------------------------------------------------------


def test_cmyk_jpeg_becomes_the_right_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_image(data)
    assert image.mode == "RGB"
    assert close(image.getpixel((8, 8)), RED)


def test_16_bit_png_is_scaled_not_clipped():
    values = np.zeros((16, 16), dtype=np.uint16)
    values[:, :8] = 65535
    values[:, 8:] = 128 * 257
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    image = decode_image(data)
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == WHITE
    assert image.getpixel((12, 2)) == (128, 128, 128)  # PIL's own convert would clip to 255


def test_palette_png_with_transparency_is_composited_onto_white():
    palette_image = Image.new("P", (16, 16), 0)
    palette_image.putpalette([0, 0, 0, *RED] + [0] * 762)  # index 0 black, index 1 red
    palette_image.paste(1, (8, 0, 16, 16))
    data = encode(palette_image, "PNG", transparency=0)
    image = decode_image(data)
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == WHITE  # transparent black → white, not black
    assert image.getpixel((12, 2)) == RED


def test_rgba_is_composited_onto_white_not_black():
    rgba = Image.new("RGBA", (24, 8), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 128), (8, 0, 16, 8))
    rgba.paste((0, 0, 255, 255), (16, 0, 24, 8))
    image = decode_image(encode(rgba, "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == WHITE
    assert close(image.getpixel((12, 2)), (255, 127, 127), tolerance=1)
    assert image.getpixel((20, 2)) == BLUE


def test_la_is_composited_onto_white():
    la = Image.new("LA", (16, 8), (0, 0))
    la.paste((0, 255), (8, 0, 16, 8))
    image = decode_image(encode(la, "PNG"))
    assert image.getpixel((2, 2)) == WHITE
    assert image.getpixel((12, 2)) == (0, 0, 0)


def test_grayscale_becomes_three_equal_channels():
    image = decode_image(encode(Image.new("L", (16, 16), 77), "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((3, 3)) == (77, 77, 77)


@pytest.mark.parametrize(
    ("fmt", "options"), [("GIF", {}), ("WEBP", {"lossless": True})], ids=["gif", "webp"]
)
def test_animations_embed_their_first_frame(fmt, options):
    red, blue = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)
    data = encode(red, fmt, save_all=True, append_images=[blue], duration=100, loop=0, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    image = decode_image(data)
    assert image.mode == "RGB"
    assert close(image.getpixel((8, 8)), RED)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to display
    data = encode(halves(RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data)
    assert image.size == (20, 40)
    assert close(image.getpixel((10, 3)), RED, tolerance=40)  # stored left → displayed top
    assert close(image.getpixel((10, 36)), BLUE, tolerance=40)


def test_an_upright_jpeg_keeps_its_size_and_content():
    image = decode_image(encode(halves(RED, BLUE), "JPEG", quality=95))
    assert image.size == (40, 20)
    assert close(image.getpixel((3, 10)), RED, tolerance=40)


# -- batches -----------------------------------------------------------------------------------


def direct_vector(encoder, data: bytes) -> np.ndarray:
    pixels = encoder.preprocess(decode_image(data)).unsqueeze(0)
    return encoder.encode_image_tensors(pixels)[0].numpy()


@pytest.fixture
def mixed(tmp_path):
    """Eight items, in two batches of four: three good images among five bad ones."""
    blobs = {
        1: encode(noise(seed=1), "JPEG"),
        2: b"",
        3: encode(noise(seed=3).convert("RGBA"), "PNG"),
        4: b"GIF89a but nothing after that is right" * 3,
        6: encode(noise(seed=6), "JPEG")[:600],
        7: encode(Image.new("RGB", (1, 1), RED), "PNG"),
        8: encode(noise(60, 90, seed=8), "JPEG"),
    }
    items = []
    for image_id in range(1, 9):
        path = tmp_path / f"{image_id}.img"
        if image_id in blobs:
            path.write_bytes(blobs[image_id])
        items.append((image_id, str(path)))
    rejections = {
        2: "empty file",
        4: "not a decodable image (unknown format)",
        5: "file not found",
        6: "truncated image",
        7: "image too small (1 x 1)",
    }
    return items, blobs, rejections


def test_a_batch_mixing_good_and_bad_images_keeps_every_item(encoder, mixed):
    items, blobs, rejections = mixed
    batches = list(embed_images(encoder, items, batch_size=4))
    assert [b.ids.tolist() for b in batches] == [[1, 3], [8]]
    assert [dict(b.rejected) for b in batches] == [
        {2: rejections[2], 4: rejections[4]},
        {5: rejections[5], 6: rejections[6], 7: rejections[7]},
    ]
    for batch in batches:
        assert batch.ids.dtype == np.int64
        assert batch.vectors.dtype == np.float32
        assert batch.vectors.shape == (len(batch.ids), encoder.embed_dim)
        for image_id, vector in zip(batch.ids.tolist(), batch.vectors, strict=True):
            # each vector is its own image's, not shifted by the rejections around it
            np.testing.assert_allclose(vector, direct_vector(encoder, blobs[image_id]), atol=1e-5)


def test_vectors_are_unit_norm_and_deterministic(encoder, mixed):
    items, _, _ = mixed
    first = np.concatenate([b.vectors for b in embed_images(encoder, items, batch_size=4)])
    second = np.concatenate([b.vectors for b in embed_images(encoder, items, batch_size=3)])
    assert first.shape == (3, encoder.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(first, second, atol=1e-6)
    assert not np.allclose(first[0], first[1])


def test_a_batch_of_only_bad_images_yields_rejections_and_no_vectors(encoder, tmp_path):
    items = [(10, str(tmp_path / "missing.jpg")), (11, str(tmp_path / "also-missing.png"))]
    (batch,) = list(embed_images(encoder, items, batch_size=8))
    assert batch.ids.shape == (0,)
    assert batch.vectors.shape == (0, encoder.embed_dim)
    assert batch.rejected == [(10, "file not found"), (11, "file not found")]


def test_no_items_yield_no_batches(encoder):
    assert list(embed_images(encoder, [], num_workers=0)) == []


def test_a_custom_reader_is_used_and_other_read_errors_are_raised(encoder):
    good = encode(noise(seed=5), "PNG")
    reader = MemoryReader({"mem://a": good, "mem://b": b""})
    items = [(1, "mem://a"), (2, "mem://b"), (3, "mem://gone")]
    (batch,) = list(embed_images(encoder, items, read=reader))
    assert batch.ids.tolist() == [1]
    assert batch.rejected == [(2, "empty file"), (3, "file not found")]
    np.testing.assert_allclose(batch.vectors[0], direct_vector(encoder, good), atol=1e-5)

    def no_permission(path: str) -> bytes:
        raise PermissionError(path)

    with pytest.raises(PermissionError):
        list(embed_images(encoder, items, read=no_permission))


def test_an_item_lost_on_the_way_is_an_error_not_a_shorter_table(encoder, mixed, monkeypatch):
    items, _, _ = mixed
    original = ImageBatches.__getitem__

    def lossy(self, index):
        batch = original(self, index)
        return DecodedBatch(batch.ids, batch.pixels, batch.rejected[:-1])

    monkeypatch.setattr(ImageBatches, "__getitem__", lossy)
    with pytest.raises(RuntimeError, match="8 items in, 6 out"):
        list(embed_images(encoder, items, batch_size=4))


def test_image_batches_is_a_dataset_of_batches(encoder, mixed):
    items, _, _ = mixed
    batches = ImageBatches(items, encoder.preprocess, batch_size=3)
    assert len(batches) == 3
    last = batches[2]
    assert last.ids == [8] and last.rejected == [(7, "image too small (1 x 1)")]
    assert last.pixels.shape == (1, 3, encoder.image_size, encoder.image_size)
    with pytest.raises(IndexError):
        batches[3]
    with pytest.raises(ValueError, match="batch_size"):
        ImageBatches(items, encoder.preprocess, batch_size=0)


def test_progress_is_logged_with_rate_and_eta(encoder, mixed, caplog):
    items, _, _ = mixed
    log = logging.getLogger("test.embed")
    with caplog.at_level(logging.INFO, logger="test.embed"):
        list(embed_images(encoder, items, batch_size=4, log=log, progress_every=1))
    messages = [r.getMessage() for r in caplog.records if r.name == "test.embed"]
    assert len(messages) == 3  # after each of the 2 batches, then the summary
    assert messages[0].startswith("embedded 4/8 images (2 rejected)")
    assert messages[-1].startswith("embedded 8/8 images (5 rejected)")
    assert all("images/s" in m and "ETA" in m for m in messages)


def test_two_fork_workers_give_the_same_vectors_as_none(encoder, mixed):
    items, _, _ = mixed
    inline = list(embed_images(encoder, items, batch_size=2, num_workers=0))
    workers = list(embed_images(encoder, items, batch_size=2, num_workers=2))
    assert [b.ids.tolist() for b in workers] == [b.ids.tolist() for b in inline]
    assert [b.rejected for b in workers] == [b.rejected for b in inline]
    np.testing.assert_array_equal(
        np.concatenate([b.vectors for b in workers]), np.concatenate([b.vectors for b in inline])
    )


@pytest.mark.slow
def test_spawned_workers_with_a_custom_reader_give_the_same_vectors(encoder):
    """Spawn pickles the dataset (ids, paths, preprocess, reader) into fresh interpreters."""
    blobs = {f"mem://{i}": encode(noise(seed=i), "JPEG") for i in range(5)}
    blobs["mem://5"] = b"junk"
    items = [(i, f"mem://{i}") for i in range(6)]
    reader = MemoryReader(blobs)
    inline = list(embed_images(encoder, items, batch_size=2, read=reader))
    spawned = list(
        embed_images(
            encoder,
            items,
            batch_size=2,
            num_workers=2,
            read=reader,
            multiprocessing_context="spawn",
        )
    )
    assert [b.rejected for b in spawned] == [
        [],
        [],
        [(5, "not a decodable image (unknown format)")],
    ]
    np.testing.assert_array_equal(
        np.concatenate([b.vectors for b in spawned]), np.concatenate([b.vectors for b in inline])
    )


# -- texts -------------------------------------------------------------------------------------


class CountingEncoder:
    """Wraps an encoder and counts the rows its text tower is asked to encode."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.rows = 0

    def encode_token_tensors(self, tokens: torch.Tensor) -> torch.Tensor:
        self.rows += len(tokens)
        return self.inner.encode_token_tensors(tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def text_vector(encoder, text: str) -> np.ndarray:
    return encoder.encode_token_tensors(encoder.tokenizer([text]))[0].numpy()


def test_texts_are_deduplicated_and_mapped_back(encoder):
    spy = CountingEncoder(encoder)
    texts = ["a cat", "a dog", "a cat", None, "", "a dog", "a cat"]
    result = embed_texts(spy, texts, batch_size=2)
    assert result.n_distinct == 3
    assert spy.rows == 3
    assert result.vectors.shape == (7, encoder.embed_dim) and result.vectors.dtype == np.float32
    for position, text in enumerate(texts):
        np.testing.assert_allclose(
            result.vectors[position], text_vector(encoder, text or ""), atol=1e-5
        )
    assert not np.allclose(result.vectors[0], result.vectors[1])


def test_none_and_empty_embed_as_the_empty_string(encoder):
    result = embed_texts(encoder, [None, "", None])
    assert result.n_distinct == 1
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.vectors[0], result.vectors[1])


def test_no_texts_is_an_empty_result(encoder):
    result = embed_texts(encoder, [])
    assert result.vectors.shape == (0, encoder.embed_dim)
    assert (result.n_distinct, result.n_truncated) == (0, 0)


def test_non_latin_texts_embed_to_distinct_unit_vectors(encoder):
    texts = ["星空の城", "قلعة تحت النجوم", "🏰✨🌌", "замок под звёздами", ""]
    result = embed_texts(encoder, texts)
    assert np.isfinite(result.vectors).all()
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    similarity = result.vectors @ result.vectors.T
    assert (similarity[~np.eye(len(texts), dtype=bool)] < 0.99999).all()


def test_truncation_counts_exactly_the_texts_over_the_context(encoder):
    assert len(encoder.tokenizer.encode("word " * 75)) == 75  # one token per word
    fits = "word " * 75  # 75 + start + end = 77 = context_length: not truncated
    long = "word " * 76  # 78 tokens
    longer = "a much longer prompt " * 40
    texts = [fits, long, "short", longer, long, None]
    result = embed_texts(encoder, texts)
    assert result.truncated.tolist() == [False, True, False, True, True, False]
    assert result.n_truncated == 3  # per input position: the repeated long prompt counts twice
    assert result.n_distinct == 5
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)


def test_tokens_match_open_clip_exactly_long_and_non_latin_included(encoder):
    texts = ["word " * 76, "", "星空の城 🏰", "A  Cat,   on the MAT!", "x " * 200]
    tokens, truncated = tokenize_counting_truncation(
        encoder.tokenizer, texts, encoder.context_length
    )
    assert torch.equal(tokens, encoder.tokenizer(texts))
    assert truncated.tolist() == [True, False, False, False, True]


# -- Arrow storage -----------------------------------------------------------------------------


def unit_vectors(n: int = 5, d: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_arrow_round_trip_is_exact_and_zero_copy():
    vectors = unit_vectors()
    array = to_arrow_vectors(vectors)
    assert array.type == pa.list_(pa.float32(), 64)
    assert len(array) == 5
    back = from_arrow_vectors(array)
    assert back.dtype == np.float32 and back.shape == (5, 64)
    np.testing.assert_array_equal(back, vectors)
    assert np.shares_memory(back, vectors)  # numpy → arrow → numpy without a copy


def test_arrow_slices_chunks_and_float64_are_handled():
    vectors = unit_vectors(6)
    np.testing.assert_array_equal(
        from_arrow_vectors(to_arrow_vectors(vectors).slice(2, 3)), vectors[2:5]
    )
    chunked = pa.chunked_array([to_arrow_vectors(vectors[:2]), to_arrow_vectors(vectors[2:])])
    np.testing.assert_array_equal(from_arrow_vectors(chunked), vectors)
    as_float64 = to_arrow_vectors(vectors.astype(np.float64))
    assert as_float64.type == pa.list_(pa.float32(), 64)
    empty = from_arrow_vectors(to_arrow_vectors(np.empty((0, 8), dtype=np.float32)))
    assert empty.shape == (0, 8)


def test_arrow_refuses_bad_shapes_types_and_nulls():
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        to_arrow_vectors(np.zeros(8, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        to_arrow_vectors(np.zeros((3, 0), dtype=np.float32))
    with pytest.raises(TypeError, match="fixed_size_list"):
        from_arrow_vectors(pa.array([[1.0, 2.0], [3.0]]))
    with_null = pa.array([[1.0, 2.0], None], type=pa.list_(pa.float32(), 2))
    with pytest.raises(ValueError, match="null vector"):
        from_arrow_vectors(with_null)
    null_component = pa.array([[1.0, None]], type=pa.list_(pa.float32(), 2))
    with pytest.raises(ValueError, match="null component"):
        from_arrow_vectors(null_component)


def test_parquet_column_round_trips_and_duckdb_reads_it_as_float_d(tmp_path):
    vectors = unit_vectors(4, 16)
    path = tmp_path / "vectors.parquet"
    stored = pa.table(
        {"imageId": pa.array([1, 2, 3, 4], pa.int64()), "vector": to_arrow_vectors(vectors)}
    )
    pq.write_table(stored, path)
    assert pq.read_schema(path).field("vector").type == pa.list_(pa.float32(), 16)
    back = from_arrow_vectors(pq.read_table(path).column("vector"))
    np.testing.assert_array_equal(back, vectors)
    con = duckdb.connect()
    # DuckDB's Parquet reader sees a plain list; the cast the stage's SQL uses makes it FLOAT[16]
    kind, first = con.execute(
        f"SELECT typeof(vector::FLOAT[16]), vector::FLOAT[16] FROM '{path}' WHERE imageId = 1"
    ).fetchone()
    assert kind == "FLOAT[16]"
    np.testing.assert_array_equal(np.asarray(first, dtype=np.float32), vectors[0])
    in_memory = con.execute("SELECT DISTINCT typeof(vector) FROM stored").fetchall()
    assert in_memory == [("FLOAT[16]",)]


# -- throughput --------------------------------------------------------------------------------


def test_throughput_compares_the_asset_path_with_the_bare_model(encoder, tmp_path):
    items = []
    for i in range(6):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(encode(noise(seed=i), "JPEG"))
        items.append((i, str(path)))
    items.append((99, str(tmp_path / "missing.jpg")))
    threads = torch.get_num_threads()
    report = embedding_throughput(encoder, items, batch_size=4, num_workers=0, torch_threads=1)
    assert report["torch_threads"] == 1
    assert torch.get_num_threads() == threads  # restored
    assert (report["embedded"], report["rejected"], report["items"]) == (6, 1, 7)
    assert report["asset_images_per_s"] > 0 and report["bare_images_per_s"] > 0
    assert report["asset_images_per_s"] == pytest.approx(6 / report["asset_seconds"])
    assert report["ratio"] == pytest.approx(
        report["asset_images_per_s"] / report["bare_images_per_s"]
    )


def test_bare_loop_needs_images_and_reports_a_rate(encoder):
    with pytest.raises(ValueError, match="at least one"):
        bare_image_loop(encoder, torch.empty(0, 3, 64, 64), 8)
    started = time.perf_counter()
    rate = bare_image_loop(encoder, torch.randn(16, 3, 64, 64), 8)
    assert rate > 0
    assert 16 / rate <= time.perf_counter() - started  # the rate is of the timed loop itself
