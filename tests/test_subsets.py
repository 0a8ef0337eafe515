"""Mounting part of the archive: --collection, --modality, a TCIA manifest, a shared cart.
Each mount lists exactly its series (compared with the local archive's index) through a real
mount, in the usual hierarchy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import series_path

from nbiafs.archive.tokens import DEFAULT_USERS
from nbiafs.manifest import ManifestError, parse_manifest

pytestmark = pytest.mark.mount
USER, PASSWORD = next(iter(DEFAULT_USERS.items()))


def series_on(mountpoint: Path) -> set[str]:
    """Every series folder of a mount, as mount-relative paths (find to depth 4)."""
    out = subprocess.run(["find", str(mountpoint), "-mindepth", "4", "-maxdepth", "4", "-type", "d"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return {str(Path(p).relative_to(mountpoint)) for p in out if p}


def visible(archive, user="nbia_guest"):
    return list(archive.index.iter_series(user))


def write_manifest(path: Path, uids) -> Path:
    path.write_text("downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet\n"
                    "includeAnnotation=true\nnoOfrRetry=4\ndatabasketId=manifest-1.tcia\nmanifestVersion=3.0\n"
                    "ListOfSeriesToDownload=\n" + "\n".join(uids) + "\n")
    return path


def test_collection_and_modality(nbia_archive, mount_factory):
    everything = visible(nbia_archive)
    name = everything[0].collection["Collection"]
    m = mount_factory(nbia_archive.url, name="coll", extra=("--collection", name.lower()))
    assert os.listdir(m.mountpoint) == [name]
    assert series_on(m.mountpoint) == {series_path(s) for s in everything if s.collection["Collection"] == name}

    mr = mount_factory(nbia_archive.url, name="mr", extra=("--modality", "mr"))
    want = {series_path(s) for s in everything if s.raw["Modality"] == "MR"}
    assert want and series_on(mr.mountpoint) == want
    patients = {p for c in os.listdir(mr.mountpoint) for p in os.listdir(mr.path(c))}
    assert "NOSTUDY-001" not in patients  # a patient without MR series is not shown
    with pytest.raises(FileNotFoundError):  # nor reachable by name
        os.stat(mr.path(everything[0].collection["Collection"], "NOSTUDY-001"))


def test_manifest_lists_exactly_its_series(nbia_archive, mount_factory, tmp_path):
    chosen = visible(nbia_archive)[1:6:2]
    manifest = write_manifest(tmp_path / "cohort.tcia",
                              [s.uid for s in chosen] + ["1.2.3.4.5.404"])  # one the archive does not have
    m = mount_factory(nbia_archive.url, name="manifest", extra=("--manifest", str(manifest)))
    assert series_on(m.mountpoint) == {series_path(s) for s in chosen}
    s = chosen[0]
    assert m.path(series_path(s), f"{s.instances[0].sop_uid}.dcm").read_bytes() == s.instances[0].path.read_bytes()
    assert "1 of the 4 series of the manifest are not in the archive" in m.log()


def test_cart_lists_exactly_its_series(nbia_archive_legacy, mount_factory):
    nbia_archive = nbia_archive_legacy  # carts: getContentsByName lives on v1/v2 only
    cart = nbia_archive.index.carts["nbia-demo-cart"]
    m = mount_factory(nbia_archive.url, name="cart", extra=("--cart", "nbia-demo-cart"))
    assert series_on(m.mountpoint) == {series_path(nbia_archive.index.series_by_uid[u]) for u in cart}


def test_a_restricted_series_in_a_manifest_shows_only_to_its_user(nbia_archive, mount_factory, tmp_path):
    restricted = next(s for s in visible(nbia_archive, USER) if s.collection.get("restricted"))
    public = visible(nbia_archive)[0]
    manifest = write_manifest(tmp_path / "m.tcia", [restricted.uid, public.uid])
    guest = mount_factory(nbia_archive.url, name="guest", extra=("--manifest", str(manifest)))
    assert series_on(guest.mountpoint) == {series_path(public)}
    named = mount_factory(nbia_archive.url, name="named", extra=("--manifest", str(manifest)),
                          env={"NBIA_USER": USER, "NBIA_PASSWORD": PASSWORD})
    assert series_on(named.mountpoint) == {series_path(public), series_path(restricted)}


@pytest.mark.parametrize("text, message", [
    ("manifestVersion=3.0\n", "no ListOfSeriesToDownload= line"),
    ("ListOfSeriesToDownload=\n\n", "lists no series"),
    ("ListOfSeriesToDownload=\n1.2.3\n<html>\n", "is not a SeriesInstanceUID"),
])
def test_bad_manifests(tmp_path, text, message):
    path = tmp_path / "bad.tcia"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run([sys.executable, "-m", "nbiafs", "mount", str(mnt), "--manifest", str(path), "-f"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and message in res.stderr
    assert not os.path.ismount(mnt)


def test_cart_on_a_v4_only_archive_is_one_line(nbia_archive, tmp_path):
    (tmp_path / "m").mkdir()
    res = subprocess.run([sys.executable, "-m", "nbiafs", "mount", str(tmp_path / "m"), "--url", nbia_archive.url,
                          "--cache-dir", str(tmp_path / "c"), "--cart", "nbia-demo-cart", "-f"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "never moved to API v4" in res.stderr and not os.path.ismount(tmp_path / "m")


def test_unknown_cart_is_one_line(nbia_archive_legacy, tmp_path):
    nbia_archive = nbia_archive_legacy
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run([sys.executable, "-m", "nbiafs", "mount", str(mnt), "--url", nbia_archive.url,
                          "--cache-dir", str(tmp_path / "c"), "--cart", "no-such-cart", "-f"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "cart 'no-such-cart' is empty" in res.stderr
    assert not os.path.ismount(mnt)


def test_cart_unreadable_because_the_archive_fails_is_one_line(nbia_archive_legacy, tmp_path):
    nbia_archive = nbia_archive_legacy
    nbia_archive.set_faults(corrupt_json=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run([sys.executable, "-m", "nbiafs", "mount", str(mnt), "--url", nbia_archive.url,
                          "--cache-dir", str(tmp_path / "c"), "--cart", "nbia-demo-cart", "--timeout", "2", "-f"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "cannot read cart 'nbia-demo-cart'" in res.stderr and "Traceback" not in res.stderr
    assert not os.path.ismount(mnt)
