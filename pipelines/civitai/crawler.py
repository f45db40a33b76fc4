"""Crawl the Civitai API v1 into the lake's raw landing.

``crawl(lake, window, client, CrawlOptions(user_salt=...))`` runs three streams for one time
window (a partition key):

1. ``models`` — ``/api/v1/models?types=LORA&sort=Newest``, cursor paging, newest first;
2. ``images`` — ``/api/v1/images?modelVersionId=V&withMeta=true``, one cursor stream per
   known model version (this window's and every earlier window's), several at a time;
3. ``model_versions`` — ``/api/v1/model-versions/{id}`` for LoRA versions that images list
   in ``meta.civitaiResources`` but no models page carried.

Every answer is landed verbatim before it is parsed — except that usernames are replaced by
their salted hash (``warehouse.users``), so no raw username is ever stored — as gzip JSON
lines in the layout of :mod:`warehouse.civitai_release` (one line per page: url without token,
params, status, fetched_at, body), each part file written atomically
(``warehouse.files.atomic_write_bytes``: temp + fsync + rename; one PUT on S3). A per-stream
checkpoint (``_checkpoints/<stream>.json``, atomically replaced) moves on only after the pages
it covers are durably landed, so a ``kill -9`` at any moment loses nothing: the rerun resumes
from the checkpoint and may land a page twice, which the release build collapses by key.

Incremental: a window starts from the watermark of the completed windows before it (newest
model key seen, newest image id per version) and stops each stream when it reaches it; with
``full=True`` everything is re-read (to refresh reaction counts). A completed window is
never crawled again: re-running it does nothing.

Failures are recorded in the report, never raised: a transient one (retries exhausted, a
cursor that does not advance) leaves the window incomplete for a rerun to resume; a permanent
one (404, ...) is recorded and skipped; 401/403 stop the whole crawl (``stopped="auth"``) with
every checkpoint intact, so a rerun with a valid token resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import posixpath
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.civitai.client import ApiResponse, CivitaiClient
from warehouse import civitai_map as cm
from warehouse.civitai_release import (
    FORMAT_VERSION,
    check_window,
    encode_part,
    list_windows,
    part_name,
    window_dir,
)
from warehouse.files import atomic_write_bytes
from warehouse.lake import Lake
from warehouse.schema import RELEASE_TIMESTAMP_FORMAT
from warehouse.users import pseudonymize_body

STATE_FILE = "_state.json"
CHECKPOINTS = "_checkpoints"
AUTH_STATUSES: frozenset[int] = frozenset({401, 403})


@dataclass(frozen=True)
class CrawlOptions:
    """How one :func:`crawl` runs. Only ``user_salt`` is required.

    * ``user_salt`` — salt of the username hash applied before a page is landed (required,
      never shown in the repr);
    * ``full`` (False) — re-read everything instead of stopping at the previous windows'
      watermark (refreshes reaction counts);
    * ``types`` ("LORA") — the ``types`` filter of ``/api/v1/models``;
    * ``models_limit`` (100) / ``images_limit`` (200) — page sizes (the API's maxima);
    * ``concurrency`` (8) — image / model-version streams fetched at once;
    * ``flush_pages`` (64) / ``flush_seconds`` (5.0) — a flush (one part file, then the
      checkpoint) happens after this many buffered pages or this long since the last one;
    * ``max_seconds`` (None) — stop cleanly after this long (``stopped="deadline"``; the
      window stays incomplete and a rerun resumes);
    * ``max_versions`` (None) — crawl the images of at most this many versions (demos);
    * ``progress_seconds`` (15.0) — interval of the progress log line;
    * ``clock`` (``time.monotonic``) — the seconds counter behind ``max_seconds``,
      ``flush_seconds`` and the report's timings (tests inject a counter).
    """

    user_salt: str = field(repr=False)
    full: bool = False
    types: str = "LORA"
    models_limit: int = 100
    images_limit: int = 200
    concurrency: int = 8
    flush_pages: int = 64
    flush_seconds: float = 5.0
    max_seconds: float | None = None
    max_versions: int | None = None
    progress_seconds: float = 15.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.user_salt:
            raise ValueError("user_salt is required: usernames are hashed before pages are landed")
        for name in ("models_limit", "images_limit", "concurrency", "flush_pages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.progress_seconds <= 0:
            raise ValueError("progress_seconds must be positive")


# ---------------------------------------------------------------------------------------------
# Storage (local folder or S3 through the lake's fsspec filesystem)


class _Store:
    """Atomic small-file writes and JSON reads under the lake root."""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake

    def path(self, *parts: str) -> str:
        return posixpath.join(self.lake.root, *parts)

    def put(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically (temp + fsync + rename; one PUT remotely)."""
        atomic_write_bytes(path, data, fs=self.lake.fs)

    def read_json(self, path: str) -> dict[str, Any] | None:
        try:
            with self.lake.fs.open(path, "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None

    def write_json(self, path: str, payload: dict[str, Any]) -> None:
        self.put(path, json.dumps(payload, sort_keys=True).encode())


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
        options: CrawlOptions,
    ) -> None:
        self.store = store
        self.folder = store.path(window_dir(window, stream))
        self.checkpoint_path = store.path(window_dir(window, CHECKPOINTS, f"{stream}.json"))
        self.checkpoint = checkpoint
        self.flush_pages = options.flush_pages
        self.flush_seconds = options.flush_seconds
        self.clock = options.clock
        self.buffer: list[tuple[dict[str, Any], Callable[[dict[str, Any]], None] | None]] = []
        self.last_flush = self.clock()
        self.lock = asyncio.Lock()
        self.parts_written = 0

    def add(
        self, record: dict[str, Any], update: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.buffer.append((record, update))

    async def maybe_flush(self) -> None:
        if len(self.buffer) >= self.flush_pages or (
            self.buffer and self.clock() - self.last_flush >= self.flush_seconds
        ):
            await self.flush()

    async def flush(self, force_checkpoint: bool = False) -> None:
        async with self.lock:
            batch, self.buffer = self.buffer, []
            if not batch and not force_checkpoint:
                return
            if batch:
                seq = int(self.checkpoint.get("next_part", 0))
                data = await asyncio.to_thread(encode_part, [r for r, _ in batch])
                path = posixpath.join(self.folder, part_name(seq))
                await asyncio.to_thread(self.store.put, path, data)
                self.parts_written += 1
                for _, update in batch:
                    if update is not None:
                        update(self.checkpoint)
                self.checkpoint["next_part"] = seq + 1
            payload = json.dumps(self.checkpoint, sort_keys=True).encode()
            await asyncio.to_thread(self.store.put, self.checkpoint_path, payload)
            self.last_flush = self.clock()


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


def _permanent(response: ApiResponse) -> bool:
    """A failure not worth retrying on a rerun: a 4xx answer other than 429 and 401/403
    (those stop the crawl and leave the item to the rerun with a valid token)."""
    status = response.status
    return (
        status is not None and 400 <= status < 500 and status != 429 and status not in AUTH_STATUSES
    )


# ---------------------------------------------------------------------------------------------
# Watermarks


def _key_json(key: tuple[datetime, int] | None) -> list[Any] | None:
    return None if key is None else [key[0].strftime(RELEASE_TIMESTAMP_FORMAT), key[1]]


def _key_from_json(value: Any) -> tuple[datetime, int] | None:
    if not value:
        return None
    return (datetime.strptime(value[0], RELEASE_TIMESTAMP_FORMAT), int(value[1]))


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
        state = store.read_json(store.path(window_dir(name, STATE_FILE)))
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
        options: CrawlOptions,
        log: logging.Logger,
    ) -> None:
        self.options = options
        self.clock = options.clock
        self.lake = lake
        self.store = _Store(lake)
        self.window = window
        self.client = client
        self.log = log
        self.report = CrawlReport(window=window, full=options.full)
        self.started = self.clock()
        self.deadline = None if options.max_seconds is None else self.started + options.max_seconds
        self.transient_failures = 0
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
        record["body"] = pseudonymize_body(record["body"], self.options.user_salt)
        return record

    def _path(self, *parts: str) -> str:
        return self.store.path(window_dir(self.window, *parts))

    def _checkpoint(self, stream: str, default: dict[str, Any]) -> dict[str, Any]:
        found = self.store.read_json(self._path(CHECKPOINTS, f"{stream}.json"))
        return found if found is not None else default

    def _lander(self, stream: str, checkpoint: dict[str, Any]) -> _Lander:
        return _Lander(self.store, self.window, stream, checkpoint, self.options)

    def _out_of_time(self) -> bool:
        if self.deadline is not None and self.clock() >= self.deadline:
            self.report.stopped = self.report.stopped or "deadline"
            return True
        return False

    def _fail(self, stream: str, key: Any, response: ApiResponse, permanent: bool) -> None:
        """Record a failed page; 401/403 then stop the whole crawl (raise :class:`_Abort`)."""
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
        if response.status in AUTH_STATUSES:
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
            await asyncio.sleep(self.options.progress_seconds)  # wall time: only a log line
            elapsed = self.clock() - self.started
            requests = self.client.stats.requests - self.requests_before
            rate = requests / elapsed if elapsed > 0 else 0.0
            items = sum(self.report.items.values())
            eta = ""
            done_now = self.versions_done - self.versions_resumed
            if self.phase == "images" and done_now > 0:
                left = self.versions_total - self.versions_done
                per = (self.clock() - self.images_started) / done_now
                eta = f", ETA {left * per:,.0f}s"
            self.log.info(
                f"civitai window {self.window} [{self.phase}]: {items:,} items, "
                f"{sum(self.report.pages.values()):,} pages, {rate:.1f} req/s, "
                f"{items / elapsed if elapsed > 0 else 0:.1f} items/s, versions "
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
                params = {
                    "types": self.options.types,
                    "sort": "Newest",
                    "limit": self.options.models_limit,
                }
                if cursor:
                    params["cursor"] = cursor
                response, payload = await self._fetch(
                    "models", "/api/v1/models", params, lander, list_page=True
                )
                if payload is None:
                    self._fail("models", cursor, response, _permanent(response))
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
        if self.options.max_versions is not None:
            versions = versions[: self.options.max_versions]
        self.versions_total = len(versions)
        self.report.versions = len(versions)
        if checkpoint["done"]:
            self.versions_done = len(versions)
            return checkpoint
        self.phase = "images"
        self.images_started = self.clock()
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
            workers = [asyncio.create_task(worker()) for _ in range(self.options.concurrency)]
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
                "limit": self.options.images_limit,
            }
            if status["cursor"]:
                params["cursor"] = status["cursor"]
            response, payload = await self._fetch(
                "images", "/api/v1/images", params, lander, list_page=True
            )
            if payload is None:
                permanent = _permanent(response)
                if permanent:  # skipped from now on; auth failures are not (they stop all)
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
                    permanent = _permanent(response)
                    if permanent:
                        lander.add({"stream": "model_versions", "note": "not found"}, update)
                    else:
                        pending_transient = True
                    self._fail("model_versions", version, response, permanent)
                await lander.maybe_flush()

        try:
            workers = [asyncio.create_task(worker()) for _ in range(self.options.concurrency)]
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

    async def run(self) -> CrawlReport:
        state = self.load_state(self.options.full)
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
            self.report.seconds = self.clock() - self.started
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
    options: CrawlOptions,
    *,
    logger: logging.Logger | None = None,
) -> CrawlReport:
    """Async form of :func:`crawl` (same arguments)."""
    check_window(window)
    crawl_run = _Crawl(lake, window, client, options, logger or logging.getLogger(__name__))
    return await crawl_run.run()


def crawl(
    lake: Lake,
    window: str,
    client: CivitaiClient,
    options: CrawlOptions,
    *,
    logger: logging.Logger | None = None,
) -> CrawlReport:
    """Crawl one window of the Civitai API into ``lake``'s raw landing (see the module doc).

    ``options`` says how (:class:`CrawlOptions`: salt, full refresh, page sizes, concurrency,
    flushes, time budget). Failures are recorded in the report, never raised; 401/403 stop the
    crawl (``report.stopped == "auth"``), ``max_seconds`` stops it cleanly (``"deadline"``).
    """
    return asyncio.run(acrawl(lake, window, client, options, logger=logger))


def window_state(lake: Lake, window: str) -> dict[str, Any] | None:
    """The stored state of ``window`` (base watermark, completion, final watermark), or None."""
    store = _Store(lake)
    return store.read_json(store.path(window_dir(window, STATE_FILE)))
