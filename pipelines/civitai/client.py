"""An async Civitai API v1 client: rate limit, retries with backoff, no token leaks.

``CivitaiClient(base_url, token, rate_limit=R)`` sends ``GET`` requests with httpx, at most
``R`` per second (``aiolimiter.AsyncLimiter``, every attempt counted), and retries with
tenacity — exponential backoff with jitter (about 1 s up to 30 s by default, shrinkable for
tests) — on 429, 499, 500–504, timeouts and connection errors, honouring ``Retry-After``.
Other statuses (400, 401, 403, 404, ...) are answered once and returned as failures.

``get()`` never raises for HTTP trouble: it returns an :class:`ApiResponse` with the status,
the body text and, after exhausted retries or a transport error, a scrubbed ``error``. The
token travels only in the ``Authorization: Bearer`` header; recorded URLs drop any ``token``
query parameter and every text the client hands out (errors, logs, exceptions) has the token
replaced by ``***``.

Use it inside ``async with client:`` (one event loop at a time; the same client object can be
reused across ``asyncio.run`` calls and keeps its counters).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import httpx
from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)
from tenacity.wait import wait_base

DEFAULT_BASE_URL = "https://civitai.com"
RETRY_STATUSES: frozenset[int] = frozenset({429, 499, 500, 501, 502, 503, 504})
USER_AGENT = "imagegem-pipeline/0.1 (+civitai crawler)"
_TOKEN_PARAM = re.compile(r"([?&](?:token|api_key|apikey)=)[^&#\s\"']*", re.I)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.I)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: ``attempts`` in all, backoff ``initial``·2ⁿ ≤ ``maximum``.

    ``jitter`` adds up to that many seconds at random; a ``Retry-After`` header replaces the
    backoff (capped at ``max_retry_after``).
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
        """Seconds to wait after failed attempt ``attempt`` (from 1).

        ``initial``·2^(attempt-1) plus up to ``jitter`` at random, capped at ``maximum`` (the
        formula of tenacity's ``wait_exponential_jitter``).
        """
        value = self.initial * 2 ** min(attempt - 1, 60) + random.uniform(0, self.jitter)
        return max(0.0, min(value, self.maximum))


@dataclass
class ApiResponse:
    """The final answer to one request (after retries), with what is needed to land it raw."""

    url: str  # full URL without any token
    params: dict[str, str]
    status: int | None  # None: no HTTP answer (timeout / connection error after retries)
    body: str
    fetched_at: str  # ISO 8601 UTC, microseconds
    elapsed: float
    attempts: int
    error: str | None = None  # scrubbed; set when the request failed
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        """A 2xx answer."""
        return self.error is None and self.status is not None and 200 <= self.status < 300

    def raise_for_failure(self) -> None:
        """Raise :class:`CivitaiError` (scrubbed message) unless the answer is 2xx."""
        if not self.ok:
            raise CivitaiError(self.error or f"HTTP {self.status} for {self.url}", self.status)


class CivitaiError(Exception):
    """A failed Civitai request; the message never contains the token."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ClientStats:
    """Counters over the client's life: attempts, retries, answers by status, errors."""

    requests: int = 0  # HTTP attempts sent
    retries: int = 0
    failures: int = 0  # requests that ended without a 2xx answer
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


class _Retryable(Exception):
    def __init__(
        self,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
        response: ApiResponse | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.response = response


class _Wait(wait_base):
    """``Retry-After`` when the answer gave one, else exponential backoff with jitter."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(exc.retry_after, self.policy.max_retry_after)
        return self.policy.backoff(retry_state.attempt_number)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds, fractional seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class CivitaiClient:
    """Async Civitai API v1 client (see the module docstring)."""

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
    ) -> None:
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be positive (or None for no limit)")
        self.base_url = base_url.rstrip("/")
        self._token = token or None
        self.rate_limit = rate_limit
        self.burst = burst if burst is not None else max(1.0, (rate_limit or 0) / 10)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_connections = max_connections
        self.log = logger or logging.getLogger(__name__)
        self.user_agent = user_agent
        self.transport = transport
        self.stats = ClientStats()
        self._http: httpx.AsyncClient | None = None
        self._limiter: AsyncLimiter | None = None
        self._opened = 0

    def __repr__(self) -> str:
        auth = "token=***" if self._token else "no token"
        return f"CivitaiClient({self.base_url!r}, {auth}, rate_limit={self.rate_limit})"

    @property
    def has_token(self) -> bool:
        """Whether requests carry an API token."""
        return self._token is not None

    # -- secrets ---------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        """``text`` with the token (and any ``token=``/Bearer value) replaced by ``***``."""
        if not text:
            return text
        if self._token:
            text = text.replace(self._token, "***")
        text = _TOKEN_PARAM.sub(r"\1***", text)
        return _BEARER.sub(r"\1***", text)

    def public_url(self, path: str, params: dict[str, Any] | None = None) -> str:
        """The URL of a request as recorded: base + path + query, never a token."""
        clean = {
            k: str(v)
            for k, v in (params or {}).items()
            if v is not None and k.lower() not in ("token", "api_key", "apikey")
        }
        url = self.base_url + path
        return self.scrub(url + ("?" + urlencode(clean) if clean else ""))

    # -- session ---------------------------------------------------------------------------
    async def __aenter__(self) -> CivitaiClient:
        if self._opened == 0:
            headers = {"User-Agent": self.user_agent, "Accept": "application/json"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            limits = httpx.Limits(
                max_connections=self.max_connections,
                max_keepalive_connections=self.max_connections,
            )
            self._http = httpx.AsyncClient(
                base_url=self.base_url,
                headers=headers,
                timeout=httpx.Timeout(self.timeout),
                limits=limits,
                transport=self.transport,
                follow_redirects=False,
            )
            if self.rate_limit:
                self._limiter = AsyncLimiter(self.burst, self.burst / self.rate_limit)
        self._opened += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._opened -= 1
        if self._opened == 0 and self._http is not None:
            http, self._http, self._limiter = self._http, None, None
            await http.aclose()

    # -- requests --------------------------------------------------------------------------
    async def get(self, path: str, params: dict[str, Any] | None = None) -> ApiResponse:
        """GET ``path`` (e.g. ``/api/v1/models``) with retries; never raises for HTTP trouble."""
        if self._http is None:
            raise RuntimeError("use the client inside `async with client:`")
        clean = {k: str(v) for k, v in (params or {}).items() if v is not None}
        url = self.public_url(path, clean)
        started = time.monotonic()
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, self.retry.attempts)),
            wait=_Wait(self.retry),
            retry=retry_if_exception_type(_Retryable),
            before_sleep=self._before_sleep(url),
            reraise=True,
        )
        response: ApiResponse | None = None
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    response = await self._attempt(path, clean, url, started, attempts)
        except _Retryable as exc:
            self.stats.failures += 1
            failed = exc.response or ApiResponse(
                url=url,
                params=self._public_params(clean),
                status=exc.status,
                body="",
                fetched_at=_now(),
                elapsed=time.monotonic() - started,
                attempts=attempts,
            )
            failed.error = self.scrub(f"gave up after {attempts} attempts: {exc}")
            self.log.warning(f"civitai: {failed.error}")
            return failed
        assert response is not None
        if not response.ok:
            self.stats.failures += 1
            response.error = self.scrub(f"HTTP {response.status} for {url}")
        return response

    def _public_params(self, params: dict[str, str]) -> dict[str, str]:
        return {
            k: self.scrub(v)
            for k, v in params.items()
            if k.lower() not in ("token", "api_key", "apikey")
        }

    async def _attempt(
        self, path: str, params: dict[str, str], url: str, started: float, attempt: int
    ) -> ApiResponse:
        assert self._http is not None
        if self._limiter is not None:
            await self._limiter.acquire()
        self.stats.requests += 1
        try:
            answer = await self._http.get(path, params=params)
        except httpx.TimeoutException as exc:
            self.stats.errors["timeout"] += 1
            raise _Retryable(self.scrub(f"timeout ({type(exc).__name__}) for {url}")) from None
        except httpx.TransportError as exc:
            self.stats.errors["connection"] += 1
            raise _Retryable(
                self.scrub(f"connection error ({type(exc).__name__}: {exc}) for {url}")
            ) from None
        body = self.scrub(answer.text)
        self.stats.bytes += len(answer.content)
        self.stats.statuses[answer.status_code] += 1
        response = ApiResponse(
            url=url,
            params=self._public_params(params),
            status=answer.status_code,
            body=body,
            fetched_at=_now(),
            elapsed=time.monotonic() - started,
            attempts=attempt,
            retry_after=parse_retry_after(answer.headers.get("Retry-After")),
        )
        if answer.status_code in RETRY_STATUSES:
            raise _Retryable(
                f"HTTP {answer.status_code} for {url}",
                status=answer.status_code,
                retry_after=response.retry_after,
                response=response,
            )
        return response

    def _before_sleep(self, url: str):
        async def hook(state: RetryCallState) -> None:
            self.stats.retries += 1
            wait = state.next_action.sleep if state.next_action else 0.0
            self.stats.seconds_waiting += wait
            exc = state.outcome.exception() if state.outcome else None
            self.log.debug(
                f"civitai: retry {state.attempt_number}/{self.retry.attempts} of {url} "
                f"after {self.scrub(str(exc))}; waiting {wait:.2f}s"
            )

        return hook

    async def backoff(self, attempt: int) -> None:
        """Sleep the policy's backoff before retry ``attempt`` (for callers' own retries)."""
        wait = self.retry.backoff(attempt)
        self.stats.retries += 1
        self.stats.seconds_waiting += wait
        await asyncio.sleep(wait)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
