"""Warehouse group: clean release-shaped tables, normalised tables, quarantine, stats, catalog.

The checks are the plain functions of :mod:`warehouse.checks`; here they are only wrapped in
``AssetCheckResult``s.
"""

import dagster as dg
import duckdb

from assets.ingest import raw_images, raw_models
from pipelines.resources import WarehouseResource
from warehouse import checks
from warehouse.catalog import build_catalog, connect_readonly
from warehouse.clean import CleanSpec, clean_release_table, images_spec, models_spec
from warehouse.preview import bar_chart_markdown, markdown_table, query_markdown
from warehouse.quarantine import union_sql
from warehouse.release import ReleaseFormatError, open_landing
from warehouse.schema import IMAGES, MODELS, ReleaseTable
from warehouse.sqlfiles import questions
from warehouse.stats import compute_table1
from warehouse.tables import DERIVED, build_derived

GROUP = "warehouse"


def _md_list(items: list[str]) -> dg.MetadataValue:
    return dg.MetadataValue.md("\n".join(f"- {m}" for m in items) or "none")


def _schema_result(result: checks.SchemaCheck) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="schema",
        passed=result.passed,
        metadata={
            "columns": result.columns,
            "expected_columns": result.expected_columns,
            "mismatches": _md_list(result.mismatches),
        },
    )


def _reconciliation_result(result: checks.ReconciliationCheck) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="reconciliation",
        passed=result.passed,
        metadata={
            "rows_in": result.rows_in,
            "rows_out": result.rows_out,
            "quarantined": result.quarantined,
            "exact_duplicates_dropped": result.exact_duplicates_dropped,
        },
    )


def _unique_key_result(result: checks.UniqueKeyCheck) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="unique_key",
        passed=result.passed,
        metadata={"key": ", ".join(result.key), "duplicated_keys": result.duplicated_keys},
    )


def _safety_result(result: checks.SafetyCheck) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="safety_filter_applied",
        passed=result.passed,
        metadata={
            "kept_rows_breaking_a_rule": dg.MetadataValue.json(result.violations),
            "max_toxicity_kept": result.max_toxicity_kept,
            "toxicity_threshold": result.toxicity_threshold,
            "scorer": result.scorer,
        },
    )


CHECK_DESCRIPTIONS = {
    "schema": "The written Parquet has the release columns, in order, with the clean types.",
    "reconciliation": (
        "Every raw row ended in one place: rows in = rows out + quarantined + exact "
        "duplicates dropped, counted from the written files."
    ),
    "unique_key": "No key value occurs twice in the written table.",
    "safety_filter_applied": (
        "No kept row breaks the clean stage's safety rules (browsing level / blocked nsfw "
        "bit, evaluated again on the written table) and no kept text scored above the "
        "toxicity threshold."
    ),
    "every_row_has_a_reason": "Every quarantined row has a reason, a source and a key.",
}
CLEAN_CHECKS = ("schema", "reconciliation", "unique_key", "safety_filter_applied")


def _check_specs(asset: str, names: tuple[str, ...]) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(n, asset=asset, description=CHECK_DESCRIPTIONS[n]) for n in names]


def _clean_asset(table: ReleaseTable, raw: dg.AssetsDefinition, spec_for) -> dg.AssetsDefinition:
    @dg.asset(
        name=table.name,
        group_name=GROUP,
        deps=[raw],
        kinds={"duckdb", "parquet"},
        automation_condition=dg.AutomationCondition.eager(),
        check_specs=_check_specs(table.name, CLEAN_CHECKS),
        description=(
            f"The clean ImageGem `{table.name}` table (release shape, {len(table.columns)} "
            f"columns, key {', '.join(table.key)}), read once from the landed release files: "
            "typed, raw usernames hashed, exact duplicates dropped, rule breakers and "
            "safety-filtered rows quarantined with a reason."
        ),
    )
    def clean(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        lake, cfg = warehouse.lake(), warehouse.clean_config()
        spec: CleanSpec = spec_for(cfg)
        con = warehouse.duck()
        try:
            landing = open_landing(
                lake, spec.raw, table, warehouse.user_salt, warehouse.storage_options()
            )
            report = clean_release_table(
                con, lake, spec, cfg, warehouse.scorer(), landing, context.log
            )
        except ReleaseFormatError as exc:
            raise dg.Failure(description=str(exc), metadata={"table": table.name}) from exc
        results = [
            _schema_result(checks.schema_check(lake, table)),
            _reconciliation_result(checks.reconciliation_check(con, lake, spec, report)),
            _unique_key_result(checks.unique_key_check(con, lake, table.name, table.key)),
            _safety_result(checks.safety_check(con, lake, spec, cfg, report)),
        ]
        reasons = sorted(report.reasons.items(), key=lambda kv: -kv[1])
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": report.rows_out,
                "rows_in": report.rows_in,
                "quarantined": report.quarantined,
                "exact_duplicates_dropped": report.duplicates,
                "rows_with_ingest_errors": sum(report.ingest_errors.values()),
                "ingest_errors": dg.MetadataValue.md(
                    markdown_table(
                        ["error", "rows"],
                        [(k, f"{v:,}") for k, v in sorted(report.ingest_errors.items())],
                    )
                    if report.ingest_errors
                    else "none"
                ),
                "raw_usernames_hashed": report.raw_usernames_hashed,
                "toxicity_scorer": report.scorer,
                "reasons": dg.MetadataValue.md(
                    bar_chart_markdown([r for r, _ in reasons], [n for _, n in reasons])
                    if reasons
                    else "none"
                ),
                "preview": dg.MetadataValue.md(
                    query_markdown(con, f"SELECT * FROM {lake.scan(table.name)}", 5)
                ),
                "version": report.version,
            },
            check_results=results,
        )

    return clean


models = _clean_asset(MODELS, raw_models, models_spec)
images = _clean_asset(IMAGES, raw_images, images_spec)
CLEAN_ASSETS = {"images": images, "models": models}


def _derived_asset(name: str) -> dg.AssetsDefinition:
    table = DERIVED[name]
    upstream = [CLEAN_ASSETS.get(n) or dg.AssetKey(n) for n in table.needs]

    @dg.asset(
        name=name,
        group_name=GROUP,
        deps=upstream,
        kinds={"duckdb", "parquet"},
        automation_condition=dg.AutomationCondition.eager(),
        check_specs=_check_specs(name, ("unique_key",)),
        description=table.description,
    )
    def derived(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        lake, con = warehouse.lake(), warehouse.duck()
        rows = build_derived(con, lake, name)
        context.log.info(f"{name}: {rows:,} rows")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": rows,
                "key": ", ".join(table.key),
                "preview": dg.MetadataValue.md(
                    query_markdown(con, f"SELECT * FROM {lake.scan(name)}", 5)
                ),
            },
            check_results=[_unique_key_result(checks.unique_key_check(con, lake, name, table.key))],
        )

    return derived


derived_assets = [_derived_asset(n) for n in DERIVED]


@dg.asset(
    group_name=GROUP,
    deps=[images, models],
    kinds={"duckdb"},
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=_check_specs("quarantine", ("every_row_has_a_reason",)),
)
def quarantine(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Every rejected input row, of every step: source, step, key, reason, detail, payload.

    Each step writes its own part (``quarantine/images``, ``quarantine/models``, the crawl's
    and the downloads'); the catalog's ``quarantine`` view unions them. This asset summarises
    and checks the union.
    """
    lake, con = warehouse.lake(), warehouse.duck()
    summary = checks.quarantine_summary(con, lake)
    union = union_sql(lake)
    preview = (
        query_markdown(con, f"SELECT step, record_key, reason, detail FROM ({union})", 10)
        if union
        else "none"
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": summary.total,
            "by_reason": dg.MetadataValue.md(
                markdown_table(
                    ["step", "reason", "rows"],
                    [(s, r, f"{n:,}") for s, r, n in summary.by_reason],
                )
            ),
            "preview": dg.MetadataValue.md(preview),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="every_row_has_a_reason",
                passed=summary.passed,
                metadata={"rows_without": summary.rows_without_reason},
            )
        ],
    )


@dg.asset(
    group_name=GROUP,
    deps=[images, models, quarantine],
    kinds={"duckdb"},
    automation_condition=dg.AutomationCondition.eager(),
)
def table1_stats(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """The paper's Table 1 — raw vs safety-filtered images, unique prompts, LoRAs, unique tags,
    users, uploaders and averages — on this data, beside the published figures, plus the
    published shape ratios of the release (users per uploader, images per user, ...)."""
    lake, con = warehouse.lake(), warehouse.duck()
    stats = compute_table1(con, lake)
    lake.write_table("table1_stats", stats.to_arrow())
    return dg.MaterializeResult(
        metadata={
            "table1": dg.MetadataValue.md(stats.markdown()),
            "shape_ratios": dg.MetadataValue.md(stats.ratios_markdown()),
            **{f"ratio/{k}": round(v, 4) for k, v in stats.ratios().items()},
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[images, models, quarantine, table1_stats, *derived_assets],
    kinds={"duckdb"},
    pool="warehouse",
    automation_condition=dg.AutomationCondition.eager(),
)
def warehouse_catalog(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """The DuckDB catalog file ``$IMAGEGEM_HOME/warehouse.duckdb``: one view per lake table
    plus the prompt macros, rebuilt atomically by one writer (pool ``warehouse``). Open it
    with any DuckDB client, from any directory: ``duckdb -readonly data/warehouse.duckdb``."""
    lake = warehouse.lake()
    report = build_catalog(lake, warehouse.catalog_path())
    con = connect_readonly(report.path, lake)
    counts = [
        (v, f"{con.execute(f'SELECT count(*) FROM {v}').fetchone()[0]:,}") for v in report.views
    ]
    con.close()
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(report.path),
            "views": dg.MetadataValue.md(markdown_table(["view", "rows"], counts)),
            "missing_tables": ", ".join(report.missing) or "none",
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[warehouse_catalog],
    kinds={"duckdb"},
    automation_condition=dg.AutomationCondition.eager(),
)
def warehouse_tour(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """The example questions (``warehouse/sql/questions.sql``: unique prompts, base model
    families, LoRAs with a tag, multi-LoRA images, ...) answered on the current catalog,
    read-only, so the catalog's one writer is never held up by them (``imagegem tour``
    prints the same answers)."""
    con = connect_readonly(warehouse.catalog_path(), warehouse.lake())
    answers, unanswered = [], []
    try:
        for name, sql in questions().items():
            if "getvariable" in sql:
                continue
            try:
                answers.append(f"**{name}**\n\n{query_markdown(con, sql, 5)}")
            except duckdb.CatalogException as exc:  # a table it needs is not materialized yet
                unanswered.append(name)
                answers.append(f"**{name}**\n\n(not answerable yet: {exc})")
    finally:
        con.close()
    return dg.MaterializeResult(
        metadata={
            "questions": len(answers),
            "unanswered": ", ".join(unanswered) or "none",
            "example_answers": dg.MetadataValue.md("\n\n".join(answers)),
        }
    )


@dg.asset_check(
    asset=warehouse_catalog,
    description=(
        "No raw username anywhere: every userHash of the warehouse tables, and every "
        "userHash/username value inside a quarantine payload, is a 64-hex salted hash."
    ),
)
def no_raw_usernames(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    lake, con = warehouse.lake(), warehouse.duck()
    result = checks.raw_usernames_check(con, lake)
    return dg.AssetCheckResult(
        passed=result.passed,
        metadata={
            "tables_checked": result.tables_checked,
            "offending_values": dg.MetadataValue.json(result.offending_values),
        },
    )


ALL_ASSETS = [
    images,
    models,
    *derived_assets,
    quarantine,
    table1_stats,
    warehouse_catalog,
    warehouse_tour,
]
ALL_CHECKS = [no_raw_usernames]
