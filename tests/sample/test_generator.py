"""The sample generator: release format, determinism, planted ground truth and published shape."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.sample import styles as st
from pipelines.sample.generator import (
    MANIFEST_NAME,
    SampleSpec,
    SampleSummary,
    generate_sample,
    read_manifest,
    sample_is_current,
)
from pipelines.sample.world import IMAGE_MALFORMED_KINDS, MODEL_MALFORMED_KINDS
from tests.sample.sample_queries import connect, scalar, shape_ratios
from warehouse.paper import PAPER_RATIOS
from warehouse.schema import IMAGES, MODELS

RATIO_TOLERANCE = 0.25
SHA256_UPPER = re.compile(r"^[0-9A-F]{64}$")


@pytest.fixture(scope="module")
def default_sample(tmp_path_factory: pytest.TempPathFactory) -> SampleSummary:
    return generate_sample(tmp_path_factory.mktemp("default"), SampleSpec())


@pytest.fixture(scope="module")
def con(default_sample: SampleSummary) -> duckdb.DuckDBPyConnection:
    return connect(default_sample.out)


def _files_bytes(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
    }


# --- release format ---------------------------------------------------------------------------


def test_every_shard_has_the_exact_release_schema(default_sample: SampleSummary) -> None:
    assert len(default_sample.image_files) > 1 and len(default_sample.model_files) > 1
    for path in default_sample.image_files:
        assert pq.read_schema(path).remove_metadata() == IMAGES.canonical_schema()
    for path in default_sample.model_files:
        assert pq.read_schema(path).remove_metadata() == MODELS.canonical_schema()


def test_row_counts_match_the_spec(default_sample: SampleSummary) -> None:
    spec = default_sample.spec
    images = sum(pq.read_metadata(p).num_rows for p in default_sample.image_files)
    models = sum(pq.read_metadata(p).num_rows for p in default_sample.model_files)
    assert images == spec.image_rows == default_sample.rows["images"]
    assert models == spec.model_rows == default_sample.rows["models"]


def test_image_shards_never_split_an_image(default_sample: SampleSummary) -> None:
    seen: set[int] = set()
    for path in default_sample.image_files:
        ids = {i for i in pq.read_table(path, columns=["imageId"])["imageId"].to_pylist() if i}
        assert not ids & seen
        seen |= ids
    assert len(seen) > 1000


def test_image_columns_look_like_civitai(con: duckdb.DuckDBPyConnection) -> None:
    bad = scalar(
        con,
        """
        select count(*) from clean_images where not (
            type = 'image' and steps between 20 and 40 and cfgScale between 4 and 9
            and width > 0 and height > 0 and nsfw = 0 and browsingLevel = 1
            and url = 'https://image.civitai.com/xG1nkqKTMzGDvpLrqFT7WA/'
                || regexp_extract(url, '/([0-9a-f-]{36})/', 1)
                || '/width=' || width || '/' || imageId || '.jpeg'
            and length(hash) = 28
            and try_strptime(createdAt, '%Y-%m-%d %H:%M:%S')
                between '2023-01-01' and '2024-07-01'
            and regexp_matches(userHash, '^[0-9a-f]{64}$')
            and (clipSkip is null or clipSkip in (1, 2))
            and (hiresUpscale is null) = (hiresUpscaler is null)
        )
        """,
    )
    assert bad == 0
    comfy = [c for (c,) in con.execute("select comfy from clean_images").fetchall()]
    with_comfy = [json.loads(c) for c in comfy if c is not None]
    assert 0 < len(with_comfy) < 0.1 * len(comfy)
    assert all(w["prompt"]["3"]["class_type"] == "KSampler" for w in with_comfy)
    samplers = scalar(con, "select count(distinct sampler) from clean_images")
    assert samplers >= 5
    negative_share = scalar(con, "select avg((negativePrompt is not null)::int) from clean_images")
    assert 0.5 < negative_share < 1.0
    duplicate_keys = scalar(
        con,
        "select count(*) from (select imageId, modelVersionId from clean_images "
        "group by all having count(*) > 1)",
    )
    assert duplicate_keys == 0


def test_rows_of_one_image_share_everything_but_the_lora(con: duckdb.DuckDBPyConnection) -> None:
    differing = scalar(
        con,
        """
        select count(*) from (
            select imageId from clean_images group by imageId
            having count(distinct prompt) > 1 or count(distinct userHash) > 1
                or count(distinct createdAt) > 1 or count(distinct likeCount) > 1
                or count(distinct modelVersionId) != count(*)
        )
        """,
    )
    assert differing == 0
    per_image = con.execute(
        "select n, count(*) from (select imageId, count(*) n from clean_images group by 1) "
        "group by n order by n"
    ).fetchall()
    shares = {n: c / sum(c for _, c in per_image) for n, c in per_image}
    assert set(shares) <= {1, 2, 3}
    assert shares[1] > 0.6 and shares[2] > 0.12 and shares[3] > 0.05


def test_model_columns_look_like_civitai(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute(
        "select hashSHA256, hashAutoV2, downloadUrl, modelVersionId, fileName, format, "
        'fileType, "primary", modelType, baseModelType, availability from clean_models'
    ).fetchall()
    assert len(rows) > 100
    for sha, auto_v2, url, version, file_name, fmt, file_type, primary, *constants in rows:
        assert SHA256_UPPER.match(sha) and auto_v2 == sha[:10]
        assert url.split("?")[0] == f"https://civitai.com/api/download/models/{version}"
        assert constants == ["LORA", "Standard", "Public"]
        if primary:
            assert file_type == "Model"
            extension = {"SafeTensor": (".safetensors",), "PickleTensor": (".pt", ".ckpt")}[fmt]
            assert file_name.endswith(extension)
        else:
            assert file_type in ("Training Data", "Pruned Model")
    primaries = con.execute(
        'select count(*) filter (where "primary" = 1), count(distinct modelVersionId) '
        "from clean_models"
    ).fetchone()
    assert primaries[0] == primaries[1]  # exactly one primary file per version
    pickle_share = scalar(
        con,
        "select avg((format = 'PickleTensor')::int) from clean_models where \"primary\" = 1",
    )
    assert 0.04 < pickle_share < 0.12
    extra_share = scalar(
        con,
        'select count(distinct modelVersionId) filter (where "primary" = 0) '
        "/ count(distinct modelVersionId) from clean_models",
    )
    assert 0.06 < extra_share < 0.14
    base_models = con.execute(
        "select baseModel, count(*) n from clean_models group by 1 order by n desc"
    ).fetchall()
    assert base_models[0][0] == "SD 1.5" and len(base_models) >= 8
    versions_per_model = scalar(
        con,
        "select max(n) from (select count(distinct modelVersionId) n from clean_models "
        "group by modelId)",
    )
    assert versions_per_model <= 3


# --- determinism ------------------------------------------------------------------------------


def test_same_spec_gives_byte_identical_files(tmp_path: Path) -> None:
    spec = SampleSpec(users=60, seed=7)
    first = _files_bytes(generate_sample(tmp_path / "a", spec).out)
    second = _files_bytes(generate_sample(tmp_path / "b", spec).out)
    assert first.keys() == second.keys()
    assert first == second


def test_different_seed_gives_different_data(tmp_path: Path) -> None:
    a = generate_sample(tmp_path / "a", SampleSpec(users=60, seed=1))
    b = generate_sample(tmp_path / "b", SampleSpec(users=60, seed=2))
    prompts_a = set(pq.read_table(a.image_files[0], columns=["prompt"])["prompt"].to_pylist())
    prompts_b = set(pq.read_table(b.image_files[0], columns=["prompt"])["prompt"].to_pylist())
    assert len(prompts_a) > 100
    assert len(prompts_a & prompts_b) < 0.1 * len(prompts_a)
    hashes_a = pq.read_table(a.model_files[0], columns=["userHash"])["userHash"].to_pylist()
    hashes_b = pq.read_table(b.model_files[0], columns=["userHash"])["userHash"].to_pylist()
    assert set(hashes_a) != set(hashes_b)


# --- planted ground truth ---------------------------------------------------------------------


def test_users_make_images_in_their_preferred_styles(con: duckdb.DuckDBPyConnection) -> None:
    per_user = con.execute(
        """
        select u.userHash, avg((t.style = u.top_style)::int) as top_share,
               mode(t.style) = any_value(u.top_style) as mode_is_top, count(*) as n
        from image_truth t join user_tastes u using (userHash)
        where t.unsafe_kind is null
        group by u.userHash having count(*) >= 20
        """
    ).fetchall()
    assert len(per_user) > 100
    top_share = np.array([row[1] for row in per_user])
    assert top_share.mean() > 4 / len(st.STYLES)
    assert np.mean([row[2] for row in per_user]) > 0.8


def test_loras_used_match_the_image_style(con: duckdb.DuckDBPyConnection) -> None:
    matching = scalar(
        con,
        "select avg((t.style = l.main_style)::int) from image_truth t "
        "join lora_styles l using (modelVersionId)",
    )
    assert matching > 0.99
    unsafe_loras_used = scalar(
        con,
        "select count(*) from image_truth t join lora_styles l using (modelVersionId) "
        "where l.is_unsafe",
    )
    assert unsafe_loras_used == 0


def test_lora_style_mix_is_mostly_the_main_style(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute("select style_mix, main_style_id, popularity from lora_styles").fetchall()
    mixes = np.array([r[0] for r in rows])
    main = np.array([r[1] for r in rows])
    assert len(rows) > 100
    assert np.allclose(mixes.sum(axis=1), 1.0)
    assert (mixes[np.arange(len(rows)), main] >= 0.7).all()
    assert (mixes.argmax(axis=1) == main).all()
    assert np.isclose(sum(r[2] for r in rows), 1.0)


def test_reactions_rise_with_quality_and_audience(con: duckdb.DuckDBPyConnection) -> None:
    by_quality = scalar(
        con,
        "select corr(t.quality, i.likeCount + i.heartCount) from clean_images i "
        "join image_truth t using (row_index)",
    )
    assert by_quality > 0.3
    audience = {
        style: weight
        for style, weight in con.execute(
            "select s.style, sum(u.taste[s.style_id + 1]) from user_tastes u, styles s group by 1"
        ).fetchall()
    }
    likes = dict(
        con.execute(
            "select t.style, avg(i.likeCount) from clean_images i join image_truth t "
            "using (row_index) group by 1"
        ).fetchall()
    )
    styles = sorted(likes)
    audience_rank = np.argsort(np.argsort([audience[s] for s in styles]))
    likes_rank = np.argsort(np.argsort([likes[s] for s in styles]))
    assert np.corrcoef(audience_rank, likes_rank)[0, 1] > 0.5


def test_reactions_grow_with_the_uploaders_reach_and_the_images_age(
    con: duckdb.DuckDBPyConnection,
) -> None:
    """Exposure is planted: an uploader's reach (``fame``) multiplies the reactions of all
    their images, and the newest images of the snapshot have had less time (``exposure``),
    so raw reaction counts are not quality alone."""
    rows = con.execute(
        "select t.quality, t.fame, t.exposure, i.likeCount + i.heartCount from clean_images i "
        "join image_truth t using (row_index) where t.exposure > 0.01"
    ).fetchall()
    quality, fame, exposure, reactions = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
    assert fame.std() > 0.3 and exposure.min() < 0.5 < exposure.max()
    design = np.column_stack([np.ones_like(quality), quality, np.log(fame), np.log(exposure)])
    coef, *_ = np.linalg.lstsq(design, np.log1p(reactions), rcond=None)
    assert coef[1] > 0.3 and coef[2] > 0.3 and coef[3] > 0.2, coef
    users = con.execute("select count(*), count(distinct fame) from user_tastes").fetchone()
    assert users[0] == users[1]  # one reach per user, recorded in the truth


def test_popularity_is_heavy_tailed(con: duckdb.DuckDBPyConnection) -> None:
    per_lora = np.array(
        [
            n
            for (n,) in con.execute(
                """
                select coalesce(n, 0) from (select distinct modelVersionId from clean_models) m
                left join (select modelVersionId, count(*) n from clean_images group by 1) i
                using (modelVersionId)
                """
            ).fetchall()
        ]
    )
    top = np.sort(per_lora)[::-1][: int(np.ceil(0.1 * per_lora.size))]
    assert top.sum() >= 0.5 * per_lora.sum()


def test_prompts_carry_lora_tags_naming_the_rows_file_stems(
    con: duckdb.DuckDBPyConnection,
) -> None:
    rows = con.execute(
        """
        with whole_images as (
            select imageId from image_truth group by imageId
            having count(malformed_kind) = 0 and count(unsafe_kind) = 0
        )
        select i.imageId, any_value(i.prompt), list(regexp_replace(m.fileName, '\\.[a-z]+$', ''))
        from images i join whole_images using (imageId)
        join (select distinct modelVersionId, fileName from models where "primary" = 1) m
          using (modelVersionId)
        group by i.imageId
        """
    ).fetchall()
    assert len(rows) > 1000
    tag = re.compile(r"<lora:([^:>]+):([0-9.]+)>")
    for _, prompt, stems in rows:
        tags = tag.findall(prompt)
        assert tags and sorted(name for name, _ in tags) == sorted(stems)
        assert all(0 < float(weight) <= 1.0 for _, weight in tags)


def test_prompt_text_is_a_bijection_of_the_recipe(con: duckdb.DuckDBPyConnection) -> None:
    counts = con.execute(
        """
        select count(distinct i.prompt), count(distinct t.recipe_id),
               count(distinct (i.prompt, t.recipe_id))
        from images i join image_truth t using (row_index)
        where t.malformed_kind is distinct from 'long_prompt'
        """
    ).fetchone()
    assert counts[0] == counts[1] == counts[2]
    weighted = scalar(
        con, "select avg(regexp_matches(prompt, '\\([^()]+:1\\.[0-9]\\)')::int) from clean_images"
    )
    assert weighted > 0.5


def test_unsafe_rows_are_planted_as_specified(
    con: duckdb.DuckDBPyConnection, default_sample: SampleSummary
) -> None:
    kinds = dict(
        con.execute(
            "select coalesce(unsafe_kind, 'safe'), count(*) from image_truth group by 1"
        ).fetchall()
    )
    total = sum(kinds.values())
    unsafe = kinds["browsing_level"] + kinds["toxic_prompt"]
    assert unsafe == round(default_sample.spec.unsafe_share * total)
    assert 0.15 < kinds["toxic_prompt"] / unsafe < 0.25
    levels = con.execute(
        "select i.browsingLevel, i.nsfw, t.unsafe_kind, i.prompt from images i "
        "join image_truth t using (row_index) where t.malformed_kind is null"
    ).fetchall()
    for level, nsfw, kind, prompt in levels:
        text = prompt.lower()
        if kind == "browsing_level":
            assert level in (2, 4, 8, 16) and nsfw == int(level >= 4)
        elif kind == "toxic_prompt":
            assert level == 1 and nsfw == 0
            assert any(word in text for word in st.TOXIC_WORDS)
        else:
            assert level == 1 and nsfw == 0
            assert not any(word in text for word in st.UNSAFE_SUBSTRINGS), prompt


def test_unsafe_loras_are_blocked_or_toxically_named(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute(
        "select t.unsafe_kind, m.modelNsfwLevel, m.modelVersionNsfwLevel, m.modelName "
        "from models m join model_truth t using (row_index)"
    ).fetchall()
    n_unsafe_versions = scalar(con, "select count(*) from lora_styles where is_unsafe")
    n_versions = scalar(con, "select count(*) from lora_styles")
    assert 0 < n_unsafe_versions < 0.01 * n_versions
    for kind, model_level, version_level, name in rows:
        toxic_name = any(word in name.lower() for word in st.TOXIC_WORDS)
        if kind == "blocked":
            assert model_level & 32 and version_level & 32 and not toxic_name
        elif kind == "toxic_name":
            assert toxic_name and not model_level & 32
        else:
            assert not model_level & 32 and not version_level & 32
            assert not any(word in name.lower() for word in st.UNSAFE_SUBSTRINGS), name


def test_each_image_defect_is_planted_with_its_count(
    con: duckdb.DuckDBPyConnection, default_sample: SampleSummary
) -> None:
    planted = dict(
        con.execute(
            "select malformed_kind, count(*) from image_truth where malformed_kind is not null "
            "group by 1"
        ).fetchall()
    )
    expected = default_sample.spec.sizes().image_malformed
    assert planted == expected
    assert set(planted) == set(IMAGE_MALFORMED_KINDS)
    assert sum(planted.values()) == round(
        default_sample.spec.malformed_share * default_sample.spec.image_rows
    )
    overlap = scalar(
        con,
        "select count(*) from image_truth "
        "where malformed_kind is not null and unsafe_kind is not null",
    )
    assert overlap == 0

    def rows_of(kind: str, condition: str) -> tuple[int, int]:
        got = con.execute(
            f"select count(*), count(*) filter (where {condition}) from images i "
            f"join image_truth t using (row_index) where t.malformed_kind = '{kind}'"
        ).fetchone()
        return got[0], got[1]

    checks = {
        "null_id": "i.imageId is null and t.imageId is not null",
        "bad_size": "i.width <= 0 or i.height <= 0",
        "bad_date": "try_strptime(i.createdAt, '%Y-%m-%d %H:%M:%S') is null "
        "or try_strptime(i.createdAt, '%Y-%m-%d %H:%M:%S') not between '2023-01-01' and '2024-07-01'",
        "long_prompt": "length(i.prompt) > 20000",
        "raw_username": "not regexp_matches(i.userHash, '^[0-9a-f]{64}$')",
    }
    for kind, condition in checks.items():
        total, defective = rows_of(kind, condition)
        assert total == defective == expected[kind], kind
    # No defect leaks into rows the truth calls well-formed.
    clean_defects = scalar(
        con,
        """
        select count(*) from clean_images where imageId is null or width <= 0 or height <= 0
            or length(prompt) > 20000 or not regexp_matches(userHash, '^[0-9a-f]{64}$')
            or try_strptime(createdAt, '%Y-%m-%d %H:%M:%S') is null
        """,
    )
    assert clean_defects == 0


def test_exact_duplicates_copy_the_row_before_them(con: duckdb.DuckDBPyConnection) -> None:
    same = " and ".join(f'a."{c}" is not distinct from b."{c}"' for c in IMAGES.column_names)
    pairs = con.execute(
        f"""
        select t.row_index, t.duplicate_of_row, {same}
        from image_truth t
        join images a on a.row_index = t.row_index
        join images b on b.row_index = t.duplicate_of_row
        where t.malformed_kind = 'exact_duplicate'
        """
    ).fetchall()
    assert pairs
    for row, source, identical in pairs:
        assert source == row - 1 and identical


def test_raw_usernames_hash_to_the_users_hash(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute(
        "select r.raw_username, r.userHash, i.userHash from raw_usernames r "
        "join images i using (row_index)"
    ).fetchall()
    assert len(rows) == scalar(
        con, "select count(*) from image_truth where malformed_kind = 'raw_username'"
    )
    hashes = set(r[0] for r in con.execute("select userHash from user_tastes").fetchall())
    for raw, user_hash, in_file in rows:
        assert in_file == raw and re.match(r"^[a-z]+_[a-z]+_[0-9]+$", raw)
        assert hashlib.sha256(raw.encode()).hexdigest() == user_hash and user_hash in hashes


def test_each_model_defect_is_planted_with_its_count(
    con: duckdb.DuckDBPyConnection, default_sample: SampleSummary
) -> None:
    planted = dict(
        con.execute(
            "select malformed_kind, count(*) from model_truth where malformed_kind is not null "
            "group by 1"
        ).fetchall()
    )
    assert planted == default_sample.spec.sizes().model_malformed
    assert set(planted) == set(MODEL_MALFORMED_KINDS)
    checks = {
        "null_version_id": "m.modelVersionId is null",
        "negative_size": "m.sizeKB < 0",
        "bad_date": "try_strptime(m.publishedAt, '%Y-%m-%d %H:%M:%S') is null "
        "or try_strptime(m.publishedAt, '%Y-%m-%d %H:%M:%S') not between '2023-01-01' and '2024-07-01'",
        "exact_duplicate": "m.fileId = (select fileId from models p where p.row_index = m.row_index - 1)",
    }
    for kind, condition in checks.items():
        got = con.execute(
            f"select count(*), count(*) filter (where {condition}) from models m "
            f"join model_truth t using (row_index) where t.malformed_kind = '{kind}'"
        ).fetchone()
        assert got[0] == got[1] == planted[kind], kind
    clean_defects = scalar(
        con,
        "select count(*) from clean_models where modelVersionId is null or sizeKB <= 0 "
        "or try_strptime(publishedAt, '%Y-%m-%d %H:%M:%S') is null",
    )
    assert clean_defects == 0


def test_every_user_appears_mostly_in_images(
    con: duckdb.DuckDBPyConnection, default_sample: SampleSummary
) -> None:
    users = default_sample.spec.users
    in_images = scalar(con, "select count(distinct userHash) from clean_images")
    in_either = scalar(
        con,
        "select count(distinct u) from (select userHash u from clean_images "
        "union select userHash from clean_models)",
    )
    assert in_either == users
    assert in_images >= 0.9 * users
    assert scalar(con, "select count(*) from user_tastes") == users


# --- published shape --------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", sorted(PAPER_RATIOS))
def test_default_sample_keeps_the_published_ratio(
    con: duckdb.DuckDBPyConnection, ratio: str
) -> None:
    measured = shape_ratios(con)[ratio]
    published = PAPER_RATIOS[ratio]
    assert abs(measured / published - 1) <= RATIO_TOLERANCE, (ratio, measured, published)


def test_full_spec_has_the_published_counts() -> None:
    spec = SampleSpec.full()
    assert (spec.users, spec.model_rows, spec.image_rows) == (57_245, 242_889, 5_658_107)
    assert spec.image_rows_per_shard == 500_000
    sizes = spec.sizes()
    assert sizes.uploaders == 19_003
    assert sizes.image_rows == 5_658_107 and sizes.model_rows == 242_889
    assert sizes.unsafe_image_rows == round(0.131 * 5_658_107)
    assert SampleSpec.full(seed=3).seed == 3


def test_one_fiftieth_of_full_scale_keeps_the_ratios(tmp_path: Path) -> None:
    full = SampleSpec.full()
    spec = SampleSpec(
        users=full.users // 50, loras=full.model_rows // 50, images=full.image_rows // 50
    )
    summary = generate_sample(tmp_path, spec)
    assert summary.rows["images"] == spec.image_rows and summary.rows["models"] == spec.model_rows
    ratios = shape_ratios(connect(tmp_path))
    for ratio, published in PAPER_RATIOS.items():
        assert abs(ratios[ratio] / published - 1) <= RATIO_TOLERANCE, (ratio, ratios[ratio])


# --- spec validation, small specs, manifest ---------------------------------------------------


def test_tiny_spec_still_works(tmp_path: Path) -> None:
    spec = SampleSpec(users=20, seed=5)
    summary = generate_sample(tmp_path, spec)
    con = connect(tmp_path)
    assert summary.rows["images"] == spec.image_rows
    for path in summary.image_files:
        assert pq.read_schema(path).remove_metadata() == IMAGES.canonical_schema()
    users = scalar(
        con,
        "select count(distinct u) from (select userHash u from clean_images "
        "union select userHash from clean_models)",
    )
    assert users == 20


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"users": 0}, "users"),
        ({"users": -3}, "users"),
        ({"users": 2.5}, "users"),
        ({"seed": -1}, "seed"),
        ({"loras": 0}, "loras"),
        ({"images": 0}, "images"),
        ({"unsafe_share": -0.1}, "unsafe_share"),
        ({"malformed_share": -0.01}, "malformed_share"),
        ({"unsafe_share": 0.9}, "unsafe_share"),
        ({"users": 500, "images": 100}, "images"),
    ],
)
def test_invalid_spec_raises_a_clear_error(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SampleSpec(**kwargs)  # type: ignore[arg-type]


def test_no_defects_when_shares_are_zero(tmp_path: Path) -> None:
    generate_sample(tmp_path, SampleSpec(users=40, unsafe_share=0.0, malformed_share=0.0))
    con = connect(tmp_path)
    assert scalar(con, "select count(*) from image_truth where unsafe_kind is not null") == 0
    assert scalar(con, "select count(*) from image_truth where malformed_kind is not null") == 0
    assert scalar(con, "select count(*) from model_truth where malformed_kind is not null") == 0


def test_manifest_is_written_last_and_describes_the_files(tmp_path: Path) -> None:
    out = tmp_path / "sample"
    calls: list[tuple[str, int, int]] = []

    def progress(stage: str, done: int, total: int) -> None:
        assert not (out / MANIFEST_NAME).exists()
        calls.append((stage, done, total))

    summary = generate_sample(out, SampleSpec(users=40), progress)
    manifest = read_manifest(out)
    assert manifest is not None
    assert manifest["spec"] == SampleSpec(users=40).to_dict()
    listed = [f for group in manifest["files"].values() for f in group]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert sorted(listed) == written
    assert not [p for p in out.rglob(".*")]  # no temp files left behind
    manifest_time = (out / MANIFEST_NAME).stat().st_mtime_ns
    assert len(listed) > 2  # images, models and truth shards
    assert [f for f in listed if (out / f).stat().st_mtime_ns > manifest_time] == []
    assert manifest["rows"]["images"] == summary.rows["images"]
    image_calls = [c for c in calls if c[0] == "images"]
    assert image_calls[-1][1] == image_calls[-1][2] == summary.rows["images"]
    assert [c[1] for c in image_calls] == sorted(c[1] for c in image_calls)
    assert sample_is_current(out, SampleSpec(users=40))
    assert not sample_is_current(out, SampleSpec(users=40, seed=1))


def test_read_manifest_rejects_missing_or_broken_manifests(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"generator": "something else"}))
    assert read_manifest(tmp_path) is None


def test_regenerating_replaces_a_previous_sample(tmp_path: Path) -> None:
    generate_sample(tmp_path, SampleSpec(users=200))
    big_shards = sorted((tmp_path / "images").glob("*.parquet"))
    generate_sample(tmp_path, SampleSpec(users=15))
    manifest = read_manifest(tmp_path)
    assert manifest is not None
    small_shards = sorted((tmp_path / "images").glob("*.parquet"))
    assert len(small_shards) < len(big_shards)
    assert [p.relative_to(tmp_path).as_posix() for p in small_shards] == manifest["files"]["images"]


def test_without_truth_only_release_files_are_written(tmp_path: Path) -> None:
    summary = generate_sample(tmp_path, SampleSpec(users=30, with_truth=False))
    assert summary.truth_files == ()
    assert not list(tmp_path.glob("truth/*.parquet"))
    manifest = read_manifest(tmp_path)
    assert manifest is not None and manifest["files"]["truth"] == []


# --- the styles module ------------------------------------------------------------------------


def test_styles_are_distinct_and_safe() -> None:
    assert len(st.STYLES) >= 8
    assert len(set(st.STYLE_NAMES)) == len(st.STYLES)
    subjects = [s for style in st.STYLES for s in style.subjects]
    nouns = [n for style in st.STYLES for n in style.model_nouns]
    triggers = [style.trigger_words[0] for style in st.STYLES]
    assert len(set(subjects)) == len(subjects)
    assert len(set(nouns)) == len(nouns) and all(n.isalpha() and n.islower() for n in nouns)
    assert len(set(triggers)) == len(triggers)
    for style in st.STYLES:
        assert abs(sum(w for _, w in style.base_models) - 1.0) < 1e-9
        assert len(style.palette) >= 3
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in style.palette)
        words = (
            style.subjects
            + style.adjectives
            + style.settings
            + style.lighting
            + style.trigger_words
            + style.tags
            + style.model_nouns
        )
        for word in words:
            assert "," not in word
            assert not any(bad in word.lower() for bad in st.UNSAFE_SUBSTRINGS), word
    shared = st.QUALITY_TAGS + st.COMPOSITION + st.DETAILS + st.MODEL_ADJECTIVES + st.MODEL_KINDS
    for word in shared + st.NEGATIVE_PROMPTS + st.USERNAME_ADJECTIVES + st.USERNAME_NOUNS:
        assert not any(bad in word.lower() for bad in st.UNSAFE_SUBSTRINGS), word
    for phrase in st.TOXIC_PHRASES:
        assert any(word in phrase for word in st.TOXIC_WORDS)
