"""Real mounts for tests and benchmarks: `nbiafs mount -f` in a subprocess, ready when mounted."""

from __future__ import annotations

from pathlib import Path

from nbiafs.background import Mounted

READY_TIMEOUT_S = 30.0


class MountedArchive(Mounted):
    """A running `nbiafs mount` of `url` with its cache in `cache_dir`, logging at INFO to
    `log_path` (kept); `stop()` unmounts and returns that log."""

    def __init__(self, url: str, mountpoint: Path, cache_dir: Path, log_path: Path, *extra: str,
                 env: dict | None = None):
        self.url, self.mountpoint, self.cache_dir = url, mountpoint, cache_dir
        mountpoint.mkdir(parents=True, exist_ok=True)  # the caller's: left in place
        super().__init__(mountpoint, ["--url", url, "--cache-dir", str(cache_dir), "--log-level", "INFO", *extra],
                         env=env, log_path=log_path, ready_timeout=READY_TIMEOUT_S)

    def _failure_line(self) -> str:  # tests want the whole story
        return f"{super()._failure_line()}\n{self.log()}"

    def stop(self, timeout: float = 20.0) -> str:
        self.unmount(timeout)
        return self.log()
