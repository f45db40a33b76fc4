"""Media files: the content-addressed store on the lake, the media tables and their selection.

Store layout (on the `Lake`'s filesystem, local or S3)::

    <lake root>/media/sha256/<ab>/<cd>/<sha256><ext>      ab, cd = first two byte pairs

Objects are written atomically through `warehouse.files` (local: temp file + fsync + rename;
object stores: one PUT) and never rewritten while intact: putting the same bytes again is a
no-op. An object whose bytes no longer hash to its name (a corrupted object) is not trusted:
`MediaStore.check` reports it and the next put of that content replaces it.

The ``image_files`` / ``lora_files`` tables (one row per item, ``status`` ok / refused /
failed with a ``reason``) are written by the downloaders in `pipelines.civitai.downloads`;
`images_to_download` and `loras_to_download` select what they fetch. No Dagster imports.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from warehouse.files import atomic_local_path, atomic_write_bytes
from warehouse.lake import Lake

MEDIA_PREFIX = "media/sha256"
STATUS_OK = "ok"
STATUS_REFUSED = "refused"  # unsafe content or target (pickle, zip, a redirect off http)
STATUS_FAILED = "failed"

IMAGE_FILES_SCHEMA = pa.schema(
    [
        pa.field("imageId", pa.int64()),
        pa.field("url", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("path", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
    ]
)
LORA_FILES_SCHEMA = pa.schema(
    [
        pa.field("modelVersionId", pa.int64()),
        pa.field("fileId", pa.int64()),
        pa.field("file_name", pa.string()),
        pa.field("sha256", pa.string()),
        # True: the content matched the release's hashSHA256; False: the release row had no
        # hash, so the file was accepted on its safetensors checks alone (sha256 computed).
        pa.field("sha256_verified", pa.bool_()),
        pa.field("path", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("n_tensors", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
    ]
)

_EXT = re.compile(r"^\.[a-z0-9]{1,12}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_READ = 1 << 20

ObjectState = Literal["intact", "missing", "corrupt"]


@dataclass(frozen=True)
class StoredObject:
    """One object of the store."""

    sha256: str  # lowercase hex
    path: str  # full path (or URL) on the lake's filesystem
    bytes: int
    created: bool  # False when the same content was already stored (and intact)


class MediaStore:
    """Content-addressed files under ``<lake root>/media/sha256`` on the lake's filesystem."""

    def __init__(self, lake: Lake, prefix: str = MEDIA_PREFIX) -> None:
        self.lake = lake
        self.fs = lake.fs
        self.root = posixpath.join(lake.root, prefix.strip("/"))

    def __repr__(self) -> str:
        return f"MediaStore({self.root!r})"

    def path_for(self, sha256: str, ext: str) -> str:
        """Where the object with this digest and extension lives."""
        digest = sha256.lower()
        if not _SHA.match(digest):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        if not _EXT.match(ext):
            raise ValueError(f"bad extension {ext!r} (expected like '.jpeg')")
        return posixpath.join(self.root, digest[:2], digest[2:4], digest + ext)

    def exists(self, path: str) -> bool:
        """True when ``path`` (as returned by `path_for` / `put_*`) is stored."""
        try:
            return bool(self.fs.exists(path))
        except OSError:
            return False

    def read_bytes(self, path: str) -> bytes:
        """The bytes of a stored object."""
        with self.fs.open(path, "rb") as f:
            return f.read()

    def digest(self, path: str) -> str:
        """SHA-256 (hex) of a stored object's bytes, read in 1 MiB blocks."""
        h = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            while block := f.read(_READ):
                h.update(block)
        return h.hexdigest()

    def check(self, path: str, sha256: str) -> ObjectState:
        """Whether the object at ``path`` is there and its bytes still hash to ``sha256``."""
        if not self.exists(path):
            return "missing"
        try:
            return "intact" if self.digest(path) == sha256.lower() else "corrupt"
        except FileNotFoundError:
            return "missing"

    def put_bytes(self, data: bytes, ext: str) -> StoredObject:
        """Store ``data`` (idempotent; a corrupted copy is replaced); return where it is."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path_for(digest, ext)
        if self.check(path, digest) == "intact":
            return StoredObject(digest, path, len(data), created=False)
        atomic_write_bytes(path, data, self.fs)
        return StoredObject(digest, path, len(data), created=True)

    def put_file(self, local_path: str | os.PathLike[str], sha256: str, ext: str) -> StoredObject:
        """Store a local file whose digest the caller computed (idempotent; a corrupted copy is
        replaced). The local file is copied; the caller may delete it afterwards."""
        path = self.path_for(sha256, ext)
        size = os.path.getsize(local_path)
        if self.check(path, sha256) == "intact":
            return StoredObject(sha256.lower(), path, size, created=False)
        if self.lake.remote:
            self.fs.put_file(os.fspath(local_path), path)  # one PUT: atomic on object stores
        else:
            with atomic_local_path(path) as temp:
                shutil.copyfile(local_path, temp)
        return StoredObject(sha256.lower(), path, size, created=True)


def images_to_download(con: Any, lake: Lake, max_images: int) -> pa.Table:
    """(imageId, url) of the clean ``images`` to fetch: whole users in userHash order while
    the running count of their images stays within ``max_images`` (a stable, resumable
    subset)."""
    src = lake.scan("images")
    return con.sql(
        f"""WITH per_user AS (SELECT userHash, count(DISTINCT imageId) AS n FROM {src} GROUP BY 1),
        chosen AS (SELECT userHash FROM (
            SELECT userHash, sum(n) OVER (ORDER BY userHash) AS running FROM per_user)
            WHERE running <= {int(max_images)})
        SELECT imageId, any_value(url) AS url FROM {src} SEMI JOIN chosen USING (userHash)
        GROUP BY imageId ORDER BY imageId"""
    ).to_arrow_table()


def loras_to_download(con: Any, lake: Lake) -> pa.Table:
    """The primary file of every LoRA version in ``loras``, with what the LoRA downloader
    needs."""
    return con.sql(
        "SELECT modelVersionId, fileId, fileName, format, hashSHA256, downloadUrl "
        f"FROM {lake.scan('loras')} WHERE has_primary_file ORDER BY modelVersionId"
    ).to_arrow_table()
