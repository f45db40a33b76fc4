"""Atomic file writes: the one helper every stage uses for small files it commits.

Folders (a model's files): :func:`replace_dir` swaps a finished sibling folder in.

Local paths: the bytes go to a temporary file in the target's folder, are flushed and
``fsync``-ed, renamed over the target with ``os.replace`` and the folder is ``fsync``-ed, so a
crash leaves either the old file or the new one, never a torn one. Object stores (``s3://``,
``memory://``): one PUT, which is atomic there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
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


def replace_dir(
    tmp: str | os.PathLike,
    folder: str | os.PathLike,
    keep_existing: Callable[[], bool] | None = None,
) -> None:
    """Rename the finished folder ``tmp`` (a sibling of ``folder``, already fsynced) onto
    ``folder``. An existing ``folder`` is first renamed aside and removed after the swap, so
    readers see the old folder or the new one, never a mix (for the instant between the two
    renames, no folder). When ``keep_existing()`` says an existing ``folder`` already holds the
    same result (another builder got there first), it is kept and ``tmp`` is left to the
    caller to remove."""
    tmp, folder = Path(tmp), Path(folder)
    if folder.exists():
        if keep_existing is not None and keep_existing():
            return
        aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
        os.rmdir(aside)
        os.rename(folder, aside)
        try:
            os.rename(tmp, folder)
        except OSError:
            os.rename(aside, folder)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        try:
            os.rename(tmp, folder)
        except OSError:  # created meanwhile by a concurrent builder
            if not (keep_existing is not None and keep_existing()):
                raise
    fsync_dir(str(folder.parent))
