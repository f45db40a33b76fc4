"""The DuckDB catalog: a small database file of views over the lake's committed Parquet.

Parquet is the source of truth; the catalog holds only views (and the prompt macros), so it
is rebuilt in well under a second by one writer. It is built in a temporary file next to the
target and swapped in with ``os.replace``: a reader holding the old file keeps reading it, a
new reader gets the new one, and nobody is locked out. Views use absolute paths, so the file
answers from any working directory.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import duckdb

from warehouse.artifacts import artifact_tables
from warehouse.embeddings import vector_dim, vector_view_sources, vector_view_sql
from warehouse.lake import Lake
from warehouse.quarantine import union_sql
from warehouse.sqlfiles import install_macros

# Lake tables exposed as views of the same name.
CATALOG_TABLES = (
    "images",
    "models",
    "users",
    "loras",
    "image_loras",
    "prompts",
    "interactions",
    "table1_stats",
    "image_files",
    "lora_files",
    "prompt_clusters",
    "embedding_map",
    "image_scores",
    "preference_pairs",
)


@dataclass
class CatalogReport:
    path: str
    views: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def build_catalog(lake: Lake, path: str) -> CatalogReport:
    """Write the catalog at ``path`` with a view per committed table; atomic replace.

    For a lake on S3 the views read ``s3://`` paths: a client opening the catalog registers
    an fsspec filesystem first (``connect_readonly(path, lake)`` does), since DuckDB's httpfs
    extension is not available offline.
    """
    report = CatalogReport(path=os.path.abspath(path))
    directory = os.path.dirname(report.path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".warehouse-", suffix=".duckdb")
    os.close(fd)
    os.unlink(tmp)  # DuckDB creates the file itself
    try:
        con = duckdb.connect(tmp)
        if lake.remote:
            con.register_filesystem(lake.fs)
        try:
            install_macros(con)
            for table in CATALOG_TABLES:
                if lake.current(table) is None:
                    report.missing.append(table)
                    continue
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM {lake.scan(table)}")
                report.views.append(table)
            for view, source in vector_view_sources(lake).items():
                dim = vector_dim(con, source)
                if dim is None:  # no rows yet: the list type as stored
                    con.execute(f"CREATE VIEW {view} AS SELECT * FROM {source}")
                else:
                    con.execute(f"CREATE VIEW {view} AS {vector_view_sql(source, dim)}")
                report.views.append(view)
            artifacts = artifact_tables(lake)
            if artifacts:
                con.execute(f"CREATE VIEW artifacts AS SELECT * FROM {lake.scan_many(artifacts)}")
                report.views.append("artifacts")
            union = union_sql(lake)
            if union:
                con.execute(f"CREATE VIEW quarantine AS {union}")
                report.views.append("quarantine")
            else:
                report.missing.append("quarantine")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, report.path)
    except BaseException:
        for leftover in (tmp, tmp + ".wal"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise
    return report


def connect_readonly(path: str, lake: Lake | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the catalog (many readers may hold one at once).

    Pass the ``lake`` when it is remote, so the views' ``s3://`` paths can be read.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no warehouse catalog at {path}: run `make demo` (or materialize the "
            "warehouse_catalog asset) first"
        )
    con = duckdb.connect(path, read_only=True)
    if lake is not None and lake.remote:
        con.register_filesystem(lake.fs)
    return con
