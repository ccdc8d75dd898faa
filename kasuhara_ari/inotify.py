"""Linux inotify for one directory, without a dependency: which files were closed after writing.

Used to learn that MixMonitor has closed a recording (``IN_CLOSE_WRITE``) without making Asterisk fork a
shell for a completion command on every call (see ``recording.py``). Linux only; the caller falls back to
MixMonitor's ``Command`` where inotify is not available.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


class InotifyUnavailable(OSError):
    """This system (or this directory's filesystem) offers no inotify."""


def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c") or None
    return ctypes.CDLL(name, use_errno=True)


class DirectoryWatch:
    """An inotify descriptor watching one directory. Non-blocking: ``read`` returns what is queued."""

    def __init__(self, directory: Path, mask: int = IN_CLOSE_WRITE | IN_MOVED_TO) -> None:
        try:
            libc = _libc()
            init1 = libc.inotify_init1
            add_watch = libc.inotify_add_watch
        except (OSError, AttributeError) as exc:
            raise InotifyUnavailable(f"inotify is not available here: {exc}") from exc
        fd = init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise InotifyUnavailable(err, f"inotify_init1: {os.strerror(err)}")
        wd = add_watch(fd, os.fsencode(directory), mask | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise InotifyUnavailable(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        self.directory = directory
        self._fd: int | None = fd

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("watch is closed")
        return self._fd

    def read(self) -> list[tuple[int, str]]:
        """The queued events as (mask, file name); an overflow comes as (IN_Q_OVERFLOW, "")."""
        out: list[tuple[int, str]] = []
        while True:
            try:
                data = os.read(self.fileno(), 64 * 1024)
            except BlockingIOError:
                return out
            if not data:
                return out
            pos = 0
            while pos + _HEADER.size <= len(data):
                _wd, mask, _cookie, length = _HEADER.unpack_from(data, pos)
                pos += _HEADER.size
                name = data[pos : pos + length].split(b"\0", 1)[0]
                pos += length
                out.append((mask, os.fsdecode(name)))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
