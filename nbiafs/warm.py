"""`nbiafs prefetch PATH…`: warm a mount's cache for series, studies, patients or collections.

Works through the mount itself: opening an instance makes the daemon fetch it
(and, series by series, the daemon's own prefetch brings the rest as one zip),
so this needs no access to the daemon's internals and works on any nbiafs
mount. Instances already cached (extended attribute `user.nbiafs.cached`) are
skipped, which makes a second run resume where the first stopped.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CACHED_XATTR = "user.nbiafs.cached"


class WarmError(Exception):
    """A path cannot be prefetched; one line for the user."""


@dataclass
class Progress:
    total_files: int
    total_bytes: int
    done_files: int = 0
    done_bytes: int = 0
    cached_files: int = 0
    failures: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def line(self) -> str:
        elapsed = max(1e-6, time.monotonic() - self.started)
        rate = self.done_bytes / elapsed
        left = max(0, self.total_bytes - self.done_bytes)
        eta = f"{left / rate:5.0f} s" if rate > 0 else "    ? s"
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        width = 24
        filled = int(width * pct / 100)
        return (f"[{'#' * filled}{'.' * (width - filled)}] {pct:5.1f}% "
                f"{self.done_bytes / 1e6:8.1f}/{self.total_bytes / 1e6:.1f} MB "
                f"{self.done_files}/{self.total_files} files {rate / 1e6:6.1f} MB/s ETA {eta}")


def is_nbiafs_path(path: Path) -> bool:
    """Whether `path` lies on an nbiafs mount (fuse.nbiafs in /proc/mounts)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        return False
    return fstype == "fuse.nbiafs"


def collect(paths: list[Path]) -> list[tuple[str, int]]:
    """Every instance file below `paths`, in name order (series by series), with its size."""
    files = []
    for path in paths:
        if not path.exists():
            raise WarmError(f"{path}: no such file or directory")
        if not is_nbiafs_path(path):
            raise WarmError(f"{path} is not on an nbiafs mount")
        if path.is_file():
            files.append((str(path), path.stat().st_size))
            continue
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                files.append((full, os.stat(full).st_size))
    return files


def _cached(path: str) -> bool:
    try:
        return os.getxattr(path, CACHED_XATTR) == b"yes"
    except OSError:
        return False


def _fetch(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)  # the daemon downloads the instance before open returns
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def run(paths: list[Path], jobs: int = 4, out=sys.stderr) -> int:
    files = collect(paths)
    progress = Progress(len(files), sum(size for _, size in files))
    interactive = out.isatty()
    todo = []
    for path, size in files:
        if _cached(path):
            progress.done_files += 1
            progress.done_bytes += size
            progress.cached_files += 1
        else:
            todo.append((path, size))
    stop = threading.Event()

    def report():
        while not stop.wait(0.5 if interactive else 10.0):
            with progress.lock:
                line = progress.line()
            out.write(("\r" + line) if interactive else line + "\n")
            out.flush()

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()

    def one(item):
        path, size = item
        try:
            _fetch(path)
        except OSError as exc:
            with progress.lock:
                progress.failures.append((path, exc.strerror or str(exc)))
            return
        with progress.lock:
            progress.done_files += 1
            progress.done_bytes += size

    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
            list(pool.map(one, todo))
    finally:
        stop.set()
        reporter.join()
    out.write(("\r" if interactive else "") + progress.line() + "\n")
    elapsed = time.monotonic() - progress.started
    fetched = progress.done_files - progress.cached_files
    out.write(f"prefetched {fetched} files ({progress.done_bytes / 1e6:.1f} MB in all), "
              f"{progress.cached_files} already cached, {len(progress.failures)} failed, "
              f"in {elapsed:.1f} s\n")
    if progress.failures:
        path, why = progress.failures[0]
        raise WarmError(f"{len(progress.failures)} of {len(files)} files could not be fetched "
                        f"(first: {path}: {why}); run the same command again to retry them")
    return 0
