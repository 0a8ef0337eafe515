"""Mount conventions through real mounts: the config file and its precedence, `-o` options,
the mount(8) helper used by /etc/fstab, logging to a file, `--help` and `--version`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import series_path

from nbiafs import __version__

pytestmark = pytest.mark.mount
HELPER = os.path.join(os.path.dirname(sys.executable), "mount.fuse.nbiafs")


def nbiafs(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbiafs", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, env={**os.environ, **(env or {})})


def cache_limit(m) -> str:
    status = m.path(".nbiafs", "status").read_text()
    return next(line for line in status.splitlines() if line.startswith("cache:")).split(" of ")[1].split(" used")[0]


def test_config_file_then_o_options_then_flags(nbia_archive, mount_factory, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('# defaults for every mount\ncache_size = "1M"\ntimeout = 5\nno-prefetch = true\n')
    env = {"NBIAFS_CONFIG": str(config)}
    assert cache_limit(mount_factory(nbia_archive.url, name="file", env=env)) == "1.0 MiB"
    assert cache_limit(mount_factory(nbia_archive.url, name="opt", env=env,
                                     extra=("-o", "cache_size=3M,ro,nosuid"))) == "3.0 MiB"
    assert cache_limit(mount_factory(nbia_archive.url, name="flag", env=env,
                                     extra=("-o", "cache_size=3M", "--cache-size", "2M"))) == "2.0 MiB"


def test_subsets_and_names_from_the_config_file(nbia_archive, mount_factory, tmp_path):
    """A subset in the file; -o adds up within itself; flags replace the file's list."""
    names = sorted({s.collection["Collection"] for s in nbia_archive.index.iter_series("nbia_guest")})
    assert len(names) >= 2
    config = tmp_path / "config.toml"
    config.write_text(f'collection = ["{names[0]}"]\nnames = "readable"\npreviews = true\n')
    env = {"NBIAFS_CONFIG": str(config)}
    m = mount_factory(nbia_archive.url, name="file", env=env)
    assert os.listdir(m.mountpoint) == [names[0]]
    s = next(s for s in nbia_archive.index.iter_series("nbia_guest") if s.collection["Collection"] == names[0])
    assert os.path.exists(m.path(series_path(s), ".preview.png"))  # by its UID path; previews on
    opt = mount_factory(nbia_archive.url, name="opt", env=env,
                        extra=("-o", f"collection={names[0]},collection={names[1]}"))
    assert sorted(os.listdir(opt.mountpoint)) == names[:2]
    flag = mount_factory(nbia_archive.url, name="flag", env=env, extra=("--collection", names[1]))
    assert os.listdir(flag.mountpoint) == [names[1]]


def test_a_bad_names_setting_is_one_line(nbia_archive, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = nbiafs("mount", str(mnt), "--url", nbia_archive.url, "-o", "names=pretty", "-f")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "use uid or readable" in res.stderr, res.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("content, message", [
    ('cache_sise = "1G"\n', "unknown setting 'cache_sise'"),
    ('password = "x"\n', "passwords and tokens are never settings"),
    ('timeout = "soon"\n', "timeout = 'soon' is not a valid float"),
    ('cache_size = \n', "config file"),
])
def test_bad_config_file_is_one_line(nbia_archive, tmp_path, content, message):
    config = tmp_path / "config.toml"
    config.write_text(content)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = nbiafs("mount", str(mnt), "--url", nbia_archive.url, "--config", str(config), "-f")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert "'x'" not in res.stderr and '"x"' not in res.stderr  # a value given as a password is not echoed
    assert not os.path.ismount(mnt)


def test_bad_o_option_is_one_line(nbia_archive, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = nbiafs("mount", str(mnt), "--url", nbia_archive.url, "-o", "cache_size=1G,colour=blue", "-f")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "unknown setting 'colour'" in res.stderr


def test_fstab_style_mount_through_the_helper(nbia_archive, tmp_path):
    """What mount(8) runs for `SOURCE DIR fuse.nbiafs OPTIONS 0 0` in /etc/fstab."""
    mnt, log = tmp_path / "mnt", tmp_path / "nbiafs.log"
    mnt.mkdir()
    options = (f"rw,noauto,user,_netdev,x-systemd.automount,cache_dir={tmp_path / 'cache'},"
               f"cache_size=50M,timeout=10,log_file={log}")
    res = subprocess.run([HELPER, nbia_archive.url, str(mnt), "-o", options], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=60)
    try:
        assert res.returncode == 0, res.stderr
        assert os.path.ismount(mnt)  # the helper returned: the daemon runs in the background
        s = next(iter(nbia_archive.index.iter_series(None)))
        assert (mnt / series_path(s) / f"{s.instances[0].sop_uid}.dcm").read_bytes() == \
            s.instances[0].path.read_bytes()
        assert "50.0 MiB" in (mnt / ".nbiafs" / "status").read_text()
        assert "ro" in next(line for line in open("/proc/mounts") if f" {mnt} " in line).split()[3].split(",")
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True)
    deadline = time.monotonic() + 10
    while "unmounting" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert f"mounted {nbia_archive.url} at {mnt} as nbia_guest" in text and "unmounting" in text
    assert "DEBUG" not in text and "Traceback" not in text


def test_mount_t_fuse_nbiafs_through_mount8(nbia_archive, tmp_path):
    """`mount -t fuse.nbiafs`: mount(8) finds the helper in /sbin (linked there, as the README
    says, for this test when it is not) and the mount shows up as type fuse.nbiafs."""
    if os.geteuid() != 0:
        pytest.skip("linking the helper into /sbin needs root (the suite runs as root in CI)")
    link = "/sbin/mount.fuse.nbiafs"
    made = not os.path.lexists(link)
    if made:
        os.symlink(HELPER, link)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        res = subprocess.run(["mount", "-t", "fuse.nbiafs", nbia_archive.url, str(mnt),
                              "-o", f"noauto,cache_dir={tmp_path / 'cache'},timeout=10"],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert res.returncode == 0, res.stderr
        entry = next(line for line in open("/proc/mounts") if f" {mnt} " in line).split()
        assert entry[2] == "fuse.nbiafs" and "ro" in entry[3].split(",")
        names = {s.collection["Collection"] for s in nbia_archive.index.iter_series("nbia_guest")}
        assert names and names <= set(os.listdir(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if made:
            os.unlink(link)
    assert not os.path.ismount(mnt)


def test_helper_usage_error(tmp_path):
    res = subprocess.run([HELPER, "tcia"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and res.stderr.startswith("usage: mount.fuse.nbiafs SOURCE MOUNTPOINT")


def test_verbose_logs_debug_to_the_log_file(nbia_archive, mount_factory, tmp_path):
    log = tmp_path / "v.log"
    m = mount_factory(nbia_archive.url, name="verbose", extra=("-v", "--log-file", str(log)))
    os.listdir(m.mountpoint)
    m.stop()
    text = log.read_text()
    assert "DEBUG" in text and "mounted" in text


def test_version_and_a_help_that_fits_on_a_screen():
    assert nbiafs("--version").stdout.strip() == f"nbiafs {__version__}"
    top = nbiafs("--help").stdout
    mount = nbiafs("mount", "--help").stdout
    assert len(top.splitlines()) <= 30 and "examples:" in top and "mount" in top and "status" in top and "cache" in top
    assert "examples:" in mount and "config.toml" in mount
    assert max(len(line) for line in top.splitlines()) <= 100
