"""Media of the sample: style- and quality-bearing JPEGs and kohya LoRA files with style directions.

Written by `generator.generate_sample` when `SampleSpec.with_media` is set::

    out/media/images/<imageId>.jpeg     a 64-96 px thumbnail of the image (see below)
    out/media/loras/<fileName>          each LoRA version's PRIMARY file (see the cap below)
    out/truth/image_media.parquet       per distinct image: style, quality, has_media, params
    out/truth/lora_media.parquet        per version: file, sha256, rank, alpha, style coefficients
    out/truth/lora_directions.parquet   per style x module: the planted rank-1 direction

Images. Each image is drawn from its style's palette (`styles.Style.palette`) with a shape motif
per style (bubbles, a portrait, mountains, a car, a dog, ink strokes, a neon grid, a pixel
mosaic, a plate, a starry castle) and degraded by its hidden quality (`image_truth.quality`):
low quality → washed-out colours (the palette pulled toward its grey), blur, noise and a low
JPEG quality. The washed-out palette is the part a CLIP model trained on prompts cannot learn
to ignore (a blur or noise is invisible to the prompt; a muddy palette is off-style), so
image embeddings carry quality as real CLIP embeddings carry aesthetics. Every image's bytes depend only on
(seed, imageId, style, quality, size). Rendering all ~35k images of the default sample would
cost ~15 s, so only a bounded, deterministic subset gets media: whole users, in a seeded order,
while their images fit under `SampleSpec.media_images` (3,000 by default) — every user with
media has *all* their images rendered (complete histories for per-user stages). Which images
have media is recorded in `truth/image_media.parquet` (`has_media`) and the manifest.

LoRAs. Every version's primary file (up to `SampleSpec.media_loras`, 2,000 by default: all
1,926 of the default sample; beyond the cap, the versions used by images with media first,
then the most popular; `lora_media.has_media`) is an SD 1.5-layout kohya file at widths
8/16/32, text 16 (`ml.lora_format.SAMPLE_WIDTHS`), rank 1-4, fp16 or fp32 (the release `fp`
column), 30-60 KB (a few with all modules ~130-330 KB), with one of three module sets (`LORA_PRESETS`: the 64 weights2weights modules, those plus text-encoder
q/v, or all 264). For every module m the rank-1 reduction of ΔW (`ml.lora_format.rank1_reduce`,
down vector with a non-negative sum) is, up to fp rounding and the small extra rank components,

    [down_m, up_m] ≈ balance_m( Σ_s coef_s · direction[s, m] + gain · NOISE_SCALE · ε_m )

with coef = style_mix · gain (recorded in `lora_media.style_coefficients`), direction[s] a fixed
random unit direction per style and module (`lora_directions`; every down part has the same
positive mean so the sign convention is stable) and balance_m rescaling the down and up parts
to equal norms. Non-SD-1.5 base models keep the same (scaled SD 1.5) key layout; their
``ss_base_model_version`` still names their family. PickleTensor versions (.pt / .ckpt) are
written as real pickles (a torch-style zip for .pt, a raw protocol-2 pickle for .ckpt) that the
downloaders must refuse. Non-primary files get no media.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFilter

from ml import lora_format as lf
from pipelines.sample import styles as st
from pipelines.sample.world import World

IMAGE_DIR = "media/images"
LORA_DIR = "media/loras"
IMAGE_EXT = ".jpeg"
DEFAULT_MEDIA_IMAGES = 3_000
DEFAULT_MEDIA_LORAS = 2_000  # the default sample has 1,926 versions: all of them
IMAGE_LONG_SIDE = 96
IMAGE_SHORT_MIN = 64
N_STYLES = len(st.STYLES)
MOTIFS: tuple[str, ...] = (
    "bubbles",  # anime
    "portrait",  # photoreal_portrait
    "mountains",  # landscape
    "car",  # cars
    "dog",  # dogs
    "strokes",  # ink_painting
    "neon_grid",  # cyberpunk
    "mosaic",  # pixel_art
    "plate",  # food
    "castle_stars",  # fantasy
)

# LoRA planting.
LORA_WIDTHS = lf.SAMPLE_WIDTHS
DIRECTION_ANCHOR = 0.5  # share of each down direction along the all-ones vector (sign anchor)
NOISE_SCALE = 0.3  # per-module noise norm relative to the gain
EXTRA_RANK_SCALE = 0.3  # norm of rank components 2..r relative to the planted one
LORA_RANKS: tuple[int, ...] = (1, 2, 3, 4)
LORA_RANK_P: tuple[float, ...] = (0.3, 0.3, 0.1, 0.3)
_QV_TE = (*lf.W2W_KINDS, "self_attn_q_proj", "self_attn_v_proj")
LORA_PRESETS: dict[str, tuple[lf.LoraModule, ...]] = {
    "w2w": lf.sd15_modules(LORA_WIDTHS, text_encoder=False, kinds=lf.W2W_KINDS),
    "qv_te": lf.sd15_modules(LORA_WIDTHS, kinds=_QV_TE),
    "full": lf.sd15_modules(LORA_WIDTHS),
}
LORA_PRESET_P: tuple[float, ...] = (0.55, 0.40, 0.05)
ALL_MODULES: tuple[lf.LoraModule, ...] = LORA_PRESETS["full"]


def _rng(seed: int, *tag: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 0x3ED1A, *tag]))


# ---------------------------------------------------------------------------------------------
# Which images get media


def select_media_images(world: World, cap: int) -> np.ndarray:
    """Boolean mask over `world.images` of the images that get media files.

    Whole users in userHash order, each added while the running total stays within ``cap``
    (users that would overflow it are skipped, smaller ones later may still fit). The order is
    the one the pipeline's ``image_files`` asset downloads in (IMAGEGEM_MEDIA_MAX_IMAGES), so
    a demo downloads images that exist.
    """
    images = world.images
    mask = np.zeros(images.image_ids.size, dtype=bool)
    if cap <= 0 or images.image_ids.size == 0:
        return mask
    per_user = np.bincount(images.image_user, minlength=world.users.count)
    if per_user.sum() <= cap:
        mask[:] = True
        return mask
    chosen = np.zeros(world.users.count, dtype=bool)
    total = 0
    for user in np.argsort(np.array(world.users.hashes), kind="stable").tolist():
        n = int(per_user[user])
        if n and total + n <= cap:
            chosen[user] = True
            total += n
    return chosen[images.image_user]


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class Degradation:
    """How an image of a given hidden quality is degraded."""

    blur_radius: float  # box blur radius in pixels
    noise_sigma: float  # Gaussian noise, 0-255 scale
    jpeg_quality: int
    washout: float  # share of the way each palette colour is pulled toward the palette's grey


def degradation(quality: float) -> Degradation:
    """Low quality → washed-out colours, blur, noise, strong JPEG compression; high quality →
    true colours, sharp and clean.

    d = sigmoid(-2.5 q): washout 0.9 d, box blur radius 2.4 d², noise σ 14 d (0-255 scale),
    JPEG quality 94 - 66 d.
    """
    d = float(1.0 / (1.0 + np.exp(2.5 * float(quality))))
    return Degradation(
        blur_radius=round(2.4 * d * d, 3),
        noise_sigma=round(14.0 * d, 3),
        jpeg_quality=int(round(94 - 66 * d)),
        washout=round(0.9 * d, 3),
    )


def thumbnail_size(width: int, height: int) -> tuple[int, int]:
    """Media size for an image of ``width`` x ``height``: long side 96, short side >= 64."""
    width, height = max(1, int(width)), max(1, int(height))
    scale = IMAGE_LONG_SIDE / max(width, height)
    w = min(IMAGE_LONG_SIDE, max(IMAGE_SHORT_MIN, round(width * scale)))
    h = min(IMAGE_LONG_SIDE, max(IMAGE_SHORT_MIN, round(height * scale)))
    return w, h


_GRADIENTS: dict[tuple[int, int, int], Image.Image] = {}
_NOISE_SIDE = 128


def _gradient(size: tuple[int, int], angle_index: int) -> Image.Image:
    """A cached L-mode linear gradient mask at one of 8 angles."""
    key = (*size, angle_index)
    mask = _GRADIENTS.get(key)
    if mask is None:
        w, h = size
        angle = angle_index * np.pi / 4
        y = np.linspace(-0.5, 0.5, h)[:, None]
        x = np.linspace(-0.5, 0.5, w)[None, :]
        t = np.clip(0.5 + 1.2 * (np.cos(angle) * x + np.sin(angle) * y), 0.0, 1.0)
        mask = Image.fromarray(np.round(t * 255).astype(np.uint8), mode="L")
        _GRADIENTS[key] = mask
    return mask


def _noise_tile(seed: int) -> np.ndarray:
    return _rng(seed, 2).standard_normal((_NOISE_SIDE, _NOISE_SIDE, 3)).astype(np.float32)


Colour = tuple[int, int, int]
_PALETTES = np.array([s.palette for s in st.STYLES], dtype=np.int64)  # (styles, 5, 3)


def _xy(rng: np.random.Generator, w: int, h: int, lo: float, hi: float) -> tuple[float, float]:
    return float(rng.uniform(lo, hi) * w), float(rng.uniform(lo, hi) * h)


def _motif(
    draw: ImageDraw.ImageDraw,
    image: Image.Image,
    style: int,
    w: int,
    h: int,
    c: list[Colour],
    rng: np.random.Generator,
) -> Image.Image:
    """Draw the style's motif with palette colours c[2], c[3], c[4] (c[0..1] are the
    background). Returns the image (the mosaic motif replaces it)."""
    s = min(w, h)
    motif = MOTIFS[style]
    if motif == "bubbles":
        for i in range(int(rng.integers(3, 7))):
            x, y = _xy(rng, w, h, 0.1, 0.9)
            r = float(rng.uniform(0.1, 0.3)) * s
            draw.ellipse((x - r, y - r, x + r, y + r), fill=c[2 + i % 2], outline=c[4], width=2)
        for _ in range(3):
            x, y = _xy(rng, w, h, 0.1, 0.9)
            r = 0.08 * s
            draw.line((x - r, y, x + r, y), fill=c[4], width=1)
            draw.line((x, y - r, x, y + r), fill=c[4], width=1)
    elif motif == "portrait":
        cx = w * float(rng.uniform(0.42, 0.58))
        draw.ellipse((cx - 0.45 * w, 0.72 * h, cx + 0.45 * w, 1.3 * h), fill=c[2])
        rx, ry = 0.2 * w * float(rng.uniform(0.9, 1.1)), 0.25 * h
        cy = 0.42 * h
        draw.chord((cx - rx * 1.15, cy - ry * 1.2, cx + rx * 1.15, cy + ry * 0.9), 180, 360, c[4])
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=c[3])
    elif motif == "mountains":
        x, y = _xy(rng, w, h, 0.15, 0.4)
        r = 0.1 * s
        draw.ellipse((x - r, y - r, x + r, y + r), fill=c[4])
        n = int(rng.integers(3, 6))
        xs = np.linspace(0, w, 2 * n + 1)
        ys = np.where(np.arange(2 * n + 1) % 2 == 1, rng.uniform(0.25, 0.45, 2 * n + 1), 0.62)
        draw.polygon(
            [(0, h)] + [(float(a), float(b) * h) for a, b in zip(xs, ys, strict=True)] + [(w, h)],
            fill=c[2],
        )
        draw.rectangle((0, 0.78 * h, w, h), fill=c[3])
    elif motif == "car":
        draw.rectangle((0, 0.74 * h, w, h), fill=c[4])
        x0, x1 = 0.12 * w, 0.88 * w
        draw.rounded_rectangle((x0, 0.46 * h, x1, 0.68 * h), radius=int(0.05 * s) + 1, fill=c[2])
        draw.polygon(
            [(0.3 * w, 0.46 * h), (0.38 * w, 0.32 * h), (0.64 * w, 0.32 * h), (0.74 * w, 0.46 * h)],
            fill=c[3],
        )
        r = 0.1 * s
        for fx in (0.3, 0.7):
            draw.ellipse(
                (fx * w - r, 0.68 * h - r, fx * w + r, 0.68 * h + r),
                fill=c[4],
                outline=c[3],
                width=2,
            )
    elif motif == "dog":
        draw.ellipse((0.25 * w, 0.5 * h, 0.85 * w, 0.82 * h), fill=c[2])
        hx, hy, r = 0.3 * w, 0.42 * h, 0.15 * s
        draw.polygon(
            [(hx - r, hy - 0.3 * r), (hx - 0.6 * r, hy - 1.6 * r), (hx - 0.1 * r, hy)], fill=c[3]
        )
        draw.polygon(
            [(hx + r, hy - 0.3 * r), (hx + 0.6 * r, hy - 1.6 * r), (hx + 0.1 * r, hy)], fill=c[3]
        )
        draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=c[2])
        draw.ellipse((hx - 0.25 * r, hy + 0.3 * r, hx + 0.25 * r, hy + 0.7 * r), fill=c[4])
        for _ in range(int(rng.integers(2, 5))):
            x, y = w * float(rng.uniform(0.4, 0.8)), h * float(rng.uniform(0.55, 0.75))
            draw.ellipse((x - 0.04 * s, y - 0.04 * s, x + 0.04 * s, y + 0.04 * s), fill=c[3])
    elif motif == "strokes":
        for i in range(int(rng.integers(4, 8))):
            x0, y0 = _xy(rng, w, h, 0.0, 1.0)
            dx, dy = float(rng.uniform(0.2, 0.6)) * w, float(rng.uniform(-0.5, 0.5)) * h
            draw.line((x0, y0, x0 + dx, y0 + dy), fill=c[2 + i % 2], width=int(rng.integers(2, 7)))
        pts = [(float(x), h * float(rng.uniform(0.55, 0.8))) for x in np.linspace(0, w, 6)]
        draw.line(pts, fill=c[4], width=2)
    elif motif == "neon_grid":
        horizon = 0.55 * h
        for k in range(1, 8):
            y = horizon + (h - horizon) * (k / 8) ** 1.6
            draw.line((0, y, w, y), fill=c[2], width=1)
        for k in range(-4, 5):
            draw.line((w / 2 + k * 0.06 * w, horizon, w / 2 + k * 0.3 * w, h), fill=c[2], width=1)
        x = 0.0
        while x < w:
            bw = float(rng.uniform(0.08, 0.18)) * w
            top = h * float(rng.uniform(0.15, 0.45))
            draw.rectangle((x, top, x + bw - 1, horizon), fill=c[3], outline=c[4])
            for wy in np.arange(top + 3, horizon - 2, 5):
                draw.point((x + bw / 2, float(wy)), fill=c[4])
            x += bw + 1
    elif motif == "mosaic":
        gw = int(rng.integers(8, 13))
        gh = max(1, round(gw * h / w))
        cells = rng.choice(5, size=(gh, gw), p=[0.3, 0.25, 0.2, 0.15, 0.1])
        grid = np.array(c, dtype=np.uint8)[cells]
        return Image.fromarray(grid, mode="RGB").resize((w, h), Image.Resampling.NEAREST)
    elif motif == "plate":
        cx, cy = w * float(rng.uniform(0.4, 0.6)), h * float(rng.uniform(0.45, 0.6))
        for k, colour in enumerate((c[2], c[3])):
            rx, ry = (0.42 - 0.16 * k) * w, (0.34 - 0.12 * k) * h
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour, outline=c[4], width=1)
        for _ in range(int(rng.integers(3, 7))):
            x = cx + float(rng.uniform(-0.18, 0.18)) * w
            y = cy + float(rng.uniform(-0.12, 0.12)) * h
            draw.ellipse((x - 0.05 * s, y - 0.05 * s, x + 0.05 * s, y + 0.05 * s), fill=c[4])
    elif motif == "castle_stars":
        for _ in range(int(rng.integers(15, 35))):
            x, y = _xy(rng, w, h, 0.0, 1.0)
            draw.point((x, y * 0.6), fill=c[4])
        mx, my = _xy(rng, w, h, 0.15, 0.35)
        draw.ellipse((mx - 0.09 * s, my - 0.09 * s, mx + 0.09 * s, my + 0.09 * s), fill=c[3])
        base = 0.72 * h
        draw.rectangle((0.25 * w, base - 0.12 * h, 0.75 * w, h), fill=c[2])
        for fx in (0.25, 0.5, 0.75):
            tw = 0.08 * w
            draw.rectangle((fx * w - tw, base - 0.3 * h, fx * w + tw, h), fill=c[2])
            draw.polygon(
                [
                    (fx * w - tw * 1.3, base - 0.3 * h),
                    (fx * w, base - 0.48 * h),
                    (fx * w + tw * 1.3, base - 0.3 * h),
                ],
                fill=c[3],
            )
    return image


def render_image(
    style: int,
    quality: float,
    size: tuple[int, int],
    seed: int,
    image_id: int,
    noise_tile: np.ndarray | None = None,
) -> bytes:
    """The JPEG bytes of one sample image (deterministic in all arguments)."""
    rng = _rng(seed, 3, int(image_id))
    w, h = size
    palette = _PALETTES[style][rng.permutation(_PALETTES.shape[1])]
    palette = np.clip(palette + rng.integers(-8, 9, size=palette.shape), 0, 255)
    spoil = degradation(quality)
    palette = np.round((1.0 - spoil.washout) * palette + spoil.washout * palette.mean())
    colours: list[Colour] = [(int(r), int(g), int(b)) for r, g, b in palette.tolist()]
    mask = _gradient((w, h), int(rng.integers(0, 8)))
    image = Image.composite(
        Image.new("RGB", (w, h), colours[1]), Image.new("RGB", (w, h), colours[0]), mask
    )
    image = _motif(ImageDraw.Draw(image), image, style, w, h, colours, rng)
    if spoil.blur_radius >= 0.15:
        image = image.filter(ImageFilter.BoxBlur(spoil.blur_radius))
    if spoil.noise_sigma >= 0.5:
        tile = noise_tile if noise_tile is not None else _noise_tile(seed)
        oy = int(rng.integers(0, _NOISE_SIDE - h + 1))
        ox = int(rng.integers(0, _NOISE_SIDE - w + 1))
        pixels = (
            np.asarray(image, dtype=np.float32) + spoil.noise_sigma * tile[oy : oy + h, ox : ox + w]
        )
        image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=spoil.jpeg_quality)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    """Write a media file in place. The sample's unit of atomicity is its manifest: it is
    removed before and written after everything else, so a killed run leaves no sample that
    `generator.read_manifest` accepts, and the rerun rewrites every file."""
    with open(path, "wb") as f:
        f.write(data)


class ImageRenderer:
    """Renders the media of image shards into ``out/media/images``."""

    def __init__(self, out: Path, seed: int) -> None:
        self.folder = Path(out) / IMAGE_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.noise = _noise_tile(seed)

    def _render_one(
        self, image_id: int, style: int, quality: float, size: tuple[int, int]
    ) -> tuple[str, int]:
        data = render_image(style, quality, size, self.seed, image_id, self.noise)
        _write(self.folder / f"{image_id}{IMAGE_EXT}", data)
        return hashlib.sha256(data).hexdigest(), len(data)

    def write_shard(
        self, shard_truth: pa.Table, width: np.ndarray, height: np.ndarray, media_ids: np.ndarray
    ) -> pa.Table:
        """Render the distinct images of one shard that are in ``media_ids`` (sorted).

        ``shard_truth`` is the shard's image_truth (imageId, style_id, quality, recipe_id);
        ``width`` / ``height`` are the planned sizes per recipe. Returns image_media truth
        rows, one per distinct image of the shard (with or without media).
        """
        image_ids = shard_truth.column("imageId").to_numpy()
        ids, first = np.unique(image_ids, return_index=True)
        style = shard_truth.column("style_id").to_numpy()[first]
        quality = shard_truth.column("quality").to_numpy()[first]
        recipe = shard_truth.column("recipe_id").to_numpy()[first]
        has = np.isin(ids, media_ids)
        n = ids.size
        media_w = np.zeros(n, dtype=np.int64)
        media_h = np.zeros(n, dtype=np.int64)
        todo = np.flatnonzero(has).tolist()
        sizes = [thumbnail_size(int(width[recipe[i]]), int(height[recipe[i]])) for i in todo]
        results = [
            self._render_one(int(ids[i]), int(style[i]), float(quality[i]), size)
            for i, size in zip(todo, sizes, strict=True)
        ]
        sha: list[str | None] = [None] * n
        n_bytes = np.zeros(n, dtype=np.int64)
        for i, size, (digest, length) in zip(todo, sizes, results, strict=True):
            media_w[i], media_h[i] = size
            sha[i], n_bytes[i] = digest, length
        spoil = [degradation(float(q)) for q in quality]
        paths = [
            f"{IMAGE_DIR}/{int(i)}{IMAGE_EXT}" if h else None
            for i, h in zip(ids.tolist(), has.tolist(), strict=True)
        ]
        return pa.table(
            {
                "imageId": pa.array(ids.astype(np.int64)),
                "style": pa.array([st.STYLE_NAMES[s] for s in style.tolist()], type=pa.string()),
                "style_id": pa.array(style.astype(np.int64)),
                "motif": pa.array([MOTIFS[s] for s in style.tolist()], type=pa.string()),
                "quality": pa.array(quality.astype(np.float64)),
                "has_media": pa.array(has),
                "path": pa.array(paths, type=pa.string()),
                "sha256": pa.array(sha, type=pa.string()),
                "bytes": pa.array(n_bytes),
                "media_width": pa.array(media_w),
                "media_height": pa.array(media_h),
                "blur_radius": pa.array([d.blur_radius for d in spoil], type=pa.float64()),
                "noise_sigma": pa.array([d.noise_sigma for d in spoil], type=pa.float64()),
                "jpeg_quality": pa.array([d.jpeg_quality for d in spoil], type=pa.int64()),
                "washout": pa.array([d.washout for d in spoil], type=pa.float64()),
            }
        )


# ---------------------------------------------------------------------------------------------
# LoRA files


def style_directions(seed: int) -> np.ndarray:
    """(styles, D) planted rank-1 directions over `ALL_MODULES` in W2W layout [down, up].

    Per style and module: the down part is DIRECTION_ANCHOR · ones/√in plus a random part
    orthogonal to ones (unit norm in total); the up part is a random unit vector.
    """
    rng = _rng(seed, 4)
    dims = sum(m.in_features + m.out_features for m in ALL_MODULES)
    out = np.empty((N_STYLES, dims), dtype=np.float64)
    for s in range(N_STYLES):
        parts: list[np.ndarray] = []
        for module in ALL_MODULES:
            n_in = module.in_features
            ones = np.full(n_in, 1.0 / np.sqrt(n_in))
            r = rng.standard_normal(n_in)
            r -= r.mean()
            r /= np.linalg.norm(r)
            down = DIRECTION_ANCHOR * ones + np.sqrt(1 - DIRECTION_ANCHOR**2) * r
            up = rng.standard_normal(module.out_features)
            parts += [down, up / np.linalg.norm(up)]
        out[s] = np.concatenate(parts)
    return out


@functools.cache
def _segments(preset: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the full direction vector) of a preset's [down, up] parts, and the
    lengths of those parts in order."""
    offsets: dict[str, int] = {}
    position = 0
    for m in ALL_MODULES:
        offsets[m.name] = position
        position += m.in_features + m.out_features
    index, lengths = [], []
    for m in LORA_PRESETS[preset]:
        start = offsets[m.name]
        index.append(np.arange(start, start + m.in_features + m.out_features))
        lengths += [m.in_features, m.out_features]
    return np.concatenate(index), np.array(lengths)


def _segment_norms(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    bounds = np.r_[0, np.cumsum(lengths)[:-1]]
    return np.sqrt(np.add.reduceat(values * values, bounds))


@dataclass(frozen=True)
class LoraPlan:
    """The planted parameters of one LoRA file."""

    preset: str
    rank: int
    alpha: float
    gain: float
    coefficients: np.ndarray  # (styles,) style_mix * gain


def plan_lora_factors(
    plan: LoraPlan, directions: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The stored factors of one LoRA as a (rank, D_preset) matrix in W2W layout.

    Row 0 is the planted rank-1 component (style signal + noise, down/up parts balanced per
    module); rows 1.. are smaller random components. Everything is divided by √(alpha / r) so
    that ΔW = up @ down · alpha / r has the planted component as its leading part.
    """
    index, lengths = _segments(plan.preset)
    signal = plan.coefficients @ directions[:, index]
    scale_per = np.repeat(1.0 / np.sqrt(lengths), lengths)
    noise = rng.standard_normal(index.size) * scale_per * (plan.gain * NOISE_SCALE)
    z = signal + noise
    norms = _segment_norms(z, lengths).reshape(-1, 2)  # (modules, [down, up])
    balance = np.sqrt(norms[:, 0] / norms[:, 1])  # up * b, down / b → equal norms
    factor = np.repeat(np.stack([1.0 / balance, balance], axis=1).ravel(), lengths)
    z = z * factor
    part_norm = np.repeat(_segment_norms(z, lengths), lengths)
    rows = [z]
    for _ in range(plan.rank - 1):
        e = rng.standard_normal(index.size)
        rows.append(
            e / np.repeat(_segment_norms(e, lengths), lengths) * part_norm * EXTRA_RANK_SCALE
        )
    return np.stack(rows) / np.sqrt(plan.alpha / plan.rank)


def factors_to_layers(preset: str, factors: np.ndarray, alpha: float) -> dict[str, lf.LoraLayer]:
    """Split a (rank, D_preset) factor matrix into the preset's kohya layers."""
    layers: dict[str, lf.LoraLayer] = {}
    rank = factors.shape[0]
    position = 0
    for module in LORA_PRESETS[preset]:
        n_in, n_out = module.in_features, module.out_features
        down = factors[:, position : position + n_in]
        up = factors[:, position + n_in : position + n_in + n_out].T
        position += n_in + n_out
        layers[module.name] = lf.LoraLayer(
            down=np.ascontiguousarray(down).reshape(module.down_shape(rank)),
            up=np.ascontiguousarray(up).reshape(module.up_shape(rank)),
            alpha=alpha,
        )
    return layers


@functools.cache
def _file_layout(preset: str, rank: int, dtype: str) -> tuple[str, np.ndarray]:
    """The tensor part of the safetensors header of a (preset, rank, dtype) file and the
    gather index that turns [factors.ravel(), alpha] into its data section.

    Tensors are in the order `lf.safetensors_bytes` writes them (all share one dtype: by
    name), so `_fast_safetensors` is byte-identical to `lf.save_lora_bytes`.
    """
    modules = LORA_PRESETS[preset]
    width = sum(m.in_features + m.out_features for m in modules)
    alpha_slot = rank * width
    gathers: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
    position = 0
    k = np.arange(rank)
    for module in modules:
        n_in, n_out = module.in_features, module.out_features
        down_key, up_key, alpha_key = lf.tensor_keys(module)
        down = (k[:, None] * width + position + np.arange(n_in)[None, :]).ravel()
        up = (k[None, :] * width + position + n_in + np.arange(n_out)[:, None]).ravel()
        gathers[down_key] = (module.down_shape(rank), down)
        gathers[up_key] = (module.up_shape(rank), up)
        gathers[alpha_key] = ((), np.array([alpha_slot]))
        position += n_in + n_out
    itemsize = {"F16": 2, "F32": 4}[dtype]
    entries: dict[str, object] = {}
    order: list[np.ndarray] = []
    offset = 0
    for name in sorted(gathers):
        shape, gather = gathers[name]
        entries[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + gather.size * itemsize],
        }
        offset += gather.size * itemsize
        order.append(gather)
    return json.dumps(entries, separators=(",", ":"))[1:-1], np.concatenate(order)


def _fast_safetensors(
    preset: str, factors: np.ndarray, alpha: float, dtype: type, metadata: dict[str, str]
) -> bytes:
    """`lf.save_lora_bytes(factors_to_layers(...), metadata, dtype)` without per-tensor work."""
    code = "F32" if dtype is np.float32 else "F16"
    fragment, gather = _file_layout(preset, factors.shape[0], code)
    meta = json.dumps({k: metadata[k] for k in sorted(metadata)}, separators=(",", ":"))
    header = ('{"__metadata__":' + meta + "," + fragment + "}").encode()
    header += b" " * (-len(header) % 8)
    values = np.append(factors.ravel(), alpha)[gather].astype(dtype)
    return struct.pack("<Q", len(header)) + header + values.tobytes()


def lora_metadata(plan: LoraPlan, base_model: str, output_name: str) -> dict[str, str]:
    """The kohya ``__metadata__`` of a sample LoRA file."""
    return lf.kohya_metadata(
        plan.rank,
        plan.alpha,
        base_model_version(base_model),
        ss_output_name=output_name,
        ss_sample_layout=f"sd15 modules at widths {LORA_WIDTHS.unet} text {LORA_WIDTHS.text}",
    )


def base_model_version(base_model: str) -> str:
    """kohya's ``ss_base_model_version`` for a Civitai baseModel name."""
    if base_model.startswith("SD 1"):
        return "sd_v1"
    if base_model.startswith("SD 2"):
        return "sd_v2"
    if base_model.startswith("SDXL") or base_model in ("Pony", "Illustrious"):
        return "sdxl_base_v1-0"
    if base_model.startswith("Flux"):
        return "flux1"
    return "unknown"


def _pickle_bytes(state: dict[str, np.ndarray], stem: str, container: str) -> bytes:
    """A real pickle of the state dict: raw protocol 2 (.ckpt) or a torch-style zip (.pt)."""
    payload = pickle.dumps({k: v for k, v in sorted(state.items())}, protocol=2)
    if container == "pickle":
        return payload
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in (
            (f"{stem}/data.pkl", payload),
            (f"{stem}/byteorder", b"little"),
            (f"{stem}/version", b"3\n"),
        ):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, data)
    return buffer.getvalue()


@dataclass
class LoraMedia:
    """What `write_lora_media` wrote: per-fileId facts for the release and the truth rows."""

    file_ids: np.ndarray  # primary fileIds with media (the other arrays: same order)
    sha256: list[str]  # uppercase hex, same order
    crc32: list[str]  # uppercase hex
    size_bytes: np.ndarray
    truth: pa.Table  # lora_media
    directions: pa.Table  # lora_directions


def select_media_loras(world: World, cap: int, image_mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask over versions whose primary file gets written: all of them when they fit
    in ``cap``; else the versions used by images with media (``image_mask``) first, then by
    popularity (descending), then by version order."""
    loras, images = world.loras, world.images
    n_versions = loras.version_ids.size
    mask = np.zeros(n_versions, dtype=bool)
    if cap >= n_versions:
        mask[:] = True
        return mask
    used = np.zeros(n_versions, dtype=bool)
    if image_mask is not None and image_mask.any():
        recipes = np.unique(images.image_recipe[image_mask])
        picked = images.recipe_loras[recipes].ravel()
        used[picked[picked >= 0]] = True
    order = np.lexsort((np.arange(n_versions), -loras.version_popularity, ~used))
    mask[order[:cap]] = True
    return mask


def write_lora_media(
    out: Path,
    world: World,
    models: pa.Table,
    seed: int,
    selected: np.ndarray | None = None,
) -> LoraMedia:
    """Write the primary file of every ``selected`` version (default: all) under
    out/media/loras; return their hashes and the lora_media / lora_directions truth.

    ``models`` is the release models table (before hashes are patched): the primary rows give
    each version's fileId, fileName, format and fp. A version's bytes do not depend on which
    other versions are selected.
    """
    loras = world.loras
    n_versions = loras.version_ids.size
    selected = np.ones(n_versions, dtype=bool) if selected is None else selected
    primary = pc.equal(models.column("primary"), 1)
    rows = models.filter(primary).select(["fileId", "fileName", "format", "fp"])
    file_of_id = {
        int(f): (str(name), str(fmt), fp)
        for f, name, fmt, fp in zip(
            rows.column("fileId").to_pylist(),
            rows.column("fileName").to_pylist(),
            rows.column("format").to_pylist(),
            rows.column("fp").to_pylist(),
            strict=True,
        )
    }
    primary_file = np.flatnonzero(loras.file_type == 0)
    version_file = np.empty(n_versions, dtype=np.int64)
    version_file[loras.file_version[primary_file]] = loras.file_ids[primary_file]

    rng = _rng(seed, 5)
    preset_index = rng.choice(len(LORA_PRESETS), size=n_versions, p=np.array(LORA_PRESET_P))
    rank = rng.choice(np.array(LORA_RANKS), size=n_versions, p=np.array(LORA_RANK_P))
    alpha_kind = rng.choice(3, size=n_versions, p=[0.4, 0.35, 0.25])  # = r, 1, r / 2
    alpha = np.where(alpha_kind == 0, rank, np.where(alpha_kind == 1, 1.0, rank / 2)).astype(float)
    gain = rng.lognormal(0.0, 0.25, size=n_versions)
    coefficients = loras.version_style_mix * gain[:, None]
    directions = style_directions(seed)
    base_names = [loras.base_model_names[b] for b in loras.model_base[loras.version_model]]
    presets = list(LORA_PRESETS)

    folder = out / LORA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    columns = ("fileName", "format", "fp", "container", "path", "sha256", "bytes", "dtype")
    records: dict[str, list] = {k: [] for k in columns}
    crc32: list[str] = []
    seen_names: set[str] = set()
    for v in range(n_versions):
        file_name, fmt, fp = file_of_id[int(version_file[v])]
        if file_name in seen_names or "/" in file_name or file_name.startswith("."):
            raise ValueError(f"internal: unusable or duplicate LoRA file name {file_name!r}")
        seen_names.add(file_name)
        dtype = np.float32 if fp == "fp32" else np.float16
        container = (
            "safetensors"
            if fmt != "PickleTensor"
            else ("zip" if file_name.endswith(".pt") else "pickle")
        )
        records["fileName"].append(file_name)
        records["format"].append(fmt)
        records["fp"].append(fp)
        records["container"].append(container)
        records["dtype"].append("F32" if dtype is np.float32 else "F16")
        if not selected[v]:
            for key in ("path", "sha256", "bytes"):
                records[key].append(None)
            continue
        plan = LoraPlan(
            presets[preset_index[v]], int(rank[v]), float(alpha[v]), float(gain[v]), coefficients[v]
        )
        factors = plan_lora_factors(plan, directions, _rng(seed, 6, int(loras.version_ids[v])))
        stem = file_name.rsplit(".", 1)[0]
        if container == "safetensors":
            meta = lora_metadata(plan, base_names[v], stem)
            data = _fast_safetensors(plan.preset, factors, plan.alpha, dtype, meta)
        else:
            layers = factors_to_layers(plan.preset, factors, plan.alpha)
            data = _pickle_bytes(lf.build_state_dict(layers, dtype), stem, container)
        _write(folder / file_name, data)
        records["path"].append(f"{LORA_DIR}/{file_name}")
        records["sha256"].append(hashlib.sha256(data).hexdigest().upper())
        records["bytes"].append(len(data))
        crc32.append(f"{zlib.crc32(data) & 0xFFFFFFFF:08X}")

    mix = pa.FixedSizeListArray.from_arrays(pa.array(coefficients.ravel()), N_STYLES)
    truth = pa.table(
        {
            "modelVersionId": pa.array(loras.version_ids.astype(np.int64)),
            "fileId": pa.array(version_file),
            "fileName": pa.array(records["fileName"], type=pa.string()),
            "format": pa.array(records["format"], type=pa.string()),
            "fp": pa.array(records["fp"], type=pa.string()),
            "container": pa.array(records["container"], type=pa.string()),
            "has_media": pa.array(selected),
            "path": pa.array(records["path"], type=pa.string()),
            "sha256": pa.array(records["sha256"], type=pa.string()),
            "bytes": pa.array(records["bytes"], type=pa.int64()),
            "dtype": pa.array(records["dtype"], type=pa.string()),
            "module_preset": pa.array(
                [presets[i] for i in preset_index.tolist()], type=pa.string()
            ),
            "n_modules": pa.array(
                [len(LORA_PRESETS[presets[i]]) for i in preset_index.tolist()], type=pa.int64()
            ),
            "rank": pa.array(rank.astype(np.int64)),
            "alpha": pa.array(alpha),
            "gain": pa.array(gain),
            "noise_scale": pa.array(gain * NOISE_SCALE),
            "main_style_id": pa.array(loras.version_style.astype(np.int64)),
            "style_coefficients": mix.cast(pa.list_(pa.float64())),
        }
    )
    written = np.flatnonzero(selected)
    return LoraMedia(
        file_ids=version_file[written],
        sha256=[records["sha256"][i] for i in written.tolist()],
        crc32=crc32,
        size_bytes=np.array([records["bytes"][i] for i in written.tolist()], dtype=np.int64),
        truth=truth,
        directions=directions_table(directions),
    )


def directions_table(directions: np.ndarray) -> pa.Table:
    """truth/lora_directions.parquet: one row per (style, module) with its [down, up] parts."""
    style_ids, names, kinds, downs, ups = [], [], [], [], []
    for s in range(N_STYLES):
        position = 0
        for module in ALL_MODULES:
            n_in, n_out = module.in_features, module.out_features
            style_ids.append(s)
            names.append(module.name)
            kinds.append(module.kind)
            downs.append(directions[s, position : position + n_in].tolist())
            ups.append(directions[s, position + n_in : position + n_in + n_out].tolist())
            position += n_in + n_out
    return pa.table(
        {
            "style_id": pa.array(style_ids, type=pa.int64()),
            "style": pa.array([st.STYLE_NAMES[s] for s in style_ids], type=pa.string()),
            "module": pa.array(names, type=pa.string()),
            "kind": pa.array(kinds, type=pa.string()),
            "down": pa.array(downs, type=pa.list_(pa.float64())),
            "up": pa.array(ups, type=pa.list_(pa.float64())),
        }
    )


def patch_model_hashes(models: pa.Table, media: LoraMedia) -> pa.Table:
    """Give the release rows of files with media their real SHA256 / AutoV2 / CRC32 / sizeKB.

    Matched by fileId (so planted exact duplicates carry the same values); rows planted with a
    negative size keep a negative sizeKB (-(real) - 1).
    """
    file_ids = models.column("fileId").to_numpy(zero_copy_only=False)
    order = np.argsort(media.file_ids)
    sorted_ids = media.file_ids[order]
    pos = np.searchsorted(sorted_ids, np.nan_to_num(file_ids, nan=-1).astype(np.int64))
    pos = np.minimum(pos, max(0, sorted_ids.size - 1))
    primary = pc.fill_null(pc.equal(models.column("primary"), 1), False).to_numpy(
        zero_copy_only=False
    )
    hit = primary & (sorted_ids.size > 0) & (sorted_ids[pos] == file_ids)
    source = np.where(hit, order[pos], 0)
    sha = pa.array(media.sha256, type=pa.string())
    crc = pa.array(media.crc32, type=pa.string())
    hit_array = pa.array(hit)

    def patched(column: str, values: pa.Array) -> pa.Array:
        return pc.if_else(hit_array, pc.take(values, pa.array(source)), models.column(column))

    real_kb = media.size_bytes[source] / 1024.0
    size_kb = models.column("sizeKB").to_numpy(zero_copy_only=False)
    new_size = np.where(hit, np.where(size_kb < 0, -real_kb - 1.0, real_kb), size_kb)
    columns = {
        "hashSHA256": patched("hashSHA256", sha),
        "hashAutoV2": patched("hashAutoV2", pc.utf8_slice_codeunits(sha, 0, 10)),
        "hashCRC32": patched("hashCRC32", crc),
    }
    table = models
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    index = table.schema.get_field_index("sizeKB")
    return table.set_column(index, "sizeKB", pa.array(new_size, type=pa.float64()))
