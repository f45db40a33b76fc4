"""Deterministic generator of ImageGem-shaped data with planted ground truth.

`generate_sample(out, spec)` writes the two release tables in exactly the published format
(`warehouse.schema.IMAGES` / `MODELS`, canonical Arrow schemas) plus a `truth/` folder that
only evaluation code reads, then `manifest.json` last:

    out/images/part-00000.parquet ...   release `images` rows (image x LoRA), image-aligned shards
    out/models/part-00000.parquet ...   release `models` rows (version x file)
    out/truth/styles.parquet            style vocabularies, trigger words, palettes
    out/truth/user_tastes.parquet       userHash, taste (list over styles), top style, activity
    out/truth/lora_styles.parquet       modelVersionId, style mix, main style, popularity, unsafe
    out/truth/image_truth.parquet       one row per images row: ids, style, quality, defects
    out/truth/model_truth.parquet       one row per models row: ids, unsafe / malformed kind
    out/truth/raw_usernames.parquet     the rows whose userHash holds a raw username
    out/media/images/<imageId>.jpeg     with_media: thumbnails carrying style and quality
    out/media/loras/<fileName>          with_media: the versions' primary LoRA files
    out/truth/image_media.parquet       with_media: per image: style, quality, has_media, ...
    out/truth/lora_media.parquet        with_media: per version: file, sha256, planted style
    out/truth/lora_directions.parquet   with_media: per style x module: planted direction
    out/manifest.json                   spec, generator version, counts, file list, media

The same spec (seed included) gives byte-identical files. Image rows are built and written one
shard (~500k rows at full scale) at a time; `image_truth` is streamed row group by row group,
so memory stays bounded at full ImageGem scale. Media (`pipelines.sample.media`) is meant for
small samples (on by default, off in `SampleSpec.full()`): images of a bounded set of whole
users (`media_images`) and the primary files of up to `media_loras` LoRA versions (all of the
default sample's), whose real hashes and sizes replace the synthetic ones in the release
`models` rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.sample import media, tables
from pipelines.sample.world import (
    IMAGE_UNSAFE_KINDS,
    MODEL_UNSAFE_KINDS,
    NONE,
    PUBLISHED_IMAGE_ROWS,
    PUBLISHED_MODEL_ROWS,
    PUBLISHED_USERS,
    World,
    WorldSizes,
    derive_sizes,
    plan_world,
)
from warehouse.files import atomic_local_path, atomic_write_bytes
from warehouse.paper import PAPER_RATIOS

GENERATOR_NAME = "imagegem-sample"
GENERATOR_VERSION = "1.4.0"
MANIFEST_NAME = "manifest.json"
MAX_IMAGE_ROWS_PER_SHARD = 500_000
MAX_MODEL_ROWS_PER_SHARD = 250_000
PARQUET_COMPRESSION = "zstd"

TRUTH_TABLES: tuple[str, ...] = (
    "styles",
    "user_tastes",
    "lora_styles",
    "image_truth",
    "model_truth",
    "raw_usernames",
)
MEDIA_TRUTH_TABLES: tuple[str, ...] = ("image_media", "lora_media", "lora_directions")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SampleSpec:
    """What to generate. Sizes default to the published ImageGem ratios per user.

    `loras` is the number of `models` rows (version files, defects included) and `images` the
    number of raw `images` rows (before the safety filter, defects included). With
    `with_media`, image files are rendered for whole users while their images fit in
    `media_images`, and the primary files of up to `media_loras` LoRA versions are written
    (all of them in the default sample; see `pipelines.sample.media`).
    """

    users: int = 500
    loras: int | None = None
    images: int | None = None
    seed: int = 0
    unsafe_share: float = PAPER_RATIOS["safety_removed_share"]
    malformed_share: float = 0.02
    with_truth: bool = True
    with_media: bool = True
    media_images: int = media.DEFAULT_MEDIA_IMAGES
    media_loras: int = media.DEFAULT_MEDIA_LORAS

    def __post_init__(self) -> None:
        _require_int("users", self.users, minimum=1)
        _require_int("seed", self.seed, minimum=0)
        if self.loras is not None:
            _require_int("loras", self.loras, minimum=1)
        if self.images is not None:
            _require_int("images", self.images, minimum=1)
        for name in ("unsafe_share", "malformed_share"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (0.0 <= value < 0.5)
            ):
                raise ValueError(f"SampleSpec.{name} must be a number in [0, 0.5), got {value!r}")
        if not isinstance(self.with_truth, bool):
            raise ValueError(f"SampleSpec.with_truth must be a bool, got {self.with_truth!r}")
        if not isinstance(self.with_media, bool):
            raise ValueError(f"SampleSpec.with_media must be a bool, got {self.with_media!r}")
        _require_int("media_images", self.media_images, minimum=0)
        _require_int("media_loras", self.media_loras, minimum=0)
        self.sizes()  # raises ValueError when the totals cannot hold the planted world

    @classmethod
    def full(cls, seed: int = 0) -> SampleSpec:
        """Full ImageGem scale: 57,245 users, 242,889 model rows, 5,658,107 image rows.

        Truth is kept: its big table (`image_truth`) is streamed shard by shard. Metadata
        only: no media files.
        """
        return cls(
            users=PUBLISHED_USERS,
            loras=PUBLISHED_MODEL_ROWS,
            images=PUBLISHED_IMAGE_ROWS,
            seed=seed,
            with_truth=True,
            with_media=False,
        )

    @property
    def model_rows(self) -> int:
        """Rows of the `models` table to write."""
        if self.loras is not None:
            return self.loras
        return max(1, round(self.users * PUBLISHED_MODEL_ROWS / PUBLISHED_USERS))

    @property
    def image_rows(self) -> int:
        """Raw rows of the `images` table to write (before the safety filter)."""
        if self.images is not None:
            return self.images
        return max(1, round(self.users * PUBLISHED_IMAGE_ROWS / PUBLISHED_USERS))

    @property
    def image_rows_per_shard(self) -> int:
        """Target rows per images shard: a quarter of the table, 1k to 500k rows."""
        return min(MAX_IMAGE_ROWS_PER_SHARD, max(1_000, math.ceil(self.image_rows / 4)))

    @property
    def model_rows_per_shard(self) -> int:
        """Target rows per models shard: half of the table, 1k to 250k rows."""
        return min(MAX_MODEL_ROWS_PER_SHARD, max(1_000, math.ceil(self.model_rows / 2)))

    def sizes(self) -> WorldSizes:
        """The exact counts of every planted population."""
        return derive_sizes(
            self.users,
            self.model_rows,
            self.image_rows,
            float(self.unsafe_share),
            float(self.malformed_share),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (as stored in the manifest)."""
        return asdict(self)


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SampleSpec.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SampleSummary:
    """What `generate_sample` wrote."""

    out: Path
    spec: SampleSpec
    image_files: tuple[Path, ...]
    model_files: tuple[Path, ...]
    truth_files: tuple[Path, ...]
    manifest_path: Path
    rows: Mapping[str, int]  # rows per table: images, models, and each truth table
    counts: Mapping[str, Any]  # planted populations (users, uploaders, loras, defects, ...)
    seconds: float = field(compare=False)


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a finished sample under `out`, or None (absent, partial or unreadable)."""
    path = Path(out) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR_NAME:
        return None
    return manifest


def sample_is_current(out: Path, spec: SampleSpec) -> bool:
    """True when `out` holds a complete sample of exactly this spec and generator version."""
    manifest = read_manifest(out)
    if manifest is None:
        return False
    if manifest.get("generator_version") != GENERATOR_VERSION or manifest.get("spec") != (
        spec.to_dict()
    ):
        return False
    files = [f for group in manifest.get("files", {}).values() for f in group]
    if not all((Path(out) / f).is_file() for f in files):
        return False
    for entry in (manifest.get("media") or {}).values():
        names = _media_names(Path(out) / entry["dir"])
        if len(names) != entry["count"] or _names_digest(names) != entry["names_sha256"]:
            return False
    return True


def _media_names(folder: Path) -> list[str]:
    """Sorted names of the finished media files in ``folder`` (temp files excluded)."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name[0] != ".")
    except FileNotFoundError:
        return []


def _names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` atomically (see warehouse.files)."""
    with atomic_local_path(str(path)) as temp:
        pq.write_table(table, temp, compression=PARQUET_COMPRESSION)


class _AtomicParquetStream:
    """A parquet file written row group by row group, published atomically on close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._publish = atomic_local_path(str(path))
        self.temp: str | None = None
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.temp = self._publish.__enter__()
            self.writer = pq.ParquetWriter(self.temp, table.schema, compression=PARQUET_COMPRESSION)
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self._publish.__exit__(None, None, None)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            error = RuntimeError("sample generation aborted")
            self._publish.__exit__(RuntimeError, error, None)


def image_shard_bounds(world: World, rows_per_shard: int) -> list[tuple[int, int]]:
    """Row ranges of the images shards: about equal, never splitting an image's rows."""
    row_image = world.images.row_image
    total = row_image.size
    n_shards = max(1, math.ceil(total / rows_per_shard))
    image_starts = np.flatnonzero(np.r_[True, row_image[1:] != row_image[:-1]])
    cuts = [0]
    for i in range(1, n_shards):
        j = int(np.searchsorted(image_starts, round(i * total / n_shards)))
        if j < image_starts.size and image_starts[j] > cuts[-1]:
            cuts.append(int(image_starts[j]))
    cuts.append(total)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _part_name(folder: str, index: int) -> str:
    return f"{folder}/part-{index:05d}.parquet"


def _stream(seed: int, *tag: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 0xC1A1, *tag]))


def _remove_stale(out: Path, keep: set[str], keep_media: Mapping[str, set[str]]) -> None:
    """Delete files of an earlier sample (shards/truth/media) that this run did not write."""
    for folder, pattern in (
        ("images", "part-*.parquet"),
        ("models", "part-*.parquet"),
        ("truth", "*.parquet"),
    ):
        for path in (out / folder).glob(pattern):
            if path.relative_to(out).as_posix() not in keep:
                path.unlink()
    for folder in (media.IMAGE_DIR, media.LORA_DIR):
        kept = keep_media.get(folder, set())
        for name in _media_names(out / folder):
            if name not in kept:
                (out / folder / name).unlink()


def generate_sample(out: Path, spec: SampleSpec, progress: Progress | None = None) -> SampleSummary:
    """Write the sample described by `spec` under `out` and return what was written.

    Any previous manifest is removed first and the new one is written last (atomically), so
    `read_manifest(out)` only ever sees a complete sample. `progress(stage, done, total)` is
    called as rows are written (stages: "plan", "models", "images", "truth", and with media
    "lora_files", "image_files").
    """
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    report = progress or (lambda stage, done, total: None)
    sizes = spec.sizes()

    report("plan", 0, 1)
    world = plan_world(sizes, spec.seed)
    names = tables.lora_text(world)
    settings = tables.plan_recipe_settings(world, _stream(spec.seed, 2))
    report("plan", 1, 1)

    written: dict[str, list[str]] = {"images": [], "models": [], "truth": []}
    rows: dict[str, int] = {}
    media_ids = lora_mask = None
    if spec.with_media:
        image_mask = media.select_media_images(world, spec.media_images)
        media_ids = np.sort(world.images.image_ids[image_mask])
        lora_mask = media.select_media_loras(world, spec.media_loras, image_mask)
    model_truth, lora_media = _write_models(
        out, spec, world, names, written, rows, report, lora_mask
    )
    raw_usernames, image_media = _write_images(
        out, spec, world, settings, names, written, rows, report, media_ids
    )
    if spec.with_truth:
        assert raw_usernames is not None
        small = {
            "styles": tables.styles_truth(),
            "user_tastes": tables.user_tastes_truth(world),
            "lora_styles": tables.lora_styles_truth(world, names),
            "model_truth": model_truth,
            "raw_usernames": raw_usernames,
        }
        if lora_media is not None and image_media is not None:
            small |= {
                "image_media": image_media,
                "lora_media": lora_media.truth,
                "lora_directions": lora_media.directions,
            }
        for i, (table_name, table) in enumerate(small.items()):
            _write_parquet(table, out / f"truth/{table_name}.parquet")
            rows[table_name] = table.num_rows
            report("truth", i + 1, len(small))
        rows["image_truth"] = rows["images"]
        truth_names = TRUTH_TABLES + (MEDIA_TRUTH_TABLES if spec.with_media else ())
        written["truth"] = [f"truth/{t}.parquet" for t in truth_names]

    counts = planted_counts(world)
    media_section: dict[str, Any] = {}
    keep_media: dict[str, set[str]] = {}
    if lora_media is not None and media_ids is not None:
        media_section, keep_media = _media_manifest(spec, world, media_ids, lora_media)
        counts["media_images"] = media_section["images"]["count"]
        counts["media_loras"] = media_section["loras"]["count"]
    _remove_stale(out, {f for group in written.values() for f in group}, keep_media)
    manifest = {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "spec": spec.to_dict(),
        "rows": rows,
        "counts": counts,
        "files": written,
    }
    if media_section:
        manifest["media"] = media_section
    manifest_path = out / MANIFEST_NAME
    atomic_write_bytes(
        str(manifest_path), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    )
    return SampleSummary(
        out=out,
        spec=spec,
        image_files=tuple(out / f for f in written["images"]),
        model_files=tuple(out / f for f in written["models"]),
        truth_files=tuple(out / f for f in written["truth"]),
        manifest_path=manifest_path,
        rows=rows,
        counts=counts,
        seconds=time.perf_counter() - started,
    )


def _media_manifest(
    spec: SampleSpec, world: World, media_ids: np.ndarray, lora_media: media.LoraMedia
) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """The manifest's ``media`` section and the media file names written, per folder."""
    image_names = sorted(f"{i}{media.IMAGE_EXT}" for i in media_ids.tolist())
    loras = lora_media.truth.filter(lora_media.truth.column("has_media"))
    lora_names = sorted(loras.column("fileName").to_pylist())
    images = world.images
    section = {
        "images": {
            "dir": media.IMAGE_DIR,
            "count": len(image_names),
            "names_sha256": _names_digest(image_names),
            "cap": spec.media_images,
            "selection": "whole users in a seeded order while their images fit in the cap",
            "users": int(np.unique(images.image_user[np.isin(images.image_ids, media_ids)]).size),
            "of_images": int(images.image_ids.size),
        },
        "loras": {
            "dir": media.LORA_DIR,
            "count": len(lora_names),
            "names_sha256": _names_digest(lora_names),
            "cap": spec.media_loras,
            "selection": "all versions when they fit in the cap, else those used by images "
            "with media first, then by popularity",
            "of_versions": int(world.loras.version_ids.size),
            "pickle_files": int(
                pc.sum(pc.not_equal(loras.column("container"), "safetensors")).as_py() or 0
            ),
        },
    }
    return section, {media.IMAGE_DIR: set(image_names), media.LORA_DIR: set(lora_names)}


def _write_models(
    out: Path,
    spec: SampleSpec,
    world: World,
    names: tables.LoraText,
    written: dict[str, list[str]],
    rows: dict[str, int],
    report: Progress,
    lora_mask: np.ndarray | None = None,
) -> tuple[pa.Table, media.LoraMedia | None]:
    """Write the models shards (and, with a ``lora_mask`` of versions, their LoRA files, whose
    real hashes and sizes the primary rows then carry); return model_truth with each row's
    file and position, and what the LoRA writer wrote."""
    models = tables.build_models(world, names, _stream(spec.seed, 1))
    table = models.table
    lora_media = None
    if lora_mask is not None:
        n_files = int(lora_mask.sum())
        report("lora_files", 0, n_files)
        lora_media = media.write_lora_media(out, world, table, spec.seed, lora_mask)
        table = media.patch_model_hashes(table, lora_media)
        report("lora_files", n_files, n_files)
    n_rows = table.num_rows
    per_shard = spec.model_rows_per_shard
    for index, start in enumerate(range(0, n_rows, per_shard)):
        name = _part_name("models", index)
        _write_parquet(table.slice(start, per_shard), out / name)
        written["models"].append(name)
        report("models", min(n_rows, start + per_shard), n_rows)
    rows["models"] = n_rows
    position = np.arange(n_rows, dtype=np.int64)
    shard_names = pa.array(
        [_part_name("models", i) for i in range(len(written["models"]))], type=pa.string()
    )
    model_truth = models.truth.append_column(
        "file", shard_names.take(pa.array(position // per_shard))
    ).append_column("file_row", pa.array(position % per_shard))
    return model_truth, lora_media


def _write_images(
    out: Path,
    spec: SampleSpec,
    world: World,
    settings: tables.RecipeSettings,
    names: tables.LoraText,
    written: dict[str, list[str]],
    rows: dict[str, int],
    report: Progress,
    media_ids: np.ndarray | None = None,
) -> tuple[pa.Table | None, pa.Table | None]:
    """Write the images shards one at a time, streaming image_truth alongside; with
    ``media_ids`` (sorted imageIds), render those images' files shard by shard.

    Returns the raw_usernames truth rows (None without truth) and the image_media truth rows
    (None without media).
    """
    truth_stream = (
        _AtomicParquetStream(out / "truth/image_truth.parquet") if spec.with_truth else None
    )
    raw_usernames: list[pa.Table] = []
    image_media: list[pa.Table] = []
    renderer = media.ImageRenderer(out, spec.seed) if media_ids is not None else None
    n_rows = world.images.row_image.size
    done = rendered = 0
    try:
        for index, (start, stop) in enumerate(image_shard_bounds(world, spec.image_rows_per_shard)):
            name = _part_name("images", index)
            shard = tables.build_image_shard(
                world, settings, names, start, stop, name, _stream(spec.seed, 3, index)
            )
            _write_parquet(shard.table, out / name)
            written["images"].append(name)
            if truth_stream is not None:
                truth_stream.write(shard.truth)
                raw_usernames.append(shard.raw_usernames)
            done += shard.table.num_rows
            report("images", done, n_rows)
            if renderer is not None and media_ids is not None:
                shard_media = renderer.write_shard(
                    shard.truth, settings.width, settings.height, media_ids
                )
                image_media.append(shard_media)
                rendered += int(pc.sum(shard_media.column("has_media")).as_py() or 0)
                report("image_files", rendered, int(media_ids.size))
            del shard
        if truth_stream is not None:
            truth_stream.close()
    except BaseException:
        if truth_stream is not None:
            truth_stream.abort()
        raise
    rows["images"] = done
    return (
        pa.concat_tables(raw_usernames) if truth_stream is not None else None,
        pa.concat_tables(image_media) if renderer is not None else None,
    )


def planted_counts(world: World) -> dict[str, Any]:
    """Counts of the planted populations, as recorded in the manifest."""
    sizes, images, loras = world.sizes, world.images, world.loras
    row_recipe = images.image_recipe[images.row_image]
    row_unsafe = images.recipe_unsafe[row_recipe]
    return {
        "users": sizes.users,
        "uploaders": int(np.unique(loras.model_uploader).size),
        "loras": int(loras.version_ids.size),
        "models": int(loras.model_ids.size),
        "images": int(images.image_ids.size),
        "recipes": int(images.recipe_user.size),
        "image_rows": int(images.row_image.size),
        "unsafe_image_rows": {
            kind: int((row_unsafe == i + 1).sum()) for i, kind in enumerate(IMAGE_UNSAFE_KINDS)
        },
        "unsafe_loras": {
            kind: int((loras.version_unsafe == i + 1).sum())
            for i, kind in enumerate(MODEL_UNSAFE_KINDS)
        },
        "safe_loras": int((loras.version_unsafe == NONE).sum()),
        "image_malformed_rows": dict(sizes.image_malformed),
        "model_malformed_rows": dict(sizes.model_malformed),
    }
