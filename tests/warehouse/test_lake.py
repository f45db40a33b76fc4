"""The versioned Parquet lake: commit, read, scan from SQL, failed writes, pruning."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from warehouse.lake import CURRENT, KEEP_VERSIONS, Lake


def test_write_commit_read_roundtrip(tmp_path):
    lake = Lake(str(tmp_path))
    version = lake.write_table("stats/x", pa.table({"a": [1, 2]}))
    assert lake.current("stats/x") == version
    assert (tmp_path / "stats" / "x" / CURRENT).read_text() == version.name
    assert lake.read_table("stats/x").column("a").to_pylist() == [1, 2]
    assert lake.glob("stats/x") == f"{tmp_path}/stats/x/{version.name}/*.parquet"


def test_scan_is_the_sql_of_the_committed_version(tmp_path):
    root = tmp_path / "it's here"  # a quote in the path must not break the SQL
    lake = Lake(str(root))
    lake.write_table("t", pa.table({"a": [1, 2, 3]}))
    lake.write_table("t", pa.table({"a": [7, 8]}))  # a second commit replaces the first
    assert duckdb.sql(f"SELECT sum(a), count(*) FROM {lake.scan('t')}").fetchall() == [(15, 2)]
    assert lake.scan("t") == "read_parquet('" + lake.glob("t").replace("'", "''") + "')"


def test_uncommitted_table_is_a_clear_error(tmp_path):
    lake = Lake(str(tmp_path))
    assert lake.current("never_written") is None
    for read in (lake.glob, lake.scan, lake.read_table):
        with pytest.raises(FileNotFoundError, match="'never_written'.*materialize"):
            read("never_written")


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


def test_progress_logs_count_rate_and_eta_and_always_the_last_line(caplog):
    import logging

    from warehouse.progress import Progress

    now = [0.0]
    log = logging.getLogger("test.progress")
    progress = Progress("buckets", 100, log, every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger=log.name):
        now[0] = 1.0
        progress.advance(10)  # 1 s since the start: not yet
        now[0] = 20.0
        progress.advance(30)  # 40 done in 20 s: 2/s, 60 left → 30 s
        now[0] = 21.0
        progress.advance(60)  # the total is reached: always logged
    assert [r.getMessage() for r in caplog.records] == [
        "buckets: 40/100 (40%), 2/s, ETA 30s",
        "buckets: 100/100 (100%), 5/s, ETA 0s",
    ]
