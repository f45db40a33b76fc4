"""Media group: image files and LoRA weight files, content-addressed by SHA-256."""

import dagster as dg
import pyarrow as pa

from assets.warehouse import images
from pipelines.civitai.downloads import download_images, download_loras
from pipelines.resources import ImageGemSettings
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


def _skip(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    context.log.info("downloads skipped: CIVITAI_BASE_URL is unset (no site to download from)")
    return dg.MaterializeResult(metadata={"skipped": True, "reason": "CIVITAI_BASE_URL unset"})


@dg.asset(group_name=GROUP, deps=[images], kinds={"http", "jpeg"}, pool="downloads")
def image_files(
    context: dg.AssetExecutionContext, imagegem: ImageGemSettings
) -> dg.MaterializeResult:
    """Image files of the clean `images`: downloaded (whole users in userHash order, up to
    IMAGEGEM_MEDIA_MAX_IMAGES images), verified to decode, shrunk to IMAGEGEM_MEDIA_MAX_SIDE and
    stored content-addressed under `media/sha256/`. Resumable: images already stored are not
    fetched again. Failures (404, not an image, truncated, too large) are quarantined with
    their reason in `quarantine/image_files`."""
    if not imagegem.media_enabled():
        return _skip(context)
    lake, con = imagegem.lake(), imagegem.duck()
    rows = images_to_download(con, lake, imagegem.media_max_images)
    report = download_images(
        rows,
        MediaStore(lake),
        imagegem.image_url_map(),
        concurrency=imagegem.media_concurrency,
        max_side=imagegem.media_max_side,
        log=context.log,
        existing=_existing(lake, "image_files"),
        rate_limit=imagegem.civitai_rate_limit or None,
    )
    lake.write_table("image_files", report.table)
    lake.write_table("quarantine/image_files", report.quarantine)
    preview = report.table.filter(pa.compute.equal(report.table["status"], "ok")).slice(0, 5)
    return dg.MaterializeResult(
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
    group_name=GROUP, deps=[dg.AssetKey("loras")], kinds={"http", "safetensors"}, pool="downloads"
)
def lora_files(
    context: dg.AssetExecutionContext, imagegem: ImageGemSettings
) -> dg.MaterializeResult:
    """The primary weight file of every LoRA version, downloaded through
    `/api/download/models/{id}` (307 + Content-Disposition, file name sanitised). Only
    safetensors are accepted: PickleTensor / .ckpt / .pt files and pickle or zip content are
    refused and quarantined, never loaded. SHA-256 is verified against the API's hash, size is
    capped, and files are stored content-addressed. The token never leaves the header."""
    if not imagegem.media_enabled():
        return _skip(context)
    lake, con = imagegem.lake(), imagegem.duck()
    rows = loras_to_download(con, lake)
    report = download_loras(
        rows,
        MediaStore(lake),
        imagegem.civitai_base_url,
        imagegem.civitai_api_token,
        concurrency=max(1, imagegem.media_concurrency // 2),
        max_bytes=imagegem.lora_max_mb * 1024 * 1024,
        log=context.log,
        existing=_existing(lake, "lora_files"),
        rate_limit=imagegem.civitai_rate_limit or None,
    )
    lake.write_table("lora_files", report.table)
    lake.write_table("quarantine/lora_files", report.quarantine)
    return dg.MaterializeResult(
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
