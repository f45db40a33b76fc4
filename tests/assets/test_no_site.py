"""Steps with nothing to do record nothing; steps asked for the impossible fail clearly.

Without a Civitai site: the downloads emit no materialization (covered with the media
assets), the crawl fails saying what to set, the release build records nothing until a window
has landed (and fails when the civitai source needs it), and the runner leaves the crawl out.
"""

from __future__ import annotations

import dagster as dg
import pytest

from assets.civitai import civitai_pages, civitai_release
from pipelines.partitions import crawl_windows
from pipelines.resources import CivitaiResource, PipelineResources, WarehouseResource
from pipelines.runner import materialize_runs


def run(asset, resources: PipelineResources, partition: str | None = None):
    return dg.materialize(
        [asset],
        resources=resources.as_dict(),
        partition_key=partition,
        raise_on_error=False,
        instance=dg.DagsterInstance.ephemeral(),
    )


def failure_message(result) -> str:
    event = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return event.event_specific_data.error.message


@pytest.fixture
def window() -> str:
    return crawl_windows.get_partition_keys()[-1]


def test_the_crawl_without_a_site_fails_saying_what_to_set(tmp_path, window):
    resources = PipelineResources(WarehouseResource(home=str(tmp_path), source="sample"))
    result = run(civitai_pages, resources, window)
    assert not result.success
    message = failure_message(result)
    assert "CIVITAI_BASE_URL is unset" in message and "make ui" in message
    assert result.asset_materializations_for_node("civitai_pages") == []


def test_the_release_build_records_nothing_before_a_window_lands(tmp_path):
    resources = PipelineResources(WarehouseResource(home=str(tmp_path), source="sample"))
    result = run(civitai_release, resources)
    assert result.success
    assert result.asset_materializations_for_node("civitai_release") == []
    assert not (tmp_path / "sources" / "civitai").exists()


def test_the_civitai_source_without_a_window_fails(tmp_path):
    resources = PipelineResources(
        WarehouseResource(home=str(tmp_path), source="civitai"),
        CivitaiResource(base_url="http://127.0.0.1:9"),
    )
    result = run(civitai_release, resources)
    assert not result.success
    assert "no crawl window has landed" in failure_message(result)


def test_the_runner_leaves_the_crawl_out_without_a_site(tmp_path):
    resources = PipelineResources(WarehouseResource(home=str(tmp_path), sample_users=30))
    selection = dg.AssetSelection.assets("release_files").upstream()
    [result] = materialize_runs(resources, selection=selection)
    assert result.success
    assert result.dagster_run.job_name == "imagegem_warehouse"
    planned = {e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
    assert planned == {"release_files"}
