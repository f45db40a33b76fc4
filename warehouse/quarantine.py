"""Quarantine: the one shape of a rejected input row, and the one union of every step's part.

Every step that rejects input (the clean steps, the crawl build, the media downloads, and the
ML stages to come) writes its rejected rows in :data:`QUARANTINE_SCHEMA` to its own lake table
``quarantine/<step>``; nothing is converted afterwards. The catalog's ``quarantine`` view and
the ``quarantine`` asset both read :func:`union_sql`, the only place the parts are unioned.

Columns: ``source`` (sample / release / civitai / media / ...), ``step`` (the writer),
``table_name`` (the table the row belonged to), ``record_key`` (``col=value/...``),
``reason`` (a short, groupable text), ``detail`` (the specifics), ``source_file`` and
``source_row`` (lineage, when known), ``payload`` (the raw row as JSON text, users already
hashed, text fields cut to :data:`PAYLOAD_MAX_CHARS`), ``quarantined_at`` (UTC).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from warehouse.duck import quote

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("step", pa.string()),
        ("table_name", pa.string()),
        ("record_key", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("payload", pa.string()),
        ("quarantined_at", pa.timestamp("us")),
    ]
)
PAYLOAD_MAX_CHARS = 65_536  # per quarantined payload (or per text field of a clean-step row)

# The lake table of each step's quarantine rows. Add a step here and the catalog view, the
# `quarantine` asset and its checks pick it up.
QUARANTINE_PARTS: tuple[str, ...] = (
    "quarantine/images",
    "quarantine/models",
    "quarantine/civitai",
    "quarantine/image_files",
    "quarantine/lora_files",
    "quarantine/prompt_embeddings",
)
# Folders whose every table is a quarantine part: sharded steps write one table per shard
# (``quarantine/image_embeddings/shard-03``), so shards never rewrite each other's rows.
QUARANTINE_FOLDERS: tuple[str, ...] = ("quarantine/image_embeddings",)


@dataclass(frozen=True)
class QuarantineRecord:
    """One rejected input row, as every step writes it (see the module docstring)."""

    source: str
    step: str
    table_name: str
    record_key: str
    reason: str
    detail: str | None = None
    source_file: str | None = None
    source_row: int | None = None
    payload: str | None = None


def payload_text(value: Any, limit: int = PAYLOAD_MAX_CHARS) -> str | None:
    """JSON text of ``value`` (or the string itself), cut to ``limit`` characters."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + f"…[{len(text) - limit} chars cut]"


def quarantine_table(records: Iterable[QuarantineRecord]) -> pa.Table:
    """Records as a :data:`QUARANTINE_SCHEMA` table, stamped with the current UTC time."""
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [
        {
            "source": r.source,
            "step": r.step,
            "table_name": r.table_name,
            "record_key": r.record_key,
            "reason": r.reason,
            "detail": r.detail,
            "source_file": r.source_file,
            "source_row": r.source_row,
            "payload": r.payload,
            "quarantined_at": now,
        }
        for r in records
    ]
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def present_parts(lake: Any) -> list[str]:
    """The quarantine parts that have a committed version in ``lake`` (sharded ones too)."""
    parts = [p for p in QUARANTINE_PARTS if lake.current(p) is not None]
    for folder in QUARANTINE_FOLDERS:
        parts += lake.tables_under(folder)
    return parts


def union_sql(lake: Any) -> str | None:
    """One SELECT over every committed quarantine part (None when there is none yet)."""
    parts = present_parts(lake)
    if not parts:
        return None
    return " UNION ALL BY NAME ".join(
        f"SELECT * FROM read_parquet({quote(lake.glob(p))})" for p in parts
    )
