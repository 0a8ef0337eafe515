"""Network shaping and fault injection for the local archive.

`Faults` is an immutable value: the server reads the current one at the start
of each request, and tests swap it (`LocalArchive.set_faults`) between steps.
Bandwidth is enforced by `Throttle`, a virtual-clock token bucket: each write
reserves its slot on the link and sleeps until the slot ends, so one link shared
by many connections divides its rate between them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass

IMAGE_ENDPOINTS = frozenset({"getSingleImage", "getImage", "getImageWithMD5Hash"})
SLOW_ENDPOINTS = frozenset({"getSeries", "getSeriesSize"})


@dataclass(frozen=True)
class Faults:
    latency_s: float = 0.0            # added to every request before it is answered
    slow_metadata_s: float = 0.0      # added to getSeries and getSeriesSize (slow in production)
    connection_mbit_s: float = 0.0    # bandwidth cap of each connection; 0 = none
    total_mbit_s: float = 0.0         # bandwidth cap of all connections together; 0 = none
    image_outage: bool = False        # every image request answers 500
    image_error_rate: float = 0.0     # this fraction of image requests answers 500
    stall: str = ""                   # "all" or "images": accept, never answer
    truncate_images: float = 0.0      # this fraction of getSingleImage bodies is cut short
    zip_drop_entries: int = 0         # getImage zips miss their last N files (still a valid zip, 200)
    zip_truncate: bool = False        # getImage zips end before their central directory (200)
    wrong_md5: bool = False           # getMD5HashForImage gives a wrong hash
    wrong_zip_md5: bool = False       # md5hashes.csv of zips lists wrong hashes
    old_v4: bool = False              # v4 as built before 2025-11-26: getImage refuses IncludeMD5
    corrupt_images: str = ""          # "html": an HTML page with 200; "nodicm": no DICM magic
    corrupt_json: bool = False        # metadata answers are cut mid-JSON
    token_outage: bool = False        # the token endpoint answers 503

    def replace(self, **changes) -> "Faults":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def stalls(self, endpoint: str) -> bool:
        return self.stall == "all" or (self.stall == "images" and endpoint in IMAGE_ENDPOINTS)

    def delay_s(self, endpoint: str) -> float:
        return self.latency_s + (self.slow_metadata_s if endpoint in SLOW_ENDPOINTS else 0.0)


class Throttle:
    """A link of `rate` bytes/s. `consume(n)` blocks until n bytes could have passed."""

    def __init__(self, mbit_s: float):
        self.rate = mbit_s * 1e6 / 8.0
        self._lock = threading.Lock()  # guards _free_at
        self._free_at = 0.0

    def reserve(self, nbytes: int) -> float:
        """Reserve the link for `nbytes`; return the monotonic time the transfer ends.

        A sender that fell behind the link (Python overhead, short sleeps oversleeping) by
        less than BURST_S catches up, so the long-run rate is the cap, not less; an idle
        link gives no credit."""
        now = time.monotonic()
        with self._lock:
            start = now if self._free_at < now - BURST_S else self._free_at
            self._free_at = start + nbytes / self.rate
            return self._free_at


BURST_S = 0.05      # how far behind its link a sender may catch up
MIN_SLEEP_S = 0.002  # shorter waits are not worth a sleep (it would oversleep)


def pace(throttles: list[Throttle], nbytes: int) -> None:
    """Sleep until `nbytes` have passed every throttle (the slowest link wins)."""
    if not throttles:
        return
    end = max(t.reserve(nbytes) for t in throttles)
    delay = end - time.monotonic()
    if delay > MIN_SLEEP_S:
        time.sleep(delay)
