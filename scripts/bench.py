#!/usr/bin/env python3
"""nbiafs against the way TCIA users download today, side by side, in one run.

Starts the local archive (`nbiafs serve --spec bench`: 50 patients, and a CT
series of 300 noisy 512x512 instances of about 0.5 MB that zips to 35-45 %) in
its own process, and for two network profiles, latency-bound (100 ms per
request, 1 Gbit/s) and bandwidth-bound (20 ms, 100 Mbit/s), measures:

 (a) a cold `cp -r` of the series from a fresh mount (its parents listed), the
     bulk download (getImage zip + extract, as tcia-utils does), a loop of
     getSingleImage calls one after another, one metadata round trip;
 (b) time to the first byte of one uncached instance through the mount vs one
     getSingleImage request; and a peek at two files: the series listed, its first file
     read, then the time to read the one in its middle, vs one request for it;
 (c) dcm2niix on the mounted series, cold, vs bulk download + dcm2niix locally;
 (d) warm reads: re-read through the mount (page cache), first read from the
     disk cache (page cache dropped), and the same files on local disk; a Python FUSE
     passthrough's re-reads (the floor of a Python mount), the round trip of a request
     libfuse answers without Python (an ioctl), and a re-read taken apart per file (open,
     ioctl, reads, close), on the mount, with reader and daemon on one CPU, and locally;
 (e) `ls -lR` and `find` of the 50-patient collection, cold and warm;
and, in the `random` and `random32` profiles, training data loaders: 24 series of 40 x 128 KiB,
50 ms per request, one 100 Mbit/s link; an index walk of the mount, then 8 (32) worker
processes opening 40 random instances each, against the same plan done by workers calling
getSingleImage directly: time, and archive bytes per byte read;
in the `walk` profile, a first walk of wide collections: a cold `find COLLECTION -name '*.dcm'`
on a fresh mount over 2,500 and 5,000 patients (one study, one series, one instance each), 20 ms
per request, against its floor ((series / WALK_CONNECTIONS + 3) round trips: every series costs
one getSOPInstanceUIDs), the growth from one size to the other, and a warm `find` beside `find`
over the same tree on local disk; and the daemon's peak RSS after `ls -l` of an NLST-wide
collection (26,254 patients);
and once, without shaping:
 (f) the daemon's peak RSS and the cache size after reading 2 GB through a
     500 MB cache with 10,000 series listed (`--spec scale`).

(a), (b) and (c) are measured in `--rounds` rounds (3), the mount and its baseline in turn, each
on a fresh mount: the report gives medians, and the range of the rounds' own ratios. Absolute
times drift on shared machines: read the ratios. Usage:

    .venv/bin/python scripts/bench.py [--skip-scale] [--rounds N]
                                      [--profiles latency,bandwidth,random,random32,walk]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import termios
import time
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbiafs import naming  # noqa: E402
from nbiafs.api.client import ClientConfig, NbiaClient  # noqa: E402
from nbiafs.archive.content import load_synthetic  # noqa: E402
from nbiafs.testing import MountedArchive  # noqa: E402

PROFILES = {"latency": {"latency_s": 0.100, "total_mbit_s": 1000.0},
            "bandwidth": {"latency_s": 0.020, "total_mbit_s": 100.0}}
RANDOM_PROFILES = {"random": 8, "random32": 32}  # worker processes
RANDOM_SPEC = "1x24x1x1x40@256"                   # 24 series of 40 x 128 KiB
RANDOM_SHAPING = {"latency_s": 0.050, "total_mbit_s": 100.0}
RANDOM_OPENS = 40                                 # instances each worker opens
WALK_SIZES = (2500, 5000)                         # patients of the walked collections
NLST_PATIENTS = 26254                             # NLST, the widest collection TCIA serves
WALK_LATENCY_S = 0.020
ROUNDS = 3          # (a), (b), (c): each measured this many times, mount and baseline in turn
TTFB_PER_ROUND = 5  # (b): first bytes of this many instances (each of its own series) per round
READS = 3           # (d): warm re-reads of the series, the median taken
# A worker process: read each path (or, direct, each SeriesUID/SOPUID with getSingleImage) in turn.
WORKER = r"""
import sys, requests
url, direct = sys.argv[1], sys.argv[2] == "direct"
total = 0
with requests.Session() as http:
    for line in sys.stdin.read().splitlines():
        if direct:
            series, sop = line.split("/")
            r = http.get(url + "/services/v4/getSingleImage",
                         params={"SeriesInstanceUID": series, "SOPInstanceUID": sop})
            r.raise_for_status()
            total += len(r.content)
        else:
            with open(line, "rb") as f:
                total += len(f.read())
print(total)
"""
TARGETS = """targets: (a) cold cp -r <= 1.1x (zip + extract + round trip), and >= 5x faster than the loop
         when latency-bound; (b) first byte <= 1.2x one request; (c) <= 1.1x zip + dcm2niix;
         (d) page cache >= 50 % of local disk, disk cache >= 20 % of local disk; (e) warm walk 0 requests,
         cold walk to series level a handful; (f) RSS <= 200 MB, cache <= its limit;
         walk: cold find <= 2x its floor, 5,000 patients <= 2.2x the time of 2,500"""


class Server:
    """`nbiafs serve` in its own process, controlled over its /_nbiafs/ endpoints."""

    def __init__(self, spec: str, *extra: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "nbiafs", "serve", "--spec", spec, "--port", "0", *extra],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            raise SystemExit("the local archive did not start")
        self.admin = self.url.replace("/nbia-api", "/_nbiafs")

    def _post(self, what: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"{self.admin}/{what}", data=json.dumps(body or {}).encode(), method="POST")
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read() or b"{}")

    def shape(self, **faults) -> None:
        self._post("faults", {"clear": True, **faults})

    def reset(self) -> None:
        self._post("counters/reset")

    def requests(self) -> int:
        return self.counters()["total"]

    def counters(self) -> dict:
        with urllib.request.urlopen(f"{self.admin}/counters") as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def timed(fn, label: str | None = None):
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    if label:
        print(f"  {label}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return seconds


def quiet(*cmd, **kw):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_all(files) -> float:
    """Seconds to read every file whole, one after another."""
    def go():
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 20):
                    pass
    return timed(go)


def kernel_round_trip(files, calls: int = 20) -> float:
    """Seconds of one request the FUSE daemon never sees in Python: an ioctl (TCGETS, which
    every Python open() makes to ask whether the file is a terminal) on a mounted file, answered
    ENOSYS by libfuse itself. An open costs at least such a round trip too, so a reader making
    both per file (Python's open, as pydicom does) pays at least two of them per file."""
    total, n = 0.0, 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            start = time.perf_counter()
            for _ in range(calls):
                os.isatty(fd)
            total += time.perf_counter() - start
            n += calls
        finally:
            os.close(fd)
    return total / n


def passthrough_reread(folder: Path, mountpoint: Path) -> float:
    """Seconds to re-read `folder` through scripts/passthrough_fs.py (the floor of a Python
    FUSE mount: its open and release do one system call each), page cache warm."""
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("passthrough_fs.py")), str(folder),
                             str(mountpoint)], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("passthrough_fs.py did not mount")
            time.sleep(0.05)
        files = sorted(mountpoint.iterdir())
        read_all(files)
        return median(read_all(files) for _ in range(READS))
    finally:
        subprocess.run(["fusermount", "-u", str(mountpoint)], capture_output=True)
        proc.wait(timeout=20)


def rel_path(series) -> str:
    return "/".join(naming.escape(p) for p in (series.collection["Collection"], series.patient["PatientID"],
                                               series.study["StudyInstanceUID"], series.uid))


def profile_run(name, server, index, big, smalls, work: Path, dcm2niix, rounds: int) -> dict:
    """One network profile. (a), (b) and (c) are measured `rounds` times, the mount and its
    baseline in turn within each round (a fresh mount each time), so drift on a shared machine
    falls on both; the report gives their medians and ranges."""
    r: dict = {"cp_cold": [], "cp_cold_requests": [], "bulk": [], "ttfb_mount": [], "ttfb_request": [],
               "peek_mount": [], "peek_request": [],
               "dcm2niix_mount": [], "dcm2niix_local": []}
    server.shape(**PROFILES[name])
    rel = rel_path(big)
    sops = sorted(i.sop_uid for i in big.instances)
    client = NbiaClient(ClientConfig(root_url=server.url, api="v4", pool_size=16, verify_md5=False))
    bulk_dir = work / f"{name}-bulk"
    zip_path = work / f"{name}.zip"

    def bulk():  # the bulk download as tcia-utils does it (into an empty folder: `unpacked`)
        client.download_series_zip(big.uid, zip_path, new_file_names=True)
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(bulk_dir)

    def unpacked() -> None:
        """Before a timed bulk download: its folder emptied, outside the time, as a mount's
        cache is; then `settle()`."""
        shutil.rmtree(bulk_dir, ignore_errors=True)
        settle()

    def fresh_mount(tag: str, listed: bool = True) -> MountedArchive:
        """A new mount with an empty cache; `listed`: the series' parents listed (as a user who
        got there)."""
        for leftover in (work / f"{name}-mnt{tag}", work / f"{name}-cache{tag}"):
            shutil.rmtree(leftover, ignore_errors=True)
        m = MountedArchive(server.url, work / f"{name}-mnt{tag}", work / f"{name}-cache{tag}",
                           work / f"{name}{tag}.log")
        if listed:
            os.listdir(m.path(rel).parent)
        return m

    try:
        # The archive's own disk is not what is measured: its copy of the series is read once
        # first, so every timed transfer, the mount's and the baseline's, finds it warm.
        client.download_series_zip(big.uid, zip_path, new_file_names=True)
        # (a) cold cp -r of the series from a fresh mount | the zip download + extraction.
        for k in range(rounds):
            m = fresh_mount("")
            try:
                copy = work / f"{name}-cp"
                shutil.rmtree(copy, ignore_errors=True)
                server.reset()
                settle()
                r["cp_cold"].append(timed(lambda m=m, copy=copy: quiet("cp", "-r", str(m.path(rel)), str(copy)),
                                          f"round {k + 1}: cp -r cold"))
                r["cp_cold_requests"].append(server.requests())
                if k == rounds - 1:  # (d) on the last round's mount and copy
                    r.update(warm_reads(m.path(rel), copy, work / f"{name}-floor", m.proc.pid))
            finally:
                m.stop()
            unpacked()
            r["bulk"].append(timed(bulk, f"round {k + 1}: zip + extract"))
        r["zip_ratio"] = zip_path.stat().st_size / big.total_size
        r["rtt"] = min(timed(lambda: client.get_series_size(big.uid)) for _ in range(3))
        r["loop"] = timed(lambda: [client.get_single_image_bytes(big.uid, s) for s in sops], "loop")
        # (b) the first byte of an uncached instance (a series of its own, listed) | one request.
        m = fresh_mount("-b")
        try:
            for small in smalls[:rounds * TTFB_PER_ROUND]:
                small_sops = sorted(i.sop_uid for i in small.instances)
                os.listdir(m.path(rel_path(small)))
                target = m.path(rel_path(small), naming.instance_file_name(small_sops[0]))

                def first_byte(target=target):
                    with open(target, "rb") as fh:
                        fh.read(1)
                r["ttfb_mount"].append(timed(first_byte))
                r["ttfb_request"].append(timed(functools.partial(client.get_single_image_bytes, small.uid,
                                                                 small_sops[1])))
        finally:
            m.stop()
        # (b) a peek at two files: the series listed, its first file read, then the file in its
        # middle (which the zip started by the first open will bring) | one request for it.
        for k in range(rounds):
            m = fresh_mount("-p")
            try:
                folder = m.path(rel)
                names = sorted(os.listdir(folder))
                (folder / names[0]).read_bytes()
                r["peek_mount"].append(timed(lambda folder=folder, names=names: (
                    folder / names[len(names) // 2]).read_bytes(), f"round {k + 1}: a peek's second file"))
            finally:
                m.stop()
            r["peek_request"].append(timed(functools.partial(client.get_single_image_bytes, big.uid,
                                                             sops[len(sops) // 2 + 1])))
        # (c) dcm2niix: cold on a fresh mount | zip download + extraction + dcm2niix.
        if dcm2niix:
            client.download_series_zip(big.uid, zip_path, new_file_names=True)  # warm again, after (d)
            for k in range(rounds):
                out = work / f"{name}-nii"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                m = fresh_mount("-c")
                settle()
                try:
                    r["dcm2niix_mount"].append(timed(
                        lambda m=m, out=out: quiet(dcm2niix, "-z", "n", "-o", str(out), str(m.path(rel))),
                        f"round {k + 1}: dcm2niix on the mount"))
                finally:
                    m.stop()
                shutil.rmtree(out)
                out.mkdir()
                unpacked()
                r["dcm2niix_local"].append(timed(
                    lambda out=out: (bulk(), quiet(dcm2niix, "-z", "n", "-o", str(out), str(bulk_dir))),
                    f"round {k + 1}: zip + extract + dcm2niix"))
        # (e) the walk of the 50-patient collection.
        m = fresh_mount("-e", listed=False)
        try:
            coll = str(m.path(naming.escape(big.collection["Collection"])))
            for tool, cmd in (("find", ["find", coll, "-maxdepth", "3"]), ("ls -lR", ["ls", "-lR", coll])):
                for state in ("cold", "warm"):
                    server.reset()
                    r[f"{tool} {state}"] = (timed(lambda cmd=cmd: quiet(*cmd), f"{tool} {state}"),
                                            server.requests())
        finally:
            m.stop()
    finally:
        client.close()
    return r


def warm_reads(series: Path, copy: Path, floor_mountpoint: Path, daemon_pid: int) -> dict:
    """(d): the series read whole through the mount whose cache holds it, first from the disk
    cache (page cache dropped), then again (page cache); the same files on local disk, from disk
    and from the page cache; a Python FUSE passthrough's re-reads; a libfuse-only round trip;
    the daemon-side cost of an open: opens and closes of cached files one after another; and a
    re-read taken apart step by step, on the mount (as it runs, then with the reader and every
    thread of the daemon on one CPU) and on local disk."""
    files = sorted(series.iterdir())
    local = sorted(copy.iterdir())
    r: dict = {"files": len(files), "dropped": drop_page_cache()}
    r["disk_cache"] = read_all(files)
    r["page_cache"] = median(read_all(files) for _ in range(READS))
    r["round_trip"] = kernel_round_trip(files)
    r["open_close"] = open_close(files)
    r["steps"] = reread_steps(files)
    with one_cpu(daemon_pid):
        r["steps_one_cpu"] = reread_steps(files)
    drop_page_cache()
    r["local_cold"] = read_all(local)
    r["local"] = median(read_all(local) for _ in range(READS))
    r["local_steps"] = reread_steps(local)
    r["floor"] = passthrough_reread(copy, floor_mountpoint)
    return r


STEPS = ("open", "ioctl", "read", "close")


def reread_steps(files, passes: int = 5) -> dict:
    """Microseconds per file of each step of a re-read as Python's open() makes it: open(2),
    the TCGETS ioctl (is it a terminal?), the reads of the whole file into one buffer, close(2);
    the median over `passes` passes of each step's mean."""
    buf = bytearray(1 << 20)
    clock = time.perf_counter
    passes_us: dict = {step: [] for step in STEPS}
    for _ in range(passes):
        spent = dict.fromkeys(STEPS, 0.0)
        for f in files:
            t0 = clock()
            fd = os.open(f, os.O_RDONLY)
            t1 = clock()
            try:
                fcntl.ioctl(fd, termios.TCGETS, bytes(64))
            except OSError:
                pass  # ENOTTY: a file is no terminal
            t2 = clock()
            while os.readv(fd, [buf]):
                pass
            t3 = clock()
            os.close(fd)
            t4 = clock()
            for step, took in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                spent[step] += took
        for step in STEPS:
            passes_us[step].append(spent[step] / len(files) * 1e6)
    return {step: median(values) for step, values in passes_us.items()}


@contextlib.contextmanager
def one_cpu(pid: int):
    """This process and every thread of process `pid` on one CPU (the first this process may
    run on), then back: a request then wakes the daemon on the reader's own CPU, not another."""
    cpu = min(os.sched_getaffinity(0))
    tids = [0] + [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    before = {}
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {cpu})
    try:
        yield
    finally:
        for tid, cpus in before.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cpus)


def settle() -> None:
    """Before each timed run of (a) and (c): the writes of the run before (a series cached or
    unpacked, 158 MB, and dcm2niix's output) on disk, so that their writeback does not fall
    on the next run (which moved the ratio of (c) by up to a fifth)."""
    os.sync()


def open_close(files, passes: int = 5) -> float:
    """Seconds of one open(2) and close(2) of a file, nothing read (cached files: what an open
    costs the daemon and the kernel, without the bytes)."""
    start = time.perf_counter()
    for _ in range(passes):
        for f in files:
            os.close(os.open(f, os.O_RDONLY))
    return (time.perf_counter() - start) / (passes * len(files))


def median(values) -> float:
    return statistics.median(list(values))


def random_run(workers: int, work: Path, seed: int = 17) -> dict:
    """A data loader's epoch: an index walk, then `workers` processes opening random instances
    (across all series, repeats allowed), against the same plan fetched with getSingleImage."""
    server = Server(RANDOM_SPEC, "--noise-hu", "20", "--versions", "v4")
    try:
        server.shape(**RANDOM_SHAPING)
        m = MountedArchive(server.url, work / "random-mnt", work / "random-cache", work / "random.log")
        try:
            index = sorted(str(p) for p in m.mountpoint.glob("*/*/*/*/*.dcm"))  # the loader's index
            rng = random.Random(seed)
            plan = [[rng.choice(index) for _ in range(RANDOM_OPENS)] for _ in range(workers)]
            server.reset()
            mount_s, mount_read = _run_workers(server.url, plan, direct=False)
            mount_bytes = server.counters()["image_bytes"]
        finally:
            m.stop()
        direct_plan = [["/".join(Path(p).parts[-2:])[:-4] for p in worker] for worker in plan]
        server.reset()
        direct_s, direct_read = _run_workers(server.url, direct_plan, direct=True)
        direct_bytes = server.counters()["image_bytes"]
    finally:
        server.stop()
    return {"workers": workers, "opens": workers * RANDOM_OPENS, "mount_s": mount_s, "direct_s": direct_s,
            "mount_ratio": mount_bytes / mount_read, "direct_ratio": direct_bytes / direct_read}


def _run_workers(url: str, plan: list[list[str]], direct: bool) -> tuple[float, int]:
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, "direct" if direct else "mount"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in plan]
    for proc, items in zip(procs, plan):
        assert proc.stdin is not None
        proc.stdin.write("\n".join(items))
        proc.stdin.close()
    read = 0
    for proc in procs:
        assert proc.stdout is not None
        out = proc.stdout.read()
        if proc.wait() != 0:
            raise SystemExit("a worker failed")
        read += int(out)
    return time.perf_counter() - start, read


def scale_run(work: Path) -> dict:
    """(f): list 10,000 series, read 2.4 GB through a 500 MB cache; peak RSS and cache size."""
    index = load_synthetic("scale")
    server = Server("scale")
    try:
        m = MountedArchive(server.url, work / "scale-mnt", work / "scale-cache", work / "scale.log",
                           "--cache-size", "500M")
        try:
            coll = m.path(naming.escape(index.collections[0]["Collection"]))
            listed = subprocess.run(["find", str(coll), "-mindepth", "3", "-maxdepth", "3", "-type", "d"],
                                    capture_output=True, text=True, check=True).stdout.count("\n")
            bigs = sorted((s for s in index.iter_series(None) if len(s.instances) > 100), key=lambda s: s.uid)
            read = 0
            start = time.perf_counter()
            while read < 2 * 1024 ** 3:
                for series in bigs:
                    files = sorted(m.path(rel_path(series)).iterdir())
                    read_all(files)
                    read += series.total_size
            seconds = time.perf_counter() - start
            status = Path(f"/proc/{m.proc.pid}/status").read_text()
            hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        finally:
            m.stop()
        # After the unmount: stores and evictions finish with it.
        blobs = sum(p.stat().st_size for p in (work / "scale-cache").rglob("*") if p.is_file()
                    and "blobs" in p.parts and not p.name.startswith("cache.db"))
    finally:
        server.stop()
    return {"series_listed": listed, "read_gb": read / 1024 ** 3, "seconds": seconds,
            "rss_mb": hwm / 1024, "cache_mb": blobs / 1024 ** 2}


def main() -> int:
    ap = argparse.ArgumentParser(description="nbiafs benchmarks; see the module docstring")
    ap.add_argument("--profiles", default="latency,bandwidth")
    ap.add_argument("--skip-scale", action="store_true", help="skip (f), which generates 600 MB once")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of (a), (b) and (c) (default %(default)s)")
    args = ap.parse_args()
    asked = [p for p in args.profiles.split(",") if p]
    unknown = [p for p in asked if p not in PROFILES and p not in RANDOM_PROFILES and p != "walk"]
    if unknown:
        raise SystemExit(f"unknown profile {unknown[0]!r}: use {', '.join([*PROFILES, *RANDOM_PROFILES, 'walk'])}")
    names = [p for p in asked if p in PROFILES]
    randoms = {}
    for name in (p for p in asked if p in RANDOM_PROFILES):
        with tempfile.TemporaryDirectory(prefix=f"nbiafs-bench-{name}-") as work:
            print(f"profile {name}...", file=sys.stderr, flush=True)
            randoms[name] = random_run(RANDOM_PROFILES[name], Path(work))
    walks = []
    if "walk" in asked:
        for patients in WALK_SIZES:
            with tempfile.TemporaryDirectory(prefix="nbiafs-bench-walk-") as work:
                print(f"profile walk, {patients} patients...", file=sys.stderr, flush=True)
                walks.append(walk_run(patients, Path(work)))
        with tempfile.TemporaryDirectory(prefix="nbiafs-bench-wide-") as work:
            print(f"profile walk, ls -l of {NLST_PATIENTS} patients...", file=sys.stderr, flush=True)
            wide = wide_listing_run(NLST_PATIENTS, Path(work))
    else:
        wide = None
    if not names:
        report_random(randoms)
        report_walk(walks, wide)
        return 0
    print("preparing the bench archive (generated once)...", file=sys.stderr, flush=True)
    index = load_synthetic("bench")
    big = max(index.iter_series(None), key=lambda s: len(s.instances))
    smalls = sorted((s for s in index.iter_series(None) if s.uid != big.uid), key=lambda s: s.uid)
    dcm2niix = shutil.which("dcm2niix")
    results = {}
    server = Server("bench")
    try:
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f"nbiafs-bench-{name}-") as work:
                print(f"profile {name}...", file=sys.stderr, flush=True)
                results[name] = profile_run(name, server, index, big, smalls, Path(work), dcm2niix, args.rounds)
    finally:
        server.stop()
    scale = None
    if not args.skip_scale:
        with tempfile.TemporaryDirectory(prefix="nbiafs-bench-scale-") as work:
            print("scale run (f)...", file=sys.stderr, flush=True)
            scale = scale_run(Path(work))
    report(results, names, big, scale, args.rounds)
    report_random(randoms)
    report_walk(walks, wide)
    return 0


def walk_run(patients: int, work: Path) -> dict:
    """A cold `find` of a collection of `patients` patients (one instance each) on a fresh mount,
    then a warm one on the same mount, and `find` over the same tree on local disk."""
    from nbiafs.catalog import WALK_CONNECTIONS
    server = Server(f"1x{patients}x1x1x1@16", "--versions", "v4")
    try:
        server.shape(latency_s=WALK_LATENCY_S)
        m = MountedArchive(server.url, work / "walk-mnt", work / "walk-cache", work / "walk.log")
        try:
            coll = next(p for p in m.mountpoint.iterdir())
            server.reset()

            def find(root: Path) -> int:
                out = subprocess.run(["find", str(root), "-name", "*.dcm"], capture_output=True, text=True,
                                     check=True).stdout
                return out.count("\n")
            start = time.perf_counter()
            files = find(coll)
            cold = time.perf_counter() - start
            counts = server.counters()
            start = time.perf_counter()
            again = find(coll)
            warm = time.perf_counter() - start
            warm_requests = server.requests() - counts["total"]
            status = Path(f"/proc/{m.proc.pid}/status").read_text()
            hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
            local = work / "local"
            for path in (p.relative_to(m.mountpoint) for p in coll.glob("*/*/*/*.dcm")):
                (local / path).parent.mkdir(parents=True, exist_ok=True)
                (local / path).touch()
            find(local / coll.name)  # its dentries cached, as the mount's are
            start = time.perf_counter()
            find(local / coll.name)
            local_s = time.perf_counter() - start
        finally:
            m.stop()
    finally:
        server.stop()
    if files != patients or again != patients:
        raise SystemExit(f"walk of {patients} patients found {files} then {again} files")
    floor = (-(-patients // WALK_CONNECTIONS) + 3) * WALK_LATENCY_S
    return {"patients": patients, "cold": cold, "requests": counts["total"], "floor": floor,
            "max_in_flight": counts.get("max_in_flight", 0), "warm": warm, "warm_requests": warm_requests,
            "local": local_s, "rss_mb": hwm / 1024}


def wide_listing_run(patients: int, work: Path) -> dict:
    """`ls -l` of a collection of `patients` patients on a fresh mount: the daemon's peak RSS."""
    server = Server(f"1x{patients}x1x1x1@16", "--versions", "v4")
    try:
        m = MountedArchive(server.url, work / "wide-mnt", work / "wide-cache", work / "wide.log")
        try:
            coll = next(p for p in m.mountpoint.iterdir())
            start = time.perf_counter()
            lines = subprocess.run(["ls", "-l", str(coll)], capture_output=True, text=True,
                                   check=True).stdout.count("\n")
            seconds = time.perf_counter() - start
            status = Path(f"/proc/{m.proc.pid}/status").read_text()
            hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        finally:
            m.stop()
    finally:
        server.stop()
    if lines != patients + 1:  # and the "total" line
        raise SystemExit(f"ls -l of {patients} patients gave {lines - 1} lines")
    return {"patients": patients, "seconds": seconds, "rss_mb": hwm / 1024}


def report_walk(walks: list[dict], wide: dict | None = None) -> None:
    if not walks:
        return
    print(f"\nfirst walk: cold `find COLLECTION -name '*.dcm'` on a fresh mount, {WALK_LATENCY_S * 1000:g} ms "
          f"per request; floor = (series / connections + 3) round trips")
    print(f"{'patients':>9}{'cold s':>8}{'requests':>10}{'at once':>9}{'floor s':>9}{'cold/floor':>12}"
          f"{'warm s':>8}{'(requests)':>11}{'local s':>9}{'warm/local':>12}{'RSS MB':>8}")
    for w in walks:
        print(f"{w['patients']:>9}{w['cold']:>8.2f}{w['requests']:>10}{w['max_in_flight']:>9}{w['floor']:>9.2f}"
              f"{w['cold'] / w['floor']:>11.2f}x{w['warm']:>8.2f}{'(' + str(w['warm_requests']) + ')':>11}"
              f"{w['local']:>9.3f}{w['warm'] / w['local']:>11.1f}x{w['rss_mb']:>8.0f}")
    if len(walks) > 1:
        print(f"growth: {walks[-1]['patients'] / walks[0]['patients']:.1f}x the patients took "
              f"{walks[-1]['cold'] / walks[0]['cold']:.2f}x the time")
    if wide:
        print(f"ls -l of {wide['patients']:,} patients (cold, unshaped): {wide['seconds']:.2f} s, "
              f"daemon peak RSS {wide['rss_mb']:.0f} MB (target <= 200 MB)")


def report_random(randoms: dict) -> None:
    if not randoms:
        return
    print(f"\nrandom access: {RANDOM_SPEC} (24 series of 40 x 128 KiB), "
          f"{RANDOM_SHAPING['latency_s'] * 1000:g} ms, {RANDOM_SHAPING['total_mbit_s']:g} Mbit/s shared; "
          f"an index walk, then workers opening {RANDOM_OPENS} random instances each")
    print(f"{'':10}{'workers':>8}{'mount s':>9}{'direct s':>10}{'mount/direct':>14}"
          f"{'archive bytes / bytes read: mount':>36}{'direct':>8}")
    for name, r in randoms.items():
        print(f"{name:10}{r['workers']:>8}{r['mount_s']:>9.2f}{r['direct_s']:>10.2f}"
              f"{r['mount_s'] / r['direct_s']:>13.2f}x{r['mount_ratio']:>35.2f}x{r['direct_ratio']:>7.2f}x")


def ceiling(r: dict) -> float:
    """The most any FUSE mount could reach of local re-reads with this reader: a local file's
    time against the same plus the two round trips (open, ioctl) the kernel sends per file."""
    local = r["local"] / r["files"]
    return local / (local + 2 * r["round_trip"])


def steps(us: dict) -> str:
    return "+".join(f"{us[step]:.0f}" for step in STEPS) + f"={sum(us.values()):.0f}"


def report(results, names, big, scale, rounds: int) -> None:
    col = 26
    mb = big.total_size / 1e6
    print(f"\nseries: {len(big.instances)} instances, {mb:.0f} MB "
          f"(zip {results[names[0]]['zip_ratio']:.0%} of raw); (a), (b), (c): median (range) of {rounds} rounds, "
          f"mount and baseline in turn")
    print(f"{'':44}" + "".join(f"{n + '-bound':>{col}}" for n in names))
    shaping = {n: "%g ms, %g Mbit/s" % (PROFILES[n]["latency_s"] * 1000, PROFILES[n]["total_mbit_s"]) for n in names}
    print(f"{'':44}" + "".join(f"{shaping[n]:>{col}}" for n in names))

    def row(label, fn):
        print(f"{label:44}" + "".join(f"{fn(results[n]):>{col}}" for n in names))

    def spread(values, fmt="{:.2f}"):
        return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    def per_round(r, key, base, extra=0.0, per=1):
        """The ratio of `key` to `base` (+ `extra`) in each round (`per` samples a round)."""
        a, b = r[key], r[base]
        return [median(a[i:i + per]) / (median(b[i:i + per]) + extra) for i in range(0, len(a), per)]

    def ratio(r, key, base, extra=0.0, per=1):
        each = per_round(r, key, base, extra, per)
        return f"{median(r[key]) / (median(r[base]) + extra):.2f}x ({min(each):.2f}-{max(each):.2f})"
    row("(a) cp -r from the mount, cold  s", lambda r: spread(r["cp_cold"]))
    row("    requests it made", lambda r: "/".join(str(n) for n in sorted(set(r["cp_cold_requests"]))))
    row("    getImage zip + extract  s", lambda r: spread(r["bulk"]))
    row("    one metadata round trip  s", lambda r: f"{r['rtt']:.3f}")
    row("    getSingleImage loop  s", lambda r: f"{r['loop']:.2f}")
    row("    mount / (zip + round trip)", lambda r: ratio(r, "cp_cold", "bulk", r["rtt"]))
    row("    loop / mount", lambda r: f"{r['loop'] / median(r['cp_cold']):.1f}x faster")
    row("(b) first byte through the mount  ms", lambda r: spread([t * 1000 for t in r["ttfb_mount"]], "{:.1f}"))
    row("    one getSingleImage request  ms", lambda r: spread([t * 1000 for t in r["ttfb_request"]], "{:.1f}"))
    row("    mount / request", lambda r: ratio(r, "ttfb_mount", "ttfb_request", per=TTFB_PER_ROUND))
    row("(b) a peek's second file (middle)  s", lambda r: spread(r["peek_mount"]))
    row("    one getSingleImage request  s", lambda r: spread(r["peek_request"]))
    row("    mount / request", lambda r: ratio(r, "peek_mount", "peek_request"))
    if results[names[0]]["dcm2niix_mount"]:
        row("(c) dcm2niix on the mount, cold  s", lambda r: spread(r["dcm2niix_mount"]))
        row("    zip + extract + dcm2niix  s", lambda r: spread(r["dcm2niix_local"]))
        row("    mount / local", lambda r: ratio(r, "dcm2niix_mount", "dcm2niix_local"))
    row("(d) re-read via page cache  files/s", lambda r: f"{r['files'] / r['page_cache']:.0f}")
    row("    local files, page cache  files/s", lambda r: f"{r['files'] / r['local']:.0f}")
    row("    Python FUSE floor (passthrough)  files/s", lambda r: f"{r['files'] / r['floor']:.0f}")
    row("    mount / local", lambda r: f"{r['local'] / r['page_cache']:.0%}")
    row("    floor / local", lambda r: f"{r['local'] / r['floor']:.0%}")
    row("    mount / floor", lambda r: f"{r['floor'] / r['page_cache']:.0%}")
    row("    a round trip libfuse answers (ioctl)  us", lambda r: f"{r['round_trip'] * 1e6:.0f}")
    row("    ceiling, 2 round trips per file / local", lambda r: f"{ceiling(r):.0%}")
    row("    an open + close of a cached file  us", lambda r: f"{r['open_close'] * 1e6:.0f}")
    row("    that, twice the round trip / local file", lambda r: f"{r['open_close'] / r['round_trip']:.1f}x; "
        f"{r['open_close'] / (r['local'] / r['files']):.0%}")
    row("    per file, open+ioctl+read+close  us", lambda r: steps(r["steps"]))
    row("    the same, reader+daemon on one CPU  us", lambda r: steps(r["steps_one_cpu"]))
    row("    the same, local files  us", lambda r: steps(r["local_steps"]))
    row("(d) first read, disk cache  files/s", lambda r: f"{r['files'] / r['disk_cache']:.0f}"
        + ("" if r["dropped"] else " (pages not dropped)"))
    row("    local files, pages dropped  files/s", lambda r: f"{r['files'] / r['local_cold']:.0f}")
    row("    mount / local (both from disk)", lambda r: f"{r['local_cold'] / r['disk_cache']:.0%}")
    row("    mount / local page cache", lambda r: f"{r['local'] / r['disk_cache']:.0%}")
    row("    local from disk / local page cache", lambda r: f"{r['local'] / r['local_cold']:.0%}")
    for key in ("find cold", "find warm", "ls -lR cold", "ls -lR warm"):
        row(f"(e) {key} of 50 patients  s (requests)", lambda r, k=key: f"{r[k][0]:.2f} ({r[k][1]})")
    if scale:
        print(f"(f) {scale['series_listed']} series listed; read {scale['read_gb']:.2f} GB through a 500 MB "
              f"cache in {scale['seconds']:.0f} s: daemon peak RSS {scale['rss_mb']:.0f} MB, "
              f"cache {scale['cache_mb']:.0f} MB")
    print(TARGETS)


if __name__ == "__main__":
    raise SystemExit(main())
