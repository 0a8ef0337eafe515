#!/usr/bin/env python3
"""The least a Python FUSE filesystem can do per file: a read-only passthrough of DIR on the
same binding and kernel caching as nbiafs (mfusepy on libfuse3, attributes and names cached
for an hour, `keep_cache`, each libfuse thread keeping its Python thread state as nbiafs's do),
whose open is one os.open and whose release one os.close.
`scripts/bench.py` reads through it to show the floor that any Python mount meets on the
machine. Usage: passthrough_fs.py DIR MOUNTPOINT (foreground; fusermount -u to end)."""

from __future__ import annotations

import ctypes
import os
import sys
import threading

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
from mfusepy import FUSE, Operations  # noqa: E402

KEYS = ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid", "st_ino")


_state = threading.local()


def _keep_thread_state() -> None:
    """As nbiafs.fuse_ops does: ctypes would make and delete a thread state per callback."""
    if not getattr(_state, "kept", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _state.kept = True


class Passthrough(Operations):
    use_ns = True

    def __init__(self, root: str):
        self.root = root

    def getattr(self, path, fh=None):
        _keep_thread_state()
        st = os.lstat(self.root + path)
        return {**{k: getattr(st, k) for k in KEYS}, "st_mtime": st.st_mtime_ns}

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self.root + path)]

    def open(self, path, fi):
        _keep_thread_state()
        fi.fh = os.open(self.root + path, os.O_RDONLY)
        fi.keep_cache = 1
        return 0

    def read(self, path, size, offset, fi):
        _keep_thread_state()
        return os.pread(fi.fh, size, offset)

    def release(self, path, fi):
        _keep_thread_state()
        os.close(fi.fh)
        return 0

    flush = opendir = releasedir = None


if __name__ == "__main__":
    FUSE(Passthrough(sys.argv[1]), sys.argv[2], foreground=True, ro=True, raw_fi=True,
         attr_timeout=3600, entry_timeout=3600, max_threads=16, max_idle_threads=16)
