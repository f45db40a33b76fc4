from __future__ import annotations

import pyarrow as pa
import pytest

from warehouse.lake import KEEP_VERSIONS, Lake


def test_write_commit_read_roundtrip(tmp_path):
    lake = Lake(str(tmp_path))
    lake.write_table("stats/x", pa.table({"a": [1, 2]}))
    assert lake.read_table("stats/x").column("a").to_pylist() == [1, 2]
    assert lake.glob("stats/x").endswith("*.parquet")


def test_uncommitted_table_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize"):
        Lake(str(tmp_path)).glob("never_written")


def test_failed_write_keeps_previous_version_readable(tmp_path):
    lake = Lake(str(tmp_path))
    lake.write_table("t", pa.table({"a": [1]}))
    before = lake.current("t")
    with pytest.raises(RuntimeError), lake.writing("t") as version:
        (tmp_path / "t" / version.name / "part-00000.parquet").write_bytes(b"half written")
        raise RuntimeError("killed")
    assert lake.current("t") == before
    assert lake.read_table("t").column("a").to_pylist() == [1]
    assert sorted(p.name for p in (tmp_path / "t").iterdir() if p.name.startswith("version-")) == [
        before.name
    ]


def test_orphan_of_a_killed_run_is_pruned_and_old_versions_bounded(tmp_path):
    lake = Lake(str(tmp_path))
    lake.write_table("t", pa.table({"a": [0]}))
    orphan = lake.new_version("t")  # a run killed before commit leaves this behind
    for i in range(1, 5):
        lake.write_table("t", pa.table({"a": [i]}))
    names = sorted(p.name for p in (tmp_path / "t").iterdir() if p.name.startswith("version-"))
    assert len(names) == KEEP_VERSIONS
    assert orphan.name not in names
    assert lake.read_table("t").column("a").to_pylist() == [4]
