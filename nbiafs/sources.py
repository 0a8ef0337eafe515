"""Where an instance's bytes come from. The instance cache calls `fetch` on a miss; nothing
above this module knows which source answered.

    local cache (blobcache) -> shared tier (tier.py, when configured) -> the archive

The tier's objects are verified there (verify.py) before they are written here; the
archive's answers are verified by the client (Content-Length, DICM, its md5). An instance
the archive sent, on its own or in a series zip, is put into the tier in the background,
never on the open's path.
"""

from __future__ import annotations

import functools
from typing import BinaryIO, Callable

from nbiafs.blobcache import InstanceCache
from nbiafs.tier import SharedTier


def key_of(series_uid: str, sop_uid: str) -> str:
    """The instance cache's key of an instance."""
    return f"{series_uid}/{sop_uid}"


class InstanceSource:
    def __init__(self, client, cache: InstanceCache, tier: SharedTier | None = None,
                 exact_size: Callable[[str, str], int | None] = lambda series_uid, sop_uid: None):
        self.client = client
        self.cache = cache
        self.tier = tier
        self._exact_size = exact_size

    def fetch(self, series_uid: str, sop_uid: str, dest: BinaryIO) -> int:
        """Write one instance into `dest` (an empty temporary file); return its size."""
        if self.tier is not None:
            size = self.tier.get(series_uid, sop_uid, dest, self.exact_size(series_uid, sop_uid))
            if size is not None:
                return size
            dest.seek(0)
            dest.truncate()
        size = self.client.get_single_image(series_uid, sop_uid, dest)
        self.sent_by_archive(series_uid, sop_uid)
        return size

    def exact_size(self, series_uid: str, sop_uid: str) -> int | None:
        return self._exact_size(series_uid, sop_uid)

    def sent_by_archive(self, series_uid: str, sop_uid: str) -> None:
        """The archive sent this instance (now in the local cache, or about to be): share it."""
        if self.tier is not None:
            self.tier.put_later(series_uid, sop_uid, functools.partial(self.cache.peek, key_of(series_uid, sop_uid)))
