"""The access-pattern rule (pattern.py) on recorded open traces, with an injected clock; and
through a real mount, a loader's worker processes beside a folder reader."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile

import pytest
from conftest import public_series, series_path

from nbiafs.pattern import LISTED, RANDOM, WALKING, AccessPattern

WINDOW_S = 10.0


def series(n: int, size: int = 40) -> dict[str, list[str]]:
    return {f"1.2.{s}": [f"1.2.{s}.{i}" for i in range(size)] for s in range(n)}


def kinds(pattern: AccessPattern, trace, now: float = 0.0) -> list[str]:
    """Replay (reader, 'ls'|'open', series, sop) events, one every 10 ms."""
    out = []
    for step, (reader, what, uid, sop) in enumerate(trace):
        t = now + step * 0.01
        if what == "ls":
            pattern.listed(reader, uid, t)
        else:
            out.append(pattern.opened(reader, uid, sop, t))
    return out


def test_cp_r_lists_then_opens_in_inode_order():
    uid, sops = next(iter(series(1).items()))
    order = sorted(sops, key=lambda s: hash(s))  # GNU cp: inode order, not names
    got = kinds(AccessPattern(WINDOW_S), [(7, "ls", uid, None)] + [(7, "open", uid, s) for s in order])
    assert set(got) == {LISTED}


def test_dcm2niix_two_passes_and_itk_whole_folder_read_are_walks():
    uid, sops = next(iter(series(1).items()))
    trace = [(8, "ls", uid, None)] + [(8, "open", uid, s) for s in sops] + [(8, "open", uid, s) for s in sops]
    assert set(kinds(AccessPattern(WINDOW_S), trace)) == {LISTED}
    # ITK/GDCM: the folder scanned, then the slices in position order (not name order)
    slices = random.Random(3).sample(sops, len(sops))
    trace = [(9, "ls", uid, None)] + [(9, "open", uid, s) for s in slices]
    assert set(kinds(AccessPattern(WINDOW_S), trace)) == {LISTED}


def test_a_reader_that_never_lists_walks_from_its_third_open():
    """`md5sum dir/*`: the shell lists, md5sum opens in name order."""
    uid, sops = next(iter(series(1).items()))
    trace = [(50, "ls", uid, None)] + [(51, "open", uid, s) for s in sops]
    got = kinds(AccessPattern(WINDOW_S), trace)
    assert got[:2] == [RANDOM, RANDOM] and set(got[2:]) == {WALKING}


def test_reopening_one_file_is_not_a_walk():
    uid, sops = next(iter(series(1).items()))
    got = kinds(AccessPattern(WINDOW_S), [(5, "open", uid, sops[0])] * 10)
    assert set(got) == {RANDOM}


def test_a_data_loader_is_random():
    """An index walk in the main process, then 8 workers opening 40 random instances each,
    interleaved as a DataLoader's prefetching workers are."""
    rng = random.Random(11)
    every = series(24)
    trace = [(1, "ls", uid, None) for uid in every]
    plans = {w: [(uid, rng.choice(sops)) for uid, sops in (rng.choice(list(every.items())) for _ in range(40))]
             for w in range(2, 10)}
    for step in range(40):
        for w, plan in plans.items():
            trace.append((w, "open", *plan[step]))
    got = kinds(AccessPattern(WINDOW_S), trace)
    assert len(got) == 320 and got.count(RANDOM) >= 318  # three in a row of one series: 1/576 per open


def test_a_loader_with_its_index_in_the_same_process_is_random():
    """num_workers=0: the same process lists every folder, then opens at random."""
    rng = random.Random(5)
    every = series(24)
    trace = [(1, "ls", uid, None) for uid in every]
    for _ in range(200):
        uid = rng.choice(list(every))
        trace.append((1, "open", uid, rng.choice(every[uid])))
    got = kinds(AccessPattern(WINDOW_S), trace)
    # Only the series listed last is LISTED (its folder is the reader's last listing).
    last = list(every)[-1]
    opens = [e for e in trace if e[1] == "open"]
    assert all(k != LISTED or e[2] == last for k, e in zip(got, opens))
    assert got.count(RANDOM) >= 190


def test_two_readers_of_one_series_at_once_both_walk():
    uid, sops = next(iter(series(1).items()))
    interleaved = []
    for a, b in zip(sops[::2], sops[1::2]):
        interleaved += [(20, "open", uid, a), (21, "open", uid, b)]
    got = kinds(AccessPattern(WINDOW_S), interleaved)
    assert got[:4] == [RANDOM] * 4 and set(got[4:]) == {WALKING}


def test_a_listing_counts_for_its_window_only_and_for_its_reader():
    uid, sops = next(iter(series(1).items()))
    p = AccessPattern(WINDOW_S)
    p.listed(30, uid, 0.0)
    assert p.opened(31, uid, sops[0], 1.0) == RANDOM  # `ls`, then `dcmdump one.dcm`: another process
    assert p.opened(30, uid, sops[1], WINDOW_S + 0.5) == RANDOM  # listed too long ago
    p.listed(30, uid, 20.0)
    assert p.opened(30, uid, sops[2], 20.5) == LISTED


def test_threads_of_one_process_are_one_reader():
    import threading
    p = AccessPattern(WINDOW_S)
    seen = []
    t = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
    t.start()
    t.join()
    assert p.reader_of(os.getpid()) == os.getpid()
    assert p.reader_of(threading.get_native_id()) == os.getpid()
    assert p.reader_of(0) == 0


# --------------------------------------------------------------------------- through a mount
WORKER = r"""
import sys
for path in sys.stdin.read().splitlines():
    with open(path, "rb") as f:
        f.read()
"""


@pytest.mark.mount
def test_loader_workers_get_single_fetches_while_a_folder_reader_gets_its_zip(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="loader")
    every = public_series(nbia_archive)
    index = sorted(str(p) for p in m.mountpoint.glob("*/*/*/*/*.dcm"))  # the loader's index walk
    assert len(index) == sum(len(s.instances) for s in every)
    def walks(plan) -> bool:  # what the rule says of one worker's opens (a worker is one reader)
        p = AccessPattern(WINDOW_S)
        return any(p.opened(1, path.rsplit("/", 2)[-2], path, 0.0) != RANDOM for path in plan)

    # Plans in which no worker opens three of one series in a row (with 12 series, 1 in 6 does):
    # then every open is RANDOM, and nothing but what is opened may be fetched.
    seed = 0
    while True:
        rng = random.Random(seed)
        plans = [[rng.choice(index) for _ in range(25)] for _ in range(4)]
        if not any(walks(plan) for plan in plans):
            break
        seed += 1
    nbia_archive.reset_counters()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, text=True) for _ in plans]
    for proc, plan in zip(workers, plans):
        proc.stdin.write("\n".join(plan))
        proc.stdin.close()
    assert all(proc.wait(timeout=120) == 0 for proc in workers)
    counts = nbia_archive.counters()
    assert not counts["endpoints"].get("getImage")  # no series zip for random opens
    assert set(counts["instances"]) == {os.path.basename(p)[:-4] for plan in plans for p in plan}
    assert max(counts["instances"].values()) == 1  # each fetched once, repeats from the cache
    # A second epoch, in another order: no request at all.
    nbia_archive.reset_counters()
    again = [random.Random(n).sample(plan, len(plan)) for n, plan in enumerate(plans)]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, text=True) for _ in again]
    for proc, plan in zip(workers, again):
        proc.stdin.write("\n".join(plan))
        proc.stdin.close()
    assert all(proc.wait(timeout=120) == 0 for proc in workers)
    assert nbia_archive.counters()["total"] == 0
    # A folder reader, meanwhile: its series comes as one zip.
    big = max(every, key=lambda s: len(s.instances))
    folder = m.path(series_path(big))
    cached_before = sum(os.getxattr(folder / f"{i.sop_uid}.dcm", "user.nbiafs.cached") == b"yes"
                        for i in big.instances)
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(["cp", "-r", str(folder), out], check=True, timeout=120)
    assert nbia_archive.counters()["endpoints"].get("getImage") == 1 or cached_before >= len(big.instances) - 10
    status = m.path(".nbiafs", "status").read_text()
    assert "prefetched, never read" in status
