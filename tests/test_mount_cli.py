"""`nbiafs mount` and `nbiafs demo` as users run them: clean errors, signals, credentials, daemon mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import start_demo

from nbiafs.archive.tokens import DEFAULT_USERS

pytestmark = pytest.mark.mount
USER, PASSWORD = next(iter(DEFAULT_USERS.items()))


def nbiafs(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbiafs", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line_error(res, *fragments):
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("nbiafs: "), res.stderr
    assert "Traceback" not in res.stderr
    for fragment in fragments:
        assert fragment in res.stderr


@pytest.fixture
def mnt(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def test_missing_mountpoint(nbia_archive, tmp_path):
    res = nbiafs("mount", str(tmp_path / "nope"), "--url", nbia_archive.url, "-f")
    assert_one_line_error(res, "does not exist")


def test_mountpoint_is_a_file(nbia_archive, tmp_path):
    (tmp_path / "file").write_text("x")
    res = nbiafs("mount", str(tmp_path / "file"), "--url", nbia_archive.url, "-f")
    assert_one_line_error(res, "not a directory")


def test_mountpoint_not_empty(nbia_archive, mnt):
    (mnt / "something").write_text("x")
    res = nbiafs("mount", str(mnt), "--url", nbia_archive.url, "-f")
    assert_one_line_error(res, "not empty")
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("size", ["lots", "0", "-5G", "12Q"])
def test_bad_cache_size(nbia_archive, mnt, size):
    res = nbiafs("mount", str(mnt), "--url", nbia_archive.url, f"--cache-size={size}", "-f")
    assert_one_line_error(res, "--cache-size")
    assert not os.path.ismount(mnt)


def test_unknown_option_is_a_usage_error(mnt):
    res = nbiafs("mount", str(mnt), "--no-such-option")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "unrecognized arguments: --no-such-option" in res.stderr
    assert not os.path.ismount(mnt)


def test_unwritable_cache_dir(nbia_archive, mnt, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    res = nbiafs("mount", str(mnt), "--url", nbia_archive.url, "--cache-dir", str(blocker / "c"), "-f")
    assert_one_line_error(res, "cache directory")
    assert not os.path.ismount(mnt)


def test_refused_credentials(nbia_archive, mnt):
    res = nbiafs("mount", str(mnt), "--url", nbia_archive.url, "-f",
                 env={"NBIA_USER": USER, "NBIA_PASSWORD": "wrong"})
    assert_one_line_error(res, "refused the credentials", USER)
    assert "wrong" not in res.stderr


def test_named_user_without_password_and_no_terminal(nbia_archive, mnt, tmp_path):
    res = nbiafs("mount", str(mnt), "--url", nbia_archive.url, "--user", "someone", "-f",
                 env={"HOME": str(tmp_path), "NBIA_PASSWORD": ""} | {"NBIA_USER": "other"})
    assert_one_line_error(res, "no password for user someone")


def test_unreachable_archive(mnt):
    res = nbiafs("mount", str(mnt), "--url", "http://127.0.0.1:9/nbia-api", "-f", timeout=120)
    assert_one_line_error(res, "cannot reach the archive")


def test_named_user_mount_sees_restricted_collection(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="named", env={"NBIA_USER": USER, "NBIA_PASSWORD": PASSWORD})
    assert "Phantom-Restricted" in os.listdir(m.mountpoint)
    guest = mount_factory(nbia_archive.url, name="guest", cache_dir=m.cache_dir)
    assert "Phantom-Restricted" not in os.listdir(guest.mountpoint)
    log = m.log()
    assert PASSWORD not in log and all(t not in log for t in nbia_archive.tokens.issued)


@pytest.mark.parametrize("who", ["guest", "user"])
def test_sigterm_unmounts_cleanly(nbia_archive, mount_factory, who):
    env = {"NBIA_USER": USER, "NBIA_PASSWORD": PASSWORD} if who == "user" else None
    m = mount_factory(nbia_archive.url, name="term", env=env)
    assert os.listdir(m.mountpoint)
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=20) == 0
    assert not os.path.ismount(m.mountpoint)
    counts = nbia_archive.counters()["endpoints"]
    if who == "user":  # the token session logs out
        assert counts.get("oauth/token:password") == 1 and counts.get("logout") == 1
    else:  # v4's guest: no token, so no login and no logout
        assert not any(k.startswith(("oauth", "logout")) for k in counts), counts


def test_stale_mount_is_reported_with_the_command(nbia_archive, mount_factory, mnt):
    m = mount_factory(nbia_archive.url, name="crash")
    assert os.listdir(m.mountpoint)
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(timeout=10)
    res = nbiafs("mount", str(m.mountpoint), "--url", nbia_archive.url, "-f")
    assert_one_line_error(res, "stale mount", f"fusermount -u {m.mountpoint}")
    subprocess.run(["fusermount", "-u", str(m.mountpoint)], check=True)


def test_busy_mountpoint(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="busy")
    res = nbiafs("mount", str(m.mountpoint), "--url", nbia_archive.url, "-f")
    assert_one_line_error(res, "already a mountpoint")


def test_background_mount_and_fusermount(nbia_archive, mnt, tmp_path):
    res = nbiafs("mount", str(mnt), "--url", nbia_archive.url, "--cache-dir", str(tmp_path / "c"))
    assert res.returncode == 0, res.stderr
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "Phantom-Thorax-CT" in os.listdir(mnt)
        # The token refresh thread runs in the daemon (started after daemonising).
        assert oct((tmp_path / "c").stat().st_mode & 0o777) == "0o700"
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True)


@pytest.mark.parametrize("names", [(), ("--names", "uid")], ids=["readable", "uid"])
def test_demo_mounts_shows_what_to_try_and_stops_on_ctrl_c(tmp_path, nbia_archive_data, names):
    """The printed commands run as printed in a new login shell with a clean environment (no
    .venv on its PATH: `nbiafs` is the link scripts/setup.sh made)."""
    mnt = tmp_path / "demo"
    proc = start_demo(mnt, nbia_archive_data, *names, stdout=subprocess.PIPE)
    try:
        assert "Phantom-Thorax-CT" in os.listdir(mnt)
        lines = []
        while "Press Ctrl-C" not in (line := proc.stdout.readline()):
            lines.append(line.strip())
        tries = lines[lines.index("Try, in another terminal:") + 1:]
        commands = [c for c in tries if c]
        assert any(c.startswith("getfattr -d") for c in commands)
        assert any("dcm2niix" in c for c in commands) and any("dcmdump" in c for c in commands)
        assert any(c.startswith("nbiafs status") for c in commands)
        clean = {"HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
        for command in commands:  # every command the demo suggests works as printed
            res = subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in clean.items()), "bash", "-l", "-o",
                                  "pipefail", "-c", command], capture_output=True, text=True, timeout=600,
                                 stdin=subprocess.DEVNULL, cwd=tmp_path)
            if not (res.returncode == 0 or (res.returncode == 141 and "| head" in command)):
                proc.send_signal(signal.SIGINT)  # the demo's own messages say why
                raise AssertionError((command, res.stderr, proc.communicate(timeout=30)[1][-3000:]))
        assert subprocess.run(["env", "-i", f"HOME={clean['HOME']}", "bash", "-lc", "command -v nbiafs"],
                              capture_output=True, text=True).stdout.strip() != os.path.join(
                                  os.path.dirname(sys.executable), "nbiafs")
        assert open("/tmp/preview.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert ("CT CHEST ABD W CONTRAST [" in "".join(commands)) == (names == ())
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not mnt.exists()
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"nbiafs demo: unmounted {mnt} (and removed it), stopped the local archive, "
                           "deleted its cache /"), last
