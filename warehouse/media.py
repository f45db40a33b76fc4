"""Media files: a content-addressed store on the lake, and the image / LoRA downloaders.

Store layout (on the `Lake`'s filesystem, local or S3)::

    <lake root>/media/sha256/<ab>/<cd>/<sha256><ext>      ab, cd = first two byte pairs

Objects are written once, atomically (local: temp file in the same folder + ``os.replace``;
S3: one PUT), and never rewritten: putting the same bytes again is a no-op.

`download_images` fetches image URLs (an optional prefix rewrite maps the real hosts to a local
server), verifies each body decodes as an image (Pillow ``verify()`` then ``load()``, pixel
count capped before decoding), shrinks it to ``max_side`` and stores it. `download_loras`
follows Civitai's ``/api/download/models/{id}`` redirect, refuses pickle formats by declared
format, by file name and by content sniffing (`ml.lora_format`) — a refused body is never
parsed, let alone unpickled — validates the safetensors header, checks the SHA-256 against the
release and caps the size while streaming. Both return an Arrow table with one row per input
item (``status`` ok / refused / failed, and a ``reason``), plus quarantine rows for every
item that is not ok: nothing is dropped silently. Both resume: items stored according to an
``existing`` table (whose object is still in the store) are carried over, not downloaded.

The API token travels only in the ``Authorization: Bearer`` header of requests to the API's
own origin (never to the redirect target); URLs recorded in tables have any ``token`` query
parameter removed, and every reason and log line has the token replaced by ``***``.
No Dagster imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import posixpath
import re
import secrets
import tempfile
import time
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any
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
from warehouse.duck import quote
from warehouse.lake import Lake
from warehouse.progress import Progress

MEDIA_PREFIX = "media/sha256"
STATUS_OK = "ok"
STATUS_REFUSED = "refused"
STATUS_FAILED = "failed"
USER_AGENT = "imagegem-pipeline/0.1 (+media downloader)"
RETRY_STATUSES: frozenset[int] = frozenset({429, 499, 500, 502, 503, 504})
MAX_REDIRECTS = 5
CHUNK = 64 * 1024

IMAGE_FILES_SCHEMA = pa.schema(
    [
        pa.field("imageId", pa.int64()),
        pa.field("url", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("path", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
    ]
)
IMAGE_QUARANTINE_SCHEMA = pa.schema(
    [pa.field("imageId", pa.int64()), pa.field("url", pa.string()), pa.field("reason", pa.string())]
)
LORA_FILES_SCHEMA = pa.schema(
    [
        pa.field("modelVersionId", pa.int64()),
        pa.field("fileId", pa.int64()),
        pa.field("file_name", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("path", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("n_tensors", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
    ]
)
LORA_QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("modelVersionId", pa.int64()),
        pa.field("fileId", pa.int64()),
        pa.field("file_name", pa.string()),
        pa.field("url", pa.string()),
        pa.field("reason", pa.string()),
    ]
)

_EXT = re.compile(r"^\.[a-z0-9]{1,12}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_TOKEN_PARAM = re.compile(r"([?&])(?:token|api_key|apikey)=[^&#]*&?", re.I)


# ---------------------------------------------------------------------------------------------
# Content-addressed store


@dataclass(frozen=True)
class StoredObject:
    """One object of the store."""

    sha256: str  # lowercase hex
    path: str  # full path (or URL) on the lake's filesystem
    bytes: int
    created: bool  # False when the same content was already stored


class MediaStore:
    """Content-addressed files under ``<lake root>/media/sha256`` on the lake's filesystem."""

    def __init__(self, lake: Lake, prefix: str = MEDIA_PREFIX) -> None:
        self.lake = lake
        self.fs = lake.fs
        self.root = posixpath.join(lake.root, prefix.strip("/"))

    def __repr__(self) -> str:
        return f"MediaStore({self.root!r})"

    def path_for(self, sha256: str, ext: str) -> str:
        """Where the object with this digest and extension lives."""
        digest = sha256.lower()
        if not _SHA.match(digest):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        if not _EXT.match(ext):
            raise ValueError(f"bad extension {ext!r} (expected like '.jpeg')")
        return posixpath.join(self.root, digest[:2], digest[2:4], digest + ext)

    def exists(self, path: str) -> bool:
        """True when ``path`` (as returned by `path_for` / `put_*`) is stored."""
        try:
            return bool(self.fs.exists(path))
        except OSError:
            return False

    def read_bytes(self, path: str) -> bytes:
        """The bytes of a stored object."""
        with self.fs.open(path, "rb") as f:
            return f.read()

    def put_bytes(self, data: bytes, ext: str) -> StoredObject:
        """Store ``data`` (idempotent); return where it is."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path_for(digest, ext)
        if self.exists(path):
            return StoredObject(digest, path, len(data), created=False)
        if self.lake.remote:
            self.fs.pipe_file(path, data)  # one PUT: atomic on object stores
        else:
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(temp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
        return StoredObject(digest, path, len(data), created=True)

    def put_file(self, local_path: str | os.PathLike[str], sha256: str, ext: str) -> StoredObject:
        """Store a local file whose digest the caller computed (idempotent). The local file is
        moved (same filesystem) or copied; the caller may delete it afterwards."""
        path = self.path_for(sha256, ext)
        size = os.path.getsize(local_path)
        if self.exists(path):
            return StoredObject(sha256.lower(), path, size, created=False)
        if self.lake.remote:
            self.fs.put_file(os.fspath(local_path), path)
        else:
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            temp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}")
            try:
                with open(local_path, "rb") as src, open(temp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(temp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
        return StoredObject(sha256.lower(), path, size, created=True)


# ---------------------------------------------------------------------------------------------
# Helpers: URLs, names, tokens


def rewrite_url(url: str, base_url_map: Mapping[str, str] | None) -> str:
    """Apply the first matching prefix rewrite (e.g. the image CDN → a local server)."""
    for prefix, target in (base_url_map or {}).items():
        if url.startswith(prefix):
            return target.rstrip("/") + "/" + url[len(prefix) :].lstrip("/")
    return url


def strip_token(url: str | None) -> str | None:
    """``url`` without ``token`` / ``api_key`` query parameters (for tables and logs)."""
    if url is None:
        return None
    cleaned = _TOKEN_PARAM.sub(lambda m: m.group(1), url)
    return cleaned.rstrip("?&")


def _scrub(text: str, token: str | None) -> str:
    text = _TOKEN_PARAM.sub(lambda m: m.group(1), text)
    if token:
        text = text.replace(token, "***")
    return text


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


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


def _http_error(status: int) -> str:
    return f"http {status}"


class _Failure(Exception):
    """A per-item failure with a reason for the table (status failed or refused)."""

    def __init__(self, reason: str, status: str = STATUS_FAILED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _make_client(concurrency: int, timeout: float) -> httpx.Client:
    return httpx.Client(
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        limits=httpx.Limits(
            max_connections=max(1, concurrency), max_keepalive_connections=max(1, concurrency)
        ),
        headers={"User-Agent": USER_AGENT},
    )


@contextlib.contextmanager
def _stream_with_retries(
    client: httpx.Client,
    url: str,
    headers: Mapping[str, str],
    retries: int,
    backoff: float,
) -> Iterator[httpx.Response]:
    """A streamed GET of ``url``; the request is retried (exponential backoff, honouring
    ``Retry-After`` up to 30 s) on 429 / 499 / 5xx answers, timeouts and connection errors.
    Transport errors while the caller reads the body become a `_Failure`."""
    attempt = 0
    while True:
        try:
            request = client.build_request("GET", url, headers=dict(headers))
            response = client.send(request, stream=True, follow_redirects=False)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            if attempt >= retries:
                raise _Failure(f"{_transport_kind(exc)}: {type(exc).__name__}") from None
            wait = backoff * 2**attempt
        else:
            if response.status_code not in RETRY_STATUSES or attempt >= retries:
                break
            wait = _retry_after(response.headers.get("Retry-After"), backoff * 2**attempt)
            response.close()
        attempt += 1
        time.sleep(min(wait, 30.0))
    try:
        yield response
    except (httpx.TimeoutException, httpx.TransportError) as exc:
        raise _Failure(f"{_transport_kind(exc)} while reading: {type(exc).__name__}") from None
    finally:
        response.close()


def _transport_kind(exc: Exception) -> str:
    return "timeout" if isinstance(exc, httpx.TimeoutException) else "connection error"


def _retry_after(value: str | None, default: float) -> float:
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default


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


def _carried(
    existing: pa.Table | None, key: Sequence[str], store: MediaStore
) -> dict[tuple, dict[str, Any]]:
    """Rows of a previous run whose object is still stored, by key."""
    if existing is None or existing.num_rows == 0:
        return {}
    out: dict[tuple, dict[str, Any]] = {}
    for row in existing.to_pylist():
        if row.get("status") == STATUS_OK and row.get("path") and store.exists(row["path"]):
            out[tuple(row[k] for k in key)] = row
    return out


# ---------------------------------------------------------------------------------------------
# Images

IMAGE_FORMATS: dict[str, str] = {"JPEG": ".jpeg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_IMAGE_MAX_BYTES = 50 * 1024 * 1024


@dataclass
class ImageFilesReport:
    """What `download_images` did: the ``image_files`` rows and the quarantine rows."""

    table: pa.Table  # IMAGE_FILES_SCHEMA, one row per distinct imageId
    quarantine: pa.Table  # IMAGE_QUARANTINE_SCHEMA, one row per failed image
    downloaded: int = 0  # fetched and stored in this run
    skipped: int = 0  # carried over from `existing`
    failed: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


def prepare_image(
    data: bytes, max_side: int = 512, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, str, int, int]:
    """Verify that ``data`` is a complete image and shrink it to ``max_side``.

    Returns (bytes to store, extension, width, height): the original bytes when no resize is
    needed, else a re-encoded JPEG (JPEG sources) or PNG. Raises `_Failure` with a reason for
    non-images, unsupported formats, too many pixels (checked from the header, before any
    decoding) and truncated or corrupt data.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format or "unknown"
            width, height = probe.size
            if fmt not in IMAGE_FORMATS:
                raise _Failure(f"unsupported image format {fmt}")
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise _Failure(f"too many pixels: {width}x{height} (decompression bomb guard)")
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
    except _Failure:
        raise
    except Image.DecompressionBombError as exc:
        raise _Failure(f"too many pixels (decompression bomb guard): {exc}") from None
    except Image.UnidentifiedImageError:
        raise _Failure("not an image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc).lower()
        kind = "truncated image" if "truncat" in text or "premature" in text else "corrupt image"
        raise _Failure(f"{kind}: {exc}") from None
    except Exception as exc:  # any other decoder failure on untrusted bytes
        raise _Failure(f"corrupt image: {type(exc).__name__}") from None


def _read_body(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _Failure(f"too large: {int(declared)} bytes > {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes(CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise _Failure(f"too large: more than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _fetch_image(
    client: httpx.Client,
    image_id: int,
    url: str | None,
    store: MediaStore,
    base_url_map: Mapping[str, str] | None,
    max_side: int,
    max_bytes: int,
    max_pixels: int,
    retries: int,
    backoff: float,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "imageId": image_id,
        "url": strip_token(url),
        "sha256": None,
        "path": None,
        "width": None,
        "height": None,
        "bytes": None,
        "status": STATUS_FAILED,
        "reason": None,
    }
    try:
        if not url:
            raise _Failure("missing url")
        target = rewrite_url(url, base_url_map)
        if urlsplit(target).scheme not in ("http", "https"):
            raise _Failure(f"unsupported url scheme {urlsplit(target).scheme!r}")
        for _ in range(MAX_REDIRECTS + 1):
            with _stream_with_retries(client, target, {}, retries, backoff) as response:
                if response.is_redirect and "Location" in response.headers:
                    target = urljoin(target, response.headers["Location"])
                    continue
                if response.status_code != 200:
                    raise _Failure(_http_error(response.status_code))
                data = _read_body(response, max_bytes)
                break
        else:
            raise _Failure("too many redirects")
        if not data:
            raise _Failure("empty body")
        stored_bytes, ext, width, height = prepare_image(data, max_side, max_pixels)
        stored = store.put_bytes(stored_bytes, ext)
        row.update(
            sha256=stored.sha256,
            path=stored.path,
            width=width,
            height=height,
            bytes=stored.bytes,
            status=STATUS_OK,
        )
    except _Failure as failure:
        row.update(status=failure.status, reason=failure.reason)
    except httpx.HTTPError as exc:
        row.update(reason=f"http error: {type(exc).__name__}")
    return row


def download_images(
    rows: pa.Table | Iterable[Any],
    store: MediaStore,
    base_url_map: Mapping[str, str] | None = None,
    concurrency: int = 8,
    max_side: int = 512,
    timeout: float = 30.0,
    log: logging.Logger | Any | None = None,
    *,
    existing: pa.Table | None = None,
    max_bytes: int = DEFAULT_IMAGE_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    retries: int = 2,
    backoff: float = 0.5,
    client: httpx.Client | None = None,
) -> ImageFilesReport:
    """Download, verify, shrink and store images; one ``image_files`` row per distinct imageId.

    ``rows``: (imageId, url) tuples / mappings or an Arrow table with those columns (repeated
    imageIds, e.g. one per LoRA used, are fetched once; the first url wins). ``base_url_map``
    rewrites URL prefixes before fetching (tables keep the original URL). ``existing``: a
    previous ``image_files`` table; its ok rows whose object is still stored are carried over
    without a request. Failures (HTTP errors after retries, non-images, truncated data, too
    many pixels, too large) get status "failed", a reason, and a quarantine row.
    """
    started = time.monotonic()
    logger = log or logging.getLogger(__name__)
    items: dict[int, str | None] = {}
    for row in _as_rows(rows, ("imageId", "url")):
        image_id = row["imageId"]
        if image_id is None:
            continue
        items.setdefault(int(image_id), row["url"])
    carried = _carried(existing, ("imageId",), store)
    results: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for image_id in items:
        previous = carried.get((image_id,))
        if previous is not None:
            results[image_id] = {name: previous.get(name) for name in IMAGE_FILES_SCHEMA.names}
        else:
            todo.append(image_id)
    progress = Progress("images", len(todo), logger)
    own_client = client is None
    http = client or _make_client(concurrency, timeout)
    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = {
                pool.submit(
                    _fetch_image,
                    http,
                    image_id,
                    items[image_id],
                    store,
                    base_url_map,
                    max_side,
                    max_bytes,
                    max_pixels,
                    retries,
                    backoff,
                ): image_id
                for image_id in todo
            }
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                progress.advance(1)
    finally:
        if own_client:
            http.close()
    ordered = [results[image_id] for image_id in items]
    failures = [r for r in ordered if r["status"] != STATUS_OK]
    reasons: dict[str, int] = {}
    for r in failures:
        key = str(r["reason"]).split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    report = ImageFilesReport(
        table=pa.Table.from_pylist(ordered, schema=IMAGE_FILES_SCHEMA),
        quarantine=pa.Table.from_pylist(
            [{"imageId": r["imageId"], "url": r["url"], "reason": r["reason"]} for r in failures],
            schema=IMAGE_QUARANTINE_SCHEMA,
        ),
        downloaded=sum(1 for i in todo if results[i]["status"] == STATUS_OK),
        skipped=len(items) - len(todo),
        failed=len(failures),
        seconds=time.monotonic() - started,
        reasons=reasons,
    )
    logger.info(
        f"images: {report.downloaded:,} downloaded, {report.skipped:,} already stored, "
        f"{report.failed:,} quarantined {reasons or ''} in {report.seconds:,.1f}s"
    )
    return report


# ---------------------------------------------------------------------------------------------
# LoRA files

LORA_COLUMNS: tuple[str, ...] = (
    "modelVersionId",
    "fileId",
    "fileName",
    "format",
    "hashSHA256",
    "downloadUrl",
)
DEFAULT_LORA_MAX_BYTES = 2 * 1024**3
SNIFF_BYTES = 16


@dataclass
class LoraFilesReport:
    """What `download_loras` did: the ``lora_files`` rows and the quarantine rows."""

    table: pa.Table  # LORA_FILES_SCHEMA, one row per input row
    quarantine: pa.Table  # LORA_QUARANTINE_SCHEMA, one row per refused / failed file
    downloaded: int = 0
    skipped: int = 0
    refused: int = 0
    failed: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


def _download_url(row: Mapping[str, Any], base_url: str | None) -> str:
    """The URL to request: the row's downloadUrl with its origin replaced by ``base_url``, or
    ``<base_url>/api/download/models/<modelVersionId>``; any ``token`` parameter removed."""
    url = row.get("downloadUrl")
    if not url:
        if not base_url or row.get("modelVersionId") is None:
            raise _Failure("missing downloadUrl")
        return f"{base_url.rstrip('/')}/api/download/models/{int(row['modelVersionId'])}"
    if base_url:
        parts, base = urlsplit(url), urlsplit(base_url)
        prefix = base.path.rstrip("/")
        url = urlunsplit((base.scheme, base.netloc, prefix + parts.path, parts.query, ""))
    return strip_token(url) or url  # the token goes in the header, never in a logged URL


def _fetch_lora(
    client: httpx.Client,
    row: Mapping[str, Any],
    store: MediaStore,
    base_url: str | None,
    token: str | None,
    max_bytes: int,
    retries: int,
    backoff: float,
    spool_dir: str | None,
) -> tuple[dict[str, Any], str | None]:
    """Download one LoRA file. Returns its ``lora_files`` row and the (token-free) URL."""
    declared_name = row.get("fileName")
    out: dict[str, Any] = {
        "modelVersionId": row.get("modelVersionId"),
        "fileId": row.get("fileId"),
        "file_name": safe_file_name(declared_name, f"{row.get('modelVersionId')}.safetensors"),
        "sha256": None,
        "path": None,
        "bytes": None,
        "n_tensors": None,
        "status": STATUS_FAILED,
        "reason": None,
    }
    url_for_table = strip_token(row.get("downloadUrl"))
    temp_path: str | None = None
    try:
        reason = refusal_reason(file_name=declared_name, declared_format=row.get("format"))
        if reason:
            raise _Failure(reason, STATUS_REFUSED)
        target = _download_url(row, base_url)
        url_for_table = strip_token(url_for_table or target)
        api_origin = _origin(target)
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(target).scheme not in ("http", "https"):
                raise _Failure(f"unsupported url scheme {urlsplit(target).scheme!r}")
            headers = (
                {"Authorization": f"Bearer {token}"}
                if token and _origin(target) == api_origin
                else {}
            )
            with _stream_with_retries(client, target, headers, retries, backoff) as response:
                if response.is_redirect and "Location" in response.headers:
                    target = urljoin(target, response.headers["Location"])
                    continue
                if response.status_code != 200:
                    raise _Failure(_http_error(response.status_code))
                served = content_disposition_filename(response.headers.get("Content-Disposition"))
                if served is None:
                    served = posixpath.basename(urlsplit(target).path) or None
                name = safe_file_name(served, out["file_name"])
                out["file_name"] = name
                reason = refusal_reason(file_name=name) or refusal_reason(file_name=served)
                if reason:
                    raise _Failure(reason, STATUS_REFUSED)
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise _Failure(f"too large: {int(declared)} bytes > {max_bytes}")
                fd, temp_path = tempfile.mkstemp(prefix=".lora-", dir=spool_dir)
                digest = hashlib.sha256()
                size = 0
                head = b""
                with os.fdopen(fd, "wb") as spool:
                    for chunk in response.iter_bytes(CHUNK):
                        if len(head) < SNIFF_BYTES:  # refuse before keeping any pickle bytes
                            head += chunk[: SNIFF_BYTES - len(head)]
                            if len(head) == SNIFF_BYTES:
                                _refuse_content(head)
                        size += len(chunk)
                        if size > max_bytes:
                            raise _Failure(f"too large: more than {max_bytes} bytes")
                        digest.update(chunk)
                        spool.write(chunk)
                if len(head) < SNIFF_BYTES:
                    _refuse_content(head)
                break
        else:
            raise _Failure("too many redirects")
        n_tensors = _check_safetensors(temp_path, size)
        sha = digest.hexdigest()
        expected = (row.get("hashSHA256") or "").strip().lower()
        if not expected:
            raise _Failure("no expected sha256 in the release row")
        if sha != expected:
            raise _Failure("sha256 mismatch")
        stored = store.put_file(temp_path, sha, ".safetensors")
        out.update(
            sha256=stored.sha256,
            path=stored.path,
            bytes=size,
            n_tensors=n_tensors,
            status=STATUS_OK,
        )
    except _Failure as failure:
        out.update(status=failure.status, reason=_scrub(failure.reason, token))
    except httpx.HTTPError as exc:
        out.update(reason=f"http error: {type(exc).__name__}")
    finally:
        if temp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_path)
    return out, url_for_table


def _refuse_content(head: bytes) -> None:
    reason = refusal_reason(head=head)
    if reason:
        raise _Failure(reason, STATUS_REFUSED)


def _check_safetensors(path: str | None, size: int) -> int:
    """Validate the safetensors header of a spooled file; return its tensor count."""
    if path is None:
        raise _Failure("no body")
    with open(path, "rb") as f:
        head = f.read(8)
        try:
            n = header_length(head)
        except LoraFormatError as exc:
            raise _Failure(f"invalid safetensors: {exc}") from None
        if 8 + n > size:
            raise _Failure("invalid safetensors: header longer than the file")
        prefix = head + f.read(n)
    try:
        header = parse_safetensors_header(prefix, file_size=size)
    except LoraFormatError as exc:
        raise _Failure(f"invalid safetensors: {exc}") from None
    return len(header.tensors)


def download_loras(
    rows: pa.Table | Iterable[Any],
    store: MediaStore,
    base_url: str | None = None,
    token: str | None = None,
    concurrency: int = 4,
    max_bytes: int = DEFAULT_LORA_MAX_BYTES,
    log: logging.Logger | Any | None = None,
    *,
    existing: pa.Table | None = None,
    timeout: float = 60.0,
    retries: int = 2,
    backoff: float = 0.5,
    client: httpx.Client | None = None,
    spool_dir: str | None = None,
) -> LoraFilesReport:
    """Download, check and store the PRIMARY LoRA files; one ``lora_files`` row per input row.

    ``rows``: (modelVersionId, fileId, fileName, format, hashSHA256, downloadUrl) tuples /
    mappings or an Arrow table with those columns. ``base_url`` replaces the origin of each
    downloadUrl (e.g. a local server); the ``/api/download/models/{id}`` answer's redirect is
    followed (token only sent to the API origin). Refused (status "refused"; the download stops
    at the first chunk and nothing is kept or parsed): PickleTensor declarations (not even
    requested), .ckpt/.pt/.pth/.bin/.pkl names (declared or served), pickle or zip content. Failed: HTTP errors, bodies over ``max_bytes`` (streaming
    stops there), invalid safetensors headers, SHA-256 different from ``hashSHA256``.
    ``existing``: a previous ``lora_files`` table, whose ok rows still stored are carried over.
    """
    started = time.monotonic()
    logger = log or logging.getLogger(__name__)
    items = _as_rows(rows, LORA_COLUMNS)
    carried = _carried(existing, ("modelVersionId", "fileId"), store)
    results: list[dict[str, Any] | None] = [None] * len(items)
    urls: list[str | None] = [strip_token(r.get("downloadUrl")) for r in items]
    todo: list[int] = []
    for i, row in enumerate(items):
        previous = carried.get((row["modelVersionId"], row["fileId"]))
        if previous is not None:
            results[i] = {name: previous.get(name) for name in LORA_FILES_SCHEMA.names}
        else:
            todo.append(i)
    progress = Progress("loras", len(todo), logger)
    own_client = client is None
    http = client or _make_client(concurrency, timeout)
    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = {
                pool.submit(
                    _fetch_lora,
                    http,
                    items[i],
                    store,
                    base_url,
                    token,
                    max_bytes,
                    retries,
                    backoff,
                    spool_dir,
                ): i
                for i in todo
            }
            for future in as_completed(futures):
                i = futures[future]
                results[i], urls[i] = future.result()
                progress.advance(1)
    finally:
        if own_client:
            http.close()
    table_rows = [r for r in results if r is not None]
    bad = [(r, u) for r, u in zip(table_rows, urls, strict=True) if r["status"] != STATUS_OK]
    reasons: dict[str, int] = {}
    for r, _ in bad:
        key = str(r["reason"]).split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    report = LoraFilesReport(
        table=pa.Table.from_pylist(table_rows, schema=LORA_FILES_SCHEMA),
        quarantine=pa.Table.from_pylist(
            [
                {
                    "modelVersionId": r["modelVersionId"],
                    "fileId": r["fileId"],
                    "file_name": r["file_name"],
                    "url": u,
                    "reason": r["reason"],
                }
                for r, u in bad
            ],
            schema=LORA_QUARANTINE_SCHEMA,
        ),
        downloaded=sum(1 for i in todo if (results[i] or {}).get("status") == STATUS_OK),
        skipped=len(items) - len(todo),
        refused=sum(1 for r, _ in bad if r["status"] == STATUS_REFUSED),
        failed=sum(1 for r, _ in bad if r["status"] == STATUS_FAILED),
        seconds=time.monotonic() - started,
        reasons=reasons,
    )
    logger.info(
        _scrub(
            f"loras: {report.downloaded:,} downloaded, {report.skipped:,} already stored, "
            f"{report.refused:,} refused, {report.failed:,} failed {reasons or ''} "
            f"in {report.seconds:,.1f}s",
            token,
        )
    )
    return report


def image_url_map(
    local_base: str, hosts: Sequence[str] = ("https://image.civitai.com",)
) -> dict[str, str]:
    """A ``base_url_map`` sending the image CDN host(s) to ``local_base``."""
    return {host: local_base for host in hosts}


def images_to_download(con: Any, images_glob: str, max_images: int) -> pa.Table:
    """(imageId, url) of the clean images to fetch: whole users in userHash order while the
    running count of their images stays within ``max_images`` (a stable, resumable subset)."""
    src = f"read_parquet({quote(images_glob)})"
    return con.sql(
        f"""WITH per_user AS (SELECT userHash, count(DISTINCT imageId) AS n FROM {src} GROUP BY 1),
        chosen AS (SELECT userHash FROM (
            SELECT userHash, sum(n) OVER (ORDER BY userHash) AS running FROM per_user)
            WHERE running <= {int(max_images)})
        SELECT imageId, any_value(url) AS url FROM {src} SEMI JOIN chosen USING (userHash)
        GROUP BY imageId ORDER BY imageId"""
    ).to_arrow_table()


def loras_to_download(con: Any, loras_glob: str) -> pa.Table:
    """The primary file of every LoRA version, with what `download_loras` needs."""
    return con.sql(
        "SELECT modelVersionId, fileId, fileName, format, hashSHA256, downloadUrl "
        f"FROM read_parquet({quote(loras_glob)}) WHERE has_primary_file ORDER BY modelVersionId"
    ).to_arrow_table()
