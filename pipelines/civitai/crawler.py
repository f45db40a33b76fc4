"""Crawl the Civitai API v1 into the lake's raw landing, and build release files from it.

``crawl(lake, window, client)`` runs three streams for one time window (a partition key):

1. ``models`` — ``/api/v1/models?types=LORA&sort=Newest``, cursor paging, newest first;
2. ``images`` — ``/api/v1/images?modelVersionId=V&withMeta=true``, one cursor stream per
   known model version (this window's and every earlier window's), several at a time;
3. ``model_versions`` — ``/api/v1/model-versions/{id}`` for LoRA versions that images list
   in ``meta.civitaiResources`` but no models page carried.

Every answer is landed verbatim before it is parsed — except that usernames are replaced by
their salted hash (``warehouse.users``), so no raw username is ever stored — as gzip JSON lines (one line per page:
url without token, params, status, fetched_at, body) under
``<lake>/raw/civitai/window=<window>/<stream>/part-<seq>-<rand>.jsonl.gz``, each file written
to a temporary name and renamed (one PUT on S3). A per-stream checkpoint
(``_checkpoints/<stream>.json``, atomically replaced) moves on only after the pages it covers
are durably landed, so a ``kill -9`` at any moment loses nothing: the rerun resumes from the
checkpoint and may land a page twice, which :func:`build_release` collapses by key.

Incremental: a window starts from the watermark of the completed windows before it (newest
model key seen, newest image id per version) and stops each stream when it reaches it; with
``full=True`` everything is re-read (to refresh reaction counts). A completed window is
never crawled again: re-running it does nothing.

``build_release(lake, out)`` maps every landed page of every window into release-format
parquet (``out/images/part-*.parquet``, ``out/models/part-*.parquet``, plus
``out/quarantine/part-00000.parquet``), keeping the latest snapshot of each key by fetch time.
"""

from __future__ import annotations

import asyncio
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
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.civitai.client import ApiResponse, CivitaiClient
from warehouse import civitai_map as cm
from warehouse.lake import Lake, is_remote
from warehouse.schema import IMAGES, MODELS, ReleaseTable
from warehouse.users import pseudonymize_body

RAW_PREFIX = "raw/civitai"
STREAMS: tuple[str, ...] = ("models", "images", "model_versions")
STATE_FILE = "_state.json"
CHECKPOINTS = "_checkpoints"
PART_PATTERN = re.compile(r"^part-(\d+)-[0-9a-f]+\.jsonl\.gz$")
WINDOW_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,99}$")
FORMAT_VERSION = 1
# Lineage columns of the intermediate mapped rows (dropped from the release files).
LINEAGE: tuple[tuple[str, pa.DataType], ...] = (
    ("_priority", pa.int64()),
    ("_fetched_at", pa.string()),
    ("_part", pa.string()),
    ("_line", pa.int64()),
    ("_item", pa.int64()),
)

Log = logging.Logger | Any  # a logging.Logger or Dagster's context.log


# ---------------------------------------------------------------------------------------------
# Storage (local folder or S3 through the lake's fsspec filesystem)


class _Store:
    """Atomic small-file writes and reads under the lake root."""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake
        self.fs = lake.fs

    def path(self, *parts: str) -> str:
        return posixpath.join(self.lake.root, *parts)

    def put(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically (temp file + rename; one PUT remotely)."""
        if self.lake.remote:
            self.fs.pipe_file(path, data)
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def read_json(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(path, "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None

    def write_json(self, path: str, payload: dict[str, Any]) -> None:
        self.put(path, json.dumps(payload, sort_keys=True).encode())

    def ls(self, path: str) -> list[str]:
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as handle:
            return handle.read()


def _window_dir(window: str) -> str:
    return f"{RAW_PREFIX}/window={window}"


def list_windows(lake: Lake) -> list[str]:
    """The windows that have a raw landing in ``lake``, sorted."""
    store = _Store(lake)
    names = store.ls(store.path(RAW_PREFIX))
    return sorted(n.removeprefix("window=") for n in names if n.startswith("window="))


def _check_window(window: str) -> None:
    if not WINDOW_PATTERN.fullmatch(window):
        raise ValueError(
            f"window {window!r}: use letters, digits and ._:+- (a partition key), no slashes"
        )


# ---------------------------------------------------------------------------------------------
# Landing


class _Lander:
    """Buffers landed pages of one stream; a flush writes one part file, then the checkpoint.

    ``add(record, update)``: ``update(checkpoint)`` is applied to the committed checkpoint only
    after the part holding ``record`` is durably written.
    """

    def __init__(
        self,
        store: _Store,
        window: str,
        stream: str,
        checkpoint: dict[str, Any],
        flush_pages: int,
        flush_seconds: float,
    ) -> None:
        self.store = store
        self.folder = store.path(_window_dir(window), stream)
        self.checkpoint_path = store.path(_window_dir(window), CHECKPOINTS, f"{stream}.json")
        self.checkpoint = checkpoint
        self.flush_pages = max(1, flush_pages)
        self.flush_seconds = flush_seconds
        self.buffer: list[tuple[dict[str, Any], Callable[[dict[str, Any]], None] | None]] = []
        self.last_flush = time.monotonic()
        self.lock = asyncio.Lock()
        self.parts_written = 0

    def add(
        self, record: dict[str, Any], update: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.buffer.append((record, update))

    async def maybe_flush(self) -> None:
        if len(self.buffer) >= self.flush_pages or (
            self.buffer and time.monotonic() - self.last_flush >= self.flush_seconds
        ):
            await self.flush()

    async def flush(self, force_checkpoint: bool = False) -> None:
        async with self.lock:
            batch, self.buffer = self.buffer, []
            if not batch and not force_checkpoint:
                return
            if batch:
                seq = int(self.checkpoint.get("next_part", 0))
                name = f"part-{seq:06d}-{secrets.token_hex(4)}.jsonl.gz"
                lines = [json.dumps(r, ensure_ascii=False) for r, _ in batch]
                data = await asyncio.to_thread(_gzip_lines, lines)
                await asyncio.to_thread(self.store.put, posixpath.join(self.folder, name), data)
                self.parts_written += 1
                for _, update in batch:
                    if update is not None:
                        update(self.checkpoint)
                self.checkpoint["next_part"] = seq + 1
            payload = json.dumps(self.checkpoint, sort_keys=True).encode()
            await asyncio.to_thread(self.store.put, self.checkpoint_path, payload)
            self.last_flush = time.monotonic()


def _gzip_lines(lines: list[str]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as handle:
        for line in lines:
            handle.write(line.encode())
            handle.write(b"\n")
    return buffer.getvalue()


def _record(stream: str, response: ApiResponse) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "stream": stream,
        "url": response.url,
        "params": response.params,
        "status": response.status,
        "fetched_at": response.fetched_at,
        "elapsed": round(response.elapsed, 4),
        "attempts": response.attempts,
        "error": response.error,
        "body": response.body,
    }


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class CrawlReport:
    """What one ``crawl`` call did."""

    window: str
    full: bool
    complete: bool = False
    already_complete: bool = False
    stopped: str | None = None  # "deadline" | "auth" | None
    pages: Counter[str] = field(default_factory=Counter)  # landed 2xx pages per stream
    items: Counter[str] = field(default_factory=Counter)
    bad_pages: int = 0  # 2xx answers whose body was no JSON page (landed, retried)
    stopped_at_watermark: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    versions: int = 0  # image streams of this window
    parts: int = 0  # raw part files written
    seconds: float = 0.0

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def as_metadata(self) -> dict[str, Any]:
        """JSON-ready summary (no secrets: URLs are recorded without the token)."""
        return {
            "window": self.window,
            "full": self.full,
            "complete": self.complete,
            "already_complete": self.already_complete,
            "stopped": self.stopped,
            "pages": dict(self.pages),
            "items": dict(self.items),
            "bad_pages": self.bad_pages,
            "stopped_at_watermark": dict(self.stopped_at_watermark),
            "failures": len(self.failures),
            "requests": self.requests,
            "retries": self.retries,
            "statuses": self.statuses,
            "versions": self.versions,
            "parts": self.parts,
            "seconds": round(self.seconds, 3),
            "requests_per_second": round(self.requests_per_second, 2),
        }


class _Abort(Exception):
    """Stop every stream (auth failure)."""


# ---------------------------------------------------------------------------------------------
# Watermarks


def _key_json(key: tuple[datetime, int] | None) -> list[Any] | None:
    return None if key is None else [key[0].strftime(cm.TIMESTAMP_FORMAT), key[1]]


def _key_from_json(value: Any) -> tuple[datetime, int] | None:
    if not value:
        return None
    return (datetime.strptime(value[0], cm.TIMESTAMP_FORMAT), int(value[1]))


def _plausible(key: tuple[datetime, int] | None) -> bool:
    """A sort key that may serve as a watermark (not in the future: broken dates are)."""
    if key is None:
        return False
    horizon = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1)
    return datetime(1990, 1, 1) < key[0] <= horizon


def _max_id(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _previous_watermark(store: _Store, window: str) -> dict[str, Any]:
    """Merged watermark of the completed windows sorting before ``window``."""
    models: tuple[datetime, int] | None = None
    images: dict[str, int | None] = {}
    for name in list_windows(store.lake):
        if name >= window:
            continue
        state = store.read_json(store.path(_window_dir(name), STATE_FILE))
        if not state or not state.get("complete") or not state.get("watermark"):
            continue
        mark = state["watermark"]
        key = _key_from_json(mark.get("models"))
        if key is not None and (models is None or key > models):
            models = key
        for version, image_id in (mark.get("images") or {}).items():
            images[version] = _max_id(images.get(version), image_id)
    return {"models": _key_json(models), "images": images}


# ---------------------------------------------------------------------------------------------
# The crawl


class _Crawl:
    def __init__(
        self,
        lake: Lake,
        window: str,
        client: CivitaiClient,
        *,
        user_salt: str,
        full: bool,
        types: str,
        models_limit: int,
        images_limit: int,
        concurrency: int,
        flush_pages: int,
        flush_seconds: float,
        max_seconds: float | None,
        max_versions: int | None,
        log: Log,
        progress_seconds: float,
    ) -> None:
        if not user_salt:
            raise ValueError("user_salt is required: usernames are hashed before pages are landed")
        self.user_salt = user_salt
        self.lake = lake
        self.store = _Store(lake)
        self.window = window
        self.client = client
        self.types = types
        self.models_limit = models_limit
        self.images_limit = images_limit
        self.concurrency = max(1, concurrency)
        self.flush_pages = flush_pages
        self.flush_seconds = flush_seconds
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self.max_versions = max_versions
        self.log = log
        self.progress_seconds = progress_seconds
        self.report = CrawlReport(window=window, full=full)
        self.transient_failures = 0
        self.started = time.monotonic()
        self.phase = "starting"
        self.versions_total = 0
        self.versions_done = 0
        self.versions_resumed = 0  # image streams already done by an earlier run
        self.images_started = self.started
        self.requests_before = client.stats.requests

    # -- helpers ---------------------------------------------------------------------------
    def _record(self, stream: str, response: ApiResponse) -> dict[str, Any]:
        """The landing record of an answer, its usernames pseudonymised (salted SHA-256)."""
        record = _record(stream, response)
        record["body"] = pseudonymize_body(record["body"], self.user_salt)
        return record

    def _path(self, *parts: str) -> str:
        return self.store.path(_window_dir(self.window), *parts)

    def _checkpoint(self, stream: str, default: dict[str, Any]) -> dict[str, Any]:
        found = self.store.read_json(self._path(CHECKPOINTS, f"{stream}.json"))
        return found if found is not None else default

    def _lander(self, stream: str, checkpoint: dict[str, Any]) -> _Lander:
        return _Lander(
            self.store, self.window, stream, checkpoint, self.flush_pages, self.flush_seconds
        )

    def _out_of_time(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.report.stopped = self.report.stopped or "deadline"
            return True
        return False

    def _fail(self, stream: str, key: Any, response: ApiResponse, permanent: bool) -> None:
        failure = {
            "stream": stream,
            "key": None if key is None else str(key),
            "url": response.url,
            "status": response.status,
            "error": self.client.scrub(response.error or ""),
            "permanent": permanent,
        }
        self.report.failures.append(failure)
        if not permanent:
            self.transient_failures += 1
        self.log.warning(
            f"civitai {stream} {key}: {failure['error'] or response.status}"
            + (" (permanent: not retried)" if permanent else " (will resume on rerun)")
        )
        if response.status in (401, 403):
            self.report.stopped = "auth"
            raise _Abort(failure["error"])

    async def _fetch(
        self,
        stream: str,
        path: str,
        params: dict[str, Any],
        lander: _Lander,
        list_page: bool,
    ) -> tuple[ApiResponse, dict[str, Any] | None]:
        """One page: land every answer; retry 2xx answers whose body is no JSON page."""
        attempts = max(1, self.client.retry.attempts)
        response: ApiResponse | None = None
        for attempt in range(1, attempts + 1):
            response = await self.client.get(path, params)
            if not response.ok:
                lander.add(self._record(stream, response))
                return response, None
            payload, reason = cm.parse_page(response.body)
            if payload is not None and list_page:
                items, reason = cm.page_items(payload)
                if items is None:
                    payload = None
            if payload is not None:
                return response, payload
            lander.add(self._record(stream, response))  # kept verbatim; quarantined by the build
            self.report.bad_pages += 1
            self.log.info(f"civitai {stream}: bad page ({reason}) from {response.url}; retrying")
            if attempt < attempts:
                await self.client.backoff(attempt)
            response.error = f"bad body after {attempt} attempts: {reason}"
        assert response is not None
        return response, None

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.progress_seconds)
            elapsed = time.monotonic() - self.started
            rate = (self.client.stats.requests - self.requests_before) / elapsed
            items = sum(self.report.items.values())
            eta = ""
            done_now = self.versions_done - self.versions_resumed
            if self.phase == "images" and done_now > 0:
                left = self.versions_total - self.versions_done
                per = (time.monotonic() - self.images_started) / done_now
                eta = f", ETA {left * per:,.0f}s"
            self.log.info(
                f"civitai window {self.window} [{self.phase}]: {items:,} items, "
                f"{sum(self.report.pages.values()):,} pages, {rate:.1f} req/s, "
                f"{items / elapsed if elapsed else 0:.1f} items/s, versions "
                f"{self.versions_done:,}/{self.versions_total:,}{eta}"
            )

    # -- state -----------------------------------------------------------------------------
    def load_state(self, full: bool) -> dict[str, Any]:
        state = self.store.read_json(self._path(STATE_FILE))
        if state is None:
            state = {
                "window": self.window,
                "format": FORMAT_VERSION,
                "full": full,
                "started_at": datetime.now(UTC).isoformat(),
                "base": {"models": None, "images": {}}
                if full
                else _previous_watermark(self.store, self.window),
                "complete": False,
            }
            self.store.write_json(self._path(STATE_FILE), state)
        elif state.get("full") != full and not state.get("complete"):
            self.log.warning(
                f"civitai window {self.window} was started with full={state.get('full')}; "
                "resuming it that way"
            )
        self.report.full = bool(state.get("full"))
        return state

    # -- streams ---------------------------------------------------------------------------
    async def models(self, state: dict[str, Any]) -> dict[str, Any]:
        checkpoint = self._checkpoint(
            "models",
            {
                "cursor": None,
                "done": False,
                "pages": 0,
                "items": 0,
                "versions": [],
                "max_key": None,
                "stopped_at_watermark": False,
                "next_part": 0,
            },
        )
        if checkpoint["done"]:
            return checkpoint
        self.phase = "models"
        lander = self._lander("models", checkpoint)
        base = None if state["full"] else _key_from_json(state["base"]["models"])
        cursor = checkpoint["cursor"]
        max_key = _key_from_json(checkpoint["max_key"])
        seen_cursors = {cursor}
        try:
            while not self._out_of_time():
                params = {"types": self.types, "sort": "Newest", "limit": self.models_limit}
                if cursor:
                    params["cursor"] = cursor
                response, payload = await self._fetch(
                    "models", "/api/v1/models", params, lander, list_page=True
                )
                if payload is None:
                    permanent = response.status is not None and 400 <= response.status < 500
                    self._fail("models", cursor, response, permanent and response.status != 429)
                    break
                items = payload["items"]
                new_versions: list[int] = []
                stop = False
                for item in items:
                    new_versions.extend(cm.model_version_ids(item))
                    key = cm.model_sort_key(item)
                    if _plausible(key) and (max_key is None or key > max_key):
                        max_key = key
                    if base is not None and key is not None and key <= base:
                        stop = True
                nxt = cm.next_cursor(payload)
                if nxt is not None and nxt in seen_cursors:
                    response.error = f"cursor {nxt!r} did not advance"
                    lander.add(self._record("models", response))
                    self._fail("models", cursor, response, permanent=False)
                    break
                seen_cursors.add(nxt)
                done = stop or nxt is None
                self.report.pages["models"] += 1
                self.report.items["models"] += len(items)
                if stop:
                    self.report.stopped_at_watermark["models"] += 1

                update = _models_update(
                    nxt, new_versions, len(items), _key_json(max_key), done, stop
                )
                lander.add(self._record("models", response), update)
                await lander.maybe_flush()
                if done:
                    break
                cursor = nxt
        finally:
            await lander.flush()
            self.report.parts += lander.parts_written
        return checkpoint

    async def images(self, state: dict[str, Any], models: dict[str, Any]) -> dict[str, Any]:
        checkpoint = self._checkpoint(
            "images", {"done": False, "versions": {}, "refs": [], "next_part": 0}
        )
        base: dict[str, int | None] = {} if state["full"] else dict(state["base"]["images"])
        known = {int(v) for v in state["base"]["images"]} | {int(v) for v in models["versions"]}
        versions = sorted(known, reverse=True)
        if self.max_versions is not None:
            versions = versions[: self.max_versions]
        self.versions_total = len(versions)
        self.report.versions = len(versions)
        if checkpoint["done"]:
            self.versions_done = len(versions)
            return checkpoint
        self.phase = "images"
        self.images_started = time.monotonic()
        lander = self._lander("images", checkpoint)
        live = {v: dict(s) for v, s in checkpoint["versions"].items()}
        refs: set[int] = set(checkpoint["refs"])
        queue: asyncio.Queue[int] = asyncio.Queue()
        for version in versions:
            if live.get(str(version), {}).get("done"):
                self.versions_done += 1
            else:
                queue.put_nowait(version)
        self.versions_resumed = self.versions_done

        async def worker() -> None:
            while not queue.empty() and not self._out_of_time():
                version = queue.get_nowait()
                await self._version_images(
                    version, base.get(str(version)), live, refs, known, lander
                )
                self.versions_done += 1

        try:
            workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
            try:
                await asyncio.gather(*workers)
            except BaseException:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                raise
        finally:
            await lander.flush()
            self.report.parts += lander.parts_written
        if all(live.get(str(v), {}).get("done") for v in versions):
            checkpoint["done"] = True
            await lander.flush(force_checkpoint=True)
        return checkpoint

    async def _version_images(
        self,
        version: int,
        watermark: int | None,
        live: dict[str, dict[str, Any]],
        refs: set[int],
        known: set[int],
        lander: _Lander,
    ) -> None:
        key = str(version)
        status = live.setdefault(
            key, {"cursor": None, "done": False, "max_id": None, "pages": 0, "items": 0}
        )
        seen_cursors = {status["cursor"]}
        while not self._out_of_time():
            params: dict[str, Any] = {
                "modelVersionId": version,
                "withMeta": "true",
                "sort": "Newest",
                "limit": self.images_limit,
            }
            if status["cursor"]:
                params["cursor"] = status["cursor"]
            response, payload = await self._fetch(
                "images", "/api/v1/images", params, lander, list_page=True
            )
            if payload is None:
                permanent = (
                    response.status is not None
                    and 400 <= response.status < 500
                    and response.status != 429
                )
                if permanent:
                    status = dict(status, done=True)
                    live[key] = status
                    lander.add(
                        {"stream": "images", "note": "permanent failure"},
                        _set_version(key, status, []),
                    )
                self._fail("images", version, response, permanent)
                return
            items = payload["items"]
            stop = False
            new_refs: list[int] = []
            max_id = status["max_id"]
            for item in items:
                try:
                    image_id = cm.to_int(item.get("id"), "id") if isinstance(item, dict) else None
                except cm.MapError:
                    image_id = None
                if image_id is None:
                    continue
                if max_id is None or image_id > max_id:
                    max_id = image_id
                if watermark is not None and image_id <= watermark:
                    stop = True
                for ref in cm.lora_resources(item):
                    if ref not in known and ref not in refs:
                        refs.add(ref)
                        new_refs.append(ref)
            nxt = cm.next_cursor(payload)
            if nxt is not None and nxt in seen_cursors:
                response.error = f"cursor {nxt!r} did not advance"
                lander.add(self._record("images", response))
                self._fail("images", version, response, permanent=False)
                return
            seen_cursors.add(nxt)
            done = stop or nxt is None
            status = {
                "cursor": nxt,
                "done": done,
                "max_id": max_id,
                "pages": status["pages"] + 1,
                "items": status["items"] + len(items),
            }
            live[key] = status
            self.report.pages["images"] += 1
            self.report.items["images"] += len(items)
            if stop:
                self.report.stopped_at_watermark["images"] += 1
            lander.add(self._record("images", response), _set_version(key, status, new_refs))
            await lander.maybe_flush()
            if done:
                return

    async def model_versions(
        self, images: dict[str, Any], models: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, Any]:
        checkpoint = self._checkpoint(
            "model_versions", {"done": False, "fetched": [], "next_part": 0}
        )
        if checkpoint["done"]:
            return checkpoint
        self.phase = "model_versions"
        known = {int(v) for v in state["base"]["images"]} | {int(v) for v in models["versions"]}
        wanted = sorted(set(images["refs"]) - known - set(checkpoint["fetched"]), reverse=True)
        lander = self._lander("model_versions", checkpoint)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for version in wanted:
            queue.put_nowait(version)
        pending_transient = False

        async def worker() -> None:
            nonlocal pending_transient
            while not queue.empty() and not self._out_of_time():
                version = queue.get_nowait()
                path = f"/api/v1/model-versions/{version}"
                response, payload = await self._fetch(
                    "model_versions", path, {}, lander, list_page=False
                )

                model = payload.get("model") if payload is not None else None
                lora = isinstance(model, dict) and str(model.get("type", "")).upper() == "LORA"

                def update(ck: dict[str, Any], version: int = version, lora: bool = lora) -> None:
                    ck["fetched"].append(version)
                    if lora:  # its image listing is crawled from the next window on
                        ck.setdefault("found", []).append(version)

                if payload is not None:
                    self.report.pages["model_versions"] += 1
                    self.report.items["model_versions"] += 1
                    lander.add(self._record("model_versions", response), update)
                else:
                    permanent = (
                        response.status is not None
                        and 400 <= response.status < 500
                        and response.status != 429
                    )
                    if permanent:
                        lander.add({"stream": "model_versions", "note": "not found"}, update)
                    else:
                        pending_transient = True
                    self._fail("model_versions", version, response, permanent)
                await lander.maybe_flush()

        try:
            workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
            try:
                await asyncio.gather(*workers)
            except BaseException:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                raise
        finally:
            await lander.flush()
            self.report.parts += lander.parts_written
        if queue.empty() and not pending_transient and not self._out_of_time():
            checkpoint["done"] = True
            await lander.flush(force_checkpoint=True)
        return checkpoint

    async def run(self, full: bool) -> CrawlReport:
        state = self.load_state(full)
        if state.get("complete"):
            self.report.already_complete = True
            self.report.complete = True
            self.log.info(f"civitai window {self.window} is already complete; nothing to do")
            return self.report
        before = self.client.stats.as_dict()
        progress = asyncio.create_task(self._progress())
        try:
            async with self.client:
                models = await self.models(state)
                images = None
                if models["done"] and not self.report.stopped:
                    images = await self.images(state, models)
                if images is not None and images["done"] and not self.report.stopped:
                    versions = await self.model_versions(images, models, state)
                    if versions["done"] and not self.transient_failures:
                        self._complete(state, models, images, versions)
        except _Abort:
            pass
        finally:
            progress.cancel()
            self.report.seconds = time.monotonic() - self.started
            after = self.client.stats.as_dict()
            self.report.requests = after["requests"] - before["requests"]
            self.report.retries = after["retries"] - before["retries"]
            statuses = Counter({k: v for k, v in after["statuses"].items()})
            statuses.subtract(before["statuses"])
            self.report.statuses = {k: v for k, v in statuses.items() if v}
        self.log.info(
            f"civitai window {self.window}: {'complete' if self.report.complete else 'incomplete'}"
            f" — {self.report.requests:,} requests ({self.report.requests_per_second:.1f}/s), "
            f"{dict(self.report.items)} items, {len(self.report.failures)} failures, "
            f"{self.report.bad_pages} bad pages"
        )
        return self.report

    def _complete(
        self,
        state: dict[str, Any],
        models: dict[str, Any],
        images: dict[str, Any],
        versions: dict[str, Any],
    ) -> None:
        base_models = _key_from_json(state["base"]["models"])
        key = _key_from_json(models["max_key"])
        if base_models is not None and (key is None or base_models > key):
            key = base_models
        # Every known version stays in the watermark (None: no image seen yet), so later
        # windows still crawl its images even when its model is not re-read.
        marks: dict[str, int | None] = dict(state["base"]["images"])
        for version, status in images["versions"].items():
            marks[version] = _max_id(marks.get(version), status.get("max_id"))
        for version in versions.get("found", []):
            marks.setdefault(str(version), None)
        self.report.complete = True
        state["watermark"] = {"models": _key_json(key), "images": marks}
        state["complete"] = True
        state["finished_at"] = datetime.now(UTC).isoformat()
        state["report"] = self.report.as_metadata()
        self.store.write_json(self._path(STATE_FILE), state)


def _models_update(
    cursor: str | None,
    versions: list[int],
    items: int,
    max_key: list[Any] | None,
    done: bool,
    stopped: bool,
) -> Callable[[dict[str, Any]], None]:
    def update(ck: dict[str, Any]) -> None:
        ck["cursor"] = cursor
        ck["pages"] += 1
        ck["items"] += items
        ck["versions"].extend(versions)
        ck["max_key"] = max_key
        ck["done"] = done
        ck["stopped_at_watermark"] = stopped

    return update


def _set_version(
    key: str, status: dict[str, Any], refs: list[int]
) -> Callable[[dict[str, Any]], None]:
    def update(ck: dict[str, Any]) -> None:
        ck["versions"][key] = status
        ck["refs"].extend(refs)

    return update


async def acrawl(
    lake: Lake,
    window: str,
    client: CivitaiClient,
    *,
    user_salt: str,
    full: bool = False,
    types: str = "LORA",
    models_limit: int = 100,
    images_limit: int = 200,
    concurrency: int = 8,
    flush_pages: int = 64,
    flush_seconds: float = 5.0,
    max_seconds: float | None = None,
    max_versions: int | None = None,
    logger: Log | None = None,
    progress_seconds: float = 15.0,
) -> CrawlReport:
    """Async form of :func:`crawl` (same arguments)."""
    _check_window(window)
    crawl_run = _Crawl(
        lake,
        window,
        client,
        user_salt=user_salt,
        full=full,
        types=types,
        models_limit=models_limit,
        images_limit=images_limit,
        concurrency=concurrency,
        flush_pages=flush_pages,
        flush_seconds=flush_seconds,
        max_seconds=max_seconds,
        max_versions=max_versions,
        log=logger or logging.getLogger(__name__),
        progress_seconds=progress_seconds,
    )
    return await crawl_run.run(full)


def crawl(
    lake: Lake,
    window: str,
    client: CivitaiClient,
    *,
    user_salt: str,
    full: bool = False,
    types: str = "LORA",
    models_limit: int = 100,
    images_limit: int = 200,
    concurrency: int = 8,
    flush_pages: int = 64,
    flush_seconds: float = 5.0,
    max_seconds: float | None = None,
    max_versions: int | None = None,
    logger: Log | None = None,
    progress_seconds: float = 15.0,
) -> CrawlReport:
    """Crawl one window of the Civitai API into ``lake``'s raw landing (see the module doc).

    ``full`` re-reads everything instead of stopping at the previous windows' watermark;
    ``concurrency`` image streams run at once; a flush (one part file + checkpoint) happens
    every ``flush_pages`` pages or ``flush_seconds``; ``max_seconds`` stops cleanly (the
    window stays incomplete and a rerun resumes); ``max_versions`` bounds the image streams
    (for demos). Failures are recorded in the report, never raised; 401/403 stop the crawl.
    """
    return asyncio.run(
        acrawl(
            lake,
            window,
            client,
            user_salt=user_salt,
            full=full,
            types=types,
            models_limit=models_limit,
            images_limit=images_limit,
            concurrency=concurrency,
            flush_pages=flush_pages,
            flush_seconds=flush_seconds,
            max_seconds=max_seconds,
            max_versions=max_versions,
            logger=logger,
            progress_seconds=progress_seconds,
        )
    )


def window_state(lake: Lake, window: str) -> dict[str, Any] | None:
    """The stored state of ``window`` (base watermark, completion, final watermark), or None."""
    store = _Store(lake)
    return store.read_json(store.path(_window_dir(window), STATE_FILE))


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

    Only committed part files are read (``part-*.jsonl.gz``); temporary files of a killed
    writer are ignored.
    """
    store = _Store(lake)
    for window in windows if windows is not None else list_windows(lake):
        for stream in streams:
            folder = store.path(_window_dir(window), stream)
            names = [n for n in store.ls(folder) if PART_PATTERN.match(n)]
            names.sort(key=lambda n: (int(PART_PATTERN.match(n).group(1)), n))  # type: ignore[union-attr]
            for name in names:
                relative = f"{_window_dir(window)}/{stream}/{name}"
                data = gzip.decompress(store.read_bytes(posixpath.join(folder, name)))
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
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    windows: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _RowSpool:
    """Mapped rows + lineage spooled to a local parquet file in batches."""

    def __init__(self, path: str, table: ReleaseTable, batch_rows: int = 20_000) -> None:
        self.path = path
        self.table = table
        self.schema = pa.schema(
            list(table.canonical_schema()) + [pa.field(n, t) for n, t in LINEAGE]
        )
        self.rows: list[dict[str, Any]] = []
        self.batch_rows = batch_rows
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
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
    logger: Log | None = None,
) -> ReleaseBuild:
    """Map every landed page of ``windows`` (default: all) into release parquet under ``out``.

    Writes ``out/images/part-*.parquet`` and ``out/models/part-*.parquet`` with exactly the
    canonical release schemas, one row per key ((imageId, modelVersionId) /
    (modelVersionId, fileId)), the latest snapshot by fetch time (a ``/models`` row beats a
    ``/model-versions`` row), sorted by key; and ``out/quarantine/part-00000.parquet`` with
    the quarantine records (also returned). A local ``out`` is replaced atomically (built
    beside it, then swapped in); a remote one is overwritten file by file.
    """
    log = logger or logging.getLogger(__name__)
    started = time.monotonic()
    out = str(out)
    chosen = list(windows) if windows is not None else list_windows(lake)
    build = ReleaseBuild(out=out, rows={}, files={}, windows=chosen)
    with tempfile.TemporaryDirectory(prefix="civitai-build-") as tmp:
        spools = {
            "images": _RowSpool(os.path.join(tmp, "images.parquet"), IMAGES),
            "models": _RowSpool(os.path.join(tmp, "models.parquet"), MODELS),
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
            for name, table in (("images", IMAGES), ("models", MODELS)):
                key = ", ".join(f'"{k}"' for k in table.key)
                columns = ", ".join(f'"{c}"' for c in table.column_names)
                source = f"read_parquet('{spools[name].path}')"
                query = (
                    f"SELECT {columns} FROM {source} "
                    f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY _priority DESC, "
                    f"_fetched_at DESC, _part DESC, _line DESC, _item DESC) = 1 "
                    f"ORDER BY {key}"
                )
                reader = con.sql(query).to_arrow_reader(50_000)
                files, rows = staged.write_table(name, reader, table, rows_per_part)
                build.files[name], build.rows[name] = files, rows
                build.duplicates_dropped[name] = build.mapped_rows[name] - rows
            staged.write_quarantine(build.quarantine)
            build.files["quarantine"] = [staged.final("quarantine/part-00000.parquet")]
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
    record = page.record
    source = f"civitai:{page.part}#{page.line}"
    if "corrupt" in record:
        build.quarantine.append(
            cm.quarantine_record(
                source, "page", None, f"corrupt raw line: {record['corrupt']}", record.get("body")
            )
        )
        return
    if "note" in record:
        return  # a bookkeeping line (permanent failure marker)
    status = record.get("status")
    if status is None or not 200 <= int(status) < 300:
        build.error_pages += 1
        return
    url = record.get("url")
    payload, reason = cm.parse_page(record.get("body"))
    if payload is None:
        build.bad_pages += 1
        build.quarantine.append(
            cm.quarantine_record(source, "page", url, reason, record.get("body"))
        )
        return
    stream = page.stream
    if stream == "images":
        try:
            version = cm.to_int((record.get("params") or {}).get("modelVersionId"), "version")
        except cm.MapError:
            version = None
        if version is None:
            build.quarantine.append(
                cm.quarantine_record(
                    source, "page", url, "images page without a modelVersionId parameter", payload
                )
            )
            return
        mapped = cm.map_images_page(payload, version, source)
        target, priority = "images", 1
    elif stream == "models":
        mapped = cm.map_models_page(payload, source)
        target, priority = "models", 1
    elif stream == "model_versions":
        mapped = cm.map_model_version(payload, source)
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


QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("table", pa.string()),
        ("key", pa.string()),
        ("reason", pa.string()),
        ("payload", pa.string()),
    ]
)


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

    def _open(self, relative: str):
        path = posixpath.join(self.root, relative)
        if not self.remote:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.written.append(relative)
        return self.fs.open(path, "wb")

    def write_table(
        self,
        name: str,
        reader: pa.RecordBatchReader,
        table: ReleaseTable,
        rows_per_part: int,
    ) -> tuple[list[str], int]:
        schema = table.canonical_schema()
        files: list[str] = []
        rows = 0
        writer: pq.ParquetWriter | None = None
        handle = None
        in_part = 0

        def open_part() -> None:
            nonlocal writer, handle, in_part
            relative = f"{name}/part-{len(files):05d}.parquet"
            handle = self._open(relative)
            writer = pq.ParquetWriter(handle, schema, compression="zstd")
            files.append(self.final(relative))
            in_part = 0

        def close_part() -> None:
            nonlocal writer, handle
            if writer is not None:
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
                open_part()
                writer.write_table(schema.empty_table())  # type: ignore[union-attr]
        finally:
            close_part()
        return files, rows

    def write_quarantine(self, records: list[dict[str, Any]]) -> None:
        table = pa.Table.from_pylist(
            [{k: r.get(k) for k in QUARANTINE_SCHEMA.names} for r in records],
            schema=QUARANTINE_SCHEMA,
        )
        with self._open("quarantine/part-00000.parquet") as handle:
            pq.write_table(table, handle, compression="zstd")

    def commit(self) -> None:
        if self.remote:
            strip = self.fs._strip_protocol
            keep = {strip(posixpath.join(self.out, r)) for r in self.written}
            for folder in ("images", "models", "quarantine"):
                for path in self.fs.glob(posixpath.join(self.out, folder, "part-*.parquet")):
                    if strip(path) not in keep:
                        self.fs.rm(path)  # a stale part of an earlier, larger build
            return
        old = None
        if os.path.exists(self.out):
            old = f"{self.root}.old"
            os.replace(self.out, old)
        os.replace(self.root, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if not self.remote:
            shutil.rmtree(self.root, ignore_errors=True)
