"""Bad input from the archive (spec "hostile"): every name and record gets its documented
behaviour (docs/SEMANTICS.md, "Names" and "What the archive sends"), through a real mount."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from conftest import checked_mount, need

from nbiafs import catalog as catalog_module
from nbiafs import naming
from nbiafs.api.client import ClientConfig, NbiaClient
from nbiafs.archive.content import load_synthetic
from nbiafs.archive.server import LocalArchive
from nbiafs.archive.synth import ESCAPE_SOP_UID, HOSTILE_COLLECTION, HOSTILE_PATIENT_IDS
from nbiafs.catalog import Catalog, ROOT_NODE
from nbiafs.metastore import MetadataStore

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def hostile(nbia_archive_data):
    archive = LocalArchive(load_synthetic("hostile", nbia_archive_data)).start()
    yield archive
    archive.stop()


@pytest.fixture(scope="module")
def mounted_hostile(hostile, tmp_path_factory):
    yield from checked_mount(hostile.url, tmp_path_factory.mktemp("hostile"))


def patient_series(archive, collection, patient_id):
    return [s for s in archive.index.iter_series("nbia_guest")
            if s.collection["Collection"] == collection and s.patient["PatientID"] == patient_id]


def tree_of(series_list) -> dict:
    """{study name: {series name: {file name: md5}}} as the archive holds them."""
    out: dict = {}
    for s in series_list:
        files = {naming.instance_file_name(i.sop_uid): i.md5 for i in s.instances}
        out.setdefault(naming.escape(s.study["StudyInstanceUID"]), {})[naming.escape(s.uid)] = files
    return out


def tree_on_mount(folder: Path) -> dict:
    return {study: {series: {f: hashlib.md5((folder / study / series / f).read_bytes()).hexdigest()
                             for f in os.listdir(folder / study / series)}
                    for series in os.listdir(folder / study)}
            for study in os.listdir(folder)}


def test_every_awkward_patient_id_is_a_folder_with_exactly_its_own_data(mounted_hostile, hostile):
    folder = mounted_hostile.path(HOSTILE_COLLECTION)
    listed = set(os.listdir(folder))
    shown = [pid for pid in HOSTILE_PATIENT_IDS if pid]
    assert {naming.escape(pid) for pid in shown} <= listed
    assert {".", "..", ""}.isdisjoint(listed) and all("/" not in n and len(n.encode()) <= 255 for n in listed)
    for pid in shown:
        name = naming.escape(pid)
        assert tree_on_mount(folder / name) == tree_of(patient_series(hostile, HOSTILE_COLLECTION, pid)), pid
        if "~" not in name:  # not cut to NAME_MAX: reversible
            assert naming.unescape(name) == pid
    assert naming.escape(".") == "%2E" and naming.escape("..") == "%2E%2E"
    assert naming.escape("a/b") == "a%2Fb" and naming.escape("a%2Fb") == "a%252Fb"  # no collision


def test_a_long_id_keeps_its_full_value_in_the_extended_attributes(mounted_hostile):
    long_id = next(pid for pid in HOSTILE_PATIENT_IDS if len(pid) > 255)
    name = naming.escape(long_id)
    assert len(name.encode()) <= 255 and "~" in name
    out = subprocess.run([need("getfattr"), "--only-values", "-n", "user.nbia.PatientId",
                          str(mounted_hostile.path(HOSTILE_COLLECTION, name))],
                         capture_output=True, text=True, check=True).stdout
    assert out == long_id


def test_a_record_without_an_id_is_not_shown_and_is_logged(mounted_hostile):
    assert "%" not in os.listdir(mounted_hostile.path(HOSTILE_COLLECTION))
    assert "patient record(s) without their ID skipped" in mounted_hostile.log()


def test_ids_differing_only_by_case_stay_apart(mounted_hostile, hostile):
    """The archive's PatientID and Collection filters ignore case; the mount does not mix them."""
    upper = mounted_hostile.path(HOSTILE_COLLECTION, "CASE-001")
    lower = mounted_hostile.path(HOSTILE_COLLECTION, "case-001")
    other = mounted_hostile.path(HOSTILE_COLLECTION.lower(), "CASE-001")
    assert tree_on_mount(upper) == tree_of(patient_series(hostile, HOSTILE_COLLECTION, "CASE-001"))
    assert tree_on_mount(lower) == tree_of(patient_series(hostile, HOSTILE_COLLECTION, "case-001"))
    assert tree_on_mount(other) == tree_of(patient_series(hostile, HOSTILE_COLLECTION.lower(), "CASE-001"))
    assert len({frozenset(os.listdir(p)) for p in (upper, lower, other)}) == 3
    assert os.listdir(mounted_hostile.path(HOSTILE_COLLECTION.lower())) == ["CASE-001"]


def test_a_study_uid_shared_by_two_patients_shows_each_its_own_series(mounted_hostile, hostile):
    trees = {pid: tree_on_mount(mounted_hostile.path(HOSTILE_COLLECTION, pid)) for pid in ("DUP-A", "DUP-B")}
    assert list(trees["DUP-A"]) == list(trees["DUP-B"])  # the same study folder name
    for pid, tree in trees.items():
        assert tree == tree_of(patient_series(hostile, HOSTILE_COLLECTION, pid))
    study = next(iter(trees["DUP-A"]))
    assert set(trees["DUP-A"][study]).isdisjoint(trees["DUP-B"][study])


def test_counts_that_disagree_with_the_instance_list(mounted_hostile, hostile):
    """The folder lists what getSOPInstanceUIDs gives; sizes add up to the series' bytes."""
    for s in patient_series(hostile, HOSTILE_COLLECTION, "COUNT-001"):
        assert s.reported_count != len(s.instances)
        folder = mounted_hostile.path(HOSTILE_COLLECTION, "COUNT-001", s.study["StudyInstanceUID"], s.uid)
        assert sorted(os.listdir(folder)) == sorted(naming.instance_file_name(i.sop_uid) for i in s.instances)
        du = subprocess.run(["du", "-sb", "--apparent-size", str(folder)], capture_output=True, text=True,
                            check=True).stdout.split()[0]
        assert int(du) == s.total_size
        assert {i.sop_uid: hashlib.md5((folder / f"{i.sop_uid}.dcm").read_bytes()).hexdigest()
                for i in s.instances} == {i.sop_uid: i.md5 for i in s.instances}


def test_shell_tools_copy_the_awkward_tree_intact(mounted_hostile, hostile, tmp_path):
    source = mounted_hostile.path(HOSTILE_COLLECTION)
    subprocess.run(["cp", "-r", "--", str(source), str(tmp_path / "copy")], check=True, timeout=120)
    find = subprocess.run(["find", str(source), "-name", "*.dcm"], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    expected = sum(len(s.instances) for s in hostile.index.iter_series("nbia_guest")
                   if s.collection["Collection"] == HOSTILE_COLLECTION and s.patient["PatientID"])
    assert len(find) == expected
    for line in find:
        rel = Path(line).relative_to(source)
        assert (tmp_path / "copy" / rel).read_bytes() == Path(line).read_bytes()
    outside = {p for p in tmp_path.iterdir()}
    assert outside == {tmp_path / "copy"}  # nothing was written beside the copy


def test_per_patient_listings_apply_the_same_rules(hostile, tmp_path, monkeypatch):
    """Collections too large to list at once are asked patient by patient: same results."""
    monkeypatch.setattr(catalog_module, "COLLECTION_WIDE_MAX_PATIENTS", 0)
    client = NbiaClient(ClientConfig(root_url=hostile.url, api="v1"))
    store = MetadataStore(tmp_path / "meta", ttl_s=3600)
    cat = Catalog(client, store)
    try:
        assert not cat.collection_wide(HOSTILE_COLLECTION)
        for coll, pid in ((HOSTILE_COLLECTION, "CASE-001"), (HOSTILE_COLLECTION, "case-001"),
                          (HOSTILE_COLLECTION.lower(), "CASE-001"), (HOSTILE_COLLECTION, "DUP-A"),
                          (HOSTILE_COLLECTION, "DUP-B"), (HOSTILE_COLLECTION, "..")):
            node = cat.resolve(f"/{naming.escape(coll)}/{naming.escape(pid)}")
            got = {study: set(cat.children(study_node)) for study, study_node in cat.children(node).items()}
            want = {study: set(series) for study, series in tree_of(patient_series(hostile, coll, pid)).items()}
            assert got == want, (coll, pid)
        assert set(cat.children(ROOT_NODE)) == {naming.escape(c["Collection"])
                                                for c in hostile.index.visible_collections(None)}
    finally:
        cat.close()
        store.close()
        client.close()


def test_an_instance_uid_that_climbs_directories_stays_inside(mounted_hostile, hostile):
    """A SOPInstanceUID such as ../../../tmp/x is one escaped file name; neither the mount nor
    the cache writes anywhere but the cache directory."""
    s = next(s for s in patient_series(hostile, HOSTILE_COLLECTION, "ESCAPE-001")
             if any(i.sop_uid == ESCAPE_SOP_UID for i in s.instances))
    folder = mounted_hostile.path(HOSTILE_COLLECTION, "ESCAPE-001", s.study["StudyInstanceUID"], s.uid)
    name = naming.instance_file_name(ESCAPE_SOP_UID)
    assert "/" not in name and name in os.listdir(folder)
    inst = next(i for i in s.instances if i.sop_uid == ESCAPE_SOP_UID)
    assert hashlib.md5((folder / name).read_bytes()).hexdigest() == inst.md5
    assert {i.sop_uid: hashlib.md5((folder / naming.instance_file_name(i.sop_uid)).read_bytes()).hexdigest()
            for i in s.instances} == {i.sop_uid: i.md5 for i in s.instances}
    assert not Path("/tmp/nbiafs-escape").exists() and not Path("/tmp/nbiafs-escape.dcm").exists()
    base = mounted_hostile.cache_dir.parent
    assert {p.name for p in base.iterdir()} == {"mnt", "cache", "daemon.log"}
    assert os.getxattr(folder / name, "user.nbia.SOPInstanceUID").decode() == ESCAPE_SOP_UID
