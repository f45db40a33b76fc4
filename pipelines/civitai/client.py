"""An async Civitai API v1 client over the one HTTP policy (`pipelines.civitai.http`).

``CivitaiClient(base_url, token, rate_limit=R)`` sends ``GET`` requests through an
:class:`~pipelines.civitai.http.HttpSession`: at most ``R`` per second (every attempt
counted), retried with tenacity — exponential backoff with jitter (about 1 s up to 30 s by
default, shrinkable for tests) — on 429, 499, 5xx, timeouts and connection errors, honouring
``Retry-After`` (seconds or an HTTP date, capped). Other statuses (400, 401, 403, 404, ...)
are answered once and returned as failures.

``get()`` never raises for HTTP trouble: it returns an :class:`ApiResponse` with the status,
the body text and, after exhausted retries or a transport error, a scrubbed ``error``. The
token travels only in the ``Authorization: Bearer`` header; recorded URLs drop any ``token``
query parameter and every text the client hands out (errors, logs, exceptions) has the token
replaced by ``***``.

Use it inside ``async with client:`` (one event loop at a time; the same client object can be
reused across ``asyncio.run`` calls and keeps its counters).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from pipelines.civitai.http import (
    DEFAULT_BASE_URL,
    RETRY_STATUSES,
    TOKEN_PARAMS,
    USER_AGENT,
    HttpSession,
    HttpStats,
    Retryable,
    RetryPolicy,
    Sleep,
    is_retryable,
    now_iso,
    parse_retry_after,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "RETRY_STATUSES",
    "USER_AGENT",
    "ApiResponse",
    "CivitaiClient",
    "CivitaiError",
    "ClientStats",
    "RetryPolicy",
    "parse_retry_after",
]

ClientStats = HttpStats  # the client's counters are its session's


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
        sleep: Sleep | None = None,
    ) -> None:
        self.session = HttpSession(
            base_url,
            token,
            rate_limit=rate_limit,
            burst=burst,
            timeout=timeout,
            retry=retry,
            max_connections=max_connections,
            logger=logger or logging.getLogger(__name__),
            user_agent=user_agent,
            transport=transport,
            sleep=sleep,
        )
        self.base_url = self.session.base_url
        self.rate_limit = rate_limit
        self.burst = self.session.burst
        self.timeout = timeout
        self.retry = self.session.retry
        self.max_connections = max_connections
        self.log = self.session.log
        self.user_agent = user_agent
        self.transport = transport
        self.stats: ClientStats = self.session.stats

    def __repr__(self) -> str:
        auth = "token=***" if self.has_token else "no token"
        return f"CivitaiClient({self.base_url!r}, {auth}, rate_limit={self.rate_limit})"

    @property
    def has_token(self) -> bool:
        """Whether requests carry an API token."""
        return self.session.has_token

    # -- secrets ---------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        """``text`` with the token (and any ``token=``/Bearer value) replaced by ``***``."""
        return self.session.scrub(text)

    def public_url(self, path: str, params: dict[str, Any] | None = None) -> str:
        """The URL of a request as recorded: base + path + query, never a token."""
        clean = {
            k: str(v)
            for k, v in (params or {}).items()
            if v is not None and k.lower() not in TOKEN_PARAMS
        }
        url = self.base_url + path
        return self.scrub(url + ("?" + urlencode(clean) if clean else ""))

    # -- session ---------------------------------------------------------------------------
    async def __aenter__(self) -> CivitaiClient:
        await self.session.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.__aexit__(*exc)

    # -- requests --------------------------------------------------------------------------
    async def get(self, path: str, params: dict[str, Any] | None = None) -> ApiResponse:
        """GET ``path`` (e.g. ``/api/v1/models``) with retries; never raises for HTTP trouble."""
        if not self.session.is_open:
            raise RuntimeError("use the client inside `async with client:`")
        clean = {k: str(v) for k, v in (params or {}).items() if v is not None}
        url = self.public_url(path, clean)
        started = time.monotonic()

        async def attempt(number: int) -> ApiResponse:
            return await self._attempt(path, clean, url, started, number)

        try:
            response = await self.session.retrying(attempt, url)
        except Retryable as exc:
            self.stats.failures += 1
            failed = exc.payload or ApiResponse(
                url=url,
                params=self._public_params(clean),
                status=exc.status,
                body="",
                fetched_at=now_iso(),
                elapsed=time.monotonic() - started,
                attempts=exc.attempts,
            )
            failed.error = self.scrub(f"gave up after {exc.attempts} attempts: {exc}")
            self.log.warning(f"civitai: {failed.error}")
            return failed
        if not response.ok:
            self.stats.failures += 1
            response.error = self.scrub(f"HTTP {response.status} for {url}")
        return response

    def _public_params(self, params: dict[str, str]) -> dict[str, str]:
        return {k: self.scrub(v) for k, v in params.items() if k.lower() not in TOKEN_PARAMS}

    async def _attempt(
        self, path: str, params: dict[str, str], url: str, started: float, attempt: int
    ) -> ApiResponse:
        answer = await self.session.send(
            self.base_url + path,
            params=params,
            headers={"Accept": "application/json"},
            shown=url,
        )
        body = self.scrub(answer.text)
        self.stats.bytes += len(answer.content)
        response = ApiResponse(
            url=url,
            params=self._public_params(params),
            status=answer.status_code,
            body=body,
            fetched_at=now_iso(),
            elapsed=time.monotonic() - started,
            attempts=attempt,
            retry_after=parse_retry_after(answer.headers.get("Retry-After")),
        )
        if is_retryable(answer.status_code):
            raise Retryable(
                f"HTTP {answer.status_code} for {url}",
                status=answer.status_code,
                retry_after=response.retry_after,
                payload=response,
            )
        return response

    async def backoff(self, attempt: int) -> None:
        """Sleep the policy's backoff before retry ``attempt`` (for callers' own retries)."""
        await self.session.backoff(attempt)
