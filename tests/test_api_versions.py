"""One mount whatever the archive speaks: `--api auto` finds v4, v2 or v1, and the tree, the
bytes, sizes, times and extended attributes are the same on each (api/models.py maps them)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from conftest import public_series, series_path

from nbiafs.archive.tokens import DEFAULT_USERS

pytestmark = pytest.mark.mount
USER, PASSWORD = next(iter(DEFAULT_USERS.items()))
# getSeries columns v4 added (shared/nbia-api-v4.md §8): shown where the archive sends them.
V4_ONLY_SERIES_COLUMNS = {"Site", "PatientSex", "PatientAge", "AdmittingDiagnosisDescription", "ReleasedStatus"}


def big(archive):
    return max(public_series(archive), key=lambda s: len(s.instances))


def view(m, archive) -> dict:
    """What a user sees of the archive: every path with its size, mtime and attributes."""
    out = {}
    for root, dirs, files in os.walk(m.mountpoint):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.stat(path)
            attrs = {a: os.getxattr(path, a) for a in os.listxattr(path) if a != "user.nbiafs.cached"}
            out[os.path.relpath(path, m.mountpoint)] = (st.st_size, st.st_mtime, st.st_ino, attrs)
    return out


def status(m) -> str:
    return m.path(".nbiafs", "status").read_text()


def read_series(m, series, tmp_path, name) -> dict:
    dest = tmp_path / name
    subprocess.run(["cp", "-r", str(m.path(series_path(series))), str(dest)], check=True)
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in dest.iterdir()}


def test_the_same_tree_bytes_times_and_attributes_on_v4_v2_and_v1(nbia_archive_legacy, mount_factory, tmp_path):
    archive = nbia_archive_legacy
    series = big(archive)
    truth = {f"{i.sop_uid}.dcm": i.md5 for i in series.instances}
    views, sent = {}, {}
    for api in ("auto", "v2", "v1"):
        archive.reset_counters()
        m = mount_factory(archive.url, name=api, extra=("--api", api, "--names", "readable"))
        views[api] = view(m, archive)
        assert read_series(m, series, tmp_path, api) == truth
        views[api + "-after"] = view(m, archive)  # exact sizes of what was read
        sent[api] = archive.counters()
        expected = "v4" if api == "auto" else api
        assert f"(API {expected}" in status(m)
        m.stop()
    assert set(sent["auto"]["versions"]) == {"v4"}
    assert set(sent["v2"]["versions"]) == {"v2"} and sent["v2"]["endpoints"]["oauth/token:password"] == 1
    assert set(sent["v1"]["versions"]) == {"v1"} and not any(k.startswith("oauth") for k in sent["v1"]["endpoints"])
    assert sent["auto"]["endpoints"]["getImage"] == 1  # IncludeMD5=Yes
    assert sent["v2"]["endpoints"]["getImageWithMD5Hash"] == 1
    attrs = next(v[3] for k, v in views["auto"].items() if k.endswith(series.uid[-6:] + "]"))
    assert {f"user.nbia.{k}" for k in V4_ONLY_SERIES_COLUMNS} & set(attrs)  # what v4 adds to series
    for name in ("auto", "auto-after"):
        views[name] = {path: (size, mtime, ino, {a: v for a, v in attrs.items() if path.count("/") != 3
                                                  or a[len("user.nbia."):] not in V4_ONLY_SERIES_COLUMNS})
                       for path, (size, mtime, ino, attrs) in views[name].items()}
    assert views["auto"] == views["v2"] == views["v1"]
    assert views["auto-after"] == views["v2-after"] == views["v1-after"]
    assert attrs["user.nbia.MaxSubmissionTimestamp"] == series.raw["TimeStamp"].encode()  # ISO date
    assert "user.nbia.TimeStamp" not in attrs and "user.nbia.CollectionURI" not in attrs


def test_auto_against_a_v2_archive_uses_the_token_session(nbia_archive_factory, mount_factory, tmp_path):
    archive = nbia_archive_factory(versions=("v1", "v2"))
    m = mount_factory(archive.url, name="v2only")
    series = big(archive)
    assert read_series(m, series, tmp_path, "copy") == {f"{i.sop_uid}.dcm": i.md5 for i in series.instances}
    text = status(m)
    assert "(API v2, found by asking the archive)" in text and "token:      valid" in text
    counts = archive.counters()["endpoints"]
    assert counts["oauth/token:password"] == 1  # v4 answered 404, the token endpoint a token


def test_auto_against_a_v1_archive_is_anonymous(nbia_archive_factory, mount_factory, tmp_path):
    archive = nbia_archive_factory(versions=("v1",))  # no token endpoint either
    m = mount_factory(archive.url, name="v1only")
    series = big(archive)
    assert read_series(m, series, tmp_path, "copy") == {f"{i.sop_uid}.dcm": i.md5 for i in series.instances}
    assert "(API v1, found by asking the archive)" in status(m) and "anonymous (v1)" in status(m)


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_explicit_version_the_archive_lacks_is_one_line(nbia_archive, tmp_path, api):
    (tmp_path / "m").mkdir()
    res = subprocess.run([sys.executable, "-m", "nbiafs", "mount", str(tmp_path / "m"), "--url", nbia_archive.url,
                          "--api", api, "--cache-dir", str(tmp_path / "c"), "-f"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert f"does not speak API {api}" in res.stderr and not os.path.ismount(tmp_path / "m")


def test_no_nbia_api_at_the_url_is_one_line(nbia_archive, tmp_path):
    (tmp_path / "m").mkdir()
    url = nbia_archive.url.replace("/nbia-api", "/elsewhere")
    res = subprocess.run([sys.executable, "-m", "nbiafs", "mount", str(tmp_path / "m"), "--url", url,
                          "--cache-dir", str(tmp_path / "c"), "-f"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "no NBIA API at" in res.stderr


def test_named_user_on_v4_keeps_the_token_session(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="named", env={"NBIA_USER": USER, "NBIA_PASSWORD": PASSWORD})
    assert "Phantom-Restricted" in os.listdir(m.mountpoint)
    secret = next(s for s in nbia_archive.index.iter_series(USER) if s.collection.get("restricted"))
    inst = secret.instances[0]
    assert m.path(series_path(secret), f"{inst.sop_uid}.dcm").read_bytes() == inst.path.read_bytes()
    counts = nbia_archive.counters()
    assert set(counts["versions"]) == {"v4"} and counts["endpoints"]["oauth/token:password"] == 1
    assert any(label.startswith(USER) for label in counts["tokens"])  # its requests carried the token
