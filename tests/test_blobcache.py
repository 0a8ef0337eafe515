"""The instance cache on its own: LRU limit, the free-disk floor, single flight, no partial entries."""

from __future__ import annotations

import collections
import os

import pytest

from nbiafs.blobcache import InstanceCache

Usage = collections.namedtuple("Usage", "total used free")


def writer(data: bytes):
    def fetch(dest):
        dest.write(data)
        return len(data)
    return fetch


def test_least_recently_used_out_under_the_limit(tmp_path):
    cache = InstanceCache(tmp_path, max_bytes=600_000, min_free_bytes=0)  # the index takes ~40 kB
    for k in range(10):
        handle, downloaded = cache.open(f"s/{k}", writer(bytes([k]) * 100_000))
        assert downloaded and handle.read() == bytes([k]) * 100_000
        handle.close()
        cache._flush_touches()
        first, _ = cache.open("s/0", writer(b"x"))  # keep s/0 recently used
        first.close()
        cache._flush_touches()
    assert cache.volume() <= 600_000
    assert cache.contains("s/0") and cache.contains("s/9") and not cache.contains("s/1")
    cache.close()


def test_free_disk_floor_shrinks_the_cache(tmp_path):
    state = {"other_files": 0}
    cache = None

    def disk_usage(path):  # a 1 MB disk: the cache plus other files, 200 kB kept free
        used = state["other_files"] + (cache.volume() if cache else 0)
        return Usage(1_000_000, used, 1_000_000 - used)

    cache = InstanceCache(tmp_path, max_bytes=10**9, min_free_bytes=200_000, disk_usage=disk_usage)
    for k in range(20):
        cache.open(f"s/{k}", writer(b"a" * 20_000))[0].close()
    assert all(cache.contains(f"s/{k}") for k in range(20))  # the disk has room: nothing evicted
    state["other_files"] = 550_000    # something else fills the disk
    cache.open("s/new", writer(b"b" * 20_000))[0].close()
    assert disk_usage(None).free >= 200_000 and cache.contains("s/new")
    assert not cache.contains("s/0")  # the least recently used went first
    state["other_files"] = 1_000_000  # completely full: the file being opened is still served
    handle, _ = cache.open("s/last", writer(b"c" * 20_000))
    assert handle.read() == b"c" * 20_000
    handle.close()
    cache.close()


def test_failed_download_keeps_nothing(tmp_path):
    cache = InstanceCache(tmp_path, max_bytes=10**6, min_free_bytes=0)

    def broken(dest):
        dest.write(b"half a file")
        raise OSError(5, "cut short")
    with pytest.raises(OSError):
        cache.open("s/1", broken)
    assert not cache.contains("s/1")
    assert os.listdir(tmp_path / "partial") == []
    cache.close()
