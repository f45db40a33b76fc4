"""The whole graph on the embedded sample, measured against the sample's planted truth.

Only this evaluation code reads ``truth/``. One materialization (module fixture) of the
default sample is checked for: every planted defect quarantined with its reason, the shape
ratios of the paper, the example SQL questions, hashing of raw usernames, the users' tastes.
The shared fixture is read-only: the catalog is opened read-only and questions run on their own
cursor, so no test sees another's variables or views.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pytest

from pipelines.resources import PipelineResources, WarehouseResource
from pipelines.runner import materialize_all
from tests.conftest import assert_every_check_passed
from tests.sample.sample_queries import connect as connect_truth
from warehouse.paper import PAPER_RATIOS
from warehouse.sqlfiles import questions

SALT = "e2e-salt"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = WarehouseResource(home=str(home), user_salt=SALT)
    result = materialize_all(PipelineResources(settings))
    assert result.success
    assert_every_check_passed(result)
    wh = duckdb.connect(settings.catalog_path(), read_only=True)
    truth = connect_truth(Path(settings.sample_dir()))
    # the warehouse's kept rows, the way the truth sees them: release rows that are neither
    # unsafe nor malformed, plus raw-username rows (kept, with the user hashed)
    truth.execute(
        """create view kept_images as
           select i.* from images i join image_truth t using (row_index)
           where t.unsafe_kind is null and (t.malformed_kind is null or t.malformed_kind = 'raw_username')"""
    )
    return result, wh, truth


def one(con, sql, *params):
    return con.execute(sql, list(params)).fetchone()[0]


def reasons(wh) -> dict[str, int]:
    return dict(wh.execute("SELECT reason, count(*) FROM quarantine GROUP BY ALL").fetchall())


def test_every_planted_image_defect_is_quarantined_with_its_reason(world):
    _, wh, truth = world
    planted = dict(
        truth.execute(
            "SELECT coalesce(malformed_kind, unsafe_kind), count(*) FROM image_truth "
            "WHERE malformed_kind IS NOT NULL OR unsafe_kind IS NOT NULL GROUP BY ALL"
        ).fetchall()
    )
    got = reasons(wh)
    assert got["null imageId"] == planted["null_id"]
    assert got["non-positive width/height"] == planted["bad_size"]
    assert (
        got.get("unparseable createdAt", 0) + got.get("impossible createdAt", 0)
        == planted["bad_date"]
    )
    assert got["prompt too long"] == planted["long_prompt"]
    assert got["unsafe: browsingLevel"] == planted["browsing_level"]
    assert got["unsafe: toxic prompt"] == planted["toxic_prompt"]
    dropped = (
        world[0]
        .asset_materializations_for_node("images")[0]
        .metadata["exact_duplicates_dropped"]
        .value
    )
    assert dropped == planted["exact_duplicate"]


def test_model_defects_and_unsafe_loras(world):
    _, wh, truth = world
    planted = dict(
        truth.execute(
            "SELECT coalesce(malformed_kind, unsafe_kind), count(*) FROM model_truth "
            "WHERE malformed_kind IS NOT NULL OR unsafe_kind IS NOT NULL GROUP BY ALL"
        ).fetchall()
    )
    got = reasons(wh)
    assert got["null modelVersionId"] == planted["null_version_id"]
    assert got["negative sizeKB"] == planted["negative_size"]
    assert (
        got.get("unparseable publishedAt", 0) + got.get("impossible publishedAt", 0)
        == planted["bad_date"]
    )
    unsafe_truth = {
        r[0]
        for r in truth.execute("SELECT modelVersionId FROM lora_styles WHERE is_unsafe").fetchall()
    }
    unsafe_kept = {
        r[0] for r in wh.execute("SELECT modelVersionId FROM loras").fetchall()
    } & unsafe_truth
    assert unsafe_truth and not unsafe_kept


def test_clean_images_are_exactly_the_truths_kept_rows(world):
    _, wh, truth = world
    expected = set(truth.execute("SELECT imageId, modelVersionId FROM kept_images").fetchall())
    got = set(wh.execute("SELECT imageId, modelVersionId FROM images").fetchall())
    assert got == expected


def test_raw_usernames_hashed_with_the_salt(world):
    _, wh, truth = world
    rows = truth.execute(
        "SELECT i.imageId, i.modelVersionId, r.raw_username FROM raw_usernames r JOIN images i USING (row_index)"
    ).fetchall()
    assert rows
    for image_id, version_id, raw in rows[:20]:
        expected = hashlib.sha256((SALT + raw).encode()).hexdigest()
        assert (
            one(
                wh,
                "SELECT userHash FROM images WHERE imageId = ? AND modelVersionId = ?",
                image_id,
                version_id,
            )
            == expected
        )
    assert (
        one(wh, "SELECT count(*) FROM users WHERE NOT regexp_full_match(userHash, '[0-9a-f]{64}')")
        == 0
    )


def test_shape_ratios_within_25_percent_of_imagegem(world):
    _, wh, _ = world
    f = dict(
        zip(
            [
                d[0]
                for d in wh.execute(
                    "SELECT * FROM table1_stats WHERE stage = 'filtered'"
                ).description
            ],
            wh.execute("SELECT * FROM table1_stats WHERE stage = 'filtered'").fetchone(),
            strict=True,
        )
    )
    r = dict(
        zip(
            [
                d[0]
                for d in wh.execute("SELECT * FROM table1_stats WHERE stage = 'raw'").description
            ],
            wh.execute("SELECT * FROM table1_stats WHERE stage = 'raw'").fetchone(),
            strict=True,
        )
    )
    ratios = {
        "users_per_uploader": f["users"] / f["uploaders"],
        "loras_per_uploader": f["loras"] / f["uploaders"],
        "images_per_user": f["images"] / f["users"],
        "unique_prompts_per_image": f["unique_prompts"] / f["images"],
        "unique_tags_per_lora": f["unique_tags"] / f["loras"],
        "safety_removed_share": 1 - f["images"] / r["images"],
    }
    for name, value in ratios.items():
        assert abs(value / PAPER_RATIOS[name] - 1) <= 0.25, (name, value)
    top = wh.execute(
        "SELECT sum(n) FILTER (WHERE rk <= total / 10) / sum(n) FROM "
        "(SELECT n_image_rows AS n, row_number() OVER (ORDER BY n_image_rows DESC) AS rk, count(*) OVER () AS total FROM loras)"
    ).fetchone()[0]
    assert top >= 0.5  # heavy tail: the top 10 % of LoRAs carry at least half of the image rows


# -- the example questions (warehouse/sql/questions.sql), against the truth -----------------------


def run_question(wh, name, **variables):
    """One example question, with its variables set on a cursor of its own (nothing leaks)."""
    cursor = wh.cursor()
    try:
        for key, value in variables.items():
            cursor.execute(f"SET VARIABLE {key} = ?", [value])
        return cursor.execute(questions()[name]).fetchall()
    finally:
        cursor.close()


def test_q_unique_prompts(world):
    _, wh, truth = world
    [(prompts, negatives)] = run_question(wh, "unique_prompts")
    assert prompts == one(truth, "SELECT count(DISTINCT prompt) FROM kept_images")
    assert negatives == one(truth, "SELECT count(DISTINCT negativePrompt) FROM kept_images")


def test_q_base_models_and_sd15_primaries(world):
    _, wh, truth = world
    got = dict(run_question(wh, "base_model_families"))
    expected = dict(
        truth.execute(
            "SELECT baseModel, count(DISTINCT modelVersionId) FROM clean_models GROUP BY ALL"
        ).fetchall()
    )
    assert got == expected and {"SD 1.5", "SDXL 1.0"} <= set(got)
    sd15 = {r[0] for r in run_question(wh, "primary_sd15_loras")}
    expected_sd15 = {
        r[0]
        for r in truth.execute(
            "SELECT modelVersionId FROM clean_models WHERE \"primary\" = 1 AND baseModel = 'SD 1.5'"
        ).fetchall()
    }
    assert sd15 == expected_sd15 and sd15


def test_q_loras_with_tag(world):
    _, wh, truth = world
    tag = one(
        truth,
        "SELECT trim(t) FROM (SELECT unnest(string_split(tags, ',')) t FROM clean_models) GROUP BY 1 ORDER BY count(*) DESC LIMIT 1",
    )
    got = {r[0] for r in run_question(wh, "loras_with_tag", tag=tag)}
    expected = {
        r[0]
        for r in truth.execute(
            "SELECT DISTINCT modelVersionId FROM clean_models WHERE list_contains(list_transform(string_split(tags, ','), lambda t: trim(t)), ?)",
            [tag],
        ).fetchall()
    }
    assert got == expected and len(got) > 1


def test_q_image_model_versions_for_multi_lora_images(world):
    _, wh, truth = world
    image_ids = [
        r[0]
        for r in truth.execute(
            "SELECT imageId FROM kept_images GROUP BY 1 HAVING count(*) >= 2 ORDER BY 1 LIMIT 5"
        ).fetchall()
    ]
    assert len(image_ids) == 5
    for image_id in image_ids:
        got = {r[1] for r in run_question(wh, "image_model_versions", image_id=image_id)}
        expected = {
            r[0]
            for r in truth.execute(
                "SELECT modelVersionId FROM kept_images WHERE imageId = ?", [image_id]
            ).fetchall()
        }
        assert got == expected and len(got) >= 2
    multi = {r[0]: r[1] for r in run_question(wh, "multi_lora_images")}
    expected_multi = dict(
        truth.execute(
            "SELECT imageId, count(*) FROM kept_images GROUP BY 1 HAVING count(*) > 1"
        ).fetchall()
    )
    assert multi == expected_multi and set(image_ids) <= set(multi)


def test_q_user_images_and_models(world):
    _, wh, truth = world
    user = one(
        truth,
        "SELECT uploader_userHash FROM lora_styles GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1",
    )
    got = run_question(wh, "user_images_and_models", user_hash=user)
    images = {i for kind, i, _ in got if kind == "image"}
    models = {i for kind, i, _ in got if kind == "model_version"}
    assert images == {
        r[0]
        for r in truth.execute(
            "SELECT DISTINCT imageId FROM kept_images WHERE userHash = ?", [user]
        ).fetchall()
    }
    assert models == {
        r[0]
        for r in truth.execute(
            "SELECT DISTINCT modelVersionId FROM clean_models WHERE userHash = ?", [user]
        ).fetchall()
    }
    assert models


def test_q_images_by_other_users(world):
    _, wh, truth = world
    version, uploader = truth.execute(
        "SELECT modelVersionId, uploader_userHash FROM lora_styles WHERE NOT is_unsafe ORDER BY popularity DESC LIMIT 1"
    ).fetchone()
    got = {r[0] for r in run_question(wh, "images_by_other_users", model_version_id=version)}
    expected = {
        r[0]
        for r in truth.execute(
            "SELECT DISTINCT imageId FROM kept_images WHERE modelVersionId = ? AND userHash <> ?",
            [version, uploader],
        ).fetchall()
    }
    assert got == expected and got


def test_users_use_loras_of_their_own_taste(world):
    """Planted world, seen through the warehouse: the LoRAs a user generates with are mostly of
    the user's top style (chance level is 1 / number of styles)."""
    _, wh, truth = world
    pairs = wh.execute(
        "SELECT userHash, item_id FROM interactions WHERE kind = 'generated_with'"
    ).fetchall()
    top_style = dict(truth.execute("SELECT userHash, top_style FROM user_tastes").fetchall())
    main_style = dict(
        truth.execute("SELECT modelVersionId, main_style FROM lora_styles").fetchall()
    )
    # users the truth knows by hash (raw usernames are salted in the warehouse, not in the truth)
    known = [(top_style[user], main_style[item]) for user, item in pairs if user in top_style]
    assert len(known) > 0.9 * len(pairs) > 0
    share = sum(top == main for top, main in known) / len(known)
    n_styles = one(truth, "SELECT count(*) FROM styles")
    assert share > 3 / n_styles
