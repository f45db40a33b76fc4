"""The derived tables and Table 1 on a small hand-made release, against hand-counted values."""

from __future__ import annotations

import hashlib
from datetime import datetime

import pyarrow as pa
import pytest

from tests.conftest import run_warehouse
from tests.factory import image_row, model_row, user_hash, write_release
from warehouse.lake import Lake
from warehouse.stats import compute_table1
from warehouse.tables import DERIVED, build_derived, duplicate_keys

ANN, BOB, CID, DAN, EVE, UPL = (user_hash(n) for n in ("ann", "bob", "cid", "dan", "eve", "upl"))
DOG_TAGGED = "A Dog,  <lora:lora_1:0.8>, <lora:lora_2> , park"  # image 1 (two LoRAs)
DOG_SHORT = "a dog, park <lora:lora_1:0.5>"  # images 2, 5, 8
CAT = "<LORA:Lora_3:1.5> cat"  # upper-case tag: not stripped, but found for image_loras
ONLY_TAG = "<lora:lora_2:0.7>"  # normalises to nothing: no prompts row


def day(d: int) -> str:
    return f"2023-06-{d:02d} 12:00:00"


IMAGES = [
    image_row(1, 1, userHash=ANN, prompt=DOG_TAGGED, createdAt=day(1)),
    image_row(1, 2, userHash=ANN, prompt=DOG_TAGGED, createdAt=day(1)),
    image_row(2, 1, userHash=BOB, prompt=DOG_SHORT, createdAt=day(2)),
    image_row(3, 3, userHash=BOB, prompt=CAT, createdAt=day(3)),
    image_row(4, 2, userHash=CID, prompt=ONLY_TAG, createdAt=day(4)),
    image_row(5, 1, userHash=CID, prompt=DOG_SHORT, createdAt=day(5)),
    image_row(6, 3, userHash=ANN, prompt=None, createdAt=day(6)),
    image_row(8, 1, userHash=ANN, prompt=DOG_SHORT, createdAt=day(8)),
    image_row(9, 2, userHash=BOB, prompt="a red fox", createdAt=day(9)),
    # removed by the safety filter: counted in Table 1's raw row only
    image_row(7, 1, userHash=DAN, prompt="a dog, park", browsingLevel=4, nsfw=1, createdAt=day(7)),
]
MODELS = [
    model_row(1, userHash=UPL),
    model_row(2, userHash=UPL, fileId=21, primary=0, fileName="lora_2_extra.safetensors"),
    model_row(2, userHash=UPL),
    model_row(3, userHash=ANN, tags="anime, , portrait ,"),
    model_row(4, userHash=EVE, modelNsfwLevel=33, tags="gore, anime"),  # unsafe
]


@pytest.fixture(scope="module")
def wh(tmp_path_factory):
    root = tmp_path_factory.mktemp("derived")
    return run_warehouse(write_release(root / "release", IMAGES, MODELS), root / "lake")


def by_key(wh, table: str, key: str, columns: str) -> dict:
    rows = wh.rows(table, f"SELECT {key}, {columns}")
    assert len({r[0] for r in rows}) == len(rows), f"{table}: duplicate {key}"
    return {r[0]: r[1:] for r in rows}


def test_every_derived_table_keeps_its_key(wh):
    for name, table in DERIVED.items():
        assert wh.rows(name, "SELECT count(*)")[0][0] > 0, name
        assert duplicate_keys(wh.con, wh.lake, name, table.key) == 0, name


def test_users(wh):
    users = by_key(
        wh,
        "users",
        "userHash",
        "n_image_rows, n_images, n_loras_used, n_loras_uploaded, is_uploader, first_seen_at, "
        "last_image_at",
    )
    assert users == {
        ANN: (4, 3, 3, 1, True, datetime(2023, 5, 1, 10), datetime(2023, 6, 8, 12)),
        BOB: (3, 3, 3, 0, False, datetime(2023, 6, 2, 12), datetime(2023, 6, 9, 12)),
        CID: (2, 2, 2, 0, False, datetime(2023, 6, 4, 12), datetime(2023, 6, 5, 12)),
        UPL: (0, 0, 0, 2, True, datetime(2023, 5, 1, 10), None),
    }
    # ordered by userHash
    assert [r[0] for r in wh.rows("users", "SELECT userHash")] == sorted(users)


def test_loras(wh):
    loras = by_key(
        wh,
        "loras",
        "modelVersionId",
        "fileId, n_files, has_primary_file, n_image_rows, n_users, tags",
    )
    assert loras == {
        1: (10, 1, True, 4, 3, ["anime", "style"]),
        2: (20, 2, True, 3, 3, ["anime", "style"]),  # the primary of its two files
        3: (30, 1, True, 2, 2, ["anime", "portrait"]),
    }


def test_image_loras(wh):
    rows = wh.rows(
        "image_loras",
        "SELECT imageId, modelVersionId, n_loras, lora_name, tag_weight, tag_in_prompt",
    )
    assert sorted(rows) == [
        (1, 1, 2, "lora_1", 0.8, True),
        (1, 2, 2, "lora_2", 1.0, True),  # <lora:lora_2> has no weight: 1.0
        (2, 1, 1, "lora_1", 0.5, True),
        (3, 3, 1, "lora_3", 1.5, True),  # found case-insensitively
        (4, 2, 1, "lora_2", 0.7, True),
        (5, 1, 1, "lora_1", 0.5, True),
        (6, 3, 1, "lora_3", None, False),  # no prompt
        (8, 1, 1, "lora_1", 0.5, True),
        (9, 2, 1, "lora_2", None, False),  # the prompt does not name its LoRA
    ]


def test_prompts_fold_raw_variants_into_their_normalised_prompt(wh):
    prompts = by_key(
        wh,
        "prompts",
        "prompt",
        "prompt_id, n_images, n_users, n_raw_variants, first_seen_at, last_seen_at, "
        "example_raw_prompt",
    )
    assert set(prompts) == {"a dog, park", "<lora:lora_3:1.5> cat", "a red fox"}
    for text, row in prompts.items():
        assert row[0] == hashlib.sha256(text.encode()).hexdigest()[:16]
    # images 1, 2, 5, 8 under two raw variants, by ann, bob and cid
    assert prompts["a dog, park"][1:5] == (4, 3, 2, datetime(2023, 6, 1, 12))
    assert prompts["a dog, park"][5] == datetime(2023, 6, 8, 12)
    assert prompts["a dog, park"][6] in (DOG_TAGGED, DOG_SHORT)
    assert prompts["<lora:lora_3:1.5> cat"][1:4] == (1, 1, 1)
    assert prompts["<lora:lora_3:1.5> cat"][6] == CAT
    assert prompts["a red fox"][1:4] == (1, 1, 1)


def test_interactions(wh):
    rows = wh.rows("interactions", "SELECT userHash, item_kind, item_id, kind, n_events, first_at")
    by_kind: dict[str, dict] = {}
    for user, item_kind, item_id, kind, n_events, first_at in rows:
        by_kind.setdefault(kind, {})[(user, item_kind, item_id)] = (n_events, first_at)
    assert by_kind["generated_with"] == {
        (ANN, "lora", 1): (2, datetime(2023, 6, 1, 12)),  # images 1 and 8
        (ANN, "lora", 2): (1, datetime(2023, 6, 1, 12)),
        (ANN, "lora", 3): (1, datetime(2023, 6, 6, 12)),
        (BOB, "lora", 1): (1, datetime(2023, 6, 2, 12)),
        (BOB, "lora", 2): (1, datetime(2023, 6, 9, 12)),
        (BOB, "lora", 3): (1, datetime(2023, 6, 3, 12)),
        (CID, "lora", 1): (1, datetime(2023, 6, 5, 12)),
        (CID, "lora", 2): (1, datetime(2023, 6, 4, 12)),
    }
    assert set(by_kind["created"]) == {
        (ANN, "image", 1),
        (ANN, "image", 6),
        (ANN, "image", 8),
        (BOB, "image", 2),
        (BOB, "image", 3),
        (BOB, "image", 9),
        (CID, "image", 4),
        (CID, "image", 5),
    }
    assert {v[0] for v in by_kind["created"].values()} == {1}
    assert by_kind["uploaded"] == {
        (UPL, "lora", 1): (1, datetime(2023, 5, 1, 10)),
        (UPL, "lora", 2): (1, datetime(2023, 5, 1, 10)),
        (ANN, "lora", 3): (1, datetime(2023, 5, 1, 10)),
    }


def test_table1_counts_raw_and_filtered_rows(wh):
    rows = compute_table1(wh.con, wh.lake).rows
    raw, filtered = rows["raw"], rows["filtered"]
    # raw = the clean rows + the rows the safety filter removed (image 7, model 4)
    assert {k: raw[k] for k in ("images", "unique_prompts", "distinct_image_ids")} == {
        "images": 10,
        "unique_prompts": 6,  # DOG_TAGGED, DOG_SHORT, CAT, ONLY_TAG, "a red fox", "a dog, park"
        "distinct_image_ids": 9,
    }
    assert {k: filtered[k] for k in ("images", "unique_prompts", "distinct_image_ids")} == {
        "images": 9,
        "unique_prompts": 5,
        "distinct_image_ids": 8,
    }
    assert (raw["loras"], raw["unique_tags"], raw["uploaders"], raw["users"]) == (4, 4, 3, 6)
    assert (filtered["loras"], filtered["unique_tags"]) == (3, 3)  # anime, style, portrait
    assert (filtered["uploaders"], filtered["users"]) == (2, 4)  # upl, ann; + bob, cid
    assert raw["images_per_lora_used"] == pytest.approx(10 / 3)
    assert filtered["images_per_user"] == pytest.approx(9 / 4)
    assert filtered["loras_per_uploader"] == pytest.approx(3 / 2)


def test_fixture_quarantines_exactly_the_unsafe_rows(wh):
    assert wh.rows("quarantine/images", "SELECT record_key, reason") == [
        ("imageId=7/modelVersionId=1", "unsafe: browsingLevel")
    ]
    assert wh.rows("quarantine/models", "SELECT reason") == [("unsafe: blocked nsfw level",)]


def test_duplicate_keys_counts_repeated_keys_exactly(wh):
    table = pa.table(
        {
            "a": ["x", "x", "y", None, None, "z"],
            "b": [1, 1, 1, 2, 2, None],
        }
    )
    wh.lake.write_table("dupes_test", table)
    assert duplicate_keys(wh.con, wh.lake, "dupes_test", ("a", "b")) == 2  # (x,1), (NULL,2)
    assert duplicate_keys(wh.con, wh.lake, "dupes_test", ("a",)) == 2  # x, NULL
    wh.lake.write_table("dupes_test", table.slice(1, 3))  # (x,1), (y,1), (NULL,2)
    assert duplicate_keys(wh.con, wh.lake, "dupes_test", ("a", "b")) == 0


def test_users_and_loras_need_interactions_built_first(tmp_path, wh):
    lake = Lake(str(tmp_path / "lake"))
    for table in ("images", "models"):  # the clean tables alone, no interactions yet
        lake.write_table(table, wh.lake.read_table(table))
    assert [DERIVED[n].needs for n in ("users", "loras")] == [
        ("interactions",),
        ("models", "interactions"),
    ]
    for name in ("users", "loras"):
        with pytest.raises(FileNotFoundError, match="'interactions' has no committed version"):
            build_derived(wh.con, lake, name)
    assert lake.current("users") is None and lake.current("loras") is None
    # DERIVED is in build order: every table comes after the derived tables it needs
    order = list(DERIVED)
    edges = [(n, name) for name, table in DERIVED.items() for n in table.needs if n in DERIVED]
    assert {("interactions", "users"), ("interactions", "loras")} <= set(edges)
    assert [(a, b) for a, b in edges if order.index(a) > order.index(b)] == []
