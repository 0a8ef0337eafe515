"""The walk planner on recorded traces (what `find`, `ls` and a person do), with an injected
clock, and the queue that runs its listings."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from nbiafs import catalog as catalog_module
from nbiafs import naming
from nbiafs.api.client import ClientConfig, NbiaClient
from nbiafs.archive.content import load_synthetic
from nbiafs.archive.server import LocalArchive
from nbiafs.catalog import WALK_CONNECTIONS, Catalog
from nbiafs.metastore import MetadataStore
from nbiafs.walk import PATIENT_FOLDERS, SERIES_FOLDERS, STUDY_FOLDERS, WALK_WINDOW, ListingQueue, WalkPlanner


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def find_trace(patients: int, series_per_patient: int = 1):
    """The folders `find COLLECTION` lists, in order: (patient, depth, series or None)."""
    for p in range(patients):
        yield p, PATIENT_FOLDERS, None        # the patient's folder
        yield p, STUDY_FOLDERS, None          # its study's folder
        for s in range(series_per_patient):
            yield p, SERIES_FOLDERS, f"{p}.{s}"  # each series' folder


def test_find_is_planned_once_each_patient_never_more_than_a_window_ahead():
    clock = Clock()
    planner = WalkPlanner(window=16, idle_s=30, clock=clock)
    planned: list[int] = []
    for patient, depth, series in find_trace(200, 2):
        clock.now += 0.01
        plan = planner.listed("C", patient, 200, depth, series)
        if plan is not None:
            assert plan.depth == SERIES_FOLDERS
            assert plan.patients.start == (planned[-1] + 1 if planned else 0)
            assert plan.patients.stop - 1 <= patient + 16
            planned.extend(plan.patients)
    # Patient 0 alone once its second series was listed (a walk inside it), then the rest.
    assert planned == list(range(200))


def test_one_patient_looked_at_plans_nothing_and_two_series_of_it_plan_it_alone():
    clock = Clock()
    planner = WalkPlanner(window=16, idle_s=30, clock=clock)
    assert planner.listed("C", 7, 100, PATIENT_FOLDERS) is None             # ls PATIENT
    assert planner.listed("C", 7, 100, STUDY_FOLDERS) is None               # ls PATIENT/STUDY
    assert planner.listed("C", 7, 100, SERIES_FOLDERS, "1.2.3") is None     # ls one series
    plan = planner.listed("C", 7, 100, SERIES_FOLDERS, "1.2.4")             # a second: dcm2niix PATIENT
    assert plan is not None and list(plan.patients) == [7]
    assert planner.listed("C", 7, 100, SERIES_FOLDERS, "1.2.5") is None     # planned already


def test_a_shallow_walk_gets_shallow_listings_until_it_goes_deeper():
    clock = Clock()
    planner = WalkPlanner(window=4, idle_s=30, clock=clock)
    planner.listed("C", 0, 100, PATIENT_FOLDERS)                            # find -maxdepth 3
    planner.listed("C", 0, 100, STUDY_FOLDERS)
    plan = planner.listed("C", 1, 100, PATIENT_FOLDERS)
    assert plan is not None and plan.depth == STUDY_FOLDERS and list(plan.patients) == [1, 2, 3, 4, 5]
    assert planner.listed("C", 1, 100, STUDY_FOLDERS) is None
    plan = planner.listed("C", 2, 100, SERIES_FOLDERS, "2.0")               # now into series folders
    assert plan is not None and plan.depth == SERIES_FOLDERS and list(plan.patients) == [2, 3, 4, 5, 6]


def test_a_second_pass_deeper_than_the_first_is_planned_again_from_its_start():
    clock = Clock()
    planner = WalkPlanner(window=64, idle_s=30, clock=clock)
    for p in range(50):  # find -maxdepth 3: patients' and studies' folders
        planner.listed("C", p, 50, PATIENT_FOLDERS)
        planner.listed("C", p, 50, STUDY_FOLDERS)
    planned = []
    for patient, depth, series in find_trace(50):  # then ls -lR, into every series folder
        plan = planner.listed("C", patient, 50, depth, series)
        if plan is not None and plan.depth == SERIES_FOLDERS:
            planned.extend(plan.patients)
    assert planned == list(range(50))  # every patient's SOP listings, once, from the start


def test_a_jump_plans_from_where_the_walk_is_and_collections_are_apart():
    clock = Clock()
    planner = WalkPlanner(window=4, idle_s=30, clock=clock)
    planner.listed("C", 3, 1000, PATIENT_FOLDERS)
    plan = planner.listed("C", 500, 1000, PATIENT_FOLDERS)
    assert plan is not None and list(plan.patients) == [500, 501, 502, 503, 504]
    assert planner.listed("D", 0, 10, PATIENT_FOLDERS) is None  # another collection has a walk of its own
    plan = planner.listed("C", 800, 1000, PATIENT_FOLDERS)
    assert plan is not None and list(plan.patients) == list(range(800, 805))


def test_the_window_stops_at_the_last_patient():
    clock = Clock()
    planner = WalkPlanner(window=64, idle_s=30, clock=clock)
    planner.listed("C", 0, 5, PATIENT_FOLDERS)
    plan = planner.listed("C", 1, 5, PATIENT_FOLDERS)
    assert plan is not None and list(plan.patients) == [1, 2, 3, 4]
    assert planner.listed("C", 4, 5, PATIENT_FOLDERS) is None


def test_a_walk_that_stops_ends_and_its_plans_are_no_longer_wanted():
    clock = Clock()
    planner = WalkPlanner(window=8, idle_s=30, clock=clock)
    planner.listed("C", 0, 100, PATIENT_FOLDERS)
    plan = planner.listed("C", 1, 100, PATIENT_FOLDERS)
    assert plan is not None and planner.current("C", plan.generation)
    clock.now += 29
    assert planner.current("C", plan.generation)
    clock.now += 2
    assert not planner.current("C", plan.generation)
    assert planner.listed("C", 2, 100, PATIENT_FOLDERS) is None  # a new look, not yet a walk
    again = planner.listed("C", 3, 100, PATIENT_FOLDERS)
    assert again is not None and again.generation != plan.generation and again.patients.start == 3


def test_the_queue_runs_the_most_urgent_first_once_each_and_drops_the_unwanted():
    queue = ListingQueue(workers=1)
    gate, ran = threading.Event(), []
    try:
        queue.submit((0,), "first", gate.wait)  # holds the one worker while the rest queue up
        for priority, key in [((5, 1, 0), "p5 series"), ((2, 0, 0), "p2 studies"), ((2, 1, 1), "p2 sop b"),
                              ((2, 1, 0), "p2 sop a")]:
            assert queue.submit(priority, key, lambda key=key: ran.append(key))
        assert not queue.submit((1,), "p2 studies", lambda: ran.append("again"))  # queued already
        assert queue.submit((3,), "gone", lambda: ran.append("gone"), still_wanted=lambda: False)
        gate.set()
        done = threading.Event()
        queue.submit((9,), "last", done.set)
        assert done.wait(5)
        assert ran == ["p2 studies", "p2 sop a", "p2 sop b", "p5 series"]
        assert queue.dropped == 1
        assert queue.submit((1,), "p2 studies", lambda: None)  # done: may be asked again
    finally:
        queue.close()


# --------------------------------------------------------------------------- against the local archive
WIDE_SPEC = "1x300x1x1x1@16"  # 300 patients, one study, one series, one instance each


@pytest.fixture(scope="module")
def wide(nbia_archive_data):
    archive = LocalArchive(load_synthetic(WIDE_SPEC, nbia_archive_data), versions=("v4",)).start()
    yield archive
    archive.stop()


@pytest.fixture
def catalog(wide, tmp_path):
    """A catalog of the wide archive over real HTTP, as a mount has it."""
    client = NbiaClient(ClientConfig(root_url=wide.url))
    client.connect()
    store = MetadataStore(tmp_path / "meta", ttl_s=3600)
    cat = Catalog(client, store)
    wide.clear_faults()
    yield cat
    cat.close()
    store.close()
    client.close()
    wide.clear_faults()


def collection_path(archive) -> str:
    return "/" + naming.escape(archive.index.collections[0]["Collection"])


def walk_into(cat, path: str) -> None:
    """What `find` does in one patient: list it, its studies and their series."""
    node = cat.resolve(path)
    cat.children(node)
    cat.listed(node)
    for study in cat.children(node).values():
        cat.listed(study)
        for series in cat.children(study).values():
            cat.children(series)
            cat.listed(series)


@pytest.mark.mount
def test_a_walk_of_a_wide_collection_is_served_in_parallel(wide, mount_factory):
    wide.set_faults(latency_s=0.02)
    m = mount_factory(wide.url, name="wide")
    coll = m.path(collection_path(wide)[1:])
    wide.reset_counters()
    found = subprocess.run(["find", str(coll), "-name", "*.dcm"], capture_output=True, text=True,
                           check=True, timeout=300).stdout.split()
    counts = wide.counters()
    wide.clear_faults()
    assert sorted(os.path.basename(p)[:-4] for p in found) == sorted(
        i.sop_uid for s in wide.index.iter_series(None) for i in s.instances)
    # One getSOPInstanceUIDs per series, the collection's studies and series once each.
    assert counts["endpoints"].get("getSOPInstanceUIDs") == 300, counts["endpoints"]
    assert counts["total"] <= 300 + 4, counts["endpoints"]
    assert counts["max_in_flight"] >= WALK_CONNECTIONS - 2, counts["max_in_flight"]


def test_per_patient_listings_of_a_very_wide_collection_run_in_parallel_a_window_ahead(
        wide, catalog, monkeypatch):
    monkeypatch.setattr(catalog_module, "COLLECTION_WIDE_MAX_PATIENTS", 100)  # 300 patients: per patient
    coll = collection_path(wide)
    assert not catalog.collection_wide(coll[1:])
    pids = list(catalog.children(catalog.resolve(coll)))
    wide.set_faults(latency_s=0.02)
    wide.reset_counters()
    walk_into(catalog, f"{coll}/{pids[0]}")
    walk_into(catalog, f"{coll}/{pids[1]}")  # a walk: the next patients are listed ahead
    assert catalog.ahead.wait_idle(60)
    counts = wide.counters()
    assert counts["max_in_flight"] >= WALK_CONNECTIONS - 1, counts["max_in_flight"]
    ahead = range(2, 2 + WALK_WINDOW)
    for i in ahead:
        node = catalog.resolve(f"{coll}/{pids[i]}")
        series = catalog.patient_series(node.collection, node.patient_id)
        assert series and all(catalog.store.age_s(f"instances\0{r['SeriesInstanceUID']}") is not None
                              for r in series)
    assert catalog.store.age_s(f"studies\0{coll[1:]}\0{pids[2 + WALK_WINDOW + 1]}") is None  # not beyond
    # two patients by the walk itself, then three requests for each patient ahead
    assert counts["total"] == 3 * (2 + len(ahead)), counts["endpoints"]


def test_a_persons_listing_never_waits_behind_the_queue(wide, catalog, monkeypatch):
    monkeypatch.setattr(catalog_module, "COLLECTION_WIDE_MAX_PATIENTS", 100)
    coll = collection_path(wide)
    pids = list(catalog.children(catalog.resolve(coll)))
    wide.set_faults(latency_s=0.1)
    walk_into(catalog, f"{coll}/{pids[0]}")
    catalog.listed(catalog.resolve(f"{coll}/{pids[1]}"))  # a walk: 64 patients' listings queued
    assert catalog.ahead.queued() > 2 * WALK_CONNECTIONS
    wide.reset_counters()
    far = catalog.resolve(f"{coll}/{pids[-1]}")  # not planned: asked by the lister itself
    studies = catalog.children(far)
    left = catalog.ahead.queued()
    assert len(studies) == 1 and left > 0, left  # answered while the queue was still full
    assert wide.counters()["endpoints"].get("getPatientStudy", 0) <= WALK_CONNECTIONS + 1
