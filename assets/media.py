"""Media group: image files and LoRA weight files, content-addressed by SHA-256.

Both download from the configured Civitai site; without one there is nothing to download
and the step records no materialization (it says why in its log).
"""

from collections.abc import Iterator

import dagster as dg
import pyarrow as pa

from assets.warehouse import images
from pipelines.civitai.downloads import download_images, download_loras
from pipelines.resources import CivitaiResource, MediaResource, WarehouseResource
from warehouse.lake import Lake
from warehouse.media import MediaStore, images_to_download, loras_to_download
from warehouse.preview import bar_chart_markdown, markdown_table

GROUP = "media"


def _existing(lake: Lake, table: str) -> pa.Table | None:
    return lake.read_table(table) if lake.current(table) is not None else None


def _summary(table: pa.Table, reasons: dict[str, int]) -> dict[str, dg.MetadataValue]:
    counts: dict[str, int] = {}
    for status in table.column("status").to_pylist():
        counts[status] = counts.get(status, 0) + 1
    ranked = sorted(reasons.items(), key=lambda kv: -kv[1])
    return {
        "dagster/row_count": dg.MetadataValue.int(table.num_rows),
        "by_status": dg.MetadataValue.json(counts),
        "failure_reasons": dg.MetadataValue.md(
            bar_chart_markdown([r for r, _ in ranked], [n for _, n in ranked]) if ranked else "none"
        ),
    }


def _no_site(context: dg.AssetExecutionContext, civitai: CivitaiResource) -> bool:
    """True (and says so in the log) when there is no site to download from."""
    if civitai.base_url:
        return False
    context.log.warning(
        "nothing downloaded, no materialization recorded: CIVITAI_BASE_URL is unset (no site "
        "to download from; `make ui` and `make demo` serve the sample through a local one)"
    )
    return True


@dg.asset(
    group_name=GROUP, deps=[images], kinds={"http", "jpeg"}, pool="downloads", output_required=False
)
def image_files(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    civitai: CivitaiResource,
    media: MediaResource,
) -> Iterator[dg.MaterializeResult]:
    """Image files of the clean `images`: downloaded (whole users in userHash order, up to
    IMAGEGEM_MEDIA_MAX_IMAGES images), verified to decode, shrunk to IMAGEGEM_MEDIA_MAX_SIDE and
    stored content-addressed under `media/sha256/`. Resumable: images already stored are not
    fetched again. Failures (404, not an image, truncated, too large) are quarantined with
    their reason in `quarantine/image_files`. Without a Civitai site nothing is recorded."""
    if _no_site(context, civitai):
        return
    lake, con = warehouse.lake(), warehouse.duck()
    rows = images_to_download(con, lake, media.max_images)
    report = download_images(
        rows,
        MediaStore(lake),
        media.image_url_map(civitai.base_url),
        concurrency=media.concurrency,
        max_side=media.max_side,
        log=context.log,
        existing=_existing(lake, "image_files"),
        rate_limit=civitai.rate_limit or None,
    )
    lake.write_table("image_files", report.table)
    lake.write_table("quarantine/image_files", report.quarantine)
    preview = report.table.filter(pa.compute.equal(report.table["status"], "ok")).slice(0, 5)
    yield dg.MaterializeResult(
        metadata={
            **_summary(report.table, report.reasons),
            "downloaded": report.downloaded,
            "carried_over": report.skipped,
            "failed": report.failed,
            "seconds": round(report.seconds, 1),
            "preview": dg.MetadataValue.md(
                markdown_table(
                    preview.column_names, [list(r.values()) for r in preview.to_pylist()]
                )
            ),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[dg.AssetKey("loras")],
    kinds={"http", "safetensors"},
    pool="downloads",
    output_required=False,
)
def lora_files(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    civitai: CivitaiResource,
    media: MediaResource,
) -> Iterator[dg.MaterializeResult]:
    """The primary weight file of every LoRA version, downloaded through
    `/api/download/models/{id}` (307 + Content-Disposition, file name sanitised). Only
    safetensors are accepted: PickleTensor / .ckpt / .pt files and pickle or zip content are
    refused and quarantined, never loaded. SHA-256 is verified against the API's hash, size is
    capped, and files are stored content-addressed. The token never leaves the header.
    Without a Civitai site nothing is recorded."""
    if _no_site(context, civitai):
        return
    lake, con = warehouse.lake(), warehouse.duck()
    rows = loras_to_download(con, lake)
    report = download_loras(
        rows,
        MediaStore(lake),
        civitai.base_url,
        civitai.api_token,
        concurrency=max(1, media.concurrency // 2),
        max_bytes=media.lora_max_mb * 1024 * 1024,
        log=context.log,
        existing=_existing(lake, "lora_files"),
        rate_limit=civitai.rate_limit or None,
    )
    lake.write_table("lora_files", report.table)
    lake.write_table("quarantine/lora_files", report.quarantine)
    yield dg.MaterializeResult(
        metadata={
            **_summary(report.table, report.reasons),
            "downloaded": report.downloaded,
            "carried_over": report.skipped,
            "refused": report.refused,
            "failed": report.failed,
            "unverified": report.unverified,
            "seconds": round(report.seconds, 1),
        }
    )
