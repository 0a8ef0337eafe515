"""How each reader is reading: walking a series folder, or opening instances at random.

A reader is a process (the thread group of the thread FUSE names). The prefetch transfers a
series whole only for a reader that walks it; a training data loader's workers, which open one
instance after another across many series, get single fetches and no zip, which would bring
a whole series for one slice (issue: random access by many readers). The anchors decide the
same way from what the reader does: mountpoint-s3 resets its prefetch window on a read that is
not sequential, gcsfuse calls a reader random after a few seeks, ratarmount's prefetcher grows
only on sequential access.

The rule, per reader, at each open of an instance of series S:
- `LISTED`: the last series folder this reader listed is S, within `listed_window_s`. Every
  folder reader does this (cp -r, dcm2niix, ITK/GDCM, Slicer, `find -exec`, a script's
  `os.listdir`, then opens); a loader's index walk lists in its main process, and its workers,
  other processes, never list.
- `WALKING`: this reader's last `walk_run` opens (3) were distinct instances of S, in any order
  (cp opens in inode order, ITK in slice order). Opens at random over N series make three in a
  row with a chance of 1/N² per open: a rare zip, never a stream of them.
- `RANDOM`: anything else.

No clock is read here: callers pass `now` (tests inject it). Locking: `_lock` guards
`_readers` and `_tgids`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cachetools

LISTED, WALKING, RANDOM = "listed", "walking", "random"
WALK_RUN = 3          # consecutive distinct opens of one series by one reader: a walk
MAX_READERS = 4096    # readers remembered (least recently seen out)


@dataclass
class _Reader:
    listed: str | None = None   # the series folder it listed last
    listed_at: float = 0.0
    series: str | None = None   # the series of its last open
    run: int = 0                # distinct instances of `series` it opened in a row
    last_sop: str | None = None


class AccessPattern:
    def __init__(self, listed_window_s: float, walk_run: int = WALK_RUN):
        self.listed_window_s = listed_window_s
        self.walk_run = walk_run
        self._lock = threading.Lock()
        self._readers: cachetools.LRUCache = cachetools.LRUCache(maxsize=MAX_READERS)
        self._tgids: cachetools.LRUCache = cachetools.LRUCache(maxsize=MAX_READERS)

    def _reader(self, reader: int) -> _Reader:
        state = self._readers.get(reader)
        if state is None:
            state = self._readers[reader] = _Reader()
        return state

    def listed(self, reader: int, series_uid: str, now: float) -> None:
        """`reader` listed the folder of `series_uid`."""
        with self._lock:
            state = self._reader(reader)
            state.listed, state.listed_at = series_uid, now

    def opened(self, reader: int, series_uid: str, sop_uid: str, now: float) -> str:
        """`reader` opens `sop_uid` of `series_uid`: LISTED, WALKING or RANDOM."""
        with self._lock:
            state = self._reader(reader)
            if state.series == series_uid:
                if sop_uid != state.last_sop:
                    state.run += 1
            else:
                state.series, state.run = series_uid, 1
            state.last_sop = sop_uid
            if state.listed == series_uid and now - state.listed_at <= self.listed_window_s:
                return LISTED
            return WALKING if state.run >= self.walk_run else RANDOM

    def run(self, reader: int, series_uid: str) -> int:
        """How many distinct instances of `series_uid` `reader` has opened in a row (its open
        being answered included); 0 if its last open was of another series."""
        with self._lock:
            state = self._readers.get(reader)
            return state.run if state is not None and state.series == series_uid else 0

    def reader_of(self, tid: int) -> int:
        """The process of thread `tid` (FUSE names the calling thread): its threads are one reader."""
        if tid <= 0:
            return 0
        with self._lock:
            tgid = self._tgids.get(tid)
        if tgid is None:
            tgid = _thread_group(tid)
            with self._lock:
                self._tgids[tid] = tgid
        return tgid


def _thread_group(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return tid
