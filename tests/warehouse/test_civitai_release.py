"""The Civitai raw landing's layout and reader, and the release build from landed pages.

Pages are landed here directly (no server, no crawl) so every case is exact: the latest
snapshot wins, every unmappable page or item becomes one QuarantineRecord with its lineage,
and the release folder is replaced atomically or not at all.
"""

from __future__ import annotations

import gzip
import json
import posixpath
import secrets
import shutil
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest

from tests.civitai import image_item, model_item, same_tables
from warehouse import civitai_release as cr
from warehouse.files import atomic_write_bytes
from warehouse.lake import Lake
from warehouse.quarantine import QUARANTINE_SCHEMA, quarantine_table
from warehouse.schema import IMAGES, MODELS

API = "https://civitai.test/api/v1"


def page(
    stream: str,
    body: Any,
    *,
    fetched_at: str = "2024-01-01T00:00:00.000000Z",
    status: int = 200,
    params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A landed line as the crawler writes it."""
    return {
        "format": cr.FORMAT_VERSION,
        "stream": stream,
        "url": f"{API}/{stream}",
        "params": params or {},
        "status": status,
        "fetched_at": fetched_at,
        "elapsed": 0.01,
        "attempts": 1,
        "error": None,
        "body": body if isinstance(body, str) else json.dumps(body),
    }


def images_page(version: int, *items: dict, **kwargs: Any) -> dict[str, Any]:
    body = {"items": list(items), "metadata": {}}
    return page("images", body, params={"modelVersionId": str(version)}, **kwargs)


def land(lake: Lake, window: str, stream: str, seq: int, lines: list[Any]) -> str:
    """Write one committed part file of ``lines`` (dicts, or raw bytes for a corrupt line)."""
    name = cr.part_name(seq)
    relative = cr.window_dir(window, stream, name)
    if all(isinstance(line, dict) for line in lines):
        data = cr.encode_part(lines)
    else:
        raw = b"".join(
            (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
            for line in lines
        )
        data = gzip.compress(raw)
    atomic_write_bytes(posixpath.join(lake.root, relative), data, fs=lake.fs)
    return relative


def rows(out: Path, table: str) -> list[dict]:
    return pq.read_table(out / table).to_pylist()


@pytest.fixture
def landed(tmp_path) -> Lake:
    """Two windows: a model with two files, an image re-read later with more likes, and the
    same version fetched through /model-versions with another name."""
    lake = Lake(str(tmp_path / "lake"))
    version = dict(model_item()["modelVersions"][0], name="from /model-versions")
    version["model"] = {"name": "Neon Style", "type": "LORA", "nsfw": False, "poi": False}
    land(lake, "w1", "models", 0, [page("models", {"items": [model_item()], "metadata": {}})])
    land(lake, "w1", "images", 0, [images_page(101, image_item(), image_item(id=556))])
    later = image_item(stats=dict(image_item()["stats"], likeCount=9))
    land(lake, "w2", "images", 0, [images_page(101, later, fetched_at="2024-01-02T00:00:00Z")])
    land(lake, "w2", "model_versions", 0, [page("model_versions", version, fetched_at="2024-02")])
    return lake


def test_layout_names_windows_and_parts():
    assert cr.window_dir("2024-01-01", "images") == "raw/civitai/window=2024-01-01/images"
    assert cr.PART_PATTERN.match(cr.part_name(7))
    first, second = cr.part_name(7), cr.part_name(7)
    assert first != second  # a random suffix: a rerun never overwrites
    cr.check_window("2024-01-01")
    for bad in ("", "a/b", "../up", ".hidden", "x" * 101):
        with pytest.raises(ValueError, match="window"):
            cr.check_window(bad)


def test_reader_reads_committed_parts_in_sequence_only(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    assert cr.list_windows(lake) == []
    land(lake, "b", "models", 10, [page("models", {"items": []}, fetched_at="ten")])
    land(lake, "b", "models", 2, [page("models", {"items": []}, fetched_at="two")])
    land(lake, "a", "images", 0, [images_page(1), images_page(2)])
    folder = Path(lake.root, cr.window_dir("b", "models"))
    (folder / ".part-000011-dead.jsonl.gz.x.tmp").write_bytes(b"\x1f")  # a killed writer's
    assert cr.list_windows(lake) == ["a", "b"]
    pages = list(cr.iter_raw_pages(lake))
    assert [(p.window, p.stream, p.line) for p in pages] == [
        ("a", "images", 0),
        ("a", "images", 1),
        ("b", "models", 0),
        ("b", "models", 0),
    ]
    assert [p.record["fetched_at"] for p in pages[2:]] == ["two", "ten"]
    assert [p.record["params"] for p in cr.iter_raw_pages(lake, ["a"])] == [
        {"modelVersionId": "1"},
        {"modelVersionId": "2"},
    ]
    assert list(cr.iter_raw_pages(lake, ["b"], streams=("images",))) == []


def test_build_keeps_the_latest_snapshot_of_each_key(landed, tmp_path):
    out = tmp_path / "release"
    build = cr.build_release(landed, out)
    assert build.windows == ["w1", "w2"] and build.pages == 4
    assert build.rows == {"images": 2, "models": 2}
    assert build.mapped_rows == {"images": 3, "models": 4}
    assert build.duplicates_dropped == {"images": 1, "models": 2}
    assert build.quarantine == [] and build.error_pages == 0 and build.bad_pages == 0
    assert sorted(p.name for p in out.iterdir()) == ["images", "models"]
    assert pq.read_schema(out / "images" / "part-00000.parquet") == IMAGES.canonical_schema()
    assert pq.read_schema(out / "models" / "part-00000.parquet") == MODELS.canonical_schema()
    likes = {r["imageId"]: r["likeCount"] for r in rows(out, "images")}
    assert likes == {555: 9, 556: 5}  # re-read a day later: the later snapshot wins
    models = rows(out, "models")
    assert [r["fileId"] for r in models] == [1001, 1002]
    # a /models row beats a later /model-versions row of the same key (it knows the model)
    assert {r["modelVersionName"] for r in models} == {"v1.0"}
    assert {r["userHash"] for r in models} == {"alice"}
    only_w1 = cr.build_release(landed, tmp_path / "w1", windows=["w1"])
    assert only_w1.rows == {"images": 2, "models": 2}
    assert {r["likeCount"] for r in rows(tmp_path / "w1", "images")} == {5}


def test_unmappable_pages_and_items_become_quarantine_records(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    html = "<html><head><title>Just a moment...</title></head></html>"
    images = land(
        lake,
        "w",
        "images",
        0,
        [
            images_page(101, image_item(), image_item(id=556, width="wide")),  # line 0
            b'{"stream": "images", "body": "cut',  # line 1: a corrupt raw line
            page("images", html, params={"modelVersionId": "101"}),  # line 2
            page("images", {"items": []}),  # line 3: no modelVersionId
            page("images", {"error": "busy"}, status=503, params={"modelVersionId": "1"}),
            {"stream": "images", "note": "permanent failure"},  # bookkeeping: ignored
        ],
    )
    build = cr.build_release(lake, tmp_path / "release")
    assert build.rows["images"] == 1 and build.pages == 1
    assert build.error_pages == 1 and build.bad_pages == 1
    records = {(q.source_row, q.table_name): q for q in build.quarantine}
    assert sorted(records) == [(0, "images"), (1, "page"), (2, "page"), (3, "page")]
    assert len(build.quarantine) == 4
    for q in build.quarantine:
        assert (q.source, q.step, q.source_file) == ("civitai", "crawl", images)
        assert q.reason and q.payload
    item = records[(0, "images")]
    assert item.record_key == "imageId=556/modelVersionId=101" and "width" in item.reason
    assert json.loads(item.payload)["width"] == "wide"
    assert records[(1, "page")].reason.startswith("corrupt raw line")
    assert records[(1, "page")].payload == '{"stream": "images", "body": "cut'
    assert "HTML" in records[(2, "page")].reason and records[(2, "page")].payload == html
    assert records[(2, "page")].record_key == f"url={API}/images"
    assert "modelVersionId" in records[(3, "page")].reason
    table = quarantine_table(build.quarantine)
    assert table.schema == QUARANTINE_SCHEMA and table.num_rows == 4


def test_build_replaces_the_release_atomically(landed, tmp_path, monkeypatch):
    out = tmp_path / "release"
    cr.build_release(landed, out)
    expected = tmp_path / "expected"
    shutil.copytree(out, expected)
    stray = out / "images" / "part-00099.parquet"
    shutil.copy(out / "images" / "part-00000.parquet", stray)
    cr.build_release(landed, out)
    assert not stray.exists() and same_tables(out, expected)

    original = cr._Output.write_table

    def broken(self, table, reader, rows_per_part):
        if table.name == "models":
            raise OSError("disk full")
        return original(self, table, reader, rows_per_part)

    monkeypatch.setattr(cr._Output, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        cr.build_release(landed, out)
    assert same_tables(out, expected)  # the previous release is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected", "lake", "release"]


def test_parts_are_split_by_rows_and_an_empty_table_still_has_a_part(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    items = [image_item(id=i) for i in range(1, 6)]
    land(lake, "w", "images", 0, [images_page(101, *items)])
    build = cr.build_release(lake, tmp_path / "release", rows_per_part=2)
    assert build.rows == {"images": 5, "models": 0}
    assert [Path(f).name for f in build.files["images"]] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert [r["imageId"] for r in rows(tmp_path / "release", "images")] == [1, 2, 3, 4, 5]
    (models,) = build.files["models"]
    assert pq.read_table(models).num_rows == 0
    assert pq.read_schema(models) == MODELS.canonical_schema()


def test_remote_lake_and_release_folder(landed, tmp_path):
    """The same build from and to an fsspec (non-local) store: puts instead of a swap."""
    fs = fsspec.filesystem("memory")
    root = f"memory://civitai-release-{secrets.token_hex(4)}"
    lake = Lake(f"{root}/lake")
    assert lake.remote
    try:
        for local in Path(landed.root).rglob("part-*.jsonl.gz"):
            relative = local.relative_to(landed.root).as_posix()
            fs.pipe(f"{root}/lake/{relative}", local.read_bytes())
        assert cr.list_windows(lake) == ["w1", "w2"]
        fs.pipe(f"{root}/release/images/part-00042.parquet", b"stale")
        build = cr.build_release(lake, f"{root}/release")
        assert build.files["images"] == [f"{root}/release/images/part-00000.parquet"]
        fs.get(f"{root}/release", str(tmp_path / "copy"), recursive=True)
        assert not (tmp_path / "copy" / "images" / "part-00042.parquet").exists()
        cr.build_release(landed, tmp_path / "local")
        assert same_tables(tmp_path / "copy", tmp_path / "local")
    finally:
        fs.rm(root, recursive=True)
