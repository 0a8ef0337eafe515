"""`--names readable`: study and series folders named for what they hold, through real mounts.
Names are checked against the local archive's own records, must be unique and the same in a
fresh mount, and every UID path must still resolve (docs/SEMANTICS.md, "Readable names")."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from conftest import public_series

from nbiafs import naming
from nbiafs.archive.content import load_synthetic
from nbiafs.archive.server import LocalArchive
from nbiafs.archive.synth import HOSTILE_COLLECTION, NAMES_TWIN_SUFFIX

READABLE = ("--names", "readable")


def expected_study(study: dict) -> str:
    """What the README promises: `<StudyDate> <StudyDescription> [<last 6 UID digits>]`."""
    words = [study["StudyDate"][:10], study.get("StudyDescription")]
    return " ".join(w for w in words if w) + f" [{study['StudyInstanceUID'].replace('.', '')[-6:]}]"


def expected_series(raw: dict) -> str:
    words = [str(raw["SeriesNumber"]) if raw.get("SeriesNumber") is not None else None,
             raw.get("Modality"), raw.get("SeriesDescription")]
    return " ".join(w for w in words if w) + f" [{raw['SeriesInstanceUID'].replace('.', '')[-6:]}]"


def names_study_date(archive) -> str:
    return next(s.study["StudyDate"][:10] for s in public_series(archive) if s.patient["PatientID"] == "NAMES-001")


def series_dirs(mountpoint: Path) -> list[str]:
    out = subprocess.run(["find", str(mountpoint), "-mindepth", "4", "-maxdepth", "4", "-type", "d"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return sorted(str(Path(p).relative_to(mountpoint)) for p in out if p)


# ---------------------------------------------------------------------- the naming rule alone
def test_names_are_unique_escaped_and_keep_their_digits():
    twins = {"1.2.3.1777123456": "5 CT AXIAL", "1.2.3.2777123456": "5 CT AXIAL", "1.2.9.5": "5 CT AXIAL"}
    names = naming.readable_names(twins)
    assert names == {"1.2.3.1777123456": "5 CT AXIAL [231777123456]",
                     "1.2.3.2777123456": "5 CT AXIAL [232777123456]", "1.2.9.5": "5 CT AXIAL [1295]"}
    assert naming.readable_names({"1.2": "a/b", "3.4": ""}) == {"1.2": "a%2Fb [12]", "3.4": "[34]"}
    long = naming.readable_names({"1.2.345678": "X" * 400})["1.2.345678"]
    assert len(long.encode()) == 255 and long.endswith(" [345678]")
    # Dots are left out of the digits; when that alone collides, the whole UID tells them apart.
    assert naming.readable_names({"1.23": "A", "12.3": "A"}) == {"1.23": "A [1.23]", "12.3": "A [12.3]"}
    assert naming.study_label({"StudyDate": "2003-12-12 00:00:00.0", "StudyDescription": "MRI\nLT  LEG"}) \
        == "2003-12-12 MRI LT LEG"
    assert naming.study_label({"StudyDate": "12-31-2003"}) == "2003-12-31"
    assert naming.series_label({"SeriesNumber": 3000566, "Modality": "CT"}) == "3000566 CT"


# ---------------------------------------------------------------------- through a mount
def test_readable_tree_matches_the_archive_and_is_stable(nbia_archive, mount_factory):
    series = public_series(nbia_archive)
    expected = sorted("/".join([naming.escape(s.collection["Collection"]), naming.escape(s.patient["PatientID"]),
                                naming.escape(expected_study(s.study)), naming.escape(expected_series(s.raw))])
                      for s in series)
    first = mount_factory(nbia_archive.url, name="first", extra=READABLE)
    listed = series_dirs(first.mountpoint)
    assert listed == expected
    assert len(set(listed)) == len(listed) == len(series)
    inodes = {p: os.stat(first.path(p)).st_ino for p in listed}
    first.stop()
    again = mount_factory(nbia_archive.url, name="again", extra=READABLE)  # a fresh cache
    assert series_dirs(again.mountpoint) == listed
    assert {p: os.stat(again.path(p)).st_ino for p in listed} == inodes


def test_uid_paths_still_resolve(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, extra=READABLE)
    s = next(s for s in public_series(nbia_archive) if len(s.instances) > 1)
    coll, pid = naming.escape(s.collection["Collection"]), naming.escape(s.patient["PatientID"])
    study_uid, study_name = naming.escape(s.study["StudyInstanceUID"]), naming.escape(expected_study(s.study))
    series_uid, series_name = naming.escape(s.uid), naming.escape(expected_series(s.raw))
    instance = s.instances[-1]
    file_name = naming.instance_file_name(instance.sop_uid)
    for study, series in ((study_name, series_name), (study_uid, series_uid),
                          (study_uid, series_name), (study_name, series_uid)):
        path = m.path(coll, pid, study, series, file_name)
        assert hashlib.md5(path.read_bytes()).hexdigest() == instance.md5, path
        assert os.getxattr(m.path(coll, pid, study, series), "user.nbia.SeriesInstanceUID").decode() == s.uid
    # Listings show the readable names only, also inside a folder reached by its UID.
    assert series_name in os.listdir(m.path(coll, pid, study_uid))
    assert study_uid not in os.listdir(m.path(coll, pid)) and series_uid not in os.listdir(m.path(coll, pid, study_uid))
    with pytest.raises(FileNotFoundError):
        os.stat(m.path(coll, pid, study_uid, series_uid + "9"))


def test_uid_names_stay_the_default(mounted, nbia_archive_server):
    s = public_series(nbia_archive_server)[0]
    folder = mounted.path(naming.escape(s.collection["Collection"]), naming.escape(s.patient["PatientID"]))
    assert naming.escape(s.study["StudyInstanceUID"]) in os.listdir(folder)


def test_awkward_records_get_unique_escaped_names(nbia_archive_data, mount_factory):
    hostile = LocalArchive(load_synthetic("hostile", nbia_archive_data)).start()
    try:
        m = mount_factory(hostile.url, name="hostile", extra=READABLE)
        patient = m.path(HOSTILE_COLLECTION, "NAMES-001")
        (study,) = os.listdir(patient)
        # The date first; the slash escaped; the line break one space.
        assert study[:10] == names_study_date(hostile) and study[10:].startswith(" CT%2FPET FOLLOW-UP [")
        names = os.listdir(patient / study)
        assert len(names) == len(set(names)) == 3
        twins = sorted(n for n in names if n.startswith("5 CT AXIAL%2FCORONAL ["))
        assert len(twins) == 2 and all(n.endswith(f"{NAMES_TWIN_SUFFIX}]") for n in twins)
        long = next(n for n in names if "VERY LONG" in n)
        assert len(long.encode()) <= 255 and long.endswith("]")
        by_uid = {}
        for name in names:
            uid = os.getxattr(patient / study / name, "user.nbia.SeriesInstanceUID").decode()
            by_uid[uid] = name
            assert os.listdir(patient / study / name) == os.listdir(patient / study / naming.escape(uid))
        assert len(by_uid) == 3
        # Every other series of the awkward archive has its own folder (a patient without an
        # ID has none, as with UID names).
        dirs = series_dirs(m.mountpoint)
        assert len(dirs) == len(set(dirs)) == len([s for s in public_series(hostile) if s.patient["PatientID"]])
    finally:
        hostile.stop()
