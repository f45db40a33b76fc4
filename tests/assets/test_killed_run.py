"""A run killed with SIGKILL part-way, then rerun, gives the same warehouse as a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from pipelines.resources import PipelineResources, WarehouseResource
from pipelines.runner import materialize_all

TABLES = ("images", "models", "users", "loras", "image_loras", "prompts", "interactions")

CHILD = """
import dagster as dg
from pipelines.runner import materialize_all
from pipelines.resources import PipelineResources, WarehouseResource
materialize_all(PipelineResources(WarehouseResource(home=%r, sample_users=%d)))
"""


def materialize(home: Path, users: int) -> None:
    result = materialize_all(
        PipelineResources(WarehouseResource(home=str(home), sample_users=users))
    )
    assert result.success


def snapshot(home: Path) -> dict[str, list[tuple]]:
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    out = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}
    out["quarantine"] = con.execute(
        "SELECT step, record_key, reason, detail FROM quarantine ORDER BY ALL"
    ).fetchall()
    con.close()
    return out


def test_sigkill_mid_run_then_rerun_converges(tmp_path):
    users = 120
    reference = tmp_path / "reference"
    materialize(reference, users)

    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD % (str(killed), users)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill as soon as the clean stage has started writing (the landing is committed).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if (killed / "lake" / "raw" / "images" / "_CURRENT").exists() and any(
            (killed / "lake" / "images").glob("version-*")
        ):
            break
        time.sleep(0.01)
    assert child.poll() is None, "the run finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    materialize(killed, users)
    assert snapshot(killed) == snapshot(reference)
