"""Sample media: images carry style and quality, LoRA files carry kohya layout and style
directions, release rows carry the files' real hashes, bytes are deterministic."""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors import safe_open

from ml import lora_format as lf
from pipelines.sample import media
from pipelines.sample import styles as st
from pipelines.sample.generator import (
    SampleSpec,
    SampleSummary,
    generate_sample,
    read_manifest,
    sample_is_current,
)

SPEC = SampleSpec(users=60, seed=11, media_images=1_500)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleSummary:
    return generate_sample(tmp_path_factory.mktemp("media"), SPEC)


def _truth(sample: SampleSummary, name: str) -> list[dict]:
    return pq.read_table(sample.out / "truth" / f"{name}.parquet").to_pylist()


def _release(sample: SampleSummary, table: str) -> list[dict]:
    files = sample.image_files if table == "images" else sample.model_files
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def _rank(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_rank(a), _rank(b))[0, 1])


@pytest.fixture(scope="module")
def image_stats(sample: SampleSummary) -> dict[str, np.ndarray]:
    """Per image with media: truth style / quality and measurements of the decoded pixels.

    Colours are compared with every style's palette washed out as much as this image's
    quality says (``image_media.washout``: each colour pulled toward its palette's grey)."""
    palettes = [np.array(s.palette, dtype=float) for s in st.STYLES]
    rows = [r for r in _truth(sample, "image_media") if r["has_media"]][::2]
    out: dict[str, list] = {k: [] for k in ("style", "quality", "fit", "mean", "sharp", "noise")}
    out["quant"] = []
    for row in rows:  # style-major colours: palette s is colours[5 s : 5 s + 5]
        washed = [(1 - row["washout"]) * p + row["washout"] * p.mean() for p in palettes]
        colours = np.concatenate(washed)  # (styles * 5, 3)
        colours_t = np.ascontiguousarray(colours.T)  # a contiguous right operand: fast matmul
        palette_means = np.array([p.mean(0) for p in washed])
        with Image.open(sample.out / row["path"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (row["media_width"], row["media_height"])
            out["quant"].append(np.mean(image.quantization[0]))
            pixels = np.asarray(image, dtype=float)
        flat = pixels.reshape(-1, 3)
        squared = (flat**2).sum(1)[:, None] - 2 * flat @ colours_t + (colours**2).sum(1)[None]
        nearest = np.minimum.reduce(
            [squared[:, k :: len(colours) // len(palettes)] for k in range(5)]
        )
        fit = np.sqrt(np.maximum(nearest, 0)).mean(axis=0)  # mean distance to each palette
        mean = flat.mean(0)
        grey = pixels.mean(2)
        grad = np.r_[np.abs(np.diff(grey, axis=1)).ravel(), np.abs(np.diff(grey, axis=0)).ravel()]
        lap = (
            4 * grey[1:-1, 1:-1]
            - grey[:-2, 1:-1]
            - grey[2:, 1:-1]
            - grey[1:-1, :-2]
            - grey[1:-1, 2:]
        )
        saturation = (pixels.max(2) - pixels.min(2)).mean()
        out["style"].append(row["style_id"])
        out["quality"].append(row["quality"])
        out["fit"].append(int(np.argmin(fit)))
        out["mean"].append(int(np.argmin(((palette_means - mean) ** 2).sum(1))))
        out["sharp"].append(np.percentile(grad, 99))
        out["noise"].append(np.median(np.abs(lap)))
        out.setdefault("saturation", []).append(saturation)
    return {k: np.array(v) for k, v in out.items()}


# --- images -----------------------------------------------------------------------------------


def test_images_with_media_are_whole_users_within_the_cap(sample: SampleSummary) -> None:
    image_media = {r["imageId"]: r for r in _truth(sample, "image_media")}
    truth_rows = _truth(sample, "image_truth")
    assert set(image_media) == {r["imageId"] for r in truth_rows}  # one row per distinct image
    has_by_user: dict[str, set[bool]] = {}
    for row in truth_rows:
        has_by_user.setdefault(row["userHash"], set()).add(image_media[row["imageId"]]["has_media"])
    split_users = [user for user, flags in has_by_user.items() if len(flags) != 1]
    assert has_by_user and split_users == []  # all or none of a user's images have media
    with_media = [i for i, r in image_media.items() if r["has_media"]]
    assert 0.8 * SPEC.media_images < len(with_media) <= SPEC.media_images < len(image_media)
    on_disk = sorted(p.name for p in (sample.out / media.IMAGE_DIR).iterdir())
    assert on_disk == sorted(f"{i}.jpeg" for i in with_media)
    manifest = read_manifest(sample.out)
    assert manifest is not None
    assert manifest["media"]["images"]["count"] == len(with_media)
    assert manifest["media"]["images"]["cap"] == SPEC.media_images
    assert sample.counts["media_images"] == len(with_media)


def test_image_files_match_their_truth_rows_and_release_aspect(sample: SampleSummary) -> None:
    release = {r["imageId"]: r for r in _release(sample, "images") if r["imageId"] is not None}
    aspect_checked = with_media = without_media = 0
    for row in _truth(sample, "image_media"):
        if not row["has_media"]:
            assert row["path"] is None and row["sha256"] is None
            without_media += 1
            continue
        with_media += 1
        data = (sample.out / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["bytes"]
        w, h = row["media_width"], row["media_height"]
        assert max(w, h) == media.IMAGE_LONG_SIDE and min(w, h) >= media.IMAGE_SHORT_MIN
        source = release.get(row["imageId"])  # absent: its only row has a planted null id
        if source and source["width"] > 0 and source["height"] > 0:  # bad_size: a defect
            assert (w >= h) == (source["width"] >= source["height"])
            aspect_checked += 1
    assert without_media > 0 and aspect_checked > 0.9 * with_media > 0


def test_image_pixels_are_explained_by_their_style_palette(
    image_stats: dict[str, np.ndarray],
) -> None:
    style = image_stats["style"]
    assert set(style.tolist()) == set(range(len(st.STYLES)))  # every style rendered
    assert (image_stats["fit"] == style).mean() > 0.85
    # the mean colour alone is closest to the own style's mean palette colour for most images
    assert (image_stats["mean"] == style).mean() > 0.5


def test_low_quality_images_are_blurred_noisy_and_compressed(
    image_stats: dict[str, np.ndarray],
) -> None:
    quality = image_stats["quality"]
    low, high = quality < -0.7, quality > 0.7
    assert low.sum() > 50 and high.sum() > 50
    assert _spearman(quality, image_stats["sharp"]) > 0.6
    assert image_stats["sharp"][low].mean() < 0.5 * image_stats["sharp"][high].mean()
    # medians: sharp textured motifs of high-quality images give a few large outliers
    assert np.median(image_stats["noise"][low]) > np.median(image_stats["noise"][high])
    assert _spearman(quality, image_stats["quant"]) < -0.9  # coarser JPEG tables
    # washed-out colours: within a style, the colours of low-quality images are greyer
    by_style = {
        style: _spearman(quality[mine], image_stats["saturation"][mine])
        for style in set(image_stats["style"].tolist())
        if (mine := image_stats["style"] == style).sum() >= 20
    }
    assert len(by_style) >= 5 and min(by_style.values()) > 0.1
    assert np.median(list(by_style.values())) > 0.6


def test_degradation_is_monotone_in_quality() -> None:
    spoils = [media.degradation(q) for q in np.linspace(-3, 3, 13)]
    for worse, better in zip(spoils, spoils[1:], strict=False):
        assert worse.blur_radius >= better.blur_radius
        assert worse.noise_sigma >= better.noise_sigma
        assert worse.jpeg_quality <= better.jpeg_quality
        assert worse.washout >= better.washout
    assert spoils[0].jpeg_quality < 40 < 90 < spoils[-1].jpeg_quality
    assert spoils[0].washout > 0.8 and spoils[-1].washout < 0.01


# --- LoRA files -------------------------------------------------------------------------------


def test_every_version_has_its_primary_file(sample: SampleSummary) -> None:
    primaries = {
        r["modelVersionId"]: r
        for r in _release(sample, "models")
        if r["primary"] == 1 and r["modelVersionId"] is not None
    }
    lora_media = {r["modelVersionId"]: r for r in _truth(sample, "lora_media")}
    assert set(lora_media) == {r["modelVersionId"] for r in _truth(sample, "lora_styles")}
    assert set(primaries) <= set(lora_media)
    on_disk = sorted(p.name for p in (sample.out / media.LORA_DIR).iterdir())
    assert on_disk == sorted(r["fileName"] for r in lora_media.values())
    for version, row in primaries.items():
        assert lora_media[version]["fileName"] == row["fileName"]
        assert lora_media[version]["format"] == row["format"]


def test_safetensors_files_have_the_kohya_layout(sample: SampleSummary) -> None:
    known = {m.name: m for m in lf.sd15_modules(lf.SAMPLE_WIDTHS)}
    base_of = {r["modelVersionId"]: r["baseModel"] for r in _truth(sample, "lora_styles")}
    checked = 0
    for row in _truth(sample, "lora_media"):
        if row["container"] != "safetensors":
            continue
        path = sample.out / row["path"]
        with safe_open(str(path), framework="numpy") as f:
            keys = set(f.keys())
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in keys}
        modules = {lf.split_key(k)[0] for k in keys}
        assert len(modules) == row["n_modules"] and len(keys) == 3 * len(modules)
        for name in modules:
            down_key, up_key, alpha_key = lf.tensor_keys(name)
            down, up, alpha = tensors[down_key], tensors[up_key], tensors[alpha_key]
            module = known[name]
            assert down.shape == module.down_shape(row["rank"])
            assert up.shape == module.up_shape(row["rank"])
            assert alpha.shape == () and float(alpha) == row["alpha"]
            assert str(down.dtype) == {"F16": "float16", "F32": "float32"}[row["dtype"]]
        assert meta["ss_network_module"] == "networks.lora"
        assert meta["ss_network_dim"] == str(row["rank"])
        assert float(meta["ss_network_alpha"]) == row["alpha"]
        assert meta["ss_base_model_version"] == media.base_model_version(
            base_of[row["modelVersionId"]]
        )
        assert row["bytes"] < 400_000
        checked += 1
    assert checked > 100
    presets = pc.value_counts(
        pq.read_table(sample.out / "truth/lora_media.parquet").column("module_preset")
    ).to_pylist()
    assert {p["values"] for p in presets} == set(media.LORA_PRESETS)


def test_pickle_tensor_versions_are_real_pickles(sample: SampleSummary) -> None:
    rows = [r for r in _truth(sample, "lora_media") if r["format"] == "PickleTensor"]
    assert rows and {r["container"] for r in rows} == {"zip", "pickle"}
    for row in rows:
        head = (sample.out / row["path"]).read_bytes()[:16]  # sniffed, never loaded
        expected = "zip" if row["fileName"].endswith(".pt") else "pickle"
        assert lf.sniff_format(head) == expected
        assert lf.refusal_reason(row["fileName"], row["format"], head) is not None
        with pytest.raises(lf.RefusedFormatError):
            lf.load_lora(sample.out / row["path"])


def _rank1_vectors(sample: SampleSummary) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    w2w = lf.sd15_modules(lf.SAMPLE_WIDTHS, text_encoder=False, kinds=lf.W2W_KINDS)
    rows = [
        r
        for r in _truth(sample, "lora_media")
        if r["container"] == "safetensors" and r["has_media"]
    ]
    vectors = [
        lf.flatten_rank1(lf.load_lora(sample.out / r["path"]).layers, w2w, missing="raise")
        for r in rows
    ]
    return np.array(vectors), np.array([r["main_style_id"] for r in rows]), rows


def test_planted_style_directions_are_recoverable_from_the_files(sample: SampleSummary) -> None:
    vectors, style, rows = _rank1_vectors(sample)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = unit @ unit.T
    same = (style[:, None] == style[None, :]) & ~np.eye(style.size, dtype=bool)
    cross = style[:, None] != style[None, :]
    assert cosine[same].mean() > cosine[cross].mean() + 0.4
    # least squares onto the recorded directions gives back the recorded coefficients
    w2w_names = [
        m.name for m in lf.sd15_modules(lf.SAMPLE_WIDTHS, text_encoder=False, kinds=lf.W2W_KINDS)
    ]
    directions = {(r["style_id"], r["module"]): r for r in _truth(sample, "lora_directions")}
    basis = np.array(
        [
            np.concatenate(
                [np.r_[directions[s, n]["down"], directions[s, n]["up"]] for n in w2w_names]
            )
            for s in range(len(st.STYLES))
        ]
    )
    coefficients = np.linalg.lstsq(basis.T, vectors.T, rcond=None)[0].T
    assert (coefficients.argmax(axis=1) == style).mean() > 0.95
    planted = np.array([r["style_coefficients"] for r in rows])
    assert np.corrcoef(coefficients.ravel(), planted.ravel())[0, 1] > 0.95


# --- release rows carry the files' hashes -----------------------------------------------------


def test_release_hashes_are_the_files_hashes(sample: SampleSummary) -> None:
    files = {r["fileId"]: r for r in _truth(sample, "lora_media")}
    assert files and [f for f, r in files.items() if not r["has_media"]] == []
    model_truth = {r["row_index"]: r for r in _truth(sample, "model_truth")}
    checked = 0
    for index, row in enumerate(_release(sample, "models")):
        if row["primary"] != 1:
            continue
        data = (sample.out / files[row["fileId"]]["path"]).read_bytes()
        sha = hashlib.sha256(data).hexdigest().upper()
        assert row["hashSHA256"] == sha and row["hashAutoV2"] == sha[:10]
        assert row["hashCRC32"] == f"{zlib.crc32(data):08X}"
        if model_truth[index]["malformed_kind"] == "negative_size":
            assert row["sizeKB"] == pytest.approx(-len(data) / 1024 - 1)
        else:
            assert row["sizeKB"] == len(data) / 1024
        checked += 1
    assert checked > 100


# --- determinism, switches, manifest ----------------------------------------------------------


def _media_bytes(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted((out / "media").rglob("*"))
        if p.is_file()
    }


def test_media_bytes_are_deterministic_and_depend_on_the_seed(tmp_path: Path) -> None:
    spec = SampleSpec(users=15, seed=4, media_images=300)
    first = _media_bytes(generate_sample(tmp_path / "a", spec).out)
    second = _media_bytes(generate_sample(tmp_path / "b", spec).out)
    assert first and first == second
    other = _media_bytes(generate_sample(tmp_path / "c", SampleSpec(users=15, seed=5)).out)
    shared = set(first) & set(other)  # same file names (image ids, LoRA file names)
    assert len(shared) > 10
    assert sum(first[k] == other[k] for k in shared) < 0.05 * len(shared)
    image = media.render_image(3, 0.5, (96, 64), seed=4, image_id=123)
    assert image == media.render_image(3, 0.5, (96, 64), seed=4, image_id=123)
    assert image != media.render_image(3, 0.5, (96, 64), seed=4, image_id=124)


def test_without_media_no_media_is_written_and_stale_media_is_removed(tmp_path: Path) -> None:
    generate_sample(tmp_path, SampleSpec(users=15, media_images=200))
    assert any((tmp_path / media.IMAGE_DIR).iterdir())
    summary = generate_sample(tmp_path, SampleSpec(users=15, with_media=False))
    assert not list((tmp_path / "media").rglob("*.*"))
    manifest = read_manifest(tmp_path)
    assert manifest is not None and "media" not in manifest
    assert not (tmp_path / "truth/image_media.parquet").exists()
    assert summary.rows["models"] == SampleSpec(users=15).model_rows
    assert not SampleSpec.full().with_media and SampleSpec().with_media


def test_media_only_spec_without_truth_still_writes_media(tmp_path: Path) -> None:
    generate_sample(tmp_path, SampleSpec(users=15, with_truth=False, media_images=100))
    assert not list(tmp_path.glob("truth/*.parquet"))
    assert 0 < len(list((tmp_path / media.IMAGE_DIR).iterdir())) <= 100
    assert list((tmp_path / media.LORA_DIR).iterdir())


def test_sample_is_not_current_when_media_is_missing(tmp_path: Path) -> None:
    spec = SampleSpec(users=15, media_images=100)
    generate_sample(tmp_path, spec)
    assert sample_is_current(tmp_path, spec)
    victim = next((tmp_path / media.LORA_DIR).iterdir())
    victim.unlink()
    assert not sample_is_current(tmp_path, spec)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["media"]["loras"]["count"] > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"media_images": -1}, "media_images"), ({"with_media": 1}, "with_media")],
)
def test_invalid_media_spec_raises(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SampleSpec(**kwargs)  # type: ignore[arg-type]


def test_a_zero_cap_renders_no_images_but_all_loras(tmp_path: Path) -> None:
    summary = generate_sample(tmp_path, SampleSpec(users=15, media_images=0))
    assert not list((tmp_path / media.IMAGE_DIR).iterdir())
    assert summary.counts["media_loras"] == summary.counts["loras"]


def test_a_lora_cap_prefers_loras_used_by_images_with_media(tmp_path: Path) -> None:
    full = generate_sample(tmp_path / "all", SampleSpec(users=15, seed=2, media_images=150))
    capped = generate_sample(
        tmp_path / "cap", SampleSpec(users=15, seed=2, media_images=150, media_loras=12)
    )
    rows = pq.read_table(capped.out / "truth/lora_media.parquet").to_pylist()
    kept = [r for r in rows if r["has_media"]]
    assert len(kept) == 12 == capped.counts["media_loras"] < len(rows)
    assert sorted(p.name for p in (capped.out / media.LORA_DIR).iterdir()) == sorted(
        r["fileName"] for r in kept
    )
    for row in rows:  # a file's bytes do not depend on the cap
        if row["has_media"]:
            assert (capped.out / row["path"]).read_bytes() == (full.out / row["path"]).read_bytes()
        else:
            assert row["path"] is None and row["sha256"] is None
    with_media = {r["imageId"] for r in _truth(capped, "image_media") if r["has_media"]}
    used = {
        r["modelVersionId"] for r in _truth(capped, "image_truth") if r["imageId"] in with_media
    }
    kept_ids = {r["modelVersionId"] for r in kept}
    # more versions are used by images with media than the cap allows: the cap keeps the most
    # popular of them, and no version that no such image uses
    assert len(used) > 12
    popularity = {r["modelVersionId"]: r["popularity"] for r in _truth(capped, "lora_styles")}
    assert kept_ids == set(sorted(used, key=lambda v: (-popularity[v], v))[:12])
    # a cap above that number keeps every used version, then fills up with unused ones
    roomy = generate_sample(
        tmp_path / "roomy",
        SampleSpec(users=15, seed=2, media_images=150, media_loras=len(used) + 5),
    )
    roomy_kept = {r["modelVersionId"] for r in _truth(roomy, "lora_media") if r["has_media"]}
    assert used < roomy_kept and len(roomy_kept) == len(used) + 5
    sha_of = {r["fileId"]: r["sha256"] for r in kept}
    for row in _release(capped, "models"):
        if row["primary"] == 1 and row["fileId"] in sha_of:
            assert row["hashSHA256"] == sha_of[row["fileId"]]
