"""The Civitai raw landing (layout and reading) and the build of release tables from it.

The crawl (``pipelines.civitai.crawler``) lands every API answer verbatim — usernames already
replaced by their salted hash — as gzip JSON lines, one line per page, under::

    <lake>/raw/civitai/window=<window>/<stream>/part-<seq>-<rand>.jsonl.gz

``<stream>`` is one of :data:`STREAMS`; a line holds ``format, stream, url`` (never a token),
``params, status, fetched_at, elapsed, attempts, error, body``. Only committed part files
(:data:`PART_PATTERN`) are read; temporary files of a killed writer are not. The layout is
defined here once (:func:`window_dir`, :func:`part_name`, :func:`encode_part`) for the writer
and the reader.

:func:`build_release` maps every landed page of every window into release-format parquet
(``out/images/part-*.parquet``, ``out/models/part-*.parquet``, exactly the canonical schemas),
keeping the latest snapshot of each key by fetch time; pages and items that cannot be mapped
come back as :class:`~warehouse.quarantine.QuarantineRecord` s (source ``civitai``, step
``crawl``) for the caller to write to the ``quarantine/civitai`` lake table.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import posixpath
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from warehouse import civitai_map as cm
from warehouse.duck import quote
from warehouse.files import fsync_dir, fsync_tree
from warehouse.lake import Lake, is_remote, parquet_writer
from warehouse.quarantine import QuarantineRecord
from warehouse.schema import IMAGES, MODELS, ReleaseTable

RAW_PREFIX = "raw/civitai"
STREAMS: tuple[str, ...] = ("models", "images", "model_versions")
FORMAT_VERSION = 1  # of a landed line
PART_PATTERN = re.compile(r"^part-(\d+)-[0-9a-f]+\.jsonl\.gz$")
WINDOW_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,99}$")
RELEASE_TABLES: tuple[ReleaseTable, ...] = (IMAGES, MODELS)
# Lineage columns of the intermediate mapped rows (dropped from the release files).
LINEAGE: tuple[tuple[str, pa.DataType], ...] = (
    ("_priority", pa.int64()),
    ("_fetched_at", pa.string()),
    ("_part", pa.string()),
    ("_line", pa.int64()),
    ("_item", pa.int64()),
)


# ---------------------------------------------------------------------------------------------
# Layout of the raw landing


def check_window(window: str) -> None:
    """Raise ValueError unless ``window`` is a safe folder name (a partition key)."""
    if not WINDOW_PATTERN.fullmatch(window):
        raise ValueError(
            f"window {window!r}: use letters, digits and ._:+- (a partition key), no slashes"
        )


def window_dir(window: str, *parts: str) -> str:
    """The path of ``window``'s landing (joined with ``parts``), relative to the lake root."""
    return posixpath.join(RAW_PREFIX, f"window={window}", *parts)


def part_name(seq: int) -> str:
    """A fresh part file name: sequence number (read order) plus a random suffix."""
    return f"part-{seq:06d}-{secrets.token_hex(4)}.jsonl.gz"


def encode_part(records: Iterable[dict[str, Any]]) -> bytes:
    """The bytes of one part file: each record as one JSON line, gzip-compressed."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False).encode())
            handle.write(b"\n")
    return buffer.getvalue()


def _ls(lake: Lake, relative: str) -> list[str]:
    try:
        entries = lake.fs.ls(posixpath.join(lake.root, relative), detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def list_windows(lake: Lake) -> list[str]:
    """The windows that have a raw landing in ``lake``, sorted."""
    names = _ls(lake, RAW_PREFIX)
    return sorted(n.removeprefix("window=") for n in names if n.startswith("window="))


# ---------------------------------------------------------------------------------------------
# Reading the raw landing


@dataclass(frozen=True)
class RawPage:
    """One landed page: where it lies and what was recorded."""

    window: str
    stream: str
    part: str  # path of the part file relative to the lake root
    line: int
    record: dict[str, Any]


def iter_raw_pages(
    lake: Lake, windows: Sequence[str] | None = None, streams: Sequence[str] = STREAMS
) -> Iterator[RawPage]:
    """Every landed page of ``windows`` (default: all), part by part in write order.

    A line that is no JSON (a corrupt file) comes back as a record with a ``corrupt`` reason
    and the line as ``body``, for the build to quarantine.
    """
    for window in windows if windows is not None else list_windows(lake):
        for stream in streams:
            folder = window_dir(window, stream)
            names = [n for n in _ls(lake, folder) if PART_PATTERN.match(n)]
            names.sort(key=lambda n: (int(PART_PATTERN.match(n).group(1)), n))  # type: ignore[union-attr]
            for name in names:
                relative = posixpath.join(folder, name)
                with lake.fs.open(posixpath.join(lake.root, relative), "rb") as handle:
                    data = gzip.decompress(handle.read())
                for line_no, line in enumerate(data.splitlines()):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        record = {
                            "stream": stream,
                            "corrupt": f"{exc.msg} at {exc.pos}",
                            "body": line.decode("utf-8", "replace"),
                        }
                    yield RawPage(window, stream, relative, line_no, record)


# ---------------------------------------------------------------------------------------------
# Building the release


@dataclass
class ReleaseBuild:
    """What :func:`build_release` wrote."""

    out: str
    rows: dict[str, int]
    files: dict[str, list[str]]
    pages: int = 0  # 2xx pages mapped
    error_pages: int = 0  # landed non-2xx answers (failures; not data)
    bad_pages: int = 0  # 2xx bodies that were no JSON page (quarantined)
    mapped_rows: dict[str, int] = field(default_factory=dict)  # before dedupe
    duplicates_dropped: dict[str, int] = field(default_factory=dict)
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    windows: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _RowSpool:
    """Mapped rows + lineage spooled to a local parquet file in batches."""

    def __init__(self, path: str, table: ReleaseTable, batch_rows: int = 20_000) -> None:
        self.path = path
        self.schema = pa.schema(
            list(table.canonical_schema()) + [pa.field(n, t) for n, t in LINEAGE]
        )
        self.rows: list[dict[str, Any]] = []
        self.batch_rows = batch_rows
        self.writer = parquet_writer(path, self.schema)
        self.count = 0

    def add(self, rows: list[dict[str, Any]], lineage: dict[str, Any]) -> None:
        for index, row in enumerate(rows):
            self.rows.append({**row, **lineage, "_item": index})
        if len(self.rows) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            columns = {n: [r.get(n) for r in self.rows] for n in self.schema.names}
            self.writer.write_table(pa.table(columns, schema=self.schema))
            self.count += len(self.rows)
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def build_release(
    lake: Lake,
    out: str | Path,
    *,
    windows: Sequence[str] | None = None,
    rows_per_part: int = 1_000_000,
    logger: logging.Logger | None = None,
) -> ReleaseBuild:
    """Map every landed page of ``windows`` (default: all) into release parquet under ``out``.

    Writes ``out/images/part-*.parquet`` and ``out/models/part-*.parquet`` with exactly the
    canonical release schemas, one row per key ((imageId, modelVersionId) /
    (modelVersionId, fileId)), the latest snapshot by fetch time (a ``/models`` row beats a
    ``/model-versions`` row), sorted by key. The quarantine records are returned in
    ``ReleaseBuild.quarantine``. A local ``out`` is replaced atomically (built and fsynced
    beside it, then swapped in); a remote one is overwritten file by file.
    """
    log = logger or logging.getLogger(__name__)
    started = time.monotonic()
    out = str(out)
    chosen = list(windows) if windows is not None else list_windows(lake)
    build = ReleaseBuild(out=out, rows={}, files={}, windows=chosen)
    with tempfile.TemporaryDirectory(prefix="civitai-build-") as tmp:
        spools = {
            t.name: _RowSpool(os.path.join(tmp, f"{t.name}.parquet"), t) for t in RELEASE_TABLES
        }
        try:
            for page in iter_raw_pages(lake, chosen):
                _map_page(page, spools, build)
        finally:
            for spool in spools.values():
                spool.close()
        build.mapped_rows = {name: spool.count for name, spool in spools.items()}
        con = duckdb.connect()
        con.execute("SET threads = 2")
        con.execute("SET preserve_insertion_order = false")
        staged = _Output(out, lake)
        try:
            for table in RELEASE_TABLES:
                key = ", ".join(f'"{k}"' for k in table.key)
                columns = ", ".join(f'"{c}"' for c in table.column_names)
                source = f"read_parquet({quote(spools[table.name].path)})"
                query = (
                    f"SELECT {columns} FROM {source} "
                    f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY _priority DESC, "
                    f"_fetched_at DESC, _part DESC, _line DESC, _item DESC) = 1 "
                    f"ORDER BY {key}"
                )
                reader = con.sql(query).to_arrow_reader(50_000)
                files, rows = staged.write_table(table, reader, rows_per_part)
                build.files[table.name], build.rows[table.name] = files, rows
                build.duplicates_dropped[table.name] = build.mapped_rows[table.name] - rows
            staged.commit()
        except BaseException:
            staged.abort()
            raise
        finally:
            con.close()
    build.seconds = time.monotonic() - started
    log.info(
        f"civitai release build: {build.rows} rows from {build.pages:,} pages of "
        f"{len(chosen)} window(s); {build.duplicates_dropped} duplicates dropped, "
        f"{len(build.quarantine)} quarantine records, {build.error_pages} error pages"
    )
    return build


def _map_page(page: RawPage, spools: dict[str, _RowSpool], build: ReleaseBuild) -> None:
    """Spool the rows of one landed page; quarantine what cannot be mapped; count the rest."""
    record = page.record
    where = (page.part, page.line)
    if "corrupt" in record:
        reason = f"corrupt raw line: {record['corrupt']}"
        build.quarantine.append(cm.quarantine_record("page", "", reason, record["body"], *where))
        return
    if "note" in record:
        return  # a bookkeeping line (permanent failure marker)
    status = record.get("status")
    if status is None or not 200 <= int(status) < 300:
        build.error_pages += 1
        return
    page_key = cm.record_key(url=record.get("url"))
    payload, reason = cm.parse_page(record.get("body"))
    if payload is None:
        build.bad_pages += 1
        build.quarantine.append(
            cm.quarantine_record("page", page_key, reason or "", record.get("body"), *where)
        )
        return
    stream = page.stream
    if stream == "images":
        try:
            version = cm.to_int((record.get("params") or {}).get("modelVersionId"), "version")
        except cm.MapError:
            version = None
        if version is None:
            reason = "images page without a modelVersionId parameter"
            build.quarantine.append(cm.quarantine_record("page", page_key, reason, payload, *where))
            return
        mapped = cm.map_images_page(payload, version, *where)
        target, priority = "images", 1
    elif stream == "models":
        mapped = cm.map_models_page(payload, *where)
        target, priority = "models", 1
    elif stream == "model_versions":
        mapped = cm.map_model_version(payload, *where)
        target, priority = "models", 0
    else:
        return
    build.pages += 1
    build.quarantine.extend(mapped.quarantine)
    lineage = {
        "_priority": priority,
        "_fetched_at": str(record.get("fetched_at") or ""),
        "_part": page.part,
        "_line": page.line,
    }
    spools[target].add(mapped.rows, lineage)


class _Output:
    """The release folder being written: a staging folder swapped in (local) or in place."""

    def __init__(self, out: str, lake: Lake) -> None:
        self.out = out.rstrip("/")
        self.remote = is_remote(self.out)
        if self.remote:
            self.fs, _ = fsspec.core.url_to_fs(self.out, **lake.storage_options)
            self.root = self.out
        else:
            self.out = os.path.abspath(self.out.removeprefix("file://"))
            parent = os.path.dirname(self.out)
            os.makedirs(parent, exist_ok=True)
            self.root = tempfile.mkdtemp(
                prefix=f".{os.path.basename(self.out)}.staging-", dir=parent
            )
            self.fs = fsspec.filesystem("file")
        self.written: list[str] = []

    def final(self, relative: str) -> str:
        return posixpath.join(self.out, relative)

    def _open(self, relative: str) -> IO[bytes]:
        path = posixpath.join(self.root, relative)
        if not self.remote:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.written.append(relative)
        return self.fs.open(path, "wb")

    def write_table(
        self, table: ReleaseTable, reader: pa.RecordBatchReader, rows_per_part: int
    ) -> tuple[list[str], int]:
        """Write ``reader``'s rows as ``<table>/part-NNNNN.parquet`` files of at most
        ``rows_per_part`` rows (one empty part when there are none); (final paths, rows)."""
        schema = table.canonical_schema()
        files: list[str] = []
        rows = 0
        writer: pq.ParquetWriter | None = None
        handle: IO[bytes] | None = None
        in_part = 0

        def open_part() -> pq.ParquetWriter:
            nonlocal writer, handle, in_part
            relative = f"{table.name}/part-{len(files):05d}.parquet"
            handle = self._open(relative)
            writer = parquet_writer(handle, schema)
            files.append(self.final(relative))
            in_part = 0
            return writer

        def close_part() -> None:
            nonlocal writer, handle
            if writer is not None and handle is not None:
                writer.close()
                handle.close()
                writer = handle = None

        try:
            for batch in reader:
                data = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
                offset = 0
                while offset < data.num_rows:
                    if writer is None or in_part >= rows_per_part:
                        close_part()
                        open_part()
                    take = min(rows_per_part - in_part, data.num_rows - offset)
                    writer.write_table(data.slice(offset, take))  # type: ignore[union-attr]
                    in_part += take
                    offset += take
                    rows += take
            if writer is None:
                open_part().write_table(schema.empty_table())
        finally:
            close_part()
        return files, rows

    def commit(self) -> None:
        """Make the written files the release: locally fsync them and swap the folder in;
        remotely delete the stale parts of an earlier, larger build."""
        if self.remote:
            strip = self.fs._strip_protocol
            keep = {strip(posixpath.join(self.out, r)) for r in self.written}
            for table in RELEASE_TABLES:
                for path in self.fs.glob(posixpath.join(self.out, table.name, "part-*.parquet")):
                    if strip(path) not in keep:
                        self.fs.rm(path)
            return
        fsync_tree(self.root)
        old = None
        if os.path.exists(self.out):
            old = f"{self.root}.old"
            os.replace(self.out, old)
        os.replace(self.root, self.out)
        fsync_dir(os.path.dirname(self.out))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop the staging folder (local); the previous release stays as it was."""
        if not self.remote:
            shutil.rmtree(self.root, ignore_errors=True)
