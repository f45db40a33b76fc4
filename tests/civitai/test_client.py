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

from pipelines.civitai import http
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


@pytest.mark.parametrize("status", [429, 499, 500, 502, 503, 504, 520])
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


def _recorder():
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    return waits, sleep


def test_parse_retry_after_with_a_given_clock():
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Sun, 01 Mar 2026 12:00:45 GMT", now=now) == 45.0
    assert parse_retry_after("Sun, 01 Mar 2026 11:59:00 GMT", now=now) == 0.0  # past: now
    assert parse_retry_after("Sunday, 01-Mar-26 12:01:00 GMT", now=now) == 60.0  # RFC 850
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("nan") is None and parse_retry_after("  ") is None


def test_retry_after_as_an_http_date_is_waited_by_the_client():
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=40), usegmt=True)
    transport, seen = scripted([httpx.Response(503, headers={"Retry-After": later}), ok()])
    waits, sleep = _recorder()
    policy = RetryPolicy(attempts=3, initial=0.01, maximum=0.05, jitter=0.0, max_retry_after=90)
    client = CivitaiClient("http://civitai.test", retry=policy, transport=transport, sleep=sleep)
    assert run_get(client).ok and len(seen) == 2
    assert len(waits) == 1 and 30.0 <= waits[0] <= 40.0


def test_retry_after_beyond_the_cap_is_capped_for_the_client():
    transport, seen = scripted([httpx.Response(429, headers={"Retry-After": "86400"}), ok()])
    waits, sleep = _recorder()
    policy = RetryPolicy(attempts=3, initial=0.01, maximum=0.05, jitter=0.0, max_retry_after=2.5)
    client = CivitaiClient("http://civitai.test", retry=policy, transport=transport, sleep=sleep)
    assert run_get(client).ok
    assert waits == [2.5] and client.stats.seconds_waiting == 2.5
    assert policy.wait(1, 86400.0) == 2.5 and policy.wait(1, 1.0) == 1.0
    assert policy.wait(3, None) == 0.04  # no Retry-After: the backoff


def test_the_client_and_the_downloads_share_one_policy():
    from pipelines.civitai import client as client_module
    from pipelines.civitai import downloads

    assert client_module.RetryPolicy is http.RetryPolicy is downloads.RetryPolicy
    assert client_module.USER_AGENT == http.USER_AGENT == downloads.USER_AGENT
    assert client_module.RETRY_STATUSES is http.RETRY_STATUSES
    assert {429, 499, 500, 503, 599} <= http.RETRY_STATUSES
    assert not {400, 401, 403, 404, 410} & http.RETRY_STATUSES
    transport, seen = scripted([ok()])
    run_get(CivitaiClient("http://civitai.test", TOKEN, retry=FAST, transport=transport))
    assert seen[0].headers["User-Agent"] == http.USER_AGENT


def test_the_token_goes_to_the_api_origin_only():
    session = http.HttpSession("https://civitai.com", TOKEN)
    assert session.auth_headers("https://civitai.com/api/download/models/1") == {
        "Authorization": f"Bearer {TOKEN}"
    }
    for other in (
        "https://cdn.civitai.com/file",
        "http://civitai.com/api/v1/models",  # another scheme is another origin
        "https://civitai.com.evil.test/api",
    ):
        assert session.auth_headers(other) == {}
    assert http.HttpSession("https://civitai.com").auth_headers("https://civitai.com/x") == {}


def test_tokens_are_stripped_from_urls_and_scrubbed_from_texts():
    assert (
        http.strip_token("https://x/api/download/models/1?token=SECRET")
        == "https://x/api/download/models/1"
    )
    assert http.strip_token("https://x/y?type=Model&token=SECRET&format=SafeTensor") == (
        "https://x/y?type=Model&format=SafeTensor"
    )
    assert http.strip_token("https://x/y?API_KEY=SECRET") == "https://x/y"
    assert http.strip_token("https://x/y?a=%20b&token=S#frag") == "https://x/y?a=%20b#frag"
    assert http.strip_token("https://x/y?mytoken=kept") == "https://x/y?mytoken=kept"
    assert http.strip_token(None) is None
    text = f"GET https://x/y?a=1&token=abc failed; api_key=def; Bearer {TOKEN} ({TOKEN})"
    assert http.scrub(text, TOKEN) == (
        "GET https://x/y?a=1&token=*** failed; api_key=***; Bearer *** (***)"
    )
    assert http.scrub("mytoken=kept", None) == "mytoken=kept"  # only whole parameter names


def test_library_loggers_are_scrubbed_while_a_session_is_open(caplog):
    caplog.set_level(logging.DEBUG)

    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"Location": f"https://cdn.test/f?token={TOKEN}"})

    transport, _ = scripted([echo])
    client = CivitaiClient("http://civitai.test", TOKEN, retry=FAST, transport=transport)
    response = run_get(client)
    assert response.status == 307 and "httpx" in {r.name for r in caplog.records}
    assert TOKEN not in caplog.text
    logging.getLogger("httpx").info(f"after the session: {TOKEN}")  # the filter is gone again
    assert TOKEN in caplog.text
