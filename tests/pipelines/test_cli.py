"""The imagegem command line: sample, sql (read-only), tour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.resources import PipelineResources, WarehouseResource
from pipelines.runner import materialize_all

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    result = materialize_all(PipelineResources(WarehouseResource(home=str(home), sample_users=80)))
    assert result.success
    return home


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
