"""Model files written under a temporary name, and what an interrupted write leaves behind.

A file being copied (`thoxd models add`) or assembled (a packaged model) is written as
NAME.thoxd.partial, a name only thoxd uses, and renamed to NAME once complete. The writer holds
an exclusive flock on it, so another process can tell a file being written from one whose writer
died (SIGKILL, power loss) and left it behind: up to a whole model's size. Those stale ones are
removed at daemon start and at the next `models add` (`remove_stale`); nothing else ever is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from thoxd.units import format_bytes

logger = logging.getLogger("thoxd.models")

SUFFIX = ".thoxd.partial"
_TRIES = 3


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + SUFFIX)


class PartialFile:
    """`with PartialFile(path) as p: p.file.write(...); p.commit()` writes `path` whole or not
    at all: until commit() renames it into place the bytes live in the partial file, which is
    removed if the block is left any other way (an exception, Ctrl-C)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = partial_path(path)
        self._file: BinaryIO | None = None
        self._committed = False

    @property
    def file(self) -> BinaryIO:
        assert self._file is not None, "use PartialFile in a with block"
        return self._file

    def __enter__(self) -> PartialFile:
        self._file = os.fdopen(_create_locked(self.partial), "wb")
        return self

    def commit(self) -> None:
        """Flush to disk and rename into place (still locked, so never taken for stale)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        os.replace(self.partial, self.path)
        self._committed = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._committed:  # unlinked before the lock goes, so no one else's file
                with contextlib.suppress(FileNotFoundError):
                    self.partial.unlink()
        finally:
            self.file.close()  # releases the lock


def _create_locked(partial: Path) -> int:
    """A new, empty, locked file at `partial`; a stale one there is removed first."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(_TRIES):
        try:
            fd = os.open(partial, flags, 0o644)
        except FileExistsError:
            if _remove_if_stale(partial) is None:
                raise FileExistsError(errno.EEXIST, "another process is writing it") from None
            continue
        # Blocks only while a cleaner that opened it an instant ago finishes with it.
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:  # still linked: no cleaner removed it meanwhile
            return fd
        os.close(fd)
    raise FileExistsError(errno.EEXIST, "another process keeps writing it")


def _remove_if_stale(path: Path) -> int | None:
    """Remove `path` if it is a regular file no one holds locked; its size, or None if kept."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # gone, a symlink, unreadable: not ours to judge
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer is alive
            return None
        if os.lstat(path).st_ino != st.st_ino:  # replaced since we opened it
            return None
        os.unlink(path)
        return st.st_size
    except OSError:
        return None
    finally:
        os.close(fd)


def remove_stale(directories: Iterable[Path], keep: Iterable[Path] = ()) -> list[tuple[Path, int]]:
    """Remove the partial files in `directories` (not below them) whose writer is gone, but
    never one of the files in `keep` (a catalog entry may, oddly, be named like one). Returns
    (path, size) of each removed file; each is logged."""
    kept = set()
    for path in keep:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            kept.add((st.st_dev, st.st_ino))
    removed: list[tuple[Path, int]] = []
    for directory in dict.fromkeys(directories):
        try:
            entries = list(os.scandir(directory))
        except OSError:  # missing or unreadable: nothing of ours to clean there
            continue
        for entry in entries:
            if len(entry.name) <= len(SUFFIX) or not entry.name.endswith(SUFFIX):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in kept:
                continue
            path = Path(entry.path)
            size = _remove_if_stale(path)
            if size is not None:
                logger.info(
                    "removed %s (%s), left by an interrupted copy", entry.name, format_bytes(size)
                )
                removed.append((path, size))
    return removed
