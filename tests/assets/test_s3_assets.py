"""The whole graph with the release and the lake on S3 (local moto server), catalog local."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import s3fs

from pipelines.resources import PipelineResources, WarehouseResource
from pipelines.runner import materialize_all
from tests.conftest import assert_every_check_passed
from tests.factory import image_row, model_row, to_table
from warehouse.catalog import connect_readonly
from warehouse.schema import IMAGES, MODELS

pytestmark = pytest.mark.slow


def test_materialize_with_s3_release_and_s3_lake(s3, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    fs = s3fs.S3FileSystem(**s3)
    images = [image_row(i, 1 + i % 2) for i in range(1, 8)] + [image_row(50, browsingLevel=16)]
    for name, rows, table in (
        ("images", images, IMAGES),
        ("models", [model_row(1), model_row(2)], MODELS),
    ):
        with fs.open(f"{s3_bucket}/assets-release/{name}/part-0.parquet", "wb") as f:
            pq.write_table(to_table(rows, table), f)

    settings = WarehouseResource(
        home=f"s3://{s3_bucket}/home",
        source="release",
        release_path=f"s3://{s3_bucket}/assets-release",
        catalog=str(tmp_path / "warehouse.duckdb"),
        s3_endpoint_url=s3["client_kwargs"]["endpoint_url"],
    )
    result = materialize_all(PipelineResources(settings))
    assert result.success
    checks = assert_every_check_passed(result)
    assert {("images", "reconciliation"), ("warehouse_catalog", "no_raw_usernames")} <= checks
    assert fs.exists(f"{s3_bucket}/home/lake/images/{settings.lake().current('images').name}")
    assert not (tmp_path / "lake").exists()  # the lake went to S3, not next to the catalog
    con = connect_readonly(settings.catalog_path(), settings.lake())
    assert con.execute("SELECT imageId FROM images ORDER BY 1").fetchall() == [
        (i,) for i in range(1, 8)
    ]
    assert con.execute("SELECT reason, record_key FROM quarantine").fetchall() == [
        ("unsafe: browsingLevel", "imageId=50/modelVersionId=1")
    ]
