"""End to end: crawl the fake Civitai server into a lake, rebuild the release, compare."""

from __future__ import annotations

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
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from pipelines.civitai import crawler
from pipelines.civitai.client import CivitaiClient, RetryPolicy
from pipelines.civitai.crawler import build_release, iter_raw_pages, window_state
from pipelines.civitai.fake_server import FAULT_KINDS, serve_sample
from tests.civitai import assert_same_release, crawl, make_sample, same_tables
from warehouse import civitai_map as cm
from warehouse.lake import Lake
from warehouse.schema import IMAGES, MODELS

REPO = Path(__file__).resolve().parents[2]
TOKEN = "civitai-TOKEN-5f1e0d9c8b7a"
LIMIT = 50  # images per page: several pages per busy version


def client(url: str, **kwargs) -> CivitaiClient:
    return CivitaiClient(url, retry=kwargs.pop("retry", RetryPolicy.fast()), **kwargs)


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
    assert all(p.name.endswith(".jsonl.gz") for p in (window / "images").iterdir())


def test_faults_of_every_kind_give_the_same_release(sample, reference, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with serve_sample(sample, fault_rate=0.2, seed=7, retry_after=0.05, slow_seconds=0.6) as server:
        report = crawl(lake, "2024-01-01", client(server.url, timeout=0.3), images_limit=LIMIT)
        stats = dict(server.stats)
    assert report.complete and not report.failures
    for kind in FAULT_KINDS:
        if kind != "duplicate":
            assert stats.get(f"fault_{kind}", 0) > 0, (kind, stats)
    assert report.retries > 0 and report.bad_pages > 0
    build = build_release(lake, tmp_path / "release")
    assert same_tables(tmp_path / "release", reference[3])
    assert sum(build.duplicates_dropped.values()) > 0  # duplicate items across pages
    reasons = [q["reason"] for q in build.quarantine]
    assert reasons and all(q["table"] == "page" for q in build.quarantine)
    assert any("HTML" in r for r in reasons) and any("truncated JSON" in r for r in reasons)


KILLED_CRAWL = """
import sys
from pipelines.civitai.client import CivitaiClient, RetryPolicy
from pipelines.civitai.crawler import crawl
from warehouse.lake import Lake
client = CivitaiClient(sys.argv[2], rate_limit=40, retry=RetryPolicy.fast())
crawl(Lake(sys.argv[1]), "2024-01-01", client, user_salt="test-salt", images_limit=int(sys.argv[3]), flush_pages=1)
"""


def test_kill_9_mid_crawl_then_rerun_gives_the_same_release(sample, reference, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    images = Path(lake.root, "raw/civitai/window=2024-01-01/images")
    with serve_sample(sample) as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_CRAWL, lake.root, server.url, str(LIMIT)], cwd=REPO
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if images.is_dir() and len(list(images.glob("part-*"))) >= 12:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "the crawl ended before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        state = window_state(lake, "2024-01-01")
        assert state is not None and not state["complete"]
        report = crawl(lake, "2024-01-01", client(server.url), images_limit=LIMIT)
    assert report.complete and not report.failures
    build_release(lake, tmp_path / "release")
    assert same_tables(tmp_path / "release", reference[3])


def test_pages_landed_twice_after_a_crash_are_not_duplicated(sample, reference, tmp_path):
    """Crash between a part write and its checkpoint: the rerun lands those pages again."""
    lake = Lake(str(tmp_path / "lake"))
    checkpoints = Path(lake.root, "raw/civitai/window=w/_checkpoints")
    with serve_sample(sample) as server:
        first = crawl(
            lake,
            "w",
            client(server.url, rate_limit=100),
            images_limit=LIMIT,
            flush_pages=4,
            max_seconds=0.6,
        )
        assert first.stopped == "deadline" and not first.complete
        saved = tmp_path / "saved"
        shutil.copytree(checkpoints, saved)
        second = crawl(
            lake,
            "w",
            client(server.url, rate_limit=100),
            images_limit=LIMIT,
            flush_pages=4,
            max_seconds=0.6,
        )
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
        sample, token=TOKEN, fault_rate=0.1, retry_after=0.01, slow_seconds=0.5
    ) as server:
        report = crawl(
            lake,
            "w",
            client(server.url, token=TOKEN, timeout=0.3),
            images_limit=LIMIT,
            progress_seconds=0.2,
        )
        denied = crawl(Lake(str(tmp_path / "denied")), "w", client(server.url))
    assert report.complete
    build = build_release(lake, tmp_path / "release")
    texts = [
        caplog.text,
        json.dumps(report.as_metadata()),
        repr(report.failures),
        json.dumps(build.quarantine),
    ]
    for path in list(Path(lake.root).rglob("*")) + list((tmp_path / "release").rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            texts.append(
                (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8", "replace")
            )
    assert len(texts) > 10
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
    assert {r["modelVersionId"] for r in rows} == referenced
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


def test_build_replaces_the_release_atomically(reference, tmp_path, monkeypatch):
    lake, _, _, expected = reference
    out = tmp_path / "release"
    build_release(lake, out)
    stray = out / "images" / "part-00099.parquet"
    shutil.copy(out / "images" / "part-00000.parquet", stray)
    build_release(lake, out)
    assert not stray.exists() and same_tables(out, expected)

    def broken(self, records):
        raise OSError("disk full")

    monkeypatch.setattr(crawler._Output, "write_quarantine", broken)
    with pytest.raises(OSError):
        build_release(lake, out)
    assert same_tables(out, expected)  # the previous release is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # no staging left


def test_remote_lake_and_release_folder(sample, reference, tmp_path):
    """The same crawl and build on an fsspec (non-local) lake: puts instead of renames."""
    fs = fsspec.filesystem("memory")
    root = f"memory://civitai-{secrets.token_hex(4)}"
    lake = Lake(f"{root}/lake")
    assert lake.remote
    try:
        with serve_sample(sample) as server:
            report = crawl(lake, "w", client(server.url), images_limit=LIMIT)
        assert report.complete and crawler.list_windows(lake) == ["w"]
        fs.pipe(f"{root}/release/images/part-00042.parquet", b"stale")
        build = build_release(lake, f"{root}/release")
        assert all(f.startswith(f"{root}/release/") for f in build.files["images"])
        fs.get(f"{root}/release", str(tmp_path / "copy"), recursive=True)
        assert not (tmp_path / "copy" / "images" / "part-00042.parquet").exists()
        assert same_tables(tmp_path / "copy", reference[3])
    finally:
        fs.rm(root, recursive=True)
