"""The Civitai client: retries, Retry-After, 4xx handling, rate limit, no token leaks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from pipelines.civitai.client import (
    CivitaiClient,
    CivitaiError,
    RetryPolicy,
    parse_retry_after,
)

TOKEN = "tok-SECRET-0123456789abcdef"
FAST = RetryPolicy.fast(attempts=4)


def scripted(answers: list[Callable[[httpx.Request], httpx.Response] | httpx.Response]):
    """A transport answering the listed responses in turn (callables may raise)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen), len(answers)) - 1]
        return answer(request) if callable(answer) else answer

    return httpx.MockTransport(handler), seen


def run_get(client: CivitaiClient, path: str = "/api/v1/models", params=None):
    async def go():
        async with client:
            return await client.get(path, params or {"limit": 1})

    return asyncio.run(go())


def ok(payload: str = '{"items": [], "metadata": {}}') -> httpx.Response:
    return httpx.Response(200, text=payload)


def test_retry_after_is_honoured_then_success():
    transport, seen = scripted(
        [httpx.Response(503, headers={"Retry-After": "0.3"}, json={"error": "busy"}), ok()]
    )
    client = CivitaiClient("http://civitai.test", retry=FAST, transport=transport)
    started = time.monotonic()
    response = run_get(client)
    assert time.monotonic() - started >= 0.3
    assert response.ok and response.attempts == 2
    assert client.stats.retries == 1 and client.stats.requests == 2
    assert client.stats.statuses == {503: 1, 200: 1}


@pytest.mark.parametrize("status", [429, 499, 500, 502, 503, 504])
def test_retryable_statuses_are_retried(status):
    transport, seen = scripted([httpx.Response(status, text=""), ok()])
    client = CivitaiClient("http://civitai.test", retry=FAST, transport=transport)
    assert run_get(client).ok
    assert len(seen) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_other_4xx_are_returned_once_as_failures(status):
    transport, seen = scripted([httpx.Response(status, json={"error": "No model with id 5"})])
    client = CivitaiClient("http://civitai.test", retry=FAST, transport=transport)
    response = run_get(client)
    assert len(seen) == 1 and client.stats.retries == 0
    assert not response.ok and response.status == status and "No model" in response.body
    assert client.stats.failures == 1
    with pytest.raises(CivitaiError) as info:
        response.raise_for_failure()
    assert info.value.status == status


def test_gives_up_after_the_policy_attempts():
    transport, seen = scripted([httpx.Response(429, headers={"Retry-After": "0"})])
    client = CivitaiClient("http://civitai.test", retry=RetryPolicy.fast(3), transport=transport)
    response = run_get(client)
    assert len(seen) == 3 and not response.ok and response.status == 429
    assert "gave up after 3 attempts" in response.error


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError("refused"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
)
def test_timeouts_and_connection_errors_are_retried(error):
    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    transport, seen = scripted([fail, fail, ok()])
    client = CivitaiClient("http://civitai.test", retry=FAST, transport=transport)
    response = run_get(client)
    assert response.ok and len(seen) == 3
    assert sum(client.stats.errors.values()) == 2


def test_exponential_backoff_is_bounded_and_grows():
    policy = RetryPolicy(initial=1.0, maximum=30.0, jitter=0.0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4, 5, 6, 7)] == [1, 2, 4, 8, 16, 30, 30]
    jittered = RetryPolicy(initial=1.0, maximum=30.0, jitter=1.0)
    assert all(1.0 <= jittered.backoff(1) <= 2.0 for _ in range(50))


def test_parse_retry_after_forms():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.25") == 0.25
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= parse_retry_after(later) <= 31
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_rate_limit_paces_requests():
    transport, seen = scripted([ok()])
    client = CivitaiClient("http://civitai.test", rate_limit=50, retry=FAST, transport=transport)

    async def go():
        async with client:
            await asyncio.gather(*(client.get("/api/v1/models") for _ in range(30)))

    started = time.monotonic()
    asyncio.run(go())
    elapsed = time.monotonic() - started
    # 30 requests at 50/s with a burst of 5: at least (30 - 5) / 50 s.
    assert elapsed >= 0.45 and len(seen) == 30


def test_token_only_in_the_authorization_header_never_in_records(caplog):
    caplog.set_level(logging.DEBUG)

    def echo_failure(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {request.url} with Bearer {TOKEN}")

    transport, seen = scripted([echo_failure])
    client = CivitaiClient(
        "http://civitai.test", TOKEN, retry=RetryPolicy.fast(2), transport=transport
    )
    response = run_get(client, params={"limit": 1, "token": TOKEN})
    assert seen[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert not response.ok and response.status is None
    texts = [response.url, response.error or "", repr(response.params), repr(client), caplog.text]
    with pytest.raises(CivitaiError) as info:
        response.raise_for_failure()
    texts.append(str(info.value))
    for text in texts:
        assert TOKEN not in text
    assert "***" in response.error


def test_token_scrubbed_from_bodies_echoing_it():
    transport, _ = scripted([httpx.Response(401, json={"error": f"bad key {TOKEN}"})])
    client = CivitaiClient("http://civitai.test", TOKEN, retry=FAST, transport=transport)
    response = run_get(client)
    assert response.status == 401 and TOKEN not in response.body


def test_repr_never_shows_the_token():
    client = CivitaiClient("http://127.0.0.1:9", TOKEN, rate_limit=20, timeout=5.0)
    assert client.has_token and client.rate_limit == 20.0 and client.timeout == 5.0
    assert TOKEN not in repr(client)
    assert not CivitaiClient().has_token and CivitaiClient().base_url == "https://civitai.com"
