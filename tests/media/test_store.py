"""The content-addressed media store: layout, idempotence, atomic writes, corrupted objects,
remote filesystems."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import fsspec
import pytest

from warehouse import files
from warehouse.lake import Lake
from warehouse.media import MediaStore


def test_objects_live_under_their_digest(tmp_path: Path) -> None:
    store = MediaStore(Lake(str(tmp_path)))
    data = b"hello media"
    digest = hashlib.sha256(data).hexdigest()
    stored = store.put_bytes(data, ".jpeg")
    assert stored.created and stored.sha256 == digest and stored.bytes == len(data)
    expected = tmp_path / "media" / "sha256" / digest[:2] / digest[2:4] / f"{digest}.jpeg"
    assert Path(stored.path) == expected and expected.read_bytes() == data
    assert store.read_bytes(stored.path) == data
    assert store.path_for(digest.upper(), ".jpeg") == stored.path


def test_putting_the_same_bytes_again_is_a_no_op(tmp_path: Path) -> None:
    store = MediaStore(Lake(str(tmp_path)))
    first = store.put_bytes(b"x" * 100, ".png")
    before = os.stat(first.path).st_mtime_ns
    again = store.put_bytes(b"x" * 100, ".png")
    assert not again.created and again.path == first.path
    assert os.stat(first.path).st_mtime_ns == before
    source = tmp_path / "spool.bin"
    source.write_bytes(b"x" * 100)
    assert not store.put_file(source, first.sha256, ".png").created
    files = [p for p in (tmp_path / "media").rglob("*") if p.is_file()]
    assert files == [Path(first.path)]  # no temp files left behind


def test_put_file_copies_a_verified_spool(tmp_path: Path) -> None:
    store = MediaStore(Lake(str(tmp_path / "lake")))
    spool = tmp_path / "spool"
    spool.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(spool.read_bytes()).hexdigest()
    stored = store.put_file(spool, digest, ".safetensors")
    assert stored.created and Path(stored.path).read_bytes() == spool.read_bytes()
    assert stored.path.endswith(f"{digest}.safetensors")


@pytest.mark.parametrize(
    ("digest", "ext"),
    [
        ("abc", ".jpeg"),
        ("g" * 64, ".jpeg"),
        ("a" * 64, "jpeg"),
        ("a" * 64, "./../x"),
        ("a" * 64, ".JPEG"),
    ],
)
def test_bad_digests_and_extensions_are_refused(tmp_path: Path, digest: str, ext: str) -> None:
    with pytest.raises(ValueError):
        MediaStore(Lake(str(tmp_path))).path_for(digest, ext)


def test_store_works_on_a_remote_filesystem() -> None:
    root = f"memory://media-test-{uuid.uuid4().hex}"
    store = MediaStore(Lake(root))
    stored = store.put_bytes(b"remote bytes", ".webp")
    assert stored.path.startswith(root) and store.exists(stored.path)
    assert store.read_bytes(stored.path) == b"remote bytes"
    assert not store.put_bytes(b"remote bytes", ".webp").created
    fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_check_tells_intact_missing_and_corrupt_objects_apart(tmp_path: Path) -> None:
    store = MediaStore(Lake(str(tmp_path)))
    stored = store.put_bytes(b"some image bytes", ".jpeg")
    assert store.check(stored.path, stored.sha256) == "intact"
    assert store.check(stored.path, stored.sha256.upper()) == "intact"
    assert store.digest(stored.path) == stored.sha256
    Path(stored.path).write_bytes(b"some image bytez")  # same size, one byte flipped
    assert store.check(stored.path, stored.sha256) == "corrupt"
    Path(stored.path).unlink()
    assert store.check(stored.path, stored.sha256) == "missing"


def test_a_corrupted_object_is_replaced_by_the_next_put(tmp_path: Path) -> None:
    store = MediaStore(Lake(str(tmp_path / "lake")))
    data = b"weights" * 500
    stored = store.put_bytes(data, ".safetensors")
    Path(stored.path).write_bytes(b"garbage")
    again = store.put_bytes(data, ".safetensors")
    assert again.created and Path(stored.path).read_bytes() == data
    Path(stored.path).write_bytes(b"garbage")
    spool = tmp_path / "spool"
    spool.write_bytes(data)
    via_file = store.put_file(spool, stored.sha256, ".safetensors")
    assert via_file.created and Path(stored.path).read_bytes() == data
    assert spool.read_bytes() == data  # the caller's file is left alone


def test_writes_go_through_the_atomic_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MediaStore(Lake(str(tmp_path / "lake")))
    synced: list[str] = []
    real_fsync_dir = files.fsync_dir

    def spy(folder: str) -> None:
        synced.append(folder)
        real_fsync_dir(folder)

    monkeypatch.setattr(files, "fsync_dir", spy)
    stored = store.put_bytes(b"durable", ".png")
    spool = tmp_path / "spool"
    spool.write_bytes(b"durable too")
    copied = store.put_file(spool, hashlib.sha256(b"durable too").hexdigest(), ".png")
    assert synced == [os.path.dirname(stored.path), os.path.dirname(copied.path)]


def test_a_failed_write_leaves_neither_an_object_nor_a_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MediaStore(Lake(str(tmp_path / "lake")))
    spool = tmp_path / "spool"
    spool.write_bytes(b"x" * 10_000)
    digest = hashlib.sha256(spool.read_bytes()).hexdigest()

    def torn_copy(src: object, dst: str) -> None:
        Path(dst).write_bytes(b"x" * 10)  # a partial copy, then the disk fails
        raise OSError("disk full")

    monkeypatch.setattr("warehouse.media.shutil.copyfile", torn_copy)
    with pytest.raises(OSError, match="disk full"):
        store.put_file(spool, digest, ".safetensors")
    assert not store.exists(store.path_for(digest, ".safetensors"))
    assert [p for p in (tmp_path / "lake").rglob("*") if p.is_file()] == []
