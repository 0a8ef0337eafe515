from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from nbiafs.testing import MountedArchive
from nbiafs import naming

pytest_plugins = ["nbiafs.archive.pytest_plugin"]


def series_path(series) -> str:
    """The mount-relative path of an archive `Series` (from the local archive's index)."""
    return "/".join(naming.escape(p) for p in (series.collection["Collection"], series.patient["PatientID"],
                                               series.study["StudyInstanceUID"], series.uid))


def public_series(archive):
    return [s for s in archive.index.iter_series("nbia_guest")]


def checked_mount(url: str, base):
    """For module fixtures (`yield from`): a mount under `base`, unmounted at teardown, which
    fails the module if the daemon logged a traceback."""
    m = MountedArchive(url, base / "mnt", base / "cache", base / "daemon.log")
    yield m
    log = m.stop()
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture(scope="module")
def mounted(nbia_archive_server, tmp_path_factory):
    """One mount of the session's archive for a test module."""
    yield from checked_mount(nbia_archive_server.url, tmp_path_factory.mktemp("mount"))


@pytest.fixture
def mount_factory(tmp_path):
    """Start extra mounts (fresh cache unless given); all unmounted after the test, logs checked."""
    started = []

    def start(url, name="m", cache_dir=None, extra=(), env=None) -> MountedArchive:
        m = MountedArchive(url, tmp_path / f"{name}-mnt", cache_dir or tmp_path / f"{name}-cache",
                           tmp_path / f"{name}.log", *extra, env=env)
        started.append(m)
        return m

    yield start
    logs = [m.stop() for m in started]
    for log in logs:
        assert "Traceback" not in log, log[-4000:]


def start_demo(mnt, archive_data, *args, env=None, **popen) -> subprocess.Popen:
    """`nbiafs demo MNT ARGS…`, returned once mounted (its archive is generated on first use)."""
    proc = subprocess.Popen([sys.executable, "-m", "nbiafs", "demo", str(mnt), *args],
                            env={**os.environ, "NBIAFS_ARCHIVE_DATA": str(archive_data), **(env or {})},
                            stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.monotonic() + 300
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"nbiafs demo did not mount: {proc.communicate()[1]}")
        time.sleep(0.1)
    return proc


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is installed by scripts/setup.sh"
    return path
