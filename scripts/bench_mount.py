#!/usr/bin/env python3
"""Benchmark the mount against the ways users fetch a series today, in one run, side by side.

Starts the local archive (one series of N instances) with injected latency and
bandwidth, mounts it with a fresh cache, and measures:
- `ls -l` of the series, cold and warm: time, requests, downloads (must be zero);
- `cp -r` of the series from the mount, cold (empty cache) and warm (disk cache,
  then page cache);
- the same series as one getImage zip plus extraction (what tcia-utils does);
- a loop of getSingleImage requests, one after another;
- one metadata request's round trip.
Absolute times drift on shared machines; read the ratios.

    .venv/bin/python scripts/bench_mount.py [--instances 1000] [--matrix 128]
        [--latency-ms 20] [--mbit 200]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbiafs import naming  # noqa: E402
from nbiafs.api.client import ClientConfig, NbiaClient  # noqa: E402
from nbiafs.archive.content import load_synthetic  # noqa: E402
from nbiafs.archive.faults import Faults  # noqa: E402
from nbiafs.archive.server import LocalArchive  # noqa: E402
from nbiafs.archive.spec import parse_spec  # noqa: E402
from nbiafs.testing import MountedArchive  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def sh(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def drop_page_cache():
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--matrix", type=int, default=128)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--mbit", type=float, default=200.0, help="total bandwidth cap (Mbit/s)")
    args = ap.parse_args()

    spec = parse_spec(f"1x1x1x1x{args.instances}@{args.matrix}")
    print(f"preparing archive: 1 series x {args.instances} instances, {args.matrix}x{args.matrix}",
          file=sys.stderr)
    archive = LocalArchive(load_synthetic(spec)).start()
    series = next(archive.index.iter_series("nbia_guest"))
    total_mb = series.total_size / 1e6
    archive.set_faults(**vars(Faults(latency_s=args.latency_ms / 1000, total_mbit_s=args.mbit)))
    rel = "/".join(naming.escape(p) for p in (series.collection["Collection"], series.patient["PatientID"],
                                               series.study["StudyInstanceUID"], series.uid))
    rows = []
    with tempfile.TemporaryDirectory(prefix="nbiafs-bench-") as name:
        tmp = Path(name)
        m = MountedArchive(archive.url, tmp / "mnt", tmp / "cache", tmp / "daemon.log")
        try:
            folder = m.path(rel)

            def measure(label, fn):
                archive.reset_counters()
                seconds, _ = timed(fn)
                counts = archive.counters()["endpoints"]
                rows.append((label, seconds, counts.get("getSingleImage", 0),
                             sum(counts.values())))
                return seconds

            measure("ls -l series (cold)", lambda: sh("ls", "-l", str(folder)))
            measure("ls -l series (warm)", lambda: sh("ls", "-l", str(folder)))
            cold = measure("cp -r from mount (cold)", lambda: sh("cp", "-r", str(folder), str(tmp / "c1")))
            disk = None
            if drop_page_cache():
                disk = measure("cp -r from mount (disk cache)",
                               lambda: sh("cp", "-r", str(folder), str(tmp / "c2")))
            page = measure("cp -r from mount (page cache)",
                           lambda: sh("cp", "-r", str(folder), str(tmp / "c3")))
        finally:
            log = m.stop()
            if "Traceback" in log:
                print(log[-3000:], file=sys.stderr)

        client = NbiaClient(ClientConfig(root_url=archive.url, api="v4", verify_md5=False))

        def bulk():
            client.download_series_zip(series.uid, tmp / "s.zip", new_file_names=True)
            with zipfile.ZipFile(tmp / "s.zip") as zf:
                zf.extractall(tmp / "bulk")

        archive.reset_counters()
        bulk_s, _ = timed(bulk)
        rows.append(("getImage zip + extract", bulk_s, 0, archive.counters()["total"]))
        rtt_s, _ = timed(lambda: client.get_series_size(series.uid))
        rows.append(("one metadata round trip", rtt_s, 0, 1))
        sops = sorted(i.sop_uid for i in series.instances)
        archive.reset_counters()
        loop_s, _ = timed(lambda: [client.get_single_image_bytes(series.uid, s) for s in sops])
        rows.append(("getSingleImage loop", loop_s, len(sops), archive.counters()["total"]))
        client.close()
    archive.stop()

    print(f"\nseries: {args.instances} instances, {total_mb:.1f} MB; network: "
          f"{args.latency_ms:g} ms per request, {args.mbit:g} Mbit/s")
    print(f"{'operation':34} {'seconds':>9} {'files/s':>9} {'downloads':>10} {'requests':>9}")
    for label, seconds, downloads, requests in rows:
        rate = args.instances / seconds if "cp" in label or "loop" in label or "zip" in label else 0
        print(f"{label:34} {seconds:9.3f} {rate:9.0f} {downloads:10d} {requests:9d}")
    print("\nratios (lower is better for the mount):")
    print(f"  cold cp -r / (zip + extract + one round trip) = {cold / (bulk_s + rtt_s):.2f}")
    print(f"  cold cp -r / getSingleImage loop             = {cold / loop_s:.2f}")
    if disk is not None:
        print(f"  warm cp -r from disk cache: {args.instances / disk:.0f} files/s")
    print(f"  warm cp -r from page cache: {args.instances / page:.0f} files/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
