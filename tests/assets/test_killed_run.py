"""A run killed with SIGKILL part-way, then rerun, gives the same warehouse as a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from pipelines.resources import PipelineResources, WarehouseResource
from pipelines.runner import materialize_all

pytestmark = pytest.mark.slow

TABLES = ("images", "models", "users", "loras", "image_loras", "prompts", "interactions")

CHILD = """
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

    expected = snapshot(reference)
    assert [t for t, rows in expected.items() if not rows] == []  # nothing compared vacuously

    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD % (str(killed), users)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill as soon as the clean stage has started writing (the landing is committed). The
        # bound only stops a hung child; the kill waits for a file, never for a time.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and child.poll() is None:
            if (killed / "lake" / "raw" / "images" / "_CURRENT").exists() and any(
                (killed / "lake" / "images").glob("version-*")
            ):
                break
            time.sleep(0.01)
        assert child.poll() is None, "the run finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # killed mid-run: the catalog, written last, does not exist yet
    assert not (killed / "warehouse.duckdb").exists()

    materialize(killed, users)
    assert snapshot(killed) == expected
