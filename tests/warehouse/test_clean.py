"""The clean stage: every rule, duplicates, safety, user hashing, reconciliation, reruns."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import SALT, run_warehouse
from tests.factory import image_row, model_row, to_table, user_hash, write_release
from warehouse.clean import CleanConfig, clean_release_table, images_spec, models_spec
from warehouse.duck import connect
from warehouse.lake import Lake
from warehouse.release import discover, land_release_table, open_landing
from warehouse.safety import LexiconScorer
from warehouse.schema import IMAGES, MODELS

BAD_IMAGES = {
    "null imageId": image_row(900, imageId=None),
    "null modelVersionId": image_row(901, modelVersionId=None),
    "missing userHash": image_row(902, userHash="  "),
    "non-positive width/height": image_row(903, width=0),
    "missing createdAt": image_row(904, createdAt=None),
    "unparseable createdAt": image_row(905, createdAt="not a date"),
    "impossible createdAt": image_row(906, createdAt="2099-05-01 12:00:00"),
    "prompt too long": image_row(907, prompt="a " * 600_000),  # ~1.2 MB prompt
    "negative reaction count": image_row(908, likeCount=-3),
    "missing browsingLevel": image_row(909, browsingLevel=None),
    "unsafe: browsingLevel": image_row(910, browsingLevel=4, nsfw=1),
    "unsafe: toxic prompt": image_row(911, prompt="a decapitated knight, gore"),
}


@pytest.fixture
def dirty(tmp_path):
    good = [image_row(i, 1 + i % 3) for i in range(1, 21)]
    images = good + list(BAD_IMAGES.values())
    images += [dict(good[0]), dict(good[0])]  # two exact copies
    images.append(image_row(5, 1 + 5 % 3, likeCount=77))  # same key as good[4], other content
    images.append(image_row(30, 1, createdAt="1970-01-01 00:00:00"))  # before Civitai existed
    images.append(image_row(31, 1, userHash="Pixel_Wizard_42"))  # raw username: hashed, kept
    models = [model_row(v) for v in (1, 2, 3)]
    models += [
        model_row(4, sizeKB=-1.0),
        model_row(5, modelVersionId=None),
        model_row(6, publishedAt="someday"),
        model_row(7, modelNsfwLevel=33),
        model_row(8, modelName="Torture chamber"),
        dict(models[0]),
    ]
    release = write_release(tmp_path / "release", images, models)
    return run_warehouse(release, tmp_path / "lake"), images, models


def quarantine(run, part):
    return run.rows(f"quarantine/{part}", "SELECT reason, record_key, detail, payload")


def test_every_image_rule_quarantines_with_its_reason(dirty):
    run, _, _ = dirty
    reasons = {}
    for reason, key, _, _ in quarantine(run, "images"):
        reasons.setdefault(reason, []).append(key)
    for reason, row in BAD_IMAGES.items():
        assert reason in reasons, reason
        if row["imageId"] is not None:
            assert any(f"imageId={row['imageId']}/" in k for k in reasons[reason]), reason
    assert len(reasons["impossible createdAt"]) == 2
    assert reasons["conflicting duplicate key"] == ["imageId=5/modelVersionId=3"]


def test_reconciliation_and_duplicates(dirty):
    run, images, _ = dirty
    rep = run.reports["images"]
    assert rep.rows_in == len(images)
    assert rep.duplicates == 2
    assert rep.reconciles
    assert rep.rows_out == run.rows("images", "SELECT count(*)")[0][0]
    assert rep.quarantined == len(quarantine(run, "images"))
    assert sum(rep.reasons.values()) == rep.quarantined + rep.duplicates


def test_conflicting_key_keeps_the_latest_row(dirty):
    run, _, _ = dirty
    assert run.q("SELECT likeCount FROM {images} WHERE imageId = 5") == [(77,)]


def test_raw_usernames_are_salted_hashes_everywhere(dirty):
    run, _, _ = dirty
    expected = hashlib.sha256((SALT + "Pixel_Wizard_42").encode()).hexdigest()
    assert run.q("SELECT userHash FROM {images} WHERE imageId = 31") == [(expected,)]
    for table in ("images", "models", "users", "interactions", "loras"):
        assert run.q(f"SELECT count(*) FROM {{{table}}} WHERE userHash LIKE '%Wizard%'") == [(0,)]
    for _, _, _, payload in quarantine(run, "images"):
        assert "Pixel_Wizard" not in payload


def test_release_hashes_are_kept_lowercased(tmp_path):
    upper = user_hash("someone").upper()
    release = write_release(tmp_path / "r", [image_row(1, userHash=upper)], [model_row(1)])
    run = run_warehouse(release, tmp_path / "lake")
    assert run.rows("images", "SELECT userHash")[0][0] == upper.lower()


def test_safety_filter_thresholds_are_configurable(tmp_path):
    images = [image_row(1), image_row(2, browsingLevel=2), image_row(3, prompt="a bloody steak")]
    release = write_release(tmp_path / "r", images, [model_row(1)])
    strict = run_warehouse(release, tmp_path / "a", CleanConfig())
    assert sorted(r[0] for r in strict.rows("images", "SELECT imageId")) == [1, 3]
    lenient = run_warehouse(release, tmp_path / "b", CleanConfig(max_browsing_level=3))
    assert sorted(r[0] for r in lenient.rows("images", "SELECT imageId")) == [1, 2, 3]
    tight = run_warehouse(release, tmp_path / "c", CleanConfig(toxicity_threshold=0.1))
    assert sorted(r[0] for r in tight.rows("images", "SELECT imageId")) == [1]


def test_toxic_detail_names_scorer_and_score(dirty):
    run, _, _ = dirty
    details = [d for r, _, d, _ in quarantine(run, "images") if r == "unsafe: toxic prompt"]
    assert details and "lexicon-v2" in details[0] and "> 0.2" in details[0]


def test_quarantine_payload_is_the_landed_row(dirty):
    run, _, _ = dirty
    rows = {r: json.loads(p) for r, _, _, p in quarantine(run, "images")}
    assert rows["unparseable createdAt"]["createdAt"] == "not a date"
    assert rows["non-positive width/height"]["width"] == 0
    assert len(rows["prompt too long"]["prompt"]) == 65_536  # capped in the payload


def test_model_rules(dirty):
    run, _, models = dirty
    reasons = sorted(r for r, *_ in quarantine(run, "models"))
    assert reasons == sorted(
        [
            "negative sizeKB",
            "null modelVersionId",
            "unparseable publishedAt",
            "unsafe: blocked nsfw level",
            "unsafe: toxic model text",
        ]
    )
    rep = run.reports["models"]
    assert rep.duplicates == 1 and rep.rows_out == 3 and rep.reconciles


def test_clean_types(dirty):
    run, _, _ = dirty
    types = dict(run.q("SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {images})"))
    assert types["createdAt"] == "TIMESTAMP" and types["imageId"] == "BIGINT"
    assert "_source_file" not in types and len(types) == 29


def test_rerun_gives_the_same_tables(dirty, tmp_path):
    run, images, models = dirty
    first = run.q("SELECT * FROM {images} ORDER BY imageId, modelVersionId")
    release = write_release(tmp_path / "release2", images, models)
    again = run_warehouse(release, tmp_path / "lake2")
    # lineage paths differ between the two releases, the clean rows must not
    assert again.q("SELECT * FROM {images} ORDER BY imageId, modelVersionId") == first
    for table in ("users", "loras", "image_loras", "prompts", "interactions"):
        assert sorted(again.rows(table)) == sorted(run.rows(table)), table


# -- sad paths: from the release file to the quarantine ----------------------------------------


def landing_of(lake, spec):
    return open_landing(lake, spec.raw, spec.table, SALT)


def land_and_clean(release, lake_root, cfg: CleanConfig | None = None):
    """Land and clean both release tables (no derived tables); (lake, con, reports)."""
    cfg = cfg or CleanConfig()
    lake = Lake(str(lake_root))
    for table in (IMAGES, MODELS):
        files = discover(str(release), table)
        land_release_table(lake, f"raw/{table.name}", files, table)
    con = connect(lake)
    reports = {
        spec.table.name: clean_release_table(
            con, lake, spec, cfg, LexiconScorer.bundled(), landing_of(lake, spec)
        )
        for spec in (images_spec(cfg), models_spec(cfg))
    }
    return lake, con, reports


def quarantined(con, lake, part: str) -> dict[str, list[tuple]]:
    """reason -> [(record_key, source_file, source_row, detail, payload)] of a quarantine part."""
    out: dict[str, list[tuple]] = {}
    rows = con.execute(
        "SELECT reason, record_key, source_file, source_row, detail, payload "
        f"FROM {lake.scan(f'quarantine/{part}')} ORDER BY source_file, source_row"
    ).fetchall()
    for reason, *rest in rows:
        out.setdefault(reason, []).append(tuple(rest))
    return out


def test_ingest_errors_are_followed_to_the_clean_quarantine(tmp_path):
    """A row that could not be decoded is landed with its error, then quarantined by the clean
    step with that error as the reason and the release file and row as lineage."""
    t = to_table([image_row(i) for i in range(1, 6)], IMAGES)
    prompts = [b"ok", b"bad \xff bytes", b"ok", b"ok", b"ok"]
    t = t.set_column(t.schema.get_field_index("prompt"), "prompt", pa.array(prompts, pa.binary()))
    steps = pa.array([30.0, 30.0, float("inf"), 2.0**64, 30.5])
    t = t.set_column(t.schema.get_field_index("steps"), "steps", steps)
    release = write_release(tmp_path / "release", [], [model_row(1)])
    shard = release / "images" / "part-0.parquet"
    pq.write_table(t, shard)
    lake, con, reports = land_and_clean(release, tmp_path / "lake")
    q = quarantined(con, lake, "images")
    expected = {
        "invalid UTF-8 in column prompt": 2,
        "non-finite value in integer column steps": 3,
        "value out of int64 range in integer column steps": 4,
        "non-integer value in integer column steps": 5,
    }
    for reason, image_id in expected.items():
        assert len(q[reason]) == 1, reason
        key, source_file, source_row, _, payload = q[reason][0]
        assert key == f"imageId={image_id}/modelVersionId=1"
        assert (source_file, source_row) == (str(shard), image_id - 1)
        assert json.loads(payload)["imageId"] == image_id
    assert json.loads(q["invalid UTF-8 in column prompt"][0][4])["prompt"] == "bad \\xff bytes"
    kept = con.execute(f"SELECT imageId FROM {lake.scan('images')}").fetchall()
    assert kept == [(1,)]
    report = reports["images"]
    assert report.reconciles and report.rows_in == 5 and report.quarantined == 4
    assert {r: report.reasons[r] for r in expected} == dict.fromkeys(expected, 1)


MODEL_RULES = {
    "null modelId": model_row(11, modelId=None),
    "null fileId": model_row(12, fileId=None),
    "missing userHash": model_row(13, userHash=None),
    "missing publishedAt": model_row(14, publishedAt=None),
    "negative count": model_row(15, downloadCount=-1),
}


def test_each_model_rule_has_its_own_reason(tmp_path):
    models = [model_row(1), *MODEL_RULES.values()]
    release = write_release(tmp_path / "release", [image_row(1)], models)
    lake, con, reports = land_and_clean(release, tmp_path / "lake")
    q = quarantined(con, lake, "models")
    assert sorted(q) == sorted(MODEL_RULES)
    for reason, row in MODEL_RULES.items():
        assert [k for k, *_ in q[reason]] == [
            f"modelVersionId={row['modelVersionId']}/fileId={row['fileId'] or 'NULL'}"
        ], reason
    kept = con.execute(f"SELECT modelVersionId FROM {lake.scan('models')}").fetchall()
    assert kept == [(1,)]
    assert reports["models"].reconciles


def test_key_conflicts_across_shards(tmp_path):
    """The same key in two shards: the later shard's row wins, the earlier one is quarantined
    as a conflicting duplicate key; an exact copy in both shards is kept once; a winner that
    fails the safety filter is quarantined too."""
    first = [
        image_row(5, likeCount=1),
        image_row(6),
        image_row(7),
        image_row(8),
    ]
    second = [
        image_row(5, likeCount=9),
        image_row(6),  # exact copy
        image_row(7, browsingLevel=4, nsfw=1),  # the winner is unsafe
        image_row(9),
    ]
    release = write_release(tmp_path / "release", first, [model_row(1)])
    shard0 = release / "images" / "part-0.parquet"
    shard1 = release / "images" / "part-1.parquet"
    pq.write_table(to_table(second, IMAGES), shard1)
    lake, con, reports = land_and_clean(release, tmp_path / "lake")
    kept = con.execute(
        f"SELECT imageId, likeCount FROM {lake.scan('images')} ORDER BY imageId"
    ).fetchall()
    assert kept == [(5, 9), (6, 5), (8, 5), (9, 5)]
    q = quarantined(con, lake, "images")
    assert [(k, f, r) for k, f, r, *_ in q["conflicting duplicate key"]] == [
        ("imageId=5/modelVersionId=1", str(shard0), 0),
        ("imageId=7/modelVersionId=1", str(shard0), 2),
    ]
    assert [(k, f, r) for k, f, r, *_ in q["unsafe: browsingLevel"]] == [
        ("imageId=7/modelVersionId=1", str(shard1), 2)
    ]
    report = reports["images"]
    assert report.duplicates == 1 and report.reasons["exact duplicate"] == 1
    assert report.rows_in == 8 and report.rows_out == 4 and report.quarantined == 3
    assert report.reconciles


def test_a_failed_clean_commits_neither_table(tmp_path, monkeypatch):
    """Clean rows and quarantine rows are committed together or not at all."""
    import warehouse.clean as clean

    release = write_release(
        tmp_path / "release", [image_row(1), image_row(2, width=0)], [model_row(1)]
    )
    lake, con, _ = land_and_clean(release, tmp_path / "lake")
    before = (lake.current("images"), lake.current("quarantine/images"))

    def broken(self, batch):
        raise OSError("disk full")

    monkeypatch.setattr(clean._Router, "route", broken)
    cfg = CleanConfig()
    with pytest.raises(OSError, match="disk full"):
        spec = images_spec(cfg)
        clean_release_table(con, lake, spec, cfg, LexiconScorer.bundled(), landing_of(lake, spec))
    assert (lake.current("images"), lake.current("quarantine/images")) == before
    versions = [p.name for p in (tmp_path / "lake" / "images").iterdir() if p.is_dir()]
    assert versions == [before[0].name]  # the failed version's folder was removed


def test_zoned_and_null_typed_columns_clean_to_the_clean_types(tmp_path):
    t = to_table([image_row(1), image_row(2)], IMAGES)
    stamps = pa.array([1685620800000, None], type=pa.timestamp("ms", tz="Asia/Tokyo"))
    t = t.set_column(t.schema.get_field_index("createdAt"), "createdAt", stamps)
    for name in ("comfy", "clipSkip", "hiresUpscale"):
        t = t.set_column(t.schema.get_field_index(name), name, pa.nulls(2))
    release = write_release(tmp_path / "release", [], [model_row(1)])
    pq.write_table(t, release / "images" / "part-0.parquet")
    lake, con, reports = land_and_clean(release, tmp_path / "lake")
    rows = con.execute(
        f"SELECT imageId, createdAt, comfy, clipSkip, hiresUpscale FROM {lake.scan('images')}"
    ).fetchall()
    assert rows == [(1, datetime(2023, 6, 1, 12, 0), None, None, None)]  # UTC wall time
    assert quarantined(con, lake, "images")["missing createdAt"][0][0] == (
        "imageId=2/modelVersionId=1"
    )
    found = pq.read_schema(lake.current("images").part(0))
    assert found.equals(IMAGES.clean_schema())


def test_several_writers_write_the_same_tables(tmp_path, monkeypatch):
    """A release of several row groups read in small batches by three worker threads gives
    the same clean and quarantine rows as one worker, spread over several parts."""
    import os

    import warehouse.clean as clean
    import warehouse.release as release_module

    images = [image_row(i, 1 + i % 3) for i in range(1, 40)]
    images += [image_row(3, 1 + 3 % 3, likeCount=70), dict(images[5]), image_row(50, width=-1)]
    images += [image_row(60, browsingLevel=8), image_row(61, prompt="gore and torture")]
    release = write_release(tmp_path / "release", images, [model_row(1), model_row(1)])
    pq.write_table(
        to_table(images, IMAGES), release / "images" / "part-0.parquet", row_group_size=8
    )

    def tables(lake_root):
        lake, con, reports = land_and_clean(release, lake_root)
        clean_rows = sorted(con.execute(f"SELECT * FROM {lake.scan('images')}").fetchall())
        q = sorted(
            con.execute(
                "SELECT reason, record_key, source_row, payload "
                f"FROM {lake.scan('quarantine/images')}"
            ).fetchall()
        )
        return lake, clean_rows, q, reports["images"]

    monkeypatch.setattr(clean, "WRITERS", 1)
    _, one_rows, one_q, one = tables(tmp_path / "one")
    monkeypatch.setattr(clean, "ARROW_BATCH_ROWS", 4)
    monkeypatch.setattr(release_module, "BATCH_ROWS", 3)
    monkeypatch.setattr(clean, "WRITERS", 3)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    lake, many_rows, many_q, many = tables(tmp_path / "many")
    assert many_rows == one_rows and len(one_rows) == 39
    assert many_q == one_q and len(one_q) == 4
    assert (many.rows_out, many.quarantined, many.duplicates) == (39, 4, 1)
    assert many.reasons == one.reasons
    parts = [
        pq.ParquetFile(p).metadata.num_rows
        for p in sorted((tmp_path / "many" / "images").rglob("part-*.parquet"))
    ]
    assert len(parts) == 3 and sum(parts) == 39 and sum(1 for n in parts if n) >= 2
