"""The status view (`MOUNTPOINT/.nbiafs/status`, `nbiafs status`) and `nbiafs cache info|clear`,
through real mounts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import series_path

from nbiafs.archive.tokens import DEFAULT_USERS

pytestmark = pytest.mark.mount
USER, PASSWORD = next(iter(DEFAULT_USERS.items()))


def nbiafs(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbiafs", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


def field(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(name + ":")).split(":", 1)[1].strip()


def test_status_shows_the_mount_without_secrets(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="status", env={"NBIA_USER": USER, "NBIA_PASSWORD": PASSWORD},
                      extra=("--timeout", "2", "--no-prefetch"))
    assert ".nbiafs" not in os.listdir(m.mountpoint)  # reachable by name, never met by a walk
    assert os.listdir(m.path(".nbiafs")) == ["status"]
    s = next(s for s in nbia_archive.index.iter_series(USER) if len(s.instances) > 8)
    folder = m.path(series_path(s))
    names = sorted(os.listdir(folder))
    for name in names[:3]:
        (folder / name).read_bytes()
    (folder / names[0]).read_bytes()
    nbia_archive.set_faults(image_outage=True)
    with pytest.raises(OSError):
        (folder / names[-1]).read_bytes()
    nbia_archive.clear_faults()

    text = subprocess.run(["cat", str(m.path(".nbiafs", "status"))], capture_output=True, text=True,
                          check=True).stdout
    command = nbiafs("status", str(m.mountpoint))
    assert command.returncode == 0 and command.stdout.splitlines()[1:3] == text.splitlines()[1:3]
    assert field(text, "archive") == f"{nbia_archive.url} (API v4, found by asking the archive)"
    assert field(text, "user") == USER  # a named user keeps the token session on v4
    assert field(text, "token").startswith("valid for 1:5")  # a 2 h token, just granted
    assert "files, in " + str(m.cache_dir) in field(text, "cache")
    opens = field(text, "opens")
    assert opens.split()[0] == str(int(opens.split()[0])) and "from the cache" in opens
    assert field(text, "integrity").startswith("3 instances matched the archive's md5 (0 from zips), 0 without")
    assert field(text, "errors").startswith("1 (last:") and names[-1] in field(text, "errors")
    for secret in [PASSWORD, *nbia_archive.tokens.issued]:
        assert secret not in text
    print("[figure] status:\n" + text)


def test_status_of_a_v4_guest_mount_has_no_token(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="guest")
    text = m.path(".nbiafs", "status").read_text()
    assert field(text, "user").startswith("nbia_guest (no token")
    assert not any(line.startswith("token:") for line in text.splitlines())


def test_status_of_a_directory_that_is_not_a_mount(tmp_path):
    res = nbiafs("status", str(tmp_path))
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "is not an nbiafs mount" in res.stderr


def test_cache_info_and_clear(nbia_archive, mount_factory, tmp_path):
    cache = tmp_path / "cache"
    guest = mount_factory(nbia_archive.url, name="g", cache_dir=cache)
    s = next(iter(nbia_archive.index.iter_series(None)))
    guest.path(series_path(s), f"{s.instances[0].sop_uid}.dcm").read_bytes()
    named = mount_factory(nbia_archive.url, name="n", cache_dir=cache,
                          env={"NBIA_USER": USER, "NBIA_PASSWORD": PASSWORD})
    named.path(series_path(s), f"{s.instances[0].sop_uid}.dcm").read_bytes()
    guest.stop()

    info = nbiafs("cache", "info", "--cache-dir", str(cache))
    assert info.returncode == 0, info.stderr
    assert f"{nbia_archive.url} (API v4), user nbia_guest" in info.stdout
    assert f"{nbia_archive.url} (API v4), user {USER}" in info.stdout
    assert PASSWORD not in info.stdout

    res = nbiafs("cache", "clear", "--cache-dir", str(cache))
    assert res.returncode == 1 and "in use by a running mount" in res.stderr and USER in res.stderr
    assert "cleared 1 cache(s)" in res.stdout
    left = nbiafs("cache", "info", "--cache-dir", str(cache)).stdout
    assert "user nbia_guest" not in left and f"user {USER}" in left
    # the running mount still works from its cache
    assert named.path(series_path(s), f"{s.instances[0].sop_uid}.dcm").read_bytes() == s.instances[0].path.read_bytes()
    named.stop()
    assert nbiafs("cache", "clear", "--cache-dir", str(cache)).returncode == 0
    assert "no cache yet" in nbiafs("cache", "info", "--cache-dir", str(cache)).stdout
