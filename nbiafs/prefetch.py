"""Series prefetch: when a reader starts on a series, fetch the rest before it asks.

DICOM tools read every file of a series folder (shared/fuse-notes.md); per-file round trips
would make a mount many times slower than the zip users download today. Training data loaders
do not: their workers open one instance after another across many series, and a zip there
brings a whole series for one slice. So each open is first classified by `pattern.py`, per
reader (process): LISTED (it just listed this series' folder), WALKING (its last 3 opens were
of this series) or RANDOM. Then, as the anchors do:

- A series is prefetched at the first open of a LISTED reader when it has at most
  `small_series` instances, or, when it will come as a zip, at once, in parallel with that
  instance's own fetch. Such a transfer is tentative: if no second instance of the series is
  opened within `peek_abandon_s`, it is abandoned (a lone peek: list, then one file), and what
  it received but had not verified yet is dropped. A LISTED reader's second distinct open,
  and any WALKING open, start it otherwise. A RANDOM open never starts a transfer (it only
  keeps one alive that a walker started): it is fetched alone, and a loader gets one fetch per
  worker at a time, as many at once as it has workers (up to 64 FUSE threads).
- Most of a series comes as one getImage zip (`zip_min_instances` or more left
  to fetch, and the series no larger than half the cache): one request, DEFLATE
  compressed (35-45 % of raw for CT), streamed and stored entry by entry, each
  mapped to its SOP Instance UID by reading (0008,0018). Instances the zip will
  bring are claimed in the cache, so an open of one waits for the zip instead of
  downloading it again; the instance being opened right now is fetched on its
  own. A reader's first `overtake_opens` opens of the series wait `overtake_after_s`
  at most, then fetch their instance alone (`overtake_after`): the zip's entries are
  served only once its md5 list, its last entry, has come, and a peek at two or
  three files must not wait for a whole series. Whatever the zip did not bring (a
  zip cut short still ends with 200) is released to single fetches.
- The zip is asked with the archive's md5 of each file (`md5hashes.csv`, its
  last entry). Every entry is CRC-checked as it streams in and held beside the
  cache until that list arrives; then each entry whose md5 matches is stored, and
  one that does not is dropped and fetched on its own (verified again). A zip that
  carries no md5 list (an archive that does not send one, or a stream cut short)
  has its CRC-checked entries stored as they are.
- Otherwise the rest is fetched with getSingleImage by `connections` workers in
  name order, starting after the instance just opened. An open of an instance
  not yet fetched never waits in this queue: it downloads at once.
- A series' prefetch stops when no instance of it was opened for `idle_stop_s`,
  or when readers move on to more than `max_series` other series. What it stored
  stays; the instances it stored that nobody opened since are counted (`unread()`).

Threads: `connections` single-fetch workers and one thread per zip, started by
`start()` and stopped by `stop()`. Locking: `_lock` guards `_series`; each
`_SeriesState` is only changed under it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from nbiafs.blobcache import InstanceCache
from nbiafs.dicomhead import sop_instance_uid
from nbiafs.errors import NbiaError
from nbiafs.pattern import LISTED, RANDOM, WALKING, AccessPattern
from nbiafs.sources import InstanceSource, key_of
from nbiafs.tier import LEASE_RENEW_S, LEASE_STALE_S
from nbiafs.zipstream import TruncatedZip, iter_entries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefetchConfig:
    connections: int = 8          # concurrent single fetches (the official retriever and s3fs keep to a few)
    small_series: int = 8         # prefetch at the first open when the series has at most this many
    zip_min_instances: int = 10   # use a getImage zip when this many are left (more than 8 connections fetch at once)
    idle_stop_s: float = 10.0     # stop a series nobody opened anything of for this long
    max_series: int = 2           # series prefetched at once; opening a third drops the oldest
    listed_window_s: float = 10.0  # a first open this soon after its reader listed the folder starts the zip
    peek_abandon_s: float = 3.0   # a zip started by a first open, with no second open this long after
    overtake_after_s: float = 1.0  # a reader's early open waits this long for a transfer, then fetches alone
    overtake_opens: int = 3       # ... while it has opened at most this many instances of the series in a row
    plan_after_s: float = 0.005   # a prefetch started when an open returns is planned this long after it
    enabled: bool = True


@dataclass
class _SeriesState:
    series_uid: str
    sops: list[str]                   # name order
    opened: set = field(default_factory=set)
    last_open: float = 0.0
    started: bool = False
    tentative: bool = False           # started by a first open: abandoned unless a second follows
    lease: bool = False               # this node holds the cluster's lease on fetching it (shared tier)
    first_open: float = 0.0
    cancelled: threading.Event = field(default_factory=threading.Event)


def _note_open(state: _SeriesState, sop_uid: str, now: float, add: bool) -> None:
    """An open of `sop_uid` in a series being prefetched (under the prefetcher's lock): it keeps
    the series alive, and a second distinct instance makes a tentative transfer a followed one
    (a folder reader, not a peek). `add`: count it among the opened."""
    state.last_open = now
    if sop_uid not in state.opened:
        if state.opened:
            state.tentative = False
        if add:
            state.opened.add(sop_uid)


class Prefetcher:
    def __init__(self, cache: InstanceCache, client, config: PrefetchConfig,
                 on_stored: Callable[[str, str, int], None], clock=time.monotonic,
                 source: InstanceSource | None = None):
        self.cache = cache
        self.client = client
        self.source = source if source is not None else InstanceSource(client, cache)
        self.config = config
        self._on_stored = on_stored
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[str, _SeriesState] = {}
        self.pattern = AccessPattern(config.listed_window_s)
        # Instances the prefetch stored that nobody opened since (bounded; the oldest forgotten).
        self._unread: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stats = {"zip_instances": 0, "single_instances": 0, "zips": 0, "zip_failures": 0,
                      "zip_md5_checked": 0, "zip_md5_mismatches": 0, "zip_without_md5": 0,
                      "zips_abandoned": 0, "zip_entries_dropped": 0, "tier_instances": 0, "idc_instances": 0,
                      "followed_instances": 0}

    # ------------------------------------------------------------------ lifecycle
    def queued(self) -> int:
        """Instances waiting for a prefetch worker."""
        return self._queue.qsize()

    def start(self) -> None:
        if not self.config.enabled:
            return
        for n in range(self.config.connections):
            t = threading.Thread(target=self._worker, name=f"nbia-prefetch-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for state in self._series.values():
                state.cancelled.set()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=5)

    # ------------------------------------------------------------------ the reader's signal
    def folder_listed(self, series_uid: str, reader: int = 0) -> None:
        """`reader` listed a series folder: its first open soon after is a folder reader's."""
        self.pattern.listed(reader, series_uid, self._clock())

    def note_open(self, series_uid: str, sop_uid: str, reader: int = 0) -> str:
        """Every open of an instance, first: how its reader reads (pattern.py)."""
        key = key_of(series_uid, sop_uid)
        with self._lock:
            self._unread.pop(key, None)
        return self.pattern.opened(reader, series_uid, sop_uid, self._clock())

    def overtake_after(self, series_uid: str, reader: int = 0) -> float | None:
        """How long an open by `reader` waits for a transfer of the series that will bring its
        instance before fetching it alone: `overtake_after_s` for one of the reader's first
        `overtake_opens` opens in the series (a peek at two or three files must not wait for a
        whole zip, whose md5 list comes last); None (until it comes) for a reader walking the
        series, which wants the whole transfer anyway."""
        if self.pattern.run(reader, series_uid) <= self.config.overtake_opens:
            return self.config.overtake_after_s
        return None

    def unread(self) -> int:
        """Instances the prefetch stored that were not opened since."""
        with self._lock:
            return len(self._unread)

    def _stored_ahead(self, key: str) -> None:
        with self._lock:
            self._unread[key] = None
            if len(self._unread) > UNREAD_MAX:
                self._unread.popitem(last=False)

    def opening(self, series_uid: str, sop_uid: str, sops_in_name_order: list[str],
                series_bytes: int, kind: str) -> None:
        """An open has begun (before its instance is fetched, or waited for). A second one of a
        series makes its tentative zip a followed one at once, even while this open waits for
        that zip. And if its reader just listed the folder (`kind` LISTED) and the rest will
        come as one zip, start that zip now, beside this instance's own fetch."""
        if not self.config.enabled or self._stop.is_set():
            return
        now = self._clock()
        with self._lock:
            state = self._series.get(series_uid)
            if state is not None and not state.cancelled.is_set():
                _note_open(state, sop_uid, now, add=False)
            if kind != LISTED:
                return
            if len(sops_in_name_order) - 1 < max(self.config.zip_min_instances, self.config.small_series + 1):
                return  # small series: prefetched after this open, as before
            state = self._live_state(series_uid, sops_in_name_order)
            if state.started:
                return
        if self.cache.contains(key_of(series_uid, sop_uid)):
            return  # a re-read of what is cached, not a first read of the folder
        with self._lock:
            if state.started or state.cancelled.is_set():
                return
            state.started = state.tentative = True
            state.first_open = state.last_open = now
        self._start(state, sop_uid, series_bytes)

    def opening_cached(self, series_uid: str, sop_uid: str) -> None:
        """A cached instance was opened: a series being read keeps its prefetch going (and a
        tentative one is followed); nothing is started for a series that is not being read."""
        if not self.config.enabled:
            return
        now = self._clock()
        with self._lock:
            state = self._series.get(series_uid)
            if state is not None and not state.cancelled.is_set():
                _note_open(state, sop_uid, now, add=True)

    def opened(self, series_uid: str, sop_uid: str, sops_in_name_order: list[str],
               series_bytes: int, kind: str) -> None:
        """An instance is being opened: maybe start prefetching its series (never blocks). A
        RANDOM open starts nothing, and never makes a series a candidate (which would drop
        another series' prefetch): it only keeps alive a prefetch that a walker started."""
        if not self.config.enabled or self._stop.is_set():
            return
        now = self._clock()
        with self._lock:
            state = self._series.get(series_uid)
            if (state is None or state.cancelled.is_set()) and kind == RANDOM:
                return
            state = self._live_state(series_uid, sops_in_name_order)
            _note_open(state, sop_uid, now, add=True)
            start = not state.started and (kind == WALKING or (kind == LISTED and (
                len(state.opened) >= 2 or len(state.sops) <= self.config.small_series)))
            if start:
                state.started = True
        if start:  # off the open's path: the reader has its file, the rest is planned beside it
            # ... and a moment later: its open returns and its first read is answered before the
            # prefetch's requests take the daemon's CPU (at once, they delayed that first read).
            plan = threading.Timer(self.config.plan_after_s, self._start, args=(state, sop_uid, series_bytes))
            plan.name, plan.daemon = "nbia-prefetch-plan", True
            plan.start()

    def _live_state(self, series_uid: str, sops_in_name_order: list[str]) -> _SeriesState:
        """The series' prefetch state, made anew if it has none or a cancelled one (which may
        stop the oldest other series'). Under `_lock`."""
        state = self._series.get(series_uid)
        if state is None or state.cancelled.is_set():
            state = self._series[series_uid] = _SeriesState(series_uid, sops_in_name_order)
            self._drop_oldest(keep=series_uid)
        return state

    def _drop_oldest(self, keep: str) -> None:
        live = [s for s in self._series.values() if not s.cancelled.is_set()]
        while len(live) > self.config.max_series:
            oldest = min((s for s in live if s.series_uid != keep), key=lambda s: s.last_open)
            oldest.cancelled.set()
            live.remove(oldest)
            log.debug("prefetch of series %s stopped: readers moved on", oldest.series_uid)
        for uid in [u for u, s in self._series.items() if s.cancelled.is_set()]:
            del self._series[uid]

    def _start(self, state: _SeriesState, current_sop: str, series_bytes: int) -> None:
        uid = state.series_uid
        candidates = [s for s in _after(state.sops, current_sop) if s != current_sop]
        cached = self.cache.cached(key_of(uid, s) for s in candidates)
        rest = [s for s in candidates if key_of(uid, s) not in cached]
        if not rest:
            return
        mirror = self.source.mirror
        if mirror is not None and mirror.usable() and mirror.mirrored(uid):
            # Claimed at once (the next opens wait for the plan), then read from IDC's mirror,
            # many GETs at once; what it cannot give comes from the shared tier or the archive.
            claimed = self.cache.claim(key_of(uid, s) for s in rest)
            threading.Thread(target=self._plan_with_mirror, args=(state, rest, claimed, series_bytes),
                             name="nbia-prefetch-idc", daemon=True).start()
            return
        self._without_mirror(state, rest, None, series_bytes)

    def _without_mirror(self, state: _SeriesState, rest: list[str], claimed: set[str] | None,
                        series_bytes: int) -> None:
        """The rest of a series from the shared tier (where configured) and the archive."""
        uid = state.series_uid
        tier = self.source.tier
        if tier is not None and tier.usable():
            # Claimed at once (the next opens wait for the plan, as for a zip), then planned beside
            # them: what the shared tier holds comes from there, the archive is asked for the rest.
            if claimed is None:
                claimed = self.cache.claim(key_of(uid, s) for s in rest)
            threading.Thread(target=self._plan_with_tier, args=(state, rest, claimed, series_bytes),
                             name="nbia-prefetch-tier", daemon=True).start()
            return
        self._from_archive(state, rest, claimed, series_bytes)

    def _plan_with_mirror(self, state: _SeriesState, rest: list[str], claimed: set[str], series_bytes: int) -> None:
        """What IDC's mirror verifiably holds comes from there, `workers` GETs at once, each
        stored as it lands, in name order; the rest (a series routed to TCIA, an instance that
        failed a check) goes on as without the mirror."""
        uid = state.series_uid
        mirror = self.source.mirror
        try:
            route = mirror.route(uid) if mirror is not None else None
            from_idc = [s for s in rest if s in route.objects] if route is not None and route.where == "idc" else []
            left: list[str] = []
            if from_idc and mirror is not None:
                log.debug("prefetching series %s: %d instances from IDC's mirror", uid, len(from_idc))
                left = mirror.get_many(uid, from_idc, self.cache.held_file, self._batch_deliver(uid, claimed),
                                       lambda: self._stop.is_set() or self._idle(state))
            taken = set(from_idc) - set(left)
            others = [s for s in rest if s not in taken]
        except Exception:  # never leave instances claimed: their opens would wait forever
            log.exception("series %s: reading it from IDC's mirror failed", uid)
            for key in claimed:
                self.cache.release(key)
            return
        keys = {key_of(uid, s) for s in others} & claimed
        for key in claimed - keys:
            self.cache.release(key)
        if not others or state.cancelled.is_set() or self._stop.is_set():
            for key in keys:
                self.cache.release(key)
            return
        self._without_mirror(state, others, keys, series_bytes)

    def _from_archive(self, state: _SeriesState, rest: list[str], claimed: set[str] | None,
                      series_bytes: int) -> None:
        """The rest of a series from the archive: one zip, or single fetches (`claimed`: the
        keys already claimed for it, released if single fetches take them)."""
        uid = state.series_uid
        fits = series_bytes <= self.cache.bulk_room() // 2  # held beside the cache until verified
        if len(rest) >= self.config.zip_min_instances and fits:
            if claimed is None:
                claimed = self.cache.claim(key_of(uid, s) for s in rest)
            log.debug("prefetching series %s: %d instances as one zip", uid, len(claimed))
            threading.Thread(target=self._zip, args=(state, claimed), name="nbia-prefetch-zip",
                             daemon=True).start()
            return
        for key in claimed or ():
            self.cache.release(key)
        log.debug("prefetching series %s: %d instances", uid, len(rest))
        for sop in rest:
            self._queue.put((state, sop))

    def _plan_with_tier(self, state: _SeriesState, rest: list[str], claimed: set[str], series_bytes: int) -> None:
        """What the tier holds comes from there; the rest from the archive, by one node of the
        cluster: a series zip is fetched under a lease in the tier, and a node that finds
        another's lease takes the instances as that node puts them, fetching only what
        never comes (the lease holder died or stalled)."""
        uid = state.series_uid
        tier = self.source.tier
        try:
            held = tier.listing(uid) if tier is not None else set()
            from_tier = [s for s in rest if s in held and key_of(uid, s) in claimed]
            others = [s for s in rest if s not in held]
            lease = None
            if tier is not None and len(others) >= self.config.zip_min_instances:
                lease = tier.take_lease(uid)
            state.lease = lease is True
            if others and lease is not False:
                self._from_archive(state, others, {key_of(uid, s) for s in others} & claimed, series_bytes)
        except Exception:  # never leave instances claimed: their opens would wait forever
            log.exception("series %s: planning its prefetch failed", uid)
            for key in claimed:
                self.cache.release(key)
            return
        if from_tier:
            log.debug("prefetching series %s: %d instances from the shared cache", uid, len(from_tier))
            self._from_tier(state, from_tier, {key_of(uid, s) for s in from_tier})
        if lease is False:
            log.debug("series %s: another node is fetching it; taking its instances from the shared cache", uid)
            self._follow(state, others, {key_of(uid, s) for s in others} & claimed, series_bytes)

    def _follow(self, state: _SeriesState, sops: list[str], claimed: set[str], series_bytes: int) -> None:
        """Take the instances another node fetches under its lease as they reach the tier, for
        as long as it holds the lease (renewed while its zip streams in) or instances keep
        coming; whatever is still missing then comes from the archive."""
        uid = state.series_uid
        tier = self.source.tier
        waiting = list(sops)
        try:
            while waiting and tier is not None and tier.usable() and not self._stop.is_set() \
                    and not self._idle(state):
                time.sleep(FOLLOW_POLL_S)
                held = tier.listing(uid)
                ready = [s for s in waiting if s in held]
                if ready:
                    left = set(self._get_from_tier(tier, state, ready, claimed))
                    self.stats["followed_instances"] += len(ready) - len(left)
                    waiting = [s for s in waiting if s not in ready or s in left]
                    if len(left) < len(ready):
                        continue  # progress: look again
                if tier.lease_age(uid) > LEASE_STALE_S:
                    break
        except Exception:
            log.exception("series %s: following another node's fetch failed", uid)
        if not waiting or state.cancelled.is_set() or self._stop.is_set():
            for key in claimed:
                self.cache.release(key)
            return
        log.info("series %s: %d instances did not come from the node fetching it; fetching them", uid, len(waiting))
        waiting_keys = {key_of(uid, s) for s in waiting}
        for key in claimed - waiting_keys:
            self.cache.release(key)
        self._from_archive(state, waiting, claimed & waiting_keys, series_bytes)

    def _get_from_tier(self, tier, state: _SeriesState, sops: list[str], claimed: set[str]) -> list[str]:
        """`sops` from the tier, each stored as it lands; returns those it did not give."""
        uid = state.series_uid
        return tier.get_many(uid, sops, self.cache.held_file, self._tier_deliver(uid, claimed),
                             lambda sop: self.source.exact_size(uid, sop),
                             lambda: self._stop.is_set() or self._idle(state))

    def _tier_deliver(self, uid: str, claimed: set[str]) -> Callable[[str, str], None]:
        """Store one instance from the shared cache (its GETs hand them over one at a time)."""
        store = self._batch_deliver(uid, claimed, "tier_instances", "the shared cache")
        return lambda sop, path: store([(sop, path)])

    def _batch_deliver(self, uid: str, claimed: set[str], counter: str = "idc_instances",
                       source: str = "IDC's mirror") -> Callable[[list[tuple[str, str]]], None]:
        """Store instances another source sent, in the order given, with one hand-over to the
        cache: each is unclaimed, its exact size told, counted in `stats[counter]`."""
        def deliver(items: list[tuple[str, str]]) -> None:
            sizes = {key_of(uid, sop): (sop, os.path.getsize(path)) for sop, path in items}
            try:
                stored = self.cache.deliver_many((key_of(uid, sop), path) for sop, path in items)
            except (OSError, RuntimeError, sqlite3.Error) as exc:  # RuntimeError: unmounting, the cache closed
                log.warning("series %s: instances from %s could not be stored (%s)", uid, source, exc)
                return
            for key in stored:
                sop, size = sizes[key]
                claimed.discard(key)
                self._on_stored(uid, sop, size)
                self.stats[counter] += 1
                self._stored_ahead(key)
        return deliver

    # ------------------------------------------------------------------ single fetches
    def _worker(self) -> None:
        while not self._stop.is_set():
            task = self._queue.get()
            if task is None:
                return
            state, sop = task
            if self._idle(state):
                continue
            key = key_of(state.series_uid, sop)
            try:
                handle, downloaded = self.cache.open(
                    key, functools.partial(self.source.fetch, state.series_uid, sop))
            except (NbiaError, OSError) as exc:
                log.debug("prefetch of %s failed (%s); an open will try again", key, exc)
                continue
            with handle:
                self._on_stored(state.series_uid, sop, _size(handle))
            if downloaded:
                self.stats["single_instances"] += 1
                self._stored_ahead(key)

    def _idle(self, state: _SeriesState) -> bool:
        if state.cancelled.is_set():
            return True
        if state.tentative and self._clock() - state.first_open > self.config.peek_abandon_s:
            state.cancelled.set()
            self.stats["zips_abandoned"] += 1
            log.info("prefetch of series %s abandoned: nothing else of it was opened within %.0f s of the first",
                     state.series_uid, self.config.peek_abandon_s)
            return True
        if self._clock() - state.last_open > self.config.idle_stop_s:
            state.cancelled.set()
            log.debug("prefetch of series %s stopped: no reader for %.0f s", state.series_uid,
                      self.config.idle_stop_s)
            return True
        return False

    # ------------------------------------------------------------------ the shared tier
    def _from_tier(self, state: _SeriesState, sops: list[str], claimed: set[str]) -> None:
        """Instances of a series that the shared tier holds, several GETs at once, each verified
        and stored as it lands; what the tier could not give goes to single fetches."""
        uid = state.series_uid
        tier = self.source.tier
        left = list(sops)
        try:
            if tier is not None:
                left = self._get_from_tier(tier, state, sops, claimed)
        except Exception:  # never leave instances claimed: their opens would wait forever
            log.exception("series %s: reading it from the shared cache failed", uid)
        finally:
            for key in claimed:
                self.cache.release(key)
            if left and not state.cancelled.is_set() and not self._stop.is_set():
                log.debug("series %s: %d instances not from the shared cache; fetching them", uid, len(left))
                for sop in left:
                    self._queue.put((state, sop))

    # ------------------------------------------------------------------ the zip
    def _zip(self, state: _SeriesState, claimed: set[str]) -> None:
        uid = state.series_uid
        self.stats["zips"] += 1
        held: dict[str, tuple[str, str, str, int, str]] = {}  # entry name -> key, sop, path, size, md5
        md5s: dict[str, str] | None = None
        started = renewed = time.monotonic()
        tier = self.source.tier
        try:
            with self.client.open_series_zip(uid, with_md5=self.client.config.verify_md5) as response:
                log.debug("zip of series %s: answered in %.3f s", uid, time.monotonic() - started)
                chunks = response.iter_content(256 * 1024)
                digests: dict[str, str] = {}
                for name, entry in iter_entries(chunks, self.cache.held_file, digests):
                    if name == MD5_LIST:
                        md5s = parse_md5_list(entry.read())
                        os.unlink(entry.name)
                        continue
                    sop = sop_instance_uid(entry) if name.lower().endswith(".dcm") else None
                    key = key_of(uid, sop) if sop else None
                    if key is not None and sop is not None and key in claimed and name not in held:
                        held[name] = (key, sop, entry.name, _size(entry), digests[name])
                    else:
                        os.unlink(entry.name)
                    if self._stop.is_set() or self._idle(state):
                        break
                    if state.lease and time.monotonic() - renewed > LEASE_RENEW_S and tier is not None:
                        tier.renew_lease(uid)
                        renewed = time.monotonic()
        except (TruncatedZip, NbiaError, OSError, ValueError) as exc:
            self.stats["zip_failures"] += 1
            log.warning("zip of series %s ended early (%s); fetching the rest one by one", uid, exc)
        except Exception:  # a prefetch thread must never die silently with instances claimed
            self.stats["zip_failures"] += 1
            log.exception("zip of series %s failed", uid)
        finally:
            if state.tentative and state.cancelled.is_set() and md5s is None and self.client.config.verify_md5:
                # An abandoned peek: its entries were never checked against the archive's md5.
                self.stats["zip_entries_dropped"] += len(held)
                for entry_fields in held.values():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry_fields[2])
                held = {}
            received = time.monotonic()
            try:
                self._deliver_held(uid, held, md5s, claimed)
            except Exception:  # never leave instances claimed: their opens would wait forever
                log.exception("series %s: storing its zip's instances failed", uid)
            log.debug("zip of series %s: %d entries received in %.3f s, stored in %.3f s", uid, len(held),
                      received - started, time.monotonic() - received)
            missing = sorted(k.split("/", 1)[1] for k in claimed)
            for key in claimed:
                self.cache.release(key)
            if state.lease and tier is not None:  # after the puts of what it brought
                tier.drop_lease_later(uid)
                state.lease = False
            if missing and not state.cancelled.is_set() and not self._stop.is_set():
                log.info("series %s: %d instances not in the zip; fetching them one by one",
                         uid, len(missing))
                for sop in missing:
                    self._queue.put((state, sop))

    def _deliver_held(self, uid: str, held: dict, md5s: dict | None, claimed: set[str]) -> None:
        """Store each held entry that matches the archive's md5 (or, with no md5 list, its CRC
        alone), all in one transaction, in name order (the order folder readers open them);
        an entry whose md5 differs stays claimed-then-released: fetched on its own."""
        ready = []
        for name, (key, sop, path, size, md5) in sorted(held.items(), key=lambda item: item[1][1]):
            expected = None if md5s is None else md5s.get(name)
            if md5s is not None and expected != md5:
                self.stats["zip_md5_mismatches"] += 1
                log.warning("series %s: %s (%s) has md5 %s, the archive's list says %s; fetching it "
                            "on its own", uid, name, sop, md5, expected)
                continue
            ready.append((key, sop, path, size))
        try:
            if ready and not self._stop.is_set():  # unmounting: the cache is closing
                stored = set(self.cache.deliver_many((key, path) for key, _sop, path, _size in ready))
                for key, sop, _path, size in ready:
                    if key in stored:
                        claimed.discard(key)
                        self._on_stored(uid, sop, size)
                        self.source.sent_by_archive(uid, sop, size)
                        self._stored_ahead(key)
                        self.stats["zip_instances"] += 1
                        self.stats["zip_md5_checked" if md5s is not None else "zip_without_md5"] += 1
        except (OSError, RuntimeError, sqlite3.Error) as exc:  # RuntimeError: the cache closed meanwhile
            log.warning("series %s: its zip's instances could not be stored (%s)", uid, exc)
        finally:
            for _key, _sop, path, _size, _md5 in held.values():
                if os.path.exists(path):
                    os.unlink(path)


MD5_LIST = "md5hashes.csv"
UNREAD_MAX = 1 << 20  # stored-ahead instances remembered (their keys: about 150 bytes each)
FOLLOW_POLL_S = 0.25  # how often a node waiting on another's fetch lists the tier (one LIST in-cluster: ms)


def parse_md5_list(data: bytes) -> dict[str, str]:
    """`md5hashes.csv`: a `Filename,MD5Hash` header, then `name,hash` rows in any order."""
    out = {}
    for line in data.decode("utf-8", "replace").splitlines()[1:]:
        name, _, digest = line.strip().rpartition(",")
        if name and digest:
            out[name.strip().strip('"')] = digest.strip().strip('"').lower()
    return out


def _after(sops: list[str], current: str) -> list[str]:
    """The series in name order, starting after `current` and wrapping around."""
    if current not in sops:
        return list(sops)
    i = sops.index(current)
    return sops[i + 1:] + sops[:i]


def _size(handle) -> int:
    handle.seek(0, io.SEEK_END)
    size = handle.tell()
    handle.seek(0)
    return size
