"""Speed features through real mounts: series prefetch by zip, fallbacks, walks, `nbiafs prefetch`."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import public_series, series_path

from nbiafs.api.client import ClientConfig, NbiaClient
from nbiafs.archive.spec import parse_spec
from nbiafs.blobcache import InstanceCache
from nbiafs.pattern import LISTED
from nbiafs.prefetch import PrefetchConfig, Prefetcher, key_of

pytestmark = pytest.mark.mount


def md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def truth(series) -> dict[str, str]:
    return {f"{i.sop_uid}.dcm": i.md5 for i in series.instances}


def wait_transfers(m, timeout=60):
    deadline = time.monotonic() + timeout
    while not re.search(r"(?<!\d)0 in flight", m.path(".nbiafs", "status").read_text()):
        assert time.monotonic() < deadline, m.path(".nbiafs", "status").read_text()
        time.sleep(0.1)


def big(archive):
    return max(public_series(archive), key=lambda s: len(s.instances))


def test_reading_a_series_uses_one_zip(nbia_archive, mount_factory, tmp_path):
    m = mount_factory(nbia_archive.url, name="zip")
    series = big(nbia_archive)
    folder = m.path(series_path(series))
    os.listdir(folder)
    nbia_archive.reset_counters()
    subprocess.run(["cp", "-r", str(folder), str(tmp_path / "copy")], check=True)
    assert md5s(tmp_path / "copy") == truth(series)
    counts = nbia_archive.counters()["endpoints"]
    assert counts["getImage"] == 1
    # cp listed the folder: its first open started the zip beside its own fetch, which is the
    # only one on its own; the zip brings the rest.
    assert counts["getSingleImage"] == 1
    assert "1 series zips" in m.path(".nbiafs", "status").read_text()


def test_a_listed_folder_starts_its_zip_at_the_first_open(nbia_archive, mount_factory):
    """ls, then an open: the zip is asked while the opened instance is fetched, and the
    instance comes back without waiting for it (first byte as a single fetch)."""
    m = mount_factory(nbia_archive.url, name="first-open")
    series = big(nbia_archive)
    folder = m.path(series_path(series))
    names = sorted(os.listdir(folder))
    nbia_archive.reset_counters()
    nbia_archive.set_faults(latency_s=0.2)
    start = time.monotonic()
    data = (folder / names[0]).read_bytes()
    first = time.monotonic() - start
    nbia_archive.clear_faults()
    assert hashlib.md5(data).hexdigest() == truth(series)[names[0]]
    assert nbia_archive.counters()["endpoints"].get("getImage") == 1  # asked before the open returned
    assert first < 0.2 * 2 + 0.3, first  # its own fetch and md5 (one round trip each, at once)
    (folder / names[1]).read_bytes()  # followed: the zip goes on and brings the rest
    wait_transfers(m, 20)
    for name in names[2:]:
        assert os.getxattr(folder / name, "user.nbiafs.cached") == b"yes", name


def test_a_lone_peek_abandons_its_zip(nbia_archive_factory, mount_factory):
    """ls, then one file and nothing else: the zip started by that open is abandoned after
    `peek_abandon_s` (3 s); what it brought unverified is dropped, nothing else is fetched."""
    archive = nbia_archive_factory(parse_spec("1x1x1x1x60@256", noise_hu=20.0))
    m = mount_factory(archive.url, name="peek")
    series = big(archive)
    folder = m.path(series_path(series))
    names = sorted(os.listdir(folder))
    archive.set_faults(total_mbit_s=5.0)  # the 60-instance zip (about 4 MB) takes several seconds
    (folder / names[0]).read_bytes()
    time.sleep(5)
    archive.clear_faults()
    counts = archive.counters()["endpoints"]
    assert counts.get("getImage") == 1 and counts.get("getSingleImage") == 1
    cached = [n for n in names if os.getxattr(folder / n, "user.nbiafs.cached") == b"yes"]
    assert cached == [names[0]]
    assert "abandoned" in m.log() and "1 series zips (1 abandoned)" in m.path(".nbiafs", "status").read_text()


def test_an_early_open_fetches_alone_rather_than_wait_for_a_whole_zip(nbia_archive_factory, mount_factory,
                                                                      tmp_path):
    """ls, then a second file (a notebook looking at a slice or two): the zip the first open
    started will bring it, but only once its md5 list, the zip's last entry, has come. The open
    waits 1 s, then fetches its instance alone, long before the zip ends; the zip goes on. A
    reader walking a series (cp -r) does so for its second and third opens only, then waits."""
    archive = nbia_archive_factory(parse_spec("1x1x1x2x60@256", noise_hu=20.0))
    m = mount_factory(archive.url, name="overtake")
    first, second = sorted(public_series(archive), key=lambda s: s.uid)
    folder = m.path(series_path(first))
    names = sorted(os.listdir(folder))
    archive.set_faults(connection_mbit_s=4.0)  # the zip (about 4 MB) takes 8 s, one instance 0.3 s
    (folder / names[0]).read_bytes()
    start = time.monotonic()
    data = (folder / names[30]).read_bytes()
    waited = time.monotonic() - start
    assert hashlib.md5(data).hexdigest() == truth(first)[names[30]]
    assert 1.0 <= waited < 3.0, waited
    assert os.getxattr(folder / names[59], "user.nbiafs.cached") == b"no"  # the zip goes on
    wait_transfers(m)
    counts = archive.counters()["endpoints"]
    assert counts.get("getImage") == 1 and counts.get("getSingleImage") == 2, counts
    assert all(os.getxattr(folder / n, "user.nbiafs.cached") == b"yes" for n in names)
    assert md5s(folder) == truth(first)
    assert "1 fetched alone by opens that stopped waiting for their series' zip" in m.path(
        ".nbiafs", "status").read_text()

    archive.reset_counters()
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(m.path(series_path(second))), str(copy)], check=True, timeout=120)
    assert md5s(copy) == truth(second)
    counts = archive.counters()["endpoints"]
    # its first open alone (beside the zip), its second and third after 1 s each, then the zip
    assert counts.get("getImage") == 1 and counts.get("getSingleImage") == 3, counts
    archive.clear_faults()


@pytest.mark.parametrize("fault", [{"zip_drop_entries": 3}, {"zip_truncate": True},
                                   {"image_error_rate": 0.0, "stall": ""}])
def test_a_zip_cut_short_is_completed_one_by_one(nbia_archive, mount_factory, tmp_path, fault):
    m = mount_factory(nbia_archive.url, name="cut")
    series = big(nbia_archive)
    folder = m.path(series_path(series))
    os.listdir(folder)
    nbia_archive.set_faults(**fault)
    nbia_archive.reset_counters()
    subprocess.run(["cp", "-r", str(folder), str(tmp_path / "copy")], check=True)
    assert md5s(tmp_path / "copy") == truth(series)
    counts = nbia_archive.counters()["endpoints"]
    assert counts["getImage"] == 1
    if fault.get("zip_drop_entries"):
        assert counts["getSingleImage"] >= 3


def test_small_series_prefetched_at_first_open_without_zip(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="small")
    series = big(nbia_archive)
    folder = m.path(series_path(series))
    first = min(f"{i.sop_uid}.dcm" for i in series.instances)  # opened without listing its folder
    os.stat(folder / first)  # its parents' listings
    nbia_archive.reset_counters()
    (folder / first).read_bytes()
    # 12 instances > small_series (8): nothing more until a second distinct open (the md5 is
    # asked beside the image, v4).
    time.sleep(0.5)
    assert nbia_archive.counters()["endpoints"] == {"getSingleImage": 1, "getMD5HashForImage": 1}
    localizer = next(s for s in public_series(nbia_archive) if len(s.instances) == 1)
    (m.path(series_path(localizer)) / f"{localizer.instances[0].sop_uid}.dcm").read_bytes()


def test_prefetch_stops_when_readers_leave(nbia_archive_factory, tmp_path):
    """Unit level, with the real client and cache: an idle series' zip is abandoned, and the
    entries that arrived before (CRC-checked, held for the md5 list) are kept."""
    nbia_archive = nbia_archive_factory(parse_spec("1x1x1x1x30@128", noise_hu=20.0))
    series = big(nbia_archive)
    sops = sorted(i.sop_uid for i in series.instances)
    now = [0.0]
    cache = InstanceCache(tmp_path / "cache", 1 << 30)
    client = NbiaClient(ClientConfig(root_url=nbia_archive.url, api="v4"))
    stored = []
    prefetcher = Prefetcher(cache, client, PrefetchConfig(idle_stop_s=5.0), clock=lambda: now[0],
                            on_stored=lambda *a: stored.append(a))
    prefetcher.start()
    nbia_archive.set_faults(connection_mbit_s=0.2)  # the zip trickles in: 25 kB/s, an entry in 0.6 s
    try:
        prefetcher.opened(series.uid, sops[0], sops, series.total_size, LISTED)  # a folder reader
        prefetcher.opened(series.uid, sops[1], sops, series.total_size, LISTED)
        deadline = time.monotonic() + 20
        while not list((tmp_path / "cache" / "partial").glob("*.held")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.7)  # a complete entry or two are held
        assert not stored, "delivered before the zip's md5 list"
        now[0] = 100.0  # readers left long ago
        time.sleep(1.5)
        count = len(stored)
        time.sleep(1.5)
        assert 0 < len(stored) == count < len(sops) - 2
        assert not list((tmp_path / "cache" / "partial").glob("*.held"))
        assert not any(cache.in_flight(key_of(series.uid, s)) for s in sops)  # claims released
    finally:
        nbia_archive.clear_faults()
        prefetcher.stop()
        client.close()
        cache.close()


def test_walk_of_a_collection_costs_a_handful_of_requests(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="walk")
    nbia_archive.reset_counters()
    out = subprocess.run(["find", str(m.path("Phantom-Body-MR")), "-maxdepth", "3"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.count("\n") > 10
    counts = nbia_archive.counters()
    assert counts["total"] <= 5, counts  # patients, studies and series of the collection: one each
    nbia_archive.reset_counters()
    ls = subprocess.run(["ls", "-lR", str(m.path("Phantom-Body-MR"))], capture_output=True, text=True)
    assert ls.returncode == 0
    counts = nbia_archive.counters()["endpoints"]
    assert set(counts) <= {"getSOPInstanceUIDs", "getCollectionValues"}, counts
    assert "getSeriesSize" not in counts  # sizes from getSeries' FileSize
    nbia_archive.reset_counters()
    again = subprocess.run(["ls", "-lR", str(m.path("Phantom-Body-MR"))], capture_output=True, text=True)
    assert again.stdout == ls.stdout and nbia_archive.counters()["total"] == 0


def nbiafs(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "nbiafs", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def test_prefetch_command_warms_resumes_and_reports(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="warm")
    patient = m.path("Phantom-Thorax-CT", "PTC-002")
    res = nbiafs("prefetch", str(patient))
    assert res.returncode == 0, res.stderr
    assert "prefetched 24 files" in res.stderr and "0 failed" in res.stderr and "MB/s" in res.stderr
    files = [p for p in patient.rglob("*.dcm")]
    assert len(files) == 24 and all(os.getxattr(p, "user.nbiafs.cached") == b"yes" for p in files)
    nbia_archive.reset_counters()
    again = nbiafs("prefetch", str(patient))
    assert again.returncode == 0 and "prefetched 0 files" in again.stderr and "24 already cached" in again.stderr
    assert nbia_archive.counters()["endpoints"].get("getSingleImage", 0) == 0


def test_prefetch_command_failures_are_one_line_and_non_zero(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="fail", extra=("--timeout", "2"))
    patient = m.path("Phantom-Body-MR", "PBM-001")
    list(patient.rglob("*.dcm"))
    nbia_archive.set_faults(image_outage=True)
    res = nbiafs("prefetch", str(patient))
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("nbiafs: 24 of 24 files could not be fetched") and "Input/output error" in last
    with tempfile.TemporaryDirectory() as elsewhere:
        res = nbiafs("prefetch", elsewhere)
    assert res.returncode == 1 and "not on an nbiafs mount" in res.stderr
