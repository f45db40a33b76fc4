"""The crawl's partitions and the daily schedule (its Sunday run is the full refresh).

Every "now" here is a fixed, injected time: nothing reads the clock twice, so no test can
straddle midnight UTC.
"""

from __future__ import annotations

import importlib
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from assets.civitai import FULL_REFRESH_TAG, civitai_pages
from pipelines import config, partitions
from pipelines.definitions import defs
from pipelines.partitions import crawl_windows, crawl_windows_def, today_window, window_of
from pipelines.schedules import civitai_daily_refresh

WEDNESDAY = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
SUNDAY = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)


def evaluate(when: datetime) -> dg.RunRequest:
    context = dg.build_schedule_context(scheduled_execution_time=when)
    return civitai_daily_refresh(context)


def test_weekday_runs_an_incremental_crawl_of_that_day():
    request = evaluate(WEDNESDAY)
    assert request.partition_key == "2026-11-25"
    assert FULL_REFRESH_TAG not in request.tags
    assert request.run_key == "2026-11-25"


def test_sunday_runs_a_full_refresh():
    request = evaluate(SUNDAY)
    assert request.partition_key == "2026-11-29"
    assert request.tags[FULL_REFRESH_TAG] == "true"
    assert request.run_key == "2026-11-29-full"


def test_partitions_start_at_a_fixed_date_not_today(monkeypatch):
    monkeypatch.delenv("IMAGEGEM_CRAWL_START", raising=False)
    windows = crawl_windows_def()
    assert window_of(windows.start) == config.DEFAULT_CRAWL_START
    assert crawl_windows.start == windows.start  # the code location's definition
    assert civitai_pages.partitions_def == crawl_windows
    monkeypatch.setenv("IMAGEGEM_CRAWL_START", "2026-06-01")
    assert window_of(crawl_windows_def().start) == "2026-06-01"


def load_windows_at(now: datetime, monkeypatch) -> dg.DailyPartitionsDefinition:
    """The code location's crawl partitions as a fresh load at ``now`` would build them:
    ``datetime.now()`` says ``now`` while the config and partition modules are reloaded."""
    import datetime as datetime_module

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return now if tz is None else now.astimezone(tz)

        @classmethod
        def utcnow(cls):
            return now.replace(tzinfo=None)

    with monkeypatch.context() as patch:
        patch.setattr(datetime_module, "datetime", Frozen)
        try:
            importlib.reload(config)
            importlib.reload(partitions)
            return partitions.crawl_windows
        finally:
            patch.undo()
            importlib.reload(config)
            importlib.reload(partitions)


def test_partition_set_is_stable_across_a_day_change(monkeypatch):
    """Loaded on two days, the code location keeps every window of the first: yesterday's
    materializations stay in the set, and the set only grows at its end."""
    monkeypatch.delenv("IMAGEGEM_CRAWL_START", raising=False)
    day1 = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    day2 = day1 + timedelta(seconds=2)  # just after midnight UTC
    keys1 = load_windows_at(day1, monkeypatch).get_partition_keys(current_time=day1)
    keys2 = load_windows_at(day2, monkeypatch).get_partition_keys(current_time=day2)
    assert keys1[0] == keys2[0] == config.DEFAULT_CRAWL_START
    assert keys1[-1] == "2026-11-30" and keys2[-1] == "2026-12-01"
    assert keys2[: len(keys1)] == keys1 and len(keys2) == len(keys1) + 1


def test_the_schedule_covers_each_day_and_keeps_the_last(monkeypatch):
    """Evaluated on two consecutive days, the schedule asks for each day's window, and both
    windows are partitions at the later time."""
    monkeypatch.delenv("IMAGEGEM_CRAWL_START", raising=False)
    windows = crawl_windows_def()
    saturday, sunday = SUNDAY - timedelta(days=1), SUNDAY
    first, second = evaluate(saturday), evaluate(sunday)
    assert (first.partition_key, second.partition_key) == ("2026-11-28", "2026-11-29")
    assert first.partition_key in windows.get_partition_keys(current_time=saturday)
    later = windows.get_partition_keys(current_time=sunday)
    assert {first.partition_key, second.partition_key} <= set(later)
    assert later[-1] == second.partition_key  # today's window exists (end_offset=1)


def test_today_window_at_an_injected_time():
    just_before = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    assert today_window(just_before) == "2026-11-30"
    assert today_window(just_before + timedelta(seconds=1)) == "2026-12-01"
    assert today_window(datetime(2026, 12, 1, 0, 30, tzinfo=UTC).astimezone()) == "2026-12-01"
    with pytest.raises(ValueError, match="IMAGEGEM_CRAWL_START"):
        today_window(datetime(2026, 10, 1, tzinfo=UTC), crawl_windows_def("2026-11-01"))


def test_code_location_holds_the_schedule_jobs_and_sensor():
    assert {s.name for s in defs.schedules} == {"civitai_daily_refresh"}
    assert {j.name for j in defs.jobs} >= {"imagegem_all", "imagegem_warehouse", "civitai_refresh"}
    schedule = next(s for s in defs.schedules if s.name == "civitai_daily_refresh")
    assert schedule.job_name == "civitai_refresh"
    assert schedule.execution_timezone == "UTC" and schedule.cron_schedule == "0 3 * * *"
    sensor = next(s for s in defs.sensors if s.name == "warehouse_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
