#!/usr/bin/env python3
"""Benchmark a cluster of three mounts reading the same collection, with and without the
shared tier (`--shared-cache`), in one run, side by side.

The local archive (6 series of 60 noisy 512x512 CT slices, ~190 MB) answers with injected
latency and one shared link for all nodes, as TCIA is to a cluster; the tier is a real
SeaweedFS on loopback, as an in-cluster object store is. Each node is a mount with its own
fresh cache, reading with `cp -r` series by series. Three workloads:
- one after another: node 1 reads the collection, then node 2, then node 3;
- at once: the three read the whole collection at the same time;
- sharded epochs: as a DistributedSampler does, each node reads its third of the series
  (all at once), then each reads the next node's third (epoch 2).
Printed: wall time and archive bytes (image answers: single images and zips) for each, without
and with the tier, and their ratios. Absolute times drift on shared machines; read the ratios.

    .venv/bin/python scripts/bench_cluster.py [--latency-ms 50] [--mbit 100]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbiafs.archive.objectstore import LocalObjectStore  # noqa: E402
from nbiafs.testing import MountedArchive  # noqa: E402

SPEC = "1x6x1x1x60@512"
NODES = 3


class Archive:
    """`nbiafs serve` in its own process, shaped and counted over its /_nbiafs/ endpoints."""

    def __init__(self, latency_ms: float, mbit: float):
        self.proc = subprocess.Popen([sys.executable, "-m", "nbiafs", "serve", "--spec", SPEC, "--noise-hu", "20",
                                      "--port", "0", "--versions", "v4", "--latency-ms", str(latency_ms),
                                      "--total-mbit", str(mbit)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            raise SystemExit("the local archive did not start")
        self.admin = self.url.replace("/nbia-api", "/_nbiafs")

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.admin}/counters/reset", data=b"{}", method="POST")
        urllib.request.urlopen(req).close()

    def image_bytes(self) -> int:
        with urllib.request.urlopen(f"{self.admin}/counters") as r:
            return json.loads(r.read())["image_bytes"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def copy_series(node: MountedArchive, folders: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for i, folder in enumerate(folders):
        subprocess.run(["cp", "-r", str(node.mountpoint / folder), str(dest / f"{i}")], check=True)


def series_folders(node: MountedArchive) -> list[str]:
    out = []
    for path in sorted(node.mountpoint.glob("*/*/*/*")):
        out.append(str(path.relative_to(node.mountpoint)))
    return out


def run_workload(name: str, archive: Archive, store: LocalObjectStore | None, work: Path) -> tuple[float, int]:
    run = work / f"{name}-{'tier' if store else 'plain'}-{uuid.uuid4().hex[:6]}"
    env = store.environment() if store else None
    extra = ("--shared-cache", f"s3://{store.bucket}/{run.name}") if store else ()
    nodes = [MountedArchive(archive.url, run / f"mnt{n}", run / f"cache{n}", run / f"node{n}.log", *extra, env=env)
             for n in range(NODES)]
    try:
        folders = series_folders(nodes[0])
        for n in range(NODES):
            (run / f"out{n}").mkdir()
        archive.reset()
        started = time.perf_counter()
        if name == "one after another":
            for n, node in enumerate(nodes):
                copy_series(node, folders, run / f"out{n}")
                if store:  # the next node starts once this one's puts are in
                    wait_puts(node)
        elif name == "at once":
            with concurrent.futures.ThreadPoolExecutor(NODES) as pool:
                list(pool.map(lambda n: copy_series(nodes[n], folders, run / f"out{n}"), range(NODES)))
        else:  # sharded epochs
            shards = [folders[n::NODES] for n in range(NODES)]
            for epoch in range(2):
                with concurrent.futures.ThreadPoolExecutor(NODES) as pool:
                    list(pool.map(lambda n, e=epoch: copy_series(nodes[n], shards[(n + e) % NODES],
                                                                 run / f"out{n}" / f"e{e}"), range(NODES)))
                if store:
                    for node in nodes:
                        wait_puts(node)
        seconds = time.perf_counter() - started
        return seconds, archive.image_bytes()
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(run, ignore_errors=True)


def wait_puts(node: MountedArchive, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = (node.mountpoint / ".nbiafs" / "status").read_text()
        if " (0 queued," in status and " 0 in flight, 0 queued" in status:
            return
        time.sleep(0.05)
    raise SystemExit(f"puts did not finish: {status}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--mbit", type=float, default=100.0, help="the archive's link, shared by all nodes")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nbiafs-bench-cluster-"))
    archive = Archive(args.latency_ms, args.mbit)
    store = LocalObjectStore(work / "weed").start()
    rows = []
    try:
        for name in ("one after another", "at once", "sharded epochs"):
            plain = run_workload(name, archive, None, work)
            tier = run_workload(name, archive, store, work)
            rows.append((name, plain, tier))
            print(f"  {name}: {plain[0]:.1f} s / {tier[0]:.1f} s", file=sys.stderr, flush=True)
    finally:
        store.stop()
        archive.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n3 mounts, each with its own cache, reading {SPEC} (6 series of 60 x 0.5 MiB); archive "
          f"{args.latency_ms:g} ms per request, {args.mbit:g} Mbit/s shared; tier: SeaweedFS on loopback")
    print(f"{'workload':<20} {'archive MB':>22} {'wall time (s)':>22}")
    print(f"{'':<20} {'no tier':>7} {'tier':>6} {'ratio':>7} {'no tier':>8} {'tier':>6} {'ratio':>6}")
    for name, (p_s, p_b), (t_s, t_b) in rows:
        print(f"{name:<20} {p_b / 1e6:7.1f} {t_b / 1e6:6.1f} {t_b / max(p_b, 1):6.2f}x "
              f"{p_s:8.1f} {t_s:6.1f} {t_s / p_s:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
