"""Ingest group: the release files of the configured source, landed verbatim-but-typed."""

import dagster as dg

from assets.civitai import civitai_release
from pipelines.resources import WarehouseResource
from pipelines.sources import list_release
from warehouse.preview import markdown_table, query_markdown
from warehouse.release import ReleaseFormatError, describe_size, discover, land_release_table
from warehouse.schema import RELEASE_TABLES

GROUP = "ingest"


@dg.asset(
    group_name=GROUP,
    deps=[civitai_release],
    kinds={"parquet", "python"},
    automation_condition=dg.AutomationCondition.eager(),
)
def release_files(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """The release parquet files this run ingests.

    ``IMAGEGEM_SOURCE=sample`` generates the embedded ImageGem-shaped sample (with planted
    truth) under ``$IMAGEGEM_HOME/sources/sample``; ``release`` lists the published files at
    ``IMAGEGEM_RELEASE_PATH`` (local or ``s3://``); ``civitai`` lists what the crawl built
    (``civitai_release``). Every file's schema is checked here, from
    its footer, so a bad shard stops the run before any row is read.
    """
    try:
        listing = list_release(warehouse, context.log)
    except (ReleaseFormatError, ValueError) as exc:
        raise dg.Failure(description=str(exc)) from exc
    rows = [
        (name, len(files), f"{listing.rows[name]:,}", describe_size(listing.bytes[name]))
        for name, files in listing.files.items()
    ]
    return dg.MaterializeResult(
        metadata={
            "source": listing.source,
            "root": dg.MetadataValue.path(listing.root),
            "generated_now": listing.generated,
            "image_rows": listing.rows["images"],
            "model_rows": listing.rows["models"],
            "files": dg.MetadataValue.md(markdown_table(["table", "files", "rows", "size"], rows)),
        }
    )


def _landing_asset(table_name: str) -> dg.AssetsDefinition:
    table = RELEASE_TABLES[table_name]

    @dg.asset(
        name=f"raw_{table_name}",
        group_name=GROUP,
        deps=[release_files],
        kinds={"parquet", "pyarrow"},
        automation_condition=dg.AutomationCondition.eager(),
        description=(
            f"The release `{table_name}` files landed by reference: every file's footer "
            f"validated against the ImageGem schema ({len(table.columns)} columns) and a "
            "manifest committed, one row per row group (file, size, version, rows). The "
            f"rows are read once, by the clean `{table_name}` step, straight from these "
            "files; a file that changes after landing is refused until it is landed again."
        ),
    )
    def landing(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        lake = warehouse.lake()
        try:
            files = discover(warehouse.release_root(), table, warehouse.storage_options())
            report = land_release_table(
                lake,
                f"raw/{table_name}",
                files,
                table,
                warehouse.storage_options(),
                context.log,
            )
        except ReleaseFormatError as exc:
            raise dg.Failure(description=str(exc), metadata={"table": table_name}) from exc
        con = warehouse.duck()
        preview = query_markdown(
            con,
            f"SELECT file, row_group, first_row, rows, file_bytes FROM "
            f"{lake.scan(f'raw/{table_name}')} ORDER BY unit",
            10,
        )
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": report.rows,
                "files": len(report.files),
                "row_groups": report.row_groups,
                "bytes": dg.MetadataValue.int(report.bytes_read),
                "size": describe_size(report.bytes_read),
                "version": report.version,
                "manifest": dg.MetadataValue.md(preview),
            }
        )

    return landing


raw_images = _landing_asset("images")
raw_models = _landing_asset("models")
