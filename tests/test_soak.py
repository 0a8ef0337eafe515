"""A bounded soak (docs/RELIABILITY.md, "Load"): 8 readers across 3 series and `ls -lR` beside
them for 60 s (NBIAFS_SOAK_S to change it), through a cache smaller than the data so files are
evicted and fetched again all along. Every read is checked against the archive's md5; the
daemon's RSS, threads and open files are sampled and must stay flat."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time

import pytest
from conftest import series_path

pytestmark = pytest.mark.mount
SOAK_S = float(os.environ.get("NBIAFS_SOAK_S", "60"))
READERS = 8


def sample(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {"t": time.monotonic(), "rss": int(status["VmRSS"].split()[0]) * 1024,
            "threads": int(status["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def test_soak_readers_and_ls_for_a_minute(nbia_archive_factory, mount_factory):
    archive = nbia_archive_factory(spec="1x1x1x3x60@128")
    archive.set_faults(latency_s=0.002)
    series = list(archive.index.iter_series("nbia_guest"))
    data = sum(s.total_size for s in series)
    m = mount_factory(archive.url, name="soak", extra=("--cache-size", str(data // 2)))
    truth = {}
    for s in series:
        folder = m.path(series_path(s))
        truth.update({folder / f"{i.sop_uid}.dcm": i.md5 for i in s.instances})
    by_series = [[m.path(series_path(s), f"{i.sop_uid}.dcm") for i in s.instances] for s in series]

    stop = threading.Event()
    errors: list[str] = []
    reads = [0] * READERS
    nbytes = [0] * READERS
    walks = [0]

    def reader(k: int) -> None:
        rng = random.Random(k)
        paths = by_series[k % len(by_series)]
        while not stop.is_set():
            path = rng.choice(paths)
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    chunks = []
                    while chunk := os.read(fd, 1 << 16):
                        chunks.append(chunk)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # next read asks the daemon
                finally:
                    os.close(fd)
                body = b"".join(chunks)
                if hashlib.md5(body).hexdigest() != truth[path]:
                    errors.append(f"{path.name}: wrong bytes ({len(body)} read)")
                reads[k] += 1
                nbytes[k] += len(body)
            except OSError as exc:
                errors.append(f"{path.name}: {exc}")

    def walker() -> None:
        while not stop.is_set():
            res = subprocess.run(["ls", "-lR", str(m.mountpoint)], capture_output=True, text=True)
            if res.returncode != 0:
                errors.append(f"ls -lR: {res.stderr.strip()[:200]}")
            walks[0] += 1

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(READERS)]
    threads.append(threading.Thread(target=walker))
    samples = [sample(m.proc.pid)]
    start = time.monotonic()
    for t in threads:
        t.start()
    try:
        while time.monotonic() - start < SOAK_S and not errors:
            time.sleep(1.0)
            samples.append(sample(m.proc.pid))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    elapsed = time.monotonic() - start
    assert not errors, errors[:10]
    assert m.alive()

    def window(lo, hi):
        return [s for s in samples if lo <= (s["t"] - start) / SOAK_S <= hi]
    early, late = window(0.2, 0.5), window(0.75, 1.01)
    peak = {k: max(s[k] for s in early) for k in ("rss", "threads", "fds")}
    end = {k: max(s[k] for s in late) for k in ("rss", "threads", "fds")}
    downloads = archive.counters()["endpoints"]
    print(f"[figure] soak {elapsed:.0f} s: {sum(reads)} reads ({sum(reads) / elapsed:.0f} files/s, "
          f"{sum(nbytes) / elapsed / 1e6:.1f} MB/s) + {walks[0]} ls -lR, 0 errors; archive requests "
          f"{downloads}; RSS {samples[0]['rss'] >> 20} -> {peak['rss'] >> 20} (20-50 %) -> "
          f"{end['rss'] >> 20} MB (75-100 %); threads {peak['threads']} -> {end['threads']}; "
          f"fds {peak['fds']} -> {end['fds']}")
    assert min(reads) > 0 and walks[0] > 0
    assert downloads.get("getSingleImage", 0) + downloads.get("getImage", 0) > len(truth)  # refetched
    assert end["rss"] <= peak["rss"] * 1.10 + (8 << 20), (peak, end)
    # libfuse starts and ends threads with the load (a few either way), and each series zip
    # under way has its writer thread for as long as it streams; each cache's SQLite
    # connection lives on one thread of its own, so open files follow the readers, not the
    # threads libfuse has used. A leak per read or per download would add thousands.
    assert end["threads"] <= peak["threads"] + 8, (peak, end)
    assert end["fds"] <= peak["fds"] * 1.10 + 8, (peak, end)
