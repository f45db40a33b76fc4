"""The content-addressed media store: layout, idempotence, atomic writes, remote filesystems."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import fsspec
import pytest

from warehouse.lake import Lake
from warehouse.media import MediaStore, content_disposition_filename, safe_file_name, strip_token


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


def test_tokens_are_stripped_from_urls() -> None:
    assert (
        strip_token("https://x/api/download/models/1?token=SECRET")
        == "https://x/api/download/models/1"
    )
    assert strip_token("https://x/y?type=Model&token=SECRET&format=SafeTensor") == (
        "https://x/y?type=Model&format=SafeTensor"
    )
    assert strip_token(None) is None
