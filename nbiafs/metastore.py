"""Listings and facts from the archive, cached in memory and persisted on disk.

Each entry is a JSON-able value with the wall-clock time it was fetched. A
lookup serves, in order: a fresh in-memory copy; a fresh persisted copy (so a
remount lists what was listed before with no request); a new fetch; and, when
the fetch fails with an archive error, the stale copy if there is one (so a
mount keeps working, read-only, for what it has seen while the archive is
unreachable). Concurrent lookups of one key cause one fetch (single flight).

Facts that never change (the exact size of a fetched instance) use
`put`/`get` and never expire. Writes reach the disk behind the caller.

Locking: `_lock` guards `_memory` (cachetools caches are not thread-safe) and the flights; a
flight lock per key being fetched (re-entrant) serialises fetches of that key and of no other,
so a listing never waits behind the fetch of another. The diskcache
store runs on a thread of its own (nbiafs.sqlthread): one SQLite connection, whatever the
calling threads.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any, Callable

import cachetools
import diskcache

from nbiafs.errors import ArchiveUnavailable, IntegrityError
from nbiafs.sqlthread import OneThreadCache

log = logging.getLogger(__name__)

def _records(entry) -> int:
    value = entry[1]
    return 1 + (len(value) if isinstance(value, (list, dict)) else 0)


class MetadataStore:
    def __init__(self, directory, ttl_s: float, memory_records: int = 200_000, clock=time.time):
        self.ttl_s = ttl_s
        self._clock = clock
        self._disk = OneThreadCache(diskcache.Cache(str(directory), size_limit=2 ** 40, eviction_policy="none"),
                                    "nbia-meta-sql")
        # Bounded by records, not entries: one collection-wide listing of 10,000 series must
        # not be pushed out (and unpickled again and again) by 10,000 one-line listings.
        self._memory: cachetools.LRUCache = cachetools.LRUCache(maxsize=memory_records,
                                                                getsizeof=_records)
        self._lock = threading.Lock()
        self._flights: dict[str, list] = {}  # key -> [lock, holders and waiters]

    def close(self) -> None:
        self._disk.close()

    # ------------------------------------------------------------------ listings
    def listing(self, key: str, fetch: Callable[[], Any], max_age_s: float | None = None) -> Any:
        """The value of `key`, fetched by `fetch()` when there is no copy younger than max_age_s."""
        max_age_s = self.ttl_s if max_age_s is None else max_age_s
        entry = self._fresh(key, max_age_s)
        if entry is not None:
            return entry[1]
        flight = self._join_flight(key)
        try:
            with flight[0]:
                entry = self._fresh(key, max_age_s)  # fetched by another thread meanwhile
                if entry is not None:
                    return entry[1]
                try:
                    value = fetch()
                except (ArchiveUnavailable, IntegrityError) as exc:
                    stale = self._entry(key)
                    if stale is None:
                        raise
                    log.warning("archive unreachable (%s); serving the listing cached %.0f s ago",
                                exc, self._clock() - stale[0])
                    return stale[1]
                self._store(key, (self._clock(), value))
                return value
        finally:
            self._leave_flight(key, flight)

    def age_s(self, key: str) -> float | None:
        entry = self._entry(key)
        return None if entry is None else self._clock() - entry[0]

    def _fresh(self, key: str, max_age_s: float):
        entry = self._entry(key)
        if entry is not None and self._clock() - entry[0] < max_age_s:
            return entry
        return None

    def _entry(self, key: str):
        with self._lock:
            entry = self._memory.get(key)
        if entry is None:
            entry = self._disk.get(key)
            if entry is not None:
                with self._lock:
                    self._memory[key] = entry
        return entry

    def _store(self, key: str, entry) -> None:
        """In memory at once; on disk behind the caller (the store's one thread runs its calls in
        order, so a later read of the key, or `close`, comes after the write)."""
        with self._lock:
            self._memory[key] = entry
        self._disk.submit(self._disk_set, key, entry)

    def _disk_set(self, key: str, entry) -> None:
        try:
            self._disk.set(key, entry)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:  # kept in memory; asked again after a remount
            log.warning("metadata cache: could not write %s: %s", key.split("\0", 1)[0], exc)

    def _join_flight(self, key: str) -> list:
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = [threading.RLock(), 0]
            flight[1] += 1
            return flight

    def _leave_flight(self, key: str, flight: list) -> None:
        with self._lock:
            flight[1] -= 1
            if flight[1] == 0:
                del self._flights[key]

    # ------------------------------------------------------------------ facts
    def get(self, key: str, default=None):
        entry = self._entry(key)
        return default if entry is None else entry[1]

    def put(self, key: str, value) -> None:
        self._store(key, (self._clock(), value))
