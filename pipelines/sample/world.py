"""The planted world of the sample: users, LoRAs, prompt recipes, images and release rows.

Everything here is integer/float numpy arrays (no strings except usernames), planned once for
the whole dataset, vectorised, and small enough at full ImageGem scale (~5.7M rows: a few
hundred MB). `tables.py` turns slices of this plan into Arrow tables.

Vocabulary used in names below:
- *version* = one LoRA model version (modelVersionId); *model* = its modelId (1-3 versions);
- *file row* = one row of the release `models` table (a version's primary or extra file);
- *recipe* = one distinct prompt with its generation settings and LoRAs; users re-run a recipe
  with new seeds, so several images share it;
- *image* = one imageId; *row* = one release `images` row (image x LoRA used).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from pipelines.sample import styles as st
from pipelines.sample.text import scramble
from warehouse.paper import PAPER_RATIOS, PAPER_TABLE1

# Published ImageGem totals (paper Table 1) and the ratios the sample reproduces.
PUBLISHED_USERS = PAPER_TABLE1["raw"]["users"]
PUBLISHED_UPLOADERS = PAPER_TABLE1["raw"]["uploaders"]
PUBLISHED_MODEL_ROWS = PAPER_TABLE1["raw"]["loras"]
PUBLISHED_IMAGE_ROWS = PAPER_TABLE1["raw"]["images"]
TARGET_UNIQUE_PROMPTS_PER_ROW = PAPER_RATIOS["unique_prompts_per_image"]
TARGET_UNIQUE_TAGS_PER_LORA = PAPER_RATIOS["unique_tags_per_lora"]
UNSAFE_LORA_SHARE = (
    PAPER_TABLE1["raw"]["loras"] - PAPER_TABLE1["filtered"]["loras"]
) / PAPER_TABLE1["raw"]["loras"]  # ~0.32 %

EXTRA_FILE_SHARE = 0.10  # share of versions that also carry a non-primary file
PURE_UPLOADER_SHARE = 0.10  # uploaders who never post images
LORAS_PER_IMAGE_P = (0.7, 0.2, 0.1)  # P(1, 2, 3 LoRAs on one image)
TOXIC_SHARE_OF_UNSAFE = 0.2  # unsafe image rows that keep browsingLevel 1 but a toxic prompt
TASTE_CONCENTRATION = 1.2  # total Dirichlet concentration of user tastes (small → peaked)
TASTE_FLOOR = 0.002  # every style keeps a tiny probability for every user
ACTIVITY_SIGMA = 1.3  # lognormal sigma of user activity
POPULARITY_SIGMA = 1.8  # lognormal sigma of LoRA popularity (heavy tail)

EPOCH_START = 1_672_531_200  # 2023-01-01 00:00:00 UTC
EPOCH_END = 1_719_791_999  # 2024-06-30 23:59:59 UTC

IMAGE_MALFORMED_KINDS: tuple[str, ...] = (
    "null_id",
    "bad_size",
    "bad_date",
    "exact_duplicate",
    "long_prompt",
    "raw_username",
)
MODEL_MALFORMED_KINDS: tuple[str, ...] = (
    "null_version_id",
    "negative_size",
    "bad_date",
    "exact_duplicate",
)
IMAGE_UNSAFE_KINDS: tuple[str, ...] = ("browsing_level", "toxic_prompt")
MODEL_UNSAFE_KINDS: tuple[str, ...] = ("blocked", "toxic_name")
FILE_TYPES: tuple[str, ...] = ("Model", "Pruned Model", "Training Data")

# Kind codes stored in the plan: 0 = none, i + 1 = KINDS[i].
NONE = 0


def kind_code(kinds: tuple[str, ...], name: str) -> int:
    """The plan's integer code of a named kind (0 is reserved for 'none')."""
    return kinds.index(name) + 1


@dataclass(frozen=True)
class WorldSizes:
    """Every count the plan must hit exactly, derived from a spec."""

    users: int
    uploaders: int
    image_rows: int  # raw rows written, including duplicates and defects
    model_rows: int  # raw rows written, including duplicates and defects
    versions: int  # LoRA model versions (distinct modelVersionId)
    extra_files: int  # non-primary file rows
    unsafe_image_rows: int
    image_malformed: dict[str, int]  # rows per malformed kind
    model_malformed: dict[str, int]

    @property
    def image_base_rows(self) -> int:
        """Image rows before the planted exact duplicates are added."""
        return self.image_rows - self.image_malformed["exact_duplicate"]

    @property
    def model_base_rows(self) -> int:
        return self.model_rows - self.model_malformed["exact_duplicate"]


def derive_sizes(
    users: int, model_rows: int, image_rows: int, unsafe_share: float, malformed_share: float
) -> WorldSizes:
    """Split the requested totals into the counts of each planted population.

    Raises ValueError when the totals cannot hold one safe image per user or one file per
    uploader.
    """
    uploaders = max(1, round(users * PUBLISHED_UPLOADERS / PUBLISHED_USERS))
    n_image_malformed = round(malformed_share * image_rows)
    per_kind, extra = divmod(n_image_malformed, len(IMAGE_MALFORMED_KINDS))
    image_malformed = {
        kind: per_kind + (1 if i < extra else 0) for i, kind in enumerate(IMAGE_MALFORMED_KINDS)
    }
    # A few malformed model rows: ~0.05 % of rows per kind at the default share, at least two
    # per kind in samples of 100+ rows, one in very small samples, none below 20 rows.
    model_per_kind = round(model_rows * malformed_share / 40)
    if malformed_share > 0:
        model_per_kind = max(model_per_kind, 2 if model_rows >= 100 else int(model_rows >= 20))
    model_malformed = dict.fromkeys(MODEL_MALFORMED_KINDS, model_per_kind)
    model_base_rows = model_rows - model_per_kind
    versions = max(1, round(model_base_rows / (1 + EXTRA_FILE_SHARE)))
    extra_files = model_base_rows - versions
    uploaders = min(uploaders, versions)
    unsafe_rows = round(unsafe_share * image_rows)
    sizes = WorldSizes(
        users=users,
        uploaders=uploaders,
        image_rows=image_rows,
        model_rows=model_rows,
        versions=versions,
        extra_files=extra_files,
        unsafe_image_rows=unsafe_rows,
        image_malformed=image_malformed,
        model_malformed=model_malformed,
    )
    # Every image-making user needs one safe, well-formed image row of their own.
    spare_rows = (
        sizes.image_base_rows
        - unsafe_rows
        - (n_image_malformed - image_malformed["exact_duplicate"])
    )
    if spare_rows < users:
        raise ValueError(
            f"images={image_rows} is too small for users={users}: after "
            f"{unsafe_rows} unsafe and {n_image_malformed} malformed rows each user still needs "
            "one safe image row; raise images or lower unsafe_share / malformed_share"
        )
    if extra_files < 0 or model_base_rows < 1:
        raise ValueError(f"loras={model_rows} is too small to hold the planted malformed rows")
    if extra_files > versions:
        raise ValueError("internal: more extra files than versions")
    model_row_defects = sum(model_malformed.values()) - model_per_kind
    if model_per_kind and model_row_defects >= model_base_rows:
        raise ValueError(f"loras={model_rows} is too small to hold the planted malformed rows")
    return sizes


# ---------------------------------------------------------------------------------------------
# Users


@dataclass
class Users:
    """All users: internal usernames, hashes, tastes, activity and roles."""

    usernames: list[str]
    hashes: list[str]  # sha256(username), 64 lowercase hex
    taste: np.ndarray  # (users, styles) float64, rows sum to 1
    activity: np.ndarray  # (users,) float64 relative image-making rate, sums to 1
    is_uploader: np.ndarray  # (users,) bool
    makes_images: np.ndarray  # (users,) bool

    @property
    def count(self) -> int:
        return len(self.usernames)


def usernames_for(n_users: int, salt: int) -> list[str]:
    """n distinct plausible usernames "<adjective>_<noun>_<number>" (deterministic in salt)."""
    n_adj, n_noun = len(st.USERNAME_ADJECTIVES), len(st.USERNAME_NOUNS)
    per_number = n_adj * n_noun
    modulus = per_number * max(100, -(-n_users // per_number))
    keys = scramble(np.arange(n_users, dtype=np.int64), modulus, salt)
    adj, noun, number = keys % n_adj, (keys // n_adj) % n_noun, keys // per_number
    return [
        f"{st.USERNAME_ADJECTIVES[a]}_{st.USERNAME_NOUNS[b]}_{c}"
        for a, b, c in zip(adj.tolist(), noun.tolist(), number.tolist(), strict=True)
    ]


def plan_users(sizes: WorldSizes, rng: np.random.Generator, salt: int) -> Users:
    """Tastes (sparse Dirichlet over styles), lognormal activity, uploader roles."""
    n_users = sizes.users
    prevalence = np.array([s.prevalence for s in st.STYLES], dtype=np.float64)
    alpha = TASTE_CONCENTRATION * prevalence / prevalence.sum()
    taste = rng.dirichlet(alpha, size=n_users)
    taste = np.nan_to_num(taste, nan=0.0) + TASTE_FLOOR
    taste /= taste.sum(axis=1, keepdims=True)
    activity = rng.lognormal(0.0, ACTIVITY_SIGMA, size=n_users)
    uploader_weight = np.sqrt(activity)
    uploader_ids = rng.choice(
        n_users, size=sizes.uploaders, replace=False, p=uploader_weight / uploader_weight.sum()
    )
    is_uploader = np.zeros(n_users, dtype=bool)
    is_uploader[uploader_ids] = True
    makes_images = np.ones(n_users, dtype=bool)
    n_pure = int(PURE_UPLOADER_SHARE * sizes.uploaders)
    if n_pure and n_pure < n_users:
        makes_images[rng.choice(uploader_ids, size=n_pure, replace=False)] = False
    activity = np.where(makes_images, activity, 0.0)
    activity /= activity.sum()
    usernames = usernames_for(n_users, salt)
    hashes = [hashlib.sha256(name.encode()).hexdigest() for name in usernames]
    return Users(usernames, hashes, taste, activity, is_uploader, makes_images)


# ---------------------------------------------------------------------------------------------
# Categorical sampling helpers (vectorised)


def sample_rows_categorical(
    probs: np.ndarray, row_of_query: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each query q draw a column of `probs[row_of_query[q]]` (rows sum to 1)."""
    n_rows, n_cols = probs.shape
    cumulative = np.cumsum(probs, axis=1)
    cumulative /= cumulative[:, -1:]
    cumulative[:, -1] = 1.0
    flat = (cumulative + np.arange(n_rows, dtype=np.float64)[:, None]).ravel()
    u = rng.random(row_of_query.shape[0]) * (1.0 - 1e-9)
    position = np.searchsorted(flat, row_of_query + u, side="right")
    return np.minimum(position - row_of_query.astype(np.int64) * n_cols, n_cols - 1)


@dataclass
class GroupedSampler:
    """Weighted draws of an item within a group (here: a LoRA within a style).

    Groups with no positive weight fall back to the whole population.
    """

    items_by_group: np.ndarray  # item ids sorted by group
    offsets: np.ndarray  # (groups + 1,) segment bounds in items_by_group
    flat_cumulative: np.ndarray  # group + normalised cumulative weight, per sorted item
    global_items: np.ndarray
    global_cumulative: np.ndarray
    group_sizes: np.ndarray  # positive-weight items per group

    @classmethod
    def build(cls, group_of_item: np.ndarray, weight: np.ndarray, n_groups: int) -> GroupedSampler:
        order = np.lexsort((np.arange(group_of_item.size), group_of_item))
        positive = weight[order] > 0
        order = order[positive]
        groups = group_of_item[order]
        weights = weight[order].astype(np.float64)
        offsets = np.searchsorted(groups, np.arange(n_groups + 1), side="left")
        flat = np.empty(order.size, dtype=np.float64)
        for g in range(n_groups):
            lo, hi = offsets[g], offsets[g + 1]
            if hi > lo:
                c = np.cumsum(weights[lo:hi])
                c /= c[-1]
                c[-1] = 1.0
                flat[lo:hi] = g + c
        global_cum = np.cumsum(weights)
        global_cum /= global_cum[-1]
        global_cum[-1] = 1.0
        return cls(order, offsets, flat, order, global_cum, np.diff(offsets))

    def draw(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One weighted item per entry of `groups`."""
        u = rng.random(groups.shape[0]) * (1.0 - 1e-9)
        out = np.empty(groups.shape[0], dtype=np.int64)
        has_items = self.group_sizes[groups] > 0
        pos = np.searchsorted(self.flat_cumulative, groups[has_items] + u[has_items], side="right")
        pos = np.minimum(pos, self.offsets[groups[has_items] + 1] - 1)
        out[has_items] = self.items_by_group[pos]
        if not has_items.all():
            gpos = np.searchsorted(self.global_cumulative, u[~has_items], side="right")
            out[~has_items] = self.global_items[np.minimum(gpos, self.global_items.size - 1)]
        return out

    def capacity(self, groups: np.ndarray) -> np.ndarray:
        """How many distinct items a draw in each group can return."""
        sizes = self.group_sizes[groups]
        return np.where(sizes > 0, sizes, self.global_items.size)


# ---------------------------------------------------------------------------------------------
# LoRAs


@dataclass
class Loras:
    """LoRA models, their versions and their file rows (the release `models` rows)."""

    # per model
    model_uploader: np.ndarray  # (models,) user index
    model_style: np.ndarray  # (models,) style index
    model_name_key: np.ndarray  # (models,) rank of the model within its style (name key)
    model_base: np.ndarray  # (models,) index into base_model_names
    model_unsafe: np.ndarray  # (models,) unsafe kind code (MODEL_UNSAFE_KINDS)
    model_ids: np.ndarray  # (models,) modelId
    # per version (sorted by publish time == modelVersionId order)
    version_model: np.ndarray  # (versions,) model index
    version_number: np.ndarray  # (versions,) 1-based version number within its model
    version_ids: np.ndarray  # (versions,) modelVersionId
    version_published: np.ndarray  # (versions,) epoch seconds
    version_popularity: np.ndarray  # (versions,) relative image share weight (0 if unsafe)
    version_style_mix: np.ndarray  # (versions, styles) float64, mostly the main style
    version_format: np.ndarray  # (versions,) 0 SafeTensor .safetensors, 1 .pt, 2 .ckpt
    # per file row (before malformed rows/duplicates are applied)
    file_version: np.ndarray  # (file rows,) version index
    file_type: np.ndarray  # (file rows,) index into FILE_TYPES (0 = primary Model)
    file_ids: np.ndarray  # (file rows,) fileId
    base_model_names: list[str] = field(default_factory=list)

    @property
    def version_style(self) -> np.ndarray:
        return self.model_style[self.version_model]

    @property
    def version_uploader(self) -> np.ndarray:
        return self.model_uploader[self.version_model]

    @property
    def version_unsafe(self) -> np.ndarray:
        return self.model_unsafe[self.version_model]


def _run_position(is_start: np.ndarray) -> np.ndarray:
    """Position of each element within its run (runs begin where is_start is True)."""
    index = np.arange(is_start.size)
    run_start = np.maximum.accumulate(np.where(is_start, index, 0))
    return index - run_start


def plan_loras(sizes: WorldSizes, users: Users, rng: np.random.Generator) -> Loras:
    """Uploaders publish models of 1-3 versions in a style drawn from their taste."""
    n_styles = len(st.STYLES)
    uploader_ids = np.flatnonzero(users.is_uploader)
    n_up, n_versions = uploader_ids.size, sizes.versions
    # Versions per uploader: heavy-tailed, at least one each.
    weight = rng.lognormal(0.0, 1.2, size=n_up)
    per_uploader = 1 + rng.multinomial(n_versions - n_up, weight / weight.sum())
    version_uploader = np.repeat(uploader_ids, per_uploader)
    # Group consecutive versions of an uploader into models of 1-3 versions.
    new_model = rng.random(n_versions) < 0.62
    new_model[np.r_[0, np.cumsum(per_uploader)[:-1]]] = True
    position = _run_position(new_model)
    new_model |= (position > 0) & (position % 3 == 0)  # split runs longer than 3
    model_of_version = np.cumsum(new_model) - 1
    n_models = int(model_of_version[-1]) + 1
    version_number = _run_position(new_model) + 1
    model_uploader = version_uploader[new_model]
    model_style = sample_rows_categorical(users.taste, model_uploader, rng)

    # Unsafe models: single-version models of uploaders who also post images.
    n_unsafe = round(UNSAFE_LORA_SHARE * n_versions)
    versions_per_model = np.bincount(model_of_version, minlength=n_models)
    eligible = np.flatnonzero((versions_per_model == 1) & users.makes_images[model_uploader])
    n_unsafe = min(n_unsafe, eligible.size, max(0, n_models - n_styles))
    model_unsafe = np.zeros(n_models, dtype=np.int8)
    unsafe_models = rng.choice(eligible, size=n_unsafe, replace=False)
    n_toxic_name = n_unsafe // 3
    model_unsafe[unsafe_models[:n_toxic_name]] = kind_code(MODEL_UNSAFE_KINDS, "toxic_name")
    model_unsafe[unsafe_models[n_toxic_name:]] = kind_code(MODEL_UNSAFE_KINDS, "blocked")

    # Every style keeps at least one safe model when there are enough models.
    for style in range(n_styles):
        safe_counts = np.bincount(model_style[model_unsafe == NONE], minlength=n_styles)
        if safe_counts[style] == 0 and safe_counts.max() >= 2:
            donors = np.flatnonzero((model_style == safe_counts.argmax()) & (model_unsafe == NONE))
            model_style[rng.choice(donors)] = style

    # Name key: rank of the model within its style (names are unique per style).
    model_name_key = np.empty(n_models, dtype=np.int64)
    by_style = np.lexsort((np.arange(n_models), model_style))
    starts = np.searchsorted(model_style[by_style], np.arange(n_styles))
    model_name_key[by_style] = np.arange(n_models) - starts[model_style[by_style]]

    # Base model: the style's preferred mix, with a small share of rare base models.
    base_names: list[str] = []
    for style in st.STYLES:
        for name, _ in style.base_models:
            if name not in base_names:
                base_names.append(name)
    base_names += [n for n in st.RARE_BASE_MODELS if n not in base_names]
    base_probs = np.zeros((n_styles, len(base_names)))
    for s_index, style in enumerate(st.STYLES):
        for name, w in style.base_models:
            base_probs[s_index, base_names.index(name)] = w
    model_base = sample_rows_categorical(base_probs, model_style, rng)
    rare = rng.random(n_models) < st.RARE_BASE_MODEL_SHARE
    rare_start = len(base_names) - len(st.RARE_BASE_MODELS)
    model_base[rare] = rng.integers(rare_start, len(base_names), size=int(rare.sum()))

    # Publication times: a model's versions follow each other by ~40 days.
    first = rng.integers(EPOCH_START, EPOCH_END - 60 * 86400, size=n_models)
    gaps = rng.exponential(40 * 86400, size=n_versions).astype(np.int64)
    gaps[new_model] = 0
    # cumulative gap within each model
    cum = np.cumsum(gaps)
    cum -= np.maximum.accumulate(np.where(new_model, cum, 0))
    published = np.minimum(first[model_of_version] + cum, EPOCH_END)

    # Order versions by time: modelVersionId increases with publication; modelId likewise.
    order = np.lexsort((np.arange(n_versions), published))
    version_model = model_of_version[order]
    version_number = version_number[order]
    version_published = published[order]
    model_first_rank = np.full(n_models, n_versions, dtype=np.int64)
    np.minimum.at(model_first_rank, version_model, np.arange(n_versions))
    model_order = np.argsort(model_first_rank, kind="stable")
    model_ids = np.empty(n_models, dtype=np.int64)
    model_ids[model_order] = 4_000 + np.cumsum(rng.integers(1, 12, size=n_models))
    version_ids = 9_000 + np.cumsum(rng.integers(1, 15, size=n_versions)).astype(np.int64)

    popularity = rng.lognormal(0.0, POPULARITY_SIGMA, size=n_versions)
    popularity[model_unsafe[version_model] != NONE] = 0.0
    main_style = model_style[version_model]
    main_weight = rng.uniform(0.7, 0.95, size=n_versions)
    rest = rng.dirichlet(np.ones(n_styles), size=n_versions)
    rest[np.arange(n_versions), main_style] = 0.0
    rest /= rest.sum(axis=1, keepdims=True)
    style_mix = rest * (1.0 - main_weight)[:, None]
    style_mix[np.arange(n_versions), main_style] = main_weight
    fmt = np.where(rng.random(n_versions) < 0.08, rng.integers(1, 3, size=n_versions), 0)

    # File rows: every version's primary file, plus extra files on a subset of versions.
    extra_versions = np.sort(
        rng.choice(n_versions, size=sizes.extra_files, replace=sizes.extra_files > n_versions)
    )
    extra_type = np.where(rng.random(sizes.extra_files) < 0.6, 2, 1)
    file_version = np.concatenate([np.arange(n_versions), extra_versions])
    file_type = np.concatenate([np.zeros(n_versions, dtype=np.int64), extra_type])
    file_order = np.lexsort((file_type, file_version))
    file_version, file_type = file_version[file_order], file_type[file_order]
    file_ids = 20_000 + np.cumsum(rng.integers(1, 9, size=file_version.size)).astype(np.int64)

    return Loras(
        model_uploader=model_uploader,
        model_style=model_style,
        model_name_key=model_name_key,
        model_base=model_base,
        model_unsafe=model_unsafe,
        model_ids=model_ids,
        version_model=version_model,
        version_number=version_number,
        version_ids=version_ids,
        version_published=version_published,
        version_popularity=popularity,
        version_style_mix=style_mix,
        version_format=fmt,
        file_version=file_version,
        file_type=file_type,
        file_ids=file_ids,
        base_model_names=base_names,
    )


# ---------------------------------------------------------------------------------------------
# Recipes, images and rows


@dataclass
class Images:
    """Prompt recipes, images (time-ordered) and release rows with their planted defects."""

    # per recipe
    recipe_user: np.ndarray
    recipe_style: np.ndarray
    recipe_key: np.ndarray  # rank of the recipe within its style → prompt text (bijective)
    recipe_lora_count: np.ndarray  # 1..3
    recipe_loras: np.ndarray  # (recipes, 3) version index, -1 where unused
    recipe_unsafe: np.ndarray  # unsafe kind code (IMAGE_UNSAFE_KINDS)
    # per image (time order; imageId increases with createdAt)
    image_user: np.ndarray
    image_recipe: np.ndarray
    image_created: np.ndarray  # epoch seconds
    image_ids: np.ndarray
    image_guaranteed: np.ndarray  # the user's reserved safe, well-formed image
    # per release row (final order, duplicates next to their source)
    row_image: np.ndarray
    row_slot: np.ndarray  # which of the image's LoRAs (0..2)
    row_malformed: np.ndarray  # malformed kind code (IMAGE_MALFORMED_KINDS)
    row_duplicate_of: np.ndarray  # row index of the source for exact duplicates, else -1

    @property
    def image_style(self) -> np.ndarray:
        return self.recipe_style[self.image_recipe]


def _choose_rows_to_total(
    weights: np.ndarray, eligible: np.ndarray, target: int, rng: np.random.Generator
) -> np.ndarray:
    """A random subset of `eligible` whose `weights` sum to `target` (exactly when possible)."""
    order = rng.permutation(eligible)
    total = np.cumsum(weights[order])
    n_take = int(np.searchsorted(total, target, side="right"))
    chosen = order[:n_take]
    remainder = target - (int(total[n_take - 1]) if n_take else 0)
    if remainder > 0:
        rest = order[n_take:]
        exact = rest[weights[rest] == remainder]
        if exact.size:
            chosen = np.append(chosen, exact[0])
        else:  # fill with the smallest remaining items that still fit
            for item in rest[np.argsort(weights[rest], kind="stable")]:
                if weights[item] <= remainder:
                    chosen = np.append(chosen, item)
                    remainder -= int(weights[item])
                if remainder == 0:
                    break
    return chosen


def plan_images(sizes: WorldSizes, users: Users, loras: Loras, rng: np.random.Generator) -> Images:
    """Images by user activity, styles by taste, recipes re-used, LoRAs by popularity."""
    n_styles = len(st.STYLES)
    sampler = GroupedSampler.build(loras.version_style, loras.version_popularity, n_styles)
    style_capacity = np.minimum(3, sampler.capacity(np.arange(n_styles)))
    k_probs = np.array(LORAS_PER_IMAGE_P)

    # Expected LoRAs per image given the style caps → number of images.
    style_share = users.activity @ users.taste
    expected_k = sum(
        style_share[s] * sum(k_probs[i] * min(i + 1, style_capacity[s]) for i in range(3))
        for s in range(n_styles)
    )
    base_rows = sizes.image_base_rows
    makers = np.flatnonzero(users.makes_images)
    n_images = max(makers.size, round(base_rows / expected_k))

    # Images per user: one reserved image each, the rest by activity; shuffled in time.
    per_user = np.zeros(users.count, dtype=np.int64)
    per_user[makers] = 1 + rng.multinomial(n_images - makers.size, users.activity[makers])
    image_user = rng.permutation(np.repeat(np.arange(users.count), per_user))
    image_style = sample_rows_categorical(users.taste, image_user, rng)
    first_of_user = np.unique(image_user, return_index=True)[1]
    guaranteed = np.zeros(n_images, dtype=bool)
    guaranteed[first_of_user] = True

    # Recipes: within each (user, style) group in time order an image re-uses the latest
    # recipe unless it starts a fresh one.
    group_key = image_user.astype(np.int64) * n_styles + image_style
    order = np.argsort(group_key, kind="stable")
    sorted_key = group_key[order]
    group_start = np.r_[True, sorted_key[1:] != sorted_key[:-1]]
    n_groups = int(group_start.sum())
    target_recipes = TARGET_UNIQUE_PROMPTS_PER_ROW * expected_k * n_images
    fresh_p = float(np.clip((target_recipes - n_groups) / max(1, n_images - n_groups), 0, 1))
    fresh = (rng.random(n_images) < fresh_p) | group_start
    image_recipe = np.empty(n_images, dtype=np.int64)
    image_recipe[order] = np.cumsum(fresh) - 1
    first_image_of_recipe = order[fresh]
    recipe_user = image_user[first_image_of_recipe]
    recipe_style = image_style[first_image_of_recipe]
    n_recipes = recipe_user.size
    images_per_recipe = np.bincount(image_recipe, minlength=n_recipes)
    del group_key, order, sorted_key, group_start, fresh, first_image_of_recipe

    # LoRAs per recipe, capped by what the style offers, then adjusted to the exact row total.
    cap = style_capacity[recipe_style]
    lora_count = np.minimum(rng.choice(3, size=n_recipes, p=k_probs) + 1, cap)
    diff = base_rows - int((lora_count * images_per_recipe).sum())
    single = images_per_recipe == 1
    if diff > 0:
        candidates = np.flatnonzero(single & (lora_count < cap))
        if candidates.size < diff:
            raise ValueError("cannot plan the requested image rows: too few LoRAs per style")
        lora_count[rng.choice(candidates, size=diff, replace=False)] += 1
    elif diff < 0:
        candidates = np.flatnonzero(single & (lora_count > 1))
        if candidates.size < -diff:
            raise ValueError("cannot plan the requested image rows: too few images")
        lora_count[rng.choice(candidates, size=-diff, replace=False)] -= 1

    # Draw distinct LoRAs of the recipe's style by popularity.
    recipe_loras = np.full((n_recipes, 3), -1, dtype=np.int64)
    for slot in range(3):
        needs = np.flatnonzero(lora_count > slot)
        picks = sampler.draw(recipe_style[needs], rng)
        for _ in range(200):
            clash = np.zeros(needs.size, dtype=bool)
            for earlier in range(slot):
                clash |= picks == recipe_loras[needs, earlier]
            if not clash.any():
                break
            picks[clash] = sampler.draw(recipe_style[needs[clash]], rng)
        else:  # deterministic fallback: walk the style's list until distinct
            for i in np.flatnonzero(clash):
                recipe = needs[i]
                pool = _pool_of(sampler, int(recipe_style[recipe]))
                used = set(recipe_loras[recipe, :slot].tolist())
                picks[i] = next(v for v in pool.tolist() if v not in used)
        recipe_loras[needs, slot] = picks

    # Unsafe recipes (whole recipes: the prompt/content is what is unsafe).
    recipe_rows = lora_count * images_per_recipe
    has_guaranteed = np.zeros(n_recipes, dtype=bool)
    has_guaranteed[image_recipe[guaranteed]] = True
    unsafe = _choose_rows_to_total(
        recipe_rows, np.flatnonzero(~has_guaranteed), sizes.unsafe_image_rows, rng
    )
    toxic = _choose_rows_to_total(
        recipe_rows, unsafe, round(TOXIC_SHARE_OF_UNSAFE * sizes.unsafe_image_rows), rng
    )
    planted_unsafe = int(recipe_rows[unsafe].sum())
    if abs(planted_unsafe - sizes.unsafe_image_rows) > max(2, 0.01 * sizes.unsafe_image_rows):
        raise ValueError(
            f"images={sizes.image_rows} is too small to plant {sizes.unsafe_image_rows} unsafe "
            f"rows for users={sizes.users} (only {planted_unsafe} fit besides each user's own "
            "safe image); raise images or lower unsafe_share"
        )
    recipe_unsafe = np.zeros(n_recipes, dtype=np.int8)
    recipe_unsafe[unsafe] = kind_code(IMAGE_UNSAFE_KINDS, "browsing_level")
    recipe_unsafe[toxic] = kind_code(IMAGE_UNSAFE_KINDS, "toxic_prompt")

    # Recipe key: rank within its style (prompt text is a bijection of (style, key)).
    recipe_key = np.empty(n_recipes, dtype=np.int64)
    by_style = np.argsort(recipe_style, kind="stable")
    starts = np.searchsorted(recipe_style[by_style], np.arange(n_styles))
    recipe_key[by_style] = np.arange(n_recipes) - starts[recipe_style[by_style]]

    # Time: images are already in random (user-mixed) order; creation times increase with it
    # and imageId increases with creation time. Activity on the site grows over time.
    span = EPOCH_END - EPOCH_START
    created = EPOCH_START + np.sort(rng.random(n_images) ** 0.75 * span).astype(np.int64)
    image_ids = 10_000_000 + np.cumsum(rng.integers(1, 30, size=n_images)).astype(np.int64)

    # Rows: one per (image, LoRA), then malformed rows and exact duplicates.
    image_k = lora_count[image_recipe]
    row_image = np.repeat(np.arange(n_images, dtype=np.int32), image_k)
    row_slot = _run_position(np.r_[True, row_image[1:] != row_image[:-1]]).astype(np.int8)
    n_base = row_image.size
    row_malformed = np.zeros(n_base, dtype=np.int8)
    row_safe = recipe_unsafe[image_recipe[row_image]] == NONE
    eligible = np.flatnonzero(row_safe & ~guaranteed[row_image])
    in_place = [k for k in IMAGE_MALFORMED_KINDS if k != "exact_duplicate"]
    n_in_place = sum(sizes.image_malformed[k] for k in in_place)
    if eligible.size < n_in_place:
        raise ValueError(
            f"images={sizes.image_rows} is too small to plant {n_in_place} malformed rows; "
            "raise images or lower malformed_share"
        )
    # Raw usernames come from a handful of accounts (a legacy export that was never hashed),
    # not from hundreds of users: each raw name hashes to an identity of its own downstream.
    n_raw = sizes.image_malformed["raw_username"]
    eligible_user = image_user[row_image[eligible]]
    busiest_first = np.lexsort((eligible, -np.bincount(eligible_user)[eligible_user]))
    raw_rows = eligible[busiest_first[:n_raw]]
    row_malformed[raw_rows] = kind_code(IMAGE_MALFORMED_KINDS, "raw_username")
    rest = np.setdiff1d(eligible, raw_rows, assume_unique=True)
    others = [k for k in in_place if k != "raw_username"]
    picked = rest[rng.permutation(rest.size)[: n_in_place - n_raw]]
    del eligible, rest
    start = 0
    for kind in others:
        count = sizes.image_malformed[kind]
        row_malformed[picked[start : start + count]] = kind_code(IMAGE_MALFORMED_KINDS, kind)
        start += count
    valid = np.flatnonzero(row_safe & (row_malformed == NONE))
    del row_safe
    n_dup = sizes.image_malformed["exact_duplicate"]
    if n_dup <= valid.size:
        sources = np.sort(valid[rng.permutation(valid.size)[:n_dup]])
    else:
        sources = np.sort(rng.choice(valid, size=n_dup, replace=True))
    del valid
    # Each duplicate goes right after its source: original row i moves down by the number of
    # duplicates inserted before it.
    new_of_old = np.arange(n_base, dtype=np.int64) + np.searchsorted(
        sources, np.arange(n_base), side="left"
    )
    new_of_dup = new_of_old[sources] + 1 + _run_position(np.r_[True, sources[1:] != sources[:-1]])
    total = n_base + n_dup
    final_image = np.empty(total, dtype=np.int32)
    final_slot = np.empty(total, dtype=np.int8)
    final_malformed = np.empty(total, dtype=np.int8)
    final_duplicate_of = np.full(total, -1, dtype=np.int32)
    final_image[new_of_old], final_image[new_of_dup] = row_image, row_image[sources]
    final_slot[new_of_old], final_slot[new_of_dup] = row_slot, row_slot[sources]
    final_malformed[new_of_old] = row_malformed
    final_malformed[new_of_dup] = kind_code(IMAGE_MALFORMED_KINDS, "exact_duplicate")
    final_duplicate_of[new_of_dup] = new_of_old[sources]
    # Compact dtypes: at full scale these arrays are what the generator keeps in memory.
    return Images(
        recipe_user=recipe_user.astype(np.int32),
        recipe_style=recipe_style.astype(np.int8),
        recipe_key=recipe_key,
        recipe_lora_count=lora_count.astype(np.int8),
        recipe_loras=recipe_loras.astype(np.int32),
        recipe_unsafe=recipe_unsafe,
        image_user=image_user.astype(np.int32),
        image_recipe=image_recipe.astype(np.int32),
        image_created=created,
        image_ids=image_ids,
        image_guaranteed=guaranteed,
        row_image=final_image,
        row_slot=final_slot,
        row_malformed=final_malformed,
        row_duplicate_of=final_duplicate_of,
    )


def _pool_of(sampler: GroupedSampler, group: int) -> np.ndarray:
    lo, hi = sampler.offsets[group], sampler.offsets[group + 1]
    return sampler.items_by_group[lo:hi] if hi > lo else sampler.global_items


@dataclass
class World:
    """The whole plan: sizes, users, LoRAs, images."""

    sizes: WorldSizes
    users: Users
    loras: Loras
    images: Images


def plan_world(sizes: WorldSizes, seed: int) -> World:
    """Plan every entity of the sample from independent seeded streams."""
    streams = np.random.SeedSequence([seed, 0x5A3D1E]).spawn(3)
    users = plan_users(sizes, np.random.default_rng(streams[0]), salt=seed % 9973)
    loras = plan_loras(sizes, users, np.random.default_rng(streams[1]))
    images = plan_images(sizes, users, loras, np.random.default_rng(streams[2]))
    return World(sizes, users, loras, images)
