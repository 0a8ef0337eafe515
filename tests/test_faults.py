"""Faults of the archive seen through a real mount (docs/RELIABILITY.md): stalls, corrupt
bodies, malformed listings, token trouble, cache pressure, a nearly full disk.

Each measured figure is printed as `[figure] …` (run with -s to see them)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import public_series, series_path

from nbiafs.archive.tokens import DEFAULT_USERS
from nbiafs.filesystem import STATE_XATTR

pytestmark = pytest.mark.mount
USER, PASSWORD = next(iter(DEFAULT_USERS.items()))
NAMED = {"NBIA_USER": USER, "NBIA_PASSWORD": PASSWORD}
BUDGET_S = 2.0  # --timeout given to the mounts below
SLACK_S = 3.0   # kernel round trips, the last attempt's connect, a loaded CI machine


def figure(text: str) -> None:
    print(f"[figure] {text}")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def truth(series, name: str) -> bytes:
    return next(i for i in series.instances if f"{i.sop_uid}.dcm" == name).path.read_bytes()


def eio_within_budget(call) -> float:
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        call()
    elapsed = time.monotonic() - start
    assert info.value.errno == errno.EIO, info.value
    assert elapsed < BUDGET_S + SLACK_S, elapsed
    return elapsed


def grants(archive) -> dict:
    return {k: v for k, v in archive.counters()["endpoints"].items() if k.startswith("oauth/")}


def threads_and_sockets(pid: int) -> tuple[int, int]:
    """The daemon's threads and open sockets (other fds grow with threads: one SQLite
    connection per thread that touches a cache)."""
    sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return len(os.listdir(f"/proc/{pid}/task")), sockets


def blob_files(cache_dir: Path) -> set[Path]:
    return {p for p in cache_dir.rglob("*") if p.is_file() and "blobs" in p.parts
            and p.suffix not in (".db", ".db-wal", ".db-shm")}


def two_series(archive):
    """Two public series of at least 9 instances (prefetch waits for a second open there)."""
    return [s for s in public_series(archive) if len(s.instances) > 8][:2]


# --------------------------------------------------------------------------- stall
def test_stall_every_call_returns_eio_within_the_budget_without_leaks(nbia_archive, mount_factory):
    # Single fetches only: the folder is listed, so a first open would start its zip too.
    m = mount_factory(nbia_archive.url, name="stall", extra=("--timeout", str(BUDGET_S), "--no-prefetch"))
    series, other = two_series(nbia_archive)
    folder = m.path(series_path(series))
    names = sorted(os.listdir(folder))
    assert (folder / names[0]).read_bytes() == truth(series, names[0])

    nbia_archive.set_faults(stall="images")
    times = [eio_within_budget(lambda: (folder / names[1]).read_bytes())]
    # A first round lets the bounded pools (libfuse's workers, the series prefetch) grow to their
    # working size; the same calls again must then add nothing: a leak grows with the calls.
    for name in names[2:8]:
        times.append(eio_within_budget(lambda name=name: (folder / name).read_bytes()))
    time.sleep(1.0)
    baseline = threads_and_sockets(m.proc.pid)
    for name in names[2:8]:
        times.append(eio_within_budget(lambda name=name: (folder / name).read_bytes()))
    assert (folder / names[0]).read_bytes() == truth(series, names[0])  # cached: still served
    nbia_archive.set_faults(stall="all")
    times.append(eio_within_budget(lambda: os.listdir(m.path(series_path(other)))))
    assert sorted(os.listdir(folder)) == names  # a cached listing is still served
    time.sleep(1.0)
    after = threads_and_sockets(m.proc.pid)
    # libfuse may still start a worker when a request arrives while the others wait on the
    # archive; a leak per call would add at least 6 over the second round.
    assert after[0] <= baseline[0] + 2 and after[1] <= baseline[1] + 1, (baseline, after)
    figure(f"stall: EIO after {min(times):.2f}-{max(times):.2f} s with --timeout {BUDGET_S:g}; "
           f"threads/sockets {baseline} -> {after} over {len(times) - 1} stalled calls")

    nbia_archive.clear_faults()
    start = time.monotonic()
    assert (folder / names[1]).read_bytes() == truth(series, names[1])
    assert sorted(os.listdir(m.path(series_path(other)))) == sorted(f"{i.sop_uid}.dcm" for i in other.instances)
    figure(f"stall: first read after the archive answers again took {time.monotonic() - start:.2f} s")


# --------------------------------------------------------------------------- corrupt bodies
@pytest.mark.parametrize("fault", [{"truncate_images": 1.0}, {"corrupt_images": "html"},
                                   {"corrupt_images": "nodicm"}], ids=["short-body", "html-200", "no-DICM"])
def test_corrupt_image_bodies_are_eio_and_never_cached(nbia_archive, mount_factory, fault):
    m = mount_factory(nbia_archive.url, name="corrupt", extra=("--timeout", str(BUDGET_S), "--no-prefetch"))
    series = two_series(nbia_archive)[0]
    folder = m.path(series_path(series))
    names = sorted(os.listdir(folder))
    before = blob_files(m.cache_dir)
    nbia_archive.reset_counters()
    nbia_archive.set_faults(**fault)
    elapsed = eio_within_budget(lambda: (folder / names[0]).read_bytes())
    attempts = nbia_archive.counters()["endpoints"].get("getSingleImage", 0)
    assert attempts >= 2  # retried within the budget
    assert os.getxattr(folder / names[0], STATE_XATTR) == b"no"
    assert blob_files(m.cache_dir) == before and not list(m.cache_dir.rglob("*.part"))
    figure(f"{next(iter(fault.items()))}: EIO after {elapsed:.2f} s, {attempts} attempts, nothing cached")
    nbia_archive.clear_faults()
    assert (folder / names[0]).read_bytes() == truth(series, names[0])
    assert os.getxattr(folder / names[0], STATE_XATTR) == b"yes"


def test_malformed_listing_is_eio_never_half_shown(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="json", extra=("--timeout", str(BUDGET_S)))
    listed, unlisted = two_series(nbia_archive)
    folder = m.path(series_path(listed))
    names = sorted(os.listdir(folder))
    nbia_archive.set_faults(corrupt_json=True)
    elapsed = eio_within_budget(lambda: os.listdir(m.path(series_path(unlisted))))
    assert sorted(os.listdir(folder)) == names  # cached listings keep working
    nbia_archive.clear_faults()
    assert sorted(os.listdir(m.path(series_path(unlisted)))) == \
        sorted(f"{i.sop_uid}.dcm" for i in unlisted.instances)
    figure(f"malformed JSON: listing EIO after {elapsed:.2f} s, complete listing after recovery")


# --------------------------------------------------------------------------- tokens
def test_tokens_expiring_during_a_long_read(nbia_archive_factory, mount_factory):
    archive = nbia_archive_factory(access_lifetime_s=1.0, refresh_lifetime_s=3.0)
    m = mount_factory(archive.url, name="longread", env=NAMED)
    series = max(public_series(archive), key=lambda s: len(s.instances))
    folder = m.path(series_path(series))
    archive.set_faults(connection_mbit_s=0.1, total_mbit_s=0.1)  # the series takes several seconds
    start = time.monotonic()
    got = {n: md5(folder / n) for n in sorted(os.listdir(folder))}
    elapsed = time.monotonic() - start
    assert got == {f"{i.sop_uid}.dcm": i.md5 for i in series.instances}
    assert elapsed > 2 * archive.tokens.access_lifetime_s, elapsed  # tokens did expire under way
    renewals = sum(grants(archive).values()) - 1
    assert renewals >= 2, grants(archive)
    figure(f"tokens of 1 s during a {elapsed:.1f} s read: every md5 right, grants {grants(archive)}")


def test_token_endpoint_down_then_back(nbia_archive_factory, mount_factory):
    """Expired tokens make v2 answer empty lists: never shown, never cached."""
    archive = nbia_archive_factory()
    m = mount_factory(archive.url, name="tokens", env=NAMED, extra=("--timeout", str(BUDGET_S)))
    restricted = next(s for s in archive.index.iter_series(USER) if s.collection.get("restricted"))
    public = two_series(archive)[0]
    folder = m.path(series_path(public))
    names = sorted(os.listdir(folder))

    archive.set_faults(token_outage=True)
    archive.tokens.expire_all()
    listing_eio = eio_within_budget(lambda: os.listdir(m.path(series_path(restricted))))
    read_eio = eio_within_budget(lambda: (folder / names[0]).read_bytes())
    archive.set_faults(token_outage=False)
    start = time.monotonic()
    assert sorted(os.listdir(m.path(series_path(restricted)))) == \
        sorted(f"{i.sop_uid}.dcm" for i in restricted.instances)
    recovered = time.monotonic() - start
    assert (folder / names[0]).read_bytes() == truth(public, names[0])

    archive.tokens.revoke_refresh_tokens()  # a rejected refresh token: log in again
    archive.tokens.expire_all()
    assert (folder / names[1]).read_bytes() == truth(public, names[1])
    assert os.listdir(m.path(series_path(restricted).rsplit("/", 2)[0]))  # patient's studies
    figure(f"token endpoint down + tokens expired: listing EIO after {listing_eio:.2f} s, read EIO after "
           f"{read_eio:.2f} s; full listing {recovered:.2f} s after it is back; grants "
           f"{grants(archive)}")
    log = m.log()
    assert PASSWORD not in log and all(t not in log for t in archive.tokens.issued)


# --------------------------------------------------------------------------- cache pressure
def test_cache_far_smaller_than_the_data(nbia_archive, mount_factory, tmp_path):
    limit = 250_000
    m = mount_factory(nbia_archive.url, name="small", extra=("--cache-size", str(limit), "--no-prefetch"))
    series = [s for s in public_series(nbia_archive) if len(s.instances) > 8]
    held_series = series[0]
    held_path = m.path(series_path(held_series), f"{held_series.instances[0].sop_uid}.dcm")
    total = 0
    with open(held_path, "rb") as held:
        head = held.read(1000)  # open and partly read while everything else goes through the cache
        order = []
        for s in series[1:]:
            folder = m.path(series_path(s))
            for inst in s.instances:
                assert md5(folder / f"{inst.sop_uid}.dcm") == inst.md5
                order.append(folder / f"{inst.sop_uid}.dcm")
                total += inst.size
        rest = held.read()
    assert head + rest == held_series.instances[0].path.read_bytes()
    assert total > 4 * limit
    time.sleep(1.5)  # the LRU touches are flushed in the background
    cached = [p for p in order if os.getxattr(p, STATE_XATTR) == b"yes"]
    stored = sum(p.stat().st_size for p in blob_files(m.cache_dir))
    assert stored <= limit, (stored, limit)
    assert cached and cached == order[-len(cached):]  # the most recently read ones stay
    figure(f"cache of {limit} B, {total} B read: {len(cached)} most recent of {len(order)} files kept, "
           f"{stored} B stored")


def test_free_disk_floor_on_a_small_disk(nbia_archive_factory, mount_factory, tmp_path):
    """A cache directory on a 32 MB disk, a cache limit above the disk, 50 MB read: every file
    right, the disk never full, 5 % of it kept free once each file is stored."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(disk)], check=True)
    try:
        archive = nbia_archive_factory(spec="1x1x1x4x100@256")
        m = mount_factory(archive.url, name="floor", cache_dir=disk / "cache", extra=("--cache-size", "1G"))
        lowest = [os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize]
        stop = threading.Event()

        def watch():
            while not stop.wait(0.02):
                st = os.statvfs(disk)
                lowest.append(st.f_bavail * st.f_frsize)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            total = 0
            for s in archive.index.iter_series("nbia_guest"):
                folder = m.path(series_path(s))
                for inst in s.instances:
                    assert md5(folder / f"{inst.sop_uid}.dcm") == inst.md5
                    total += inst.size
        finally:
            stop.set()
            watcher.join()
        st = os.statvfs(disk)
        size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        assert total > size
        assert min(lowest) > 0 and free >= 0.05 * size * 0.9, (min(lowest), free, size)
        assert "the disk is nearly full" in m.log()
        figure(f"disk of {size >> 20} MB, {total >> 20} MB read: lowest free {min(lowest) >> 10} KB, "
               f"free at the end {free >> 10} KB (floor {int(0.05 * size) >> 10} KB)")
        m.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# --------------------------------------------------------------------------- integrity (v4 md5)
def test_single_fetch_whose_md5_differs_is_eio_and_never_cached(nbia_archive, mount_factory):
    """getMD5HashForImage disagrees with every body: each download is refetched, then EIO."""
    m = mount_factory(nbia_archive.url, name="md5", extra=("--timeout", str(BUDGET_S), "--no-prefetch"))
    series = two_series(nbia_archive)[0]
    folder = m.path(series_path(series))
    names = sorted(os.listdir(folder))
    before = blob_files(m.cache_dir)
    nbia_archive.reset_counters()
    nbia_archive.set_faults(wrong_md5=True)
    elapsed = eio_within_budget(lambda: (folder / names[0]).read_bytes())
    counts = nbia_archive.counters()["endpoints"]
    assert counts["getSingleImage"] >= 2 and counts["getMD5HashForImage"] >= counts["getSingleImage"]  # asked again
    assert blob_files(m.cache_dir) == before and "md5" in m.log()
    figure(f"wrong md5: EIO after {elapsed:.2f} s, {counts['getSingleImage']} downloads, nothing cached")
    nbia_archive.clear_faults()
    assert (folder / names[0]).read_bytes() == truth(series, names[0])
    status = m.path(".nbiafs", "status").read_text()
    assert "1 instances matched the archive's md5" in status and "mismatches refetched" in status


@pytest.mark.parametrize("fault", [{}, {"old_v4": True}, {"wrong_zip_md5": True}],
                         ids=["IncludeMD5", "old-v4", "wrong-md5-list"])
def test_series_zip_entries_are_checked_against_its_md5_list(nbia_archive, mount_factory, tmp_path, fault):
    """The zip's md5hashes.csv (IncludeMD5=Yes; getImageWithMD5Hash on a v4 build without it)
    checks every entry before it is stored; entries that disagree are fetched on their own."""
    series = max(public_series(nbia_archive), key=lambda s: len(s.instances))
    m = mount_factory(nbia_archive.url, name="zipmd5")
    folder = m.path(series_path(series))
    names = sorted(os.listdir(folder))
    nbia_archive.reset_counters()
    nbia_archive.set_faults(**fault)
    subprocess.run(["cp", "-r", str(folder), str(tmp_path / "copy")], check=True)
    got = {p.name: md5(p) for p in (tmp_path / "copy").iterdir()}
    assert got == {f"{i.sop_uid}.dcm": i.md5 for i in series.instances}
    counts = nbia_archive.counters()["endpoints"]
    status = m.path(".nbiafs", "status").read_text()
    zips = counts.get("getImage", 0) + counts.get("getImageWithMD5Hash", 0)
    if fault.get("old_v4"):  # refused once (400), then the endpoint that always has the list
        assert counts["getImage"] == 1 and counts["getImageWithMD5Hash"] == 1
        assert "does not take IncludeMD5" in m.log()
    else:
        assert zips == 1 and "getImageWithMD5Hash" not in counts
    # cp -r lists the folder: its first open starts the zip (every other instance).
    if fault.get("wrong_zip_md5"):  # every zip entry refetched on its own, verified
        assert f"{len(names) - 1} mismatches refetched" in status, status
        assert counts["getSingleImage"] == len(names)
        assert "the archive's list says" in m.log()
    else:
        assert f"({len(names) - 1} from zips)" in status, status
    figure(f"zip md5 check {fault or 'IncludeMD5'}: requests {counts}")
