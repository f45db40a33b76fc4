"""The warehouse's data checks as plain functions: each returns ``passed`` and its numbers.

The Dagster assets wrap these results in ``AssetCheckResult``s; tests call them directly.
Every function reads the committed lake tables (``Lake.scan``), never a copy of them.

* :func:`schema_check` — a clean table's Parquet schema is the release shape, in order;
* :func:`reconciliation_check` — rows in = rows out + quarantined + exact duplicates;
* :func:`unique_key_check` — the table's key holds;
* :func:`safety_check` — no kept row breaks the clean stage's own safety rules (the rules of
  its :class:`~warehouse.clean.CleanSpec`, evaluated again on the written table) and no kept
  text scored above the toxicity threshold;
* :func:`quarantine_summary` — quarantined rows by step and reason; every row has a reason,
  a source and a key;
* :func:`raw_usernames_check` — every user identifier in the warehouse, and every
  ``userHash``/``username`` value inside a quarantine payload, is a 64-hex hash;
* :func:`preference_pairs_check` — no pair with one image twice or equal scores, every pair
  inside one (non-noise) prompt cluster, at most ``top_k`` pairs per cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb
import pyarrow.parquet as pq

from warehouse.clean import CleanConfig, CleanSpec, StepReport, reconcile
from warehouse.lake import Lake
from warehouse.quarantine import union_sql
from warehouse.schema import USER_HASH_COLUMNS, USER_HASH_PATTERN, ReleaseTable
from warehouse.tables import duplicate_keys

# Columns the clean stage computes while staging rows and does not write: a safety rule that
# reads one of them cannot be evaluated again on the clean table.
STAGED_COLUMNS = ("_toxicity", "_scorer")


@dataclass(frozen=True)
class SchemaCheck:
    """A clean table's columns against the release shape."""

    passed: bool
    columns: int
    expected_columns: int
    mismatches: list[str] = field(default_factory=list)


def schema_check(lake: Lake, table: ReleaseTable, name: str | None = None) -> SchemaCheck:
    """The committed lake table ``name`` (default: the table's name) has the clean schema of
    ``table``: the same columns, in order, with the same types (read from a file footer)."""
    version = lake.require(name or table.name)
    with lake.fs.open(version.part(0), "rb") as f:
        found = pq.read_schema(f)
    expected = table.clean_schema()
    mismatches = [
        f"{e.name}: expected {e.type}, found "
        f"{found.field(e.name).type if e.name in found.names else 'missing'}"
        for e in expected
        if e.name not in found.names or not found.field(e.name).type.equals(e.type)
    ]
    mismatches += [f"{n}: not a release column" for n in found.names if n not in expected.names]
    return SchemaCheck(
        passed=not mismatches and found.names == expected.names,
        columns=len(found.names),
        expected_columns=len(expected.names),
        mismatches=mismatches,
    )


@dataclass(frozen=True)
class ReconciliationCheck:
    """Every raw row ended in exactly one place (counted from the written files)."""

    passed: bool
    rows_in: int
    rows_out: int
    quarantined: int
    exact_duplicates_dropped: int


def reconciliation_check(
    con: duckdb.DuckDBPyConnection, lake: Lake, spec: CleanSpec, report: StepReport
) -> ReconciliationCheck:
    """rows in = rows out + quarantined + exact duplicates, from the files and the report."""
    rows_in, rows_out, quarantined = reconcile(con, lake, spec)
    return ReconciliationCheck(
        passed=rows_in == rows_out + quarantined + report.duplicates and report.reconciles,
        rows_in=rows_in,
        rows_out=rows_out,
        quarantined=quarantined,
        exact_duplicates_dropped=report.duplicates,
    )


@dataclass(frozen=True)
class UniqueKeyCheck:
    """The key of a committed table holds."""

    passed: bool
    key: tuple[str, ...]
    duplicated_keys: int


def unique_key_check(
    con: duckdb.DuckDBPyConnection, lake: Lake, table: str, key: tuple[str, ...]
) -> UniqueKeyCheck:
    """No value of ``key`` occurs twice in the committed ``table``."""
    dupes = duplicate_keys(con, lake, table, key)
    return UniqueKeyCheck(passed=dupes == 0, key=tuple(key), duplicated_keys=dupes)


@dataclass(frozen=True)
class SafetyCheck:
    """Kept rows against the clean stage's safety rules.

    ``violations``: kept rows per safety rule (by its reason) that the rule would have
    quarantined; ``max_toxicity_kept``: the highest toxicity among kept texts (as scored by
    the clean step).
    """

    passed: bool
    violations: dict[str, int]
    max_toxicity_kept: float
    toxicity_threshold: float
    scorer: str


def row_safety_rules(spec: CleanSpec) -> list:
    """The spec's safety rules that read only columns of the clean table."""
    return [r for r in spec.safety_rules if not any(c in r.when for c in STAGED_COLUMNS)]


def safety_check(
    con: duckdb.DuckDBPyConnection,
    lake: Lake,
    spec: CleanSpec,
    cfg: CleanConfig,
    report: StepReport,
) -> SafetyCheck:
    """No kept row of ``spec.out`` breaks a safety rule of ``spec`` (the same SQL the clean
    step applied, evaluated on the written table), and the highest toxicity among the kept
    texts is within ``cfg.toxicity_threshold``."""
    rules = row_safety_rules(spec)
    violations: dict[str, int] = {}
    if rules:
        counts = ", ".join(f"count(*) FILTER (WHERE ({r.when}))" for r in rules)
        row = con.execute(f"SELECT {counts} FROM {lake.scan(spec.out)}").fetchone()
        violations = {r.reason: int(n) for r, n in zip(rules, row, strict=True)}
    max_toxicity = float(report.max_kept_toxicity)
    return SafetyCheck(
        passed=not any(violations.values()) and max_toxicity <= cfg.toxicity_threshold,
        violations=violations,
        max_toxicity_kept=max_toxicity,
        toxicity_threshold=cfg.toxicity_threshold,
        scorer=report.scorer,
    )


@dataclass(frozen=True)
class QuarantineSummary:
    """Quarantined rows by step and reason; ``passed`` when every row has a reason, a source
    and a key."""

    passed: bool
    total: int
    by_reason: list[tuple[str, str, int]]
    rows_without_reason: int


def quarantine_summary(con: duckdb.DuckDBPyConnection, lake: Lake) -> QuarantineSummary:
    """Counts over the union of every committed quarantine part (none yet: zero rows)."""
    union = union_sql(lake)
    if union is None:
        return QuarantineSummary(passed=True, total=0, by_reason=[], rows_without_reason=0)
    by_reason = [
        (step, reason, int(n))
        for step, reason, n in con.execute(
            f"SELECT step, reason, count(*) AS n FROM ({union}) GROUP BY ALL "
            "ORDER BY n DESC, step, reason"
        ).fetchall()
    ]
    missing = con.execute(
        f"SELECT count(*) FROM ({union}) "
        "WHERE reason IS NULL OR source IS NULL OR record_key IS NULL"
    ).fetchone()[0]
    return QuarantineSummary(
        passed=missing == 0,
        total=sum(n for _, _, n in by_reason),
        by_reason=by_reason,
        rows_without_reason=int(missing),
    )


@dataclass(frozen=True)
class UsernameCheck:
    """Raw usernames found: distinct offending values per table (``quarantine.payload`` for
    values inside quarantine payloads)."""

    passed: bool
    tables_checked: int
    offending_values: dict[str, int]


# A "userHash" or "username" JSON member's string value, at any depth; a regex, so bodies that
# are not valid JSON (a bad page landed as text) are read too.
_PAYLOAD_USER = '"(?:userHash|username)"\\s*:\\s*"([^"]*)"'
# The same member whose value cannot be a hash: under 64 characters, over 64, or holding a
# character that is not lowercase hex. A match/no-match scan of every payload, 2x cheaper than
# extracting every value; values are extracted only from the payloads it flags.
_PAYLOAD_SUSPECT = '"(?:userHash|username)"\\s*:\\s*"(?:[^"]{0,63}"|[^"]{65}|[^"]*[^0-9a-f"])'


def raw_usernames_check(con: duckdb.DuckDBPyConnection, lake: Lake) -> UsernameCheck:
    """Every user identifier in the committed warehouse tables and quarantine payloads is a
    salted hash (64 lowercase hex), never a raw username. Tables not materialized yet are
    skipped; distinct values are tested, so millions of rows cost one regex per user."""
    pattern = USER_HASH_PATTERN[1:-1]
    offenders: dict[str, int] = {}
    for table, column in USER_HASH_COLUMNS.items():
        if lake.current(table) is None:
            continue
        # grouped first, then filtered in the aggregate: written as a WHERE over a DISTINCT,
        # DuckDB pushes the regex below the grouping and runs it on every row (2-3x slower)
        offenders[table] = con.execute(
            f"SELECT count(*) FILTER (WHERE NOT regexp_full_match(u, '{pattern}')) "
            f'FROM (SELECT "{column}" AS u FROM {lake.scan(table)} GROUP BY 1)'
        ).fetchone()[0]
    union = union_sql(lake)
    if union is not None:
        offenders["quarantine.payload"] = con.execute(
            "SELECT count(*) FROM (SELECT DISTINCT unnest(regexp_extract_all(payload, "
            f"'{_PAYLOAD_USER}', 1)) AS u FROM ({union}) "
            f"WHERE regexp_matches(payload, '{_PAYLOAD_SUSPECT}')) "
            f"WHERE NOT regexp_full_match(u, '{pattern}')"
        ).fetchone()[0]
    bad = {t: int(n) for t, n in offenders.items() if n}
    return UsernameCheck(passed=not bad, tables_checked=len(offenders), offending_values=bad)


@dataclass(frozen=True)
class PairsCheck:
    """``preference_pairs`` against its rules, counted on the written table."""

    pairs: int
    same_image: int
    equal_scores: int
    outside_one_cluster: int  # winner and loser prompts in different clusters, or noise
    most_per_cluster: int
    top_k: int

    @property
    def passed(self) -> bool:
        return (
            self.same_image == 0
            and self.equal_scores == 0
            and self.outside_one_cluster == 0
            and self.most_per_cluster <= self.top_k
        )


def preference_pairs_check(
    con: duckdb.DuckDBPyConnection, lake: Lake, encoder: str, top_k: int
) -> PairsCheck:
    """Recount ``preference_pairs``' rules from the committed table: the clusters of both
    images come from ``prompt_clusters`` (by the pair's two prompt ids), not from the pairs'
    own ``cluster_id``, so a pair across clusters cannot hide."""
    pairs = lake.scan("preference_pairs")
    clusters = (
        f"(SELECT prompt_id, cluster_id FROM {lake.scan('prompt_clusters')} WHERE encoder = ?)"
    )
    row = con.execute(
        f"""SELECT count(*),
               count(*) FILTER (WHERE winner_imageId = loser_imageId),
               count(*) FILTER (WHERE winner_score = loser_score),
               count(*) FILTER (WHERE cw.cluster_id IS DISTINCT FROM p.cluster_id
                                   OR cl.cluster_id IS DISTINCT FROM p.cluster_id
                                   OR p.cluster_id < 0)
        FROM {pairs} p LEFT JOIN {clusters} cw ON cw.prompt_id = p.prompt_id
        LEFT JOIN {clusters} cl ON cl.prompt_id = p.loser_prompt_id""",
        [encoder, encoder],
    ).fetchone()
    most = con.execute(
        f"SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM {pairs} GROUP BY cluster_id)"
    ).fetchone()[0]
    return PairsCheck(
        pairs=int(row[0]),
        same_image=int(row[1]),
        equal_scores=int(row[2]),
        outside_one_cluster=int(row[3]),
        most_per_cluster=int(most),
        top_k=int(top_k),
    )
