"""The imagegem command line: sample, sql (read-only), tour, the demo and its summary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from pipelines.cli import main
from pipelines.resources import PipelineResources, WarehouseResource
from pipelines.runner import format_checks, format_summary, materialize_runs, stage_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    results = materialize_runs(
        PipelineResources(WarehouseResource(home=str(home), sample_users=80))
    )
    assert results and all(r.success for r in results)
    return home, results


@pytest.fixture(scope="module")
def home(runs):
    return runs[0]


def cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "IMAGEGEM_HOME": str(home) if home else "/nonexistent"}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_sql_prints_a_table(home):
    out = cli("sql", "SELECT count(*) AS n_loras FROM loras", home=home)
    assert out.returncode == 0, out.stderr
    assert "n_loras" in out.stdout


def test_sql_variables_for_parameterised_questions(home):
    out = cli("sql", "SELECT getvariable('x') + 1 AS y", "--var", "x", "41", home=home)
    assert out.returncode == 0 and "42" in out.stdout


def test_sql_is_read_only(home):
    out = cli("sql", "CREATE TABLE t AS SELECT 1", home=home)
    assert out.returncode == 2
    assert "read-only" in out.stderr.lower()


def test_sql_errors_are_one_clear_line(home, tmp_path):
    bad = cli("sql", "SELEC nonsense", home=home)
    assert bad.returncode == 2 and "imagegem sql:" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli("sql", "SELECT 1", home=tmp_path)
    assert missing.returncode == 2 and "no warehouse catalog" in missing.stderr


def test_tour_answers_every_question(home):
    out = cli("tour", home=home)
    assert out.returncode == 0, out.stderr
    for name in ("unique_prompts", "loras_with_tag", "images_by_other_users"):
        assert f"== {name}" in out.stdout
    assert "warehouse.duckdb" in out.stdout


def test_sample_command_writes_a_release(tmp_path, capsys):
    assert main(["sample", "--out", str(tmp_path / "s"), "--users", "40", "--seed", "3"]) == 0
    assert list((tmp_path / "s" / "images").glob("*.parquet"))
    assert (tmp_path / "s" / "truth").is_dir() and (tmp_path / "s" / "manifest.json").exists()


def test_without_a_site_the_run_goes_through_the_warehouse_job(runs):
    _, results = runs
    assert len(results) == 1
    assert results[0].dagster_run.job_name == "imagegem_warehouse"
    assert results[0].asset_materializations_for_node("civitai_pages") == []


def test_summary_rows_come_from_the_materializations(runs):
    _, results = runs
    rows = {r.asset: r for r in stage_rows(results)}
    meta = results[0].asset_materializations_for_node("images")[0].metadata
    images = rows["images"]
    assert images.group == "warehouse"
    assert images.rows_in == meta["rows_in"].value > images.rows_out
    assert images.rows_out == meta["dagster/row_count"].value
    assert images.quarantined == meta["quarantined"].value > 0
    assert images.seconds is not None and images.seconds > 0
    assert rows["release_files"].rows_out == (
        results[0].asset_materializations_for_node("release_files")[0].metadata["image_rows"].value
        + results[0]
        .asset_materializations_for_node("release_files")[0]
        .metadata["model_rows"]
        .value
    )
    assert "image_files" not in rows  # nothing downloaded without a site: nothing to report
    table = format_summary(stage_rows(results)).splitlines()
    assert table[0].split() == [
        "stage",
        "asset",
        "rows",
        "in",
        "rows",
        "out",
        "quarantined",
        "seconds",
    ]
    line = next(ln for ln in table if ln.split()[1] == "images")
    assert line.split()[2:5] == [
        f"{images.rows_in:,}",
        f"{images.rows_out:,}",
        f"{images.quarantined:,}",
    ]
    evaluations = results[0].get_asset_check_evaluations()
    assert format_checks(results) == f"asset checks: {len(evaluations)} passed, 0 failed"


def test_demo_prints_progress_a_summary_and_where_to_look(tmp_path, monkeypatch):
    """The whole demo in a child process: the fake Civitai, the crawl and the downloads, INFO
    progress without Dagster's DEBUG events, the summary, and runs kept in the instance under
    the job's name."""
    shutil.copy(ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "DAGSTER_HOME": str(tmp_path),
        "IMAGEGEM_HOME": str(tmp_path / "data"),
        "IMAGEGEM_SAMPLE_USERS": "40",
        "IMAGEGEM_MEDIA_MAX_IMAGES": "100",
    }
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert " - DEBUG - " not in text and "STEP_START" not in text
    assert " - INFO - imagegem_all - " in text  # Dagster's progress lines, at INFO
    assert "Summary: 1 run(s) of imagegem_all" in out.stdout
    summary = out.stdout.split("Summary:", 1)[1]
    for asset in ("civitai_pages [", "images", "image_files", "lora_files", "warehouse_catalog"):
        assert asset in summary
    assert "asset checks:" in summary and ", 0 failed" in summary
    assert (
        "Where to look next" in summary and str(tmp_path / "data" / "warehouse.duckdb") in summary
    )
    assert (tmp_path / ".dagster" / "history" / "runs.db").exists()
    monkeypatch.chdir(tmp_path)  # the instance's paths are relative to where Dagster runs
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        assert [r.job_name for r in instance.get_runs()] == ["imagegem_all"]
