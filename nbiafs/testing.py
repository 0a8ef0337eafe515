"""Real mounts for tests and benchmarks: `nbiafs mount -f` in a subprocess, ready when mounted."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT_S = 30.0


class MountedArchive:
    """A running `nbiafs mount` daemon; `stop()` unmounts and returns its log."""

    def __init__(self, url: str, mountpoint: Path, cache_dir: Path, log_path: Path, *extra: str,
                 env: dict | None = None):
        self.url, self.mountpoint, self.cache_dir, self.log_path = url, mountpoint, cache_dir, log_path
        mountpoint.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        cmd = [sys.executable, "-m", "nbiafs", "mount", str(mountpoint), "--url", url,
               "--cache-dir", str(cache_dir), "--foreground", "--log-level", "INFO", *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not os.path.ismount(mountpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbiafs mount exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nbiafs mount not ready after {READY_TIMEOUT_S} s:\n{self.log()}")
            time.sleep(0.05)

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        if self._log.closed:
            return self.log()
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount", "-u", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["fusermount", "-uz", str(self.mountpoint)], capture_output=True)
        self._log.close()
        return self.log()
