"""The on-disk cache of instances (diskcache), size-limited, least recently used out.

The cache knows nothing of HTTP: it is given a `fetch(dest_file)` callable that
writes a verified instance into an open temporary file. A download goes to a
private temporary file, and only a complete, verified one is stored; a partly
downloaded instance is never visible, served or kept (a crash leaves at most a
temporary file, which the next start removes). Concurrent opens of one instance
cause one download (single flight); a bulk transfer can claim instances it is
about to deliver, and opens of those wait for it rather than fetch them again.

Every value is stored as its own file (`disk_min_file_size=0`), so an open
handle is a real file: reads are answered from its descriptor, and eviction
(which unlinks the file) never disturbs a file that is being read.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

import cachetools
import diskcache

from nbiafs.sqlthread import OneThreadCache

log = logging.getLogger(__name__)

TOUCH_INTERVAL_S = 2.0  # how often reads are told to diskcache's LRU order
TOUCH_BATCH = 32        # reads told per hand-over to the index's thread
MIN_FREE_FRACTION = 0.05  # keep 5 % of the disk free (the anchors keep 5-10 %)
ADOPT_ATTEMPTS = 10  # renames into a cache directory that a concurrent eviction removed


class _Adopt:
    """A complete, verified file to be moved into the cache rather than copied."""

    def __init__(self, path: str):
        self.path = path


class _AdoptingDisk(diskcache.Disk):
    """diskcache's Disk, which can also take a file by renaming it into place (no copy), and
    keeps its files in 256 folders (diskcache's own layout has 65,536, so nearly every file it
    stores makes a folder, and every eviction deletes one: on ext4, whose inode allocator slows
    down as deleted inodes pile up, those folders cost more than the files)."""

    def filename(self, key=diskcache.core.UNKNOWN, value=diskcache.core.UNKNOWN):
        name = os.urandom(16).hex()
        filename = os.path.join(name[:2], name[2:] + ".val")
        return filename, os.path.join(self._directory, filename)

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if isinstance(value, _Adopt):
            filename, full_path = self.filename(key, value)
            # Evicting a file removes its directories once they are empty (Disk.remove), so a
            # directory made here can vanish before the rename: make it again, as diskcache's
            # own writer does.
            for attempt in range(1, ADOPT_ATTEMPTS + 1):
                os.makedirs(os.path.dirname(full_path), exist_ok=True)
                try:
                    os.rename(value.path, full_path)
                    break
                except FileNotFoundError:
                    if attempt == ADOPT_ATTEMPTS or not os.path.exists(value.path):
                        raise
            return os.path.getsize(full_path), diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key)


class _Flight:
    """One download of one instance under way; others wait for it instead of fetching again."""

    def __init__(self, bulk: bool = False):
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.bulk = bulk  # claimed by a bulk transfer (a zip, IDC, the shared cache), not an open


class InstanceCache:
    """Locking: `_lock` guards `_flights` (key -> the one download under way)."""

    def __init__(self, directory: Path, max_bytes: int, min_free_bytes: int | None = None,
                 disk_usage=shutil.disk_usage):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._disk_usage = disk_usage
        self._tmp = self.directory / "partial"
        shutil.rmtree(self._tmp, ignore_errors=True)  # leftovers of a crash: never served
        self._tmp.mkdir(parents=True, mode=0o700)
        self._cache = OneThreadCache(diskcache.Cache(str(self.directory / "blobs"), size_limit=max_bytes,
                                                     eviction_policy="least-recently-used",
                                                     disk_min_file_size=0, cull_limit=16, disk=_AdoptingDisk),
                                     "nbia-blob-sql")
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        # The hot path: where each recently opened instance's file is, so a cached open is
        # one open(2) and no SQL. Reads are noted in `_touched` and told to diskcache (which
        # keeps the least-recently-used order) by a background thread, off the hot path.
        self._paths: cachetools.LRUCache = cachetools.LRUCache(maxsize=65536)
        self._touched: set[str] = set()
        self._stop = threading.Event()
        self._toucher: threading.Thread | None = None
        self.downloads = 0
        self.hits = 0
        self.overtaken = 0  # instances an open fetched itself rather than wait on for a bulk transfer
        if min_free_bytes is None:
            min_free_bytes = int(disk_usage(self.directory).total * MIN_FREE_FRACTION)
        self.min_free_bytes = min_free_bytes
        self._limit = max_bytes  # the limit in force: lower than max_bytes when the disk is full

    def start(self) -> None:
        self._toucher = threading.Thread(target=self._touch_loop, name="nbia-cache-lru", daemon=True)
        self._toucher.start()

    def close(self) -> None:
        self._stop.set()
        if self._toucher is not None:
            self._toucher.join(timeout=5)
        self._flush_touches()
        self._cache.close()

    def _touch_loop(self) -> None:
        while not self._stop.wait(TOUCH_INTERVAL_S):
            self._flush_touches()

    def _flush_touches(self) -> None:
        with self._lock:
            touched, self._touched = list(self._touched), set()

        def touch(keys, cache) -> None:
            for key in keys:
                try:
                    handle = cache.get(key, read=True)  # diskcache notes the access
                except OSError:
                    continue
                if handle is not None:
                    handle.close()

        # A few at a time: an open that needs the index meanwhile waits for one batch at most,
        # not for every read of the last seconds (thousands after a fast re-read).
        for start in range(0, len(touched), TOUCH_BATCH):
            self._cache.run(functools.partial(touch, touched[start:start + TOUCH_BATCH]))

    def open(self, key: str, fetch: Callable[[BinaryIO], int], counted: bool = True,
             overtake_after_s: float | None = None) -> tuple[BinaryIO, bool]:
        """An open read handle on the instance `key`, fetched first if needed (`counted`: in
        the hits and downloads of instances; a preview is not an instance).

        If a download of `key` is under way (by another open, or a bulk transfer that
        claimed it), wait for it; if that one ends without the instance, fetch it here. With
        `overtake_after_s`, a wait on a bulk transfer that lasts that long ends in a fetch of
        `key` here, served at once and stored (the transfer goes on, and stores its own copy).
        Returns (handle, downloaded_here). Raises what `fetch` raises; nothing is kept then.
        """
        while True:
            handle = self._get(key)
            if handle is not None:
                self.hits += counted
                return handle, False
            with self._lock:
                found = self._flights.get(key)
                leader = found is None
                flight = self._flights[key] = _Flight() if found is None else found
            if not leader:
                if overtake_after_s is not None and flight.bulk and not flight.done.wait(overtake_after_s):
                    handle = self._overtake(key, fetch, counted)
                    if handle is not None:
                        return handle, True
                flight.done.wait()
                if flight.error is not None:
                    raise flight.error
                continue  # stored by the other download, or it gave up: look again
            try:
                # Stored between the look above and the flight? Every store of this process
                # records its path (`_paths`) before it lands: no second ask of the index.
                handle = self.open_known(key, counted=counted)
                if handle is not None:
                    self._land(key, flight)
                    return handle, False
                tmp, handle = self._download(key, fetch)
            except BaseException as exc:
                flight.error = exc
                self._land(key, flight)
                raise
            self.downloads += counted
            # Stored by the index's thread while the reader goes on (the file is complete and
            # verified, and `handle` serves it whatever happens to the cache); other opens of
            # the key wait for the flight, which lands once it is stored.
            self._store_later(key, tmp, flight)
            return handle, True

    def _download(self, key: str, fetch: Callable[[BinaryIO], int]):
        """`key` fetched into a temporary file beside the cache: (that file, a read handle on
        it, opened before the cache adopts it: served even if evicted at once). Raises what
        `fetch` raises; nothing is left behind then."""
        tmp = tempfile.NamedTemporaryFile(dir=self._tmp, suffix=".part", delete=False)
        try:
            fetch(tmp)  # type: ignore[arg-type]  # a file object, as BinaryIO says
            tmp.flush()
            return tmp, self._reopen(key, tmp)
        except BaseException:
            tmp.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp.name)
            raise

    def _overtake(self, key: str, fetch: Callable[[BinaryIO], int], counted: bool) -> BinaryIO | None:
        """`key`, still claimed by a bulk transfer, fetched here: a handle on this download
        (stored, unless the transfer stored `key` meanwhile), or None if it failed (the caller
        waits for the transfer then)."""
        try:
            tmp, handle = self._download(key, fetch)
        except Exception as exc:
            log.debug("%s: its own fetch failed (%s); waiting for its series' transfer", key, exc)
            return None
        self.downloads += counted
        self.overtaken += 1
        with self._lock:
            delivered = key in self._paths
        if delivered:
            tmp.close()
            os.unlink(tmp.name)
        else:
            self._store_later(key, tmp, None)
        return handle

    @staticmethod
    def _reopen(key: str, tmp) -> BinaryIO:
        """A read handle on a complete download. If its temporary file is gone by name (never
        seen in this process's own code paths; logged so it can be found), the bytes are still
        those written: served from the open descriptor (the cache will not keep them)."""
        try:
            return open(tmp.name, "rb")
        except FileNotFoundError:
            log.warning("%s: the temporary file of its download, %s, was removed before it was "
                        "opened; served from the open file, not kept", key, tmp.name)
            handle = os.fdopen(os.dup(tmp.fileno()), "rb")
            handle.seek(0)
            return handle

    def _store_later(self, key: str, tmp, flight: _Flight | None) -> None:
        """Store `tmp` as `key` on the index's thread; then land `flight` (if any: its waiters
        look again)."""
        def finish(error: BaseException | None) -> None:
            tmp.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp.name)  # unless the cache adopted it
            try:
                if error is not None:
                    log.warning("%s could not be stored in the cache: %s", key, error)
            finally:
                if flight is not None:
                    self._land(key, flight)
        try:
            self._cache.submit(self._store, key, tmp).add_done_callback(lambda f: finish(f.exception()))
        except RuntimeError as exc:  # closing: nothing is stored any more
            finish(exc)

    # ------------------------------------------------------------------ bulk transfers
    def claim(self, keys) -> set[str]:
        """Claim the keys that are neither cached nor being fetched, for a bulk transfer.

        Opens of a claimed key wait for `deliver` or `release` instead of fetching it.
        """
        keys = list(keys)
        cached = self.cached(keys)
        claimed = set()
        with self._lock:
            for key in keys:
                if key not in self._flights and key not in cached:
                    self._flights[key] = _Flight(bulk=True)
                    claimed.add(key)
        return claimed

    def deliver_many(self, items) -> list[str]:
        """Store verified instances of claimed keys, `(key, path of a held file)` in the order
        readers will want them, with one hand-over to the index's thread and one transaction;
        then wake their waiters, in that order. Returns the keys stored (a file that could not
        be stored stays claimed until `release`)."""
        items = list(items)
        if not items:
            return []
        limit = self._room_for(sum(os.path.getsize(path) for _key, path in items))

        def store_all(cache) -> list[tuple[str, str]]:
            stored = []
            with cache.transact():
                for key, path in items:
                    try:
                        cache.set(key, _Adopt(path))
                        handle = cache.get(key, read=True)
                    except OSError as exc:
                        log.warning("%s could not be stored: %s", key, exc)
                        continue
                    if handle is not None:
                        stored.append((key, handle.name))
                        handle.close()
            if cache.volume() > limit:
                cache.cull()
            return stored

        stored = self._cache.run(store_all)
        for key, name in stored:
            with self._lock:
                self._paths[key] = name
                flight = self._flights.get(key)
            self.downloads += 1
            if flight is not None:
                self._land(key, flight)
        return [key for key, _name in stored]

    def release(self, key: str) -> None:
        """Give up a claimed key: its waiters fetch it themselves."""
        with self._lock:
            flight = self._flights.get(key)
        if flight is not None:
            self._land(key, flight)

    def in_flight(self, key: str) -> bool:
        with self._lock:
            return key in self._flights

    def _land(self, key: str, flight: _Flight) -> None:
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.done.set()

    @contextlib.contextmanager
    def held_file(self):
        """A private temporary file beside the cache, which `_store` can adopt without a copy,
        kept when the block ends: its owner delivers or unlinks it
        (a crash leaves it in the partial folder, which the next start empties)."""
        f = tempfile.NamedTemporaryFile(dir=self._tmp, suffix=".held", delete=False)
        try:
            yield f
        except GeneratorExit:  # the reader of a zip stopped after taking this file: it is theirs
            raise
        except BaseException:  # the entry failed (CRC, cut short): nobody will deliver it
            f.close()
            os.unlink(f.name)
            raise
        finally:
            f.close()

    def _store(self, key: str, src: BinaryIO) -> None:
        """Adopt `src` as the instance `key`: one hand-over to the index's thread (room, store,
        evict, and where the file now is, so the reader's open skips the index)."""
        src.flush()
        size = os.fstat(src.fileno()).st_size

        def store(cache) -> str | None:
            limit = self._room_for(size)
            cache.set(key, _Adopt(src.name))
            if cache.volume() > limit:
                cache.cull()  # evict least recently used entries down to the limit
            try:
                stored = cache.get(key, read=True)
            except OSError:
                return None
            if stored is None:
                return None
            stored.close()
            return stored.name

        name = self._cache.run(store)
        if name:
            with self._lock:
                self._paths[key] = name

    def _room_for(self, incoming: int) -> int:
        """The cache limit that keeps `min_free_bytes` of the disk free once `incoming` (already
        written beside the cache) is stored; never below `incoming`, so the file being opened is
        still served on a full disk."""
        free = self._disk_usage(self.directory).free
        limit = min(self.max_bytes, max(incoming, self._cache.volume() + incoming + free - self.min_free_bytes))
        if limit != self._limit:
            if limit < self.max_bytes and self._limit == self.max_bytes:
                log.warning("the disk is nearly full: the cache shrinks to %d MB to keep %d MB free",
                            limit >> 20, self.min_free_bytes >> 20)
            self._limit = limit
            self._cache.reset("size_limit", limit)
        return limit

    def count(self) -> int:
        """Instances stored."""
        return len(self._cache)

    def downloads_in_flight(self) -> int:
        """Downloads under way (opens and prefetch)."""
        with self._lock:
            return len(self._flights)

    # ------------------------------------------------------------------ lookups
    def bulk_room(self) -> int:
        """Bytes a bulk transfer may hold beside the cache: the limit, or less on a small disk."""
        try:
            free = self._disk_usage(self.directory).free
        except OSError:
            return self.max_bytes
        return max(0, min(self.max_bytes, free - self.min_free_bytes))

    def cached(self, keys) -> set[str]:
        """Which of `keys` are cached, with one hand-over to the index's thread for all."""
        keys = list(keys)
        with self._lock:
            known = {k for k in keys if k in self._paths}
        rest = [k for k in keys if k not in known]
        if rest:
            known.update(self._cache.run(lambda c: [k for k in rest if k in c]))
        return known

    def peek(self, key: str) -> BinaryIO | None:
        """A read handle on `key` once any download of it under way has landed, or None if it is
        not cached; not counted as an open (for copying a cached instance elsewhere)."""
        with self._lock:
            flight = self._flights.get(key)
        if flight is not None:
            flight.done.wait()
        return self._get(key)

    def contains(self, key: str) -> bool:
        with self._lock:
            path = self._paths.get(key)
        if path is not None and os.path.exists(path):
            return True
        return key in self._cache

    def open_known(self, key: str, counted: bool = True) -> BinaryIO | None:
        """A read handle on `key` if this cache knows where its file is without asking the index
        (a recent open or store), else None; counted as a hit (`counted`)."""
        with self._lock:
            path = self._paths.get(key)
        if path is None:
            return None
        try:
            handle = open(path, "rb")
        except FileNotFoundError:  # evicted since
            with self._lock:
                self._paths.pop(key, None)
            return None
        with self._lock:
            self._touched.add(key)
        self.hits += counted
        return handle

    def _get(self, key: str) -> BinaryIO | None:
        with self._lock:
            path = self._paths.get(key)
        if path is not None:
            try:
                handle = open(path, "rb")
            except FileNotFoundError:  # evicted since: ask the index
                with self._lock:
                    self._paths.pop(key, None)
            else:
                with self._lock:
                    self._touched.add(key)
                return handle
        try:
            handle = self._cache.get(key, read=True)
        except OSError:  # the file vanished under the index (evicted meanwhile)
            return None
        if handle is not None and getattr(handle, "name", None):
            with self._lock:
                self._paths[key] = handle.name
        return handle

    def volume(self) -> int:
        return self._cache.volume()

    def clear(self) -> None:
        self._cache.clear()
        with self._lock:
            self._paths.clear()
