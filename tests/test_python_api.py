"""`nbiafs.mounted()`, the Python API for notebooks: mounts in the background, reads through the
kernel, leaves nothing mounted on exit, at interpreter exit, or when its interpreter is killed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time

import pydicom
import pytest
import SimpleITK as sitk
from conftest import public_series, series_path

import nbiafs
from nbiafs import naming


def mounts_under(path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(path))]


def test_mounted_reads_through_the_kernel_and_leaves_nothing_mounted(nbia_archive, tmp_path):
    s = max(public_series(nbia_archive), key=lambda s: len(s.instances))
    mnt = tmp_path / "notebook" / "tcia"  # created, and removed again
    with nbiafs.mounted(mnt, url=nbia_archive.url, cache_dir=tmp_path / "cache", names="uid",
                        collection=[s.collection["Collection"]]) as root:
        assert root == mnt and os.path.ismount(root)
        first = min(s.instances, key=lambda i: i.sop_uid)
        data = (root / series_path(s) / naming.instance_file_name(first.sop_uid)).read_bytes()
        assert hashlib.md5(data).hexdigest() == first.md5
        first = first.sop_uid
        assert pydicom.dcmread(root / series_path(s) / naming.instance_file_name(first)).SOPInstanceUID == first
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(root / series_path(s)))
        assert sitk.ReadImage(files).GetSize()[2] == len(s.instances)
        assert [p.name for p in root.iterdir()] == [naming.escape(s.collection["Collection"])]
    assert not mounts_under(tmp_path) and not mnt.exists()


def test_non_context_form_and_status(nbia_archive, tmp_path):
    m = nbiafs.mounted(tmp_path / "mnt", url=nbia_archive.url, cache_dir=str(tmp_path / "cache"), previews=True)
    try:
        assert m.mounted and "nbia_guest" in m.status() and nbia_archive.url in m.status()
        assert "mounted" in repr(m)
    finally:
        m.unmount()
    assert not m.mounted and not m.alive() and not mounts_under(tmp_path)
    m.unmount()  # twice is harmless


def test_failures_are_one_line_exceptions(nbia_archive, tmp_path):
    with pytest.raises(TypeError, match="unknown nbiafs mount option 'cache'"):
        nbiafs.mounted(tmp_path / "a", url=nbia_archive.url, cache="x")
    with pytest.raises(TypeError, match="previews= is a flag"):
        nbiafs.mounted(tmp_path / "a", url=nbia_archive.url, previews="yes")
    with pytest.raises(nbiafs.MountFailed, match="invalid choice: 'pretty'"):
        nbiafs.mounted(tmp_path / "b", url=nbia_archive.url, names="pretty", cache_dir=tmp_path / "c")
    closed = f"http://127.0.0.1:{_free_port()}/nbia-api"
    with pytest.raises(nbiafs.MountFailed) as caught:
        nbiafs.mounted(tmp_path / "c", url=closed, cache_dir=tmp_path / "c")
    message = str(caught.value)
    assert "cannot reach the archive" in message and "\n" not in message and "Traceback" not in message
    assert not mounts_under(tmp_path) and not (tmp_path / "b").exists() and not (tmp_path / "c" / "mnt").exists()


def test_password_goes_through_the_environment_not_argv(nbia_archive_factory, tmp_path):
    archive = nbia_archive_factory(users={"alice": "s3cret-pw"})
    m = nbiafs.mounted(tmp_path / "mnt", url=archive.url, cache_dir=tmp_path / "cache", user="alice",
                       password="s3cret-pw", log_level="INFO")
    with m as root:
        assert "alice" in m.status()
        argv = open(f"/proc/{m.proc.pid}/cmdline", "rb").read().split(b"\0")
        assert str(root).encode() in argv and not any(b"s3cret" in a for a in argv)
        assert "alice" in m.log() and "s3cret" not in m.log()
    with pytest.raises(TypeError, match="password= needs user="):
        nbiafs.mounted(tmp_path / "mnt", url=archive.url, password="x")


@pytest.mark.parametrize("ending", ["exit", "killed"])
def test_the_mount_ends_with_its_interpreter(nbia_archive, tmp_path, ending):
    mnt = tmp_path / "mnt"
    script = textwrap.dedent(f"""
        import os, sys, nbiafs
        m = nbiafs.mounted({str(mnt)!r}, url={nbia_archive.url!r}, cache_dir={str(tmp_path / 'cache')!r})
        print(m.proc.pid, flush=True)
        {'os._exit(0)' if ending == 'killed' else 'sys.exit(0)'}
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    daemon = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while (mounts_under(tmp_path) or _running(daemon)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not mounts_under(tmp_path) and not _running(daemon)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
