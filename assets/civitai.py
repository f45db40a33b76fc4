"""Civitai crawl: daily windows of API pages landed verbatim, then mapped to the release format."""

from collections.abc import Iterator

import dagster as dg

from pipelines.civitai.crawler import CrawlOptions, crawl
from pipelines.partitions import crawl_windows
from pipelines.resources import CivitaiResource, WarehouseResource
from warehouse.civitai_release import build_release, list_windows
from warehouse.preview import markdown_table
from warehouse.quarantine import quarantine_table

GROUP = "ingest"
FULL_REFRESH_TAG = "imagegem/full_refresh"


def crawl_configured(warehouse: WarehouseResource, civitai: CivitaiResource) -> bool:
    """The crawl has a site: a configured Civitai base URL (real or the local fake), or the
    civitai source itself (then civitai.com)."""
    return warehouse.source == "civitai" or bool(civitai.base_url)


@dg.asset(
    partitions_def=crawl_windows,
    group_name=GROUP,
    kinds={"http", "json"},
    pool="civitai",
)
def civitai_pages(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, civitai: CivitaiResource
) -> dg.MaterializeResult:
    """Civitai API v1 pages of one daily window, landed verbatim (gzip JSON lines) before any
    parsing: LoRA models newest first, each version's images, and model versions that images
    reference. The crawl stops at the previous windows' watermark unless the run is tagged
    `imagegem/full_refresh=true` — the Sunday run of the daily schedule `civitai_daily_refresh`
    — which re-reads everything to refresh reaction counts. Cursor checkpoints move only after
    a page is durably landed, so a killed run resumes without losing or duplicating a page.
    Idempotent per window. Without a Civitai site (`CIVITAI_BASE_URL` unset and a source other
    than `civitai`) the step fails with that message: there is nothing it could crawl.
    """
    if not crawl_configured(warehouse, civitai):
        raise dg.Failure(
            description=(
                "no Civitai site to crawl: CIVITAI_BASE_URL is unset and IMAGEGEM_SOURCE is "
                f"{warehouse.source!r}. Start the UI with `make ui` (it serves the sample "
                "through a local fake Civitai), set CIVITAI_BASE_URL, or build the warehouse "
                "without the crawl (job `imagegem_warehouse`)."
            )
        )
    full = context.run.tags.get(FULL_REFRESH_TAG) == "true"
    report = crawl(
        warehouse.lake(),
        context.partition_key,
        civitai.client(context.log),
        CrawlOptions(user_salt=warehouse.user_salt, full=full),
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


# Eager on any newly landed window. `eager()` itself waits until no dependency is missing,
# which for a daily-partitioned parent means every window since the crawl start: it would
# never fire once a day was skipped.
ON_NEW_WINDOW = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("eager (any new crawl window)")


@dg.asset(
    deps=[civitai_pages],
    group_name=GROUP,
    kinds={"parquet"},
    automation_condition=ON_NEW_WINDOW,
    output_required=False,
)
def civitai_release(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> Iterator[dg.MaterializeResult]:
    """Every landed crawl window mapped to the ImageGem release format (images 29 columns,
    models 45 columns), one row per key — the latest snapshot by fetch time. With
    `IMAGEGEM_SOURCE=civitai` this folder is what `release_files` ingests, so the clean stage
    applies unchanged. Pages and items that cannot be mapped go to `quarantine/civitai`.
    Before any window has landed there is nothing to build: no materialization is recorded
    (and with `IMAGEGEM_SOURCE=civitai`, whose ingest needs it, the step fails)."""
    lake = warehouse.lake()
    if not list_windows(lake):
        if warehouse.source == "civitai":
            raise dg.Failure(
                description="IMAGEGEM_SOURCE=civitai but no crawl window has landed yet: "
                "materialize a partition of civitai_pages first"
            )
        context.log.info("no crawl window landed yet: nothing to build, nothing recorded")
        return
    build = build_release(lake, warehouse.civitai_release_dir(), logger=context.log)
    lake.write_table("quarantine/civitai", quarantine_table(build.quarantine))
    rows = [(t, f"{n:,}", f"{build.duplicates_dropped.get(t, 0):,}") for t, n in build.rows.items()]
    yield dg.MaterializeResult(
        metadata={
            "out": dg.MetadataValue.path(build.out),
            "windows": len(build.windows),
            "pages": build.pages,
            "bad_pages": build.bad_pages,
            "quarantined": len(build.quarantine),
            "image_rows": build.rows.get("images", 0),
            "model_rows": build.rows.get("models", 0),
            "tables": dg.MetadataValue.md(
                markdown_table(["table", "rows", "duplicates dropped"], rows)
            ),
        }
    )
