"""Walks of a collection: what `find`, `du`, `ls -R` or an indexer will list next, fetched ahead.

A walk visits the patients of a collection in name order (the order of the listing) and, in
each, its studies and series. Every series costs one getSOPInstanceUIDs that nothing avoids; one
at a time, a walk of 5,000 patients at 80 ms a request would take minutes. So:

- `WalkPlanner` (pure: events in, plans out, an injected clock) sees the folders listed in a
  collection. A walk is evident when folders of two different patients were listed within
  `idle_s` of each other; from then on, each listing moves the walk's position (the patient
  folder it is in) and the planner hands out the next patients, up to `window` ahead of it, each
  once, with the listings as deep as the walk has gone (`find -maxdepth 3` lists studies'
  folders, not series': it gets no SOP listings; when it goes deeper, its window is planned again
  to that depth); a jump ahead, or a new pass from further back, is planned from where it
  landed. A walk that lists nothing for `idle_s` ends; its queued work is dropped. Two
  series folders of one patient listed (`find PATIENT`, dcm2niix of a patient) plan that patient
  alone.
- `ListingQueue` runs the listings of those patients (their studies, series and every series'
  SOP listing) on `workers` threads, most urgent first: the patient nearest the walk, and in it
  its listings in the order the walk needs them. A person's own listing never enters the queue:
  it is asked at once by the thread answering it (and shares a fetch already under way).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

WALK_WINDOW = 64     # patients listed ahead of a walk's position
WALK_IDLE_S = 30.0   # a walk that lists nothing for this long has ended
# How deep a walk goes: the folders it lists, and so the listings it needs of each patient.
PATIENT_FOLDERS, STUDY_FOLDERS, SERIES_FOLDERS = 1, 2, 3   # studies; + series; + SOP listings


@dataclass
class _Walk:
    generation: int
    seen: int               # the first patient listed (a second, different one makes it evident)
    last: float             # when a folder of the collection was last listed
    evident: bool = False
    depth: int = PATIENT_FOLDERS
    position: int = 0       # the furthest patient the walk has listed
    planned: int = -1       # patients up to this index were handed out
    alone: set = field(default_factory=set)  # patients planned alone (a series walk inside one)
    series_seen: dict = field(default_factory=dict)  # patient -> a series folder of it listed


@dataclass(frozen=True)
class Plan:
    """Patients (indexes in name order) whose listings to fetch ahead, for walk `generation`,
    down to `depth` (PATIENT_FOLDERS: their studies; STUDY_FOLDERS: and their series;
    SERIES_FOLDERS: and every series' SOP listing)."""
    collection: str
    generation: int
    patients: range
    depth: int = SERIES_FOLDERS


class WalkPlanner:
    def __init__(self, window: int = WALK_WINDOW, idle_s: float = WALK_IDLE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.idle_s = idle_s
        self._clock = clock
        self._walks: dict[str, _Walk] = {}
        self._generations = itertools.count(1)
        self._lock = threading.Lock()

    def listed(self, collection: str, patient: int, patients: int, depth: int,
               series: str | None = None) -> Plan | None:
        """A folder of patient number `patient` (of `patients`, name order) of `collection` was
        listed: its own folder (`depth` PATIENT_FOLDERS), a study's (STUDY_FOLDERS), or series
        `series`'s (SERIES_FOLDERS). What to fetch ahead now."""
        now = self._clock()
        with self._lock:
            walk = self._walks.get(collection)
            if walk is None or now - walk.last > self.idle_s:
                walk = self._walks[collection] = _Walk(next(self._generations), patient, now)
            walk.last = now
            if depth > walk.depth:
                walk.depth = depth
                if walk.evident:  # deeper than planned: the window again, to this depth
                    walk.planned = min(walk.planned, walk.position - 1)
            if not walk.evident and patient != walk.seen:
                walk.evident = True
                walk.position = walk.planned = patient - 1
                log.debug("walk of %s evident: listing up to %d patients ahead", collection, self.window)
            if walk.evident:
                if patient > walk.planned + 1 or patient < walk.position - 1:
                    # A jump ahead (what it skipped is not wanted) or a new pass from further back
                    # (`ls -lR` after `find -maxdepth 3`): planned from where it is now.
                    walk.planned = patient - 1
                    walk.position = patient
                walk.position = max(walk.position, patient)
                end = min(patients, walk.position + 1 + self.window)
                if end - 1 <= walk.planned:
                    return None
                start, walk.planned = walk.planned + 1, end - 1
                return Plan(collection, walk.generation, range(start, end), walk.depth)
            if series is not None and patient not in walk.alone:  # a walk inside one patient?
                first = walk.series_seen.setdefault(patient, series)
                if first != series:
                    walk.alone.add(patient)
                    return Plan(collection, walk.generation, range(patient, patient + 1))
            return None

    def current(self, collection: str, generation: int) -> bool:
        """Whether the walk a plan was made for is still going on."""
        with self._lock:
            walk = self._walks.get(collection)
            return (walk is not None and walk.generation == generation
                    and self._clock() - walk.last <= self.idle_s)


class ListingQueue:
    """Background listings on `workers` threads (started at first use, after the daemon has
    forked), lowest priority first; a key queued or running is not queued again; a job whose
    `still_wanted()` is false when its turn comes is dropped."""

    def __init__(self, workers: int, name: str = "nbia-walk"):
        self.workers = workers
        self.name = name
        self._heap: list = []
        self._keys: set = set()
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._running = 0
        self.done = 0      # jobs run
        self.dropped = 0   # jobs whose walk had ended before their turn

    def submit(self, priority: tuple, key, fn: Callable[[], object],
               still_wanted: Callable[[], bool] = lambda: True) -> bool:
        with self._cond:
            if self._closed or key in self._keys:
                return False
            self._keys.add(key)
            heapq.heappush(self._heap, (priority, next(self._order), key, fn, still_wanted))
            if len(self._threads) < self.workers:
                thread = threading.Thread(target=self._loop, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._cond.notify()
            return True

    def queued(self) -> int:
        with self._cond:
            return len(self._heap)

    def running(self) -> int:
        with self._cond:
            return self._running

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or running; False if that took longer than `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()  # woken by submit (notify) or by a job's end (notify_all)
                if self._closed:
                    return
                _, _, key, fn, still_wanted = heapq.heappop(self._heap)
                self._running += 1
            ran = False
            try:
                ran = still_wanted()
                if ran:
                    fn()
            except Exception:  # a background listing: the walk itself will ask again and report
                log.debug("background listing %s failed", key, exc_info=True)
            finally:
                with self._cond:
                    self._keys.discard(key)
                    self._running -= 1
                    if ran:
                        self.done += 1
                    else:
                        self.dropped += 1
                    self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Drop what is queued and wait (up to `timeout` in all) for the listings running."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
