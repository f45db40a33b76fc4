"""Image and LoRA downloaders against local HTTP servers serving generated sample media.

Two stdlib servers run on 127.0.0.1: the "API" (``/api/download/models/{id}`` answers 307 to
the "CDN", with a token check) and the "CDN" (signed file URLs and image URLs). Nothing here
depends on the project's fake Civitai server.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
import threading
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ml import lora_format as lf
from pipelines.sample.generator import SampleSpec, SampleSummary, generate_sample
from warehouse.lake import Lake
from warehouse.media import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_REFUSED,
    MediaStore,
    download_images,
    download_loras,
    image_url_map,
)

TOKEN = "tok-SECRET-0123456789"
IMAGE_HOST = "https://image.civitai.com"
API_HOST = "https://civitai.com"


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False  # no Content-Length: the body ends when the connection closes
    fail_first: int = 0  # answer 503 this many times first


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
                    self._send(Route(503, b"busy", {"Retry-After": "0"}))
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
    report = download_images(rows, store, image_url_map(cdn), concurrency=3, retries=0)
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
    quarantine = {r["imageId"]: r for r in report.quarantine.to_pylist()}
    assert set(quarantine) == set(expected)
    assert all(q["reason"] == by_id[i]["reason"] for i, q in quarantine.items())
    assert report.failed == len(expected) and report.downloaded == 1
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
    first = download_images(rows, store, image_url_map(cdn), concurrency=2, backoff=0.01)
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
        assert got["sha256"] == row["hashSHA256"].lower()
        assert got["file_name"] == row["fileName"]
        data = Path(got["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == got["sha256"] and len(data) == got["bytes"]
        loaded = lf.load_lora(data, modules=lf.sd15_modules(lf.SAMPLE_WIDTHS))
        assert got["n_tensors"] == 3 * len(loaded.layers)
    assert report.downloaded == len(rows) - len(pickles) and report.failed == 0
    assert report.quarantine.num_rows == len(pickles)
    # the token went to the API only, never to the signed-URL host
    assert all(h.get("Authorization") == f"Bearer {TOKEN}" for h in served.seen("api", "/api/"))
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
    assert all("token=" not in u for u in report.quarantine.column("url").to_pylist())


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
    assert all(s == STATUS_OK for s in report.table.column("status").to_pylist())
    stored = _stored_files(store)
    assert len(stored) == 1 and stored[0].name == f"{hashlib.sha256(data).hexdigest()}.safetensors"
    assert not Path("/tmp/evil.safetensors").exists()


def test_lora_downloads_resume_and_bad_tokens_fail(
    sample: SampleSummary, servers: tuple[Served, str, str], store: MediaStore
) -> None:
    served, api, _ = servers
    rows = [r for r in _primary_rows(sample) if r["format"] == "SafeTensor"][:6]
    _serve_files(served, sample, rows)
    denied = download_loras(rows, store, base_url=api, token="wrong-token")
    assert set(denied.table.column("reason").to_pylist()) == {"http 401"}
    assert "wrong-token" not in str(denied.quarantine.to_pylist())
    first = download_loras(rows, store, base_url=api, token=TOKEN, existing=denied.table)
    assert first.downloaded == len(rows) and first.skipped == 0  # failures are retried
    served.requests.clear()
    second = download_loras(rows, store, base_url=api, token=TOKEN, existing=first.table)
    assert second.downloaded == 0 and second.skipped == len(rows) and not served.requests
    assert second.table.equals(first.table)
    Path(first.table.column("path")[0].as_py()).unlink()  # a lost object is fetched again
    third = download_loras(rows, store, base_url=api, token=TOKEN, existing=second.table)
    assert third.downloaded == 1 and third.skipped == len(rows) - 1


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
