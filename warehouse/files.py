"""Atomic file writes: the one helper every stage uses for small files it commits.

Local paths: the bytes go to a temporary file in the target's folder, are flushed and
``fsync``-ed, renamed over the target with ``os.replace`` and the folder is ``fsync``-ed, so a
crash leaves either the old file or the new one, never a torn one. Object stores (``s3://``,
``memory://``): one PUT, which is atomic there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any


def fsync_dir(folder: str) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flush one local file's data to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(folder: str) -> None:
    """Flush every file under a local folder, then the folders themselves."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


@contextmanager
def atomic_local_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto
    ``path`` atomically, on failure it is removed. For writers that want a file name
    (DuckDB, ``pq.write_table``, a downloader spooling to disk)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        if os.path.exists(tmp):
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: str, data: bytes, fs: Any | None = None) -> None:
    """Write ``data`` to ``path`` atomically: locally temp + fsync + rename, remotely one PUT.

    ``fs`` is an fsspec filesystem for remote paths; ``None`` (or a local filesystem) means
    the local disk.
    """
    if fs is not None and not _is_local(fs):
        fs.pipe_file(path, data)
        return
    with atomic_local_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
