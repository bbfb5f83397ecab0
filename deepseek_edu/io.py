"""The one atomic file write of the package (checkpoints, metrics, the corpus and token caches).

`atomic_write` writes to a temporary file in the same folder, fsyncs it, renames it over the
target (`os.replace` is atomic on POSIX and Windows) and fsyncs the folder, so a crash at any point
leaves the target absent, the previous file, or the complete new file -- never a partial one (a
crashed process may leave a ``.<name>.*.tmp`` file beside it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_chunks(f, data: bytes | memoryview) -> None:
    """Write `data` to the open file `f` in 16 MiB pieces (tests replace this to simulate a crash)."""
    view = memoryview(data)
    for i in range(0, len(view), 1 << 24):
        f.write(view[i:i + (1 << 24)])


def _temporary_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(path: str | Path, data: bytes | None = None, *, writer: Callable[[Path], None] | None = None) -> Path:
    """Replace `path` by `data` (or by what `writer(tmp_path)` writes), atomically and durably.

    Args:
        path: the file to (over)write; its folder is created when missing.
        data: the bytes to write; or None with `writer`, a function that writes the file it is given
            (for libraries that only write to a path, e.g. `tokenizers.Tokenizer.save`).
    Returns:
        `path` as a Path.
    Raises:
        ValueError: neither or both of data and writer given.
    """
    if (data is None) == (writer is None):
        raise ValueError("pass exactly one of data and writer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        if writer is not None:
            writer(tmp)
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
            with os.fdopen(fd, "wb") as f:
                write_chunks(f, data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path
