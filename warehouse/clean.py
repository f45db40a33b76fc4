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
import os
import queue
import tempfile
import threading
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from warehouse.duck import quote
from warehouse.lake import Lake, parquet_writer
from warehouse.quarantine import PAYLOAD_MAX_CHARS, QUARANTINE_SCHEMA
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
    reader = con.execute(distinct).to_arrow_reader(50_000)
    for batch in reader:
        texts = batch.column(0).to_pylist()
        chunk = pa.table({"_text": texts, "_toxicity": pa.array(scorer.score(texts), pa.float64())})
        con.register("_tox_chunk", chunk)
        con.execute("INSERT INTO _tox SELECT * FROM _tox_chunk WHERE _toxicity > 0")
        con.unregister("_tox_chunk")


# The fate of a row in the staged pass, as the small integer the pass hands to Python.
KEPT, QUARANTINED, HELD, DUPLICATE = 0, 1, 2, 3
ROW_GROUP_ROWS = 122_880  # rows per row group of the written tables (DuckDB's default)
ARROW_BATCH_ROWS = 122_880
WRITERS = 2  # threads encoding the clean and quarantine parts (capped by the CPU count)


def _create_stage(con: duckdb.DuckDBPyConnection, spec: CleanSpec, scorer_name: str) -> None:
    """The view ``_stage``: every raw row with its first-pass fate (``_status``, ``_reason``,
    ``_detail``), its toxicity, and for the rows that are not kept their quarantine key and
    payload.

    A row that breaks a row rule is quarantined; a row whose key occurs more than once
    (``_dupkeys``) is *held*: exact copies and key conflicts are decided among the held rows
    alone (:func:`_resolve_held`), so every other row streams through without a sort; the
    rest is kept unless a safety rule quarantines it. ``_reason`` of a held row is its safety
    reason, if any.
    """
    table = spec.table
    key_match = " AND ".join(f'_dupkeys._k{i} = typed."{k}"' for i, k in enumerate(table.key))
    ingest_rule = Rule("ingest error", f"{INGEST_ERROR} IS NOT NULL", "NULL", INGEST_ERROR)
    rules = (ingest_rule, *spec.rules)
    content = ", ".join(f'"{c}"' for c in table.column_names)
    con.execute(f"""
    CREATE OR REPLACE TEMP VIEW _stage AS
    WITH typed AS (
        SELECT {_typed_select(table)}
        FROM _raw
    ),
    checked AS (
        SELECT typed.*, {_first_rule(rules, "reason")} AS _rule_reason,
               _dupkeys._k0 IS NOT NULL AS _dupkey
        FROM typed LEFT JOIN _dupkeys ON {key_match}
    ),
    scored AS (
        SELECT checked.*, coalesce(_tox._toxicity, 0.0) AS _toxicity,
               {quote(scorer_name)} AS _scorer
        FROM checked LEFT JOIN _tox ON _tox._text = ({spec.toxicity_text})
    ),
    judged AS (
        SELECT *, CASE WHEN _rule_reason IS NOT NULL THEN NULL
                       ELSE {_first_rule(spec.safety_rules, "reason")} END AS _safety_reason
        FROM scored
    ),
    fated AS (
        SELECT *,
            CASE WHEN _rule_reason IS NOT NULL THEN {QUARANTINED}
                 WHEN _dupkey THEN {HELD}
                 WHEN _safety_reason IS NOT NULL THEN {QUARANTINED}
                 ELSE {KEPT} END::UTINYINT AS _status
        FROM judged
    )
    SELECT {content}, _status,
        coalesce(_rule_reason, _safety_reason) AS _reason,
        CASE WHEN _rule_reason IS NOT NULL THEN {_first_rule(rules, "detail")}
             WHEN _safety_reason IS NOT NULL THEN {_first_rule(spec.safety_rules, "detail")}
             END AS _detail,
        {SOURCE_FILE}, {SOURCE_ROW}, _toxicity,
        CASE WHEN _status <> {KEPT} THEN {_record_key_sql(spec)} END AS _record_key,
        CASE WHEN _status <> {KEPT} THEN {_payload_sql(spec)} END AS _payload
    FROM fated
    """)


def _record_key_sql(spec: CleanSpec) -> str:
    """SQL for a quarantine row's ``record_key``: ``col=value/...`` over the table's key."""
    return " || '/' || ".join(
        f"'{k}=' || coalesce(CAST(\"{k}\" AS VARCHAR), 'NULL')" for k in spec.table.key
    )


def _payload_sql(spec: CleanSpec) -> str:
    """SQL for a quarantine row's payload: the row as landed (user hashed), as JSON text."""
    fields = []
    for column, kind in spec.table.columns:
        if kind is Kind.TIMESTAMP_TEXT:
            fields.append(f'"{column}" := "_raw_{column}"')
        elif kind is Kind.STRING:
            fields.append(f'"{column}" := left("{column}", {PAYLOAD_MAX_CHARS})')
        else:
            fields.append(f'"{column}" := "{column}"')
    return f"to_json(struct_pack({', '.join(fields)}))::VARCHAR"


class _Sink:
    """A Parquet writer fed with record batches, writing row groups of ``ROW_GROUP_ROWS``."""

    def __init__(self, file, schema: pa.Schema) -> None:
        self.schema = schema
        self.path = file if isinstance(file, str) else None
        self.writer = parquet_writer(file, schema)
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        self.rows += batch.num_rows
        if self.pending_rows >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            table = pa.Table.from_batches(self.pending, schema=self.schema)
            self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
            self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


@dataclass
class _Router:
    """Splits staged batches by fate into its own clean part, quarantine part and held rows,
    and counts what it routed (one router per writer thread)."""

    spec: CleanSpec
    cfg: CleanConfig
    now: datetime
    out: _Sink
    quarantine: _Sink
    held: _Sink | None
    rows_out: int = 0
    quarantined: int = 0
    duplicates: int = 0
    max_kept_toxicity: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    def route(self, batch: pa.RecordBatch) -> None:
        status = batch.column("_status").to_numpy(zero_copy_only=False)
        kept = status == KEPT
        if kept.any():
            rows = batch.filter(pa.array(kept))
            self.out.add(
                pa.RecordBatch.from_arrays(
                    [rows.column(c) for c in self.out.schema.names], schema=self.out.schema
                )
            )
            top = pc.max(rows.column("_toxicity")).as_py() or 0.0
            self.max_kept_toxicity = max(self.max_kept_toxicity, top)
            self.rows_out += rows.num_rows
        quarantined = status == QUARANTINED
        if quarantined.any():
            rows = batch.filter(pa.array(quarantined))
            self.quarantine.add(self._quarantine_rows(rows))
            for item in pc.value_counts(rows.column("_reason")).to_pylist():
                reason = item["values"]
                self.reasons[reason] = self.reasons.get(reason, 0) + item["counts"]
            self.quarantined += rows.num_rows
        held = status == HELD
        if held.any():
            if self.held is None:
                raise AssertionError("held rows met while resolving the held rows")
            self.held.add(batch.filter(pa.array(held)))
        self.duplicates += int((status == DUPLICATE).sum())

    def _quarantine_rows(self, rows: pa.RecordBatch) -> pa.RecordBatch:
        n = rows.num_rows

        def const(value: object, dtype: pa.DataType) -> pa.Array:
            return pa.repeat(pa.scalar(value, dtype), n)

        return pa.RecordBatch.from_arrays(
            [
                const(self.cfg.source, pa.string()),
                const(self.spec.step, pa.string()),
                const(self.spec.table.name, pa.string()),
                rows.column("_record_key"),
                rows.column("_reason"),
                rows.column("_detail"),
                rows.column(SOURCE_FILE),
                rows.column(SOURCE_ROW),
                rows.column("_payload"),
                const(self.now, pa.timestamp("us")),
            ],
            schema=QUARANTINE_SCHEMA,
        )

    def add_to(self, report: StepReport) -> None:
        """Add this router's counts to ``report``."""
        report.rows_out += self.rows_out
        report.quarantined += self.quarantined
        report.duplicates += self.duplicates
        report.max_kept_toxicity = max(report.max_kept_toxicity, self.max_kept_toxicity)
        for reason, n in self.reasons.items():
            report.reasons[reason] = report.reasons.get(reason, 0) + n


def _stream(reader: pa.RecordBatchReader, routers: list[_Router]) -> None:
    """Route every batch of ``reader``, one thread per router, while DuckDB computes the next.

    Each router writes its own files, so Parquet encoding runs on as many cores as there are
    routers; at most two batches per router wait in memory.
    """
    batches: queue.Queue = queue.Queue(maxsize=2 * len(routers))
    failures: list[BaseException] = []

    def work(router: _Router) -> None:
        while (batch := batches.get()) is not None:
            if not failures:
                try:
                    router.route(batch)
                except BaseException as exc:  # handed to the caller below
                    failures.append(exc)

    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in routers]
    for thread in threads:
        thread.start()
    try:
        for batch in reader:
            if failures:
                break
            batches.put(batch)
    finally:
        for _ in threads:
            batches.put(None)
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]


def _resolve_held(spec: CleanSpec, held_paths: list[str]) -> str:
    """SQL giving the held rows their final fate (same columns as ``_stage``).

    Among rows with the same key and the same content, the first (by source file and row)
    stays and the others are exact duplicates (dropped, counted); among the remaining rows of
    a key, the latest wins and the others are quarantined as conflicting duplicate keys; a
    winner is then quarantined only when a safety rule fired.
    """
    key = ", ".join(f'"{k}"' for k in spec.table.key)
    content = ", ".join(f'"{c}"' for c in spec.table.column_names)
    return f"""
    WITH copies AS (
        SELECT * EXCLUDE (_status), row_number() OVER (
                   PARTITION BY {content} ORDER BY {SOURCE_FILE}, {SOURCE_ROW}
               ) AS _copy
        FROM read_parquet([{", ".join(quote(p) for p in held_paths)}])
    ),
    ranked AS (
        SELECT *, row_number() OVER (
                   PARTITION BY {key}, _copy = 1 ORDER BY {SOURCE_FILE} DESC, {SOURCE_ROW} DESC
               ) AS _keyrank
        FROM copies
    )
    SELECT * EXCLUDE (_copy, _keyrank, _reason, _detail),
        CASE WHEN _copy > 1 THEN {DUPLICATE}
             WHEN _keyrank > 1 OR _reason IS NOT NULL THEN {QUARANTINED}
             ELSE {KEPT} END::UTINYINT AS _status,
        CASE WHEN _copy > 1 THEN NULL
             WHEN _keyrank > 1 THEN 'conflicting duplicate key'
             ELSE _reason END AS _reason,
        CASE WHEN _copy > 1 OR _keyrank > 1 THEN NULL ELSE _detail END AS _detail
    FROM ranked
    """


def clean_release_table(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    spec: CleanSpec,
    cfg: CleanConfig,
    scorer: ToxicityScorer,
    log: logging.Logger | None = None,
) -> StepReport:
    """Clean one release table from its raw landing into the lake (table + quarantine).

    Small lookup tables are built first (texts with a toxicity above zero, keys that occur
    more than once); then one streaming pass over the raw landing (the ``_stage`` view)
    writes the clean rows and the quarantine rows side by side and sets aside the rows whose
    key repeats, which are resolved afterwards (:func:`_resolve_held`) into the same two
    files. Both tables are committed only when everything was written.
    """
    log = log or logging.getLogger(__name__)
    table = spec.table
    con.execute(f"CREATE OR REPLACE TEMP VIEW _raw AS SELECT * FROM {lake.scan(spec.raw)}")
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

    report = StepReport(step=spec.step, table=table.name, scorer=scorer.name, rows_in=rows_in)
    now = datetime.now(UTC).replace(tzinfo=None)
    writers = max(1, min(WRITERS, os.cpu_count() or 1))
    log.info(f"{spec.step}: writing clean and quarantine rows ({writers} writers)")
    with (
        tempfile.TemporaryDirectory(prefix="imagegem-held-") as scratch,
        lake.writing(spec.out) as version,
        lake.writing(spec.quarantine) as quarantine_version,
        ExitStack() as files,
    ):
        stage = con.sql("SELECT * FROM _stage").to_arrow_reader(ARROW_BATCH_ROWS)
        sinks: list[tuple[_Sink, _Sink, _Sink]] = []
        for i in range(writers):
            out_file = files.enter_context(lake.fs.open(version.part(i), "wb"))
            quarantine_file = files.enter_context(lake.fs.open(quarantine_version.part(i), "wb"))
            sinks.append(
                (
                    _Sink(out_file, table.clean_schema()),
                    _Sink(quarantine_file, QUARANTINE_SCHEMA),
                    _Sink(os.path.join(scratch, f"held-{i}.parquet"), stage.schema),
                )
            )
        try:
            routers = [_Router(spec, cfg, now, out, q, held) for out, q, held in sinks]
            _stream(stage, routers)
            for router in routers:
                router.add_to(report)
            held_paths = []
            for _, _, held in sinks:
                held.close()
                if held.rows:
                    held_paths.append(held.path)
            if held_paths:
                n_held = sum(held.rows for _, _, held in sinks)
                log.info(f"{spec.step}: resolving {n_held:,} rows whose key repeats")
                query = _resolve_held(spec, held_paths)
                routers = [_Router(spec, cfg, now, out, q, None) for out, q, _ in sinks]
                _stream(con.sql(query).to_arrow_reader(ARROW_BATCH_ROWS), routers)
                for router in routers:
                    router.add_to(report)
            for out, quarantine, _ in sinks:
                out.close()
                quarantine.close()
        except BaseException:
            for sink in (s for trio in sinks for s in trio):
                with suppress(Exception):
                    sink.writer.close()
            raise
    report.version = version.name
    if report.duplicates:
        report.reasons["exact duplicate"] = report.duplicates
    con.execute("DROP VIEW _stage; DROP TABLE _tox; DROP TABLE _dupkeys; DROP VIEW _raw")
    return report


def count_rows(con: duckdb.DuckDBPyConnection, lake: Lake, table: str) -> int:
    """Rows of a committed lake table (from the Parquet footers)."""
    return con.execute(f"SELECT count(*) FROM {lake.scan(table)}").fetchone()[0]


def reconcile(con: duckdb.DuckDBPyConnection, lake: Lake, spec: CleanSpec) -> tuple[int, int, int]:
    """(rows_in, rows_out, quarantined) counted from the written files, for the asset check."""
    return (
        count_rows(con, lake, spec.raw),
        count_rows(con, lake, spec.out),
        count_rows(con, lake, spec.quarantine),
    )
