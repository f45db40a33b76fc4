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

The pass reads the landing (:class:`~warehouse.release.Landing`): every row group of the
release is decoded once, by one of a few worker threads, each with its own single-threaded
DuckDB connection that scores the batch's texts and runs the rules over it
(:func:`fate_sql`), and its own Parquet writers. Only the keys that repeat (found first from
the key columns alone) need a second look, among themselves (:func:`_resolve_held`).
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warehouse.duck import quote
from warehouse.lake import Lake, parquet_writer
from warehouse.progress import Progress
from warehouse.quarantine import PAYLOAD_MAX_CHARS, QUARANTINE_SCHEMA
from warehouse.release import Landing, LandingUnit
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
    ingest_errors: dict[str, int] = field(default_factory=dict)
    raw_usernames_hashed: int = 0

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
        Rule(  # strlen (bytes, O(1)) >= length (characters): only long prompts are counted
            "prompt too long",
            f"strlen(prompt) > {cfg.max_prompt_chars} AND length(prompt) > {cfg.max_prompt_chars}",
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


# The fate of a row in the staged pass, as the small integer the pass hands to Python.
KEPT, QUARANTINED, HELD, DUPLICATE = 0, 1, 2, 3
ROW_GROUP_ROWS = 122_880  # rows per row group of the written tables (DuckDB's default)
ARROW_BATCH_ROWS = 122_880
WRITERS = 2  # threads encoding the clean and quarantine parts (capped by the CPU count)


def stage_schema(table: ReleaseTable) -> pa.Schema:
    """A staged row: the row in clean types, its fate (``_status``, ``_reason``,
    ``_detail``), its lineage and toxicity, and for the rows that are not kept their
    quarantine key and payload."""
    return pa.schema(
        [
            *table.clean_schema(),
            pa.field("_status", pa.uint8()),
            pa.field("_reason", pa.string()),
            pa.field("_detail", pa.string()),
            pa.field(SOURCE_FILE, pa.string()),
            pa.field(SOURCE_ROW, pa.int64()),
            pa.field("_toxicity", pa.float64()),
            pa.field("_record_key", pa.string()),
            pa.field("_payload", pa.string()),
        ]
    )


def fate_sql(spec: CleanSpec, scorer_name: str) -> str:
    """SQL giving every row of the batch ``_b`` its first-pass fate, in ``_source_row`` order.

    ``_b`` is a canonical batch (release columns and lineage), ``_tox(_text, _toxicity)`` the
    batch's texts that score above zero, ``_dupkeys`` the keys that occur more than once in
    the whole table. Only what the batch does not already hold comes out: the timestamps in
    clean types, ``_status``, ``_reason``, ``_detail`` and ``_toxicity`` (the rows that are
    not kept get their key and payload afterwards, :func:`quarantine_sql`).

    A row that breaks a row rule is quarantined; a row whose key occurs more than once is
    *held*: exact copies and key conflicts are decided among the held rows alone
    (:func:`_resolve_held`), so every other row streams through without a sort; the rest is
    kept unless a safety rule quarantines it. ``_reason`` of a held row is its safety
    reason, if any.
    """
    table = spec.table
    key_match = " AND ".join(f'_dupkeys._k{i} = typed."{k}"' for i, k in enumerate(table.key))
    ingest_rule = Rule("ingest error", f"{INGEST_ERROR} IS NOT NULL", "NULL", INGEST_ERROR)
    rules = (ingest_rule, *spec.rules)
    timestamps = ", ".join(f'"{c}"' for c, k in table.columns if k is Kind.TIMESTAMP_TEXT)
    return f"""
    WITH typed AS (
        SELECT {_typed_select(table)}
        FROM _b AS _raw
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
    SELECT {timestamps + ", " if timestamps else ""}_status,
        coalesce(_rule_reason, _safety_reason) AS _reason,
        CASE WHEN _rule_reason IS NOT NULL THEN {_first_rule(rules, "detail")}
             WHEN _safety_reason IS NOT NULL THEN {_first_rule(spec.safety_rules, "detail")}
             END AS _detail,
        _toxicity, {SOURCE_ROW}
    FROM fated
    ORDER BY {SOURCE_ROW}
    """


def quarantine_sql(spec: CleanSpec, relation: str) -> str:
    """SQL giving the rows of the canonical ``relation`` their quarantine ``_record_key``
    and ``_payload``, in ``_source_row`` order (run only on the rows that are not kept)."""
    return (
        f"SELECT {_record_key_sql(spec)} AS _record_key, {_payload_sql(spec)} AS _payload "
        f"FROM {relation} ORDER BY {SOURCE_ROW}"
    )


class _Stager:
    """Stages canonical batches (:func:`fate_sql`) on its own single-threaded DuckDB
    connection, so several stagers run side by side, one per worker thread."""

    def __init__(
        self,
        spec: CleanSpec,
        scorer: ToxicityScorer,
        dupkeys: pa.Table,
        memory_limit: str = "1GB",
    ) -> None:
        self.spec = spec
        self.scorer = scorer
        self.schema = stage_schema(spec.table)
        self.sql = fate_sql(spec, scorer.name)
        self.quarantine_sql = quarantine_sql(spec, "_q")
        self.con = duckdb.connect()
        self.con.execute("SET threads = 1")
        self.con.execute(f"SET memory_limit = {quote(memory_limit)}")
        self.con.register("_dupkeys_in", dupkeys)
        self.con.execute("CREATE TEMP TABLE _dupkeys AS SELECT * FROM _dupkeys_in")
        self.con.unregister("_dupkeys_in")
        self.sql_scorer = isinstance(scorer, SqlToxicityScorer)
        self.text_column = (
            spec.toxicity_text if spec.toxicity_text in spec.table.column_names else None
        )

    def close(self) -> None:
        self.con.close()

    def _texts(self, batch: pa.RecordBatch) -> pa.Array:
        if self.text_column is not None:
            return batch.column(self.text_column)
        table = self.con.sql(f"SELECT {self.spec.toxicity_text} AS _text FROM _b").to_arrow_table()
        return table.column(0).combine_chunks()

    def _score(self, batch: pa.RecordBatch) -> None:
        """Temp table ``_tox(_text, _toxicity)``: the batch's distinct texts scoring above 0.

        SQL scorers see only the texts their prefilter finds (run here in Arrow, the same
        RE2 pattern): a text it does not find scores exactly 0. Other scorers (Detoxify)
        score every distinct text of the batch.
        """
        texts = self._texts(batch)
        if self.sql_scorer:
            found = pc.match_substring_regex(texts, self.scorer.prefilter_pattern())
            hits = pc.unique(pc.filter(texts, found))
            self.con.register("_tox_in", pa.table({"_text": hits.cast(pa.string())}))
            self.scorer.create_scores(
                self.con, "SELECT _text FROM _tox_in WHERE _text IS NOT NULL", "_tox"
            )
        else:
            distinct = pc.unique(texts.drop_null()).cast(pa.string())
            scores = pa.array(self.scorer.score(distinct.to_pylist()), pa.float64())
            found = pa.table({"_text": distinct, "_toxicity": scores})
            self.con.register("_tox_in", found.filter(pc.greater(found["_toxicity"], 0.0)))
            self.con.execute("CREATE OR REPLACE TEMP TABLE _tox AS SELECT * FROM _tox_in")
        self.con.unregister("_tox_in")

    def stage(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The staged rows (:func:`stage_schema`) of one canonical batch, in its order."""
        self.con.register("_b", batch)
        try:
            self._score(batch)
            fate = self.con.sql(self.sql).to_arrow_table().combine_chunks()
        finally:
            self.con.unregister("_b")
        if fate.num_rows != batch.num_rows or (
            batch.num_rows and fate.column(SOURCE_ROW)[0] != batch.column(SOURCE_ROW)[0]
        ):
            raise AssertionError("staging lost the order of the batch's rows")

        def single(column: pa.ChunkedArray) -> pa.Array:
            return column.chunk(0) if column.num_chunks else pa.array([], column.type)

        status = single(fate.column("_status"))
        record_key = payload = pa.nulls(batch.num_rows, pa.string())
        not_kept = pc.not_equal(status, KEPT)
        if pc.any(not_kept).as_py():
            self.con.register("_q", batch.filter(not_kept))
            try:
                found = self.con.sql(self.quarantine_sql).to_arrow_table().combine_chunks()
            finally:
                self.con.unregister("_q")
            where = pa.array(np.flatnonzero(not_kept.to_numpy(zero_copy_only=False)))
            record_key = _scatter(batch.num_rows, where, single(found.column("_record_key")))
            payload = _scatter(batch.num_rows, where, single(found.column("_payload")))
        columns = [
            single(fate.column(c)) if kind is Kind.TIMESTAMP_TEXT else batch.column(c)
            for c, kind in self.spec.table.columns
        ]
        columns += [
            status,
            single(fate.column("_reason")),
            single(fate.column("_detail")),
            batch.column(SOURCE_FILE),
            batch.column(SOURCE_ROW),
            single(fate.column("_toxicity")),
            record_key,
            payload,
        ]
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)


def _scatter(n: int, where: pa.Array, values: pa.Array) -> pa.Array:
    """An array of ``n`` nulls with ``values`` at the (sorted) positions ``where``."""
    slots = np.full(n, -1, dtype=np.int64)
    slots[where.to_numpy()] = np.arange(len(where))
    return values.take(pa.array(slots, mask=slots < 0))


def _record_key_sql(spec: CleanSpec) -> str:
    """SQL for a quarantine row's ``record_key``: ``col=value/...`` over the table's key."""
    return " || '/' || ".join(
        f"'{k}=' || coalesce(CAST(\"{k}\" AS VARCHAR), 'NULL')" for k in spec.table.key
    )


def _payload_sql(spec: CleanSpec) -> str:
    """SQL for a quarantine row's payload: the canonical row as read (timestamps as their
    release text, user hashed), as JSON text."""
    fields = []
    for column, kind in spec.table.columns:
        if kind is Kind.STRING:
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


def duplicate_keys(landing: Landing, workers: int) -> pa.Table:
    """``_k0, _k1, ...``: the key values that occur more than once in the whole landing
    (null keys aside), found from the key columns alone, read ``workers`` units at a time."""
    table = landing.table
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        parts = list(pool.map(lambda u: list(landing.keys(u)), landing.units))
    batches = [b for part in parts for b in part]
    names = [f"_k{i}" for i in range(len(table.key))]
    if not batches:
        return pa.table({n: pa.array([], pa.int64()) for n in names})
    keys = pa.Table.from_batches(batches).rename_columns(names)
    con = duckdb.connect()
    try:
        con.execute(f"SET threads = {max(1, workers)}")
        con.register("_keys", keys)
        not_null = " AND ".join(f"{n} IS NOT NULL" for n in names)
        return con.sql(
            f"SELECT {', '.join(names)} FROM _keys WHERE {not_null} "
            "GROUP BY ALL HAVING count(*) > 1"
        ).to_arrow_table()
    finally:
        con.close()


def clean_release_table(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    spec: CleanSpec,
    cfg: CleanConfig,
    scorer: ToxicityScorer,
    landing: Landing,
    log: logging.Logger | None = None,
    workers: int | None = None,
) -> StepReport:
    """Clean one release table from its landing into the lake (table + quarantine).

    One pass reads every row group of the landing once, ``workers`` at a time (default: one
    per CPU): each batch is decoded and coerced (:meth:`Landing.batches`), its texts scored,
    its rows given their fate (:func:`fate_sql`) and routed into the worker's own clean
    part, quarantine part or the rows set aside because their key repeats (known beforehand
    from the key columns alone, :func:`duplicate_keys`). The set-aside rows are resolved
    afterwards (:func:`_resolve_held`) into the same files. Both tables are committed only
    when everything was written; the first failure stops every worker.
    """
    log = log or logging.getLogger(__name__)
    table = spec.table
    cpus = os.cpu_count() or 1
    writers = max(1, min(workers or min(WRITERS, cpus), len(landing.units) or 1))
    report = StepReport(step=spec.step, table=table.name, scorer=scorer.name, rows_in=landing.rows)
    log.info(
        f"{spec.step}: {landing.rows:,} rows in {len(landing.units)} row groups; "
        f"{writers} workers; toxicity by {scorer.name}"
    )
    dupkeys = duplicate_keys(landing, writers)
    now = datetime.now(UTC).replace(tzinfo=None)
    progress = Progress(spec.step, landing.rows, log)
    with (
        tempfile.TemporaryDirectory(prefix="imagegem-held-") as scratch,
        lake.writing(spec.out) as version,
        lake.writing(spec.quarantine) as quarantine_version,
        ExitStack() as files,
    ):
        schema = stage_schema(table)
        sinks: list[tuple[_Sink, _Sink, _Sink]] = []
        for i in range(writers):
            out_file = files.enter_context(lake.fs.open(version.part(i), "wb"))
            quarantine_file = files.enter_context(lake.fs.open(quarantine_version.part(i), "wb"))
            sinks.append(
                (
                    _Sink(out_file, table.clean_schema()),
                    _Sink(quarantine_file, QUARANTINE_SCHEMA),
                    _Sink(os.path.join(scratch, f"held-{i}.parquet"), schema),
                )
            )
        stagers: list[_Stager] = []
        try:
            routers = [_Router(spec, cfg, now, out, q, held) for out, q, held in sinks]
            stagers = [_Stager(spec, scorer, dupkeys) for _ in routers]
            _run_units(landing, stagers, routers, report, progress)
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
        finally:
            for stager in stagers:
                stager.close()
    progress.done()
    report.version = version.name
    if report.duplicates:
        report.reasons["exact duplicate"] = report.duplicates
    return report


def _run_units(
    landing: Landing,
    stagers: list[_Stager],
    routers: list[_Router],
    report: StepReport,
    progress: Progress,
) -> None:
    """Stage and route every unit of ``landing``: one thread per (stager, router) pair, each
    taking the next unit when it finishes one (decoding, DuckDB and Parquet encoding all run
    without the GIL, so the threads use as many cores as there are pairs)."""
    pending: queue.SimpleQueue[LandingUnit] = queue.SimpleQueue()
    for unit in landing.units:
        pending.put(unit)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work(stager: _Stager, router: _Router) -> None:
        counters: dict[str, int] = {}
        try:
            while not failures:
                try:
                    unit = pending.get_nowait()
                except queue.Empty:
                    return
                for batch in landing.batches(unit, counters):
                    if failures:
                        return
                    errors = batch.column(INGEST_ERROR)
                    counts = (
                        pc.value_counts(errors.drop_null()).to_pylist()
                        if errors.null_count < len(errors)
                        else []
                    )
                    router.route(stager.stage(batch))
                    with lock:
                        for item in counts:
                            message = item["values"]
                            report.ingest_errors[message] = (
                                report.ingest_errors.get(message, 0) + item["counts"]
                            )
                        report.raw_usernames_hashed += counters.pop("raw_usernames_hashed", 0)
                        progress.advance(batch.num_rows)
        except BaseException as exc:  # handed to the caller below
            with lock:
                failures.append(exc)

    threads = [
        threading.Thread(target=work, args=pair, daemon=True)
        for pair in zip(stagers, routers, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def count_rows(con: duckdb.DuckDBPyConnection, lake: Lake, table: str) -> int:
    """Rows of a committed lake table (from the Parquet footers)."""
    return con.execute(f"SELECT count(*) FROM {lake.scan(table)}").fetchone()[0]


def reconcile(con: duckdb.DuckDBPyConnection, lake: Lake, spec: CleanSpec) -> tuple[int, int, int]:
    """(rows_in, rows_out, quarantined), for the asset check: rows in from the landing's
    manifest (the release files' footers), the others counted from the written files."""
    rows_in = con.execute(f"SELECT coalesce(sum(rows), 0) FROM {lake.scan(spec.raw)}").fetchone()[0]
    return (
        int(rows_in),
        count_rows(con, lake, spec.out),
        count_rows(con, lake, spec.quarantine),
    )
