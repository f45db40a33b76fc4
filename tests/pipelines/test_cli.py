"""The imagegem command line: sample, sql (read-only), tour, the demo and its summary.

Every answer the CLI prints is checked against a value computed independently of the catalog
and the CLI: straight from the lake's Parquet files with pyarrow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.resources import PipelineResources, WarehouseResource
from pipelines.runner import format_checks, format_summary, materialize_runs, stage_rows
from pipelines.sample.generator import SampleSpec
from warehouse.lake import Lake

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A materialized home, shared by the module; the CLI only ever opens it read-only."""
    home = tmp_path_factory.mktemp("home")
    results = materialize_runs(
        PipelineResources(WarehouseResource(home=str(home), sample_users=80))
    )
    assert results and all(r.success for r in results)
    return home, results


@pytest.fixture(scope="module")
def home(runs) -> Path:
    return runs[0]


@pytest.fixture(scope="module")
def lake(home: Path) -> Lake:
    return Lake(str(home / "lake"))


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


def box_rows(text: str) -> list[list[str]]:
    """The data rows of a DuckDB box table (header, type row and elision rows dropped)."""
    rows = [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in text.splitlines()
        if line.startswith("│")
    ]
    return [r for r in rows[2:] if any(c not in ("", "·") for c in r)]


def sections(tour: str) -> dict[str, str]:
    """The tour's output per question: the text after ``== name:`` up to the next one."""
    parts = tour.split("\n== ")[1:]
    return {part.split(":", 1)[0]: part for part in parts}


def ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return out.stdout


def failed(out: subprocess.CompletedProcess) -> str:
    """A clean failure: exit code 2, one message on stderr, no traceback, nothing on stdout."""
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.strip() and "Traceback" not in out.stderr
    assert out.stdout == ""
    return out.stderr


# -- sql ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sql_prints_the_count_of_the_lake_table(home, lake):
    rows = box_rows(ok(cli("sql", "SELECT count(*) AS n_loras FROM loras", home=home)))
    n_loras = lake.read_table("loras").num_rows
    assert n_loras > 100 and rows == [[str(n_loras)]]


@pytest.mark.slow
def test_sql_prints_every_row_of_a_grouped_answer(home, lake):
    query = "SELECT baseModel, count(*) AS n FROM loras GROUP BY 1 ORDER BY n DESC, baseModel"
    rows = box_rows(ok(cli("sql", query, "--max-rows", "100", home=home)))
    counts = Counter(lake.read_table("loras").column("baseModel").to_pylist())
    expected = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    assert len(expected) > 6
    assert rows == [[name, str(n)] for name, n in expected]


@pytest.mark.slow
def test_sql_variables_for_parameterised_questions(home):
    number = cli("sql", "SELECT getvariable('x') + 1 AS y", "--var", "x", "41", home=home)
    assert box_rows(ok(number)) == [["42"]]  # digits become an integer
    text = cli("sql", "SELECT getvariable('t') || '!' AS t", "--var", "t", "anime", home=home)
    assert box_rows(ok(text)) == [["anime!"]]


@pytest.mark.slow
def test_sql_is_read_only(home):
    error = failed(cli("sql", "CREATE TABLE t AS SELECT 1", home=home))
    assert error.startswith("imagegem sql:") and "read-only" in error
    missing = failed(cli("sql", "SELECT * FROM t", home=home))
    assert "Table with name t does not exist" in missing  # nothing was created


@pytest.mark.slow
def test_sql_errors_exit_2_with_the_database_message(home):
    syntax = failed(cli("sql", "SELEC nonsense", home=home))
    assert syntax.startswith('imagegem sql: Parser Error: syntax error at or near "SELEC"')
    table = failed(cli("sql", "SELECT * FROM no_such_table", home=home))
    assert table.startswith("imagegem sql: Catalog Error") and "no_such_table" in table


def test_sql_without_a_catalog_names_the_missing_file(tmp_path):
    error = failed(cli("sql", "SELECT 1", home=tmp_path))
    assert error.startswith("imagegem sql: no warehouse catalog at ")
    assert str(tmp_path / "warehouse.duckdb") in error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("sql",), "the following arguments are required: query"),
        (("no-such-command",), "invalid choice: 'no-such-command'"),
        (("sql", "SELECT 1", "--var", "x"), "expected 2 arguments"),
    ],
)
def test_usage_errors_exit_2_with_a_message(args, message):
    error = failed(cli(*args))
    assert error.startswith("usage: imagegem") and message in error


# -- tour --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tour_prints_the_answers(home, lake):
    out = ok(cli("tour", home=home))
    assert f"The warehouse catalog is {home / 'warehouse.duckdb'}" in out
    images = lake.read_table("images")
    answers = sections(out)
    # unique prompts and negative prompts of the clean images
    prompts = {p for p in images.column("prompt").to_pylist() if p is not None}
    negatives = {p for p in images.column("negativePrompt").to_pylist() if p is not None}
    assert box_rows(answers["unique_prompts"]) == [[str(len(prompts)), str(len(negatives))]]
    # base model families: the most and least frequent shown, and how many there are
    counts = Counter(lake.read_table("loras").column("baseModel").to_pylist())
    families = [
        [name, str(n)] for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    shown = box_rows(answers["base_model_families"])
    assert shown == families[:3] + families[-3:] and len(families) > 6
    assert f"{len(families)} rows (6 shown)" in answers["base_model_families"]
    # images made with more than one LoRA: how many, and the first one
    per_image = Counter(images.column("imageId").to_pylist())
    multi = sorted((-n, image) for image, n in per_image.items() if n > 1)
    assert len(multi) > 6 and f"{len(multi)} rows (6 shown)" in answers["multi_lora_images"]
    first = box_rows(answers["multi_lora_images"])[0]
    assert first[:2] == [str(multi[0][1]), str(-multi[0][0])]
    # Table 1: "filtered" counts the clean image rows, "raw" adds those the safety filter took
    table1 = {r[0]: r for r in box_rows(out.split("\n== ")[0])}
    reasons = lake.read_table("quarantine/images").column("reason").to_pylist()
    unsafe = sum(reason.startswith("unsafe:") for reason in reasons)
    assert unsafe > 0 and table1["filtered"][1] == str(images.num_rows)
    assert table1["raw"][1] == str(images.num_rows + unsafe)
    # and every example question is answered, none with an error
    from warehouse.sqlfiles import questions

    assert set(answers) == set(questions())
    assert [name for name, text in answers.items() if not box_rows(text)] == []


# -- sample ------------------------------------------------------------------------------------


def test_sample_command_writes_the_requested_release(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--out", str(out), "--users", "40", "--seed", "3"]) == 0
    spec = SampleSpec(users=40, seed=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"] == spec.to_dict()
    image_rows = sum(pq.read_metadata(p).num_rows for p in (out / "images").glob("*.parquet"))
    model_rows = sum(pq.read_metadata(p).num_rows for p in (out / "models").glob("*.parquet"))
    assert (image_rows, model_rows) == (spec.image_rows, spec.model_rows)
    assert list((out / "truth").glob("*.parquet"))
    printed = capsys.readouterr()
    assert str(out) in printed.out and f"{spec.image_rows:,}" in printed.err  # progress


@pytest.mark.slow
def test_without_a_site_the_run_goes_through_the_warehouse_job(runs):
    _, results = runs
    assert len(results) == 1
    assert results[0].dagster_run.job_name == "imagegem_warehouse"
    assert results[0].asset_materializations_for_node("civitai_pages") == []


@pytest.mark.slow
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


@pytest.mark.slow
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
        "IMAGEGEM_MEDIA_MAX_IMAGES": "250",
        "IMAGEGEM_CLIP_TRAIN_SECONDS": "5",
        "IMAGEGEM_EMBED_SHARDS": "2",
        "IMAGEGEM_REWARD_SECONDS": "5",
        "IMAGEGEM_BASE_TRAIN_SECONDS": "3",
        "IMAGEGEM_DPO_SECONDS": "5",
        "IMAGEGEM_DPO_STEPS": "10",
        "IMAGEGEM_PAIRS_TOP_K": "8",
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
    # the graph, one run per image shard, then what follows the shards
    assert "Summary: 4 run(s) of embed_images, imagegem_all" in out.stdout
    summary = out.stdout.split("Summary:", 1)[1]
    for asset in (
        "civitai_pages [",
        "images",
        "image_files",
        "lora_files",
        "warehouse_catalog",
        "clip_encoder",
        "image_embeddings [shard-00]",
        "image_embeddings [shard-01]",
        "image_index",
        "embeddings_catalog",
        "reward_model",
        "image_scores",
        "preference_pairs",
        "diffusion_base",
        "dpo_lora",
        "preference_catalog",
    ):
        assert asset in summary
    assert "asset checks:" in summary and ", 0 failed" in summary
    assert (
        "Where to look next" in summary and str(tmp_path / "data" / "warehouse.duckdb") in summary
    )
    assert (tmp_path / ".dagster" / "history" / "runs.db").exists()
    monkeypatch.chdir(tmp_path)  # the instance's paths are relative to where Dagster runs
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        jobs = [r.job_name for r in instance.get_runs()]  # newest first
        assert jobs == ["imagegem_all", "embed_images", "embed_images", "imagegem_all"]


def test_similar_needs_exactly_one_query(home):
    both = cli("similar", "--image-id", "1", "--text", "a dog", home=home)
    neither = cli("similar", home=home)
    assert both.returncode == neither.returncode == 2
    assert "exactly one of --image-id or --text" in both.stderr


def test_similar_without_an_index_says_what_to_run(home):
    # this home was built without a Civitai site: no images downloaded, no index
    result = cli("similar", "--image-id", "1", home=home)
    assert result.returncode != 0
    assert "no image index yet: materialize image_index first" in result.stderr
