"""End to end: crawl the fake Civitai server into a lake, rebuild the release, compare.

Nothing here depends on wall time: deadlines run on a clock that counts requests, a crawl is
frozen for its kill -9 by the server holding requests after the N-th, outages are scripted per
request, and a "slow" answer never comes (the client's timeout is far above a normal answer).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from pipelines.civitai.client import CivitaiClient, RetryPolicy
from pipelines.civitai.crawler import CrawlOptions, window_state
from pipelines.civitai.fake_server import FAULT_KINDS, serve_sample
from tests.civitai import assert_same_release, crawl, make_sample, same_tables
from warehouse import civitai_map as cm
from warehouse.civitai_release import build_release, iter_raw_pages, list_windows
from warehouse.lake import Lake
from warehouse.schema import IMAGES, MODELS

REPO = Path(__file__).resolve().parents[2]
TOKEN = "civitai-TOKEN-5f1e0d9c8b7a"
LIMIT = 50  # images per page: several pages per busy version
TIMEOUT = 2.0  # client timeout (s): far above a normal answer, far below a "slow" one
SLOW = 600.0  # a "slow" fault's delay (s): cut short when the server stops


def client(url: str, **kwargs) -> CivitaiClient:
    return CivitaiClient(url, retry=kwargs.pop("retry", RetryPolicy.fast()), **kwargs)


def request_clock(api: CivitaiClient) -> Callable[[], float]:
    """A crawl clock that ticks once per request sent: ``max_seconds=N`` means N requests."""
    return lambda: float(api.stats.requests)


def checkpoint(lake: Lake, window: str, stream: str) -> dict:
    path = Path(lake.root, f"raw/civitai/window={window}/_checkpoints/{stream}.json")
    return json.loads(path.read_text())


def busiest(server, more_than: int) -> int:
    """The model version with the most images (more than ``more_than``: several pages)."""
    version = max(server.data.images, key=lambda v: len(server.data.images[v]))
    assert len(server.data.images[version]) > more_than
    return version


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return make_sample(tmp_path_factory.mktemp("crawl") / "sample")


@pytest.fixture(scope="module")
def reference(sample, tmp_path_factory):
    """An uninterrupted, fault-free crawl of the sample and its built release."""
    root = tmp_path_factory.mktemp("reference")
    lake = Lake(str(root / "lake"))
    with serve_sample(sample) as server:
        report = crawl(lake, "2024-01-01", client(server.url), images_limit=LIMIT)
    build = build_release(lake, root / "release")
    return lake, report, build, root / "release"


def raw_files(lake: Lake) -> list[Path]:
    return sorted(p for p in Path(lake.root, "raw").rglob("*") if p.is_file())


def test_crawl_rebuilds_the_sample_release(sample, reference):
    lake, report, build, out = reference
    assert report.complete and not report.failures and report.stopped is None
    assert set(report.statuses) == {"200"}
    assert_same_release(sample, out)
    assert pq.read_schema(out / "images" / "part-00000.parquet") == IMAGES.canonical_schema()
    assert pq.read_schema(out / "models" / "part-00000.parquet") == MODELS.canonical_schema()
    assert build.quarantine == [] and build.error_pages == 0
    assert sum(build.duplicates_dropped.values()) == 0  # every page landed once
    # raw landing: one JSON line per page, every page verbatim with its request
    pages = list(iter_raw_pages(lake))
    assert len(pages) == sum(report.pages.values())
    for page in pages:
        assert set(page.record) >= {"url", "params", "status", "fetched_at", "body"}
        assert page.record["status"] == 200
        assert cm.parse_page(page.record["body"])[0] is not None
    empty = [p for p in pages if p.stream == "images" and '"items": []' in p.record["body"]]
    assert empty, "the server's empty pages with a nextCursor must not end a stream"
    window = Path(lake.root, "raw/civitai/window=2024-01-01")
    assert {p.name for p in (window / "_checkpoints").iterdir()} == {
        "models.json",
        "images.json",
        "model_versions.json",
    }
    landed = list((window / "images").iterdir())
    assert landed and all(p.name.endswith(".jsonl.gz") for p in landed)
    assert list_windows(lake) == ["2024-01-01"]


def test_faults_of_every_kind_give_the_same_release(sample, reference, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with serve_sample(
        sample, fault_rate=0.2, seed=7, retry_after=0.05, slow_seconds=SLOW
    ) as server:
        report = crawl(lake, "2024-01-01", client(server.url, timeout=TIMEOUT), images_limit=LIMIT)
        stats = dict(server.stats)
    assert report.complete and not report.failures
    for kind in FAULT_KINDS:
        if kind != "duplicate":
            assert stats.get(f"fault_{kind}", 0) > 0, (kind, stats)
    assert report.retries > 0 and report.bad_pages > 0
    build = build_release(lake, tmp_path / "release")
    assert same_tables(tmp_path / "release", reference[3])
    assert sum(build.duplicates_dropped.values()) > 0  # duplicate items across pages
    reasons = [q.reason for q in build.quarantine]
    assert reasons and all(q.table_name == "page" for q in build.quarantine)
    assert any("HTML" in r for r in reasons) and any("truncated JSON" in r for r in reasons)
    assert len(reasons) == build.bad_pages  # every bad body landed once, quarantined once


KILLED_CRAWL = """
import sys
from pipelines.civitai.client import CivitaiClient, RetryPolicy
from pipelines.civitai.crawler import CrawlOptions, crawl
from warehouse.lake import Lake
client = CivitaiClient(sys.argv[2], retry=RetryPolicy.fast())
options = CrawlOptions(user_salt="test-salt", images_limit=int(sys.argv[3]), flush_pages=1)
crawl(Lake(sys.argv[1]), "2024-01-01", client, options)
"""
HOLD_AFTER = 40  # API answers the killed crawl gets; every later request hangs


def test_kill_9_mid_crawl_then_rerun_gives_the_same_release(sample, reference, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    images = Path(lake.root, "raw/civitai/window=2024-01-01/images")
    with serve_sample(sample, hold_after=HOLD_AFTER) as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_CRAWL, lake.root, server.url, str(LIMIT)], cwd=REPO
        )
        try:
            deadline = time.monotonic() + 300  # generous: only bounds a broken test
            while time.monotonic() < deadline and proc.poll() is None:
                if server.stats["held"] > 0:
                    break
                time.sleep(0.02)
            # held requests are never answered: the crawl cannot have finished
            assert proc.poll() is None and server.stats["held"] > 0
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert list(images.glob("part-*"))  # pages were landed before the kill
        state = window_state(lake, "2024-01-01")
        assert state is not None and not state["complete"]
        server.release()
        report = crawl(lake, "2024-01-01", client(server.url), images_limit=LIMIT)
    assert report.complete and not report.failures
    assert report.requests < reference[1].requests  # resumed, not restarted
    build = build_release(lake, tmp_path / "release")
    assert same_tables(tmp_path / "release", reference[3])
    assert build.mapped_rows["models"] == reference[2].mapped_rows["models"]


def test_pages_landed_twice_after_a_crash_are_not_duplicated(sample, reference, tmp_path):
    """Crash between a part write and its checkpoint: the rerun lands those pages again."""
    lake = Lake(str(tmp_path / "lake"))
    checkpoints = Path(lake.root, "raw/civitai/window=w/_checkpoints")
    budget = 30  # requests per run (a deadline on a clock that counts requests)
    with serve_sample(sample) as server:
        api = client(server.url)
        first = crawl(
            lake,
            "w",
            api,
            images_limit=LIMIT,
            flush_pages=4,
            max_seconds=budget,
            clock=request_clock(api),
        )
        assert first.stopped == "deadline" and not first.complete
        assert budget <= first.requests <= budget + 8  # + the requests in flight
        saved = tmp_path / "saved"
        shutil.copytree(checkpoints, saved)
        api = client(server.url)
        second = crawl(
            lake,
            "w",
            api,
            images_limit=LIMIT,
            flush_pages=4,
            max_seconds=budget,
            clock=request_clock(api),
        )
        assert second.stopped == "deadline" and not second.complete
        assert second.pages["images"] > 0
        shutil.rmtree(checkpoints)
        shutil.copytree(saved, checkpoints)  # as if killed before these checkpoints
        Path(checkpoints.parent, "images", ".part-000999-dead.jsonl.gz.x.tmp").write_bytes(b"\x1f")
        final = crawl(lake, "w", client(server.url), images_limit=LIMIT)
    assert final.complete
    build = build_release(lake, tmp_path / "release")
    assert build.duplicates_dropped["images"] > 0  # second run's pages were landed twice
    assert same_tables(tmp_path / "release", reference[3])


def test_incremental_windows_stop_at_the_watermark(sample, reference, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    models = pq.read_table(sample / "models").to_pylist()
    images = pq.read_table(sample / "images").to_pylist()
    versions = sorted({r["modelVersionId"] for r in models if r["modelVersionId"]})
    image_ids = sorted({r["imageId"] for r in images if r["imageId"]})
    cut_version, cut_image = versions[len(versions) * 2 // 3], image_ids[len(image_ids) * 2 // 3]
    # an older model that gains a new version after the cut must be found again
    by_model: dict[int, set[int]] = {}
    for r in models:
        if r["modelVersionId"]:
            by_model.setdefault(r["modelId"], set()).add(r["modelVersionId"])
    assert any(min(v) <= cut_version < max(v) for v in by_model.values())
    limit = 20
    with serve_sample(sample) as server:
        server.set_view(max_version_id=cut_version, max_image_id=cut_image)
        first = crawl(lake, "w1", client(server.url), images_limit=limit)
        server.set_view()
        second = crawl(lake, "w2", client(server.url), images_limit=limit)
        files_before = raw_files(lake)
        again = crawl(lake, "w2", client(server.url), images_limit=limit)
        assert again.already_complete and again.requests == 0
        assert raw_files(lake) == files_before  # a finished window does nothing new
        # the newest image of a version gets 100 more likes before a full refresh
        version = max(server.data.images, key=lambda v: len(server.data.images[v]))
        image_id, entry = server.data.images[version][0]
        entry["stats"] = dict(entry["stats"], likeCount=entry["stats"]["likeCount"] + 100)
        full = crawl(lake, "w3", client(server.url), images_limit=limit, full=True)
    assert first.complete and second.complete and full.complete
    assert second.stopped_at_watermark["models"] == 1
    assert second.stopped_at_watermark["images"] > 0
    assert second.requests < full.requests
    assert sum(second.items.values()) < sum(full.items.values())
    # w2 re-read at most the boundary page of each version below its watermark
    base = window_state(lake, "w2")["base"]["images"]
    old = {}
    for page in iter_raw_pages(lake, ["w2"], streams=("images",)):
        v = page.record["params"]["modelVersionId"]
        mark = base.get(v)
        for item in json.loads(page.record["body"])["items"]:
            if mark is not None and item["id"] <= mark:
                old[v] = old.get(v, 0) + 1
    assert old and max(old.values()) <= limit + 1
    build_release(lake, tmp_path / "incremental", windows=["w1", "w2"])
    assert same_tables(tmp_path / "incremental", reference[3])
    build_release(lake, tmp_path / "refreshed")
    refreshed = pq.read_table(tmp_path / "refreshed" / "images").to_pylist()
    row = next(r for r in refreshed if (r["imageId"], r["modelVersionId"]) == (image_id, version))
    assert row["likeCount"] == entry["stats"]["likeCount"]  # the latest snapshot wins


def test_token_never_lands_in_files_logs_or_reports(sample, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    lake = Lake(str(tmp_path / "lake"))
    with serve_sample(
        sample, token=TOKEN, fault_rate=0.1, retry_after=0.01, slow_seconds=SLOW
    ) as server:
        report = crawl(
            lake,
            "w",
            client(server.url, token=TOKEN, timeout=TIMEOUT),
            images_limit=LIMIT,
            progress_seconds=0.2,
        )
        slow = server.stats["fault_slow"]
        denied = crawl(Lake(str(tmp_path / "denied")), "w", client(server.url))
    assert report.complete
    build = build_release(lake, tmp_path / "release")
    texts = [
        caplog.text,
        json.dumps(report.as_metadata()),
        repr(report.failures),
        json.dumps([dataclasses.asdict(q) for q in build.quarantine]),
    ]
    for path in list(Path(lake.root).rglob("*")) + list((tmp_path / "release").rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            texts.append(
                (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8", "replace")
            )
    assert len(texts) > 10 and slow > 0 and report.retries > 0
    assert not [t for t in texts if TOKEN in t]
    # without the token: one 401, recorded, not retried, and the crawl stops
    assert denied.stopped == "auth" and not denied.complete
    assert denied.requests == 1 and denied.failures[0]["status"] == 401


def test_unknown_model_versions_are_fetched_and_404s_recorded(sample, reference, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with serve_sample(sample) as server:
        # one model is missing from /models (its versions stay reachable by id) and one
        # image lists a version that does not exist
        hidden_model = server._sorted_models()[3][1]
        original = server._sorted_models
        server._sorted_models = lambda: [e for e in original() if e[1] != hidden_model]
        hidden_versions = set(server.data.model_versions[hidden_model])
        some_version = next(v for v in server.data.images if v not in hidden_versions)
        image_id = server.data.images[some_version][0][0]
        server.data.image_versions[image_id].append(999_999_999)
        report = crawl(lake, "w", client(server.url), images_limit=LIMIT)
        requests_for_missing = server.stats["status_404"]
        later = crawl(lake, "w2", client(server.url), images_limit=LIMIT)
    assert report.complete and later.complete
    missing = [f for f in report.failures if f["key"] == "999999999"]
    assert len(missing) == 1 and missing[0]["status"] == 404 and missing[0]["permanent"]
    assert requests_for_missing == 1  # not retried
    assert report.pages["model_versions"] >= 1
    build = build_release(lake, tmp_path / "release")
    rows = [
        r
        for r in pq.read_table(tmp_path / "release" / "models").to_pylist()
        if r["modelVersionId"] in hidden_versions
    ]
    referenced = {
        v for i, vs in server.data.image_versions.items() for v in vs if v in hidden_versions
    }
    assert rows and {r["modelVersionId"] for r in rows} == referenced
    assert all(r["modelId"] == hidden_model and r["userHash"] is None for r in rows)
    assert build.error_pages >= 1
    # versions found through /model-versions get their images crawled from the next window
    hidden_images = {
        (r["imageId"], r["modelVersionId"])
        for r in pq.read_table(tmp_path / "release" / "images").to_pylist()
        if r["modelVersionId"] in hidden_versions
    }
    expected = {(i, v) for v in referenced for i, _ in server.data.images.get(v, [])}
    assert expected and hidden_images == expected


def test_remote_lake(sample, reference, tmp_path):
    """The same crawl on an fsspec (non-local) lake: puts instead of renames."""
    fs = fsspec.filesystem("memory")
    root = f"memory://civitai-{secrets.token_hex(4)}"
    lake = Lake(f"{root}/lake")
    assert lake.remote
    try:
        with serve_sample(sample) as server:
            report = crawl(lake, "w", client(server.url), images_limit=LIMIT)
        assert report.complete and list_windows(lake) == ["w"]
        assert window_state(lake, "w")["complete"]
        build_release(lake, tmp_path / "release")
        assert same_tables(tmp_path / "release", reference[3])
    finally:
        fs.rm(root, recursive=True)


def test_options_are_checked_and_the_salt_never_shown():
    options = CrawlOptions(user_salt="pepper-5a1t")
    assert (options.full, options.concurrency, options.images_limit) == (False, 8, 200)
    assert options.max_seconds is None and "pepper-5a1t" not in repr(options)
    with pytest.raises(ValueError, match="user_salt"):
        CrawlOptions(user_salt="")
    with pytest.raises(ValueError, match="concurrency"):
        CrawlOptions(user_salt="s", concurrency=0)
    with pytest.raises(ValueError, match="window"):
        crawl(Lake("unused"), "../escape", client("http://127.0.0.1:9"))


# -- sad paths ---------------------------------------------------------------------------------


def test_retries_exhausted_then_resumed_on_the_next_run(sample, reference, tmp_path):
    """One stream's second page fails every attempt: the window stays incomplete, the rerun
    resumes that stream at the failed cursor; nothing is lost or landed twice."""
    lake = Lake(str(tmp_path / "lake"))
    seen: list[tuple[str, str | None]] = []
    down = {"on": True}
    with serve_sample(sample, retry_after=0.01) as server:
        busy = str(busiest(server, LIMIT))

        def outage(path: str, query: dict[str, str]) -> int | None:
            if path == "/api/v1/images":
                seen.append((query["modelVersionId"], query.get("cursor")))
                if down["on"] and query["modelVersionId"] == busy and query.get("cursor"):
                    return 503
            return None

        server.outage = outage
        first = crawl(lake, "w", client(server.url, retry=RetryPolicy.fast(3)), images_limit=LIMIT)
        assert server.stats["outage_503"] == 3  # every attempt of the one failing page
        failed = [c for v, c in seen if v == busy and c]
        assert len(failed) == 3 and len(set(failed)) == 1
        resume_at = checkpoint(lake, "w", "images")["versions"][busy]
        down["on"] = False
        seen.clear()
        second = crawl(lake, "w", client(server.url), images_limit=LIMIT)
    assert not first.complete and first.stopped is None
    (failure,) = first.failures
    assert failure["stream"] == "images" and failure["key"] == busy
    assert failure["status"] == 503 and not failure["permanent"]
    assert "gave up after 3 attempts" in failure["error"]
    assert resume_at["cursor"] == failed[0] and not resume_at["done"]
    assert second.complete and not second.failures
    # the rerun asks only for the unfinished stream, from the failed cursor on
    assert seen and {v for v, _ in seen} == {busy} and seen[0][1] == failed[0]
    build = build_release(lake, tmp_path / "release")
    assert same_tables(tmp_path / "release", reference[3])
    assert build.mapped_rows == reference[2].mapped_rows  # no page landed twice
    assert build.error_pages == 1  # the failed answer, landed as it came


def test_a_cursor_that_does_not_advance_is_detected_and_stops_that_stream(sample, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    asked: list[str | None] = []
    with serve_sample(sample) as server:
        busy = busiest(server, LIMIT)
        list_images = server.list_images

        def stuck(query: dict[str, str], base: str) -> dict:
            payload = list_images(query, base)
            if query["modelVersionId"] == str(busy):
                asked.append(query.get("cursor"))
                if query.get("cursor"):  # the server hands back the cursor it was given
                    payload["metadata"]["nextCursor"] = query["cursor"]
            return payload

        server.list_images = stuck
        first = crawl(lake, "w", client(server.url), images_limit=LIMIT)
        first_asks = list(asked)
        again = crawl(lake, "w", client(server.url), images_limit=LIMIT)
    assert len(first_asks) == 2 and first_asks[0] is None  # page 1, then the stuck page
    assert len(asked) == 3  # the rerun asks for the stuck page once more, and stops again
    for report in (first, again):
        assert not report.complete and report.stopped is None
        (failure,) = report.failures
        assert failure["stream"] == "images" and failure["key"] == str(busy)
        assert "did not advance" in failure["error"] and not failure["permanent"]
    states = checkpoint(lake, "w", "images")["versions"]
    assert not states[str(busy)]["done"]
    others = [s for v, s in states.items() if v != str(busy)]
    assert others and all(s["done"] for s in others)  # every other stream completed
    recorded = [
        p.record["error"]
        for p in iter_raw_pages(lake, streams=("images",))
        if p.record.get("error") and "did not advance" in p.record["error"]
    ]
    assert len(recorded) == 2  # the reason is landed with the page, once per run


def test_a_models_cursor_that_does_not_advance_stops_before_the_images(sample, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with serve_sample(sample) as server:
        list_models = server.list_models

        def stuck(query: dict[str, str], base: str) -> dict:
            payload = list_models(query, base)
            if query.get("cursor"):
                payload["metadata"]["nextCursor"] = query["cursor"]
            return payload

        server.list_models = stuck
        report = crawl(lake, "w", client(server.url), models_limit=10)
    assert report.requests == 2 and report.pages == {"models": 1}
    assert not report.complete and report.pages["images"] == 0
    (failure,) = report.failures
    assert failure["stream"] == "models" and "did not advance" in failure["error"]
    assert not checkpoint(lake, "w", "models")["done"]


def test_403_mid_crawl_stops_with_checkpoints_intact_and_resumes(sample, reference, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    revoked = {"after": 40}  # image requests answered before the token is revoked
    with serve_sample(sample) as server:
        counted = {"images": 0}

        def outage(path: str, query: dict[str, str]) -> int | None:
            if revoked["after"] is None:
                return None
            if path == "/api/v1/images":
                counted["images"] += 1
            return 403 if counted["images"] > revoked["after"] else None

        server.outage = outage
        first = crawl(lake, "w", client(server.url), images_limit=LIMIT)
        forbidden = server.stats["outage_403"]
        before = checkpoint(lake, "w", "images")
        revoked["after"] = None
        second = crawl(lake, "w", client(server.url), images_limit=LIMIT)
    assert first.stopped == "auth" and not first.complete
    assert 1 <= forbidden <= 8  # no retries: at most the requests already in flight
    assert first.pages["images"] >= 30 and first.pages["model_versions"] == 0
    assert first.failures and {f["status"] for f in first.failures} == {403}
    assert not any(f["permanent"] for f in first.failures)
    # a refused stream is not marked done: the rerun with a valid token crawls it
    refused = {f["key"] for f in first.failures}
    assert refused and not any(before["versions"].get(v, {}).get("done") for v in refused)
    assert checkpoint(lake, "w", "models")["done"]
    assert second.complete and not second.failures and second.stopped is None
    assert second.requests < reference[1].requests
    build = build_release(lake, tmp_path / "release")
    assert same_tables(tmp_path / "release", reference[3])
    assert build.mapped_rows == reference[2].mapped_rows
