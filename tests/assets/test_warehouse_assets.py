"""The Dagster assets end to end on a tiny hand-made release (source=release)."""

from __future__ import annotations

import subprocess
import sys

import dagster as dg
import duckdb
import pytest

from assets.preferences import PAIR_CHECKS
from pipelines.config import resources_from_env
from pipelines.definitions import build_definitions
from pipelines.jobs import CRAWL
from pipelines.resources import PipelineResources, WarehouseResource
from pipelines.runner import materialize_all
from tests.factory import image_row, model_row, write_release
from warehouse.tables import DERIVED


def materialize(settings: WarehouseResource, instance=None) -> dg.ExecuteInProcessResult:
    return materialize_all(PipelineResources(settings), instance, raise_on_error=False)


@pytest.fixture
def release(tmp_path):
    images = [image_row(i, 1 + i % 3) for i in range(1, 30)] + [
        image_row(1, 3),
        image_row(99, width=-5),
    ]
    images.append(image_row(100, browsingLevel=8))
    return write_release(tmp_path / "release", images, [model_row(v) for v in (1, 2, 3)])


def test_all_assets_and_checks_pass(tmp_path, release):
    settings = WarehouseResource(
        home=str(tmp_path / "home"), source="release", release_path=str(release)
    )
    result = materialize(settings)
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]
    names = {(c.asset_key.to_user_string(), c.check_name) for c in checks}
    assert ("images", "reconciliation") in names and (
        "warehouse_catalog",
        "no_raw_usernames",
    ) in names
    images_meta = result.asset_materializations_for_node("images")[0].metadata
    assert images_meta["dagster/row_count"].value == 30
    assert images_meta["quarantined"].value == 2
    tour = result.asset_materializations_for_node("warehouse_tour")[0].metadata
    assert tour["unanswered"].value == "none"
    assert "**unique_prompts**" in tour["example_answers"].value
    table1 = result.asset_materializations_for_node("table1_stats")[0].metadata
    assert "paper raw" in table1["table1"].value


def test_catalog_answers_from_any_directory(tmp_path, release):
    settings = WarehouseResource(
        home=str(tmp_path / "home"), source="release", release_path=str(release)
    )
    assert materialize(settings).success
    path = settings.catalog_path()
    code = (
        f"import duckdb; c = duckdb.connect({path!r}, read_only=True); "
        "print(c.execute('SELECT count(*) FROM images').fetchone()[0], "
        "c.execute('SELECT count(*) FROM quarantine').fetchone()[0], "
        "c.execute(\"SELECT normalize_prompt('A <lora:x:1> Dog')\").fetchone()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["30", "2", "a", "dog"]


def test_rematerialize_converges_and_catalog_follows(tmp_path, release):
    settings = WarehouseResource(
        home=str(tmp_path / "home"), source="release", release_path=str(release)
    )
    assert materialize(settings).success
    con = duckdb.connect(settings.catalog_path(), read_only=True)
    first = con.execute("SELECT * FROM images ORDER BY ALL").fetchall()
    con.close()
    assert materialize(settings).success
    con = duckdb.connect(settings.catalog_path(), read_only=True)
    assert con.execute("SELECT * FROM images ORDER BY ALL").fetchall() == first


def test_bad_release_fails_with_a_clear_message(tmp_path):
    release = write_release(tmp_path / "release", [image_row(1)], [model_row(1)])
    (release / "images" / "part-1.parquet").write_bytes(b"PAR1 truncated")
    settings = WarehouseResource(
        home=str(tmp_path / "home"), source="release", release_path=str(release)
    )
    result = materialize(settings)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "part-1.parquet" in message and "not a readable parquet file" in message


def test_missing_release_path_is_a_clear_error(tmp_path):
    result = materialize(WarehouseResource(home=str(tmp_path), source="release"))
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "IMAGEGEM_RELEASE_PATH" in failure.event_specific_data.error.message


def test_env_bound_resources_reach_the_assets(monkeypatch, tmp_path, release):
    """The code location binds the environment as dg.EnvVar: values are resolved when the run
    starts, so a browsing level set only in the environment changes what is kept."""
    monkeypatch.setenv("IMAGEGEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMAGEGEM_SOURCE", "release")
    monkeypatch.setenv("IMAGEGEM_RELEASE_PATH", str(release))
    monkeypatch.setenv("IMAGEGEM_MAX_BROWSING_LEVEL", "8")
    resources = resources_from_env()
    assert isinstance(resources.warehouse.home, dg.EnvVar)  # the UI shows the variable
    assert isinstance(resources.warehouse.max_browsing_level, type(dg.EnvVar.int("_")))
    location = build_definitions(resources)
    keys = (dg.AssetSelection.assets("images").upstream() - CRAWL).resolve(
        location.resolve_asset_graph()
    )
    result = location.resolve_job_def("imagegem_warehouse").execute_in_process(
        asset_selection=sorted(keys)
    )
    assert result.success
    meta = result.asset_materializations_for_node("images")[0].metadata
    # image 100 (browsingLevel 8) is kept now; only the bad size is quarantined
    assert meta["dagster/row_count"].value == 31
    assert meta["quarantined"].value == 1
    assert (tmp_path / "home" / "lake" / "images" / "_CURRENT").exists()


def test_every_asset_check_has_a_description():
    location = build_definitions(PipelineResources())
    specs = [s for a in [*location.assets, *location.asset_checks] for s in a.check_specs]
    names = {(s.asset_key.to_user_string(), s.name) for s in specs}
    assert ("images", "safety_filter_applied") in names
    assert ("warehouse_catalog", "no_raw_usernames") in names
    assert {n for a, n in names if a == "preference_pairs"} == set(PAIR_CHECKS)
    # 4 per clean table, unique_key per derived table, the quarantine's and the catalog's,
    # and the preference pairs'
    assert len(specs) == 2 * 4 + len(DERIVED) + 2 + len(PAIR_CHECKS)
    undescribed = [f"{s.asset_key.to_user_string()}:{s.name}" for s in specs if not s.description]
    assert not undescribed, undescribed
