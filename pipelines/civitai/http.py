"""The one HTTP policy for everything that talks to Civitai: the API client and the downloaders.

`HttpSession` is the stack both use (``CivitaiClient`` for ``/api/v1`` pages, the image and
LoRA downloaders in `pipelines.civitai.downloads`):

* one user agent, :data:`USER_AGENT`;
* retries with tenacity on :func:`is_retryable` statuses (429, 499, every 5xx), timeouts and
  connection errors (refused, reset, a body cut short): exponential backoff with jitter
  (tenacity's ``wait_exponential_jitter``) as set by a :class:`RetryPolicy`, replaced by the
  answer's ``Retry-After`` (delta-seconds or an HTTP date, :func:`parse_retry_after`) capped
  at ``RetryPolicy.max_retry_after``; other statuses (401, 403, 404, ...) are never retried;
* a rate limit (``aiolimiter.AsyncLimiter``): at most ``rate_limit`` requests per second,
  every attempt and every redirect hop counted;
* the API token only ever in an ``Authorization: Bearer`` header, and only on requests to the
  API's own origin (never to a CDN a redirect points at); every URL meant for a table drops
  its token parameters (:func:`strip_token`) and every text that may be logged, stored or
  raised has the token replaced by ``***`` (:func:`scrub`);
* while a session with a token is open, the records of httpx's and httpcore's own loggers
  are scrubbed too (:class:`ScrubFilter`);
* counters (:class:`HttpStats`): attempts, retries, answers by status, errors, waiting time.

Redirects are never followed by httpx: a caller that follows them (the downloaders) checks
each hop itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import SimpleNamespace
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from warehouse.schema import CIVITAI_IMAGE_CDN, CIVITAI_SITE

DEFAULT_BASE_URL = CIVITAI_SITE
IMAGE_CDN_URL = CIVITAI_IMAGE_CDN  # where Civitai's image URLs point
USER_AGENT = "imagegem-pipeline/0.1 (+civitai client)"
RETRY_STATUSES: frozenset[int] = frozenset({429, 499, *range(500, 600)})
TOKEN_PARAMS: tuple[str, ...] = ("token", "api_key", "apikey")

_PARAM_NAMES = "|".join(TOKEN_PARAMS)
_TOKEN_VALUE = re.compile(rf"((?<![\w-])(?:{_PARAM_NAMES})=)[^&#;\s\"']*", re.I)
_TOKEN_PARAM = re.compile(rf"([?&])(?:{_PARAM_NAMES})=[^&#]*&?", re.I)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.I)

# The loggers of httpx / httpcore: they log URLs and, at DEBUG, raw response headers (a server
# may echo the token in a Location); a session with a token scrubs their records while open.
LIBRARY_LOGGERS: tuple[str, ...] = (
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


def is_retryable(status: int) -> bool:
    """Whether an HTTP status is worth another attempt (429, 499, 5xx)."""
    return status in RETRY_STATUSES


# ---------------------------------------------------------------------------------------------
# Tokens


def strip_token(url: str | None) -> str | None:
    """``url`` without ``token`` / ``api_key`` query parameters (for tables and logs); the
    other parameters keep their order and encoding."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL: cut the parameters out of the text
        return _TOKEN_PARAM.sub(lambda m: m.group(1), url).rstrip("?&")
    kept = [
        pair
        for pair in parts.query.split("&")
        if pair and pair.split("=", 1)[0].lower() not in TOKEN_PARAMS
    ]
    return urlunsplit(parts._replace(query="&".join(kept)))


def scrub(text: str, token: str | None = None) -> str:
    """``text`` with ``token``, any ``token=``/``api_key=`` value and any Bearer value
    replaced by ``***``: for every text that may be logged, stored or raised."""
    if not text:
        return text
    if token:
        text = text.replace(token, "***")
    text = _TOKEN_VALUE.sub(r"\1***", text)
    return _BEARER.sub(r"\1***", text)


def origin(url: str) -> tuple[str, str]:
    """(scheme, host[:port]) of ``url``, lowercased: where a bearer token may go."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


# ---------------------------------------------------------------------------------------------
# Retry policy


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds (fractions accepted) or an HTTP
    date (relative to ``now``, default the current UTC time); None when absent or unreadable.
    Past dates and negative numbers give 0."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN is unreadable
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: ``attempts`` in all, backoff ``initial``·2ⁿ ≤ ``maximum``.

    ``jitter`` adds up to that many seconds at random; a ``Retry-After`` header replaces the
    backoff, capped at ``max_retry_after``.
    """

    attempts: int = 8
    initial: float = 1.0
    maximum: float = 30.0
    jitter: float = 1.0
    max_retry_after: float = 60.0

    @classmethod
    def fast(cls, attempts: int = 8) -> RetryPolicy:
        """A policy for tests: milliseconds instead of seconds."""
        return cls(attempts=attempts, initial=0.01, maximum=0.05, jitter=0.01, max_retry_after=2.0)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (from 1): ``initial``·2^(attempt-1)
        plus up to ``jitter`` at random, capped at ``maximum`` (tenacity's exponential and
        random waits combined: the formula of its ``wait_exponential_jitter``)."""
        wait = wait_exponential(multiplier=self.initial, max=self.maximum) + wait_random(
            0, self.jitter
        )
        state = SimpleNamespace(attempt_number=max(1, min(attempt, 64)))
        return max(0.0, min(float(wait(state)), self.maximum))  # type: ignore[arg-type]

    def wait(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt``: the server's ``Retry-After``
        (capped at ``max_retry_after``) when it gave one, else the backoff."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        return self.backoff(attempt)


class Retryable(Exception):
    """A failed attempt worth repeating (retryable status, timeout, connection error).

    ``kind``: ``"http"`` (``status`` set), ``"timeout"`` or ``"connection"``. ``payload``:
    whatever the caller wants back when retries run out (the client's ``ApiResponse``).
    ``detail``: what went wrong without the URL (for tables). ``attempts``: set when the
    last attempt failed. Message and detail are already scrubbed.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str = "http",
        status: int | None = None,
        retry_after: float | None = None,
        payload: Any = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.payload = payload
        self.detail = detail
        self.attempts = 0


class _Wait(wait_base):
    """``Retry-After`` (capped) when the failed attempt carried one, else the backoff."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = exc.retry_after if isinstance(exc, Retryable) else None
        return self.policy.wait(retry_state.attempt_number, retry_after)


class ScrubFilter(logging.Filter):
    """A logging filter that replaces a token in every record's message by ``***``."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's business
            return True
        clean = scrub(message, self.token)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


# ---------------------------------------------------------------------------------------------
# Session


@dataclass
class HttpStats:
    """Counters over a session's life: attempts, retries, answers by status, errors."""

    requests: int = 0  # HTTP attempts sent (redirect hops included)
    retries: int = 0
    failures: int = 0  # requests that ended without a 2xx answer (counted by the caller)
    bytes: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # timeout, connection, ...
    seconds_waiting: float = 0.0  # backoff / Retry-After sleeps

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counters."""
        return {
            "requests": self.requests,
            "retries": self.retries,
            "failures": self.failures,
            "bytes": self.bytes,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "seconds_waiting": round(self.seconds_waiting, 3),
        }


class HttpSession:
    """The async HTTP stack for Civitai (see the module docstring).

    Use it inside ``async with session:`` (one event loop at a time; the same object can be
    reused across ``asyncio.run`` calls and keeps its counters). ``base_url`` is the API
    origin: the only origin that receives the bearer ``token``. ``sleep`` replaces
    ``asyncio.sleep`` between retries (tests record the waits instead of sleeping).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        token: str | None = None,
        *,
        rate_limit: float | None = None,
        burst: float | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 16,
        logger: logging.Logger | None = None,
        user_agent: str = USER_AGENT,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep | None = None,
        label: str = "civitai",
    ) -> None:
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be positive (or None for no limit)")
        self.base_url = base_url.rstrip("/")
        self._token = token or None
        self.rate_limit = rate_limit
        self.burst = burst if burst is not None else max(1.0, (rate_limit or 0) / 10)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_connections = max(1, max_connections)
        self.log = logger or logging.getLogger(__name__)
        self.user_agent = user_agent
        self.transport = transport
        self.label = label
        self.stats = HttpStats()
        self._sleep: Sleep = sleep or asyncio.sleep
        self._http: httpx.AsyncClient | None = None
        self._limiter: AsyncLimiter | None = None
        self._filter = ScrubFilter(self._token) if self._token else None
        self._opened = 0

    def __repr__(self) -> str:
        auth = "token=***" if self._token else "no token"
        return f"HttpSession({self.base_url!r}, {auth}, rate_limit={self.rate_limit})"

    @property
    def has_token(self) -> bool:
        """Whether requests to the API origin carry a token."""
        return self._token is not None

    @property
    def is_open(self) -> bool:
        """Whether the session is inside ``async with``."""
        return self._http is not None

    def scrub(self, text: str) -> str:
        """:func:`scrub` with this session's token."""
        return scrub(text, self._token)

    def auth_headers(self, url: str) -> dict[str, str]:
        """``Authorization: Bearer`` for a URL on the API origin (with a token), else nothing."""
        if self._token and origin(url) == origin(self.base_url):
            return {"Authorization": f"Bearer {self._token}"}
        return {}

    # -- life ------------------------------------------------------------------------------
    async def __aenter__(self) -> HttpSession:
        if self._opened == 0:
            limits = httpx.Limits(
                max_connections=self.max_connections,
                max_keepalive_connections=self.max_connections,
            )
            self._http = httpx.AsyncClient(
                headers={"User-Agent": self.user_agent},
                timeout=httpx.Timeout(self.timeout),
                limits=limits,
                transport=self.transport,
                follow_redirects=False,
            )
            if self.rate_limit:
                self._limiter = AsyncLimiter(self.burst, self.burst / self.rate_limit)
            if self._filter is not None:
                for name in LIBRARY_LOGGERS:
                    logging.getLogger(name).addFilter(self._filter)
        self._opened += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._opened -= 1
        if self._opened == 0 and self._http is not None:
            http, self._http, self._limiter = self._http, None, None
            try:
                await http.aclose()
            finally:
                if self._filter is not None:
                    for name in LIBRARY_LOGGERS:
                        logging.getLogger(name).removeFilter(self._filter)

    # -- one attempt -----------------------------------------------------------------------
    async def send(
        self,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        shown: str | None = None,
    ) -> httpx.Response:
        """One ``GET`` attempt of ``url``, after the rate limiter, never following redirects.

        The bearer token is added for the API origin only. Timeouts and transport errors
        become :class:`Retryable` with a scrubbed message naming ``shown`` (default: the URL
        without its token). A streamed response must be closed by the caller."""
        if self._http is None:
            raise RuntimeError("use the session inside `async with session:`")
        if self._limiter is not None:
            await self._limiter.acquire()
        self.stats.requests += 1
        where = shown if shown is not None else strip_token(url)
        request = self._http.build_request(
            "GET", url, params=params, headers={**(headers or {}), **self.auth_headers(url)}
        )
        try:
            answer = await self._http.send(request, stream=stream, follow_redirects=False)
        except httpx.TimeoutException as exc:
            self.stats.errors["timeout"] += 1
            raise Retryable(
                self.scrub(f"timeout ({type(exc).__name__}) for {where}"),
                kind="timeout",
                detail=type(exc).__name__,
            ) from None
        except httpx.TransportError as exc:
            self.stats.errors["connection"] += 1
            detail = self.scrub(f"{type(exc).__name__}: {exc}")
            raise Retryable(
                self.scrub(f"connection error ({detail}) for {where}"),
                kind="connection",
                detail=detail,
            ) from None
        self.stats.statuses[answer.status_code] += 1
        return answer

    def read_error(self, exc: httpx.TransportError, where: str | None) -> Retryable:
        """A transport error while reading a body (a reset, a cut-short body) as a
        :class:`Retryable`, counted like a failed request."""
        kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection"
        self.stats.errors[kind] += 1
        what = "timeout" if kind == "timeout" else "connection error"
        detail = self.scrub(f"{type(exc).__name__} while reading the body")
        return Retryable(
            self.scrub(f"{what}: {detail} of {strip_token(where)}"), kind=kind, detail=detail
        )

    # -- retries ---------------------------------------------------------------------------
    async def retrying(self, attempt: Callable[[int], Awaitable[T]], what: str) -> T:
        """``await attempt(n)`` for n = 1, 2, ... while it raises :class:`Retryable`, waiting
        as the policy says between attempts. When the attempts run out, the last
        :class:`Retryable` is raised with ``attempts`` set; any other exception passes."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, self.retry.attempts)),
            wait=_Wait(self.retry),
            retry=retry_if_exception_type(Retryable),
            before_sleep=self._before_sleep(what),
            sleep=self._sleep,
            reraise=True,
        )
        number = 0
        try:
            async for state in retrying:
                with state:
                    number = state.retry_state.attempt_number
                    return await attempt(number)
        except Retryable as exc:
            exc.attempts = number
            raise
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _before_sleep(self, what: str) -> Callable[[RetryCallState], Awaitable[None]]:
        async def hook(state: RetryCallState) -> None:
            self.stats.retries += 1
            wait = state.next_action.sleep if state.next_action else 0.0
            self.stats.seconds_waiting += wait
            exc = state.outcome.exception() if state.outcome else None
            self.log.debug(
                self.scrub(
                    f"{self.label}: retry {state.attempt_number}/{self.retry.attempts} of "
                    f"{strip_token(what)} after {exc}; waiting {wait:.2f}s"
                )
            )

        return hook

    async def backoff(self, attempt: int) -> None:
        """Sleep the policy's backoff before retry ``attempt`` (for callers' own retries)."""
        wait = self.retry.backoff(attempt)
        self.stats.retries += 1
        self.stats.seconds_waiting += wait
        await self._sleep(wait)


def now_iso() -> str:
    """The current UTC time as ISO 8601 with microseconds (``...Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
