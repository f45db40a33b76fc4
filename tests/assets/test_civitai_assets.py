"""Acceptance: crawling the fake Civitai server loaded with the sample gives clean tables
identical, row for row, to ingesting the sample's release files directly — with and without
injected faults."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from pipelines.civitai.fake_server import serve_sample
from pipelines.resources import CivitaiResource, PipelineResources, WarehouseResource
from pipelines.runner import materialize_all
from pipelines.sample.generator import SampleSpec, generate_sample

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
        result = materialize_all(PipelineResources(settings, civitai))
    assert result.success
    assert result.dagster_run.job_name == "imagegem_all"
    pages = result.asset_materializations_for_node("civitai_pages")
    assert pages and pages[-1].metadata["complete"].value
    if fault_rate:
        assert pages[-1].metadata["retries"].value > 0
    crawled = tables(settings)
    for name in TABLES:
        assert crawled[name] == direct[name], name
