"""Landing the published ImageGem release (parquet), and reading it back in canonical batches.

Landing (:func:`land_release_table`) validates every file's footer and commits a manifest:
one row per row group of every file, pinned by the file's size and version. The rows are
not copied: the clean stage reads each row group straight from its release file, once, in
parallel (:class:`Landing`), and that single read is where rows are coerced to the
canonical types and raw usernames are salted-hashed, so the lake never holds a raw username
nor a second copy of the release.

File-level problems (no files, an empty or truncated file, a missing/renamed or mistyped
column, a data page that cannot be decoded behind a valid footer, a file that changed after
landing) raise :class:`ReleaseFormatError` naming the file and the column or position: the
run stops and nothing is committed. Row-level problems met while decoding (invalid UTF-8; a
fractional, infinite or out-of-int64-range value in an integer column) do not stop the run:
the row carries an ``_ingest_error`` and the clean stage quarantines it with that reason.
Nothing is dropped here.
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from warehouse.lake import Lake, is_remote
from warehouse.schema import (
    USER_HASH_PATTERN,
    Kind,
    ReleaseTable,
    raw_landing_schema,
)
from warehouse.users import normalize_user_hashes

BATCH_ROWS = 262_144


class ReleaseFormatError(ValueError):
    """A release file that cannot be ingested as a whole (names the file and the column)."""


@dataclass
class LandingReport:
    """What one ingest landed."""

    table: str
    files: list[str] = field(default_factory=list)
    rows: int = 0
    bytes_read: int = 0
    row_groups: int = 0
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

INT64_MAX = 2**63 - 1


class RowErrors:
    """The first ingest error of each row of a batch, kept as codes (no per-row Python)."""

    def __init__(self, rows: int) -> None:
        self.codes = np.zeros(rows, dtype=np.int32)  # 0: no error, i: messages[i - 1]
        self.messages: list[str] = []

    def note(self, mask: np.ndarray, message: str) -> None:
        """Record ``message`` for the rows in ``mask`` that have no error yet."""
        new = mask & (self.codes == 0)
        if new.any():
            self.messages.append(message)
            self.codes[new] = len(self.messages)

    def array(self) -> pa.Array:
        """The ``_ingest_error`` column: the message of each row's first error, else null."""
        if not self.messages:
            return pa.nulls(len(self.codes), pa.string())
        indices = pa.array(self.codes - 1, mask=self.codes == 0)
        return pa.DictionaryArray.from_arrays(indices, pa.array(self.messages)).cast(pa.string())


def _coerce_int(arr: pa.Array, column: str, errors: RowErrors) -> pa.Array:
    if pa.types.is_null(arr.type) or pa.types.is_boolean(arr.type):
        return arr.cast(pa.int64())
    if pa.types.is_integer(arr.type):
        if pa.types.is_uint64(arr.type):
            too_big = pc.greater(arr, pa.scalar(INT64_MAX, pa.uint64())).fill_null(False)
            if pc.any(too_big).as_py():
                errors.note(
                    too_big.to_numpy(zero_copy_only=False),
                    f"value out of int64 range in integer column {column}",
                )
                arr = pc.if_else(too_big, pa.scalar(None, arr.type), arr)
        return arr.cast(pa.int64())
    values = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(values)
        in_range = finite & (np.abs(values) < 2.0**63)
        whole = in_range & (np.floor(values) == values)
    nan = np.isnan(values)
    if not (whole | nan).all():
        errors.note(~nan & ~finite, f"non-finite value in integer column {column}")
        errors.note(finite & ~in_range, f"value out of int64 range in integer column {column}")
        errors.note(in_range & ~whole, f"non-integer value in integer column {column}")
    out = np.where(whole, values, 0).astype(np.int64)
    return pa.array(out, type=pa.int64(), mask=~whole)


def _coerce_float(arr: pa.Array) -> pa.Array:
    return arr.cast(pa.float64())


def _coerce_string(arr: pa.Array, column: str, errors: RowErrors) -> pa.Array:
    if pa.types.is_null(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    if (
        pa.types.is_binary(arr.type)
        or pa.types.is_large_binary(arr.type)
        or pa.types.is_binary_view(arr.type)
    ):
        arr = arr.cast(pa.binary()).view(pa.string())
    try:
        arr.validate(full=True)
        return arr
    except pa.ArrowInvalid:
        pass
    # Rare path: find the rows with invalid UTF-8, keep them (escaped) and flag them.
    fixed: list[str | None] = []
    invalid = np.zeros(len(arr), dtype=bool)
    for i, value in enumerate(arr.view(pa.binary()).to_pylist()):
        if value is None:
            fixed.append(None)
            continue
        try:
            fixed.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            fixed.append(value.decode("utf-8", errors="backslashreplace"))
            invalid[i] = True
    errors.note(invalid, f"invalid UTF-8 in column {column}")
    return pa.array(fixed, type=pa.string())


def _coerce_timestamp_text(arr: pa.Array, column: str, errors: RowErrors) -> pa.Array:
    if pa.types.is_timestamp(arr.type):
        # UTC wall time (a zoned timestamp holds UTC instants), whole seconds (the release's
        # text has no fraction)
        seconds = arr.cast(pa.timestamp(arr.type.unit)).cast(pa.timestamp("s"), safe=False)
        return pc.strftime(seconds, format="%Y-%m-%d %H:%M:%S")
    if pa.types.is_date(arr.type):
        return pc.strftime(arr.cast(pa.timestamp("s")), format="%Y-%m-%d %H:%M:%S")
    return _coerce_string(arr, column, errors)


def _canonical_hashes(values: pa.Array) -> np.ndarray:
    """Which values are already a canonical userHash (64 lowercase hex characters)."""
    matches = pc.match_substring_regex(values, USER_HASH_PATTERN).fill_null(False)
    return matches.to_numpy(zero_copy_only=False)


def _user_hashes(values: pa.Array, salt: str) -> tuple[pa.Array, int]:
    """:func:`normalize_user_hashes`, run only on the values that are not canonical hashes."""
    canonical = _canonical_hashes(values)
    if canonical.all():
        if not salt:
            raise ValueError("a non-empty salt is required to hash raw usernames")
        return values, 0
    others = np.flatnonzero(~canonical)
    fixed, n_raw = normalize_user_hashes(values.take(pa.array(others)), salt)
    return pc.replace_with_mask(values, pa.array(~canonical), fixed), n_raw


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
    errors = RowErrors(n)
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
            columns[-1], n_raw = _user_hashes(columns[-1], user_salt)
            if counters is not None and n_raw:
                counters["raw_usernames_hashed"] = counters.get("raw_usernames_hashed", 0) + n_raw
    columns.append(pa.repeat(pa.scalar(source_file, pa.string()), n))
    columns.append(pa.array(np.arange(first_row, first_row + n, dtype=np.int64)))
    columns.append(errors.array())
    return pa.RecordBatch.from_arrays(columns, schema=raw_landing_schema(table))


# -- landing ----------------------------------------------------------------------------------

# The manifest a landing commits: one row per row group of every release file.
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("unit", pa.int64()),
        pa.field("file", pa.string()),
        pa.field("file_bytes", pa.int64()),
        pa.field("file_version", pa.string()),
        pa.field("row_group", pa.int64()),
        pa.field("first_row", pa.int64()),
        pa.field("rows", pa.int64()),
    ]
)


@dataclass(frozen=True)
class LandingUnit:
    """One row group of one release file: the unit of parallel reading."""

    index: int  # its position in the landing (units are in file, row-group order)
    path: str
    row_group: int
    first_row: int  # the row group's first row within its file (for _source_row)
    rows: int
    metadata: pq.FileMetaData  # the file's footer, read once when validating


def file_version(fs, path: str) -> str:
    """What tells a later reader that ``path`` is still the file that was landed: its ETag
    on object stores, else its modification time in nanoseconds."""
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"mtime:{int(round(float(mtime or 0) * 1e9))}"


def plan_landing(files: list[str], table: ReleaseTable, fs) -> tuple[list[LandingUnit], int, int]:
    """Validate every file's footer and split the files into row-group units.

    Returns the units (in file, row-group order), the total row count and the bytes. Raises
    :class:`ReleaseFormatError` for the first file that cannot be landed, before any row is read.
    """
    units: list[LandingUnit] = []
    total_rows = total_bytes = 0
    for path in files:
        parquet = open_parquet(path, fs)
        try:
            validate_schema(path, parquet.schema_arrow, table)
            metadata = parquet.metadata
        finally:
            parquet.close(force=True)
        first = 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            units.append(LandingUnit(len(units), path, group, first, rows, metadata))
            first += rows
        total_rows += metadata.num_rows
        total_bytes += fs.size(path)
    return units, total_rows, total_bytes


def iter_landing_batches(
    unit: LandingUnit,
    table: ReleaseTable,
    fs,
    user_salt: str,
    batch_rows: int = BATCH_ROWS,
    counters: dict[str, int] | None = None,
    use_threads: bool = True,
) -> Iterator[pa.RecordBatch]:
    """Stream one row group as canonical batches (:func:`coerce_batch`).

    A page that cannot be decoded (corrupt bytes behind a valid footer, a bad checksum) raises
    :class:`ReleaseFormatError` naming the file, the row group and the first row not read.
    """
    with fs.open(unit.path, "rb") as source:
        parquet = pq.ParquetFile(source, metadata=unit.metadata, page_checksum_verification=True)
        batches = parquet.iter_batches(
            batch_size=batch_rows,
            row_groups=[unit.row_group],
            columns=table.column_names,
            use_threads=use_threads,
        )
        row = unit.first_row
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:
                raise ReleaseFormatError(
                    f"{unit.path}: unreadable data in row group {unit.row_group} "
                    f"at row {row} ({exc})"
                ) from exc
            yield coerce_batch(batch, table, unit.path, row, user_salt, counters)
            row += batch.num_rows


def iter_key_columns(unit: LandingUnit, table: ReleaseTable, fs) -> Iterator[pa.RecordBatch]:
    """The key columns of one row group, coerced to int64 (a value that is no integer is
    null, as :func:`coerce_batch` makes it), in batches: enough to find repeated keys
    without decoding the rest of the row."""
    kinds = dict(table.columns)
    if any(kinds[k] is not Kind.INT for k in table.key):
        raise ValueError(f"{table.name}: key columns must be integer columns")
    with fs.open(unit.path, "rb") as source:
        parquet = pq.ParquetFile(source, metadata=unit.metadata, page_checksum_verification=True)
        batches = parquet.iter_batches(
            batch_size=BATCH_ROWS, row_groups=[unit.row_group], columns=list(table.key)
        )
        try:
            for batch in batches:
                errors = RowErrors(batch.num_rows)
                columns = []
                for k in table.key:
                    arr = batch.column(k)
                    if pa.types.is_dictionary(arr.type):
                        arr = arr.dictionary_decode()
                    columns.append(_coerce_int(arr, k, errors))
                yield pa.RecordBatch.from_arrays(columns, names=list(table.key))
        except (pa.ArrowException, OSError) as exc:
            raise ReleaseFormatError(
                f"{unit.path}: unreadable data in row group {unit.row_group} ({exc})"
            ) from exc


@dataclass
class Landing:
    """A committed landing of one release table: its row-group units, where they live, and
    the salt that hashes raw usernames while they are read (:meth:`batches`)."""

    table: ReleaseTable
    units: list[LandingUnit]
    fs: object
    user_salt: str
    version: str = ""

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)

    def batches(
        self, unit: LandingUnit, counters: dict[str, int] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """The canonical batches of one unit (decoded on this thread only)."""
        return iter_landing_batches(
            unit,
            self.table,
            self.fs,
            self.user_salt,
            batch_rows=BATCH_ROWS,
            counters=counters,
            use_threads=False,
        )

    def keys(self, unit: LandingUnit) -> Iterator[pa.RecordBatch]:
        return iter_key_columns(unit, self.table, self.fs)


def land_release_table(
    lake: Lake,
    landing_table: str,
    files: list[str],
    table: ReleaseTable,
    storage_options: dict | None = None,
    log: logging.Logger | None = None,
) -> LandingReport:
    """Land the release files of ``table``: validate every file's footer and commit the
    manifest ``landing_table`` (one row per row group: file, size, version, rows).

    The rows themselves are not copied: the clean stage decodes each row group straight
    from the release file, once (:class:`Landing`), hashing raw usernames as it reads, so no
    raw username and no second copy of the release is ever written to the lake. The
    manifest pins each file by size and version (ETag, or modification time): a file that
    changed after landing is refused by :func:`open_landing` until the landing is redone.
    Nothing is committed when any file is unreadable.
    """
    log = log or logging.getLogger(__name__)
    report = LandingReport(table=table.name, files=list(files))
    if not files:
        raise ReleaseFormatError(f"no files given for release table {table.name}")
    fs, _ = open_release_fs(files[0], storage_options)
    units, report.rows, report.bytes_read = plan_landing(files, table, fs)
    versions = {path: (fs.size(path), file_version(fs, path)) for path in files}
    manifest = pa.table(
        {
            "unit": [u.index for u in units],
            "file": [u.path for u in units],
            "file_bytes": [versions[u.path][0] for u in units],
            "file_version": [versions[u.path][1] for u in units],
            "row_group": [u.row_group for u in units],
            "first_row": [u.first_row for u in units],
            "rows": [u.rows for u in units],
        },
        schema=MANIFEST_SCHEMA,
    )
    report.version = lake.write_table(landing_table, manifest).name
    report.row_groups = len(units)
    log.info(
        f"landed {table.name}: {len(files)} files, {len(units)} row groups, "
        f"{report.rows:,} rows ({describe_size(report.bytes_read)}), by reference"
    )
    return report


def open_landing(
    lake: Lake,
    landing_table: str,
    table: ReleaseTable,
    user_salt: str,
    storage_options: dict | None = None,
) -> Landing:
    """The committed landing ``landing_table``, its files checked against the manifest.

    Raises :class:`ReleaseFormatError` naming the file when a landed file is gone, changed
    size or version, or no longer has the landed row groups.
    """
    if not user_salt:
        raise ValueError("a non-empty salt is required to hash raw usernames")
    version = lake.require(landing_table)
    manifest = lake.read_table(landing_table).to_pylist()
    if not manifest:
        return Landing(table, [], None, user_salt, version.name)
    fs, _ = open_release_fs(manifest[0]["file"], storage_options)
    footers: dict[str, pq.FileMetaData] = {}
    units = []
    for row in sorted(manifest, key=lambda r: r["unit"]):
        path = row["file"]
        if path not in footers:
            if not fs.exists(path):
                raise ReleaseFormatError(
                    f"{path}: landed release file is gone; materialize raw_{table.name} again"
                )
            found = (fs.size(path), file_version(fs, path))
            if found != (row["file_bytes"], row["file_version"]):
                raise ReleaseFormatError(
                    f"{path}: changed since it was landed (size, version {found} != landed "
                    f"{(row['file_bytes'], row['file_version'])}); materialize raw_{table.name} "
                    "again"
                )
            parquet = open_parquet(path, fs)
            try:
                footers[path] = parquet.metadata
            finally:
                parquet.close(force=True)
        metadata = footers[path]
        if (
            row["row_group"] >= metadata.num_row_groups
            or metadata.row_group(row["row_group"]).num_rows != row["rows"]
        ):
            raise ReleaseFormatError(
                f"{path}: row group {row['row_group']} no longer holds the {row['rows']:,} "
                f"landed rows; materialize raw_{table.name} again"
            )
        units.append(
            LandingUnit(
                row["unit"], path, row["row_group"], row["first_row"], row["rows"], metadata
            )
        )
    return Landing(table, units, fs, user_salt, version.name)


def describe_size(n_bytes: int) -> str:
    if n_bytes <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(n_bytes, 1024)), len(units) - 1)
    return f"{n_bytes / 1024**i:.1f} {units[i]}"
