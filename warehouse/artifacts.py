"""Trained artefacts: where their files live, and the ``artifacts`` table that finds them.

Every trained or registered model (the CLIP encoder, nearest-neighbour indexes, and the later
stages' reward model, recommenders, PCA space, DPO LoRA) is written as files (safetensors +
a JSON config, or an index file) under ``<lake root>/artifact_files/<name>/<tag>/`` and recorded as
one row of the lake table ``artifacts/<name>``. The catalog's ``artifacts`` view unions those
tables, so SQL finds the latest of each::

    SELECT * FROM artifacts WHERE name = 'clip_encoder' ORDER BY created_at DESC LIMIT 1

One table per artefact name means two assets never rewrite each other's rows. A table keeps
the history of its artefact (every registration appends a row); the files of a tag are
written before its row, so a row never points at files that are not there yet.

Columns: ``name`` (the asset), ``kind`` (open_clip encoder, usearch index, ...), ``tag``
(what outputs record, e.g. an encoder tag), ``path`` (folder of the files), ``files``
(name → SHA-256, JSON), ``base_model`` (what it was built from or on), ``encoder`` (the
encoder tag of the vectors it works on, if any), ``config`` and ``metrics`` (JSON),
``tiny_model`` (True when it is a tiny development model, not a production one),
``created_at`` (UTC) and ``code_version`` (the git commit of the code that made it).
"""

from __future__ import annotations

import json
import posixpath
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from warehouse.lake import Lake

ARTIFACTS_FOLDER = "artifacts"  # the tables artifacts/<name>
FILES_FOLDER = "artifact_files"  # the files artifact_files/<name>/<tag>/

ARTIFACTS_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("kind", pa.string()),
        ("tag", pa.string()),
        ("path", pa.string()),
        ("files", pa.string()),
        ("base_model", pa.string()),
        ("encoder", pa.string()),
        ("config", pa.string()),
        ("metrics", pa.string()),
        ("tiny_model", pa.bool_()),
        ("created_at", pa.timestamp("us")),
        ("code_version", pa.string()),
    ]
)


@dataclass(frozen=True)
class Artifact:
    """One registered artefact (a row of ``artifacts/<name>``)."""

    name: str
    kind: str
    tag: str
    path: str
    files: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None
    encoder: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    tiny_model: bool = False
    created_at: datetime | None = None
    code_version: str | None = None

    def file(self, name: str) -> str:
        """Full path (or URL) of one of the artefact's files."""
        if name not in self.files:
            raise KeyError(f"artifact {self.name}@{self.tag} has no file {name!r}")
        return posixpath.join(self.path, name)


def table_of(name: str) -> str:
    return posixpath.join(ARTIFACTS_FOLDER, name)


def files_dir(lake: Lake, name: str, tag: str) -> str:
    """The folder an artefact's files go to (local path or URL)."""
    safe = tag.replace("/", "_").replace("@", "_at_")
    return posixpath.join(lake.root, FILES_FOLDER, name, safe)


def code_version() -> str:
    """The git commit of the running code (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def record_artifact(lake: Lake, artifact: Artifact) -> Artifact:
    """Append ``artifact`` to its table (a new committed version); returns it as stored."""
    stored = Artifact(
        **{
            **artifact.__dict__,
            "created_at": artifact.created_at or datetime.now(UTC).replace(tzinfo=None),
            "code_version": artifact.code_version or code_version(),
        }
    )
    row = pa.Table.from_pylist([_row(stored)], schema=ARTIFACTS_SCHEMA)
    table = table_of(artifact.name)
    if lake.current(table) is not None:
        row = pa.concat_tables([lake.read_table(table).cast(ARTIFACTS_SCHEMA), row])
    lake.write_table(table, row)
    return stored


def latest_artifact(lake: Lake, name: str, tag: str | None = None) -> Artifact | None:
    """The newest registration of ``name`` (of that ``tag`` if given), or None."""
    table = table_of(name)
    if lake.current(table) is None:
        return None
    rows = lake.read_table(table).to_pylist()
    if tag is not None:
        rows = [r for r in rows if r["tag"] == tag]
    if not rows:
        return None
    return _artifact(max(rows, key=lambda r: r["created_at"]))


def artifact_tables(lake: Lake) -> list[str]:
    """Every committed ``artifacts/<name>`` table (for the catalog view)."""
    return lake.tables_under(ARTIFACTS_FOLDER)


def _row(a: Artifact) -> dict[str, Any]:
    return {
        "name": a.name,
        "kind": a.kind,
        "tag": a.tag,
        "path": a.path,
        "files": json.dumps(a.files, sort_keys=True),
        "base_model": a.base_model,
        "encoder": a.encoder,
        "config": json.dumps(a.config, sort_keys=True, default=str),
        "metrics": json.dumps(a.metrics, sort_keys=True, default=str),
        "tiny_model": a.tiny_model,
        "created_at": a.created_at,
        "code_version": a.code_version,
    }


def _artifact(row: dict[str, Any]) -> Artifact:
    return Artifact(
        name=row["name"],
        kind=row["kind"],
        tag=row["tag"],
        path=row["path"],
        files=json.loads(row["files"] or "{}"),
        base_model=row["base_model"],
        encoder=row["encoder"],
        config=json.loads(row["config"] or "{}"),
        metrics=json.loads(row["metrics"] or "{}"),
        tiny_model=bool(row["tiny_model"]),
        created_at=row["created_at"],
        code_version=row["code_version"],
    )
