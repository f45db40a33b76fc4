"""Acceptance: crawling the fake Civitai server loaded with the sample gives clean tables
identical, row for row, to ingesting the sample's release files directly — with and without
injected faults."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets.civitai import civitai_pages
from pipelines.civitai.crawler import window_state
from pipelines.civitai.fake_server import serve_sample
from pipelines.jobs import WAREHOUSE_AND_MEDIA
from pipelines.resources import CivitaiResource, PipelineResources, WarehouseResource
from pipelines.runner import materialize_all
from pipelines.sample.generator import SampleSpec, generate_sample
from warehouse.civitai_release import list_windows

TABLES = ("images", "models", "users", "loras", "image_loras", "prompts", "interactions")
USERS = 60


def tables(settings: WarehouseResource) -> dict[str, list[tuple]]:
    con = duckdb.connect(settings.catalog_path(), read_only=True)
    out = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}
    con.close()
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    generate_sample(out, SampleSpec(users=USERS))
    return out


@pytest.fixture(scope="module")
def direct(sample, tmp_path_factory) -> dict[str, list[tuple]]:
    settings = WarehouseResource(
        home=str(tmp_path_factory.mktemp("direct")), source="release", release_path=str(sample)
    )
    assert materialize_all(PipelineResources(settings)).success
    return tables(settings)


@pytest.mark.parametrize("fault_rate", [0.0, 0.2])
def test_crawl_gives_the_same_clean_tables_as_the_release(sample, direct, tmp_path, fault_rate):
    with serve_sample(
        sample,
        fault_rate=fault_rate,
        retry_after=0.05,
        seed=7,
        faults=("429", "503", "malformed", "html200", "html500", "reset", "duplicate"),
    ) as server:
        settings = WarehouseResource(home=str(tmp_path / "home"), source="civitai")
        civitai = CivitaiResource(base_url=server.url, rate_limit=0)
        result = materialize_all(
            PipelineResources(settings, civitai), selection=WAREHOUSE_AND_MEDIA
        )
    assert result.success
    assert result.dagster_run.job_name == "imagegem_all"
    pages = result.asset_materializations_for_node("civitai_pages")
    assert pages and pages[-1].metadata["complete"].value
    if fault_rate:
        assert pages[-1].metadata["retries"].value > 0
    crawled = tables(settings)
    for name in TABLES:
        assert crawled[name] == direct[name], name


def test_a_403_mid_crawl_fails_the_pages_run_and_keeps_its_checkpoints(sample, tmp_path):
    """The token is refused once the models are read: the run fails with a clear message,
    the window stays incomplete and the models checkpoint (done) survives for the rerun."""
    refuse_images = lambda path, query: 403 if path == "/api/v1/images" else None  # noqa: E731
    with serve_sample(sample, outage=refuse_images) as server:
        settings = WarehouseResource(home=str(tmp_path / "home"), source="civitai")
        civitai = CivitaiResource(base_url=server.url, rate_limit=0)
        result = materialize_all(
            PipelineResources(settings, civitai),
            selection=dg.AssetSelection.assets(civitai_pages),
            raise_on_error=False,
        )
        refused = server.stats["outage_403"]
    assert not result.success and refused >= 1
    failures = result.get_step_failure_events()
    assert len(failures) == 1
    assert (
        "refused the token (401/403)" in failures[0].step_failure_data.user_failure_data.description
    )
    lake = settings.lake()
    (window,) = list_windows(lake)[-1:]
    state = window_state(lake, window)
    assert state is not None and not state["complete"]
    models = Path(lake.root, f"raw/civitai/window={window}/_checkpoints/models.json")
    assert json.loads(models.read_text())["done"]
