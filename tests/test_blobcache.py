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


def test_store_survives_an_eviction_removing_its_directory(tmp_path, monkeypatch):
    """Evicting a file removes its directories once empty (diskcache's Disk.remove); when that
    happens between making the directory of a new entry and renaming the file into it, the
    entry is stored anyway (once this surfaced as ENOENT on open under load)."""
    import nbiafs.blobcache as blobcache
    real_makedirs = os.makedirs
    removed = []

    def makedirs_then_evicted(path, *args, **kwargs):
        real_makedirs(path, *args, **kwargs)
        if not removed and os.path.dirname(path) == str(tmp_path / "blobs"):
            os.removedirs(path)  # what a concurrent eviction in that directory does
            removed.append(path)

    monkeypatch.setattr(blobcache.os, "makedirs", makedirs_then_evicted)
    cache = InstanceCache(tmp_path, max_bytes=10**7, min_free_bytes=0)
    handle, downloaded = cache.open("s/1", writer(b"z" * 5000))
    assert downloaded and handle.read() == b"z" * 5000
    handle.close()
    again, downloaded = cache.open("s/1", writer(b"other"))  # waits for the store under way
    assert removed and not downloaded and again.read() == b"z" * 5000
    again.close()
    cache.close()


def test_cached_files_share_at_most_256_folders(tmp_path):
    """One folder level of 256 (diskcache's own layout makes a folder for nearly every file,
    and deletes it again when the file is evicted)."""
    cache = InstanceCache(tmp_path, max_bytes=10**8, min_free_bytes=0)
    for i in range(600):
        handle, downloaded = cache.open(f"s/{i}", writer(b"%d" % i))
        assert downloaded
        handle.close()
    cache.close()
    blobs = tmp_path / "blobs"
    files = [p.relative_to(blobs) for p in blobs.rglob("*.val")]
    assert len(files) == 600 and all(len(p.parts) == 2 for p in files)
    folders = {p.parts[0] for p in files}
    assert len(folders) <= 256 and all(len(name) == 2 for name in folders)


def test_concurrent_stores_and_evictions(tmp_path):
    """8 threads storing and evicting at once through a cache that holds a tenth of them."""
    import threading
    cache = InstanceCache(tmp_path, max_bytes=200_000, min_free_bytes=0)
    errors = []

    def work(t):
        for k in range(150):
            body = bytes([t, k % 256]) * 1000
            try:
                handle, _ = cache.open(f"s/{t}/{k}", writer(body))
                with handle:
                    if handle.read() != body:
                        errors.append(f"{t}/{k}: wrong bytes")
            except OSError as exc:
                errors.append(f"{t}/{k}: {exc}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert cache.volume() <= 200_000
    cache.close()


def test_a_download_whose_temporary_file_was_removed_is_still_served_whole(tmp_path, caplog):
    """Whatever removed a download's temporary file by name, the bytes written are the ones
    asked for: the open gets them (not EIO), and the cache does not claim to hold them."""
    cache = InstanceCache(tmp_path, max_bytes=10**6, min_free_bytes=0)
    data = bytes(range(256)) * 400

    def fetch_then_lose_the_name(dest):
        dest.write(data)
        os.unlink(dest.name)
        return len(data)
    handle, downloaded = cache.open("s/1", fetch_then_lose_the_name)
    assert downloaded and handle.read() == data
    handle.close()
    assert "was removed before it was opened" in caplog.text
    again, downloaded = cache.open("s/1", writer(data))  # not kept: fetched again, then kept
    assert downloaded and again.read() == data
    again.close()
    cache.close()
