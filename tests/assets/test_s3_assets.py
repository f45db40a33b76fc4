"""The whole graph with the release and the lake on S3 (local moto server), catalog local."""

from __future__ import annotations

import pyarrow.parquet as pq
import s3fs

from pipelines.resources import PipelineResources, WarehouseResource
from pipelines.runner import materialize_all
from tests.factory import image_row, model_row, to_table
from warehouse.catalog import connect_readonly
from warehouse.schema import IMAGES, MODELS


def test_materialize_with_s3_release_and_s3_lake(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    fs = s3fs.S3FileSystem(**s3)
    images = [image_row(i, 1 + i % 2) for i in range(1, 8)] + [image_row(50, browsingLevel=16)]
    for name, rows, table in (
        ("images", images, IMAGES),
        ("models", [model_row(1), model_row(2)], MODELS),
    ):
        with fs.open(f"imagegem/assets-release/{name}/part-0.parquet", "wb") as f:
            pq.write_table(to_table(rows, table), f)

    settings = WarehouseResource(
        home="s3://imagegem/home",
        source="release",
        release_path="s3://imagegem/assets-release",
        catalog=str(tmp_path / "warehouse.duckdb"),
        s3_endpoint_url=s3["client_kwargs"]["endpoint_url"],
    )
    result = materialize_all(PipelineResources(settings))
    assert result.success
    assert all(c.passed for c in result.get_asset_check_evaluations())
    assert fs.exists(f"imagegem/home/lake/images/{settings.lake().current('images').name}")
    con = connect_readonly(settings.catalog_path(), settings.lake())
    assert con.execute("SELECT count(*) FROM images").fetchone() == (7,)
    assert con.execute("SELECT reason FROM quarantine").fetchall() == [("unsafe: browsingLevel",)]
