"""The on-disk cache of instances (diskcache), size-limited, least recently used out.

The cache knows nothing of HTTP: it is given a `fetch(dest_file)` callable that
writes a verified instance into an open temporary file. A download goes to a
private temporary file, and only a complete, verified one is stored; a partly
downloaded instance is never visible, served or kept (a crash leaves at most a
temporary file, which the next start removes). Concurrent opens of one instance
cause one download (single flight, striped locks).

Every value is stored as its own file (`disk_min_file_size=0`), so an open
handle is a real file: reads are `os.pread` on its descriptor, and eviction
(which unlinks the file) never disturbs a file that is being read.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

import diskcache

log = logging.getLogger(__name__)

_STRIPES = 64
SQLITE_OVERHEAD_BYTES = 1 << 20


class InstanceCache:
    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._tmp = self.directory / "partial"
        shutil.rmtree(self._tmp, ignore_errors=True)  # leftovers of a crash: never served
        self._tmp.mkdir(parents=True, mode=0o700)
        self._cache = diskcache.Cache(str(self.directory / "blobs"), size_limit=max_bytes,
                                      eviction_policy="least-recently-used",
                                      disk_min_file_size=0, cull_limit=64)
        self._locks = [threading.Lock() for _ in range(_STRIPES)]
        self.downloads = 0
        self.hits = 0

    def close(self) -> None:
        self._cache.close()

    def open(self, key: str, fetch: Callable[[BinaryIO], int]) -> tuple[BinaryIO, bool]:
        """An open read handle on the instance `key`, fetched first if needed.

        Returns (handle, downloaded_now). Raises what `fetch` raises; nothing is kept then.
        """
        handle = self._get(key)
        if handle is not None:
            self.hits += 1
            return handle, False
        with self._locks[hash(key) % _STRIPES]:
            handle = self._get(key)
            if handle is not None:
                self.hits += 1
                return handle, False
            with tempfile.TemporaryFile(dir=self._tmp) as tmp:
                fetch(tmp)
                tmp.seek(0)
                self._cache.set(key, tmp, read=True)
            self.downloads += 1
        handle = self._get(key)
        if handle is None:  # evicted at once: the limit is smaller than one instance
            raise OSError(28, "instance larger than the whole cache")
        return handle, True

    def contains(self, key: str) -> bool:
        return key in self._cache

    def _get(self, key: str) -> BinaryIO | None:
        try:
            return self._cache.get(key, read=True)
        except OSError:  # the file vanished under the index (evicted meanwhile)
            return None

    def volume(self) -> int:
        return self._cache.volume()

    def clear(self) -> None:
        self._cache.clear()


def pread(handle: BinaryIO, size: int, offset: int) -> bytes:
    return os.pread(handle.fileno(), size, offset)
