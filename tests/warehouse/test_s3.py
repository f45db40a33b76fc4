"""The lake and the release on S3 (a local moto server), through fsspec/s3fs."""

from __future__ import annotations

import pyarrow.parquet as pq
import s3fs

from tests.factory import image_row, model_row, to_table
from warehouse.clean import CleanConfig, clean_release_table, images_spec, models_spec
from warehouse.duck import connect
from warehouse.lake import Lake
from warehouse.release import discover, land_release_table, open_landing
from warehouse.safety import LexiconScorer
from warehouse.schema import IMAGES, MODELS
from warehouse.tables import build_derived


def test_release_on_s3_lands_cleans_and_derives_into_an_s3_lake(s3, s3_bucket):
    fs = s3fs.S3FileSystem(**s3)
    release = f"s3://{s3_bucket}/release"
    images = [image_row(i, 1 + i % 2) for i in range(1, 6)] + [image_row(9, width=-1)]
    for name, rows, table in (
        ("images", images, IMAGES),
        ("models", [model_row(1), model_row(2)], MODELS),
    ):
        with fs.open(f"{s3_bucket}/release/{name}/part-0.parquet", "wb") as f:
            pq.write_table(to_table(rows, table), f)

    assert discover(release, IMAGES, s3) == [f"{release}/images/part-0.parquet"]
    lake = Lake(f"s3://{s3_bucket}/lake", s3)
    for table in (IMAGES, MODELS):
        land_release_table(lake, f"raw/{table.name}", discover(release, table, s3), table, s3)
    con = connect(lake)
    cfg = CleanConfig()
    reports = [
        clean_release_table(
            con,
            lake,
            spec,
            cfg,
            LexiconScorer.bundled(),
            open_landing(lake, spec.raw, spec.table, "salt", s3),
        )
        for spec in (models_spec(cfg), images_spec(cfg))
    ]
    assert [r.rows_out for r in reports] == [2, 5]
    assert reports[1].reasons == {"non-positive width/height": 1}
    assert build_derived(con, lake, "interactions") > 0  # users aggregate interactions
    assert build_derived(con, lake, "users") == 2
    assert fs.exists(f"{s3_bucket}/lake/images/{lake.current('images').name}/part-00000.parquet")
    # the rows read back from S3 are the good ones, and the bad one is quarantined with its key
    kept = con.execute(f"SELECT imageId FROM {lake.scan('images')} ORDER BY 1").fetchall()
    assert kept == [(i,) for i in range(1, 6)]
    quarantined = con.execute(
        f"SELECT reason, record_key FROM {lake.scan('quarantine/images')}"
    ).fetchall()
    assert quarantined == [("non-positive width/height", "imageId=9/modelVersionId=1")]


def test_each_test_gets_a_fresh_empty_bucket(s3, s3_bucket):
    fs = s3fs.S3FileSystem(**s3)
    assert fs.ls(s3_bucket, refresh=True) == []  # exists (ls of a missing bucket raises)
