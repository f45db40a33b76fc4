"""The fake Civitai server: API shapes, paging, variants, media, auth, faults, rate limit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from pipelines.civitai import fake_server as fs
from tests.civitai import make_sample, sample_spec
from warehouse.civitai_map import model_sort_key

MODEL_KEYS = {
    "id",
    "name",
    "description",
    "type",
    "nsfw",
    "nsfwLevel",
    "poi",
    "minor",
    "availability",
    "allowNoCredit",
    "allowCommercialUse",
    "allowDerivatives",
    "allowDifferentLicense",
    "cosmetic",
    "stats",
    "creator",
    "tags",
    "modelVersions",
}
VERSION_KEYS = {
    "id",
    "modelId",
    "name",
    "description",
    "baseModel",
    "baseModelType",
    "nsfwLevel",
    "publishedAt",
    "trainedWords",
    "availability",
    "downloadUrl",
    "files",
    "stats",
}
IMAGE_KEYS = {
    "id",
    "url",
    "hash",
    "width",
    "height",
    "nsfw",
    "nsfwLevel",
    "browsingLevel",
    "createdAt",
    "postId",
    "type",
    "stats",
    "username",
    "baseModel",
    "meta",
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return make_sample(tmp_path_factory.mktemp("fake") / "sample", sample_spec(users=25, seed=5))


@pytest.fixture(scope="module")
def server(sample):
    with fs.serve_sample(sample) as running:
        yield running


def all_models(http: httpx.Client, limit: int = 100) -> list[dict]:
    items, cursor = [], None
    for _ in range(1000):
        params = {"types": "LORA", "limit": limit} | ({"cursor": cursor} if cursor else {})
        page = http.get("/api/v1/models", params=params).json()
        items += page["items"]
        cursor = page["metadata"].get("nextCursor")
        if not cursor:
            return items
    raise AssertionError("paging did not end")


def all_images(http: httpx.Client, version: int, limit: int = 200) -> tuple[list[dict], int]:
    items, cursor, empty = [], None, 0
    for _ in range(1000):
        params = {"modelVersionId": version, "limit": limit, "withMeta": "true"}
        page = http.get("/api/v1/images", params=params | ({"cursor": cursor} if cursor else {}))
        payload = page.json()
        cursor = payload["metadata"].get("nextCursor")
        if not payload["items"] and cursor:
            empty += 1
        items += payload["items"]
        if not cursor:
            return items, empty
    raise AssertionError("paging did not end")


def test_models_cursor_paging_newest_first_each_model_once(server, sample):
    with httpx.Client(base_url=server.url) as http:
        items = all_models(http, limit=7)
    ids = [i["id"] for i in items]
    expected = set(pq.read_table(sample / "models").column("modelId").drop_null().to_pylist())
    assert len(ids) == len(set(ids)) and set(ids) == expected
    # newest first by the latest parseable publishedAt (planted bad dates do not count)
    latest = [model_sort_key(i)[0] for i in items]
    assert len(latest) > 7  # several pages
    assert latest == sorted(latest, reverse=True)
    for item in items:
        assert set(item) == MODEL_KEYS
        assert item["type"] == "LORA" and isinstance(item["nsfw"], bool)
        for version in item["modelVersions"]:
            assert set(version) >= VERSION_KEYS
            for file in version["files"]:
                assert set(file) >= {
                    "id",
                    "name",
                    "sizeKB",
                    "type",
                    "metadata",
                    "hashes",
                    "pickleScanResult",
                    "virusScanResult",
                    "scannedAt",
                    "downloadUrl",
                }
                assert isinstance(file["sizeKB"], float)
                assert file.get("primary", True) is True  # true or absent


def test_representation_variants_all_occur(server):
    with httpx.Client(base_url=server.url) as http:
        models = all_models(http)
        images = []
        for item in models[:12]:
            images += all_images(http, item["modelVersions"][0]["id"])[0]
    commercial = {
        type(m["allowCommercialUse"]).__name__
        + ("-pg" if str(m["allowCommercialUse"]).startswith("{") else "")
        for m in models
    }
    assert {"str", "list", "str-pg"} <= commercial
    assert any(m["allowCommercialUse"] == [] for m in models)
    files = [f for m in models for v in m["modelVersions"] for f in v["files"]]
    assert any("primary" not in f for f in files) and any(f.get("primary") for f in files)
    stamps = [v["publishedAt"] for m in models for v in m["modelVersions"]]
    assert any(s.endswith("Z") for s in stamps) and any(not s.endswith("Z") for s in stamps)
    assert {type(i["nsfwLevel"]) for i in images} == {int, str}
    assert images and all(isinstance(i["browsingLevel"], int) for i in images)
    metas = [i["meta"] for i in images]
    assert any(set(m) == {"id", "meta"} for m in metas) and any("prompt" in m for m in metas)
    flat = [m.get("meta", m) for m in metas]
    assert any("Clip skip" in m for m in flat) and any("clipSkip" in m for m in flat)
    assert any(isinstance(m.get("Clip skip"), str) for m in flat)


def test_images_paging_with_empty_pages_and_meta_flag(server, sample):
    rows = pq.read_table(sample / "images").to_pylist()
    per_version: dict[int, set[int]] = {}
    for row in rows:
        if row["imageId"] is not None:
            per_version.setdefault(row["modelVersionId"], set()).add(row["imageId"])
    busiest = sorted(per_version, key=lambda v: -len(per_version[v]))[:15]
    empty_pages = 0
    with httpx.Client(base_url=server.url) as http:
        for version in busiest:
            items, empty = all_images(http, version, limit=5)
            empty_pages += empty
            ids = [i["id"] for i in items]
            assert ids == sorted(set(ids), reverse=True)  # newest first, each once
            assert set(ids) == per_version[version]
            assert set(items[0]) == IMAGE_KEYS
        bare = http.get("/api/v1/images", params={"modelVersionId": busiest[0]}).json()
        assert bare["items"] and all(i["meta"] is None for i in bare["items"])
    assert empty_pages > 0  # an empty items page with a nextCursor is not the end


def test_page_paging_limits_and_errors(server):
    with httpx.Client(base_url=server.url) as http:
        first = http.get("/api/v1/models", params={"limit": 10, "page": 1}).json()
        assert first["metadata"]["currentPage"] == 1 and len(first["items"]) == 10
        assert first["metadata"]["totalItems"] >= 10
        beyond = http.get("/api/v1/models", params={"limit": 100, "page": 11})
        assert beyond.status_code == 429 and "cursors" in beyond.json()["error"]
        assert http.get("/api/v1/models", params={"limit": 101}).status_code == 400
        assert http.get("/api/v1/images", params={"limit": 201}).status_code == 400
        missing = http.get("/api/v1/model-versions/999999999")
        assert missing.status_code == 404
        assert missing.json() == {"error": "No model with id 999999999"}


def test_model_version_endpoint_and_download_redirect(server, sample):
    with httpx.Client(base_url=server.url) as http:
        version_id = all_models(http)[0]["modelVersions"][0]["id"]
        version = http.get(f"/api/v1/model-versions/{version_id}").json()
        assert version["id"] == version_id and version["model"]["type"] == "LORA"
        redirect = http.get(f"/api/download/models/{version_id}")
        assert redirect.status_code == 307
        primary = next(f for f in version["files"] if f.get("primary"))
        assert redirect.headers["location"].startswith(f"/files/{primary['id']}/")
        assert primary["name"] in redirect.headers["content-disposition"]
        assert http.get(redirect.headers["location"]).status_code == 404  # no media yet
        (sample / "media" / "loras").mkdir(parents=True, exist_ok=True)
        (sample / "media" / "loras" / primary["name"]).write_bytes(b"weights")
        assert http.get(redirect.headers["location"]).content == b"weights"
        image = all_images(http, version_id)[0][0]
        path = httpx.URL(image["url"]).path
        assert http.get(path).status_code == 404
        (sample / "media" / "images").mkdir(parents=True, exist_ok=True)
        (sample / "media" / "images" / f"{image['id']}.jpeg").write_bytes(b"\xff\xd8jpeg")
        served = http.get(path)
        assert served.status_code == 200 and served.content == b"\xff\xd8jpeg"


def test_token_required_when_configured(sample):
    with (
        fs.serve_sample(sample, token="s3cret") as server,
        httpx.Client(base_url=server.url) as http,
    ):
        denied = http.get("/api/v1/models")
        assert denied.status_code == 401 and "error" in denied.json()
        wrong = http.get("/api/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        allowed = http.get("/api/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 200 and "s3cret" not in allowed.text


def test_rate_limit_answers_429_with_retry_after(sample):
    now = [0.0]  # the limiter's clock: stands still unless the test moves it
    with (
        fs.serve_sample(sample, rate_limit=5, clock=lambda: now[0]) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        burst = [http.get("/api/v1/models", params={"limit": 1}) for _ in range(8)]
        now[0] += 0.4  # two tokens later
        later = [http.get("/api/v1/models", params={"limit": 1}) for _ in range(3)]
    assert [a.status_code for a in burst] == [200] * 5 + [429] * 3
    assert [float(a.headers["retry-after"]) for a in burst[5:]] == [0.2] * 3
    assert [a.status_code for a in later] == [200, 200, 429]
    assert server.stats["rate_limited"] == 4


def fault_sequence(sample: Path, seed: int) -> list[tuple[int | str, str]]:
    urls = [("/api/v1/models", {"limit": 3}), ("/api/v1/models", {"limit": 4})]
    out = []
    with (
        fs.serve_sample(
            sample,
            fault_rate=0.5,
            seed=seed,
            faults=("429", "503", "malformed", "html200", "html500", "reset"),
            retry_after=0.01,
        ) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        for path, params in urls:
            for _ in range(6):
                try:
                    answer = http.get(path, params=params)
                    out.append((answer.status_code, answer.text[:50]))
                except httpx.TransportError as exc:
                    out.append(("reset", type(exc).__name__))
    return out


def test_faults_are_deterministic_from_the_seed(sample):
    first = fault_sequence(sample, seed=11)
    assert first == fault_sequence(sample, seed=11)
    assert first != fault_sequence(sample, seed=12)
    assert any(code != 200 for code, _ in first)


def test_retrying_a_faulty_request_gets_the_same_items(sample):
    faults = ("429", "503", "malformed", "html200", "html500", "reset", "duplicate")
    with fs.serve_sample(sample, seed=1) as clean, httpx.Client(base_url=clean.url) as http:
        pages = []
        cursor = None
        for _ in range(4):
            params = {"limit": 5} | ({"cursor": cursor} if cursor else {})
            pages.append((params, http.get("/api/v1/models", params=params).json()))
            cursor = pages[-1][1]["metadata"]["nextCursor"]
    with (
        fs.serve_sample(sample, seed=1, fault_rate=0.6, faults=faults, retry_after=0.01) as faulty,
        httpx.Client(base_url=faulty.url) as http,
    ):
        for params, expected in pages:
            for _attempt in range(faulty.max_consecutive_faults + 1):
                try:
                    answer = http.get("/api/v1/models", params=params)
                    got = answer.json() if answer.status_code == 200 else None
                except (httpx.TransportError, json.JSONDecodeError):
                    got = None
                if got is not None:
                    break
            assert got is not None
            ids = [i["id"] for i in got["items"]]
            expected_ids = [i["id"] for i in expected["items"]]
            # a duplicate repeats the previous page's last item; nothing else changes
            assert ids[-len(expected_ids) :] == expected_ids and len(ids) - len(expected_ids) <= 1
            assert got["metadata"]["nextCursor"] == expected["metadata"]["nextCursor"]


def test_slow_fault_outlasts_the_client_timeout(sample):
    with (
        fs.serve_sample(
            sample, fault_rate=1.0, faults=("slow",), slow_seconds=600, max_consecutive_faults=1
        ) as server,  # a slow answer waits until the server stops
        httpx.Client(base_url=server.url, timeout=1.0) as http,
    ):
        with pytest.raises(httpx.TimeoutException):
            http.get("/api/v1/models", params={"limit": 1})
        assert http.get("/api/v1/models", params={"limit": 1}).status_code == 200


def test_scripted_outage_answers_the_status_it_returns(sample):
    def outage(path: str, query: dict[str, str]) -> int | None:
        return {"7": 503, "8": 403}.get(query.get("modelVersionId", ""))

    with (
        fs.serve_sample(sample, outage=outage, retry_after=0.25) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        busy = http.get("/api/v1/images", params={"modelVersionId": 7})
        refused = http.get("/api/v1/images", params={"modelVersionId": 8})
        fine = http.get("/api/v1/models", params={"limit": 1})
    assert busy.status_code == 503 and busy.headers["retry-after"] == "0.25"
    assert refused.status_code == 403 and "retry-after" not in refused.headers
    assert fine.status_code == 200
    assert server.stats["outage_503"] == 1 and server.stats["outage_403"] == 1


def test_requests_after_hold_after_wait_until_released(sample):
    with (
        fs.serve_sample(sample, hold_after=1) as server,
        httpx.Client(base_url=server.url, timeout=1.0) as http,
    ):
        assert http.get("/api/v1/models", params={"limit": 1}).status_code == 200
        with pytest.raises(httpx.TimeoutException):  # held: no answer at all
            http.get("/api/v1/models", params={"limit": 1})
        assert server.stats["held"] == 1
        server.release()
        assert http.get("/api/v1/models", params={"limit": 1}).status_code == 200
        assert server.stats["held"] == 1


def test_cli_serves_until_sigterm(sample):
    command = [
        sys.executable,
        "-m",
        "pipelines.civitai.fake_server",
        "--data",
        str(sample),
        "--port",
        "0",
        "--token",
        "cli-token",
        "--duration",
        "30",
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2]
    )
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line and "cli-token" not in line
        url = line.split(" at ")[1].split()[0]
        headers = {"Authorization": "Bearer cli-token"}
        answer = httpx.get(url + "/api/v1/models", params={"limit": 1}, headers=headers)
        assert answer.status_code == 200 and len(answer.json()["items"]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
