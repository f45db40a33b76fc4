"""Image and LoRA file downloads from Civitai into the content-addressed `MediaStore`.

Both kinds run through ONE loop (:func:`run_downloads`) over the one HTTP policy of
`pipelines.civitai.http` (user agent, rate limit, retries with backoff and ``Retry-After``,
token only in the ``Authorization`` header of API-origin requests, scrubbing). Per item:

1. carry-over: an ok row of the previous table (``existing``) is kept without a request when
   its object is still in the store AND still hashes to its ``sha256`` (a corrupted or lost
   object is counted and downloaded again, never trusted);
2. fetch: redirects are followed by hand (at most :data:`MAX_REDIRECTS`; a loop or a hop to
   anything but http(s), e.g. ``file://``, is refused and never requested); the body is read
   under a size cap (declared and streamed) while its SHA-256 is computed; the whole fetch,
   body included, is one attempt, so a connection reset mid-body is retried like a 503;
3. validate and store (in a worker thread): what the kind checks;
4. anything that is not ok becomes a row with status ``failed`` / ``refused`` and a reason,
   plus a :class:`~warehouse.quarantine.QuarantineRecord` (source ``media``, step
   ``image_files`` / ``lora_files``): nothing is dropped. Failed items are fetched again on
   the next run.

What each kind supplies (:class:`MediaKind`):

* images (:func:`download_images`): the URL (a prefix rewrite maps the CDN to a local
  server), a decode check (Pillow ``verify()`` then ``load()``, pixel count capped before
  decoding) and a shrink to ``max_side``; the body is kept in memory;
* LoRA files (:func:`download_loras`): ``/api/download/models/{id}`` (307 to the file host),
  safetensors only — pickle formats are refused by declared format (never requested), by file
  name (declared or served) and by content sniffing (the download stops at the first bytes; a
  refused body is never parsed, let alone unpickled) — a validated safetensors header, the
  SHA-256 checked against the release's ``hashSHA256`` and a sanitised file name; the body is
  spooled to disk. A release row WITHOUT a hash is accepted on its safetensors checks alone,
  stored under its computed SHA-256 and marked ``sha256_verified = false`` (counted as
  ``unverified``): the hash is an integrity claim of the release, not a safety check, and
  dropping the file would lose a valid LoRA; the structural checks still catch a truncated
  body. When a later release row brings a hash, the carried row is checked against it.

401 from the API origin means the token is missing or refused: that item fails and the
remaining API requests of the run are not sent (each such item fails with the same reason),
so a bad token costs one request, not one per file. 403 (per file) and other 4xx fail the
item without a retry. Every failure is fetched again on the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import posixpath
import re
import tempfile
import time
import traceback
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx
import pyarrow as pa
from PIL import Image

from ml.lora_format import (
    LoraFormatError,
    header_length,
    parse_safetensors_header,
    refusal_reason,
)
from pipelines.civitai.http import (
    DEFAULT_BASE_URL,
    IMAGE_CDN_URL,
    USER_AGENT,
    HttpSession,
    Retryable,
    RetryPolicy,
    Sleep,
    is_retryable,
    origin,
    parse_retry_after,
    strip_token,
)
from warehouse.media import (
    IMAGE_FILES_SCHEMA,
    LORA_FILES_SCHEMA,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_REFUSED,
    MediaStore,
)
from warehouse.progress import Progress
from warehouse.quarantine import QuarantineRecord, payload_text, quarantine_table

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
SNIFF_BYTES = 16
DRAIN_BYTES = 64 * 1024  # non-200 bodies up to this size are read to reuse the connection
# Per item: 4 attempts, ~1 + 2 + 4 s of backoff (plus jitter) or the server's Retry-After.
DOWNLOAD_RETRY = RetryPolicy(attempts=4)

IMAGE_FORMATS: dict[str, str] = {"JPEG": ".jpeg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_IMAGE_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_LORA_MAX_BYTES = 2 * 1024**3
LORA_COLUMNS: tuple[str, ...] = (
    "modelVersionId",
    "fileId",
    "fileName",
    "format",
    "hashSHA256",
    "downloadUrl",
)


class Failure(Exception):
    """A per-item failure with a reason for the table (status failed or refused)."""

    def __init__(self, reason: str, status: str = STATUS_FAILED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class DownloadError(Exception):
    """An unexpected error that stopped a download run (message scrubbed of the token)."""


@dataclass
class Body:
    """A received body: its size and SHA-256, in memory (``data``) or spooled (``path``)."""

    size: int
    sha256: str
    data: bytes | None = None
    path: str | None = None

    def discard(self) -> None:
        """Remove the spool file, if any."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


@dataclass
class DownloadReport:
    """What a download run did: the table rows, the quarantine rows and counts."""

    table: pa.Table  # the kind's schema, one row per item, input order
    quarantine: pa.Table  # warehouse.quarantine.QUARANTINE_SCHEMA, one row per item not ok
    downloaded: int = 0  # fetched and stored in this run
    skipped: int = 0  # carried over from `existing` (object present and intact)
    refused: int = 0
    failed: int = 0
    unverified: int = 0  # ok rows stored without a release hash to check against
    lost: int = 0  # previous ok rows whose object was missing: downloaded again
    corrupt: int = 0  # previous ok rows whose object no longer hashed right: downloaded again
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)  # failures by reason group
    http: dict[str, Any] = field(default_factory=dict)  # the session's counters


# ---------------------------------------------------------------------------------------------
# URLs and file names


def rewrite_url(url: str, base_url_map: Mapping[str, str] | None) -> str:
    """Apply the first matching prefix rewrite (e.g. the image CDN → a local server)."""
    for prefix, target in (base_url_map or {}).items():
        if url.startswith(prefix):
            return target.rstrip("/") + "/" + url[len(prefix) :].lstrip("/")
    return url


def image_url_map(local_base: str, hosts: Sequence[str] = (IMAGE_CDN_URL,)) -> dict[str, str]:
    """A ``base_url_map`` sending the image CDN host(s) to ``local_base``."""
    return {host: local_base for host in hosts}


def content_disposition_filename(header: str | None) -> str | None:
    """The file name of a ``Content-Disposition`` header (``filename*=`` preferred), raw."""
    if not header:
        return None
    star = re.search(r"filename\*\s*=\s*([^;]+)", header, re.I)
    if star:
        value = star.group(1).strip().strip('"')
        if "''" in value:
            charset, _, encoded = value.partition("''")
            try:
                return unquote(encoded, encoding=charset or "utf-8", errors="replace")
            except LookupError:
                return unquote(encoded)
        return unquote(value)
    plain = re.search(r'filename\s*=\s*("((?:[^"\\]|\\.)*)"|[^;]+)', header, re.I)
    if plain:
        if plain.group(2) is not None:
            return re.sub(r"\\(.)", r"\1", plain.group(2))
        return plain.group(1).strip()
    return None


_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+\-() ]")


def safe_file_name(name: str | None, fallback: str = "file") -> str:
    """A safe base name: the last path component (``/`` and ``\\`` both count), no NUL or
    control characters, no leading dots or spaces, only ``[A-Za-z0-9._+-() ]`` (others →
    ``_``), at most 200 characters; ``fallback`` when nothing usable remains."""

    def clean(raw: str) -> str:
        text = unicodedata.normalize("NFKC", raw).replace("\\", "/")
        text = "".join(ch for ch in text if ch >= " " and ch != "\x7f")
        text = text.rsplit("/", 1)[-1]
        text = _UNSAFE_NAME_CHARS.sub("_", text).strip().lstrip(". ")
        if len(text) > 200:
            stem, dot, ext = text.rpartition(".")
            text = (stem[: 200 - len(ext) - 1] + dot + ext) if dot and len(ext) < 20 else text[:200]
        return "" if text in ("", ".", "..") else text

    return clean(name or "") or clean(fallback) or "file"


def http_reason(status: int, api: bool = False) -> str:
    """The reason of a final, non-retried HTTP answer (``api``: from the API origin)."""
    if status == 401:
        return "http 401: unauthorized" + (" (API token missing or refused)" if api else "")
    if status == 403:
        return "http 403: forbidden"
    return f"http {status}"


def _as_rows(rows: pa.Table | Iterable[Any], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows as dicts from an Arrow table, mappings or tuples in ``columns`` order."""
    if isinstance(rows, pa.Table):
        missing = [c for c in columns if c not in rows.column_names]
        if missing:
            raise ValueError(f"rows lack columns {missing}")
        return rows.select(list(columns)).to_pylist()
    out: list[dict[str, Any]] = []
    for row in rows:
        if isinstance(row, Mapping):
            out.append({c: row.get(c) for c in columns})
        else:
            values = tuple(row)
            if len(values) != len(columns):
                raise ValueError(f"row {values!r} does not have the columns {list(columns)}")
            out.append(dict(zip(columns, values, strict=True)))
    return out


# ---------------------------------------------------------------------------------------------
# What differs between kinds


class MediaKind:
    """What one kind of media supplies to the generic loop (override what differs)."""

    label = "media"  # progress label
    step = "media"  # quarantine step, also the lake table name
    table_name = "media"  # the table the items come from (quarantine lineage)
    schema: pa.Schema = pa.schema([])
    key_columns: tuple[str, ...] = ()
    max_bytes = DEFAULT_IMAGE_MAX_BYTES
    spool = False  # True: spool bodies to disk instead of memory
    spool_dir: str | None = None

    def items(self, rows: pa.Table | Iterable[Any]) -> list[dict[str, Any]]:
        """The input rows as the items to process (one table row each)."""
        raise NotImplementedError

    def key(self, item: Mapping[str, Any]) -> tuple:
        """The key that matches an item to a row of the previous table."""
        return tuple(item[c] for c in self.key_columns)

    def record_key(self, item: Mapping[str, Any]) -> str:
        """The quarantine ``record_key`` (``col=value/...``)."""
        return "/".join(f"{c}={item[c]}" for c in self.key_columns)

    def new_row(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """A table row for ``item``, status failed until the item is stored."""
        raise NotImplementedError

    def source_url(self, item: Mapping[str, Any]) -> str | None:
        """The item's URL as recorded (quarantine detail), without any token."""
        return None

    def payload(self, row: Mapping[str, Any]) -> str | None:
        """Extra quarantine payload of a failed row."""
        return None

    def carried_row(self, previous: Mapping[str, Any], item: Mapping[str, Any]) -> dict | None:
        """The row to keep for an item stored by a previous run, or None to fetch it again."""
        return {name: previous.get(name) for name in self.schema.names}

    def before_request(self, item: Mapping[str, Any]) -> None:
        """Raise `Failure` for an item that must not even be requested."""

    def target(self, item: Mapping[str, Any]) -> str:
        """The URL to request (raise `Failure` when there is none)."""
        raise NotImplementedError

    def check_response(
        self, response: httpx.Response, item: Mapping[str, Any], row: dict[str, Any]
    ) -> None:
        """Look at the final 200 answer's headers before its body is read."""

    def check_head(self, head: bytes) -> None:
        """Look at the first :data:`SNIFF_BYTES` bytes of the body (or all of a shorter one)."""

    def finish(
        self, body: Body, item: Mapping[str, Any], row: dict[str, Any], store: MediaStore
    ) -> None:
        """Validate the body, store it and fill ``row`` (runs in a worker thread)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# The generic loop


class _Run:
    """One download run of one kind (see :func:`run_downloads`)."""

    def __init__(
        self,
        kind: MediaKind,
        items: list[dict[str, Any]],
        store: MediaStore,
        session: HttpSession,
        previous: dict[tuple, dict[str, Any]],
        concurrency: int,
        logger: Any,
        verify_existing: bool,
    ) -> None:
        self.kind = kind
        self.items = items
        self.store = store
        self.session = session
        self.previous = previous
        self.concurrency = max(1, concurrency)
        self.log = logger
        self.verify_existing = verify_existing
        self.rows: list[dict[str, Any] | None] = [None] * len(items)
        self.fetched: set[int] = set()
        self.carried = 0
        self.replaced: Counter[str] = Counter()
        self.unauthorized = False  # a 401 from the API origin: send no more API requests
        self.progress = Progress(kind.label, len(items), logger)

    async def run(self) -> None:
        todo = iter(range(len(self.items)))

        async def worker() -> None:
            for i in todo:
                self.rows[i] = await self._one(i)
                self.progress.advance(1)

        async with self.session:
            workers = min(self.concurrency, len(self.items))
            tasks = [asyncio.create_task(worker()) for _ in range(workers)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _one(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        kept = await self._carry(item)
        if kept is not None:
            self.carried += 1
            return kept
        self.fetched.add(i)
        row = self.kind.new_row(item)
        try:
            self.kind.before_request(item)
            target = self.kind.target(item)

            async def attempt(_number: int) -> Body:
                return await self._fetch(target, item, row)

            body = await self.session.retrying(attempt, target)
            try:
                await asyncio.to_thread(self.kind.finish, body, item, row, self.store)
            finally:
                body.discard()
        except Failure as failure:
            row.update(status=failure.status, reason=self.session.scrub(failure.reason))
        except Retryable as exc:
            row.update(status=STATUS_FAILED, reason=self.session.scrub(_gave_up(exc)))
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            row.update(status=STATUS_FAILED, reason=f"http error: {type(exc).__name__}")
        except Exception as exc:  # a bug or an environment failure (disk full): stop the run
            text = "".join(traceback.format_exception(exc))
            self.log.error(self.session.scrub(f"{self.kind.label}: unexpected error\n{text}"))
            raise DownloadError(
                self.session.scrub(
                    f"{self.kind.label} {self.kind.record_key(item)}: {type(exc).__name__}: {exc}"
                )
            ) from None
        return row

    async def _carry(self, item: Mapping[str, Any]) -> dict[str, Any] | None:
        previous = self.previous.get(self.kind.key(item))
        if previous is None:
            return None
        row = self.kind.carried_row(previous, item)
        if row is None:
            return None
        path, sha = row.get("path"), row.get("sha256")
        if self.verify_existing:
            state = await asyncio.to_thread(self.store.check, path, sha)
        else:
            state = "intact" if await asyncio.to_thread(self.store.exists, path) else "missing"
        if state == "intact":
            return row
        self.replaced[state] += 1
        if state == "corrupt":
            self.log.warning(
                f"{self.kind.label}: stored object of {self.kind.record_key(item)} no longer "
                f"hashes to {sha}: downloading it again"
            )
        return None

    async def _fetch(self, url: str, item: Mapping[str, Any], row: dict[str, Any]) -> Body:
        """One attempt: follow redirects by hand, check the answer, read the body."""
        api = origin(self.session.base_url)
        seen = {url}
        for hop in range(MAX_REDIRECTS + 1):
            scheme = urlsplit(url).scheme.lower()
            if scheme not in ("http", "https"):
                if hop == 0:
                    raise Failure(f"unsupported url scheme {scheme!r}")
                raise Failure(f"refused: redirect to a {scheme!r} url", STATUS_REFUSED)
            on_api = origin(url) == api
            if self.unauthorized and on_api:
                raise Failure(f"{http_reason(401, on_api)}; not requested after an earlier 401")
            response = await self.session.send(url, stream=True)
            try:
                status = response.status_code
                if status != 200:
                    await _drain(response)  # keep the connection reusable
                if response.is_redirect:
                    url = urljoin(url, response.headers["Location"])
                    if url in seen:
                        raise Failure("redirect loop")
                    seen.add(url)
                    continue
                if is_retryable(status):
                    raise Retryable(
                        f"http {status}",
                        status=status,
                        retry_after=parse_retry_after(response.headers.get("Retry-After")),
                    )
                if status == 401 and on_api:
                    self.unauthorized = True
                if status != 200:
                    raise Failure(http_reason(status, on_api))
                self.kind.check_response(response, item, row)
                return await self._receive(response, url)
            finally:
                await response.aclose()
        raise Failure(f"too many redirects (more than {MAX_REDIRECTS})")

    async def _receive(self, response: httpx.Response, url: str) -> Body:
        """Read the body under the size cap, hashing it and sniffing its first bytes."""
        cap = self.kind.max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise Failure(f"too large: {int(declared)} bytes > {cap}")
        path: str | None = None
        sink: BinaryIO
        if self.kind.spool:
            fd, path = tempfile.mkstemp(prefix=".download-", dir=self.kind.spool_dir)
            sink = os.fdopen(fd, "wb")
        else:
            sink = io.BytesIO()
        digest = hashlib.sha256()
        size = 0
        head = b""
        try:
            with sink:
                try:
                    async for chunk in response.aiter_bytes(CHUNK):
                        if len(head) < SNIFF_BYTES:  # judge the first bytes before keeping more
                            head += chunk[: SNIFF_BYTES - len(head)]
                            if len(head) == SNIFF_BYTES:
                                self.kind.check_head(head)
                        size += len(chunk)
                        if size > cap:
                            raise Failure(f"too large: more than {cap} bytes")
                        digest.update(chunk)
                        sink.write(chunk)
                except httpx.TransportError as exc:
                    raise self.session.read_error(exc, url) from None
                if len(head) < SNIFF_BYTES:
                    self.kind.check_head(head)
                data = sink.getvalue() if isinstance(sink, io.BytesIO) else None
        except BaseException:
            Body(0, "", path=path).discard()
            raise
        self.session.stats.bytes += size
        return Body(size, digest.hexdigest(), data=data, path=path)


async def _drain(response: httpx.Response, limit: int = DRAIN_BYTES) -> None:
    """Read a small non-200 body so its connection returns to the pool (a connection closed
    with unread bytes is reset); a large or broken one is left for the close."""
    declared = response.headers.get("Content-Length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return
    read = 0
    with contextlib.suppress(httpx.HTTPError):
        async for chunk in response.aiter_bytes():
            read += len(chunk)
            if read > limit:
                return


def _gave_up(exc: Retryable) -> str:
    """The reason of an item whose attempts ran out (no URL: signed URLs stay out of tables)."""
    what = {"http": f"http {exc.status}", "timeout": "timeout"}.get(exc.kind, "connection error")
    detail = f" ({exc.detail})" if exc.detail else ""
    return f"{what}: gave up after {exc.attempts} attempts{detail}"


def run_downloads(
    kind: MediaKind,
    rows: pa.Table | Iterable[Any],
    store: MediaStore,
    session: HttpSession,
    *,
    existing: pa.Table | None = None,
    concurrency: int = 8,
    log: logging.Logger | None = None,
    verify_existing: bool = True,
) -> DownloadReport:
    """Download, check and store every item of ``rows`` (see the module docstring).

    ``existing``: the kind's table of a previous run; its ok rows whose object is intact are
    carried over (re-hashed unless ``verify_existing`` is false). ``log``: any logger
    (Dagster's included) for progress (count, rate, ETA) and the closing summary.
    Raises :class:`DownloadError` (scrubbed) for errors that are not the item's fault."""
    started = time.monotonic()
    logger = log or logging.getLogger(__name__)
    items = kind.items(rows)
    previous: dict[tuple, dict[str, Any]] = {}
    if existing is not None:
        for row in existing.to_pylist():
            if row.get("status") == STATUS_OK and row.get("path") and row.get("sha256"):
                previous[tuple(row.get(c) for c in kind.key_columns)] = row
    job = _Run(kind, items, store, session, previous, concurrency, logger, verify_existing)
    asyncio.run(job.run())
    rows_out = [r for r in job.rows if r is not None]
    assert len(rows_out) == len(items), "every item gets a row"
    bad = [(item, row) for item, row in zip(items, rows_out, strict=True) if row["status"] != "ok"]
    reasons = Counter(str(row["reason"]).split(":")[0] for _, row in bad)
    quarantine = quarantine_table(
        QuarantineRecord(
            source="media",
            step=kind.step,
            table_name=kind.table_name,
            record_key=kind.record_key(item),
            reason=row["reason"],
            detail=kind.source_url(item),
            payload=kind.payload(row),
        )
        for item, row in bad
    )
    report = DownloadReport(
        table=pa.Table.from_pylist(rows_out, schema=kind.schema),
        quarantine=quarantine,
        downloaded=sum(1 for i in job.fetched if rows_out[i]["status"] == STATUS_OK),
        skipped=job.carried,
        refused=sum(1 for _, row in bad if row["status"] == STATUS_REFUSED),
        failed=sum(1 for _, row in bad if row["status"] == STATUS_FAILED),
        unverified=sum(1 for row in rows_out if row.get("sha256_verified") is False),
        lost=job.replaced["missing"],
        corrupt=job.replaced["corrupt"],
        seconds=time.monotonic() - started,
        reasons=dict(reasons.most_common()),
        http=session.stats.as_dict(),
    )
    logger.info(
        session.scrub(
            f"{kind.label}: {report.downloaded:,} downloaded, {report.skipped:,} already stored, "
            f"{report.refused:,} refused, {report.failed:,} failed {report.reasons or ''}"
            + (f", {report.unverified:,} without a release hash" if report.unverified else "")
            + (f", {report.corrupt:,} corrupt objects replaced" if report.corrupt else "")
            + f" in {report.seconds:,.1f}s ({report.http['requests']:,} requests, "
            f"{report.http['retries']:,} retries)"
        )
    )
    return report


def _session(
    base_url: str | None,
    token: str | None,
    concurrency: int,
    timeout: float,
    retry: RetryPolicy | None,
    rate_limit: float | None,
    log: logging.Logger,
    transport: httpx.AsyncBaseTransport | None,
    sleep: Sleep | None,
    label: str,
) -> HttpSession:
    return HttpSession(
        base_url or DEFAULT_BASE_URL,
        token,
        rate_limit=rate_limit or None,
        timeout=timeout,
        retry=retry or DOWNLOAD_RETRY,
        max_connections=concurrency,
        logger=log or logging.getLogger(__name__),
        user_agent=USER_AGENT,
        transport=transport,
        sleep=sleep,
        label=label,
    )


# ---------------------------------------------------------------------------------------------
# Images


def prepare_image(
    data: bytes, max_side: int = 512, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, str, int, int]:
    """Verify that ``data`` is a complete image and shrink it to ``max_side``.

    Returns (bytes to store, extension, width, height): the original bytes when no resize is
    needed, else a re-encoded JPEG (JPEG sources) or PNG. Raises `Failure` with a reason for
    non-images, unsupported formats, too many pixels (checked from the header, before any
    decoding) and truncated or corrupt data.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format or "unknown"
            width, height = probe.size
            if fmt not in IMAGE_FORMATS:
                raise Failure(f"unsupported image format {fmt}")
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise Failure(f"too many pixels: {width}x{height} (decompression bomb guard)")
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if max(width, height) <= max_side:
                return data, IMAGE_FORMATS[fmt], width, height
            if image.mode not in ("RGB", "RGBA", "L", "LA"):
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            if fmt == "JPEG":
                image.convert("RGB").save(out, format="JPEG", quality=90)
                ext = ".jpeg"
            else:
                image.save(out, format="PNG")
                ext = ".png"
            return out.getvalue(), ext, image.width, image.height
    except Failure:
        raise
    except Image.DecompressionBombError as exc:
        raise Failure(f"too many pixels (decompression bomb guard): {exc}") from None
    except Image.UnidentifiedImageError:
        raise Failure("not an image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc).lower()
        kind = "truncated image" if "truncat" in text or "premature" in text else "corrupt image"
        raise Failure(f"{kind}: {exc}") from None
    except Exception as exc:  # any other decoder failure on untrusted bytes
        raise Failure(f"corrupt image: {type(exc).__name__}") from None


class ImageKind(MediaKind):
    """Images: decode check, shrink to ``max_side``, kept in memory."""

    label = "images"
    step = "image_files"
    table_name = "images"
    schema = IMAGE_FILES_SCHEMA
    key_columns = ("imageId",)

    def __init__(
        self,
        base_url_map: Mapping[str, str] | None,
        max_side: int,
        max_bytes: int,
        max_pixels: int,
    ) -> None:
        self.base_url_map = dict(base_url_map or {})
        self.max_side = max_side
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def items(self, rows: pa.Table | Iterable[Any]) -> list[dict[str, Any]]:
        """One item per distinct non-null imageId (the first url wins)."""
        first: dict[int, str | None] = {}
        for row in _as_rows(rows, ("imageId", "url")):
            if row["imageId"] is not None:
                first.setdefault(int(row["imageId"]), row["url"])
        return [{"imageId": image_id, "url": url} for image_id, url in first.items()]

    def new_row(self, item: Mapping[str, Any]) -> dict[str, Any]:
        row = dict.fromkeys(self.schema.names)
        row.update(imageId=item["imageId"], url=strip_token(item["url"]), status=STATUS_FAILED)
        return row

    def source_url(self, item: Mapping[str, Any]) -> str | None:
        return strip_token(item["url"])

    def target(self, item: Mapping[str, Any]) -> str:
        if not item["url"]:
            raise Failure("missing url")
        return rewrite_url(item["url"], self.base_url_map)

    def finish(
        self, body: Body, item: Mapping[str, Any], row: dict[str, Any], store: MediaStore
    ) -> None:
        if not body.size or body.data is None:
            raise Failure("empty body")
        data, ext, width, height = prepare_image(body.data, self.max_side, self.max_pixels)
        stored = store.put_bytes(data, ext)
        row.update(
            sha256=stored.sha256,
            path=stored.path,
            width=width,
            height=height,
            bytes=stored.bytes,
            status=STATUS_OK,
            reason=None,
        )


def download_images(
    rows: pa.Table | Iterable[Any],
    store: MediaStore,
    base_url_map: Mapping[str, str] | None = None,
    concurrency: int = 8,
    max_side: int = 512,
    timeout: float = 30.0,
    log: logging.Logger | None = None,
    *,
    existing: pa.Table | None = None,
    max_bytes: int = DEFAULT_IMAGE_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    retry: RetryPolicy | None = None,
    rate_limit: float | None = None,
    verify_existing: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
    sleep: Sleep | None = None,
) -> DownloadReport:
    """Download, verify, shrink and store images; one ``image_files`` row per distinct imageId.

    ``rows``: (imageId, url) tuples / mappings or an Arrow table with those columns (repeated
    imageIds, e.g. one per LoRA used, are fetched once; the first url wins; rows without an
    imageId cannot be keyed and are left out). ``base_url_map`` rewrites URL prefixes before
    fetching (tables keep the original URL). ``retry`` / ``rate_limit``: the HTTP policy
    (default :data:`DOWNLOAD_RETRY`, no limit). Failures (HTTP errors after retries,
    non-images, truncated data, too many pixels, too large) get status "failed", a reason and
    a quarantine row (step ``image_files``).
    """
    kind = ImageKind(base_url_map, max_side, max_bytes, max_pixels)
    session = _session(
        None, None, concurrency, timeout, retry, rate_limit, log, transport, sleep, "images"
    )
    return run_downloads(
        kind,
        rows,
        store,
        session,
        existing=existing,
        concurrency=concurrency,
        log=log,
        verify_existing=verify_existing,
    )


# ---------------------------------------------------------------------------------------------
# LoRA files


def _expected_sha(item: Mapping[str, Any]) -> str | None:
    value = (item.get("hashSHA256") or "").strip().lower()
    return value or None


def _check_safetensors(path: str | None, size: int) -> int:
    """Validate the safetensors header of a spooled file; return its tensor count."""
    if path is None:
        raise Failure("no body")
    with open(path, "rb") as f:
        head = f.read(8)
        try:
            n = header_length(head)
        except LoraFormatError as exc:
            raise Failure(f"invalid safetensors: {exc}") from None
        if 8 + n > size:
            raise Failure("invalid safetensors: header longer than the file")
        prefix = head + f.read(n)
    try:
        header = parse_safetensors_header(prefix, file_size=size)
    except LoraFormatError as exc:
        raise Failure(f"invalid safetensors: {exc}") from None
    return len(header.tensors)


class LoraKind(MediaKind):
    """LoRA files: safetensors only, pickles refused, SHA-256 checked, spooled to disk."""

    label = "loras"
    step = "lora_files"
    table_name = "models"
    schema = LORA_FILES_SCHEMA
    key_columns = ("modelVersionId", "fileId")
    spool = True

    def __init__(self, base_url: str | None, max_bytes: int, spool_dir: str | None) -> None:
        self.base_url = base_url
        self.max_bytes = max_bytes
        self.spool_dir = spool_dir

    def items(self, rows: pa.Table | Iterable[Any]) -> list[dict[str, Any]]:
        """One item per input row."""
        return _as_rows(rows, LORA_COLUMNS)

    def new_row(self, item: Mapping[str, Any]) -> dict[str, Any]:
        row = dict.fromkeys(self.schema.names)
        row.update(
            modelVersionId=item["modelVersionId"],
            fileId=item["fileId"],
            file_name=safe_file_name(item["fileName"], f"{item['modelVersionId']}.safetensors"),
            status=STATUS_FAILED,
        )
        return row

    def source_url(self, item: Mapping[str, Any]) -> str | None:
        if item.get("downloadUrl"):
            return strip_token(item["downloadUrl"])
        try:
            return self.target(item)
        except Failure:
            return None

    def payload(self, row: Mapping[str, Any]) -> str | None:
        return payload_text({"file_name": row["file_name"]})

    def carried_row(self, previous: Mapping[str, Any], item: Mapping[str, Any]) -> dict | None:
        expected = _expected_sha(item)
        if expected is not None and expected != previous.get("sha256"):
            return None  # the release's hash changed (or was added and disagrees): fetch again
        row = {name: previous.get(name) for name in self.schema.names}
        row["sha256_verified"] = expected is not None
        return row

    def before_request(self, item: Mapping[str, Any]) -> None:
        reason = refusal_reason(file_name=item["fileName"], declared_format=item["format"])
        if reason:
            raise Failure(reason, STATUS_REFUSED)

    def target(self, item: Mapping[str, Any]) -> str:
        """The row's downloadUrl with its origin replaced by ``base_url``, or
        ``<base_url>/api/download/models/<modelVersionId>``; token parameters removed (the
        token goes in the header)."""
        url = item.get("downloadUrl")
        base_url = self.base_url
        if not url:
            if not base_url or item.get("modelVersionId") is None:
                raise Failure("missing downloadUrl")
            return f"{base_url.rstrip('/')}/api/download/models/{int(item['modelVersionId'])}"
        if base_url:
            parts, base = urlsplit(url), urlsplit(base_url)
            prefix = base.path.rstrip("/")
            url = urlunsplit((base.scheme, base.netloc, prefix + parts.path, parts.query, ""))
        return strip_token(url) or url

    def check_response(
        self, response: httpx.Response, item: Mapping[str, Any], row: dict[str, Any]
    ) -> None:
        served = content_disposition_filename(response.headers.get("Content-Disposition"))
        if served is None:
            served = posixpath.basename(urlsplit(str(response.url)).path) or None
        name = safe_file_name(served, row["file_name"])
        row["file_name"] = name
        reason = refusal_reason(file_name=name) or refusal_reason(file_name=served)
        if reason:
            raise Failure(reason, STATUS_REFUSED)

    def check_head(self, head: bytes) -> None:
        reason = refusal_reason(head=head)
        if reason:
            raise Failure(reason, STATUS_REFUSED)

    def finish(
        self, body: Body, item: Mapping[str, Any], row: dict[str, Any], store: MediaStore
    ) -> None:
        n_tensors = _check_safetensors(body.path, body.size)
        expected = _expected_sha(item)
        if expected is not None and body.sha256 != expected:
            raise Failure(f"sha256 mismatch: got {body.sha256}, the release says {expected}")
        assert body.path is not None
        stored = store.put_file(body.path, body.sha256, ".safetensors")
        row.update(
            sha256=stored.sha256,
            sha256_verified=expected is not None,
            path=stored.path,
            bytes=body.size,
            n_tensors=n_tensors,
            status=STATUS_OK,
            reason=None,
        )


def download_loras(
    rows: pa.Table | Iterable[Any],
    store: MediaStore,
    base_url: str | None = None,
    token: str | None = None,
    concurrency: int = 4,
    max_bytes: int = DEFAULT_LORA_MAX_BYTES,
    log: logging.Logger | None = None,
    *,
    existing: pa.Table | None = None,
    timeout: float = 60.0,
    retry: RetryPolicy | None = None,
    rate_limit: float | None = None,
    verify_existing: bool = True,
    spool_dir: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    sleep: Sleep | None = None,
) -> DownloadReport:
    """Download, check and store the PRIMARY LoRA files; one ``lora_files`` row per input row.

    ``rows``: (modelVersionId, fileId, fileName, format, hashSHA256, downloadUrl) tuples /
    mappings or an Arrow table with those columns. ``base_url`` is the API origin: it replaces
    the origin of each downloadUrl (e.g. a local server) and is the only origin that gets the
    token; the ``/api/download/models/{id}`` answer's redirect is followed. Refused (status
    "refused"; nothing is kept or parsed): PickleTensor declarations (not even requested),
    .ckpt/.pt/.pth/.bin/.pkl names (declared or served), pickle or zip content, redirects off
    http(s). Failed: HTTP errors (after retries where retryable), bodies over ``max_bytes``
    (streaming stops there), invalid safetensors headers, a SHA-256 different from
    ``hashSHA256``. Rows without ``hashSHA256`` are stored unverified (module docstring).
    """
    kind = LoraKind(base_url, max_bytes, spool_dir)
    session = _session(
        base_url, token, concurrency, timeout, retry, rate_limit, log, transport, sleep, "loras"
    )
    return run_downloads(
        kind,
        rows,
        store,
        session,
        existing=existing,
        concurrency=concurrency,
        log=log,
        verify_existing=verify_existing,
    )
