"""Reading the published ImageGem release (parquet) into the raw landing, in streaming batches.

File-level problems (no files, an empty or truncated file, a missing/renamed or mistyped
column) raise :class:`ReleaseFormatError` naming the file and the column: the run stops.
Row-level problems met while decoding (invalid UTF-8, a fractional value in an integer column)
do not stop the run: the row is landed with an ``_ingest_error`` and the clean stage
quarantines it with that reason. Nothing is dropped here.
"""

from __future__ import annotations

import logging
import math
import posixpath
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from warehouse.lake import Lake, TableVersion, is_remote
from warehouse.progress import Progress
from warehouse.schema import (
    INGEST_ERROR,
    Kind,
    ReleaseTable,
    raw_landing_schema,
)
from warehouse.users import normalize_user_hashes

BATCH_ROWS = 131_072


class ReleaseFormatError(ValueError):
    """A release file that cannot be ingested as a whole (names the file and the column)."""


@dataclass
class LandingReport:
    """What one ingest landed."""

    table: str
    files: list[str] = field(default_factory=list)
    rows: int = 0
    bytes_read: int = 0
    row_errors: dict[str, int] = field(default_factory=dict)
    raw_usernames_hashed: int = 0
    version: str = ""


def open_release_fs(root: str, storage_options: dict | None = None):
    """The fsspec filesystem and root path of a release folder or ``s3://`` prefix."""
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    return fs, path


def discover(root: str, table: ReleaseTable, storage_options: dict | None = None) -> list[str]:
    """The parquet files of ``table`` under a release root, sorted.

    Accepted layouts: ``<root>/<table>/**.parquet`` (shards), ``<root>/<table>*.parquet``,
    and the Hugging Face dataset folders ``<root>/ImageGem-<table>/**.parquet``.
    """
    fs, base = open_release_fs(root, storage_options)
    if not fs.exists(base):
        raise ReleaseFormatError(f"release path {root} does not exist")
    patterns = [
        posixpath.join(base, table.name, "**", "*.parquet"),
        posixpath.join(base, f"{table.name}*.parquet"),
        posixpath.join(base, f"ImageGem-{table.name}", "**", "*.parquet"),
    ]
    files: set[str] = set()
    for pattern in patterns:
        files.update(fs.glob(pattern))
    if not files:
        raise ReleaseFormatError(
            f"no parquet files for table {table.name!r} under {root} "
            f"(looked for {table.name}/*.parquet, {table.name}*.parquet, ImageGem-{table.name}/)"
        )
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    prefix = f"{protocol}://" if is_remote(root) else ""
    return sorted(prefix + f for f in files)


# -- schema validation ------------------------------------------------------------------------


def _accepts(kind: Kind, dtype: pa.DataType) -> bool:
    if pa.types.is_null(dtype):
        return True
    if pa.types.is_dictionary(dtype):
        return _accepts(kind, dtype.value_type)
    if kind is Kind.INT:
        return (
            pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)
        )
    if kind is Kind.FLOAT:
        return (
            pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype)
        )
    if kind is Kind.STRING:
        return (
            pa.types.is_string(dtype)
            or pa.types.is_large_string(dtype)
            or pa.types.is_binary(dtype)
            or pa.types.is_large_binary(dtype)
        )
    if kind is Kind.TIMESTAMP_TEXT:
        return (
            pa.types.is_string(dtype)
            or pa.types.is_large_string(dtype)
            or pa.types.is_timestamp(dtype)
            or pa.types.is_date(dtype)
        )
    raise AssertionError(kind)


def validate_schema(path: str, schema: pa.Schema, table: ReleaseTable) -> None:
    """Raise ReleaseFormatError naming the file and column when ``schema`` is not ``table``'s."""
    names = set(schema.names)
    missing = [c for c in table.column_names if c not in names]
    if missing:
        extra = sorted(names - set(table.column_names))
        hint = f"; unexpected columns present: {', '.join(extra)}" if extra else ""
        raise ReleaseFormatError(
            f"{path}: missing column(s) {', '.join(missing)} of the ImageGem {table.name} "
            f"table{hint}"
        )
    for column, kind in table.columns:
        dtype = schema.field(column).type
        if not _accepts(kind, dtype):
            raise ReleaseFormatError(
                f"{path}: column {column!r} has type {dtype}, expected {kind.value} "
                f"(ImageGem {table.name} table)"
            )


def open_parquet(path: str, fs) -> pq.ParquetFile:
    """Open a parquet file, turning empty/truncated/garbage files into ReleaseFormatError."""
    try:
        size = fs.size(path)
    except FileNotFoundError as exc:
        raise ReleaseFormatError(f"{path}: file not found") from exc
    if size == 0:
        raise ReleaseFormatError(f"{path}: file is empty (0 bytes)")
    try:
        return pq.ParquetFile(fs.open(path, "rb"))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReleaseFormatError(f"{path}: not a readable parquet file ({exc})") from exc


# -- coercion to the canonical types ----------------------------------------------------------

RowErrors = list[str | None]


def _note(errors: RowErrors, mask: np.ndarray, message: str) -> None:
    for i in np.flatnonzero(mask):
        if errors[i] is None:
            errors[i] = message


def _coerce_int(arr: pa.Array, column: str, errors: RowErrors) -> pa.Array:
    if pa.types.is_integer(arr.type) or pa.types.is_null(arr.type):
        return arr.cast(pa.int64())
    if pa.types.is_boolean(arr.type):
        return arr.cast(pa.int64())
    values = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
    finite = np.isfinite(values)
    whole = finite & (np.floor(values) == values) & (np.abs(values) < 2.0**63)
    bad = (~np.isnan(values)) & ~whole
    if bad.any():
        _note(errors, bad, f"non-integer value in integer column {column}")
    out = np.where(whole, values, 0).astype(np.int64)
    return pa.array(out, type=pa.int64(), mask=~whole)


def _coerce_float(arr: pa.Array) -> pa.Array:
    return arr.cast(pa.float64())


def _coerce_string(arr: pa.Array, column: str, errors: RowErrors) -> pa.Array:
    if pa.types.is_null(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.binary()).view(pa.string())
    try:
        arr.validate(full=True)
        return arr
    except pa.ArrowInvalid:
        pass
    # Rare path: find the rows with invalid UTF-8, keep them (escaped) and flag them.
    raw = arr.view(pa.binary()).to_pylist()
    fixed: list[str | None] = []
    for i, value in enumerate(raw):
        if value is None:
            fixed.append(None)
            continue
        try:
            fixed.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            fixed.append(value.decode("utf-8", errors="backslashreplace"))
            if errors[i] is None:
                errors[i] = f"invalid UTF-8 in column {column}"
    return pa.array(fixed, type=pa.string())


def _coerce_timestamp_text(arr: pa.Array, column: str, errors: RowErrors) -> pa.Array:
    if pa.types.is_timestamp(arr.type):
        # UTC wall time, whole seconds (the release's text has no fraction)
        seconds = arr.cast(pa.timestamp(arr.type.unit)).cast(pa.timestamp("s"), safe=False)
        return pc.strftime(seconds, format="%Y-%m-%d %H:%M:%S")
    if pa.types.is_date(arr.type):
        return pc.strftime(arr.cast(pa.timestamp("s")), format="%Y-%m-%d %H:%M:%S")
    return _coerce_string(arr, column, errors)


def coerce_batch(
    batch: pa.RecordBatch,
    table: ReleaseTable,
    source_file: str,
    first_row: int,
    user_salt: str,
    counters: dict[str, int] | None = None,
) -> pa.RecordBatch:
    """One release batch in canonical types with lineage columns (see raw_landing_schema).

    ``userHash`` is normalised here (raw usernames salted-hashed), so no raw username ever
    reaches the lake; ``counters["raw_usernames_hashed"]`` counts them.
    """
    n = batch.num_rows
    errors: RowErrors = [None] * n
    columns: list[pa.Array] = []
    for column, kind in table.columns:
        arr = batch.column(column)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if kind is Kind.INT:
            columns.append(_coerce_int(arr, column, errors))
        elif kind is Kind.FLOAT:
            columns.append(_coerce_float(arr))
        elif kind is Kind.STRING:
            columns.append(_coerce_string(arr, column, errors))
        else:
            columns.append(_coerce_timestamp_text(arr, column, errors))
        if column == "userHash":
            columns[-1], n_raw = normalize_user_hashes(columns[-1], user_salt)
            if counters is not None and n_raw:
                counters["raw_usernames_hashed"] = counters.get("raw_usernames_hashed", 0) + n_raw
    columns.append(pa.array([source_file] * n, type=pa.string()))
    columns.append(pa.array(np.arange(first_row, first_row + n, dtype=np.int64)))
    columns.append(pa.array(errors, type=pa.string()))
    return pa.RecordBatch.from_arrays(columns, schema=raw_landing_schema(table))


def iter_landing_batches(
    path: str,
    table: ReleaseTable,
    fs,
    user_salt: str,
    batch_rows: int = BATCH_ROWS,
    counters: dict[str, int] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream one release file as canonical batches (schema validated before the first batch)."""
    parquet = open_parquet(path, fs)
    validate_schema(path, parquet.schema_arrow, table)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=table.column_names):
            yield coerce_batch(batch, table, path, row, user_salt, counters)
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReleaseFormatError(f"{path}: unreadable at row {row} ({exc})") from exc


def land_release_table(
    lake: Lake,
    landing_table: str,
    files: list[str],
    table: ReleaseTable,
    user_salt: str,
    storage_options: dict | None = None,
    log: logging.Logger | None = None,
    workers: int = 2,
) -> LandingReport:
    """Land every release file of ``table`` into one committed version of ``landing_table``.

    Every file is validated before any row is written, so a bad shard fails the run before
    work is spent; files are then landed ``workers`` at a time (Parquet encoding runs in C++
    without the GIL), one landing part per release file, and the version is committed only
    when all files landed.
    """
    report = LandingReport(table=table.name, files=list(files))
    if not files:
        raise ReleaseFormatError(f"no files given for release table {table.name}")
    fs, _ = open_release_fs(files[0], storage_options)
    total_rows = 0
    for path in files:  # validate all shards first (cheap: footers only)
        parquet = open_parquet(path, fs)
        validate_schema(path, parquet.schema_arrow, table)
        total_rows += parquet.metadata.num_rows
        report.bytes_read += fs.size(path)
    progress = Progress(f"land {table.name}", total_rows, log or logging.getLogger(__name__))
    schema = raw_landing_schema(table)
    lock = threading.Lock()

    def land_file(index: int, path: str, version: TableVersion) -> None:
        with lake.fs.open(version.part(index), "wb") as sink:
            writer = pq.ParquetWriter(sink, schema, compression="zstd", compression_level=1)
            try:
                counters: dict[str, int] = {}
                for batch in iter_landing_batches(path, table, fs, user_salt, counters=counters):
                    writer.write_batch(batch)
                    errors = batch.column(INGEST_ERROR)
                    messages = (
                        errors.drop_null().to_pylist() if errors.null_count < len(errors) else []
                    )
                    with lock:
                        for message in messages:
                            report.row_errors[message] = report.row_errors.get(message, 0) + 1
                        report.rows += batch.num_rows
                        report.raw_usernames_hashed += counters.pop("raw_usernames_hashed", 0)
                        progress.advance(batch.num_rows)
            finally:
                writer.close()

    with lake.writing(landing_table) as version:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [pool.submit(land_file, i, path, version) for i, path in enumerate(files)]
            for future in futures:
                future.result()  # re-raises the first failure; the version is then discarded
        report.version = version.name
    progress.done()
    return report


def describe_size(n_bytes: int) -> str:
    if n_bytes <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(n_bytes, 1024)), len(units) - 1)
    return f"{n_bytes / 1024**i:.1f} {units[i]}"
