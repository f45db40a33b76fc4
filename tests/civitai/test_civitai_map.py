"""Unit tests of the pure API → release mapping (warehouse.civitai_map)."""

from __future__ import annotations

import json

import pytest

from tests.civitai import image_item, model_item
from warehouse import civitai_map as cm
from warehouse.quarantine import QuarantineRecord
from warehouse.schema import IMAGES, MODELS

# -- models ------------------------------------------------------------------------------------


def test_model_item_maps_to_one_row_per_file_with_all_45_columns():
    mapped = cm.map_model_item(model_item(), "t")
    assert mapped.quarantine == []
    assert len(mapped.rows) == 2
    primary, data = mapped.rows
    assert set(primary) == set(MODELS.column_names)
    assert primary["modelId"] == 11 and primary["modelVersionId"] == 101
    assert primary["fileId"] == 1001 and data["fileId"] == 1002
    assert primary["primary"] == 1 and data["primary"] == 0  # "primary" absent → 0
    assert primary["publishedAt"] == "2023-05-01 10:00:00"
    assert primary["scannedAt"] == "2023-05-01 10:05:00"
    assert data["scannedAt"] == "2023-05-01 10:06:00"
    assert primary["tags"] == "anime, style"
    assert primary["trainedWords"] == "neon, glow"
    assert primary["allowNoCredit"] == 1 and primary["allowDifferentLicense"] == 0
    assert primary["hashAutoV1"] == "AB12CD34"  # uppercase hex
    assert data["hashAutoV1"] is None and data["hashSHA256"] == "C" * 64
    assert data["fp"] is None and data["format"] == "Other"
    # version stats win over the model's
    assert primary["downloadCount"] == 7 and primary["rating"] == 4.5
    assert primary["userHash"] == "alice"  # not hashed here
    assert cm.models_table(mapped.rows).schema == MODELS.canonical_schema()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Image, RentCivit", "Image, RentCivit"),
        (["Image", "RentCivit", "Rent"], "Image, RentCivit, Rent"),
        ([], None),
        ("{Image,RentCivit,Sell}", "Image, RentCivit, Sell"),
        ("{}", None),
        ("None", "None"),
        (["None"], "None"),
        ("{None}", "None"),
        (None, None),
        ("Image,Rent", "Image, Rent"),
    ],
)
def test_allow_commercial_use_variants(value, expected):
    rows = cm.map_model_item(model_item(allowCommercialUse=value), "t").rows
    assert rows[0]["allowCommercialUse"] == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2023-05-01T10:00:00.000Z", "2023-05-01 10:00:00"),
        ("2023-05-01T10:00:00", "2023-05-01 10:00:00"),
        ("2023-05-01T10:00:00.123456Z", "2023-05-01 10:00:00"),
        ("2023-05-01T12:00:00+02:00", "2023-05-01 10:00:00"),
        ("2023-05-01 10:00:00", "2023-05-01 10:00:00"),
        ("2023-05-01", "2023-05-01 00:00:00"),
        (1682935200, "2023-05-01 10:00:00"),
        (1682935200000, "2023-05-01 10:00:00"),
        ("not a date", "not a date"),  # kept verbatim: the clean stage judges it
        (None, None),
    ],
)
def test_timestamps(value, expected):
    assert cm.timestamp_text(value) == expected


def test_hashes_as_list_and_missing_kinds():
    item = model_item()
    item["modelVersions"][0]["files"][0]["hashes"] = [
        {"type": "SHA256", "hash": "ab" * 32},
        {"type": "AutoV2", "hash": "abababab"},
    ]
    row = cm.map_model_item(item, "t").rows[0]
    assert row["hashSHA256"] == "AB" * 32 and row["hashAutoV2"] == "ABABABAB"
    assert row["hashCRC32"] is None and row["hashBLAKE3"] is None


def test_unmappable_version_is_quarantined_and_the_others_kept():
    item = model_item()
    broken = json.loads(json.dumps(item["modelVersions"][0]))
    broken["id"] = 102
    broken["files"][0]["sizeKB"] = "huge"
    item["modelVersions"].append(broken)
    item["modelVersions"].append({"id": 103, "files": []})
    mapped = cm.map_model_item(item, "src")
    assert {r["modelVersionId"] for r in mapped.rows} == {101}
    reasons = {q.record_key: q.reason for q in mapped.quarantine}
    assert "sizeKB" in reasons["modelId=11/modelVersionId=102"]
    assert reasons["modelId=11/modelVersionId=103"] == "model version has no files"
    assert len(mapped.quarantine) == 2
    for record in mapped.quarantine:
        assert isinstance(record, QuarantineRecord)
        assert (record.source, record.step, record.table_name) == ("civitai", "crawl", "models")
        assert record.source_file == "src" and record.source_row is None
        assert json.loads(record.payload)["id"] in (102, 103)


@pytest.mark.parametrize("item", [None, "text", {"name": "no id"}, {"id": "x1"}])
def test_broken_model_items_are_quarantined_never_raised(item):
    mapped = cm.map_models_page({"items": [item, model_item()]}, "p")
    assert len(mapped.rows) == 2  # the good item survives
    assert len(mapped.quarantine) == 1


def test_model_version_object_maps_with_unknown_model_columns_null():
    version = model_item()["modelVersions"][0]
    payload = dict(
        version, model={"name": "Neon Style", "type": "LORA", "nsfw": False, "poi": False}
    )
    mapped = cm.map_model_version(payload, "v")
    assert len(mapped.rows) == 2 and not mapped.quarantine
    row = mapped.rows[0]
    assert row["modelId"] == 11 and row["modelName"] == "Neon Style"
    assert row["userHash"] is None and row["modelNsfwLevel"] is None
    checkpoint = dict(payload, model={"name": "Base", "type": "Checkpoint"})
    mapped = cm.map_model_version(checkpoint, "v")
    (record,) = mapped.quarantine
    assert not mapped.rows and "not LORA" in record.reason
    assert record.record_key == "modelVersionId=101" and record.source_file == "v"


def test_model_sort_key_uses_latest_version():
    item = model_item()
    item["modelVersions"].append(
        dict(item["modelVersions"][0], id=102, publishedAt="2024-01-01T00:00:00Z")
    )
    key = cm.model_sort_key(item)
    assert key is not None and key[1] == 11 and key[0].year == 2024
    assert cm.model_version_ids(item) == [101, 102]


# -- images ------------------------------------------------------------------------------------


def test_image_item_maps_all_29_columns():
    mapped = cm.map_image_item(image_item(), 101, "t")
    assert not mapped.quarantine
    (row,) = mapped.rows
    assert list(row) == IMAGES.column_names
    assert row["imageId"] == 555 and row["modelVersionId"] == 101
    assert row["createdAt"] == "2023-06-01 12:00:00"
    assert row["userHash"] == "bob"
    assert row["cfgScale"] == 7.0 and row["clipSkip"] == 2 and row["seed"] == 42
    assert row["likeCount"] == 5 and row["commentCount"] == 3
    assert row["nsfw"] == 0 and row["browsingLevel"] == 1
    assert cm.images_table(mapped.rows).schema == IMAGES.canonical_schema()
    assert cm.lora_resources(image_item()) == [101]


def test_image_meta_nested_and_a1111_keys():
    meta = {
        "prompt": "p",
        "Clip skip": "2",
        "Hires upscale": "1.5",
        "Hires upscaler": "4x",
        "Denoising strength": "0.45",
        "comfy": '{"a": 1}',
    }
    flat = cm.map_image_item(image_item(meta=meta), 1, "t").rows[0]
    nested = cm.map_image_item(image_item(meta={"id": 555, "meta": meta}), 1, "t").rows[0]
    assert flat == nested
    assert flat["clipSkip"] == 2 and flat["hiresUpscale"] == 1.5
    assert flat["denoisingStrength"] == 0.45 and flat["hiresUpscaler"] == "4x"
    assert flat["comfy"] == '{"a": 1}'
    numeric = dict(meta, **{"Clip skip": None, "clipSkip": 2, "Hires upscale": 1.5})
    assert cm.map_image_item(image_item(meta=numeric), 1, "t").rows[0] == flat


def test_meta_absent_gives_null_generation_columns():
    row = cm.map_image_item(image_item(meta=None), 1, "t").rows[0]
    assert row["prompt"] is None and row["seed"] is None and row["imageId"] == 555


@pytest.mark.parametrize(
    ("nsfw_level", "browsing", "expected"),
    [(1, 1, 1), ("Mature", 4, 4), ("X", None, 31), ("Soft", None, 3), (8, None, 8)],
)
def test_image_nsfw_level_int_or_legacy_name(nsfw_level, browsing, expected):
    item = image_item(nsfwLevel=nsfw_level, browsingLevel=browsing)
    assert cm.map_image_item(item, 1, "t").rows[0]["browsingLevel"] == expected


def test_bad_meta_field_nulls_the_column_and_is_recorded():
    item = image_item(meta={"prompt": "p", "seed": "random", "steps": 2**70})
    mapped = cm.map_image_item(item, 1, "t")
    row = mapped.rows[0]
    assert row["seed"] is None and row["steps"] is None and row["prompt"] == "p"
    assert len(mapped.quarantine) == 2
    assert all("meta field" in q.reason for q in mapped.quarantine)
    assert {q.record_key for q in mapped.quarantine} == {"imageId=555/modelVersionId=1"}
    assert sorted(q.payload for q in mapped.quarantine) == [str(2**70), "random"]


@pytest.mark.parametrize(
    "item",
    [image_item(id=None), image_item(width="wide"), image_item(stats=[1]), 42],
)
def test_unmappable_image_items_are_quarantined(item):
    mapped = cm.map_images_page({"items": [item, image_item(id=556)]}, 1, "t")
    assert [r["imageId"] for r in mapped.rows] == [556]
    (record,) = mapped.quarantine
    assert record.reason and record.table_name == "images"


# -- pages -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"items": [{"id": 1}, {"id"', "truncated JSON body"),
        ("<!DOCTYPE html><html><head><title>Just a moment...</title></head></html>", "HTML"),
        ("", "empty body"),
        ("[1, 2]", "not an object"),
        ("{'items': []}", "invalid JSON body"),
        (None, "no body"),
    ],
)
def test_bad_bodies_give_a_reason(body, reason):
    payload, why = cm.parse_page(body)
    assert payload is None and reason in why


def test_page_without_items_is_quarantined_as_a_page():
    mapped = cm.map_images_page({"error": "No model with id 5"}, 1, "src", 7)
    assert not mapped.rows
    (record,) = mapped.quarantine
    assert record.table_name == "page" and "No model with id 5" in record.reason
    assert (record.source_file, record.source_row) == ("src", 7)
    assert json.loads(record.payload) == {"error": "No model with id 5"}


def test_next_cursor_end_and_empty_items_page():
    assert cm.next_cursor({"items": [], "metadata": {"nextCursor": "1|5"}}) == "1|5"
    assert cm.next_cursor({"items": [], "metadata": {"nextCursor": None}}) is None
    assert cm.next_cursor({"items": [], "metadata": {}}) is None
    assert cm.next_cursor({"items": [], "metadata": {"nextCursor": 123}}) == "123"
