"""The clean stage: every rule, duplicates, safety, user hashing, reconciliation, reruns."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import SALT, run_warehouse
from tests.factory import image_row, model_row, user_hash, write_release
from warehouse.clean import CleanConfig

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
