"""Civitai crawl: daily windows of API pages landed verbatim, then mapped to the release format."""

import os
from datetime import UTC, datetime

import dagster as dg

from pipelines.civitai.client import DEFAULT_BASE_URL, CivitaiClient
from pipelines.civitai.crawler import CrawlOptions, crawl
from pipelines.resources import ImageGemSettings
from warehouse.civitai_release import build_release, list_windows
from warehouse.preview import markdown_table
from warehouse.quarantine import quarantine_table

GROUP = "ingest"
FULL_REFRESH_TAG = "imagegem/full_refresh"


def crawl_start() -> str:
    """First daily crawl window: IMAGEGEM_CRAWL_START, else today (UTC)."""
    return os.environ.get("IMAGEGEM_CRAWL_START") or datetime.now(UTC).strftime("%Y-%m-%d")


# end_offset=1: today's window exists, so a refresh can run for "today so far".
crawl_windows = dg.DailyPartitionsDefinition(start_date=crawl_start(), end_offset=1, timezone="UTC")


@dg.asset(
    partitions_def=crawl_windows,
    group_name=GROUP,
    kinds={"http", "json"},
    pool="civitai",
)
def civitai_pages(
    context: dg.AssetExecutionContext, imagegem: ImageGemSettings
) -> dg.MaterializeResult:
    """Civitai API v1 pages of one daily window, landed verbatim (gzip JSON lines) before any
    parsing: LoRA models newest first, each version's images, and model versions that images
    reference. The crawl stops at the previous windows' watermark unless the run is tagged
    `imagegem/full_refresh=true` (the weekly schedule), which re-reads everything to refresh
    reaction counts. Cursor checkpoints move only after a page is durably landed, so a killed
    run resumes without losing or duplicating a page. Idempotent per window.
    """
    if not imagegem.crawl_enabled():
        context.log.info(
            "crawl skipped: IMAGEGEM_SOURCE is not civitai and CIVITAI_BASE_URL is unset"
        )
        return dg.MaterializeResult(
            metadata={"skipped": True, "reason": "no Civitai source configured"}
        )
    full = context.run.tags.get(FULL_REFRESH_TAG) == "true"
    client = CivitaiClient(
        imagegem.civitai_base_url or DEFAULT_BASE_URL,
        imagegem.civitai_api_token,
        rate_limit=imagegem.civitai_rate_limit or None,
        logger=context.log,
    )
    report = crawl(
        imagegem.lake(),
        context.partition_key,
        client,
        CrawlOptions(user_salt=imagegem.user_salt, full=full),
        logger=context.log,
    )
    meta = report.as_metadata()
    if report.stopped == "auth":
        raise dg.Failure(
            description="Civitai refused the token (401/403): check CIVITAI_API_TOKEN",
            metadata={"statuses": dg.MetadataValue.json(meta["statuses"])},
        )
    return dg.MaterializeResult(
        metadata={
            "window": report.window,
            "full_refresh": full,
            "complete": report.complete,
            "pages": dg.MetadataValue.json(meta["pages"]),
            "items": dg.MetadataValue.json(meta["items"]),
            "requests": report.requests,
            "retries": report.retries,
            "requests_per_second": meta["requests_per_second"],
            "statuses": dg.MetadataValue.json(meta["statuses"]),
            "failures": meta["failures"],
            "stopped_at_watermark": dg.MetadataValue.json(meta["stopped_at_watermark"]),
        }
    )


@dg.asset(
    deps=[civitai_pages],
    group_name=GROUP,
    kinds={"parquet"},
    automation_condition=dg.AutomationCondition.eager(),
)
def civitai_release(
    context: dg.AssetExecutionContext, imagegem: ImageGemSettings
) -> dg.MaterializeResult:
    """Every landed crawl window mapped to the ImageGem release format (images 29 columns,
    models 45 columns), one row per key — the latest snapshot by fetch time. With
    `IMAGEGEM_SOURCE=civitai` this folder is what `release_files` ingests, so the clean stage
    applies unchanged. Pages and items that cannot be mapped go to `quarantine/civitai`."""
    lake = imagegem.lake()
    if not list_windows(lake):
        context.log.info("no crawl window landed yet: nothing to build")
        return dg.MaterializeResult(metadata={"windows": 0})
    build = build_release(lake, imagegem.civitai_release_dir(), logger=context.log)
    records = build.quarantine
    lake.write_table("quarantine/civitai", quarantine_table(build.quarantine))
    rows = [(t, f"{n:,}", f"{build.duplicates_dropped.get(t, 0):,}") for t, n in build.rows.items()]
    return dg.MaterializeResult(
        metadata={
            "out": dg.MetadataValue.path(build.out),
            "windows": len(build.windows),
            "pages": build.pages,
            "bad_pages": build.bad_pages,
            "quarantined": len(records),
            "image_rows": build.rows.get("images", 0),
            "model_rows": build.rows.get("models", 0),
            "tables": dg.MetadataValue.md(
                markdown_table(["table", "rows", "duplicates dropped"], rows)
            ),
        }
    )


crawl_job = dg.define_asset_job(
    "civitai_refresh",
    selection=dg.AssetSelection.assets(civitai_pages),
    description="Crawl one daily window of the Civitai API.",
)


@dg.schedule(job=crawl_job, cron_schedule="0 3 * * *", execution_timezone="UTC")
def civitai_daily_refresh(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Daily incremental crawl of today's window at 03:00 UTC; on Sundays a full refresh, which
    re-reads everything so reaction counts and stats of older items are brought up to date."""
    when = context.scheduled_execution_time.astimezone(UTC)
    key = when.strftime("%Y-%m-%d")
    full = when.weekday() == 6
    return dg.RunRequest(
        run_key=f"{key}{'-full' if full else ''}",
        partition_key=key,
        tags={FULL_REFRESH_TAG: "true"} if full else {},
    )
