"""The automation sensor, evaluated: what it requests after raw data lands.

``warehouse_automation`` evaluates every asset's automation condition; these tests evaluate
the same conditions of the code location on an ephemeral instance, tick by tick, reporting
materializations as a finished run would.
"""

from __future__ import annotations

import warnings

import dagster as dg
import pytest

from pipelines.definitions import defs
from pipelines.partitions import crawl_windows

KEYS = sorted(defs.resolve_asset_graph().get_all_asset_keys())


class Ticks:
    """Successive sensor ticks on one instance (the cursor carried over)."""

    def __init__(self) -> None:
        self.instance = dg.DagsterInstance.ephemeral()
        self.cursor = None

    def land(self, asset: str, partition: str | None = None) -> None:
        self.instance.report_runless_asset_event(
            dg.AssetMaterialization(asset, partition=partition)
        )

    def tick(self) -> set[str]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # beta-API warnings of the evaluator
            result = dg.evaluate_automation_conditions(
                defs=defs, instance=self.instance, cursor=self.cursor
            )
        self.cursor = result.cursor
        return {k.to_user_string() for k in KEYS if result.get_num_requested(k)}


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


def test_the_sensor_targets_every_asset():
    sensor = next(s for s in defs.sensors if s.name == "warehouse_automation")
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    conditioned = {
        k.to_user_string()
        for a in defs.assets
        for k, c in a.automation_conditions_by_key.items()
        if c is not None
    }
    assert {"civitai_release", "release_files", "images", "warehouse_catalog"} <= conditioned
    assert "civitai_pages" not in conditioned  # the schedule crawls, not the sensor


def test_nothing_is_requested_before_data_lands(ticks):
    assert ticks.tick() == set()
    assert ticks.tick() == set()


def test_a_new_crawl_window_rebuilds_the_release_and_the_warehouse(ticks):
    assert ticks.tick() == set()
    # the latest window only (the clock read once): the windows before it since the crawl
    # start are missing, which must not hold the release back
    ticks.land("civitai_pages", crawl_windows.get_partition_keys()[-1])
    requested = ticks.tick()
    assert {"civitai_release", "release_files", "raw_images", "images", "models"} <= requested
    assert {"quarantine", "warehouse_catalog"} <= requested
    assert not requested & {"civitai_pages", "image_files", "lora_files"}
    assert ticks.tick() == set()  # handled: not requested again without new data


def test_raw_images_landing_requests_only_what_it_feeds(ticks):
    assert ticks.tick() == set()
    ticks.land("raw_images")
    assert ticks.tick() == {"images", "prompts"}
    assert ticks.tick() == set()
    ticks.land("raw_models")
    assert ticks.tick() == {"models"}
    ticks.land("raw_images")  # a second landing of the same table: requested again
    assert ticks.tick() == {"images", "prompts"}
