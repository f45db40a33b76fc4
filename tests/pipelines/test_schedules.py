"""The daily crawl schedule, the weekly full refresh and the automation sensor."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

from assets.civitai import FULL_REFRESH_TAG, civitai_daily_refresh, crawl_windows
from pipelines.definitions import defs


def evaluate(when: datetime) -> dg.RunRequest:
    context = dg.build_schedule_context(scheduled_execution_time=when)
    return civitai_daily_refresh(context)


def test_weekday_runs_an_incremental_crawl_of_that_day():
    request = evaluate(datetime(2026, 11, 25, 3, 0, tzinfo=UTC))  # a Wednesday
    assert request.partition_key == "2026-11-25"
    assert FULL_REFRESH_TAG not in request.tags


def test_sunday_runs_a_full_refresh():
    request = evaluate(datetime(2026, 11, 29, 3, 0, tzinfo=UTC))  # a Sunday
    assert request.partition_key == "2026-11-29"
    assert request.tags[FULL_REFRESH_TAG] == "true"
    assert request.run_key.endswith("-full")


def test_todays_window_exists_and_definitions_load():
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert crawl_windows.get_partition_keys()[-1] == today
    assert "civitai_daily_refresh" in {s.name for s in defs.schedules}
    sensor = next(s for s in defs.sensors if s.name == "warehouse_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    eager = [a for a in defs.assets if a.key.to_user_string() in {"images", "civitai_release"}]
    assert all(a.automation_conditions_by_key for a in eager)
