"""Shared fixtures: a tiny release built by code and a helper that runs the warehouse on it."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pytest

from tests.factory import image_row, model_row, write_release
from warehouse.clean import CleanConfig, StepReport, clean_release_table, images_spec, models_spec
from warehouse.duck import connect
from warehouse.lake import Lake
from warehouse.release import discover, land_release_table, open_landing
from warehouse.safety import LexiconScorer
from warehouse.schema import IMAGES, MODELS
from warehouse.tables import DERIVED, build_derived

if TYPE_CHECKING:
    import dagster as dg

SALT = "test-salt"


@dataclass
class WarehouseRun:
    lake: Lake
    con: duckdb.DuckDBPyConnection
    reports: dict[str, StepReport]

    def q(self, sql: str) -> list[tuple]:
        """Run ``sql`` where ``{table}`` stands for that lake table's committed Parquet."""
        resolved = re.sub(r"\{([a-z_/]+)\}", lambda m: self.lake.scan(m.group(1)), sql)
        return self.con.execute(resolved).fetchall()

    def rows(self, table: str, select: str = "SELECT *") -> list[tuple]:
        return self.q(f"{select} FROM {{{table}}}")


def run_warehouse(release: Path, lake_root: Path, cfg: CleanConfig | None = None) -> WarehouseRun:
    """Land, clean and derive every table with the plain functions the assets call."""
    cfg = cfg or CleanConfig()
    lake = Lake(str(lake_root))
    log = logging.getLogger("test")
    for table in (IMAGES, MODELS):
        land_release_table(lake, f"raw/{table.name}", discover(str(release), table), table, log=log)
    con = connect(lake)
    reports = {}
    for spec in (models_spec(cfg), images_spec(cfg)):
        landing = open_landing(lake, spec.raw, spec.table, SALT)
        reports[spec.table.name] = clean_release_table(
            con, lake, spec, cfg, LexiconScorer.bundled(), landing, log
        )
    for name in DERIVED:
        build_derived(con, lake, name)
    return WarehouseRun(lake, con, reports)


def assert_every_check_passed(result: dg.ExecuteInJobResult) -> set[tuple[str, str]]:
    """Every declared check of every asset the run materialized was evaluated and passed.

    Returns the (asset, check) pairs evaluated, never empty: a run whose checks did not run
    fails here instead of passing an ``all(...)`` over nothing.
    """
    from pipelines.definitions import defs

    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    declared = {
        (key.asset_key.to_user_string(), key.name)
        for definition in (*defs.assets, *defs.asset_checks)  # checks declared either way
        for key in getattr(definition, "check_keys", ())
        if key.asset_key in materialized
    }
    outcomes = {
        (c.asset_key.to_user_string(), c.check_name): c.passed
        for c in result.get_asset_check_evaluations()
    }
    assert declared, "the run materialized no asset that has checks"
    assert set(outcomes) == declared
    assert [key for key, passed in outcomes.items() if not passed] == []
    return set(outcomes)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3 (moto server on 127.0.0.1) shared by the session; yields its endpoint URL.

    Tests never use it directly: they take ``s3`` (fresh options) and ``s3_bucket`` (a fresh,
    empty bucket), so nothing one test writes is seen by another.
    """
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="imagegem")  # kept for tests written against the old fixture
    yield endpoint
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str) -> dict:
    """s3fs storage options for the local S3: a new dict per test (mutating it leaks nowhere)."""
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}


@pytest.fixture
def s3_bucket(s3: dict) -> str:
    """A fresh, empty bucket of the local S3 for this test only; its name (no ``s3://``)."""
    import s3fs

    name = f"imagegem-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir(name)
    fs.invalidate_cache()
    return name


@pytest.fixture
def tiny_release(tmp_path: Path) -> Path:
    images = [image_row(i, 1 + i % 3) for i in range(1, 11)]
    images.append(image_row(1, 2))  # image 1 used two LoRAs (multi-LoRA image)
    models = [model_row(v) for v in (1, 2, 3)]
    return write_release(tmp_path / "release", images, models)
