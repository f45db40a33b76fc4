"""Schedules of the code location."""

from datetime import UTC

import dagster as dg

from assets.civitai import FULL_REFRESH_TAG
from pipelines.jobs import crawl_job
from pipelines.partitions import window_of


@dg.schedule(job=crawl_job, cron_schedule="0 3 * * *", execution_timezone="UTC")
def civitai_daily_refresh(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Daily incremental crawl of the day's window at 03:00 UTC; on Sundays a full refresh,
    which re-reads everything so reaction counts and stats of older items are up to date."""
    when = context.scheduled_execution_time.astimezone(UTC)
    key = window_of(when)
    full = when.weekday() == 6
    return dg.RunRequest(
        run_key=f"{key}{'-full' if full else ''}",
        partition_key=key,
        tags={FULL_REFRESH_TAG: "true"} if full else {},
    )


SCHEDULES = [civitai_daily_refresh]
