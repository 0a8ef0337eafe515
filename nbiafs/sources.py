"""Where an instance's bytes come from. The instance cache calls `fetch` on a miss; nothing
above this module knows which source answered.

    local cache (blobcache) -> shared tier (tier.py) -> IDC's mirror (idc.py) -> the archive

The tier and the mirror are used only where configured, and each verifies what it read
(verify.py) before it is written here; the archive's answers are verified by the client
(Content-Length, DICM, its md5). An instance the archive sent, on its own or in a series zip,
is put into the tier in the background, never on the open's path; what the mirror sent is
not (the mirror is itself shared).
"""

from __future__ import annotations

import functools
import logging
from typing import BinaryIO, Callable

from nbiafs.blobcache import InstanceCache
from nbiafs.idc import IdcMirror
from nbiafs.tier import SharedTier

log = logging.getLogger(__name__)


def key_of(series_uid: str, sop_uid: str) -> str:
    """The instance cache's key of an instance."""
    return f"{series_uid}/{sop_uid}"


class InstanceSource:
    def __init__(self, client, cache: InstanceCache, tier: SharedTier | None = None,
                 exact_size: Callable[[str, str], int | None] = lambda series_uid, sop_uid: None,
                 mirror: IdcMirror | None = None):
        self.client = client
        self.cache = cache
        self.tier = tier
        self.mirror = mirror
        self._exact_size = exact_size

    def fetch(self, series_uid: str, sop_uid: str, dest: BinaryIO) -> int:
        """Write one instance into `dest` (an empty temporary file); return its size."""
        if self.tier is not None:
            size = self.tier.get(series_uid, sop_uid, dest, self.exact_size(series_uid, sop_uid))
            if size is not None:
                return size
            dest.seek(0)
            dest.truncate()
        if self.mirror is not None:
            try:
                size = self.mirror.get(series_uid, sop_uid, dest)
            except OSError:
                raise  # the local disk: the archive's bytes could not be written either
            except Exception:  # noqa: BLE001 - an accelerator's bug must not fail a read TCIA can serve
                log.exception("IDC's mirror failed on %s; reading it from the archive", sop_uid)
                size = None
            if size is not None:
                return size
            dest.seek(0)
            dest.truncate()
        size = self.client.get_single_image(series_uid, sop_uid, dest)
        self.sent_by_archive(series_uid, sop_uid, size)
        return size

    def exact_size(self, series_uid: str, sop_uid: str) -> int | None:
        return self._exact_size(series_uid, sop_uid)

    def sent_by_archive(self, series_uid: str, sop_uid: str, size: int) -> None:
        """The archive sent this instance (now in the local cache, or about to be): count it, and
        share it."""
        if self.mirror is not None:
            self.mirror.counted_tcia(series_uid, sop_uid, size)
        if self.tier is not None:
            self.tier.put_later(series_uid, sop_uid, functools.partial(self.cache.peek, key_of(series_uid, sop_uid)))

    # ------------------------------------------------------------------ the mirror's part
    def prepare(self, series_uid: str) -> None:
        """A series folder was listed: the mirror may work out where its bytes come from."""
        if self.mirror is not None:
            self.mirror.prepare(series_uid)

    def settle(self, series_uid: str) -> None:
        """Before an instance's size is told: wait (bounded) for its series' route."""
        if self.mirror is not None:
            self.mirror.settle(series_uid)

    def origin(self, series_uid: str, sop_uid: str) -> str:
        """Which source a cached instance came from: "idc" or "tcia" (the shared tier holds only
        what the archive sent)."""
        if self.mirror is not None and self.mirror.origin(series_uid, sop_uid) == "idc":
            return "idc"
        return "tcia"

    def license(self, series_uid: str) -> str | None:
        return self.mirror.license(series_uid) if self.mirror is not None else None
