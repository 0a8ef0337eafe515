"""A diskcache.Cache whose calls all run on one thread of its own.

diskcache opens one SQLite connection per calling thread (three descriptors in WAL mode: the
database, its -wal and -shm files) and frees it only when that thread's objects are garbage
collected. libfuse starts and ends worker threads with the load, so a mount would hold
connections of threads long gone: open files grew and shrank with the garbage collector
(255 -> 313 over a minute's soak). Run on one thread, each cache holds one connection, whatever
the threads calling it. Cached opens never come here (the instance cache's path map), so the
cost is one hand-over per miss.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import diskcache


class OneThreadCache:
    """The methods of a diskcache.Cache, run on one dedicated thread (re-created after a fork)."""

    def __init__(self, cache: diskcache.Cache, name: str):
        self._cache = cache
        self._name = name
        self._lock = threading.Lock()  # guards _pool and _pid
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._thread_ident: int | None = None

    def _thread(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():  # a fork loses the thread
                self._pool = concurrent.futures.ThreadPoolExecutor(1, self._name)
                self._pid = os.getpid()
                self._pool.submit(self._note_thread).result()
            return self._pool

    def _run(self, fn, *args, **kwargs):
        if threading.get_ident() == self._thread_ident:
            return fn(*args, **kwargs)  # already on the cache's thread
        return self._thread().submit(fn, *args, **kwargs).result()

    def _note_thread(self) -> None:
        self._thread_ident = threading.get_ident()

    def __getattr__(self, name):
        attr = getattr(self._cache, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._run(attr, *args, **kwargs)

    def submit(self, fn, *args) -> concurrent.futures.Future:
        """`fn(*args)` on the cache's thread, not waited for."""
        return self._thread().submit(fn, *args)

    def run(self, fn):
        """`fn(cache)` on the cache's thread: many lookups for one hand-over."""
        return self._run(fn, self._cache)

    def __contains__(self, key) -> bool:
        return self._run(self._cache.__contains__, key)

    def __len__(self) -> int:
        return self._run(self._cache.__len__)

    def close(self) -> None:
        """Close the connection (on its thread) and end the thread."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.submit(self._cache.close).result()
            pool.shutdown(wait=True)
        self._cache.close()  # a connection this thread may have (construction)
