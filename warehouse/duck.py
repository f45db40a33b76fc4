"""DuckDB connections for the pipeline's writers, bounded in memory and able to reach the lake."""

from __future__ import annotations

import os
from dataclasses import dataclass

import duckdb

from warehouse.lake import (
    PARQUET_COMPRESSION,
    PARQUET_COMPRESSION_LEVEL,
    PARQUET_DICTIONARY_PAGE_BYTES,
    Lake,
)


@dataclass(frozen=True)
class DuckSettings:
    """Resource limits for a pipeline DuckDB connection (DuckDB's default is 80 % of RAM)."""

    memory_limit: str = "2GB"
    threads: int = 2
    temp_directory: str | None = None
    # How far a query streamed to Python (Arrow batches) may run ahead of its reader: DuckDB's
    # 10 MiB default lets one thread work at a time; more lets every thread keep producing.
    streaming_buffer: str = "256MB"


def connect(lake: Lake, settings: DuckSettings | None = None, database: str = ":memory:"):
    """An in-process DuckDB connection with bounded memory that can read/write ``lake``.

    DuckDB's httpfs extension cannot be installed offline, so a remote lake is reached
    through fsspec: the lake's filesystem is registered with the connection.
    """
    settings = settings or DuckSettings()
    con = duckdb.connect(database)
    con.execute(f"SET memory_limit = '{settings.memory_limit}'")
    con.execute(f"SET threads = {int(settings.threads)}")
    con.execute("SET preserve_insertion_order = false")
    con.execute(f"SET streaming_buffer_size = {quote(settings.streaming_buffer)}")
    if settings.temp_directory:
        os.makedirs(settings.temp_directory, exist_ok=True)
        con.execute(f"SET temp_directory = {quote(settings.temp_directory)}")
    if lake.remote:
        con.register_filesystem(lake.fs)
    return con


def quote(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def copy_to_parquet(con, query: str, path: str) -> None:
    """Write the result of ``query`` to one Parquet file with the lake's write options
    (:func:`warehouse.lake.parquet_writer`: zstd level 1, dictionaries capped at 64 KiB;
    the cap made the interactions file 40 % smaller at the same write time)."""
    con.execute(
        f"COPY ({query}) TO {quote(path)} (FORMAT parquet, "
        f"COMPRESSION {PARQUET_COMPRESSION}, COMPRESSION_LEVEL {PARQUET_COMPRESSION_LEVEL}, "
        f"DICTIONARY_SIZE_LIMIT {PARQUET_DICTIONARY_PAGE_BYTES})"
    )
