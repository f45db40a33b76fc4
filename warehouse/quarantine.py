"""Quarantine rows in the one shape every step writes (see clean.QUARANTINE_SCHEMA)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from warehouse.clean import QUARANTINE_SCHEMA


def quarantine_table(
    source: str, step: str, table_name: str, records: Iterable[Mapping[str, Any]]
) -> pa.Table:
    """Rows with ``record_key``, ``reason`` and optional ``detail``, ``source_file``,
    ``payload`` (text, or any JSON-able value) as a QUARANTINE_SCHEMA table."""
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = []
    for r in records:
        payload = r.get("payload")
        rows.append(
            {
                "source": source,
                "step": step,
                "table_name": r.get("table_name") or table_name,
                "record_key": str(r.get("record_key") or ""),
                "reason": r["reason"],
                "detail": r.get("detail"),
                "source_file": r.get("source_file"),
                "source_row": None,
                "payload": payload
                if isinstance(payload, str) or payload is None
                else json.dumps(payload),
                "quarantined_at": now,
            }
        )
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)
