"""Warehouse group: clean release-shaped tables, normalised tables, quarantine, stats, catalog."""

import dagster as dg
import duckdb
import pyarrow.parquet as pq

from assets.ingest import raw_images, raw_models
from pipelines.resources import ImageGemSettings
from warehouse.catalog import build_catalog, connect_readonly
from warehouse.clean import (
    CleanSpec,
    StepReport,
    clean_release_table,
    images_spec,
    models_spec,
    reconcile,
)
from warehouse.duck import quote
from warehouse.lake import Lake
from warehouse.preview import bar_chart_markdown, markdown_table, query_markdown
from warehouse.quarantine import union_sql
from warehouse.schema import IMAGES, MODELS, USER_HASH_COLUMNS, USER_HASH_PATTERN, ReleaseTable
from warehouse.sqlfiles import questions
from warehouse.stats import compute_table1
from warehouse.tables import DERIVED, build_derived, duplicate_keys

GROUP = "warehouse"


def _read(lake: Lake, table: str) -> str:
    return f"read_parquet({quote(lake.glob(table))})"


def _schema_check(lake: Lake, spec_table: ReleaseTable, name: str) -> dg.AssetCheckResult:
    version = lake.require(name)
    with lake.fs.open(version.part(0), "rb") as f:
        found = pq.read_schema(f)
    expected = spec_table.clean_schema()
    mismatches = [
        f"{e.name}: expected {e.type}, found {found.field(e.name).type if e.name in found.names else 'missing'}"
        for e in expected
        if e.name not in found.names or not found.field(e.name).type.equals(e.type)
    ]
    return dg.AssetCheckResult(
        check_name="schema",
        passed=not mismatches and found.names == expected.names,
        metadata={
            "columns": len(found.names),
            "expected_columns": len(expected.names),
            "mismatches": dg.MetadataValue.md("\n".join(f"- {m}" for m in mismatches) or "none"),
        },
    )


def _reconciliation_check(
    con, lake: Lake, spec: CleanSpec, report: StepReport
) -> dg.AssetCheckResult:
    rows_in, rows_out, quarantined = reconcile(con, lake, spec)
    return dg.AssetCheckResult(
        check_name="reconciliation",
        passed=rows_in == rows_out + quarantined + report.duplicates and report.reconciles,
        metadata={
            "rows_in": rows_in,
            "rows_out": rows_out,
            "quarantined": quarantined,
            "exact_duplicates_dropped": report.duplicates,
        },
    )


def _unique_key_check(con, lake: Lake, name: str, key: tuple[str, ...]) -> dg.AssetCheckResult:
    dupes = duplicate_keys(con, lake, name, key)
    return dg.AssetCheckResult(
        check_name="unique_key",
        passed=dupes == 0,
        metadata={"key": ", ".join(key), "duplicated_keys": dupes},
    )


CLEAN_CHECKS = ("schema", "reconciliation", "unique_key", "safety_filter_applied")


def _clean_asset(table: ReleaseTable, raw: dg.AssetsDefinition, spec_for) -> dg.AssetsDefinition:
    @dg.asset(
        name=table.name,
        group_name=GROUP,
        deps=[raw],
        kinds={"duckdb", "parquet"},
        automation_condition=dg.AutomationCondition.eager(),
        check_specs=[dg.AssetCheckSpec(c, asset=table.name) for c in CLEAN_CHECKS],
        description=(
            f"The clean ImageGem `{table.name}` table (release shape, {len(table.columns)} "
            f"columns, key {', '.join(table.key)}): typed, users hashed, exact duplicates "
            "dropped, rule breakers and safety-filtered rows quarantined with a reason."
        ),
    )
    def clean(
        context: dg.AssetExecutionContext, imagegem: ImageGemSettings
    ) -> dg.MaterializeResult:
        lake, cfg = imagegem.lake(), imagegem.clean_config()
        spec: CleanSpec = spec_for(cfg)
        con = imagegem.duck()
        report = clean_release_table(con, lake, spec, cfg, imagegem.scorer(), context.log)
        safety = _safety_check(con, lake, table, cfg, report)
        checks = [
            _schema_check(lake, table, table.name),
            _reconciliation_check(con, lake, spec, report),
            _unique_key_check(con, lake, table.name, table.key),
            safety,
        ]
        reasons = sorted(report.reasons.items(), key=lambda kv: -kv[1])
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": report.rows_out,
                "rows_in": report.rows_in,
                "quarantined": report.quarantined,
                "exact_duplicates_dropped": report.duplicates,
                "toxicity_scorer": report.scorer,
                "reasons": dg.MetadataValue.md(
                    bar_chart_markdown([r for r, _ in reasons], [n for _, n in reasons])
                    if reasons
                    else "none"
                ),
                "preview": dg.MetadataValue.md(
                    query_markdown(con, f"SELECT * FROM {_read(lake, table.name)}", 5)
                ),
                "version": report.version,
            },
            check_results=checks,
        )

    return clean


def _safety_check(
    con, lake: Lake, table: ReleaseTable, cfg, report: StepReport
) -> dg.AssetCheckResult:
    src = _read(lake, table.name)
    if table is IMAGES:
        level = con.execute(f"SELECT coalesce(max(browsingLevel), 0) FROM {src}").fetchone()[0]
        passed = (
            level <= cfg.max_browsing_level and report.max_kept_toxicity <= cfg.toxicity_threshold
        )
        details = {"max_browsingLevel_kept": level, "max_allowed": cfg.max_browsing_level}
    else:
        mask = cfg.blocked_level_mask
        blocked = con.execute(
            f"SELECT count(*) FROM {src} WHERE (coalesce(modelNsfwLevel,0) & {mask}) <> 0 "
            f"OR (coalesce(modelVersionNsfwLevel,0) & {mask}) <> 0"
        ).fetchone()[0]
        passed = blocked == 0 and report.max_kept_toxicity <= cfg.toxicity_threshold
        details = {"blocked_rows_kept": blocked}
    return dg.AssetCheckResult(
        check_name="safety_filter_applied",
        passed=passed,
        metadata={
            **details,
            "max_toxicity_kept": float(report.max_kept_toxicity),
            "toxicity_threshold": cfg.toxicity_threshold,
            "scorer": report.scorer,
        },
    )


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
        check_specs=[dg.AssetCheckSpec("unique_key", asset=name)],
        description=table.description,
    )
    def derived(
        context: dg.AssetExecutionContext, imagegem: ImageGemSettings
    ) -> dg.MaterializeResult:
        lake, con = imagegem.lake(), imagegem.duck()
        rows = build_derived(con, lake, name)
        context.log.info(f"{name}: {rows:,} rows")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": rows,
                "key": ", ".join(table.key),
                "preview": dg.MetadataValue.md(
                    query_markdown(con, f"SELECT * FROM {_read(lake, name)}", 5)
                ),
            },
            check_results=[_unique_key_check(con, lake, name, table.key)],
        )

    return derived


derived_assets = [_derived_asset(n) for n in DERIVED]


@dg.asset(
    group_name=GROUP,
    deps=[images, models],
    kinds={"duckdb"},
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[dg.AssetCheckSpec("every_row_has_a_reason", asset="quarantine")],
)
def quarantine(
    context: dg.AssetExecutionContext, imagegem: ImageGemSettings
) -> dg.MaterializeResult:
    """Every rejected input row of the clean steps: source, step, key, reason, detail, payload.

    The data is written by each clean step (``quarantine/images``, ``quarantine/models``);
    the catalog's ``quarantine`` view unions them. This asset summarises and checks them.
    """
    lake, con = imagegem.lake(), imagegem.duck()
    union = union_sql(lake)
    by_reason = con.execute(
        f"SELECT step, reason, count(*) AS n FROM ({union}) GROUP BY ALL ORDER BY n DESC"
    ).fetchall()
    missing = con.execute(
        f"SELECT count(*) FROM ({union}) WHERE reason IS NULL OR source IS NULL OR record_key IS NULL"
    ).fetchone()[0]
    total = sum(n for _, _, n in by_reason)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": total,
            "by_reason": dg.MetadataValue.md(
                markdown_table(
                    ["step", "reason", "rows"], [(s, r, f"{n:,}") for s, r, n in by_reason]
                )
            ),
            "preview": dg.MetadataValue.md(
                query_markdown(con, f"SELECT step, record_key, reason, detail FROM ({union})", 10)
            ),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="every_row_has_a_reason",
                passed=missing == 0,
                metadata={"rows_without": missing},
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
    context: dg.AssetExecutionContext, imagegem: ImageGemSettings
) -> dg.MaterializeResult:
    """The paper's Table 1 — raw vs safety-filtered images, unique prompts, LoRAs, unique tags,
    users, uploaders and averages — on this data, beside the published figures, plus the
    shape ratios of the ImageGem schema doc."""
    lake, con = imagegem.lake(), imagegem.duck()
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
    context: dg.AssetExecutionContext, imagegem: ImageGemSettings
) -> dg.MaterializeResult:
    """The DuckDB catalog file ``$IMAGEGEM_HOME/warehouse.duckdb``: one view per lake table
    plus the prompt macros, rebuilt atomically by one writer (pool ``warehouse``). Open it
    with any DuckDB client, from any directory: ``duckdb -readonly data/warehouse.duckdb``."""
    lake = imagegem.lake()
    report = build_catalog(lake, imagegem.catalog_path())
    con = connect_readonly(report.path, lake)
    answers = []
    for name, sql in questions().items():
        if "getvariable" in sql:
            continue
        try:
            answers.append(f"**{name}**\n\n{query_markdown(con, sql, 5)}")
        except duckdb.CatalogException:  # a table it needs is not materialized yet
            answers.append(f"**{name}**\n\n(needs: {', '.join(report.missing)})")
    counts = [
        (v, f"{con.execute(f'SELECT count(*) FROM {v}').fetchone()[0]:,}") for v in report.views
    ]
    con.close()
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(report.path),
            "views": dg.MetadataValue.md(markdown_table(["view", "rows"], counts)),
            "missing_tables": ", ".join(report.missing) or "none",
            "example_answers": dg.MetadataValue.md("\n\n".join(answers)),
        }
    )


@dg.asset_check(
    asset=warehouse_catalog,
    description="No raw username in any table: every userHash is 64 lowercase hex.",
)
def no_raw_usernames(imagegem: ImageGemSettings) -> dg.AssetCheckResult:
    con = connect_readonly(imagegem.catalog_path(), imagegem.lake())
    offenders: dict[str, int] = {}
    pattern = USER_HASH_PATTERN[1:-1]
    # Distinct values first (tens of thousands of users, millions of rows), then the regex.
    present = {
        r[0]
        for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    }
    for table, column in USER_HASH_COLUMNS.items():
        if table not in present:
            continue
        offenders[table] = con.execute(
            f'SELECT count(*) FROM (SELECT DISTINCT "{column}" AS u FROM {table}) '
            f"WHERE NOT regexp_full_match(u, '{pattern}')"
        ).fetchone()[0]
    # Quarantine payloads (JSON text, or whatever body a bad page had): every userHash or
    # username value in them, at any depth, must be a hash. A regex reads non-JSON bodies too.
    offenders["quarantine.payload"] = con.execute(
        "SELECT count(*) FROM (SELECT DISTINCT unnest(regexp_extract_all(payload, "
        '\'"(?:userHash|username)"\\s*:\\s*"([^"]*)"\', 1)) AS u FROM quarantine) '
        f"WHERE NOT regexp_full_match(u, '{pattern}')"
    ).fetchone()[0]
    con.close()
    bad = {t: n for t, n in offenders.items() if n}
    return dg.AssetCheckResult(
        passed=not bad,
        metadata={"tables_checked": len(offenders), "offending_values": dg.MetadataValue.json(bad)},
    )


ALL_ASSETS = [images, models, *derived_assets, quarantine, table1_stats, warehouse_catalog]
ALL_CHECKS = [no_raw_usernames]
