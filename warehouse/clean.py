"""The clean stage for the release-shaped tables (``images``, ``models``), in DuckDB SQL.

Every raw row ends in exactly one of three places, decided in one staged pass:

1. **quarantined** — it breaks a row rule (null id, impossible date, ...), it conflicts with a
   later row of the same key, or the safety filter removes it; the quarantine row keeps the
   source, key, reason, a detail and the raw payload (with the user already hashed);
2. **dropped as an exact duplicate** of an earlier row (counted, not kept);
3. **kept** in the clean table: typed (timestamps as TIMESTAMP), users hashed.

so ``rows_in = rows_out + quarantined + duplicates`` holds by construction, and an asset check
verifies it from the written files. Rules are data (:class:`Rule`): a reason, a SQL condition
and an optional detail expression, evaluated in order; the first that fires is the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import pyarrow as pa

from warehouse.duck import copy_to_parquet, quote
from warehouse.lake import Lake
from warehouse.quarantine import PAYLOAD_MAX_CHARS
from warehouse.safety import SqlToxicityScorer, ToxicityScorer
from warehouse.schema import (
    IMAGES,
    INGEST_ERROR,
    MODELS,
    SOURCE_FILE,
    SOURCE_ROW,
    Kind,
    ReleaseTable,
)


@dataclass(frozen=True)
class CleanConfig:
    """Cleaning and safety settings (the paper's defaults)."""

    max_browsing_level: int = 1
    toxicity_threshold: float = 0.2
    max_prompt_chars: int = 16_384
    min_timestamp: str = "2022-01-01"
    blocked_level_mask: int = 32  # Civitai's "Blocked" flag
    source: str = "release"

    def __post_init__(self) -> None:
        if not 0.0 <= self.toxicity_threshold <= 1.0:
            raise ValueError(f"toxicity_threshold {self.toxicity_threshold} not in [0, 1]")
        if self.max_prompt_chars <= 0:
            raise ValueError("max_prompt_chars must be positive")


@dataclass(frozen=True)
class Rule:
    """A reason to quarantine a row: ``when`` is SQL over the typed row, ``detail`` SQL text."""

    reason: str
    when: str
    detail: str = "NULL"
    reason_sql: str | None = None  # a SQL expression instead of the fixed reason text


@dataclass(frozen=True)
class CleanSpec:
    """How one release table is cleaned."""

    table: ReleaseTable
    raw: str  # lake table of the raw landing
    out: str  # lake table of the clean output
    quarantine: str  # lake table of this step's quarantine rows
    rules: tuple[Rule, ...]
    safety_rules: tuple[Rule, ...]
    toxicity_text: str  # SQL over the typed row: the text the toxicity scorer reads

    @property
    def step(self) -> str:
        return f"clean_{self.table.name}"


@dataclass
class StepReport:
    """Counts of one clean step; ``reconciles`` is the invariant the asset check enforces."""

    step: str
    table: str
    rows_in: int = 0
    rows_out: int = 0
    quarantined: int = 0
    duplicates: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    scorer: str = ""
    version: str = ""
    max_kept_toxicity: float = 0.0

    @property
    def reconciles(self) -> bool:
        return self.rows_in == self.rows_out + self.quarantined + self.duplicates

    def reason_table_md(self) -> str:
        lines = ["| reason | rows |", "|---|---:|"]
        lines += [f"| {r} | {n:,} |" for r, n in sorted(self.reasons.items(), key=lambda x: -x[1])]
        return "\n".join(lines)


# -- the rules --------------------------------------------------------------------------------


def _ts(column: str) -> str:
    """Typed timestamp from release text ("YYYY-MM-DD HH:MM:SS" or ISO 8601)."""
    return f"COALESCE(try_strptime({column}, '%Y-%m-%d %H:%M:%S'), try_cast({column} AS TIMESTAMP))"


def _date_rules(column: str, cfg: CleanConfig, required: bool) -> list[Rule]:
    rules = []
    if required:
        rules.append(Rule(f"missing {column}", f"_raw_{column} IS NULL"))
    rules += [
        Rule(
            f"unparseable {column}",
            f"_raw_{column} IS NOT NULL AND {column} IS NULL",
            f"left(_raw_{column}, 64)",
        ),
        Rule(
            f"impossible {column}",
            f"{column} < TIMESTAMP {quote(cfg.min_timestamp)} "
            f"OR {column} > now()::TIMESTAMP + INTERVAL 1 DAY",
            f"CAST({column} AS VARCHAR)",
        ),
    ]
    return rules


def images_spec(cfg: CleanConfig) -> CleanSpec:
    counts = ", ".join(
        ["cryCount", "laughCount", "likeCount", "dislikeCount", "heartCount", "commentCount"]
    )
    rules = (
        Rule("null imageId", "imageId IS NULL"),
        Rule("null modelVersionId", "modelVersionId IS NULL"),
        Rule("missing userHash", "userHash IS NULL"),
        Rule(
            "non-positive width/height",
            "width <= 0 OR height <= 0",
            "concat(width, 'x', height)",
        ),
        *_date_rules("createdAt", cfg, required=True),
        Rule(
            "prompt too long",
            f"length(prompt) > {cfg.max_prompt_chars}",
            f"printf('%d chars > {cfg.max_prompt_chars}', length(prompt))",
        ),
        Rule("negative reaction count", f"least({counts}) < 0"),
        Rule("missing browsingLevel", "browsingLevel IS NULL"),
    )
    safety = (
        Rule(
            "unsafe: browsingLevel",
            f"browsingLevel > {cfg.max_browsing_level}",
            f"printf('browsingLevel %d > {cfg.max_browsing_level}', browsingLevel)",
        ),
        Rule(
            "unsafe: toxic prompt",
            f"_toxicity > {cfg.toxicity_threshold}",
            f"printf('toxicity %.3f > {cfg.toxicity_threshold} (%s)', _toxicity, _scorer)",
        ),
    )
    return CleanSpec(IMAGES, "raw/images", "images", "quarantine/images", rules, safety, "prompt")


def models_spec(cfg: CleanConfig) -> CleanSpec:
    rules = (
        Rule("null modelId", "modelId IS NULL"),
        Rule("null modelVersionId", "modelVersionId IS NULL"),
        Rule("null fileId", "fileId IS NULL"),
        Rule("missing userHash", "userHash IS NULL"),
        Rule("negative sizeKB", "sizeKB < 0", "CAST(sizeKB AS VARCHAR)"),
        *_date_rules("publishedAt", cfg, required=True),
        *_date_rules("scannedAt", cfg, required=False),
        Rule(
            "negative count",
            "least(downloadCount, ratingCount, thumbsUpCount, thumbsDownCount) < 0",
        ),
    )
    mask = cfg.blocked_level_mask
    safety = (
        Rule(
            "unsafe: blocked nsfw level",
            f"(coalesce(modelNsfwLevel, 0) & {mask}) <> 0 "
            f"OR (coalesce(modelVersionNsfwLevel, 0) & {mask}) <> 0",
            "concat('modelNsfwLevel ', modelNsfwLevel, ', modelVersionNsfwLevel ', modelVersionNsfwLevel)",
        ),
        Rule(
            "unsafe: toxic model text",
            f"_toxicity > {cfg.toxicity_threshold}",
            f"printf('toxicity %.3f > {cfg.toxicity_threshold} (%s)', _toxicity, _scorer)",
        ),
    )
    text = "concat_ws(' ', modelName, modelVersionName, tags)"
    return CleanSpec(MODELS, "raw/models", "models", "quarantine/models", rules, safety, text)


# -- the engine -------------------------------------------------------------------------------


def _typed_select(table: ReleaseTable) -> str:
    """The raw row in clean types (users were already hashed at landing)."""
    parts = []
    for column, kind in table.columns:
        name = f'"{column}"'
        if kind is Kind.TIMESTAMP_TEXT:
            parts.append(f"{_ts(name)} AS {name}")
            parts.append(f'{name} AS "_raw_{column}"')
        else:
            parts.append(f"_raw.{name}")
    parts += [SOURCE_FILE, SOURCE_ROW, INGEST_ERROR]
    return ", ".join(parts)


def _first_rule(rules: Sequence[Rule], value: str) -> str:
    """CASE over the rules giving the first matching rule's reason (value='reason') or detail."""
    whens = " ".join(
        f"WHEN ({r.when}) THEN {(r.reason_sql or quote(r.reason)) if value == 'reason' else r.detail}"
        for r in rules
    )
    return f"CASE {whens} END"


def _score_texts(con: duckdb.DuckDBPyConnection, spec: CleanSpec, scorer: ToxicityScorer) -> None:
    """Temp table _tox(_text, _toxicity) of the distinct raw texts that score above zero.

    SQL scorers (the lexicon, the classifier + lexicon fallback) score inside DuckDB; any
    other scorer (Detoxify) gets the distinct texts in Arrow batches.
    """
    text = spec.toxicity_text
    distinct = f"SELECT DISTINCT {text} AS _text FROM _raw WHERE {text} IS NOT NULL"
    if isinstance(scorer, SqlToxicityScorer):
        scorer.create_scores(con, distinct, "_tox")
        return
    con.execute("CREATE OR REPLACE TEMP TABLE _tox (_text VARCHAR, _toxicity DOUBLE)")
    reader = con.execute(distinct).fetch_record_batch(50_000)
    for batch in reader:
        texts = batch.column(0).to_pylist()
        chunk = pa.table({"_text": texts, "_toxicity": pa.array(scorer.score(texts), pa.float64())})
        con.register("_tox_chunk", chunk)
        con.execute("INSERT INTO _tox SELECT * FROM _tox_chunk WHERE _toxicity > 0")
        con.unregister("_tox_chunk")


def _create_stage(con: duckdb.DuckDBPyConnection, spec: CleanSpec, scorer_name: str) -> None:
    """The view ``_stage``: every raw row with its fate (``_status``, ``_reason``, ``_detail``).

    Window functions (exact copies, key conflicts) run once, only on the rows whose key
    occurs more than once (``_dupkeys``), into the small table ``_ranked_dups``; every other
    row streams through the view without a sort.
    """
    table = spec.table
    key = ", ".join(f'"{k}"' for k in table.key)
    key_match = " AND ".join(f'_dupkeys._k{i} = typed."{k}"' for i, k in enumerate(table.key))
    content = ", ".join(f'"{c}"' for c in table.column_names)
    ingest_rule = Rule("ingest error", f"{INGEST_ERROR} IS NOT NULL", "NULL", INGEST_ERROR)
    rules = (ingest_rule, *spec.rules)
    safety_reason = _first_rule(spec.safety_rules, "reason")
    safety_detail = _first_rule(spec.safety_rules, "detail")
    con.execute(f"""
    CREATE OR REPLACE TEMP VIEW _checked AS
    WITH typed AS (
        SELECT {_typed_select(table)}
        FROM _raw
    )
    SELECT typed.*, {_first_rule(rules, "reason")} AS _rule_reason,
           {_first_rule(rules, "detail")} AS _rule_detail,
           _dupkeys._k0 IS NOT NULL AS _dupkey
    FROM typed LEFT JOIN _dupkeys ON {key_match}
    """)
    con.execute(f"""
    CREATE OR REPLACE TEMP TABLE _ranked_dups AS
    SELECT * EXCLUDE (_dupkey, _copy), _copy, row_number() OVER (
               PARTITION BY {key}, _copy = 1 ORDER BY {SOURCE_FILE} DESC, {SOURCE_ROW} DESC
           ) AS _keyrank
    FROM (
        SELECT *, row_number() OVER (
                   PARTITION BY {key}, hash({content}) ORDER BY {SOURCE_FILE}, {SOURCE_ROW}
               ) AS _copy
        FROM _checked WHERE _dupkey AND _rule_reason IS NULL
    )
    """)
    con.execute(f"""
    CREATE OR REPLACE TEMP VIEW _stage AS
    WITH ranked AS (
        SELECT * EXCLUDE (_dupkey), 1 AS _copy, 1 AS _keyrank
        FROM _checked WHERE NOT _dupkey OR _rule_reason IS NOT NULL
        UNION ALL BY NAME
        SELECT * FROM _ranked_dups
    ),
    scored AS (
        SELECT ranked.*, coalesce(_tox._toxicity, 0.0) AS _toxicity, {quote(scorer_name)} AS _scorer
        FROM ranked LEFT JOIN _tox ON _tox._text = ({spec.toxicity_text})
    )
    SELECT * EXCLUDE (_rule_reason, _rule_detail, _copy, _keyrank),
        CASE WHEN _rule_reason IS NOT NULL THEN 'quarantined'
             WHEN _copy > 1 THEN 'duplicate'
             WHEN _keyrank > 1 THEN 'quarantined'
             WHEN ({safety_reason}) IS NOT NULL THEN 'quarantined'
             ELSE 'kept' END AS _status,
        CASE WHEN _rule_reason IS NOT NULL THEN _rule_reason
             WHEN _copy > 1 THEN 'exact duplicate'
             WHEN _keyrank > 1 THEN 'conflicting duplicate key'
             ELSE {safety_reason} END AS _reason,
        CASE WHEN _rule_reason IS NOT NULL THEN _rule_detail
             WHEN _copy > 1 OR _keyrank > 1 THEN NULL
             ELSE {safety_detail} END AS _detail
    FROM scored
    """)


def clean_release_table(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    spec: CleanSpec,
    cfg: CleanConfig,
    scorer: ToxicityScorer,
    log: logging.Logger | None = None,
) -> StepReport:
    """Clean one release table from its raw landing into the lake (table + quarantine).

    Small lookup tables are built first (hashed users, texts with a toxicity above zero,
    keys that occur more than once); then the clean rows and the quarantine rows are each
    written in one streaming pass over the raw landing through the ``_stage`` view.
    """
    log = log or logging.getLogger(__name__)
    table = spec.table
    raw_files = lake.glob(spec.raw)
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW _raw AS SELECT * FROM read_parquet({quote(raw_files)})"
    )
    rows_in = con.execute("SELECT count(*) FROM _raw").fetchone()[0]
    log.info(f"{spec.step}: {rows_in:,} raw rows; scoring distinct texts with {scorer.name}")
    _score_texts(con, spec, scorer)
    keys = ", ".join(f'"{k}" AS _k{i}' for i, k in enumerate(table.key))
    not_null = " AND ".join(f'"{k}" IS NOT NULL' for k in table.key)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _dupkeys AS SELECT {keys} FROM _raw "
        f"WHERE {not_null} GROUP BY ALL HAVING count(*) > 1"
    )
    _create_stage(con, spec, scorer.name)

    log.info(f"{spec.step}: writing clean rows")
    content = ", ".join(f'"{c}"' for c in table.column_names)
    with lake.writing(spec.out) as version:
        copy_to_parquet(
            con, f"SELECT {content} FROM _stage WHERE _status = 'kept'", version.part(0)
        )
    log.info(f"{spec.step}: writing quarantine rows")
    write_quarantine(con, lake, spec, cfg)

    report = StepReport(step=spec.step, table=table.name, scorer=scorer.name, version=version.name)
    report.rows_in = rows_in
    report.rows_out = con.execute(
        f"SELECT count(*) FROM read_parquet({quote(lake.glob(spec.out))})"
    ).fetchone()[0]
    # The highest toxicity among kept texts: a semi join of the clean rows with the (small)
    # table of texts that scored above zero.
    report.max_kept_toxicity = con.execute(
        f"SELECT coalesce(max(_toxicity), 0) FROM _tox SEMI JOIN "
        f"(SELECT {spec.toxicity_text} AS _text FROM read_parquet({quote(lake.glob(spec.out))})) USING (_text)"
    ).fetchone()[0]
    for reason, n in con.execute(
        f"SELECT reason, count(*) FROM read_parquet({quote(lake.glob(spec.quarantine))}) GROUP BY ALL"
    ).fetchall():
        report.reasons[reason] = n
        report.quarantined += n
    # Exact copies can only be among rows whose key repeats: counted where they were ranked.
    report.duplicates = con.execute("SELECT count(*) FROM _ranked_dups WHERE _copy > 1").fetchone()[
        0
    ]
    if report.duplicates:
        report.reasons["exact duplicate"] = report.duplicates
    con.execute(
        "DROP VIEW _stage; DROP TABLE _ranked_dups; DROP VIEW _checked; DROP TABLE _tox; "
        "DROP TABLE _dupkeys; DROP VIEW _raw"
    )
    return report


def write_quarantine(
    con: duckdb.DuckDBPyConnection, lake: Lake, spec: CleanSpec, cfg: CleanConfig
) -> None:
    """The quarantine rows of a staged step, with the payload as landed (user hashed)."""
    fields = []
    for column, kind in spec.table.columns:
        if kind is Kind.TIMESTAMP_TEXT:
            fields.append(f'"{column}" := "_raw_{column}"')
        elif kind is Kind.STRING:
            fields.append(f'"{column}" := left("{column}", {PAYLOAD_MAX_CHARS})')
        else:
            fields.append(f'"{column}" := "{column}"')
    record_key = " || '/' || ".join(
        f"'{k}=' || coalesce(CAST(\"{k}\" AS VARCHAR), 'NULL')" for k in spec.table.key
    )
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
    with lake.writing(spec.quarantine) as version:
        copy_to_parquet(
            con,
            f"""SELECT {quote(cfg.source)} AS source, {quote(spec.step)} AS step,
                {quote(spec.table.name)} AS table_name, {record_key} AS record_key,
                _reason AS reason, _detail AS detail,
                {SOURCE_FILE} AS source_file, {SOURCE_ROW} AS source_row,
                to_json(struct_pack({", ".join(fields)}))::VARCHAR AS payload,
                TIMESTAMP {quote(now)} AS quarantined_at
            FROM _stage WHERE _status = 'quarantined'""",
            version.part(0),
        )


def count_rows(con: duckdb.DuckDBPyConnection, lake: Lake, table: str) -> int:
    return con.execute(f"SELECT count(*) FROM read_parquet({quote(lake.glob(table))})").fetchone()[
        0
    ]


def reconcile(con: duckdb.DuckDBPyConnection, lake: Lake, spec: CleanSpec) -> tuple[int, int, int]:
    """(rows_in, rows_out, quarantined) counted from the written files, for the asset check."""
    return (
        count_rows(con, lake, spec.raw),
        count_rows(con, lake, spec.out),
        count_rows(con, lake, spec.quarantine),
    )
