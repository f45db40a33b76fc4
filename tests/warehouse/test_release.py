"""Release ingest: schema validation, type tolerance and every bad file / bad row."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.factory import image_row, model_row, to_table, write_release
from warehouse.lake import Lake
from warehouse.release import (
    LandingReport,
    ReleaseFormatError,
    discover,
    land_release_table,
    open_landing,
)
from warehouse.schema import IMAGES, MODELS, raw_landing_schema


@dataclass
class Read:
    """What landing and then reading every row of the landing gave."""

    landing: LandingReport
    rows: int
    files: list[str]
    row_errors: dict[str, int] = field(default_factory=dict)
    raw_usernames_hashed: int = 0


def read_all(lake: Lake, table=IMAGES) -> tuple[pa.Table, dict[str, int], int]:
    """Every canonical row of the committed landing, as the clean stage reads it, with the
    row errors by message and the raw usernames hashed."""
    landing = open_landing(lake, f"raw/{table.name}", table, "salt")
    counters: dict[str, int] = {}
    batches = [b for unit in landing.units for b in landing.batches(unit, counters)]
    rows = pa.Table.from_batches(batches, schema=raw_landing_schema(table))
    errors = rows.column("_ingest_error").drop_null()
    counts = {i["values"]: i["counts"] for i in pc.value_counts(errors).to_pylist()}
    return rows, counts, counters.get("raw_usernames_hashed", 0)


def land(tmp_path, table=IMAGES):
    lake = Lake(str(tmp_path / "lake"))
    files = discover(str(tmp_path / "release"), table)
    landed = land_release_table(lake, f"raw/{table.name}", files, table)
    rows, errors, hashed = read_all(lake, table)
    report = Read(landed, landed.rows, landed.files, errors, hashed)
    return lake, report, rows


def write_images(tmp_path, table: pa.Table, name="part-0.parquet"):
    folder = tmp_path / "release" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name)
    return folder / name


def test_discover_layouts(tmp_path):
    write_release(tmp_path / "a", [image_row(1)], [model_row(1)])
    assert [p.split("/")[-2] for p in discover(str(tmp_path / "a"), IMAGES)] == ["images"]
    (tmp_path / "b").mkdir()
    pq.write_table(to_table([model_row(1)], MODELS), tmp_path / "b" / "models.parquet")
    assert discover(str(tmp_path / "b"), MODELS)[0].endswith("models.parquet")
    hf = tmp_path / "c" / "ImageGem-images" / "data"
    hf.mkdir(parents=True)
    pq.write_table(to_table([image_row(1)], IMAGES), hf / "train-00000-of-00001.parquet")
    assert len(discover(str(tmp_path / "c"), IMAGES)) == 1
    with pytest.raises(ReleaseFormatError, match="no parquet files for table 'images'"):
        discover(str(tmp_path / "b"), IMAGES)
    with pytest.raises(ReleaseFormatError, match="does not exist"):
        discover(str(tmp_path / "nope"), IMAGES)


def test_several_shards_land_with_lineage(tmp_path):
    write_images(tmp_path, to_table([image_row(1), image_row(2)], IMAGES), "part-0.parquet")
    write_images(tmp_path, to_table([image_row(3)], IMAGES), "part-1.parquet")
    _, report, landed = land(tmp_path)
    assert report.rows == 3 == landed.num_rows
    assert landed.column("_source_row").to_pylist() == [0, 1, 0]
    assert sorted(set(landed.column("_source_file").to_pylist())) == sorted(report.files)
    assert landed.column("_ingest_error").null_count == 3


def test_pandas_round_trip_types_are_accepted(tmp_path):
    """Nullable ints as float64 with NaN, int32 ids, timestamps as timestamp, large strings."""
    good = to_table([image_row(1), image_row(2, seed=None, steps=None)], IMAGES)
    cols = {}
    for f in good.schema:
        col = good.column(f.name)
        if f.name in ("seed", "steps", "clipSkip", "likeCount"):
            col = col.cast(pa.float64())
        elif f.name in ("imageId", "modelVersionId"):
            col = col.cast(pa.int32())
        elif f.name == "createdAt":
            col = pa.array(
                np.array(["2023-06-01T12:00:00", "2023-06-02T00:00:00"], dtype="datetime64[us]")
            )
        elif f.name == "prompt":
            col = col.cast(pa.large_string())
        cols[f.name] = col
    write_images(tmp_path, pa.table(cols))
    _, report, landed = land(tmp_path)
    assert landed.schema.field("seed").type == pa.int64()
    assert landed.column("seed").to_pylist() == [1234, None]
    assert landed.column("steps").to_pylist() == [30, None]
    assert landed.column("createdAt").to_pylist() == ["2023-06-01 12:00:00", "2023-06-02 00:00:00"]
    assert report.row_errors == {}


def test_fractional_value_in_integer_column_is_a_row_error(tmp_path):
    t = to_table([image_row(1), image_row(2)], IMAGES)
    t = t.set_column(t.schema.get_field_index("steps"), "steps", pa.array([30.0, 30.5]))
    write_images(tmp_path, t)
    _, report, landed = land(tmp_path)
    assert landed.column("_ingest_error").to_pylist() == [
        None,
        "non-integer value in integer column steps",
    ]
    assert report.row_errors == {"non-integer value in integer column steps": 1}


def test_invalid_utf8_is_a_row_error_not_a_crash(tmp_path):
    t = to_table([image_row(1), image_row(2)], IMAGES)
    prompts = pa.array([b"fine prompt", b"bad \xff\xfe bytes"], type=pa.binary())
    t = t.set_column(t.schema.get_field_index("prompt"), "prompt", prompts)
    write_images(tmp_path, t)
    _, report, landed = land(tmp_path)
    assert landed.column("_ingest_error").to_pylist() == [None, "invalid UTF-8 in column prompt"]
    assert landed.column("prompt").to_pylist()[1] == "bad \\xff\\xfe bytes"  # kept, escaped


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.drop_columns(["prompt"]), "missing column\\(s\\) prompt"),
        (
            lambda t: t.rename_columns(["Prompt" if c == "prompt" else c for c in t.column_names]),
            "missing column\\(s\\) prompt.*unexpected columns present: Prompt",
        ),
        (
            lambda t: t.set_column(t.schema.get_field_index("width"), "width", pa.array(["512"])),
            "column 'width' has type string, expected int",
        ),
        (
            lambda t: t.set_column(t.schema.get_field_index("prompt"), "prompt", pa.array([1])),
            "column 'prompt' has type int64, expected string",
        ),
    ],
)
def test_file_level_schema_errors_name_file_and_column(tmp_path, mutate, message):
    path = write_images(tmp_path, mutate(to_table([image_row(1)], IMAGES)))
    with pytest.raises(ReleaseFormatError, match=message) as info:
        land(tmp_path)
    assert str(path) in str(info.value)


def test_bad_shard_fails_before_anything_is_committed(tmp_path):
    write_images(tmp_path, to_table([image_row(1)], IMAGES), "part-0.parquet")
    write_images(
        tmp_path, to_table([image_row(2)], IMAGES).drop_columns(["seed"]), "part-1.parquet"
    )
    with pytest.raises(ReleaseFormatError, match="part-1.parquet: missing column"):
        land(tmp_path)
    assert Lake(str(tmp_path / "lake")).current("raw/images") is None


def test_empty_file(tmp_path):
    folder = tmp_path / "release" / "images"
    folder.mkdir(parents=True)
    (folder / "part-0.parquet").write_bytes(b"")
    with pytest.raises(ReleaseFormatError, match="file is empty \\(0 bytes\\)"):
        land(tmp_path)


def test_truncated_file(tmp_path):
    path = write_images(tmp_path, to_table([image_row(i) for i in range(50)], IMAGES))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReleaseFormatError, match="not a readable parquet file"):
        land(tmp_path)


def test_zero_row_file_is_fine(tmp_path):
    write_images(tmp_path, to_table([], IMAGES))
    _, report, landed = land(tmp_path)
    assert report.rows == 0 == landed.num_rows


def test_raw_usernames_are_hashed_at_landing_and_never_stored(tmp_path):
    from warehouse.users import salted_user_hash

    hashed = "AB" * 32  # an upper-case release hash: kept, lower-cased
    rows = [
        image_row(1, userHash="  Pixel_Wizard_42 "),
        image_row(2, userHash=hashed),
        image_row(3, userHash=""),
    ]
    write_images(tmp_path, to_table(rows, IMAGES))
    lake, report, landed = land(tmp_path)
    assert landed.column("userHash").to_pylist() == [
        salted_user_hash("Pixel_Wizard_42", "salt"),
        hashed.lower(),
        None,
    ]
    assert report.raw_usernames_hashed == 1
    written = list((tmp_path / "lake").rglob("*"))
    assert written
    for path in written:
        if path.is_file():
            assert b"Pixel_Wizard" not in path.read_bytes()


def test_hashing_needs_a_salt():
    from warehouse.users import normalize_user_hashes

    with pytest.raises(ValueError, match="salt"):
        normalize_user_hashes(pa.array(["x"]), "")


# -- sad paths: bytes, numbers and types met in the wild ---------------------------------------


def _chunk(path, column: str, row_group: int = 0):
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    return meta.row_group(row_group).column(names.index(column))


def _overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("where", ["page header", "page body (checksummed)"])
def test_corrupt_data_page_behind_a_valid_footer_is_a_clear_error(tmp_path, where):
    """The footer reads fine (schema validated, so the landing commits), a data page does
    not: reading it names the file, the row group and the row."""
    write_images(tmp_path, to_table([image_row(i) for i in range(10)], IMAGES), "part-0.parquet")
    bad = tmp_path / "release" / "images" / "part-1.parquet"
    rows = to_table([image_row(i) for i in range(100, 400)], IMAGES)
    pq.write_table(rows, bad, row_group_size=100, use_dictionary=False, write_page_checksum=True)
    chunk = _chunk(bad, "prompt", row_group=1)
    offset = chunk.data_page_offset
    if where == "page body (checksummed)":
        offset += chunk.total_compressed_size // 2
    _overwrite(bad, offset, b"\xff" * 16)
    assert pq.ParquetFile(bad).metadata.num_rows == 300  # the footer is intact
    with pytest.raises(ReleaseFormatError) as info:
        land(tmp_path)
    message = str(info.value)
    assert str(bad) in message
    assert "row group 1 at row 100" in message


def test_a_file_changed_after_landing_is_refused_until_landed_again(tmp_path):
    path = write_images(tmp_path, to_table([image_row(1), image_row(2)], IMAGES))
    lake, report, _ = land(tmp_path)
    assert report.landing.row_groups == 1
    pq.write_table(to_table([image_row(i) for i in range(50)], IMAGES), path)
    with pytest.raises(ReleaseFormatError, match="changed since it was landed.*raw_images"):
        open_landing(lake, "raw/images", IMAGES, "salt")
    path.unlink()
    with pytest.raises(ReleaseFormatError, match="landed release file is gone"):
        open_landing(lake, "raw/images", IMAGES, "salt")
    write_images(tmp_path, to_table([image_row(i) for i in range(50)], IMAGES))
    land_release_table(lake, "raw/images", discover(str(tmp_path / "release"), IMAGES), IMAGES)
    assert read_all(lake)[0].num_rows == 50


def test_a_row_group_that_no_longer_matches_the_manifest_is_refused(tmp_path):
    """Same size and version cannot be faked here, so the manifest is edited instead: a
    landed row count the file does not hold is named."""
    write_images(tmp_path, to_table([image_row(1), image_row(2)], IMAGES))
    lake, _, _ = land(tmp_path)
    manifest = lake.read_table("raw/images")
    lake.write_table("raw/images", manifest.set_column(6, "rows", pa.array([3], pa.int64())))
    with pytest.raises(ReleaseFormatError, match="row group 0 no longer holds the 3 landed"):
        open_landing(lake, "raw/images", IMAGES, "salt")


def test_failed_landing_keeps_the_previous_version(tmp_path):
    write_images(tmp_path, to_table([image_row(1), image_row(2)], IMAGES), "part-0.parquet")
    lake, _, _ = land(tmp_path)
    before = lake.current("raw/images")
    write_images(
        tmp_path, to_table([image_row(3)], IMAGES).drop_columns(["seed"]), "part-1.parquet"
    )
    with pytest.raises(ReleaseFormatError, match="missing column"):
        land(tmp_path)
    assert lake.current("raw/images") == before
    assert lake.read_table("raw/images").column("rows").to_pylist() == [2]


def test_landing_needs_a_salt_to_be_read(tmp_path):
    write_images(tmp_path, to_table([image_row(1)], IMAGES))
    lake, _, _ = land(tmp_path)
    with pytest.raises(ValueError, match="salt"):
        open_landing(lake, "raw/images", IMAGES, "")


def test_row_groups_are_units_with_lineage(tmp_path):
    """A single file of several row groups is landed as one manifest row per row group;
    _source_row counts through the whole file; nothing but the manifest is written."""
    rows = [image_row(i) for i in range(1, 12)]
    path = tmp_path / "release" / "images.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(to_table(rows, IMAGES), path, row_group_size=4)
    lake = Lake(str(tmp_path / "lake"))
    files = discover(str(tmp_path / "release"), IMAGES)
    report = land_release_table(lake, "raw/images", files, IMAGES)
    manifest = lake.read_table("raw/images")
    assert manifest.column("row_group").to_pylist() == [0, 1, 2]
    assert manifest.column("first_row").to_pylist() == [0, 4, 8]
    assert manifest.column("rows").to_pylist() == [4, 4, 3]
    assert manifest.column("file_bytes").to_pylist() == [path.stat().st_size] * 3
    assert report.rows == 11 and report.row_groups == 3
    assert len(list((tmp_path / "lake").rglob("*.parquet"))) == 1
    landed, _, _ = read_all(lake)
    assert landed.column("_source_row").to_pylist() == list(range(11))
    assert landed.column("imageId").to_pylist() == list(range(1, 12))
    assert set(landed.column("_source_file").to_pylist()) == {str(path)}


def test_inf_and_huge_values_in_integer_columns_are_row_errors(tmp_path):
    """inf and values at or beyond 2^63 (as float, or as uint64) are row errors: the row is
    kept with a reason for the clean stage, the value nulled, never wrapped around."""
    t = to_table([image_row(i) for i in range(1, 8)], IMAGES)
    steps = pa.array([30.0, float("inf"), float("-inf"), 2.0**63, -1e19, 20.0, 20.0])
    seeds = pa.array([1, 2, 3, 4, 5, 2**63, 2**64 - 1], type=pa.uint64())
    t = t.set_column(t.schema.get_field_index("steps"), "steps", steps)
    t = t.set_column(t.schema.get_field_index("seed"), "seed", seeds)
    write_images(tmp_path, t)
    _, report, landed = land(tmp_path)
    assert landed.column("_ingest_error").to_pylist() == [
        None,
        "non-finite value in integer column steps",
        "non-finite value in integer column steps",
        "value out of int64 range in integer column steps",
        "value out of int64 range in integer column steps",
        "value out of int64 range in integer column seed",
        "value out of int64 range in integer column seed",
    ]
    assert landed.column("steps").to_pylist() == [30, None, None, None, None, 20, 20]
    assert landed.column("seed").to_pylist() == [1, 2, 3, 4, 5, None, None]
    assert report.row_errors == {
        "non-finite value in integer column steps": 2,
        "value out of int64 range in integer column steps": 2,
        "value out of int64 range in integer column seed": 2,
    }


def test_uint64_beyond_int64_is_named_in_the_row_error(tmp_path):
    t = to_table([image_row(1), image_row(2)], IMAGES)
    posts = pa.array([7, 2**63 + 5], type=pa.uint64())
    t = t.set_column(t.schema.get_field_index("postId"), "postId", posts)
    write_images(tmp_path, t)
    _, report, landed = land(tmp_path)
    assert landed.column("_ingest_error").to_pylist() == [
        None,
        "value out of int64 range in integer column postId",
    ]
    assert landed.column("postId").to_pylist() == [7, None]


def test_timezone_aware_timestamps_land_as_utc_text(tmp_path):
    t = to_table([image_row(1), image_row(2), image_row(3)], IMAGES)
    stamps = pa.array(
        [
            pd_stamp("2023-06-01T14:00:00+02:00"),
            pd_stamp("2023-12-31T23:30:00-01:00"),
            None,
        ],
        type=pa.timestamp("ms", tz="Europe/Paris"),
    )
    t = t.set_column(t.schema.get_field_index("createdAt"), "createdAt", stamps)
    write_images(tmp_path, t)
    _, report, landed = land(tmp_path)
    assert landed.schema.field("createdAt").type == pa.string()
    assert landed.column("createdAt").to_pylist() == [
        "2023-06-01 12:00:00",
        "2024-01-01 00:30:00",
        None,
    ]
    assert report.row_errors == {}


def pd_stamp(text: str) -> int:
    """Milliseconds since the epoch (UTC) of an ISO 8601 text with an offset."""
    from datetime import datetime

    return int(datetime.fromisoformat(text).timestamp() * 1000)


def test_dictionary_encoded_columns_land_as_plain_values(tmp_path):
    rows = [image_row(i, sampler="Euler a" if i % 2 else "DPM++ 2M") for i in range(1, 7)]
    plain = to_table(rows, IMAGES)
    t = plain
    for name in ("sampler", "prompt", "userHash", "browsingLevel", "createdAt"):
        i = t.schema.get_field_index(name)
        t = t.set_column(i, name, pc.dictionary_encode(t.column(name)))
    assert pa.types.is_dictionary(t.schema.field("sampler").type)
    write_images(tmp_path, t)
    assert pa.types.is_dictionary(
        pq.read_schema(tmp_path / "release/images/part-0.parquet").field("sampler").type
    )
    _, report, landed = land(tmp_path)
    for name in ("sampler", "prompt", "userHash", "browsingLevel", "createdAt"):
        assert landed.schema.field(name).type == IMAGES.canonical_schema().field(name).type
        assert landed.column(name).to_pylist() == plain.column(name).to_pylist(), name
    assert report.row_errors == {}


def test_all_null_columns_of_null_type_are_accepted(tmp_path):
    t = to_table([image_row(1), image_row(2)], IMAGES)
    for name in ("comfy", "clipSkip", "hiresUpscale", "hiresUpscaler", "seed"):
        t = t.set_column(t.schema.get_field_index(name), name, pa.nulls(2))
    assert t.schema.field("clipSkip").type == pa.null()
    write_images(tmp_path, t)
    _, report, landed = land(tmp_path)
    assert landed.schema.equals(
        pa.schema(list(IMAGES.canonical_schema()) + list(landed.schema)[-3:])
    )
    for name in ("comfy", "clipSkip", "hiresUpscale", "hiresUpscaler", "seed"):
        assert landed.column(name).to_pylist() == [None, None], name
    assert landed.column("imageId").to_pylist() == [1, 2]
    assert report.row_errors == {}
