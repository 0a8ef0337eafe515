#!/usr/bin/env python3
"""What API v4's additions cost and save, side by side in one run, against the local archive.

Starts `nbiafs serve --spec bench` (a CT series of 300 instances of about 0.5 MB, and 50 small
series) in its own process and, for the latency-bound (100 ms, 1 Gbit/s) and bandwidth-bound
(20 ms, 100 Mbit/s) profiles, measures with the md5 checks off and on, alternating, `--reps`
times each:

 (m1) getSingleImage one after another (20 instances): with the check, getMD5HashForImage
      is asked at the same time as each image;
 (m2) 8 getSingleImage at once (80 instances), as the series prefetch does;
 (m3) a cold `cp -r` of the 300-instance series from a fresh mount (the zip is held until its
      md5hashes.csv arrives when checking, streamed into the cache without);
and once per profile:
 (b1) resolving the 51 series of a manifest: v4's POST getSeriesMetadata against one
      getSeries per series on v2 (8 at a time): requests and seconds;
 (b2) what `--api auto` costs at mount time: requests and seconds of the version check.

Read the ratios; absolute times drift on shared machines. Usage:

    .venv/bin/python scripts/bench_v4.py [--reps 3] [--profiles latency,bandwidth]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import PROFILES, Server, quiet, rel_path  # noqa: E402

from nbiafs.api.client import ClientConfig, NbiaClient  # noqa: E402
from nbiafs.archive.content import load_synthetic  # noqa: E402
from nbiafs.metastore import MetadataStore  # noqa: E402
from nbiafs.mount import resolve_series  # noqa: E402
from nbiafs.testing import MountedArchive  # noqa: E402


def client(server, verify: bool, api: str = "v4") -> NbiaClient:
    return NbiaClient(ClientConfig(root_url=server.url, api=api, verify_md5=verify)).start()


def singles(server, series, verify: bool, n: int, workers: int) -> float:
    sops = [i.sop_uid for i in series.instances][:n]
    with client(server, verify) as c:
        start = time.perf_counter()
        if workers == 1:
            for sop in sops:
                c.get_single_image_bytes(series.uid, sop)
        else:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda sop: c.get_single_image_bytes(series.uid, sop), sops))
        seconds = time.perf_counter() - start
        if verify:
            assert c.integrity["md5_checked"] == len(sops), c.integrity
    return seconds


def cp_cold(server, series, verify: bool, work: Path, k: int) -> tuple[float, int]:
    extra = () if verify else ("--no-verify-md5",)
    m = MountedArchive(server.url, work / f"mnt{k}", work / f"cache{k}", work / f"log{k}", *extra)
    try:
        folder = m.path(rel_path(series))
        list(folder.parent.iterdir())
        server.reset()
        start = time.perf_counter()
        quiet("cp", "-r", str(folder), str(work / f"copy{k}"))
        seconds = time.perf_counter() - start
        requests = server.requests()
        if verify:
            status = m.path(".nbiafs", "status").read_text()
            assert " from zips)" in status and "0 mismatches" in status, status
    finally:
        m.stop()
    return seconds, requests


def manifest(server, uids, api: str, work: Path) -> tuple[float, int]:
    c = NbiaClient(ClientConfig(root_url=server.url, api=api)).start()
    store = MetadataStore(work / f"meta-{api}", 3600)
    try:
        server.reset()
        start = time.perf_counter()
        found = resolve_series(c, store, uids)
        seconds = time.perf_counter() - start
        assert len(found) == len(uids), (len(found), len(uids))
        return seconds, server.requests()
    finally:
        store.close()
        c.close()


def negotiation(server) -> tuple[float, int]:
    server.reset()
    start = time.perf_counter()
    c = NbiaClient(ClientConfig(root_url=server.url)).connect()
    seconds = time.perf_counter() - start
    assert c.api == "v4" and c.auth is None
    c.close()
    return seconds, server.requests()


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description="the cost of v4's md5 checks and bulk metadata; see the docstring")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profiles", default="latency,bandwidth")
    args = ap.parse_args()
    index = load_synthetic("bench")
    big = max(index.iter_series(None), key=lambda s: len(s.instances))
    uids = [s.uid for s in index.iter_series(None)]
    server = Server("bench")
    rows = []
    try:
        for name in [p for p in args.profiles.split(",") if p]:
            server.shape(**PROFILES[name])
            r: dict = {k: {False: [], True: []} for k in ("m1", "m2", "m3")}
            with tempfile.TemporaryDirectory(prefix="nbiafs-bench-v4-") as work:
                for rep in range(args.reps):
                    for verify in ((False, True) if rep % 2 == 0 else (True, False)):
                        print(f"{name}: rep {rep + 1}, md5 {'on' if verify else 'off'}", file=sys.stderr, flush=True)
                        r["m1"][verify].append(singles(server, big, verify, 20, 1))
                        r["m2"][verify].append(singles(server, big, verify, 80, 8))
                        r["m3"][verify].append(cp_cold(server, big, verify, Path(work), 2 * rep + verify)[0])
                v4_s, v4_n = manifest(server, uids, "v4", Path(work))
                v2_s, v2_n = manifest(server, uids, "v2", Path(work))
            neg_s, neg_n = negotiation(server)
            rows.append((name, r, (v4_s, v4_n, v2_s, v2_n), (neg_s, neg_n)))
    finally:
        server.stop()
    print(f"\nseries: {len(big.instances)} instances, {big.total_size / 1e6:.0f} MB; {args.reps} runs each, "
          "md5 off and on alternating; ranges are min-max over the runs")
    for name, r, (v4_s, v4_n, v2_s, v2_n), (neg_s, neg_n) in rows:
        p = PROFILES[name]
        print(f"\n{name}-bound ({p['latency_s'] * 1000:g} ms, {p['total_mbit_s']:g} Mbit/s)")
        for key, label in (("m1", "(m1) 20 getSingleImage in a row  s"), ("m2", "(m2) 80 getSingleImage, 8 at once  s"),
                           ("m3", "(m3) cp -r of the series, cold  s")):
            off, on = r[key][False], r[key][True]
            ratios = [b / a for a, b in zip(off, on)]
            print(f"  {label:40} off {spread(off):>12}  on {spread(on):>12}  on/off {spread(ratios)}x "
                  f"(median {statistics.median(ratios):.2f}x)")
        print(f"  (b1) manifest of {len(uids)} series: v4 bulk {v4_s:.2f} s, {v4_n} request(s); "
              f"v2 getSeries each {v2_s:.2f} s, {v2_n} requests")
        print(f"  (b2) --api auto version check: {neg_s:.3f} s, {neg_n} request(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
