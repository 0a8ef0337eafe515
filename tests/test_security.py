"""Security through real mounts (docs/RELIABILITY.md, "Security"): secrets stay out of argv,
logs and the cache; caches are private; users do not see each other's data; TLS is verified."""

from __future__ import annotations

import errno
import os
import ssl
import stat
import subprocess
import sys

import pytest
from conftest import need, series_path

from nbiafs.archive.content import load_synthetic
from nbiafs.archive.server import LocalArchive
from nbiafs.archive.tokens import DEFAULT_USERS

pytestmark = pytest.mark.mount
USER, PASSWORD = next(iter(DEFAULT_USERS.items()))
NAMED = {"NBIA_USER": USER, "NBIA_PASSWORD": PASSWORD}


def secrets_of(archive) -> list[bytes]:
    return [PASSWORD.encode()] + [t.encode() for t in archive.tokens.issued]


def test_no_secret_in_argv_logs_or_cache(nbia_archive_factory, mount_factory):
    archive = nbia_archive_factory(access_lifetime_s=1.0, refresh_lifetime_s=2.0)
    m = mount_factory(archive.url, name="secrets", env=NAMED,
                      extra=("--log-level", "DEBUG", "--timeout", "2"))
    restricted = [s for s in archive.index.iter_series(USER) if s.collection.get("restricted")]
    for s in restricted:  # listings, downloads and several token renewals, at DEBUG
        folder = m.path(series_path(s))
        for name in sorted(os.listdir(folder)):
            (folder / name).read_bytes()
    archive.set_faults(image_outage=True)  # and error messages
    public = next(s for s in archive.index.iter_series(None) if len(s.instances) > 1)
    with pytest.raises(OSError):
        m.path(series_path(public), f"{public.instances[0].sop_uid}.dcm").read_bytes()
    archive.clear_faults()
    argv = open(f"/proc/{m.proc.pid}/cmdline", "rb").read()
    m.stop()
    secrets = secrets_of(archive)
    assert len(secrets) > 3  # the password and several tokens were in play
    assert "token refreshed" in m.log() and "archive unavailable" in m.log()
    log = m.log_path.read_bytes()
    files = [p for p in m.cache_dir.rglob("*") if p.is_file()]
    assert files
    for secret in secrets:
        assert secret not in argv
        assert secret not in log
        for path in files:
            assert secret not in path.read_bytes(), path


def test_cache_is_private_to_its_user(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="private", env=NAMED)
    for s in list(nbia_archive.index.iter_series(USER))[:3]:
        folder = m.path(series_path(s))
        for name in os.listdir(folder):
            (folder / name).read_bytes()
    m.stop()
    entries = [m.cache_dir, *m.cache_dir.rglob("*")]
    assert len(entries) > 10
    for path in entries:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, (path, oct(mode))
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_restricted_data_cached_by_a_named_user_is_not_served_to_a_guest(nbia_archive, mount_factory,
                                                                        tmp_path):
    cache = tmp_path / "shared-cache"
    named = mount_factory(nbia_archive.url, name="named", cache_dir=cache, env=NAMED)
    s = next(s for s in nbia_archive.index.iter_series(USER) if s.collection.get("restricted"))
    path = series_path(s) + f"/{s.instances[0].sop_uid}.dcm"
    assert named.path(path).read_bytes() == s.instances[0].path.read_bytes()
    named.stop()
    guest = mount_factory(nbia_archive.url, name="guest", cache_dir=cache)
    assert s.collection["Collection"] not in os.listdir(guest.mountpoint)
    for probe in (path, series_path(s), s.collection["Collection"]):
        with pytest.raises(OSError) as info:
            os.stat(guest.path(probe))
        assert info.value.errno == errno.ENOENT
    res = subprocess.run(["grep", "-rl", s.instances[0].sop_uid, str(guest.cache_dir)], capture_output=True)
    holders = {p.split(str(cache))[1].split("/")[1] for p in res.stdout.decode().split()}
    assert len(holders) == 1  # only the named user's scope holds anything of it
    assert not nbia_archive.index.visible_series("nbia_guest", s.uid)


def test_the_mount_is_read_only_for_every_user(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="ro")
    assert "ro" in next(line for line in open("/proc/mounts") if f" {m.mountpoint} " in line).split()[3].split(",")
    s = next(iter(nbia_archive.index.iter_series(None)))
    target = m.path(series_path(s), f"{s.instances[0].sop_uid}.dcm")
    for action in (lambda: open(target, "r+b"), lambda: os.unlink(target), lambda: os.chmod(target, 0o777),
                   lambda: os.setxattr(target, "user.x", b"1")):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


# --------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def tls_archive(nbia_archive_data, tmp_path_factory):
    """The local archive over https with a self-signed certificate for 127.0.0.1."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run([need("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    archive = LocalArchive(load_synthetic("test", nbia_archive_data), tls=ctx).start()
    archive.ca_file = d / "cert.pem"
    yield archive
    archive.stop()


def nbiafs(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbiafs", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, env={**os.environ, **(env or {})})


def test_tls_is_verified_by_default(tls_archive, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = nbiafs("mount", str(mnt), "--url", tls_archive.url, "--cache-dir", str(tmp_path / "c"), "-f")
    assert res.returncode != 0 and not os.path.ismount(mnt)
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "TLS certificate of 127.0.0.1" in res.stderr and "--insecure" in res.stderr, res.stderr


def test_a_private_ca_is_trusted_through_requests_ca_bundle(tls_archive, mount_factory):
    m = mount_factory(tls_archive.url, name="ca", env={"REQUESTS_CA_BUNDLE": str(tls_archive.ca_file)})
    s = next(iter(tls_archive.index.iter_series(None)))
    assert m.path(series_path(s), f"{s.instances[0].sop_uid}.dcm").read_bytes() == s.instances[0].path.read_bytes()
    assert "NOT verified" not in m.log()


def test_insecure_mounts_with_a_warning(tls_archive, mount_factory):
    m = mount_factory(tls_archive.url, name="insecure", extra=("--insecure",))
    s = next(iter(tls_archive.index.iter_series(None)))
    assert m.path(series_path(s), f"{s.instances[0].sop_uid}.dcm").read_bytes() == s.instances[0].path.read_bytes()
    assert "TLS certificates of" in m.log() and "NOT verified" in m.log()
