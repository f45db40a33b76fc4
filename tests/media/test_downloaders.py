"""Image and LoRA downloaders against local HTTP servers serving generated sample media.

Two stdlib servers run on 127.0.0.1: the "API" (``/api/download/models/{id}`` answers 307 to
the "CDN", with a token check) and the "CDN" (signed file URLs and image URLs). Nothing here
depends on the project's fake Civitai server. A few faults a real server cannot stage on
demand (a reset in the middle of a body) use an httpx mock transport instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import pickle
import re
import threading
import time
import traceback
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ml import lora_format as lf
from pipelines.civitai.client import CivitaiClient
from pipelines.civitai.downloads import (
    MAX_REDIRECTS,
    DownloadError,
    content_disposition_filename,
    download_images,
    download_loras,
    image_url_map,
    safe_file_name,
)
from pipelines.civitai.http import USER_AGENT, RetryPolicy
from pipelines.sample.generator import SampleSpec, SampleSummary, generate_sample
from warehouse.lake import Lake
from warehouse.media import STATUS_FAILED, STATUS_OK, STATUS_REFUSED, MediaStore

TOKEN = "tok-SECRET-0123456789"
IMAGE_HOST = "https://image.civitai.com"
FAST = RetryPolicy.fast(attempts=3)
API_HOST = "https://civitai.com"


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False  # no Content-Length: the body ends when the connection closes
    fail_first: int = 0  # answer 503 (with `retry_after`) this many times first
    retry_after: str = "0"
    cut_first: int = 0  # this many times first: full Content-Length, half the body, close


@dataclass
class Served:
    """What the servers answer and what they saw."""

    routes: dict[str, Route] = field(default_factory=dict)
    images: dict[int, bytes] = field(default_factory=dict)
    files: dict[int, Route] = field(default_factory=dict)  # by modelVersionId
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    cdn_base: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, server: str, pattern: str) -> list[dict[str, str]]:
        return [h for s, p, h in self.requests if s == server and re.search(pattern, p)]


def _handler(served: Served, server_name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _send(self, route: Route) -> None:
            self.send_response(route.status)
            for key, value in route.headers.items():
                self.send_header(key, value)
            if route.chunked:
                self.send_header("Connection", "close")
                self.end_headers()
                for i in range(0, len(route.body), 4096):
                    self.wfile.write(route.body[i : i + 4096])
                self.close_connection = True
                return
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            path = urlsplit(self.path).path
            with served.lock:
                served.requests.append((server_name, self.path, dict(self.headers)))
                route = served.routes.get(path)
                if route is not None and route.fail_first > 0:
                    route.fail_first -= 1
                    self._send(Route(503, b"busy", {"Retry-After": route.retry_after}))
                    return
                cut = route is not None and route.cut_first > 0
                if cut:
                    route.cut_first -= 1
            if cut:
                self.send_response(200)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body[: len(route.body) // 2])
                self.close_connection = True  # the peer sees the body end early
                return
            if route is not None:
                self._send(route)
            elif m := re.fullmatch(r"/api/download/models/(\d+)", path):
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._send(Route(401, b'{"error":"Unauthorized"}'))
                    return
                location = f"{served.cdn_base}/files/{m.group(1)}/blob?sig=abc"
                self._send(Route(307, b"", {"Location": location}))
            elif m := re.fullmatch(r"/files/(\d+)/blob", path):
                self._send(served.files.get(int(m.group(1)), Route(404, b"no file")))
            elif m := re.fullmatch(r"/[^/]+/[^/]+/width=\d+/(\d+)\.jpeg", path):
                data = served.images.get(int(m.group(1)))
                self._send(
                    Route(200, data, {"Content-Type": "image/jpeg"})
                    if data is not None
                    else Route(404)
                )
            else:
                self._send(Route(404, b"not found"))

    return Handler


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleSummary:
    return generate_sample(
        tmp_path_factory.mktemp("sample"), SampleSpec(users=20, seed=21, media_images=120)
    )


@pytest.fixture
def servers() -> Iterator[tuple[Served, str, str]]:
    served = Served()
    running = []
    for name in ("api", "cdn"):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served, name))
        httpd.daemon_threads = True
        thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        running.append((httpd, thread))
    api, cdn = (f"http://127.0.0.1:{h.server_address[1]}" for h, _ in running)
    served.cdn_base = cdn
    yield served, api, cdn
    for httpd, thread in running:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def store(tmp_path: Path) -> MediaStore:
    return MediaStore(Lake(str(tmp_path / "lake")))


def _image_rows(sample: SampleSummary) -> list[dict]:
    truth = pq.read_table(sample.out / "truth/image_media.parquet").to_pylist()
    with_media = {r["imageId"]: r for r in truth if r["has_media"]}
    rows = []
    for f in sample.image_files:
        for row in pq.read_table(f, columns=["imageId", "url"]).to_pylist():
            if row["imageId"] in with_media:
                rows.append(row)
    return rows


def _stored_files(store: MediaStore) -> list[Path]:
    return [p for p in Path(store.root).rglob("*") if p.is_file()]


# --- images -----------------------------------------------------------------------------------


def test_images_are_verified_resized_and_stored(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, _, cdn = servers
    rows = _image_rows(sample)
    ids = sorted({r["imageId"] for r in rows})
    for image_id in ids:
        served.images[image_id] = (sample.out / f"media/images/{image_id}.jpeg").read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (1200, 800), (200, 40, 40)).save(big, format="PNG")
    served.images[ids[0]] = big.getvalue()  # larger than max_side: shrunk, kept as PNG
    report = download_images(rows, store, image_url_map(cdn), concurrency=4, max_side=512)
    table = report.table.to_pylist()
    assert [r["imageId"] for r in table] == ids  # one row per distinct image, input order
    assert report.downloaded == len(ids) and report.failed == 0 and report.quarantine.num_rows == 0
    assert report.http["requests"] == len(ids) and report.http["retries"] == 0
    urls = {r["imageId"]: r["url"] for r in rows}
    for row in table:
        assert row["status"] == STATUS_OK and row["reason"] is None
        assert row["url"] == urls[row["imageId"]] and row["url"].startswith(IMAGE_HOST)
        data = Path(row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["bytes"]
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (row["width"], row["height"])
    shrunk = table[0]
    assert (shrunk["width"], shrunk["height"]) == (512, 341) and shrunk["path"].endswith(".png")
    original = table[1]
    assert Path(original["path"]).read_bytes() == served.images[ids[1]]  # small: kept as is


def test_bad_images_are_quarantined_with_reasons(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, _, cdn = servers
    good_id = _image_rows(sample)[0]["imageId"]
    jpeg = (sample.out / f"media/images/{good_id}.jpeg").read_bytes()
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, format="PNG")
    bomb_bytes = bytearray(bomb.getvalue())
    bomb_bytes[16:24] = (50_000).to_bytes(4, "big") + (50_000).to_bytes(4, "big")  # IHDR size
    bomb_bytes[29:33] = zlib.crc32(bytes(bomb_bytes[12:29])).to_bytes(4, "big")
    cases = {
        1: None,  # 404
        2: jpeg[: len(jpeg) // 2],  # truncated
        3: b"<html><body>rate limited</body></html>",  # not an image
        4: bytes(bomb_bytes),  # claims 2.5 gigapixels
        5: b"",  # empty
        6: b"GIF89a" + b"\x00" * 10,  # corrupt
        7: jpeg,  # fine
    }
    for image_id, data in cases.items():
        if data is not None:
            served.images[image_id] = data
    rows = [(i, f"{IMAGE_HOST}/key/uuid-{i}/width=512/{i}.jpeg") for i in cases]
    rows.append((8, "file:///etc/passwd"))
    rows.append((9, None))
    report = download_images(
        rows, store, image_url_map(cdn), concurrency=3, retry=RetryPolicy.fast(1)
    )
    by_id = {r["imageId"]: r for r in report.table.to_pylist()}
    assert set(by_id) == set(range(1, 10))  # nothing dropped
    expected = {
        1: "http 404",
        2: "truncated image",
        3: "not an image",
        4: "too many pixels",
        5: "empty body",
        6: "image",
        8: "unsupported url scheme",
        9: "missing url",
    }
    for image_id, reason in expected.items():
        assert by_id[image_id]["status"] == STATUS_FAILED, image_id
        assert reason in by_id[image_id]["reason"], (image_id, by_id[image_id]["reason"])
        assert by_id[image_id]["path"] is None
    assert by_id[7]["status"] == STATUS_OK
    quarantine = {r["record_key"]: r for r in report.quarantine.to_pylist()}
    assert set(quarantine) == {f"imageId={i}" for i in expected}
    for image_id in expected:
        q = quarantine[f"imageId={image_id}"]
        assert (q["source"], q["step"], q["table_name"]) == ("media", "image_files", "images")
        assert q["reason"] == by_id[image_id]["reason"] and q["detail"] == by_id[image_id]["url"]
        assert q["quarantined_at"] is not None
    assert report.failed == len(expected) and report.downloaded == 1
    assert len(served.seen("cdn", "/1.jpeg$")) == 1  # a 404 is not retried
    assert len(_stored_files(store)) == 1


def test_image_downloads_resume_and_retry_transient_errors(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, _, cdn = servers
    rows = _image_rows(sample)[:20]
    ids = sorted({r["imageId"] for r in rows})
    for image_id in ids[1:]:
        served.images[image_id] = (sample.out / f"media/images/{image_id}.jpeg").read_bytes()
    flaky = urlsplit(next(r["url"] for r in rows if r["imageId"] == ids[1])).path
    served.routes[flaky] = Route(
        body=served.images[ids[1]], headers={"Content-Type": "image/jpeg"}, fail_first=2
    )
    first = download_images(rows, store, image_url_map(cdn), concurrency=2, retry=FAST)
    assert first.downloaded == len(ids) - 1 and first.failed == 1  # ids[0]: 404
    assert {r["imageId"]: r["status"] for r in first.table.to_pylist()}[ids[1]] == STATUS_OK
    assert len(served.seen("cdn", re.escape(flaky))) == 3  # two 503s, then the image
    served.images[ids[0]] = (sample.out / f"media/images/{ids[0]}.jpeg").read_bytes()
    served.requests.clear()
    second = download_images(rows, store, image_url_map(cdn), concurrency=2, existing=first.table)
    assert second.skipped == len(ids) - 1 and second.downloaded == 1 and second.failed == 0
    assert len(served.requests) == 1  # only the image that failed before
    assert second.table.num_rows == len(ids)
    assert all(s == STATUS_OK for s in second.table.column("status").to_pylist())
    served.requests.clear()
    third = download_images(rows, store, image_url_map(cdn), existing=second.table)
    assert third.downloaded == 0 and third.skipped == len(ids) and not served.requests
    assert third.table.equals(second.table)


# --- LoRA files -------------------------------------------------------------------------------


def _primary_rows(sample: SampleSummary) -> list[dict]:
    columns = ["modelVersionId", "fileId", "fileName", "format", "hashSHA256", "downloadUrl"]
    rows = []
    seen = set()
    for f in sample.model_files:
        table = pq.read_table(f)
        for row in table.filter(pa.compute.equal(table["primary"], 1)).to_pylist():
            key = (row["modelVersionId"], row["fileId"])
            if row["modelVersionId"] is not None and key not in seen:
                seen.add(key)
                rows.append({c: row[c] for c in columns})
    return rows


def _serve_files(served: Served, sample: SampleSummary, rows: list[dict]) -> None:
    for row in rows:
        data = (sample.out / "media/loras" / row["fileName"]).read_bytes()
        served.files[row["modelVersionId"]] = Route(
            body=data,
            headers={"Content-Disposition": f'attachment; filename="{row["fileName"]}"'},
        )


def test_loras_are_downloaded_verified_and_pickles_refused_unrequested(
    sample: SampleSummary,
    servers: tuple[Served, str, str],
    store: MediaStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    served, api, _ = servers
    rows = _primary_rows(sample)
    _serve_files(served, sample, rows)
    caplog.set_level(logging.DEBUG)
    report = download_loras(rows, store, base_url=api, token=TOKEN, concurrency=4)
    table = {r["modelVersionId"]: r for r in report.table.to_pylist()}
    assert len(table) == len(rows)
    pickles = {r["modelVersionId"] for r in rows if r["format"] == "PickleTensor"}
    assert pickles and report.refused == len(pickles)
    for row in rows:
        got = table[row["modelVersionId"]]
        if row["modelVersionId"] in pickles:
            assert got["status"] == STATUS_REFUSED and "PickleTensor" in got["reason"]
            assert not served.seen("api", f"/models/{row['modelVersionId']}$")  # never asked
            continue
        assert got["status"] == STATUS_OK, got
        assert got["sha256"] == row["hashSHA256"].lower() and got["sha256_verified"] is True
        assert got["file_name"] == row["fileName"]
        data = Path(got["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == got["sha256"] and len(data) == got["bytes"]
        loaded = lf.load_lora(data, modules=lf.sd15_modules(lf.SAMPLE_WIDTHS))
        assert got["n_tensors"] == 3 * len(loaded.layers)
    assert report.downloaded == len(rows) - len(pickles) and report.failed == 0
    assert report.unverified == 0
    assert report.quarantine.num_rows == len(pickles)
    assert set(report.quarantine.column("step").to_pylist()) == {"lora_files"}
    assert set(report.quarantine.column("reason").to_pylist()) == {
        "refused: declared format PickleTensor"
    }
    # the token went to the API only, never to the signed-URL host
    api_headers = served.seen("api", "/api/")
    assert api_headers
    assert all(h.get("Authorization") == f"Bearer {TOKEN}" for h in api_headers)
    assert not any("Authorization" in h for h in served.seen("cdn", "/files/"))
    assert TOKEN not in caplog.text


def _pickle_bomb(marker: Path) -> bytes:
    class Boom:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    return pickle.dumps({"lora_unet_x.lora_down.weight": Boom()}, protocol=2)


def test_disguised_pickles_wrong_hashes_and_oversized_files_are_quarantined(
    sample: SampleSummary,
    servers: tuple[Served, str, str],
    store: MediaStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    served, api, _ = servers
    marker = tmp_path / "unpickled-marker"
    bomb = _pickle_bomb(marker)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the downloader tried to unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    good = next(r for r in _primary_rows(sample) if r["format"] == "SafeTensor")
    good_bytes = (sample.out / "media/loras" / good["fileName"]).read_bytes()
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", bomb)
    cases: dict[int, tuple[bytes, str, str | None]] = {
        # version: (served bytes, served file name, expected hash or None for the real one)
        101: (bomb, "innocent.safetensors", None),
        102: (zipped.getvalue(), "innocent.safetensors", None),
        103: (good_bytes, "sneaky.ckpt", None),
        104: (good_bytes, "x.safetensors", "0" * 64),
        105: (good_bytes + b" " * 50_000, "x.safetensors", None),  # over max_bytes (declared)
        106: (good_bytes + b" " * 50_000, "x.safetensors", None),  # over max_bytes (streamed)
        107: (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", "x.safetensors", None),
        108: (good_bytes, "", None),  # no file missing: 404 below
    }
    rows = []
    for version, (data, name, expected) in cases.items():
        served.files[version] = Route(
            body=data,
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
            chunked=version == 106,
        )
        rows.append(
            {
                "modelVersionId": version,
                "fileId": version * 10,
                "fileName": f"declared_{version}.safetensors",
                "format": "SafeTensor",
                "hashSHA256": (expected or hashlib.sha256(data).hexdigest()).upper(),
                "downloadUrl": f"{API_HOST}/api/download/models/{version}?token={TOKEN}",
            }
        )
    del served.files[108]
    caplog.set_level(logging.DEBUG)
    limit = len(good_bytes) + 10
    report = download_loras(rows, store, base_url=api, token=TOKEN, max_bytes=limit)
    got = {r["modelVersionId"]: r for r in report.table.to_pylist()}
    expected_status = {
        101: (STATUS_REFUSED, "pickle content"),
        102: (STATUS_REFUSED, "zip"),
        103: (STATUS_REFUSED, ".ckpt"),
        104: (STATUS_FAILED, "sha256 mismatch"),
        105: (STATUS_FAILED, "too large"),
        106: (STATUS_FAILED, "too large"),
        107: (STATUS_FAILED, "invalid safetensors"),
        108: (STATUS_FAILED, "http 404"),
    }
    for version, (status, reason) in expected_status.items():
        assert got[version]["status"] == status, (version, got[version])
        assert reason in got[version]["reason"], (version, got[version]["reason"])
        assert got[version]["path"] is None
    assert report.quarantine.num_rows == len(cases)
    assert not marker.exists()
    assert _stored_files(store) == []  # nothing refused or failed reached the store
    # the token is nowhere: tables (urls had ?token=), quarantine, logs
    text = str(report.table.to_pylist()) + str(report.quarantine.to_pylist()) + caplog.text
    assert TOKEN not in text
    details = report.quarantine.column("detail").to_pylist()
    assert len(details) == len(cases) and all(d.startswith(API_HOST) for d in details)
    assert not any("token=" in d for d in details)


def test_traversal_names_are_neutralised(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore, tmp_path: Path
) -> None:
    served, api, _ = servers
    good = next(r for r in _primary_rows(sample) if r["format"] == "SafeTensor")
    data = (sample.out / "media/loras" / good["fileName"]).read_bytes()
    names = {
        201: 'attachment; filename="../../../../tmp/evil.safetensors"',
        202: 'attachment; filename="/etc/passwd"',
        203: 'attachment; filename="..\\\\..\\\\win.safetensors"',
        204: "attachment; filename*=UTF-8''" + quote("../x\x00y.safetensors"),
        205: 'attachment; filename=".."',
    }
    rows = []
    for version, disposition in names.items():
        served.files[version] = Route(body=data, headers={"Content-Disposition": disposition})
        rows.append(
            {
                "modelVersionId": version,
                "fileId": version,
                "fileName": "declared.safetensors",
                "format": "SafeTensor",
                "hashSHA256": good["hashSHA256"],
                "downloadUrl": f"{API_HOST}/api/download/models/{version}",
            }
        )
    report = download_loras(rows, store, base_url=api, token=TOKEN)
    got = {r["modelVersionId"]: r["file_name"] for r in report.table.to_pylist()}
    assert got == {
        201: "evil.safetensors",
        202: "passwd",
        203: "win.safetensors",
        204: "xy.safetensors",
        205: "declared.safetensors",
    }
    assert report.table.column("status").to_pylist() == [STATUS_OK] * len(names)
    stored = _stored_files(store)
    assert len(stored) == 1 and stored[0].name == f"{hashlib.sha256(data).hexdigest()}.safetensors"
    # nothing escaped the store: no file anywhere under the test's folders but the stored one
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "evil" in p.name]
    assert written == []
    assert not Path("/tmp/evil.safetensors").exists()


def test_lora_downloads_resume_and_lost_or_corrupt_objects_are_fetched_again(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, api, _ = servers
    rows = [r for r in _primary_rows(sample) if r["format"] == "SafeTensor"][:6]
    _serve_files(served, sample, rows)
    first = download_loras(rows, store, base_url=api, token=TOKEN)
    assert first.downloaded == len(rows) and first.skipped == 0
    served.requests.clear()
    second = download_loras(rows, store, base_url=api, token=TOKEN, existing=first.table)
    assert second.downloaded == 0 and second.skipped == len(rows) and not served.requests
    assert second.table.equals(first.table)
    paths = first.table.column("path").to_pylist()
    Path(paths[0]).unlink()  # a lost object is fetched again
    corrupt = Path(paths[1])
    corrupt.write_bytes(corrupt.read_bytes()[:-1] + b"\x00")  # same size, wrong bytes
    third = download_loras(rows, store, base_url=api, token=TOKEN, existing=second.table)
    assert (third.downloaded, third.skipped, third.lost, third.corrupt) == (2, len(rows) - 2, 1, 1)
    assert len(served.seen("api", "/api/download/models/")) == 2
    for path, sha in zip(paths[:2], first.table.column("sha256").to_pylist()[:2], strict=True):
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha  # restored
    assert third.table.equals(first.table)


def test_rows_may_be_an_arrow_table_or_tuples(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, api, _ = servers
    rows = [r for r in _primary_rows(sample) if r["format"] == "SafeTensor"][:2]
    _serve_files(served, sample, rows)
    from_table = download_loras(pa.Table.from_pylist(rows), store, base_url=api, token=TOKEN)
    tuples = [tuple(r.values()) for r in rows]
    from_tuples = download_loras(tuples, store, base_url=api, token=TOKEN)
    assert from_table.table.column("sha256").equals(from_tuples.table.column("sha256"))
    with pytest.raises(ValueError, match="columns"):
        download_loras([(1, 2)], store, base_url=api)
    assert np.all(np.array(from_tuples.table.column("n_tensors").to_pylist()) > 0)


# --- names (moved with the downloader) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("/etc/shadow.safetensors", "shadow.safetensors"),
        ("..\\..\\windows\\evil.safetensors", "evil.safetensors"),
        ("C:\\models\\x.safetensors", "x.safetensors"),
        ("a\x00b.safetensors", "ab.safetensors"),
        ("..", "fallback.safetensors"),
        ("...hidden.safetensors", "hidden.safetensors"),
        ("", "fallback.safetensors"),
        (
            "na\u0308me with spaces;$.safetensors",
            "näme with spaces__.safetensors".replace("ä", "_"),
        ),
        ("x" * 300 + ".safetensors", "x" * 188 + ".safetensors"),
    ],
)
def test_file_names_are_reduced_to_safe_base_names(raw: str, safe: str) -> None:
    assert safe_file_name(raw, "fallback.safetensors") == safe


def test_content_disposition_names_are_parsed() -> None:
    assert (
        content_disposition_filename('attachment; filename="a b.safetensors"') == "a b.safetensors"
    )
    assert content_disposition_filename("attachment; filename=plain.ckpt") == "plain.ckpt"
    assert (
        content_disposition_filename("attachment; filename=\"x\"; filename*=UTF-8''%2E%2E%2Fy.pt")
        == "../y.pt"
    )
    assert content_disposition_filename("inline") is None
    assert content_disposition_filename(None) is None


# --- sad paths of the one HTTP stack -------------------------------------------------------------


def _jpeg(sample: SampleSummary) -> tuple[int, bytes]:
    image_id = _image_rows(sample)[0]["imageId"]
    return image_id, (sample.out / f"media/images/{image_id}.jpeg").read_bytes()


def _lora(sample: SampleSummary) -> tuple[dict, bytes]:
    good = next(r for r in _primary_rows(sample) if r["format"] == "SafeTensor")
    return good, (sample.out / "media/loras" / good["fileName"]).read_bytes()


def _lora_row(version: int, data: bytes | None, **overrides: object) -> dict:
    row = {
        "modelVersionId": version,
        "fileId": version * 10,
        "fileName": f"f{version}.safetensors",
        "format": "SafeTensor",
        "hashSHA256": hashlib.sha256(data).hexdigest() if data is not None else None,
        "downloadUrl": f"{API_HOST}/api/download/models/{version}",
    }
    return row | overrides


def _recorder() -> tuple[list[float], object]:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    return waits, sleep


def test_redirect_loops_and_chains_end_without_retries(
    servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, _, cdn = servers
    served.routes["/loop/a"] = Route(302, headers={"Location": "/loop/b"})
    served.routes["/loop/b"] = Route(302, headers={"Location": f"{cdn}/loop/a"})
    for i in range(10):
        served.routes[f"/chain/{i}"] = Route(302, headers={"Location": f"/chain/{i + 1}"})
    rows = [(1, f"{IMAGE_HOST}/loop/a"), (2, f"{IMAGE_HOST}/chain/0")]
    report = download_images(rows, store, image_url_map(cdn), retry=FAST)
    by_id = {r["imageId"]: r for r in report.table.to_pylist()}
    assert by_id[1]["status"] == STATUS_FAILED and by_id[1]["reason"] == "redirect loop"
    assert by_id[2]["status"] == STATUS_FAILED and "too many redirects" in by_id[2]["reason"]
    assert len(served.seen("cdn", "^/loop/")) == 2  # a, b; back to a is recognised, not sent
    assert len(served.seen("cdn", "^/chain/")) == MAX_REDIRECTS + 1
    assert report.http["retries"] == 0 and report.quarantine.num_rows == 2
    assert _stored_files(store) == []


def test_a_redirect_to_file_is_refused_and_never_followed(
    sample: SampleSummary,
    servers: tuple[Served, str, str],
    store: MediaStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served, api, cdn = servers
    secret = tmp_path / "secret.safetensors"
    _, data = _lora(sample)
    secret.write_bytes(data)  # a valid file the redirect points at: it must not be read
    opened: list[str] = []
    real_open = open

    def spy_open(file, *args, **kwargs):  # noqa: ANN001, ANN202 - builtins.open's signature
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy_open)
    served.routes["/to-file"] = Route(302, headers={"Location": f"file://{secret}"})
    served.routes["/api/download/models/301"] = Route(307, headers={"Location": f"FILE://{secret}"})
    images = download_images([(1, f"{IMAGE_HOST}/to-file")], store, image_url_map(cdn))
    loras = download_loras([_lora_row(301, data)], store, base_url=api, token=TOKEN)
    for report in (images, loras):
        (row,) = report.table.to_pylist()
        assert row["status"] == STATUS_REFUSED and row["path"] is None
        assert row["reason"] == "refused: redirect to a 'file' url"
        assert report.refused == 1 and report.http["requests"] == 1
        assert report.quarantine.column("reason").to_pylist() == [row["reason"]]
    assert str(secret) not in opened
    assert _stored_files(store) == []


def test_a_body_cut_short_is_retried_then_succeeds(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, _, cdn = servers
    image_id, jpeg = _jpeg(sample)
    served.routes["/cut/1.jpeg"] = Route(body=jpeg, cut_first=1)
    report = download_images([(image_id, f"{IMAGE_HOST}/cut/1.jpeg")], store, image_url_map(cdn))
    (row,) = report.table.to_pylist()
    assert row["status"] == STATUS_OK, row
    assert Path(row["path"]).read_bytes() == jpeg  # the whole body, not the half first sent
    assert len(served.seen("cdn", "^/cut/")) == 2 and report.http["retries"] == 1


class _ResetMidBody(httpx.AsyncByteStream):
    """Yields the first part of a body, then the connection is reset."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    async def __aiter__(self):  # noqa: ANN204 - an async generator
        yield self.head
        raise httpx.ReadError("[Errno 104] Connection reset by peer")


def _mock_api(
    files: dict[int, bytes], resets: dict[int, int], seen: list[str]
) -> httpx.MockTransport:
    """API at http://api.test (307 to http://cdn.test); cdn resets a file mid-body
    ``resets[version]`` times before serving it whole."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        version = int(request.url.path.rsplit("/", 1)[-1])
        if request.url.host == "api.test":
            return httpx.Response(307, headers={"Location": f"http://cdn.test/files/{version}"})
        body = files[version]
        headers = {"Content-Length": str(len(body))}
        if resets.get(version, 0) > 0:
            resets[version] -= 1
            return httpx.Response(200, headers=headers, stream=_ResetMidBody(body[:100]))
        return httpx.Response(200, headers=headers, content=body)

    return httpx.MockTransport(handler)


def test_a_reset_mid_body_is_retried_quarantined_when_it_persists_and_resumed(
    sample: SampleSummary, store: MediaStore, tmp_path: Path
) -> None:
    _, data = _lora(sample)
    spool = tmp_path / "spool"
    spool.mkdir()
    rows = [_lora_row(1, data), _lora_row(2, data)]
    seen: list[str] = []
    resets = {1: 1, 2: 99}  # 1: one reset then fine; 2: resets on every attempt
    transport = _mock_api({1: data, 2: data}, resets, seen)
    first = download_loras(
        rows,
        store,
        base_url="http://api.test",
        retry=RetryPolicy.fast(3),
        transport=transport,
        spool_dir=str(spool),
    )
    got = {r["modelVersionId"]: r for r in first.table.to_pylist()}
    assert got[1]["status"] == STATUS_OK and got[1]["sha256"] == hashlib.sha256(data).hexdigest()
    assert got[2]["status"] == STATUS_FAILED and got[2]["path"] is None
    assert got[2]["reason"].startswith("connection error: gave up after 3 attempts")
    assert got[2]["reason"].endswith("(ReadError while reading the body)")
    assert "cdn.test" not in got[2]["reason"]  # no (signed) URL in the table
    assert first.quarantine.column("record_key").to_pylist() == ["modelVersionId=2/fileId=20"]
    assert sum("cdn.test/files/2" in u for u in seen) == 3
    assert list(spool.iterdir()) == []  # no partial spool left behind
    resets[2] = 0  # the network recovers: the next run fetches only what failed
    seen.clear()
    second = download_loras(
        rows,
        store,
        base_url="http://api.test",
        retry=RetryPolicy.fast(3),
        transport=transport,
        spool_dir=str(spool),
        existing=first.table,
    )
    assert (second.downloaded, second.skipped, second.failed) == (1, 1, 0)
    assert seen == ["http://api.test/api/download/models/2", "http://cdn.test/files/2"]


def test_retries_exhausted_are_quarantined_then_resumed_on_the_next_run(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, _, cdn = servers
    image_id, jpeg = _jpeg(sample)
    served.routes["/busy/1.jpeg"] = Route(body=jpeg, fail_first=3)
    rows = [(image_id, f"{IMAGE_HOST}/busy/1.jpeg")]
    first = download_images(rows, store, image_url_map(cdn), retry=RetryPolicy.fast(2))
    (row,) = first.table.to_pylist()
    assert row["status"] == STATUS_FAILED
    assert row["reason"].startswith("http 503: gave up after 2 attempts")
    assert first.reasons == {"http 503": 1} and first.quarantine.num_rows == 1
    second = download_images(
        rows, store, image_url_map(cdn), retry=RetryPolicy.fast(2), existing=first.table
    )
    assert (second.downloaded, second.failed) == (1, 0)  # one more 503, then the image
    assert len(served.seen("cdn", "^/busy/")) == 4
    assert second.table.column("status").to_pylist() == [STATUS_OK]


def test_retry_after_as_an_http_date_is_honoured(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, _, cdn = servers
    image_id, jpeg = _jpeg(sample)
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    served.routes["/later/1.jpeg"] = Route(body=jpeg, fail_first=1, retry_after=later)
    waits, sleep = _recorder()
    policy = RetryPolicy(attempts=3, initial=0.01, maximum=0.05, jitter=0.0, max_retry_after=60)
    report = download_images(
        [(image_id, f"{IMAGE_HOST}/later/1.jpeg")],
        store,
        image_url_map(cdn),
        retry=policy,
        sleep=sleep,
    )
    assert report.table.column("status").to_pylist() == [STATUS_OK]
    assert len(waits) == 1 and 20.0 <= waits[0] <= 30.0  # the date, not the 0.01 s backoff


def test_retry_after_beyond_the_cap_is_capped(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, api, _ = servers
    good, data = _lora(sample)
    served.routes["/api/download/models/401"] = Route(429, b"slow down", {"Retry-After": "3600"})
    waits, sleep = _recorder()
    policy = RetryPolicy(attempts=3, initial=0.01, maximum=0.05, jitter=0.0, max_retry_after=1.5)
    report = download_loras(
        [_lora_row(401, data)], store, base_url=api, token=TOKEN, retry=policy, sleep=sleep
    )
    assert waits == [1.5, 1.5]  # an hour asked, the cap granted, twice
    assert (
        report.table.column("reason")
        .to_pylist()[0]
        .startswith("http 429: gave up after 3 attempts")
    )
    assert report.http["seconds_waiting"] == 3.0


def test_a_release_row_without_sha256_is_stored_unverified_and_counted(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, api, _ = servers
    good, data = _lora(sample)
    served.files[501] = Route(body=data)
    served.files[502] = Route(body=data)
    rows = [_lora_row(501, data, hashSHA256=None), _lora_row(502, data, hashSHA256="  ")]
    rows.append(_lora_row(503, data))
    served.files[503] = Route(body=data)
    first = download_loras(rows, store, base_url=api, token=TOKEN)
    got = {r["modelVersionId"]: r for r in first.table.to_pylist()}
    digest = hashlib.sha256(data).hexdigest()
    assert [got[v]["sha256_verified"] for v in (501, 502, 503)] == [False, False, True]
    assert len(got) == 3
    assert all(got[v]["status"] == STATUS_OK and got[v]["sha256"] == digest for v in got)
    assert first.unverified == 2 and first.failed == 0 and first.quarantine.num_rows == 0
    # A later release brings hashes: the right one verifies the stored file without a
    # request, a wrong one sends the file back through the check (and fails it).
    served.requests.clear()
    later = [_lora_row(501, data), _lora_row(502, data, hashSHA256="0" * 64), rows[2]]
    second = download_loras(later, store, base_url=api, token=TOKEN, existing=first.table)
    got = {r["modelVersionId"]: r for r in second.table.to_pylist()}
    assert got[501]["status"] == STATUS_OK and got[501]["sha256_verified"] is True
    assert got[502]["status"] == STATUS_FAILED and "sha256 mismatch" in got[502]["reason"]
    assert (second.skipped, second.unverified) == (2, 0)
    assert [p for p in (r[1] for r in served.requests) if "/models/" in p] == [
        "/api/download/models/502"
    ]


def test_a_corrupted_image_in_the_store_is_downloaded_again(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, _, cdn = servers
    rows = _image_rows(sample)[:5]
    ids = sorted({r["imageId"] for r in rows})
    for image_id in ids:
        served.images[image_id] = (sample.out / f"media/images/{image_id}.jpeg").read_bytes()
    first = download_images(rows, store, image_url_map(cdn))
    victim = first.table.to_pylist()[2]
    Path(victim["path"]).write_bytes(b"\xff\xd8 not the stored image")
    served.requests.clear()
    second = download_images(rows, store, image_url_map(cdn), existing=first.table)
    assert (second.corrupt, second.downloaded, second.skipped) == (1, 1, len(ids) - 1)
    assert [p for _, p, _ in served.requests] == [urlsplit(victim["url"]).path]
    assert hashlib.sha256(Path(victim["path"]).read_bytes()).hexdigest() == victim["sha256"]
    assert second.table.equals(first.table)


def test_401_stops_api_requests_403_fails_one_file_and_both_resume(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, api, _ = servers
    rows = [r for r in _primary_rows(sample) if r["format"] == "SafeTensor"][:5]
    _serve_files(served, sample, rows)
    for token in ("wrong-token", None):
        served.requests.clear()
        denied = download_loras(rows, store, base_url=api, token=token, concurrency=1)
        reasons = denied.table.column("reason").to_pylist()
        assert denied.reasons == {"http 401": len(rows)}, reasons
        assert reasons[0] == "http 401: unauthorized (API token missing or refused)"
        assert reasons[1:]
        assert all("not requested after an earlier 401" in r for r in reasons[1:])
        assert len(served.seen("api", "/api/download/")) == 1  # one request, not one per file
        assert denied.http["retries"] == 0
        assert "wrong-token" not in str(denied.quarantine.to_pylist())
    forbidden = rows[0]["modelVersionId"]
    served.files[forbidden] = Route(403, b"early access")
    served.requests.clear()
    first = download_loras(rows, store, base_url=api, token=TOKEN, existing=denied.table)
    got = {r["modelVersionId"]: r for r in first.table.to_pylist()}
    assert got[forbidden]["reason"] == "http 403: forbidden"
    assert len(served.seen("cdn", f"^/files/{forbidden}/")) == 1  # never retried
    assert first.downloaded == len(rows) - 1 and first.failed == 1
    _serve_files(served, sample, rows[:1])
    second = download_loras(rows, store, base_url=api, token=TOKEN, existing=first.table)
    assert (second.downloaded, second.skipped, second.failed) == (1, len(rows) - 1, 0)


def test_the_user_agent_is_the_same_for_api_and_downloads(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, api, cdn = servers
    image_id, jpeg = _jpeg(sample)
    served.images[image_id] = jpeg
    good, data = _lora(sample)
    served.files[601] = Route(body=data)
    download_images(
        [(image_id, f"{IMAGE_HOST}/k/u/width=512/{image_id}.jpeg")], store, image_url_map(cdn)
    )
    download_loras([_lora_row(601, data)], store, base_url=api, token=TOKEN)

    async def crawl() -> None:
        async with CivitaiClient(api, TOKEN, retry=FAST) as client:
            await client.get("/api/v1/models", {"limit": 1})

    asyncio.run(crawl())
    agents = {(server, h.get("User-Agent")) for server, _, h in served.requests}
    assert agents == {("api", USER_AGENT), ("cdn", USER_AGENT)}
    assert len(served.seen("api", "^/api/v1/models")) == 1  # the client's request was seen


def test_the_token_never_appears_in_rows_quarantine_logs_or_exceptions(
    sample: SampleSummary,
    servers: tuple[Served, str, str],
    store: MediaStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    served, api, cdn = servers
    caplog.set_level(logging.DEBUG)
    _, data = _lora(sample)
    # servers echo the token: in a redirect's query, in an error body, in a refused target
    served.routes["/api/download/models/701"] = Route(
        307, headers={"Location": f"{cdn}/echo?token={TOKEN}&sig=1"}
    )
    served.routes["/echo"] = Route(500, f"bad token {TOKEN}".encode(), {"Retry-After": "0"})
    served.routes["/api/download/models/702"] = Route(
        307, headers={"Location": f"ftp://x/{TOKEN}?api_key={TOKEN}"}
    )
    served.files[703] = Route(body=data)
    rows = [
        _lora_row(v, data, downloadUrl=f"{API_HOST}/api/download/models/{v}?token={TOKEN}")
        for v in (701, 702, 703)
    ]
    report = download_loras(rows, store, base_url=api, token=TOKEN, retry=RetryPolicy.fast(2))
    statuses = report.table.column("status").to_pylist()
    assert statuses == [STATUS_FAILED, STATUS_REFUSED, STATUS_OK]
    texts = [str(report.table.to_pylist()), str(report.quarantine.to_pylist()), caplog.text]
    assert "retry 1/2" in caplog.text  # the retry of 701 was logged, scrubbed

    # an unexpected error (here: the store fails) stops the run with a scrubbed message
    def broken_put(*args: object, **kwargs: object) -> None:
        raise OSError(f"disk full while writing {api}/x?token={TOKEN} (Bearer {TOKEN})")

    monkeypatch.setattr(MediaStore, "put_file", broken_put)
    with pytest.raises(DownloadError) as info:
        download_loras(rows[2:], store, base_url=api, token=TOKEN, existing=None)
    texts += [str(info.value), "".join(traceback.format_exception(info.value)), caplog.text]
    assert "disk full" in str(info.value)
    for text in texts:
        assert TOKEN not in text
    # the token went only to the API origin, in the header
    api_headers = served.seen("api", "/api/")
    assert api_headers
    assert all(h.get("Authorization") == f"Bearer {TOKEN}" for h in api_headers)
    assert not any("Authorization" in h for _, _, h in served.requests if _ == "cdn")


def test_downloads_keep_to_the_rate_limit(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, _, cdn = servers
    rows = _image_rows(sample)[:10]
    ids = sorted({r["imageId"] for r in rows})
    for image_id in ids:
        served.images[image_id] = (sample.out / f"media/images/{image_id}.jpeg").read_bytes()
    started = time.monotonic()
    report = download_images(rows, store, image_url_map(cdn), concurrency=8, rate_limit=20)
    elapsed = time.monotonic() - started
    assert report.downloaded == len(ids) and report.http["requests"] == len(ids)
    # 20 requests/s with a burst of 2: at least (n - 2) / 20 s, however many workers
    assert elapsed >= (len(ids) - 2) / 20
