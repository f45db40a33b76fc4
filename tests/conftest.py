"""Shared fixtures: a tiny release built by code and a helper that runs the warehouse on it."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from tests.factory import image_row, model_row, write_release
from warehouse.clean import CleanConfig, StepReport, clean_release_table, images_spec, models_spec
from warehouse.duck import connect
from warehouse.lake import Lake
from warehouse.release import discover, land_release_table
from warehouse.safety import LexiconScorer
from warehouse.schema import IMAGES, MODELS
from warehouse.tables import DERIVED, build_derived

SALT = "test-salt"


@dataclass
class WarehouseRun:
    lake: Lake
    con: duckdb.DuckDBPyConnection
    reports: dict[str, StepReport]

    def q(self, sql: str) -> list[tuple]:
        """Run ``sql`` where ``{table}`` stands for that lake table's committed Parquet."""
        resolved = re.sub(
            r"\{([a-z_/]+)\}", lambda m: f"read_parquet('{self.lake.glob(m.group(1))}')", sql
        )
        return self.con.execute(resolved).fetchall()

    def rows(self, table: str, select: str = "SELECT *") -> list[tuple]:
        return self.q(f"{select} FROM {{{table}}}")


def run_warehouse(release: Path, lake_root: Path, cfg: CleanConfig | None = None) -> WarehouseRun:
    """Land, clean and derive every table with the plain functions the assets call."""
    cfg = cfg or CleanConfig()
    lake = Lake(str(lake_root))
    log = logging.getLogger("test")
    for table in (IMAGES, MODELS):
        land_release_table(
            lake, f"raw/{table.name}", discover(str(release), table), table, SALT, log=log
        )
    con = connect(lake)
    reports = {}
    for spec in (models_spec(cfg), images_spec(cfg)):
        reports[spec.table.name] = clean_release_table(
            con, lake, spec, cfg, LexiconScorer.bundled(), log
        )
    for name in DERIVED:
        build_derived(con, lake, name)
    return WarehouseRun(lake, con, reports)


@pytest.fixture(scope="session")
def s3():
    """A local S3 (moto server on 127.0.0.1) with a bucket ``imagegem``; yields s3fs options."""
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
    ).create_bucket(Bucket="imagegem")
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    server.stop()


@pytest.fixture
def tiny_release(tmp_path: Path) -> Path:
    images = [image_row(i, 1 + i % 3) for i in range(1, 11)]
    images.append(image_row(1, 2))  # image 1 used two LoRAs (multi-LoRA image)
    models = [model_row(v) for v in (1, 2, 3)]
    return write_release(tmp_path / "release", images, models)
