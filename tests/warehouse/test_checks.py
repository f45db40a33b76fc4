"""The warehouse checks as plain functions: each passes on a clean run and fails on the defect
it exists for (no Dagster involved)."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.conftest import run_warehouse
from tests.factory import image_row, model_row, user_hash, write_release
from warehouse import checks
from warehouse.clean import CleanConfig, images_spec, models_spec
from warehouse.quarantine import QuarantineRecord, quarantine_table
from warehouse.schema import IMAGES, MODELS

CFG = CleanConfig()


@pytest.fixture
def run(tmp_path):
    images = [image_row(i, 1 + i % 3) for i in range(1, 11)]
    images += [image_row(1, 1), image_row(1, 1)]  # a new key (1, 1), and its exact copy
    images.append(image_row(50, browsingLevel=8))  # unsafe: quarantined
    images.append(image_row(51, width=0))  # rule breaker: quarantined
    models = [model_row(v) for v in (1, 2, 3)] + [model_row(4, modelNsfwLevel=32)]
    release = write_release(tmp_path / "release", images, models)
    return run_warehouse(release, tmp_path / "lake", CFG)


def replace_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def set_first(table: pa.Table, name: str, value) -> pa.Table:
    column = table.column(name).to_pylist()
    column[0] = value
    return replace_column(table, name, pa.array(column, table.schema.field(name).type))


# -- schema ---------------------------------------------------------------------------------


def test_schema_passes_on_the_clean_tables(run):
    for table in (IMAGES, MODELS):
        result = checks.schema_check(run.lake, table)
        assert result.passed, result.mismatches
        assert result.columns == result.expected_columns == len(table.columns)
        assert result.mismatches == []


def test_schema_fails_on_a_wrong_column_type(run):
    images = run.lake.read_table("images")
    bad = replace_column(images, "browsingLevel", pc.cast(images["browsingLevel"], pa.string()))
    run.lake.write_table("images", bad)
    result = checks.schema_check(run.lake, IMAGES)
    assert not result.passed
    assert result.mismatches == ["browsingLevel: expected int64, found string"]


def test_schema_fails_on_a_missing_or_extra_column(run):
    images = run.lake.read_table("images")
    run.lake.write_table("images", images.drop(["hash"]).append_column("extra", images["url"]))
    result = checks.schema_check(run.lake, IMAGES)
    assert not result.passed
    assert result.mismatches == [
        "hash: expected string, found missing",
        "extra: not a release column",
    ]


def test_schema_fails_on_a_column_out_of_order(run):
    images = run.lake.read_table("images")
    names = images.column_names
    run.lake.write_table("images", images.select([names[1], names[0], *names[2:]]))
    result = checks.schema_check(run.lake, IMAGES)
    assert not result.passed and result.mismatches == []  # same types, wrong order


# -- reconciliation and keys ----------------------------------------------------------------


def test_reconciliation_counts_every_row(run):
    report = run.reports["images"]
    result = checks.reconciliation_check(run.con, run.lake, images_spec(CFG), report)
    assert result.passed
    assert (result.rows_in, result.rows_out, result.quarantined) == (14, 11, 2)
    assert result.exact_duplicates_dropped == 1


def test_reconciliation_fails_when_a_row_is_lost(run):
    images = run.lake.read_table("images")
    run.lake.write_table("images", images.slice(1))  # one kept row vanished
    report = run.reports["images"]
    result = checks.reconciliation_check(run.con, run.lake, images_spec(CFG), report)
    assert not result.passed and result.rows_out == 10


def test_unique_key_passes_then_fails_on_a_repeated_key(run):
    assert checks.unique_key_check(run.con, run.lake, "images", IMAGES.key).passed
    images = run.lake.read_table("images")
    run.lake.write_table("images", pa.concat_tables([images, images.slice(0, 1)]))
    result = checks.unique_key_check(run.con, run.lake, "images", IMAGES.key)
    assert not result.passed and result.duplicated_keys == 1
    assert result.key == ("imageId", "modelVersionId")


# -- safety ---------------------------------------------------------------------------------


def test_safety_passes_on_the_clean_tables(run):
    for spec in (images_spec(CFG), models_spec(CFG)):
        result = checks.safety_check(run.con, run.lake, spec, CFG, run.reports[spec.table.name])
        assert result.passed, result
        assert result.violations and not any(result.violations.values())


def test_safety_reuses_the_clean_rules_not_a_copy():
    reasons = [r.reason for r in checks.row_safety_rules(images_spec(CFG))]
    assert reasons == ["unsafe: browsingLevel"]  # the toxicity rule needs the staged score
    reasons = [r.reason for r in checks.row_safety_rules(models_spec(CFG))]
    assert reasons == ["unsafe: blocked nsfw level"]
    stricter = CleanConfig(max_browsing_level=0)
    rule = checks.row_safety_rules(images_spec(stricter))[0]
    assert "browsingLevel > 0" in rule.when  # follows the configuration


def test_safety_fails_on_a_kept_row_above_the_browsing_level(run):
    images = run.lake.read_table("images")
    run.lake.write_table("images", set_first(images, "browsingLevel", 8))
    result = checks.safety_check(run.con, run.lake, images_spec(CFG), CFG, run.reports["images"])
    assert not result.passed
    assert result.violations == {"unsafe: browsingLevel": 1}


def test_safety_fails_on_a_kept_blocked_model(run):
    models = run.lake.read_table("models")
    run.lake.write_table("models", set_first(models, "modelVersionNsfwLevel", 33))
    result = checks.safety_check(run.con, run.lake, models_spec(CFG), CFG, run.reports["models"])
    assert not result.passed
    assert result.violations == {"unsafe: blocked nsfw level": 1}


def test_safety_fails_on_a_kept_toxic_text(run):
    report = dataclasses.replace(run.reports["images"], max_kept_toxicity=0.9)
    result = checks.safety_check(run.con, run.lake, images_spec(CFG), CFG, report)
    assert not result.passed
    assert not any(result.violations.values())  # the rows are fine; the score is not
    assert result.max_toxicity_kept == 0.9 and result.toxicity_threshold == CFG.toxicity_threshold


# -- quarantine -----------------------------------------------------------------------------


def test_quarantine_summary_counts_by_step_and_reason(run):
    result = checks.quarantine_summary(run.con, run.lake)
    assert result.passed and result.rows_without_reason == 0
    assert result.total == 3
    assert sorted(result.by_reason) == [
        ("clean_images", "non-positive width/height", 1),
        ("clean_images", "unsafe: browsingLevel", 1),
        ("clean_models", "unsafe: blocked nsfw level", 1),
    ]


def test_quarantine_row_without_a_reason_fails(run):
    record = QuarantineRecord("civitai", "crawl", "images", "imageId=7", None)  # type: ignore[arg-type]
    run.lake.write_table("quarantine/civitai", quarantine_table([record]))
    result = checks.quarantine_summary(run.con, run.lake)
    assert not result.passed
    assert result.rows_without_reason == 1 and result.total == 4


def test_quarantine_summary_of_an_empty_lake(tmp_path):
    from warehouse.duck import connect
    from warehouse.lake import Lake

    lake = Lake(str(tmp_path / "lake"))
    result = checks.quarantine_summary(connect(lake), lake)
    assert result == checks.QuarantineSummary(True, 0, [], 0)


# -- raw usernames --------------------------------------------------------------------------


def test_no_raw_usernames_in_a_clean_warehouse(run):
    result = checks.raw_usernames_check(run.con, run.lake)
    assert result.passed, result.offending_values
    # images, models, users, loras, interactions and the quarantine payloads
    assert result.tables_checked == 6


def test_a_raw_username_in_a_table_fails(run):
    users = run.lake.read_table("users")
    run.lake.write_table("users", set_first(users, "userHash", "Pixel_Wizard_42"))
    result = checks.raw_usernames_check(run.con, run.lake)
    assert not result.passed
    assert result.offending_values == {"users": 1}


def test_a_raw_username_in_a_quarantine_payload_fails(run):
    payloads = [
        json.dumps({"item": {"user": {"username": "bob"}}}),  # nested, raw: offends
        json.dumps({"userHash": user_hash("carol")}),  # hashed: fine
        '<html>{"username": "eve"}</html>',  # not JSON, still read: offends
    ]
    records = [
        QuarantineRecord("civitai", "crawl", "images", f"k={i}", "bad page", payload=p)
        for i, p in enumerate(payloads)
    ]
    run.lake.write_table("quarantine/civitai", quarantine_table(records))
    result = checks.raw_usernames_check(run.con, run.lake)
    assert not result.passed
    assert result.offending_values == {"quarantine.payload": 2}


@pytest.mark.parametrize(
    ("value", "offends"),
    [
        ("ab" * 32, False),  # 64 lowercase hex: a hash
        ("AB" * 32, True),  # 64 characters, but upper case
        ("a" * 63, True),
        ("a" * 65, True),
        ("", True),
        ("a" * 32 + "g" + "a" * 31, True),  # 64 characters, one not hex
    ],
)
def test_payload_user_values_near_the_hash_shape(run, value, offends):
    # the cheap match/no-match pass that picks payloads to extract from must flag each of these
    payload = json.dumps({"userHash": "cd" * 32, "item": {"userHash": value}})
    record = QuarantineRecord("civitai", "crawl", "images", "k=1", "bad page", payload=payload)
    run.lake.write_table("quarantine/civitai", quarantine_table([record]))
    result = checks.raw_usernames_check(run.con, run.lake)
    assert result.passed is not offends
    assert result.offending_values == ({"quarantine.payload": 1} if offends else {})
