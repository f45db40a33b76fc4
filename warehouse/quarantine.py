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


def from_image_downloads(failures: pa.Table) -> pa.Table:
    """The ``image_files`` failures (imageId, url, reason) as quarantine rows."""
    return quarantine_table(
        "media",
        "image_files",
        "images",
        (
            {"record_key": f"imageId={r['imageId']}", "reason": r["reason"], "detail": r["url"]}
            for r in failures.to_pylist()
        ),
    )


def from_lora_downloads(failures: pa.Table) -> pa.Table:
    """The ``lora_files`` refusals and failures as quarantine rows."""
    return quarantine_table(
        "media",
        "lora_files",
        "models",
        (
            {
                "record_key": f"modelVersionId={r['modelVersionId']}/fileId={r['fileId']}",
                "reason": r["reason"],
                "detail": r["url"],
                "payload": {"file_name": r["file_name"]},
            }
            for r in failures.to_pylist()
        ),
    )


def from_crawl(records: Iterable[Mapping[str, Any]]) -> pa.Table:
    """The crawl build's quarantine records (unmappable pages and items) as quarantine rows."""
    return quarantine_table(
        "civitai",
        "crawl",
        "",
        (
            {
                "table_name": r.get("table"),
                "record_key": r.get("key"),
                "reason": r.get("reason"),
                "source_file": r.get("source"),
                "payload": r.get("payload"),
            }
            for r in records
        ),
    )
