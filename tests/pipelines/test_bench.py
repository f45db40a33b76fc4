"""The full-scale benchmark's pieces on tiny inputs: the single-file rewrite, the pandas
baseline, the report's ratios and verdict."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipelines.bench import ChildRun, format_report, pandas_clean, single_file_release
from tests.factory import image_row, model_row, to_table, write_release
from warehouse.schema import IMAGES


def _sample(tmp_path):
    """A two-shard release with the generator's manifest layout."""
    root = write_release(
        tmp_path / "sample", [image_row(i) for i in range(10)], [model_row(1), model_row(2)]
    )
    pq.write_table(
        to_table([image_row(i) for i in range(10, 25)], IMAGES), root / "images/p1.parquet"
    )
    manifest = {
        "files": {
            "images": ["images/part-0.parquet", "images/p1.parquet"],
            "models": ["models/part-0.parquet"],
        }
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_single_file_release_has_equal_row_groups_and_is_cached(tmp_path):
    sample = _sample(tmp_path)
    out = single_file_release(sample, tmp_path / "single", row_groups=4)
    images = pq.ParquetFile(out / "images.parquet")
    sizes = [images.metadata.row_group(i).num_rows for i in range(images.metadata.num_row_groups)]
    assert sizes == [7, 7, 7, 4]
    assert images.read().column("imageId").to_pylist() == list(range(25))
    assert pq.ParquetFile(out / "models.parquet").metadata.num_rows == 2
    stamp = (out / "images.parquet").stat().st_mtime_ns
    single_file_release(sample, tmp_path / "single", row_groups=4)
    assert (out / "images.parquet").stat().st_mtime_ns == stamp  # reused
    single_file_release(sample, tmp_path / "single", row_groups=2)
    images = pq.ParquetFile(out / "images.parquet")
    assert images.metadata.num_row_groups == 2  # another layout: rewritten


def test_pandas_baseline_reads_dedups_and_filters(tmp_path):
    pytest.importorskip("pandas")
    rows = [image_row(1), image_row(1), image_row(2, browsingLevel=4), image_row(3)]
    rows.append(image_row(4, userHash=None))
    path = tmp_path / "images.parquet"
    pq.write_table(to_table(rows, IMAGES), path)
    result = pandas_clean(str(path))
    assert (result["rows_in"], result["rows_out"]) == (5, 2)
    assert set(result["steps"]) == {"read_parquet", "drop_duplicates", "filter"}


def _core(wall: float, cpu: float, rss: float) -> ChildRun:
    summary = {
        "steps": {"raw_images": wall / 2, "images": wall / 2},
        "raw_image_rows": 100,
        "raw_model_rows": 10,
        "clean_image_rows": 90,
        "quarantined": 8,
        "cpu_s": cpu,
        "peak_rss_gib": rss,
    }
    return ChildRun(wall, summary)


def test_report_prints_ratios_to_pandas_and_the_verdict():
    pandas = ChildRun(
        40.0,
        {"rows_in": 100, "rows_out": 80, "steps": {}, "cpu_s": 38.0, "peak_rss_gib": 8.0},
    )
    fast = {"sharded": _core(20.0, 35.0, 2.0), "single": _core(25.0, 36.0, 2.5), "pandas": pandas}
    report = format_report(fast)
    assert "0.50x" in report and "0.62x" in report  # wall / pandas per shape
    assert "0.25x" in report  # peak RSS / pandas (sharded)
    assert report.rstrip().endswith("within targets")
    slow = {**fast, "single": _core(45.0, 60.0, 2.5)}
    assert format_report(slow).rstrip().endswith("OUTSIDE targets")
    slower_than_pandas = {**fast, "pandas": ChildRun(22.0, pandas.summary)}
    assert format_report(slower_than_pandas).rstrip().endswith("OUTSIDE targets")
