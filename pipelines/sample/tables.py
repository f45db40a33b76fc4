"""Arrow tables of the sample: release `models`, release `images` shards and truth tables.

The plan (`world.py`) fixes who did what; this module spells it out as text with vectorised
pyarrow.compute calls. Randomness that several shards must agree on (recipe settings, LoRA
names) is drawn once for the whole dataset; per-image randomness (seed, quality, reactions)
comes from a per-shard stream, so any shard can be rebuilt on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.sample import styles as st
from pipelines.sample import text as tx
from pipelines.sample.world import (
    EPOCH_END,
    FILE_TYPES,
    IMAGE_MALFORMED_KINDS,
    IMAGE_UNSAFE_KINDS,
    MODEL_MALFORMED_KINDS,
    MODEL_UNSAFE_KINDS,
    NONE,
    TARGET_UNIQUE_TAGS_PER_LORA,
    World,
    kind_code,
)
from warehouse.schema import CIVITAI_IMAGE_CDN, CIVITAI_SITE, IMAGES, MODELS

N_STYLES = len(st.STYLES)
IMAGE_URL_PREFIX = f"{CIVITAI_IMAGE_CDN}/xG1nkqKTMzGDvpLrqFT7WA/"
DOWNLOAD_URL_PREFIX = f"{CIVITAI_SITE}/api/download/models/"

# Prompt slots: (name, radix); the key of a recipe is spelled in this mixed radix.
PROMPT_RADICES: tuple[int, ...] = (
    len(st.QUALITY_TAGS),
    len(st.SUBJECT_WEIGHTS),
    20,
    16,
    16,
    12,
    len(st.COMPOSITION),
    len(st.DETAILS),
)
PROMPT_SPACE = int(np.prod(PROMPT_RADICES))


def _style_vocab(attribute: str, size: int) -> list[str]:
    """Concatenate one slot's vocabulary over styles, each truncated to `size` entries."""
    out: list[str] = []
    for style in st.STYLES:
        words = list(getattr(style, attribute))
        if len(words) < size:
            raise ValueError(f"style {style.name}: {attribute} needs >= {size} entries")
        out += words[:size]
    return out


def _kind_names(codes: np.ndarray, kinds: tuple[str, ...]) -> pa.Array:
    """Kind codes (0 = none) → nullable kind names."""
    return tx.take_strings(kinds, np.asarray(codes, dtype=np.int64) - 1)


def _nullable(values: np.ndarray, mask: np.ndarray, type_: pa.DataType) -> pa.Array:
    return pa.array(values, type=type_, mask=mask if mask.any() else None)


# ---------------------------------------------------------------------------------------------
# LoRA names (shared by the models table and the prompts' <lora:NAME:w> tags)


@dataclass
class LoraText:
    """Per-model names and per-version file-name stems."""

    model_name: pa.Array  # (models,)
    version_stem: pa.Array  # (versions,) primary fileName without extension
    version_file_name: pa.Array  # (versions,) primary fileName


def lora_text(world: World) -> LoraText:
    """Unique, style-flavoured model names and camelCase file stems (no row loops)."""
    loras = world.loras
    n_adj, n_noun, n_kind = len(st.MODEL_ADJECTIVES), 24, len(st.MODEL_KINDS)
    space = n_adj * n_noun * n_kind
    key = loras.model_name_key
    scrambled = tx.scramble(key % space, space, salt=7) + (key // space) * space
    adj, noun, kind, serial = tx.mixed_radix_digits(scrambled, (n_adj, n_noun, n_kind, 0))
    noun_global = loras.model_style * n_noun + noun
    nouns = _style_vocab("model_nouns", n_noun)
    suffix_number = tx.int_strings(serial + 1)
    has_serial = pc.greater(pa.array(serial), 0)
    empty = pa.scalar("", pa.string())
    title_suffix = pc.if_else(has_serial, tx.join([" ", suffix_number]), empty)
    camel_suffix = pc.if_else(has_serial, suffix_number, empty)
    toxic = loras.model_unsafe == kind_code(MODEL_UNSAFE_KINDS, "toxic_name")
    toxic_word = np.where(toxic, np.arange(key.size) % len(st.TOXIC_MODEL_WORDS), -1)
    toxic_title = tx.take_strings(st.TOXIC_MODEL_WORDS, toxic_word)
    toxic_lower = tx.take_strings([w.lower() for w in st.TOXIC_MODEL_WORDS], toxic_word)
    adj_title = tx.take_strings([w.capitalize() for w in st.MODEL_ADJECTIVES], adj)
    adj_lower = tx.take_strings(st.MODEL_ADJECTIVES, adj)
    noun_title = tx.take_strings([w.capitalize() for w in nouns], noun_global)
    kind_title = tx.take_strings([w.capitalize() for w in st.MODEL_KINDS], kind)
    plain_name = tx.join([adj_title, " ", noun_title, " ", kind_title, title_suffix])
    model_name = pc.if_else(toxic, tx.join([toxic_title, " ", plain_name]), plain_name)
    camel = tx.join([adj_lower, noun_title, kind_title, camel_suffix])
    camel = pc.if_else(
        toxic, tx.join([toxic_lower, adj_title, noun_title, kind_title, camel_suffix]), camel
    )
    version_stem = tx.join(
        [
            pc.take(camel, pa.array(loras.version_model)),
            "_v",
            tx.int_strings(loras.version_number),
        ]
    )
    extension = tx.take_strings((".safetensors", ".pt", ".ckpt"), loras.version_format)
    return LoraText(model_name, version_stem, tx.join([version_stem, extension]))


# ---------------------------------------------------------------------------------------------
# Models table


def _tail_tag_words(count: int, exclude: set[str]) -> list[str]:
    """`count` distinct synthetic tag words (3 syllables, name-like), none unsafe."""
    syllables = [c + v for c in st.TAG_CONSONANTS for v in st.TAG_VOWELS]
    n_syl = len(syllables)
    space = n_syl**3
    banned = re.compile("|".join(re.escape(w) for w in st.SYNTHETIC_BANNED_SUBSTRINGS))
    words: list[str] = []
    start = 0
    while len(words) < count and start < space:
        stop = min(space, start + int((count - len(words)) * 1.3) + 64)
        keys = tx.scramble(np.arange(start, stop), space, salt=11)
        a, b, c = keys % n_syl, (keys // n_syl) % n_syl, keys // (n_syl * n_syl)
        for i, j, k in zip(a.tolist(), b.tolist(), c.tolist(), strict=True):
            word = syllables[i] + syllables[j] + syllables[k]
            if word not in exclude and not banned.search(word):
                words.append(word)
        start = stop
    if len(words) < count:
        raise ValueError(f"cannot make {count} distinct tail tags")
    return words[:count]


def model_tags(world: World, rng: np.random.Generator) -> pa.Array:
    """ ", "-joined tags per model: 2 style tags, 1 generic tag, 1-2 long-tail tags.

    The long tail is sized so that distinct tags / LoRA versions ≈ 0.40 and every tail tag is
    used by at least one model (when there are more models than tail tags).
    """
    loras = world.loras
    n_models = loras.model_style.size
    style_tags = [list(s.tags) for s in st.STYLES]
    common = {t for tags in style_tags for t in tags} | set(st.GENERIC_TAGS)
    n_tail = max(1, round(TARGET_UNIQUE_TAGS_PER_LORA * loras.version_ids.size) - len(common))
    tail = _tail_tag_words(n_tail, common)
    n_per_style = min(len(t) for t in style_tags)
    style_vocab = [t for tags in style_tags for t in tags[:n_per_style]]
    first = rng.integers(0, n_per_style, size=n_models)
    second = (first + rng.integers(1, n_per_style, size=n_models)) % n_per_style
    base = loras.model_style * n_per_style
    generic = rng.integers(0, len(st.GENERIC_TAGS), size=n_models)
    tail_first = np.empty(n_models, dtype=np.int64)
    tail_first[rng.permutation(n_models)] = np.arange(n_models) % n_tail
    zipf = np.minimum(rng.zipf(1.3, size=n_models) - 1, n_tail - 1)
    tail_second = np.where((rng.random(n_models) < 0.5) & (zipf != tail_first), zipf, -1)
    parts = [
        tx.take_strings(style_vocab, base + first),
        tx.take_strings(style_vocab, base + second),
        tx.take_strings(st.GENERIC_TAGS, generic),
        tx.take_strings(tail, tail_first),
        tx.take_strings(tail, tail_second),
    ]
    return tx.join(parts, ", ", skip_nulls=True)


@dataclass
class ModelsResult:
    table: pa.Table  # release `models` rows
    truth: pa.Table  # model_truth rows (same order)


def build_models(world: World, names: LoraText, rng: np.random.Generator) -> ModelsResult:
    """The release `models` table (one row per version file) with planted defects."""
    loras, users, sizes = world.loras, world.users, world.sizes
    n_models, n_versions = loras.model_style.size, loras.version_ids.size
    f_version = loras.file_version
    f_model = loras.version_model[f_version]
    f_type = loras.file_type
    n_rows = f_version.size

    # Per model.
    style = loras.model_style
    nsfw = np.where(rng.random(n_models) < 0.85, 1, 3)
    blocked = loras.model_unsafe == kind_code(MODEL_UNSAFE_KINDS, "blocked")
    nsfw = np.where(blocked, nsfw | 32, nsfw)
    allow_no_credit = (rng.random(n_models) < 0.8).astype(np.int64)
    allow_derivatives = (rng.random(n_models) < 0.85).astype(np.int64)
    allow_license = (rng.random(n_models) < 0.75).astype(np.int64)
    commercial = rng.choice(
        len(st.ALLOW_COMMERCIAL_USE), size=n_models, p=np.array(st.ALLOW_COMMERCIAL_USE_WEIGHTS)
    )
    minor = np.zeros(n_models, dtype=np.int64)
    poi = (rng.random(n_models) < 0.01).astype(np.int64)
    tags = model_tags(world, rng)
    trigger = style * 3 + rng.integers(0, 3, size=n_models)
    trigger_vocab = _style_vocab("trigger_words", 3)
    second_trigger = np.where(rng.random(n_models) < 0.4, style * 3 + (trigger % 3 + 1) % 3, -1)
    trained_words = tx.join(
        [tx.take_strings(trigger_vocab, trigger), tx.take_strings(trigger_vocab, second_trigger)],
        ", ",
        skip_nulls=True,
    )
    base_name = tx.take_strings(loras.base_model_names, loras.model_base)
    label = tx.take_strings([s.label for s in st.STYLES], style)
    description = tx.join(
        [
            "<p>",
            names.model_name,
            ": a LoRA in the ",
            label,
            " style for ",
            base_name,
            ".</p><p>Trigger words: <b>",
            trained_words,
            "</b>. Recommended weight 0.6-0.9.</p>",
        ]
    )

    # Per version.
    popularity = loras.version_popularity
    mean_pop = popularity[popularity > 0].mean() if (popularity > 0).any() else 1.0
    downloads = rng.poisson(300 * popularity / mean_pop * rng.lognormal(0, 0.5, n_versions) + 5)
    rating_count = rng.binomial(downloads, 0.02)
    rating = np.where(
        rating_count > 0, np.round(np.clip(rng.normal(4.7, 0.3, n_versions), 1, 5), 2), 0.0
    )
    thumbs_up = rng.binomial(downloads, 0.06)
    thumbs_down = rng.binomial(downloads, 0.002)
    version_desc = np.where(rng.random(n_versions) < 0.5, 0, -1)
    improvements = (
        "better faces",
        "cleaner colors",
        "more flexible prompts",
        "fewer artifacts",
        "stronger style",
        "better hands",
    )
    version_desc_text = tx.join(
        [
            "<p>Version ",
            tx.int_strings(loras.version_number),
            ": ",
            tx.take_strings(improvements, rng.integers(0, len(improvements), n_versions)),
            ".</p>",
        ]
    )
    version_desc_text = pc.if_else(
        pa.array(version_desc == 0), version_desc_text, pa.nulls(n_versions, pa.string())
    )

    # Per file row.
    sd1_base = np.array([b.startswith(st.SD1_FAMILY_PREFIXES) for b in loras.base_model_names])
    sd1 = sd1_base[loras.model_base[f_model]]
    size_kb = np.where(
        sd1, rng.lognormal(np.log(37_000), 0.6, n_rows), rng.lognormal(np.log(220_000), 0.5, n_rows)
    )
    size_kb = np.where(f_type == 1, size_kb * 0.5, size_kb)
    size_kb = np.where(f_type == 2, rng.lognormal(np.log(80_000), 1.0, n_rows), size_kb)
    size_kb = np.round(size_kb, 2)
    fmt = loras.version_format[f_version]
    stem = pc.take(names.version_stem, pa.array(f_version))
    primary_file = pc.take(names.version_file_name, pa.array(f_version))
    file_name = pc.if_else(
        pa.array(f_type == 0),
        primary_file,
        pc.if_else(
            pa.array(f_type == 1),
            tx.join([stem, "_pruned.safetensors"]),
            tx.join([stem, "_dataset.zip"]),
        ),
    )
    format_code = np.where(f_type == 2, 2, np.where((f_type == 0) & (fmt > 0), 1, 0))
    format_name = tx.take_strings(("SafeTensor", "PickleTensor", "Other"), format_code)
    fp = np.where(f_type == 2, -1, rng.choice([0, 1, -1], size=n_rows, p=[0.7, 0.1, 0.2]))
    pickle_msg = tx.take_strings(
        (
            "No Pickle imports",
            "Pickle imports: collections.OrderedDict, torch._utils._rebuild_tensor_v2",
        ),
        (format_code == 1).astype(np.int64),
    )
    published = loras.version_published[f_version]
    scanned = published - rng.integers(60, 7200, size=n_rows)
    sha = tx.hex_strings(rng.integers(0, 256, size=(n_rows, 32), dtype=np.uint8), upper=True)
    version_id_text = tx.int_strings(loras.version_ids[f_version])
    url_suffix = tx.take_strings(
        ("", "?type=Pruned%20Model&format=SafeTensor", "?type=Training%20Data"), f_type
    )
    uploader_hash = pa.array(users.hashes, type=pa.string())

    def per_model(values: pa.Array | np.ndarray) -> pa.Array:
        array = values if isinstance(values, pa.Array) else pa.array(values)
        return pc.take(array, pa.array(f_model))

    def per_version(values: pa.Array | np.ndarray) -> pa.Array:
        array = values if isinstance(values, pa.Array) else pa.array(values)
        return pc.take(array, pa.array(f_version))

    columns: dict[str, pa.Array] = {
        "modelId": per_model(loras.model_ids),
        "modelName": per_model(names.model_name),
        "modelVersionId": per_version(loras.version_ids),
        "modelVersionName": tx.join(["v", tx.int_strings(loras.version_number[f_version]), ".0"]),
        "fileId": pa.array(loras.file_ids),
        "fileName": file_name,
        "modelDescription": per_model(description),
        "allowNoCredit": per_model(allow_no_credit),
        "allowCommercialUse": per_model(tx.take_strings(st.ALLOW_COMMERCIAL_USE, commercial)),
        "allowDerivatives": per_model(allow_derivatives),
        "allowDifferentLicense": per_model(allow_license),
        "modelType": pa.array(["LORA"] * n_rows, type=pa.string()),
        "minor": per_model(minor),
        "poi": per_model(poi),
        "modelNsfwLevel": per_model(nsfw),
        "cosmetic": pa.nulls(n_rows, pa.string()),
        "tags": per_model(tags),
        "publishedAt": tx.timestamp_strings(published),
        "baseModel": per_model(base_name),
        "baseModelType": pa.array(["Standard"] * n_rows, type=pa.string()),
        "availability": pa.array(["Public"] * n_rows, type=pa.string()),
        "modelVersionNsfwLevel": per_model(nsfw),
        "modelVersionDescription": per_version(version_desc_text),
        "trainedWords": per_model(trained_words),
        "sizeKB": pa.array(size_kb),
        "fileType": tx.take_strings(FILE_TYPES, f_type),
        "fp": tx.take_strings(("fp16", "fp32"), fp),
        "format": format_name,
        "pickleScanResult": pa.array(["Success"] * n_rows, type=pa.string()),
        "pickleScanMessage": pickle_msg,
        "virusScanResult": pa.array(["Success"] * n_rows, type=pa.string()),
        "scannedAt": tx.timestamp_strings(scanned),
        "hashAutoV1": tx.hex_strings(rng.integers(0, 256, (n_rows, 4), dtype=np.uint8), True),
        "hashAutoV2": pc.utf8_slice_codeunits(sha, 0, 10),
        "hashSHA256": sha,
        "hashCRC32": tx.hex_strings(rng.integers(0, 256, (n_rows, 4), dtype=np.uint8), True),
        "hashBLAKE3": tx.hex_strings(rng.integers(0, 256, (n_rows, 32), dtype=np.uint8), True),
        "downloadUrl": tx.join([DOWNLOAD_URL_PREFIX, version_id_text, url_suffix]),
        "primary": pa.array((f_type == 0).astype(np.int64)),
        "downloadCount": per_version(downloads.astype(np.int64)),
        "ratingCount": per_version(rating_count.astype(np.int64)),
        "rating": per_version(rating),
        "thumbsUpCount": per_version(thumbs_up.astype(np.int64)),
        "thumbsDownCount": per_version(thumbs_down.astype(np.int64)),
        "userHash": pc.take(uploader_hash, pa.array(loras.model_uploader[f_model])),
    }

    # Malformed rows: prefer non-primary files of safe versions (the version survives).
    row_unsafe = loras.model_unsafe[f_model]
    malformed = np.zeros(n_rows, dtype=np.int8)
    in_place = [k for k in MODEL_MALFORMED_KINDS if k != "exact_duplicate"]
    n_in_place = sum(sizes.model_malformed[k] for k in in_place)
    safe_rows = np.flatnonzero(row_unsafe == NONE)
    # A bad publishedAt goes on versions with a single file: the API carries one publishedAt
    # per version, so a crawl sees the same defect as the release (not a file-level oddity).
    single_file = np.bincount(f_version)[f_version] == 1
    n_bad_date = sizes.model_malformed["bad_date"]
    bad_date_rows = rng.permutation(safe_rows[single_file[safe_rows]])[:n_bad_date]
    malformed[bad_date_rows] = kind_code(MODEL_MALFORMED_KINDS, "bad_date")
    rest = np.setdiff1d(safe_rows, bad_date_rows, assume_unique=True)
    preferred = rng.permutation(rest[f_type[rest] != 0])
    fallback = rng.permutation(rest[f_type[rest] == 0])
    picked = np.concatenate([preferred, fallback])[: n_in_place - bad_date_rows.size]
    start = 0
    for kind in (k for k in in_place if k != "bad_date"):
        count = sizes.model_malformed[kind]
        malformed[picked[start : start + count]] = kind_code(MODEL_MALFORMED_KINDS, kind)
        start += count
    version_id_mask = malformed == kind_code(MODEL_MALFORMED_KINDS, "null_version_id")
    columns["modelVersionId"] = _nullable(loras.version_ids[f_version], version_id_mask, pa.int64())
    negative = malformed == kind_code(MODEL_MALFORMED_KINDS, "negative_size")
    columns["sizeKB"] = pa.array(np.where(negative, -np.abs(size_kb) - 1.0, size_kb))
    bad_date = malformed == kind_code(MODEL_MALFORMED_KINDS, "bad_date")
    bad_text = tx.take_strings(st.BAD_DATES, np.arange(n_rows) % len(st.BAD_DATES))
    columns["publishedAt"] = pc.if_else(pa.array(bad_date), bad_text, columns["publishedAt"])
    table = pa.table(columns, schema=MODELS.canonical_schema())

    # Exact duplicates of valid rows, placed right after their source.
    valid = np.flatnonzero((row_unsafe == NONE) & (malformed == NONE))
    n_dup = sizes.model_malformed["exact_duplicate"]
    sources = np.sort(rng.choice(valid, size=n_dup, replace=n_dup > valid.size))
    position = np.concatenate([np.arange(n_rows), sources])
    is_dup = np.concatenate([np.zeros(n_rows, bool), np.ones(n_dup, bool)])
    final = np.lexsort((is_dup, position))
    table = table.take(pa.array(position[final]))
    malformed = np.concatenate(
        [
            malformed,
            np.full(n_dup, kind_code(MODEL_MALFORMED_KINDS, "exact_duplicate"), dtype=np.int8),
        ]
    )[final]
    source_rows = position[final]
    truth = pa.table(
        {
            "row_index": pa.array(np.arange(source_rows.size, dtype=np.int64)),
            "modelVersionId": pa.array(loras.version_ids[f_version[source_rows]]),
            "fileId": pa.array(loras.file_ids[source_rows]),
            "primary": pa.array(f_type[source_rows] == 0),
            "unsafe_kind": _kind_names(row_unsafe[source_rows], MODEL_UNSAFE_KINDS),
            "malformed_kind": _kind_names(malformed, MODEL_MALFORMED_KINDS),
        }
    )
    return ModelsResult(table, truth)


# ---------------------------------------------------------------------------------------------
# Recipes (prompt + settings shared by all images that re-use them)


@dataclass
class RecipeSettings:
    """Generation settings per recipe, drawn once for the whole dataset."""

    sampler: np.ndarray  # index into SAMPLERS, -1 = null
    steps: np.ndarray
    cfg: np.ndarray  # index into CFG_SCALES
    clip_skip: np.ndarray  # 0 = null
    hires: np.ndarray  # bool
    hires_scale: np.ndarray
    hires_upscaler: np.ndarray
    denoise: np.ndarray
    width: np.ndarray
    height: np.ndarray
    negative: np.ndarray  # index into NEGATIVE_PROMPTS, -1 = null
    comfy: np.ndarray  # bool
    lora_weight: np.ndarray  # (recipes, 3) index into LORA_WEIGHTS
    browsing_level: np.ndarray  # 1 unless unsafe by browsing level
    toxic_phrase: np.ndarray  # index into TOXIC_PHRASES, -1 unless toxic
    prompt_digits: list[np.ndarray]  # one array per PROMPT_RADICES slot


def plan_recipe_settings(world: World, rng: np.random.Generator) -> RecipeSettings:
    """Settings, sizes and prompt digits for every recipe."""
    images, loras = world.images, world.loras
    n = images.recipe_user.size
    sampler_p = np.array([p for _, p in st.SAMPLERS])
    sampler = rng.choice(len(st.SAMPLERS), size=n, p=sampler_p / sampler_p.sum())
    sampler = np.where(rng.random(n) < 0.02, -1, sampler)
    hires = rng.random(n) < 0.25
    first_lora = images.recipe_loras[:, 0]
    base_index = loras.model_base[loras.version_model[first_lora]]
    sd1_base = np.array([b.startswith(st.SD1_FAMILY_PREFIXES) for b in loras.base_model_names])
    sd1 = sd1_base[base_index]
    size_choice = rng.integers(0, len(st.SD1_SIZES), size=n)
    sd1_sizes, sdxl_sizes = np.array(st.SD1_SIZES), np.array(st.SDXL_SIZES)
    wh = np.where(
        sd1[:, None], sd1_sizes[size_choice], sdxl_sizes[size_choice % len(st.SDXL_SIZES)]
    )
    unsafe_browsing = images.recipe_unsafe == kind_code(IMAGE_UNSAFE_KINDS, "browsing_level")
    levels = rng.choice(np.array([2, 4, 8, 16]), size=n, p=[0.2, 0.35, 0.3, 0.15])
    toxic = images.recipe_unsafe == kind_code(IMAGE_UNSAFE_KINDS, "toxic_prompt")
    if images.recipe_key.size and images.recipe_key.max() >= PROMPT_SPACE:
        raise ValueError("more recipes in one style than distinct prompts: enlarge vocabularies")
    scrambled = tx.scramble(images.recipe_key, PROMPT_SPACE, salt=3)
    # Different styles scramble differently (same digits → different prompts anyway).
    scrambled = (scrambled + images.recipe_style.astype(np.int64) * 104_729) % PROMPT_SPACE
    small = np.int8  # every index below is < 128
    return RecipeSettings(
        sampler=sampler.astype(small),
        steps=rng.integers(20, 41, size=n, dtype=small),
        cfg=rng.integers(0, len(st.CFG_SCALES), size=n, dtype=small),
        clip_skip=rng.choice(np.array([0, 1, 2], dtype=small), size=n, p=[0.3, 0.25, 0.45]),
        hires=hires,
        hires_scale=rng.integers(0, len(st.HIRES_SCALES), size=n, dtype=small),
        hires_upscaler=rng.integers(0, len(st.HIRES_UPSCALERS), size=n, dtype=small),
        denoise=rng.integers(0, len(st.DENOISING_STRENGTHS), size=n, dtype=small),
        width=wh[:, 0].astype(np.int16),
        height=wh[:, 1].astype(np.int16),
        negative=np.where(
            rng.random(n) < 0.85, rng.integers(0, len(st.NEGATIVE_PROMPTS), size=n), -1
        ).astype(small),
        comfy=rng.random(n) < 0.03,
        lora_weight=rng.integers(0, len(st.LORA_WEIGHTS), size=(n, 3), dtype=small),
        browsing_level=np.where(unsafe_browsing, levels, 1).astype(small),
        toxic_phrase=np.where(toxic, rng.integers(0, len(st.TOXIC_PHRASES), size=n), -1).astype(
            small
        ),
        prompt_digits=[
            d.astype(np.int16) for d in tx.mixed_radix_digits(scrambled, PROMPT_RADICES)
        ],
    )


def recipe_prompts(
    world: World, settings: RecipeSettings, names: LoraText, recipes: np.ndarray
) -> pa.Array:
    """Prompt text of the given recipes: a bijection of (style, key) plus LoRA tags.

    Layout: quality, trigger, subject (maybe weighted), adjective, setting, lighting,
    composition, detail[, toxic phrase], <lora:NAME:w>... No vocabulary entry contains ", ",
    so distinct recipes of any styles give distinct prompt strings.
    """
    images = world.images
    style = images.recipe_style[recipes].astype(np.int64)
    d = [digits[recipes] for digits in settings.prompt_digits]
    subject = tx.take_strings(_style_vocab("subjects", 20), style * 20 + d[2])
    weight = tx.take_strings(st.SUBJECT_WEIGHTS, d[1])
    parts: list[pa.Array] = [
        tx.take_strings(st.QUALITY_TAGS, d[0]),
        tx.take_strings([s.trigger_words[0] for s in st.STYLES], style),
        tx.wrap_weighted(subject, weight),
        tx.take_strings(_style_vocab("adjectives", 16), style * 16 + d[3]),
        tx.take_strings(_style_vocab("settings", 16), style * 16 + d[4]),
        tx.take_strings(_style_vocab("lighting", 12), style * 12 + d[5]),
        tx.take_strings(st.COMPOSITION, d[6]),
        tx.take_strings(st.DETAILS, d[7]),
        tx.take_strings(st.TOXIC_PHRASES, settings.toxic_phrase[recipes]),
    ]
    for slot in range(3):
        version = images.recipe_loras[recipes, slot]
        used = version >= 0
        stem = pc.take(names.version_stem, pa.array(np.where(used, version, 0)))
        tag = tx.join(
            [
                "<lora:",
                stem,
                ":",
                tx.take_strings(st.LORA_WEIGHTS, settings.lora_weight[recipes, slot]),
                ">",
            ]
        )
        parts.append(pc.if_else(pa.array(used), tag, pa.nulls(len(recipes), pa.string())))
    return tx.join(parts, ", ", skip_nulls=True)


# ---------------------------------------------------------------------------------------------
# Image shards


@dataclass
class ShardResult:
    table: pa.Table  # release `images` rows of the shard
    truth: pa.Table  # image_truth rows of the shard
    raw_usernames: pa.Table  # raw_usernames rows of the shard


def audience_weight(world: World) -> np.ndarray:
    """How much the user base likes each style, relative to the average style."""
    audience = world.users.taste.sum(axis=0)
    return audience / audience.mean()


# Exposure: what makes an image collect reactions besides its quality and style. An uploader's
# reach (followers) multiplies every image of theirs; an image keeps collecting reactions for
# weeks after it is posted, so the newest images of the snapshot have had less time.
FAME_SIGMA = 0.7  # log-normal spread of uploader reach
EXPOSURE_TAU_DAYS = 30.0  # an image has collected 1 - exp(-age / tau) of its reactions


def user_fame(world: World) -> np.ndarray:
    """Per user, the reach that multiplies the reactions of their images: exp(FAME_SIGMA z),
    z standard normal drawn from the user's hash (no RNG stream is consumed, so the rest of
    the world does not move when this changes)."""
    words = np.array([int(h[:16], 16) for h in world.users.hashes], dtype=np.uint64)
    u1 = ((words >> np.uint64(32)).astype(np.float64) + 0.5) / 2.0**32
    u2 = ((words & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) / 2.0**32
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller
    return np.exp(FAME_SIGMA * z)


def image_exposure(created: np.ndarray) -> np.ndarray:
    """The share of its reactions an image created at ``created`` (epoch seconds) has
    collected by the snapshot (EPOCH_END): 1 - exp(-age_days / EXPOSURE_TAU_DAYS)."""
    age_days = np.maximum(EPOCH_END - created.astype(np.float64), 0.0) / 86400.0
    return 1.0 - np.exp(-age_days / EXPOSURE_TAU_DAYS)


def build_image_shard(
    world: World,
    settings: RecipeSettings,
    names: LoraText,
    row_start: int,
    row_stop: int,
    file_name: str,
    rng: np.random.Generator,
) -> ShardResult:
    """Release rows [row_start, row_stop) (image-aligned) and their truth rows."""
    images, users, loras = world.images, world.users, world.loras
    row_image = images.row_image[row_start:row_stop]
    row_slot = images.row_slot[row_start:row_stop]
    row_malformed = images.row_malformed[row_start:row_stop]
    n_rows = row_image.size
    first_image, stop_image = int(row_image[0]), int(row_image[-1]) + 1
    n_images = stop_image - first_image
    local = row_image - first_image
    image_recipe = images.image_recipe[first_image:stop_image]
    recipes, recipe_of_image = np.unique(image_recipe, return_inverse=True)

    # Per image.
    quality = rng.standard_normal(n_images)
    image_user = images.image_user[first_image:stop_image]
    style = images.recipe_style[image_recipe]
    audience = audience_weight(world)[style]
    rates = {
        "likeCount": 4.0,
        "heartCount": 1.5,
        "laughCount": 0.1,
        "cryCount": 0.05,
        "dislikeCount": 0.05,
        "commentCount": 0.4,
    }
    fame = user_fame(world)[image_user]
    exposure = image_exposure(images.image_created[first_image:stop_image])
    appeal = np.exp(0.8 * quality) * audience * fame * exposure
    dislike = np.exp(-0.5 * quality) * fame * exposure
    reactions = {
        name: rng.poisson(rate * (appeal if name != "dislikeCount" else dislike))
        for name, rate in rates.items()
    }
    seed_value = rng.integers(0, 2**32, size=n_images, dtype=np.int64)
    seed_null = rng.random(n_images) < 0.01
    width = settings.width[image_recipe]
    uuid = tx.uuid4_strings(rng.integers(0, 256, size=(n_images, 16), dtype=np.uint8))
    image_ids = images.image_ids[first_image:stop_image]
    url = tx.join(
        [
            IMAGE_URL_PREFIX,
            uuid,
            "/width=",
            tx.int_strings(width),
            "/",
            tx.int_strings(image_ids),
            ".jpeg",
        ]
    )
    palette = np.array([s.palette for s in st.STYLES])  # (styles, colours, 3)
    colour = palette[style, rng.integers(0, palette.shape[1], size=n_images)]
    colour = np.clip(colour + rng.integers(-12, 13, size=colour.shape), 0, 255)
    blur = tx.blurhash_like(colour, rng)
    created = tx.timestamp_strings(images.image_created[first_image:stop_image])
    post_ids = 500_000 + tx.scramble(image_recipe, 90_000_000, salt=5)
    browsing = settings.browsing_level[image_recipe]
    prompt_by_recipe = recipe_prompts(world, settings, names, recipes)
    steps_text = tx.int_strings(settings.steps[image_recipe])
    # A small ComfyUI-style workflow for the few images made with ComfyUI (same settings).
    image_sampler = np.maximum(settings.sampler[image_recipe], 0)
    comfy_text = tx.join(
        [
            '{"prompt": {"3": {"class_type": "KSampler", "inputs": {"seed": ',
            tx.int_strings(seed_value),
            ', "steps": ',
            steps_text,
            ', "cfg": ',
            pc.cast(pa.array(np.array(st.CFG_SCALES)[settings.cfg[image_recipe]]), pa.string()),
            ', "sampler_name": "',
            tx.take_strings([name for name, _ in st.COMFY_SAMPLERS], image_sampler),
            '", "scheduler": "',
            tx.take_strings([sched for _, sched in st.COMFY_SAMPLERS], image_sampler),
            '", "denoise": 1.0}}}}',
        ]
    )

    # Per row (take from per-image / per-recipe arrays).
    take_image = pa.array(local)
    row_recipe = image_recipe[local]
    version = images.recipe_loras[row_recipe, row_slot]
    recipe_settings_of_row = row_recipe
    sampler = settings.sampler[recipe_settings_of_row]
    clip = settings.clip_skip[recipe_settings_of_row]
    hires = settings.hires[recipe_settings_of_row]
    negative = settings.negative[recipe_settings_of_row]
    comfy = settings.comfy[recipe_settings_of_row]
    hash_of_user = pa.array(users.hashes, type=pa.string())
    row_user = image_user[local]
    columns: dict[str, pa.Array] = {
        "imageId": pa.array(image_ids[local]),
        "modelVersionId": pa.array(loras.version_ids[version]),
        "postId": pa.array(post_ids[local]),
        "url": pc.take(url, take_image),
        "hash": pc.take(blur, take_image),
        "nsfw": pa.array((browsing[local] >= 4).astype(np.int64)),
        "browsingLevel": pa.array(browsing[local].astype(np.int64)),
        "type": pa.array(["image"] * n_rows, type=pa.string()),
        "height": pa.array(settings.height[row_recipe].astype(np.int64)),
        "width": pa.array(width[local].astype(np.int64)),
        "seed": _nullable(seed_value[local], seed_null[local], pa.int64()),
        "steps": pa.array(settings.steps[row_recipe].astype(np.int64)),
        "prompt": pc.take(prompt_by_recipe, pa.array(recipe_of_image[local])),
        "negativePrompt": tx.take_strings(st.NEGATIVE_PROMPTS, negative),
        "sampler": tx.take_strings([name for name, _ in st.SAMPLERS], sampler),
        "cfgScale": pa.array(np.array(st.CFG_SCALES)[settings.cfg[row_recipe]]),
        "clipSkip": _nullable(clip.astype(np.int64), clip == 0, pa.int64()),
        "hiresUpscale": _nullable(
            np.array(st.HIRES_SCALES)[settings.hires_scale[row_recipe]], ~hires, pa.float64()
        ),
        "hiresUpscaler": tx.take_strings(
            st.HIRES_UPSCALERS, np.where(hires, settings.hires_upscaler[row_recipe], -1)
        ),
        "denoisingStrength": _nullable(
            np.array(st.DENOISING_STRENGTHS)[settings.denoise[row_recipe]], ~hires, pa.float64()
        ),
        "createdAt": pc.take(created, take_image),
        "comfy": pc.if_else(
            pa.array(comfy), pc.take(comfy_text, take_image), pa.nulls(n_rows, pa.string())
        ),
        **{name: pa.array(values[local].astype(np.int64)) for name, values in reactions.items()},
        "userHash": pc.take(hash_of_user, pa.array(row_user)),
    }

    # Planted defects (one per row).
    def is_kind(name: str) -> np.ndarray:
        return row_malformed == kind_code(IMAGE_MALFORMED_KINDS, name)

    null_id = is_kind("null_id")
    columns["imageId"] = _nullable(image_ids[local], null_id, pa.int64())
    bad_size = is_kind("bad_size")
    which = rng.random(n_rows) < 0.5
    zero_or_negative = np.where(rng.random(n_rows) < 0.5, 0, -1)
    width_values = np.where(bad_size & which, zero_or_negative * width[local], width[local]).astype(
        np.int64
    )
    height_values = np.where(
        bad_size & ~which,
        zero_or_negative * settings.height[row_recipe],
        settings.height[row_recipe],
    ).astype(np.int64)
    columns["width"], columns["height"] = pa.array(width_values), pa.array(height_values)
    bad_date = is_kind("bad_date")
    if bad_date.any():
        bad_text = tx.take_strings(st.BAD_DATES, rng.integers(0, len(st.BAD_DATES), n_rows))
        columns["createdAt"] = pc.if_else(pa.array(bad_date), bad_text, columns["createdAt"])
    long_prompt = is_kind("long_prompt")
    if long_prompt.any():
        long_rows = np.flatnonzero(long_prompt)
        filler = pa.array([st.LONG_PROMPT_FILLER] * long_rows.size, type=pa.string())
        repeats = 20_001 // len(st.LONG_PROMPT_FILLER) + 1 + rng.integers(0, 40, long_rows.size)
        padded = tx.join(
            [
                pc.take(columns["prompt"], pa.array(long_rows)),
                ", ",
                pc.binary_repeat(filler, pa.array(repeats)),
            ]
        )
        source = np.arange(n_rows)
        source[long_rows] = n_rows + np.arange(long_rows.size)
        columns["prompt"] = pc.take(pa.concat_arrays([columns["prompt"], padded]), pa.array(source))
    raw_username = is_kind("raw_username")
    name_of_user = pa.array(users.usernames, type=pa.string())
    if raw_username.any():
        raw = pc.take(name_of_user, pa.array(row_user))
        columns["userHash"] = pc.if_else(pa.array(raw_username), raw, columns["userHash"])
    table = pa.table(columns, schema=IMAGES.canonical_schema())

    global_rows = np.arange(row_start, row_stop, dtype=np.int64)
    duplicate_of = images.row_duplicate_of[row_start:row_stop]
    truth = pa.table(
        {
            "row_index": pa.array(global_rows),
            "file": pa.array([file_name] * n_rows, type=pa.string()),
            "file_row": pa.array(np.arange(n_rows, dtype=np.int64)),
            "imageId": pa.array(image_ids[local]),
            "modelVersionId": pa.array(loras.version_ids[version]),
            "userHash": pc.take(hash_of_user, pa.array(row_user)),
            "style": tx.take_strings(st.STYLE_NAMES, style[local]),
            "style_id": pa.array(style[local].astype(np.int64)),
            "recipe_id": pa.array(row_recipe.astype(np.int64)),
            "quality": pa.array(quality[local]),
            "fame": pa.array(fame[local]),
            "exposure": pa.array(exposure[local]),
            "unsafe_kind": _kind_names(images.recipe_unsafe[row_recipe], IMAGE_UNSAFE_KINDS),
            "malformed_kind": _kind_names(row_malformed, IMAGE_MALFORMED_KINDS),
            "duplicate_of_row": _nullable(duplicate_of, duplicate_of < 0, pa.int64()),
        }
    )
    raw_rows = np.flatnonzero(raw_username)
    raw_table = pa.table(
        {
            "row_index": pa.array(global_rows[raw_rows]),
            "file": pa.array([file_name] * raw_rows.size, type=pa.string()),
            "file_row": pa.array(raw_rows.astype(np.int64)),
            "imageId": pa.array(image_ids[local[raw_rows]]),
            "raw_username": pc.take(name_of_user, pa.array(row_user[raw_rows])),
            "userHash": pc.take(hash_of_user, pa.array(row_user[raw_rows])),
        }
    )
    return ShardResult(table, truth, raw_table)


# ---------------------------------------------------------------------------------------------
# Small truth tables


def styles_truth() -> pa.Table:
    """truth/styles.parquet: one row per style with its vocabulary and palette."""
    return pa.table(
        {
            "style_id": pa.array(np.arange(N_STYLES, dtype=np.int64)),
            "style": pa.array(list(st.STYLE_NAMES), type=pa.string()),
            "label": pa.array([s.label for s in st.STYLES], type=pa.string()),
            "trigger_words": pa.array([list(s.trigger_words) for s in st.STYLES]),
            "subjects": pa.array([list(s.subjects) for s in st.STYLES]),
            "adjectives": pa.array([list(s.adjectives) for s in st.STYLES]),
            "settings": pa.array([list(s.settings) for s in st.STYLES]),
            "lighting": pa.array([list(s.lighting) for s in st.STYLES]),
            "tags": pa.array([list(s.tags) for s in st.STYLES]),
            "base_models": pa.array([[b for b, _ in s.base_models] for s in st.STYLES]),
            "base_model_weights": pa.array([[w for _, w in s.base_models] for s in st.STYLES]),
            "palette": pa.array(
                [[list(c) for c in s.palette] for s in st.STYLES],
                type=pa.list_(pa.list_(pa.int64())),
            ),
        }
    )


def user_tastes_truth(world: World) -> pa.Table:
    """truth/user_tastes.parquet: one row per user (taste as a list in style order)."""
    users = world.users
    n_images = np.bincount(world.images.image_user, minlength=users.count)
    top = users.taste.argmax(axis=1)
    taste = pa.FixedSizeListArray.from_arrays(pa.array(users.taste.ravel()), N_STYLES)
    return pa.table(
        {
            "userHash": pa.array(users.hashes, type=pa.string()),
            "taste": taste.cast(pa.list_(pa.float64())),
            "top_style": tx.take_strings(st.STYLE_NAMES, top),
            "top_style_id": pa.array(top.astype(np.int64)),
            "activity": pa.array(users.activity),
            "planned_images": pa.array(n_images.astype(np.int64)),
            "is_uploader": pa.array(users.is_uploader),
            "fame": pa.array(user_fame(world)),
        }
    )


def lora_styles_truth(world: World, names: LoraText) -> pa.Table:
    """truth/lora_styles.parquet: one row per LoRA version with its style mix."""
    loras, users = world.loras, world.users
    style = loras.version_style
    popularity = loras.version_popularity
    mix = pa.FixedSizeListArray.from_arrays(pa.array(loras.version_style_mix.ravel()), N_STYLES)
    return pa.table(
        {
            "modelVersionId": pa.array(loras.version_ids),
            "modelId": pa.array(loras.model_ids[loras.version_model]),
            "lora_name": names.version_stem,
            "main_style": tx.take_strings(st.STYLE_NAMES, style),
            "main_style_id": pa.array(style.astype(np.int64)),
            "style_mix": mix.cast(pa.list_(pa.float64())),
            "popularity": pa.array(
                popularity / popularity.sum() if popularity.sum() else popularity
            ),
            "is_unsafe": pa.array(loras.version_unsafe != NONE),
            "unsafe_kind": _kind_names(loras.version_unsafe, MODEL_UNSAFE_KINDS),
            "baseModel": tx.take_strings(
                loras.base_model_names, loras.model_base[loras.version_model]
            ),
            "uploader_userHash": pc.take(
                pa.array(users.hashes, type=pa.string()), pa.array(loras.version_uploader)
            ),
        }
    )
