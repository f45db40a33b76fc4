"""Batched CLIP inference of the embeddings stage: images and prompts in, unit vectors out.

* **Decoding policy** (:func:`decode_image`). Media files come from the crawl, so any byte
  string may arrive. An image either becomes an RGB picture or is rejected with a short,
  stable reason (:class:`ImageRejected`) that the stage writes to its quarantine rows: empty
  files, undecodable bytes, truncated files (PIL is never allowed to half-decode), images too
  large to decode safely (checked from the header, before a single pixel is allocated) and
  images too small to mean anything. Modes that are not RGB are converted the way a viewer
  would show them: CMYK and 16-bit scaled properly, transparency composited onto white, the
  first frame of an animation, EXIF orientation applied.
* **Batches** (:class:`ImageBatches`). A map-style dataset whose element *i* is batch *i*:
  decoded and preprocessed in DataLoader worker processes, so decoding overlaps inference. A
  bad image never kills its batch: it leaves the batch as a (imageId, reason) rejection. The
  dataset holds only picklable things (ids, paths, the encoder's preprocess transform, a
  module-level or otherwise picklable reader), so it works under ``spawn`` as well as ``fork``.
* **Inference** (:func:`embed_images`, :func:`embed_texts`). Under the encoder's own
  inference mode and autocast; every input ends as a vector or a rejection (checked, never
  assumed). Prompts are deduplicated before encoding and the ones longer than the context
  (which open_clip silently truncates) are counted.
* **Storage** (:func:`to_arrow_vectors`, :func:`from_arrow_vectors`): vectors are stored in
  Parquet as ``fixed_size_list<float32>[d]``, converted without copies where the layout
  allows. Parquet itself has no fixed-size list: pyarrow restores the type from the Arrow
  schema it stores alongside, but DuckDB's Parquet reader (2.0) sees ``FLOAT[]``, so SQL that
  needs the array functions casts: ``vector::FLOAT[d]`` (an Arrow table scanned in memory is
  ``FLOAT[d]`` already).
* **Throughput** (:func:`bare_image_loop`, :func:`embedding_throughput`): the asset path
  measured against the model alone over pre-decoded tensors.

No Dagster imports; the embeddings assets call these functions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ml.encoders import Encoder

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 8
DEFAULT_PROGRESS_EVERY = 50  # batches between progress log lines
WHITE = (255, 255, 255)

Reader = Callable[[str], bytes]


# -- decoding policy ---------------------------------------------------------------------------


class ImageRejected(ValueError):
    """An image the stage cannot embed; ``reason`` is the short, stable text of its quarantine
    row (the same file always gets the same reason, so reasons can be counted and grouped)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> Image.Image:
    """The RGB picture in ``data``, or :class:`ImageRejected` with one of these reasons:

    ``empty file``; ``not a decodable image (<detail>)``; ``truncated image``;
    ``image too large (W x H)`` (more than ``max_pixels``, or over PIL's decompression-bomb
    limit); ``image too small (W x H)`` (a side under ``min_side``).

    Sizes are checked from the header that ``Image.open`` parses, before ``load()`` decodes any
    pixel, so a 20,000 x 20,000 file costs a few bytes of parsing, not 1.2 GB of memory.
    ``load()`` is forced here (not left to the first lazy access) and truncated files raise:
    PIL would otherwise fill the missing part with grey and the vector would embed half a
    picture without anyone knowing."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A process-wide switch someone else flipped: obeying it would embed half-decoded
        # images silently, so refuse loudly instead of quarantining everything as 'truncated'.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; the embeddings stage "
            "needs it False so that truncated images are rejected, not half-decoded"
        )
    if not data:
        raise ImageRejected("empty file")
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, Image.MAX_IMAGE_PIXELS)  # PIL's own bomb limit is never exceeded
    try:
        with warnings.catch_warnings():
            # Images over PIL's warning threshold are over `limit` too and rejected just below;
            # the warning would only repeat that in the log. (catch_warnings is process-wide
            # state: fine in DataLoader workers and in the stage's single-threaded loop.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"image too large ({_header_size_text(data, exc)})") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("not a decodable image (unknown format)") from exc
    except MemoryError:
        raise
    except Exception as exc:  # PIL plugins raise OSError, ValueError, struct.error, …
        raise _rejection(exc, None) from exc
    width, height = image.size
    if width * height > limit:
        raise ImageRejected(f"image too large ({width} x {height})")
    if width < min_side or height < min_side:
        raise ImageRejected(f"image too small ({width} x {height})")
    try:
        image.load()
        _apply_exif_orientation(image)
        return to_rgb(image)
    except Image.DecompressionBombError as exc:  # a frame or tile bigger than the header said
        raise ImageRejected(f"image too large ({width} x {height})") from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise _rejection(exc, image.format) from exc


def _apply_exif_orientation(image: Image.Image) -> None:
    """Rotate/flip ``image`` in place as its EXIF Orientation says (phones store pictures
    sideways and set the tag). Unreadable EXIF leaves the picture as stored: the pixels are
    fine, and rejecting a good image over broken metadata would lose it for nothing."""
    # Malformed EXIF blocks raise anything from struct.error to KeyError.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, as a viewer would show it.

    Transparency (alpha channels, palette or colour-key ``transparency``) is composited onto
    white: converting straight to RGB would keep whatever colour hides under alpha 0, usually
    black, and a logo on a transparent background would embed as a logo on black. 16-bit and
    32-bit integer images are scaled to 0..255 (PIL's own conversion clips them, turning most
    16-bit pictures white); float images are read as 0..1 when they fit, else clipped."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(image)
    palette_alpha = mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
    if mode in _ALPHA_MODES or palette_alpha or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, …


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0
    elif image.mode.startswith("I;16") or top > 255:
        scale = 255.0 / 65535.0
    else:  # an "I" image whose values fit 8 bits (an 8-bit source stored as 32-bit)
        scale = 1.0
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


_TRUNCATED = re.compile(r"truncated", re.IGNORECASE)
_UNSTABLE = re.compile(r"<[^>]*\bat 0x[0-9a-f]+>|\(\d+ bytes not processed\)")


def _rejection(exc: Exception, image_format: str | None) -> ImageRejected:
    """The stable reason of a decoding failure: 'truncated image', or the error's message with
    object addresses and byte counts removed (they would make every row's reason unique)."""
    if isinstance(exc, EOFError) or _TRUNCATED.search(str(exc)):
        return ImageRejected("truncated image")
    detail = _UNSTABLE.sub("", str(exc)).strip() or type(exc).__name__
    prefix = f"{image_format}: " if image_format else ""
    return ImageRejected(f"not a decodable image ({prefix}{detail[:80]})")


def _header_size_text(data: bytes, exc: Exception) -> str:
    """'W x H' of an image PIL refused to open as a decompression bomb.

    PIL's error states only the pixel count, and opening again would raise again, so the
    header is parsed by the format's own plugin class (what ``Image.open`` does, minus the bomb
    check; still no pixel is decoded). Falls back to the pixel count from the message."""
    Image.init()
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        try:
            accepted = accept(data[:16]) if accept is not None else True
            if isinstance(accepted, str) or not accepted:
                continue
            header = factory(io.BytesIO(data), "")
            width, height = header.size
            return f"{width} x {height}"
        except Exception:  # not this format; try the next one
            continue
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{found.group(1)} pixels" if found else "over the decompression-bomb limit"


# -- reading and batching ----------------------------------------------------------------------


def read_local_file(path: str) -> bytes:
    """The default reader: a local file's bytes. Module-level, so it pickles by reference into
    spawned workers. Another reader (``fsspec_fs.cat_file``, any picklable callable) may replace
    it; it should raise FileNotFoundError for a missing object."""
    with open(path, "rb") as f:
        return f.read()


@dataclass
class DecodedBatch:
    """One batch out of the workers: the images that decoded (ids and pixels, same order as
    the input) and the ones that did not, with their reasons."""

    ids: list[int]
    pixels: torch.Tensor  # [len(ids), 3, H, W] float32; [0] when nothing decoded
    rejected: list[tuple[int, str]] = field(default_factory=list)

    def pin_memory(self) -> DecodedBatch:
        """Called by the DataLoader's pinning thread (CUDA only) so the host→device copy can be
        asynchronous."""
        return DecodedBatch(self.ids, self.pixels.pin_memory(), self.rejected)


class ImageBatches(torch.utils.data.Dataset):
    """Element *i* = the decoded, preprocessed images of ``items[i*batch_size : (i+1)*batch_size]``.

    A batch (not an image) per element so that each worker decodes, stacks and ships one tensor
    per batch, and so that a batch can come out shorter than ``batch_size`` when some of its
    images are rejected, which per-image collation cannot express without dropping anything.

    Only picklable state: ids and paths as plain arrays, the preprocess transform, the reader.
    A missing file is a rejection ('file not found'); any other read error (network, permission)
    is raised, because quarantining a whole run over a transient outage would be wrong."""

    def __init__(
        self,
        items: Sequence[tuple[int, str]],
        preprocess: Callable[[Image.Image], torch.Tensor],
        batch_size: int = 64,
        read: Reader | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.ids = np.fromiter((int(i) for i, _ in items), dtype=np.int64, count=len(items))
        self.paths = [str(p) for _, p in items]
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.read = read or read_local_file
        self.max_pixels = max_pixels
        self.min_side = min_side

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, index: int) -> DecodedBatch:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range ({len(self)} batches)")
        start = index * self.batch_size
        ids: list[int] = []
        tensors: list[torch.Tensor] = []
        rejected: list[tuple[int, str]] = []
        for image_id, path in zip(
            self.ids[start : start + self.batch_size].tolist(),
            self.paths[start : start + self.batch_size],
            strict=True,
        ):
            try:
                tensors.append(self.load(path))
                ids.append(image_id)
            except ImageRejected as rejection:
                rejected.append((image_id, rejection.reason))
        pixels = torch.stack(tensors) if tensors else torch.empty(0)
        return DecodedBatch(ids, pixels, rejected)

    def load(self, path: str) -> torch.Tensor:
        """One image's preprocessed tensor; ImageRejected when it cannot be embedded."""
        try:
            data = self.read(path)
        except FileNotFoundError as exc:
            raise ImageRejected("file not found") from exc
        image = decode_image(data, self.max_pixels, self.min_side)
        return self.preprocess(image)

    def loader(
        self,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
    ) -> torch.utils.data.DataLoader:
        """A DataLoader over the batches, in input order. ``batch_size=None``: the dataset
        already batches. Workers run one torch thread each (DataLoader's default)."""
        return torch.utils.data.DataLoader(
            self,
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
            persistent_workers=False,
        )


# -- image inference ---------------------------------------------------------------------------


@dataclass
class EmbeddedBatch:
    """Vectors of the images of one batch that decoded, and the rejections of the others."""

    ids: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, d], unit L2 norm
    rejected: list[tuple[int, str]]


def embed_images(
    encoder: Encoder,
    items: Sequence[tuple[int, str]],
    batch_size: int = 64,
    num_workers: int = 0,
    read: Reader | None = None,
    log: logging.Logger | None = None,
    progress_every: int = DEFAULT_PROGRESS_EVERY,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    prefetch_factor: int | None = None,
    multiprocessing_context: str | None = None,
) -> Iterator[EmbeddedBatch]:
    """Embed ``(imageId, path)`` items batch by batch, in input order.

    Every item comes out exactly once, as a vector or a rejection; the count is checked at the
    end and a mismatch is an error, not a shorter table. Inference runs under
    ``torch.inference_mode()`` and the encoder's autocast (fp16/bf16 on CUDA, fp32 on CPU);
    host memory is pinned only on CUDA, where it lets the copy to the device overlap.
    A progress line (count, rate, ETA) goes to ``log`` every ``progress_every`` batches."""
    batches = ImageBatches(items, encoder.preprocess, batch_size, read, max_pixels, min_side)
    loader = batches.loader(
        num_workers=num_workers,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=prefetch_factor,
        multiprocessing_context=multiprocessing_context,
    )
    total = len(items)
    done = n_rejected = 0
    started = time.perf_counter()
    for number, batch in enumerate(loader, start=1):
        if batch.ids:  # encode_image_tensors runs under inference_mode and the autocast
            vectors = encoder.encode_image_tensors(batch.pixels).numpy()
        else:
            vectors = np.empty((0, encoder.embed_dim), dtype=np.float32)
        done += len(batch.ids) + len(batch.rejected)
        n_rejected += len(batch.rejected)
        yield EmbeddedBatch(np.asarray(batch.ids, dtype=np.int64), vectors, batch.rejected)
        if log is not None and progress_every > 0 and number % progress_every == 0:
            _log_progress(log, done, total, n_rejected, time.perf_counter() - started)
    if done != total:
        raise RuntimeError(f"embed_images: {total} items in, {done} out (vectors + rejections)")
    if log is not None:
        _log_progress(log, done, total, n_rejected, time.perf_counter() - started)


def _log_progress(
    log: logging.Logger, done: int, total: int, n_rejected: int, elapsed: float
) -> None:
    rate = done / elapsed if elapsed > 0 else float("inf")
    eta = (total - done) / rate if rate > 0 else float("inf")
    log.info(
        "embedded %d/%d images (%d rejected), %.1f images/s, ETA %.0f s",
        done,
        total,
        n_rejected,
        rate,
        eta,
    )


# -- text inference ----------------------------------------------------------------------------


@dataclass
class TextEmbedding:
    """Vectors aligned with the input texts, and what the stage reports about them."""

    vectors: np.ndarray  # float32 [n, d], row i = input text i
    n_distinct: int  # texts actually encoded
    truncated: np.ndarray  # bool [n]: input text i was longer than the context
    n_truncated: int  # truncated.sum(): input positions, duplicates counted each time


def embed_texts(
    encoder: Encoder,
    texts: Sequence[str | None],
    batch_size: int = 256,
    log: logging.Logger | None = None,
) -> TextEmbedding:
    """Embed prompts; None and '' are embedded as the empty string (a row, never a crash).

    Prompts repeat a lot (remixes, the same prompt over a seed sweep), so each distinct text is
    tokenised and encoded once and the vector copied to every position that holds it. open_clip
    silently cuts a text to ``context_length`` tokens (start and end tokens included); those
    texts are flagged so the stage can report how much of the prompts the model never saw."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    index: dict[str, int] = {}
    positions = np.fromiter(
        (index.setdefault(text or "", len(index)) for text in texts),
        dtype=np.int64,
        count=len(texts),
    )
    distinct = list(index)
    distinct_vectors = np.empty((len(distinct), encoder.embed_dim), dtype=np.float32)
    distinct_truncated = np.zeros(len(distinct), dtype=bool)
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start : start + batch_size]
        tokens, cut = tokenize_counting_truncation(encoder.tokenizer, chunk, encoder.context_length)
        vectors = encoder.encode_token_tensors(tokens)  # inference_mode + autocast inside
        distinct_vectors[start : start + len(chunk)] = vectors.numpy()
        distinct_truncated[start : start + len(chunk)] = cut
    truncated = distinct_truncated[positions]
    if log is not None:
        log.info(
            "embedded %d texts (%d distinct, %d longer than %d tokens and truncated)",
            len(texts),
            len(distinct),
            int(truncated.sum()),
            encoder.context_length,
        )
    return TextEmbedding(
        vectors=distinct_vectors[positions],
        n_distinct=len(distinct),
        truncated=truncated,
        n_truncated=int(truncated.sum()),
    )


def tokenize_counting_truncation(
    tokenizer: Any, texts: list[str], context_length: int
) -> tuple[torch.Tensor, np.ndarray]:
    """(tokens [n, context_length], bool [n]: the text did not fit).

    open_clip's SimpleTokenizer (every open_clip config without an HF tokenizer, ViT-H-14
    included) BPE-encodes each text and then truncates; its ``encode`` is used to count, and
    the tensor is built exactly as its ``__call__`` builds it (start + BPE + end, cut to the
    context with the end token kept last), so each text is BPE-encoded once, not twice.
    Other tokenizers are called as they are and counted by tokenising again with room to spare."""
    simple = (
        callable(getattr(tokenizer, "encode", None))
        and getattr(tokenizer, "reduction_fn", None) is None
        and hasattr(tokenizer, "sot_token_id")
        and hasattr(tokenizer, "eot_token_id")
    )
    if simple:
        sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
        tokens = torch.zeros(len(texts), context_length, dtype=torch.long)
        truncated = np.zeros(len(texts), dtype=bool)
        for row, text in enumerate(texts):
            ids = [sot, *tokenizer.encode(text), eot]
            if len(ids) > context_length:
                truncated[row] = True
                ids = ids[:context_length]
                ids[-1] = eot
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens, truncated
    tokens = tokenizer(texts, context_length=context_length)
    roomy = tokenizer(texts, context_length=context_length * 4)
    truncated = (roomy[:, context_length:] != 0).any(dim=1).numpy()
    return tokens, truncated


# -- storage -----------------------------------------------------------------------------------


def to_arrow_vectors(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """``fixed_size_list<float32>[d]`` of an (n, d) array; no copy when it is already float32
    and C-contiguous (Arrow wraps the NumPy buffer). Read back from Parquet by DuckDB, the
    column is ``FLOAT[]``: cast with ``vector::FLOAT[d]`` (see the module docstring)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] < 1:
        raise ValueError(f"vectors must be (n, d) with d >= 1, got shape {vectors.shape}")
    flat = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), vectors.shape[1])


def from_arrow_vectors(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The (n, d) float32 array of a ``fixed_size_list<float32>[d]`` column (as read from
    Parquet or DuckDB). Zero-copy for a single chunk of float32 without nulls (the result is
    then read-only: it is Arrow's buffer); several chunks or another float width are copied.
    A null vector or a null component is an error, never a silently zero-filled row."""
    if isinstance(array, pa.ChunkedArray):
        if array.num_chunks == 1:
            array = array.chunk(0)
        elif array.num_chunks == 0:
            array = pa.array([], type=array.type)
        else:
            array = pa.concat_arrays(array.chunks)
    if not pa.types.is_fixed_size_list(array.type):
        raise TypeError(f"vectors must be a fixed_size_list column, got {array.type}")
    width = array.type.list_size
    if not pa.types.is_floating(array.type.value_type):
        raise TypeError(f"vectors must hold floats, got {array.type.value_type}")
    if array.null_count:
        raise ValueError(f"vector column has {array.null_count} null vector(s)")
    values = array.flatten()  # honours the array's offset (a slice), unlike .values
    if values.null_count:
        raise ValueError(f"vector column has {values.null_count} null component(s)")
    flat = values.to_numpy(zero_copy_only=False)
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    return flat.reshape(len(array), width)


# -- throughput --------------------------------------------------------------------------------


def bare_image_loop(encoder: Encoder, pixels: torch.Tensor, batch_size: int) -> float:
    """Images/s of the model alone over pre-decoded, preprocessed tensors: the ceiling the
    asset path is compared with (decoding, reading and batching excluded). One untimed batch
    warms the model first, as :func:`embedding_throughput` does before the asset path."""
    if len(pixels) == 0:
        raise ValueError("bare_image_loop needs at least one image")
    encoder.encode_image_tensors(pixels[:batch_size])
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        encoder.encode_image_tensors(pixels[start : start + batch_size]).numpy()
    return len(pixels) / (time.perf_counter() - started)


def embedding_throughput(
    encoder: Encoder,
    items: Sequence[tuple[int, str]],
    batch_size: int = 64,
    num_workers: int = 0,
    read: Reader | None = None,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Images/s of :func:`embed_images` (reading, decoding, workers' start-up included) and of
    :func:`bare_image_loop` over the same images decoded beforehand, and their ratio (the
    asset path's share of the bare model's rate; both count embedded images only).

    ``torch_threads`` sets torch's intra-op threads for the measurement (restored after): on a
    small shared machine, OpenMP threads that wait for each other on busy cores can make the
    bare loop slower with 2 threads than with 1, and DataLoader workers compete for the same
    cores as those threads."""
    if torch_threads is None:
        return _throughput(encoder, items, batch_size, num_workers, read)
    previous = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        return _throughput(encoder, items, batch_size, num_workers, read)
    finally:
        torch.set_num_threads(previous)


def _throughput(
    encoder: Encoder,
    items: Sequence[tuple[int, str]],
    batch_size: int,
    num_workers: int,
    read: Reader | None,
) -> dict[str, Any]:
    reader = read or read_local_file
    tensors = []
    for _, path in items:
        try:
            tensors.append(encoder.preprocess(decode_image(reader(path))))
        except (ImageRejected, FileNotFoundError):
            continue
    if not tensors:
        raise ValueError("embedding_throughput: none of the items decodes")
    pixels = torch.stack(tensors)
    encoder.encode_image_tensors(pixels[:batch_size])  # warm-up, untimed
    started = time.perf_counter()
    embedded = rejected = 0
    for batch in embed_images(encoder, items, batch_size, num_workers, read):
        embedded += len(batch.ids)
        rejected += len(batch.rejected)
    asset_seconds = time.perf_counter() - started
    asset_rate = embedded / asset_seconds  # rejections are not counted as work done
    bare_rate = bare_image_loop(encoder, pixels, batch_size)
    return {
        "encoder": encoder.tag,
        "device": str(encoder.device),
        "torch_threads": torch.get_num_threads(),
        "items": len(items),
        "embedded": embedded,
        "rejected": rejected,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "asset_seconds": asset_seconds,
        "asset_images_per_s": asset_rate,
        "bare_images_per_s": bare_rate,
        "ratio": asset_rate / bare_rate,
    }
