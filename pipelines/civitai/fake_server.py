"""A local fake Civitai API v1 serving a sample release folder, with fault injection.

``FakeCivitai(sample_dir)`` reads the release parquet written by the sample generator
(``<dir>/images/*.parquet``, ``<dir>/models/*.parquet``) and serves it on 127.0.0.1 through
the shapes of the public Civitai REST API v1:

* ``GET /api/v1/models?types=LORA&limit=N&cursor=C`` (or ``page=P``, capped at page*limit ≤
  1000) — models newest-first by (latest version publishedAt, id);
* ``GET /api/v1/models/{id}`` and ``GET /api/v1/model-versions/{id}``;
* ``GET /api/v1/images?modelVersionId=V&withMeta=true&limit=N&cursor=C`` — that version's
  image rows newest-first by id; now and then an empty ``items`` page with a ``nextCursor``;
* ``GET /api/download/models/{versionId}`` → 307 to ``/files/<fileId>/<fileName>``, served
  from ``<dir>/media/loras/<fileName>``; image URLs ``/<key>/<uuid>/width=<w>/<id>.jpeg``
  served from ``<dir>/media/images/<id>.jpeg`` (404 where the media file does not exist).

Every release column can be recovered from the API objects. Representation variants are
chosen per item from a seeded hash (``allowCommercialUse`` as text / array / [] / Postgres
literal, ``primary`` absent on non-primary files, image ``nsfwLevel`` int or legacy name,
``meta`` flat or nested, ``"Clip skip": "2"`` vs ``clipSkip``, timestamps with and without
``Z``), so a crawler must handle them all. URLs in the data stay the civitai.com URLs of the
release; a media downloader maps their host to this server's URL.

Faults (``fault_rate``, ``faults``) are decided per request attempt from a seeded hash of
(request, attempt number), never more than ``max_consecutive_faults`` in a row for the same
request, and never change the data behind a cursor: retrying a request eventually gets the
same items. ``duplicate`` is a property of a cursor (the page repeats the last item of the
previous page), so retries see it too. Beyond ``rate_limit`` requests/s (measured on
``clock``, injectable) the answer is 429 with ``Retry-After``; with a ``token`` every
``/api/`` request needs ``Authorization: Bearer``.

Scripted trouble for tests, decided by counters rather than wall time: ``outage(path, query)``
may return a status to answer an ``/api/`` request with instead (an outage of one stream, a
token revoked mid-crawl); with ``hold_after=N`` every ``/api/`` request after the N-th waits,
unanswered, until :meth:`FakeCivitai.release` or ``stop()`` (a crawl frozen at a known point).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pyarrow.parquet as pq

from warehouse.schema import RELEASE_TIMESTAMP_FORMAT

log = logging.getLogger(__name__)

FAULT_KINDS: tuple[str, ...] = (
    "429",
    "503",
    "slow",
    "malformed",
    "html200",
    "html500",
    "reset",
    "duplicate",
)
TRANSIENT_FAULTS: tuple[str, ...] = tuple(k for k in FAULT_KINDS if k != "duplicate")
MODELS_MAX_LIMIT = 100
IMAGES_MAX_LIMIT = 200
PAGE_WINDOW_MAX = 1000  # page * limit beyond this: 429 "use cursors instead"
LORA_TAG = re.compile(r"<lora:([^:>]+):([-+]?\d*\.?\d+)")
IMAGE_PATH = re.compile(r"^/[^/]+/[^/]+/width=\d+/(\d+)\.jpeg$")
HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>{title}</title></head><body><h1>{title}</h1>"
    "<p>The upstream server is unavailable. Please try again in a few minutes.</p></body></html>"
)


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _iso(text: str | None, with_z: bool) -> str | None:
    """Release timestamp text → ISO 8601 (``...T..:..:...000Z`` or without ``Z``)."""
    if text is None:
        return None
    try:
        stamp = datetime.strptime(text, RELEASE_TIMESTAMP_FORMAT)
    except ValueError:
        return text  # not a timestamp: served verbatim, as a broken upstream would
    return stamp.strftime("%Y-%m-%dT%H:%M:%S") + (".000Z" if with_z else "")


def _epoch_s(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(
            (
                datetime.strptime(text, RELEASE_TIMESTAMP_FORMAT) - datetime(1970, 1, 1)
            ).total_seconds()
        )
    except ValueError:
        return None


def _bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _split(text: str | None) -> list[str]:
    return [] if not text else text.split(", ")


def _commercial(value: str | None, variant: int) -> Any:
    """allowCommercialUse in one of its wild forms."""
    parts = _split(value)
    if variant == 0:
        return value  # "Image, RentCivit" (null stays null)
    if variant == 1:
        return parts  # ["Image", "RentCivit"]; [] for null
    if variant == 2:
        return "{" + ",".join(parts) + "}"  # Postgres literal; "{}" for null
    return parts if parts else []


def _legacy_level(level: int) -> str:
    if level >= 8:
        return "X"
    if level >= 4:
        return "Mature"
    if level >= 2:
        return "Soft"
    return "None"


# ---------------------------------------------------------------------------------------------
# The data behind the API


@dataclass(frozen=True)
class View:
    """Which part of the sample is visible: versions / images with ids up to a bound."""

    max_version_id: int | None = None
    max_image_id: int | None = None

    def version(self, version_id: int) -> bool:
        return self.max_version_id is None or version_id <= self.max_version_id

    def image(self, image_id: int) -> bool:
        return self.max_image_id is None or image_id <= self.max_image_id


class SampleData:
    """A release folder turned into Civitai API objects (built once, filtered per view)."""

    def __init__(self, sample_dir: Path | str, seed: int = 0) -> None:
        self.root = Path(sample_dir)
        self.seed = seed
        model_rows = self._read("models")
        image_rows = self._read("images")
        self.versions: dict[int, dict[str, Any]] = {}
        self.version_model: dict[int, int] = {}
        self.models: dict[int, dict[str, Any]] = {}  # model item without modelVersions
        self.model_versions: dict[int, list[int]] = {}  # newest first
        self.primary_file: dict[int, dict[str, Any]] = {}
        self._build_models(model_rows)
        self.version_stem: dict[int, str] = {
            v: os.path.splitext(f["name"])[0] for v, f in self.primary_file.items() if f["name"]
        }
        self.images: dict[int, list[tuple[int, dict[str, Any]]]] = {}  # newest first
        self.image_versions: dict[int, list[int]] = {}
        self._build_images(image_rows)
        self.media = self.root / "media"

    def _read(self, table: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for path in sorted((self.root / table).glob("*.parquet")):
            rows.extend(pq.read_table(path).to_pylist())
        return rows

    def _build_models(self, rows: list[dict[str, Any]]) -> None:
        by_version: dict[int, list[dict[str, Any]]] = {}
        seen: set[tuple[int, int]] = set()
        for row in rows:
            key = (row["modelVersionId"], row["fileId"])
            if None in key or row["modelId"] is None or key in seen:
                continue  # no API object can carry a null id; exact duplicates collapse
            seen.add(key)
            by_version.setdefault(row["modelVersionId"], []).append(row)
        for version_id, files in by_version.items():
            head = next((r for r in files if r["primary"] == 1), files[0])
            model_id = head["modelId"]
            with_z = _unit(self.seed, "version-z", version_id) < 0.5
            file_objects = [self._file(r) for r in files]
            stats = {
                "downloadCount": head["downloadCount"],
                "ratingCount": head["ratingCount"],
                "rating": head["rating"],
                "thumbsUpCount": head["thumbsUpCount"],
                "thumbsDownCount": head["thumbsDownCount"],
            }
            version = {
                "id": version_id,
                "modelId": model_id,
                "name": head["modelVersionName"],
                "description": head["modelVersionDescription"],
                "baseModel": head["baseModel"],
                "baseModelType": head["baseModelType"],
                "nsfwLevel": head["modelVersionNsfwLevel"],
                "publishedAt": _iso(head["publishedAt"], with_z),
                "availability": head["availability"],
                "trainedWords": _split(head["trainedWords"]),
                "stats": stats,
                "downloadUrl": head["downloadUrl"],
                "files": file_objects,
                "_sort": _epoch_s(head["publishedAt"]),
            }
            self.versions[version_id] = version
            self.version_model[version_id] = model_id
            primary = next((f for f in file_objects if f.get("primary")), file_objects[0])
            self.primary_file[version_id] = primary
            self.model_versions.setdefault(model_id, []).append(version_id)
            if model_id not in self.models:
                self.models[model_id] = self._model(head)
        for version_ids in self.model_versions.values():
            version_ids.sort(reverse=True)

    def _file(self, row: dict[str, Any]) -> dict[str, Any]:
        file_id = row["fileId"]
        with_z = _unit(self.seed, "file-z", file_id) < 0.5
        metadata = {k: row[k] for k in ("fp", "format") if row[k] is not None}
        hashes = {
            kind: row[f"hash{kind}"]
            for kind in ("AutoV1", "AutoV2", "SHA256", "CRC32", "BLAKE3")
            if row[f"hash{kind}"] is not None
        }
        file: dict[str, Any] = {
            "id": file_id,
            "name": row["fileName"],
            "sizeKB": None if row["sizeKB"] is None else float(row["sizeKB"]),
            "type": row["fileType"],
            "metadata": metadata,
            "hashes": hashes,
            "pickleScanResult": row["pickleScanResult"],
            "pickleScanMessage": row["pickleScanMessage"],
            "virusScanResult": row["virusScanResult"],
            "scannedAt": _iso(row["scannedAt"], with_z),
            "downloadUrl": row["downloadUrl"],
        }
        if row["primary"] == 1:
            file["primary"] = True  # absent on the other files
        return file

    def _model(self, row: dict[str, Any]) -> dict[str, Any]:
        model_id = row["modelId"]
        variant = int(_unit(self.seed, "commercial", model_id) * 4)
        level = row["modelNsfwLevel"]
        return {
            "id": model_id,
            "name": row["modelName"],
            "description": row["modelDescription"],
            "type": row["modelType"],
            "nsfw": None if level is None else level > 1,
            "nsfwLevel": level,
            "poi": _bool(row["poi"]),
            "minor": _bool(row["minor"]),
            "availability": row["availability"],
            "allowNoCredit": _bool(row["allowNoCredit"]),
            "allowCommercialUse": _commercial(row["allowCommercialUse"], variant),
            "allowDerivatives": _bool(row["allowDerivatives"]),
            "allowDifferentLicense": _bool(row["allowDifferentLicense"]),
            "cosmetic": row["cosmetic"],
            "creator": {"username": row["userHash"], "image": None},
            "tags": _split(row["tags"]),
        }

    def _build_images(self, rows: list[dict[str, Any]]) -> None:
        seen: set[tuple[int, int]] = set()
        for row in rows:
            key = (row["imageId"], row["modelVersionId"])
            if None in key or key in seen or key[1] not in self.versions:
                continue
            seen.add(key)
            self.image_versions.setdefault(key[0], []).append(key[1])
            self.images.setdefault(key[1], []).append((key[0], self._image(row)))
        for entries in self.images.values():
            entries.sort(key=lambda e: -e[0])

    def _image(self, row: dict[str, Any]) -> dict[str, Any]:
        image_id = row["imageId"]
        u = _unit(self.seed, "image", image_id, row["modelVersionId"])
        level = row["browsingLevel"]
        a1111 = _unit(self.seed, "a1111", image_id) < 0.5
        meta: dict[str, Any] = {}
        for key in ("prompt", "negativePrompt", "seed", "steps", "sampler", "cfgScale", "comfy"):
            if row[key] is not None:
                meta[key] = row[key]
        for column, a1111_key in (
            ("clipSkip", "Clip skip"),
            ("hiresUpscale", "Hires upscale"),
            ("denoisingStrength", "Denoising strength"),
        ):
            if row[column] is not None:
                if a1111:
                    meta[a1111_key] = str(row[column])
                else:
                    meta[column if column == "clipSkip" else a1111_key] = row[column]
        if row["hiresUpscaler"] is not None:
            meta["Hires upscaler"] = row["hiresUpscaler"]
        if row["width"] is not None and row["height"] is not None:
            meta["Size"] = f"{row['width']}x{row['height']}"
        return {
            "id": image_id,
            "url": row["url"],
            "hash": row["hash"],
            "width": row["width"],
            "height": row["height"],
            "nsfw": _bool(row["nsfw"]),
            "nsfwLevel": level if (level is None or u < 0.5) else _legacy_level(level),
            "browsingLevel": level,
            "createdAt": _iso(row["createdAt"], _unit(self.seed, "image-z", image_id) < 0.5),
            "postId": row["postId"],
            "type": row["type"],
            "stats": {
                k: row[k]
                for k in (
                    "cryCount",
                    "laughCount",
                    "likeCount",
                    "dislikeCount",
                    "heartCount",
                    "commentCount",
                )
            },
            "username": row["userHash"],
            "baseModel": self.versions[row["modelVersionId"]]["baseModel"],
            "_meta": meta,
            "_nested": _unit(self.seed, "nested", image_id) < 0.3,
        }

    # -- rendering for a view ---------------------------------------------------------------
    def version_object(self, version_id: int, with_model: bool = False) -> dict[str, Any]:
        """The API version object (``with_model``: plus ``model{name,type,nsfw,poi}``)."""
        version = {k: v for k, v in self.versions[version_id].items() if not k.startswith("_")}
        if with_model:
            model = self.models[self.version_model[version_id]]
            version["model"] = {k: model[k] for k in ("name", "type", "nsfw", "poi")}
        return version

    def model_item(self, model_id: int, view: View) -> dict[str, Any] | None:
        """The ``/models`` item with the versions ``view`` shows (None when none)."""
        ids = [v for v in self.model_versions.get(model_id, []) if view.version(v)]
        if not ids:
            return None
        versions = [self.version_object(v) for v in ids]
        item = dict(self.models[model_id])
        item["stats"] = {
            key: sum((v["stats"][key] or 0) for v in versions)
            for key in ("downloadCount", "thumbsUpCount", "thumbsDownCount", "ratingCount")
        }
        ratings = [v["stats"]["rating"] for v in versions if v["stats"]["rating"] is not None]
        item["stats"]["rating"] = max(ratings) if ratings else 0
        item["modelVersions"] = versions
        return item

    def model_sort(self, model_id: int, view: View) -> tuple[int, int]:
        """Newest-first key: (latest visible version publishedAt in epoch s, model id)."""
        stamps = [
            self.versions[v]["_sort"]
            for v in self.model_versions.get(model_id, [])
            if view.version(v) and self.versions[v]["_sort"] is not None
        ]
        return (max(stamps) if stamps else 0, model_id)

    def image_item(
        self, version_id: int, entry: dict[str, Any], view: View, with_meta: bool
    ) -> dict[str, Any]:
        """The ``/images`` item of one image row (meta null unless ``with_meta``)."""
        item = {k: v for k, v in entry.items() if not k.startswith("_")}
        if not with_meta:
            item["meta"] = None
            return item
        meta = dict(entry["_meta"])
        resources = []
        weights = {m.group(1): float(m.group(2)) for m in LORA_TAG.finditer(meta.get("prompt", ""))}
        for other in self.image_versions.get(entry["id"], []):
            if not view.version(other):
                continue
            resource: dict[str, Any] = {"type": "lora", "modelVersionId": other}
            stem = self.version_stem.get(other)
            if stem in weights:
                resource["weight"] = weights[stem]
            resources.append(resource)
        meta["civitaiResources"] = resources
        item["meta"] = {"id": entry["id"], "meta": meta} if entry["_nested"] else meta
        return item


# ---------------------------------------------------------------------------------------------
# The server


class _Reply(Exception):
    """Raised inside a handler to answer with a status and a JSON error body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _TokenBucket:
    """``rate`` tokens per second of ``clock``, bursts up to ``capacity``."""

    def __init__(
        self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.capacity, self.clock = rate, capacity, clock
        self.tokens, self.stamp = capacity, clock()
        self.lock = threading.Lock()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        with self.lock:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate


class FakeCivitai:
    """The fake Civitai HTTP server (use :func:`serve_sample` or ``start()``/``stop()``)."""

    def __init__(
        self,
        sample_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_limit: float | None = None,
        fault_rate: float = 0.0,
        faults: Sequence[str] = FAULT_KINDS,
        token: str | None = None,
        seed: int = 0,
        retry_after: float = 1.0,
        slow_seconds: float = 5.0,
        empty_page_rate: float = 0.15,
        max_consecutive_faults: int = 3,
        view: View | None = None,
        clock: Callable[[], float] = time.monotonic,
        outage: Callable[[str, dict[str, str]], int | None] | None = None,
        hold_after: int | None = None,
    ) -> None:
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError("fault_rate must be in [0, 1]")
        self.data = SampleData(sample_dir, seed)
        self.host, self.port = host, port
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        self.transient = tuple(k for k in self.faults if k in TRANSIENT_FAULTS)
        self.token = token
        self.seed = seed
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.empty_page_rate = empty_page_rate
        self.max_consecutive_faults = max_consecutive_faults
        self.view = view or View()
        self.clock = clock
        self.outage = outage
        self.hold_after = hold_after
        self.bucket = self._bucket(rate_limit)
        self.rate_limit = rate_limit
        self.stats: Counter[str] = Counter()
        self._attempts: Counter[str] = Counter()
        self._consecutive: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._sorted: tuple[View, list[tuple[tuple[int, int], int]]] | None = None

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:PORT``) once started."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeCivitai:
        """Bind and serve in a background thread."""
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (slow and held responses in flight are cut short)."""
        self._stopping.set()
        self._released.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeCivitai:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_view(self, max_version_id: int | None = None, max_image_id: int | None = None) -> None:
        """Serve only versions/images with ids up to these bounds (None: everything)."""
        self.view = View(max_version_id, max_image_id)

    def _bucket(self, rate_limit: float | None) -> _TokenBucket | None:
        return _TokenBucket(rate_limit, max(1.0, rate_limit), self.clock) if rate_limit else None

    def release(self) -> None:
        """Answer the requests held by ``hold_after`` and hold no more."""
        self.hold_after = None
        self._released.set()

    # -- faults ----------------------------------------------------------------------------
    def _pick_fault(self, key: str) -> str | None:
        if not self.transient or self.fault_rate <= 0:
            return None
        with self._lock:
            attempt = self._attempts[key]
            self._attempts[key] += 1
            if self._consecutive[key] < self.max_consecutive_faults and (
                _unit(self.seed, "fault", key, attempt) < self.fault_rate
            ):
                self._consecutive[key] += 1
                kinds = self.transient
                return kinds[int(_unit(self.seed, "kind", key, attempt) * len(kinds))]
            self._consecutive[key] = 0
            return None

    def _duplicate(self, key: str, cursor: str | None) -> bool:
        return (
            cursor is not None
            and "duplicate" in self.faults
            and _unit(self.seed, "duplicate", key, cursor) < self.fault_rate
        )

    # -- endpoints -----------------------------------------------------------------------
    def _sorted_models(self) -> list[tuple[tuple[int, int], int]]:
        view = self.view
        if self._sorted is None or self._sorted[0] != view:
            entries = [
                (self.data.model_sort(m, view), m)
                for m in self.data.models
                if any(view.version(v) for v in self.data.model_versions[m])
            ]
            entries.sort(reverse=True)
            self._sorted = (view, entries)
        return self._sorted[1]

    def list_models(self, query: dict[str, str], base: str) -> dict[str, Any]:
        """``GET /api/v1/models`` (cursor or page paging)."""
        limit = _limit(query, MODELS_MAX_LIMIT, 100)
        types = [t.strip().upper() for t in query.get("types", "").split(",") if t.strip()]
        entries = self._sorted_models() if (not types or "LORA" in types) else []
        view = self.view
        if "page" in query:
            return self._page_mode(query, limit, entries, base, lambda m: m[1])
        cursor = query.get("cursor")
        start = 0
        if cursor:
            try:
                ts, model_id = (int(x) for x in cursor.split("|"))
            except ValueError:
                raise _Reply(400, f"Invalid cursor: {cursor}") from None
            keys = [-e[0][0] * 10**12 - e[0][1] for e in entries]  # ascending
            start = bisect.bisect_right(keys, -ts * 10**12 - model_id)
        chunk = entries[start : start + limit]
        items = [self.data.model_item(m, view) for _, m in chunk]
        if cursor and self._duplicate("models", cursor) and start > 0:
            items.insert(0, self.data.model_item(entries[start - 1][1], view))
        metadata: dict[str, Any] = {}
        if start + limit < len(entries):
            (ts, model_id), _ = chunk[-1]
            metadata["nextCursor"] = f"{ts}|{model_id}"
            metadata["nextPage"] = _next_url(base, query, metadata["nextCursor"])
        return {"items": items, "metadata": metadata}

    def list_images(self, query: dict[str, str], base: str) -> dict[str, Any]:
        """``GET /api/v1/images`` (cursor or page paging, empty pages now and then)."""
        limit = _limit(query, IMAGES_MAX_LIMIT, 100)
        with_meta = query.get("withMeta", "").lower() == "true"
        view = self.view
        if "modelVersionId" in query:
            try:
                version_id = int(query["modelVersionId"])
            except ValueError:
                raise _Reply(400, "modelVersionId must be a number") from None
            listed = self.data.images.get(version_id, []) if view.version(version_id) else []
        else:
            version_id = 0
            first: dict[int, tuple[int, dict[str, Any]]] = {}
            for entries in self.data.images.values():
                for image_id, entry in entries:
                    first.setdefault(image_id, (image_id, entry))
            listed = sorted(first.values(), key=lambda e: -e[0])
        entries = [(i, e) for i, e in listed if view.image(i)]

        def render(entry: tuple[int, dict[str, Any]]) -> dict[str, Any]:
            owner = version_id or self.data.image_versions[entry[0]][0]
            return self.data.image_item(owner, entry[1], view, with_meta)

        if "page" in query:
            return self._page_mode(query, limit, entries, base, render)
        cursor = query.get("cursor")
        before, flag = 2**63, "0"
        if cursor:
            try:
                before_text, flag = cursor.split("|")
                before = int(before_text)
            except ValueError:
                raise _Reply(400, f"Invalid cursor: {cursor}") from None
        keys = [-i for i, _ in entries]
        start = bisect.bisect_right(keys, -before)
        remaining = len(entries) - start
        stream = f"images/{version_id}"
        if (
            flag == "0"
            and remaining > 0
            and _unit(self.seed, "empty", stream, before) < self.empty_page_rate
        ):
            nxt = f"{before}|1"
            return {
                "items": [],
                "metadata": {"nextCursor": nxt, "nextPage": _next_url(base, query, nxt)},
            }
        chunk = entries[start : start + limit]
        items = [render(e) for e in chunk]
        if cursor and start > 0 and self._duplicate(stream, cursor):
            items.insert(0, render(entries[start - 1]))
        metadata: dict[str, Any] = {}
        if start + limit < len(entries):
            nxt = f"{chunk[-1][0]}|0"
            metadata = {"nextCursor": nxt, "nextPage": _next_url(base, query, nxt)}
        return {"items": items, "metadata": metadata}

    def _page_mode(self, query, limit, entries, base, render) -> dict[str, Any]:
        if "cursor" in query:
            raise _Reply(400, "Cannot use page and cursor together")
        try:
            page = int(query["page"])
        except ValueError:
            raise _Reply(400, "page must be a number") from None
        if page < 1:
            raise _Reply(400, "page must be >= 1")
        if page * limit > PAGE_WINDOW_MAX:
            raise _Reply(429, "You have exceeded the page limit. Please use cursors instead.")
        chunk = entries[(page - 1) * limit : page * limit]
        total_pages = max(1, -(-len(entries) // limit))
        metadata: dict[str, Any] = {
            "totalItems": len(entries),
            "currentPage": page,
            "pageSize": limit,
            "totalPages": total_pages,
        }
        if page < total_pages and (page + 1) * limit <= PAGE_WINDOW_MAX:
            nxt = {k: v for k, v in query.items() if k != "page"} | {"page": str(page + 1)}
            metadata["nextPage"] = base + "?" + "&".join(f"{k}={quote(v)}" for k, v in nxt.items())
        return {"items": [render(e) for e in chunk], "metadata": metadata}

    def model_by_id(self, model_id: int) -> dict[str, Any]:
        """``GET /api/v1/models/{id}``."""
        item = self.data.model_item(model_id, self.view) if model_id in self.data.models else None
        if item is None:
            raise _Reply(404, f"No model with id {model_id}")
        return item

    def version_by_id(self, version_id: int) -> dict[str, Any]:
        """``GET /api/v1/model-versions/{id}`` (404 ``No model with id N`` when unknown)."""
        if version_id not in self.data.versions or not self.view.version(version_id):
            raise _Reply(404, f"No model with id {version_id}")
        return self.data.version_object(version_id, with_model=True)


def _limit(query: dict[str, str], maximum: int, default: int) -> int:
    try:
        limit = int(query.get("limit", default))
    except ValueError:
        raise _Reply(400, "limit must be a number") from None
    if not 1 <= limit <= maximum:
        raise _Reply(400, f"limit must be between 1 and {maximum}")
    return limit


def _next_url(base: str, query: dict[str, str], cursor: str) -> str:
    params = {k: v for k, v in query.items() if k not in ("cursor", "token")} | {"cursor": cursor}
    return base + "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


class _Handler(BaseHTTPRequestHandler):
    """One request of the fake server (``fake`` is set on a per-server subclass)."""

    fake: FakeCivitai
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "FakeCivitai/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("fake civitai: " + format, *args)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        fake = self.fake
        with fake._lock:
            fake.stats[f"status_{status}"] += 1
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers=headers)

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        fake = self.fake
        with fake._lock:
            fake.stats["requests"] += 1
        parts = urlsplit(self.path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        try:
            if fake.bucket is not None:
                wait = fake.bucket.take()
                if wait > 0:
                    with fake._lock:
                        fake.stats["rate_limited"] += 1
                    raise _Reply(
                        429, "Too many requests", {"Retry-After": f"{max(wait, 0.001):.3f}"}
                    )
            if path.startswith("/api/"):
                self._api(path, query)
            else:
                self._media(path)
        except _Reply as reply:
            self._json(reply.status, {"error": reply.message}, reply.headers)
        except Exception as exc:  # a bug in the fake: answer 500, keep serving
            log.exception("fake civitai: %s failed", path)
            self._json(500, {"error": f"internal error: {type(exc).__name__}"})

    def _api(self, path: str, query: dict[str, str]) -> None:
        fake = self.fake
        with fake._lock:
            fake.stats["api_requests"] += 1
            held = fake.hold_after is not None and fake.stats["api_requests"] > fake.hold_after
            if held:
                fake.stats["held"] += 1
        if held:
            fake._released.wait()
            if fake._stopping.is_set():
                self.close_connection = True
                return
        if fake.token is not None:
            header = self.headers.get("Authorization", "")
            given = header[7:] if header.startswith("Bearer ") else query.get("token")
            if given != fake.token:
                raise _Reply(401, "Unauthorized: a valid API key is required")
        status = fake.outage(path, query) if fake.outage is not None else None
        if status is not None:
            with fake._lock:
                fake.stats[f"outage_{status}"] += 1
            retry = {"Retry-After": f"{fake.retry_after:g}"} if status in (429, 503) else None
            raise _Reply(status, f"scripted outage (HTTP {status})", retry)
        key = path + "?" + "&".join(f"{k}={query[k]}" for k in sorted(query) if k != "token")
        fault = fake._pick_fault(key)
        if fault is not None:
            with fake._lock:
                fake.stats[f"fault_{fault}"] += 1
            if self._fault(fault):
                return
        base = fake.url + path
        if path == "/api/v1/models":
            payload = fake.list_models(query, base)
        elif path == "/api/v1/images":
            payload = fake.list_images(query, base)
        elif m := re.fullmatch(r"/api/v1/models/(\d+)", path):
            payload = fake.model_by_id(int(m.group(1)))
        elif m := re.fullmatch(r"/api/v1/model-versions/(\d+)", path):
            payload = fake.version_by_id(int(m.group(1)))
        elif m := re.fullmatch(r"/api/download/models/(\d+)", path):
            self._download(int(m.group(1)), query)
            return
        else:
            raise _Reply(404, f"No route for {path}")
        body = json.dumps(payload).encode()
        if fault == "malformed":
            body = body[: max(1, len(body) // 2)]
        self._send(200, body)

    def _fault(self, fault: str) -> bool:
        """Answer with ``fault``; False when the normal answer follows (slow, malformed)."""
        fake = self.fake
        retry_after = f"{fake.retry_after:g}"
        if fault == "429":
            raise _Reply(429, "Too many requests", {"Retry-After": retry_after})
        if fault == "503":
            raise _Reply(503, "Server busy", {"Retry-After": retry_after})
        if fault in ("html200", "html500"):
            status = 200 if fault == "html200" else 500
            title = "Just a moment..." if status == 200 else "500 Internal Server Error"
            self._send(status, HTML_PAGE.format(title=title).encode(), "text/html")
            return True
        if fault == "reset":
            self.close_connection = True
            with suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return True
        if fault == "slow":
            fake._stopping.wait(fake.slow_seconds)
        return False  # "slow" and "malformed": the real answer follows (late / cut)

    def _download(self, version_id: int, query: dict[str, str]) -> None:
        fake = self.fake
        if version_id not in fake.data.versions or not fake.view.version(version_id):
            raise _Reply(404, f"No model with id {version_id}")
        files = fake.data.versions[version_id]["files"]
        chosen = next(
            (
                f
                for f in files
                if ("type" not in query or f["type"] == query["type"])
                and ("format" not in query or f["metadata"].get("format") == query["format"])
            ),
            fake.data.primary_file[version_id],
        )
        name = chosen["name"]
        self._send(
            307,
            b"",
            "text/plain",
            {
                "Location": f"/files/{chosen['id']}/{quote(name)}",
                "Content-Disposition": f'attachment; filename="{name}"',
            },
        )

    def _media(self, path: str) -> None:
        fake = self.fake
        media = fake.data.media
        if m := re.fullmatch(r"/files/(\d+)/([^/]+)", path):
            name = unquote(m.group(2))
            target = media / "loras" / name
            if "/" in name or name.startswith(".") or not target.is_file():
                raise _Reply(404, f"No file {name}")
            headers = {"Content-Disposition": f'attachment; filename="{name}"'}
            self._send(200, target.read_bytes(), "application/octet-stream", headers)
            return
        if m := IMAGE_PATH.fullmatch(path):
            target = media / "images" / f"{m.group(1)}.jpeg"
            if not target.is_file():
                raise _Reply(404, f"No image {m.group(1)}")
            self._send(200, target.read_bytes(), "image/jpeg")
            return
        raise _Reply(404, f"No route for {path}")


@contextmanager
def serve_sample(sample_dir: Path | str, port: int = 0, **knobs: Any) -> Iterator[FakeCivitai]:
    """Serve ``sample_dir`` on 127.0.0.1 in a background thread for the ``with`` block.

    ``knobs`` are :class:`FakeCivitai` arguments (rate_limit, fault_rate, faults, token,
    seed, retry_after, slow_seconds, empty_page_rate, max_consecutive_faults, view, clock,
    outage, hold_after).
    """
    server = FakeCivitai(sample_dir, port=port, **knobs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# CLI: imagegem fake-civitai --port P --data DIR [...]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fake server's options to ``parser``."""
    from pipelines.config import fake_civitai_token

    parser.add_argument("--data", required=True, help="sample release folder to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    parser.add_argument("--rate-limit", type=float, default=None, help="requests/s, then 429")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of faulty answers")
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated fault kinds ({','.join(FAULT_KINDS)})",
    )
    parser.add_argument(
        "--token",
        default=fake_civitai_token(),
        help="require this API key (default: $IMAGEGEM_FAKE_CIVITAI_TOKEN)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of variants and faults")
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of faults")
    parser.add_argument("--slow-seconds", type=float, default=5.0, help="delay of slow faults")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (or ``--duration`` elapsed); prints the base URL."""
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    server = FakeCivitai(
        args.data,
        host=args.host,
        port=args.port,
        rate_limit=args.rate_limit,
        fault_rate=args.fault_rate,
        faults=faults,
        token=args.token,
        seed=args.seed,
        retry_after=args.retry_after,
        slow_seconds=args.slow_seconds,
    )
    server.start()
    done = threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set()) if main_thread else None
    auth = " (token required)" if args.token else ""
    print(f"fake Civitai serving {args.data} at {server.url}{auth}", flush=True)
    try:
        done.wait(args.duration)
    except KeyboardInterrupt:
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.civitai.fake_server --data DIR [--port P ...]``."""
    parser = argparse.ArgumentParser(prog="fake-civitai", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
