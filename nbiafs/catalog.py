"""Paths <-> archive entities, with the listings that define them and the sizes of instances.

    /<Collection>/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

Every level's listing comes from one metadata request, cached by `MetadataStore`:
root getCollectionValues; collection getPatient; patient getPatientStudy; study
the patient's getSeries (one request serves all studies of a patient); series
getSOPInstanceUIDs (sorted by name) plus getSeriesSize. A name is resolved
through its parent's listing, so a lookup never costs more than the listings,
and a missing name re-asks its parent at most once per `negative_ttl_s`.
The archive filters IDs case-insensitively; listings are filtered here exactly.

Sizes of instances (docs/SEMANTICS.md): a fetched instance has its exact size
(a permanent fact); the others share what is left of the series' getSeriesSize
total, spread in name order, so the sizes of a series always add up to
`TotalSizeInBytes` (if the archive's total is consistent with its files).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import cachetools

from nbiafs import naming
from nbiafs.api import models
from nbiafs.api.client import NbiaClient
from nbiafs.errors import NotFound
from nbiafs.metastore import MetadataStore
from nbiafs.walk import PATIENT_FOLDERS, SERIES_FOLDERS, STUDY_FOLDERS, ListingQueue, Plan, WalkPlanner

log = logging.getLogger(__name__)

ROOT, COLLECTION, PATIENT, STUDY, SERIES, INSTANCE = (
    "root", "collection", "patient", "study", "series", "instance")
PREVIEW = "preview"  # a series' .preview.png (--previews)
PREVIEW_NAME = ".preview.png"
# A resolved path is trusted this long without walking its parents' listings again
# (like the kernel's entry timeout; listings themselves live much longer).
NODE_TTL_S = 30.0
EXACT_FLUSH_S = 1.0              # exact sizes of a series reach the disk at most this often
EXACT_SERIES_IN_MEMORY = 16384   # series whose exact sizes are held in memory
# Studies and series of a collection with at most this many patients are asked in one request
# each, whatever is listed first (see docs/SEMANTICS.md, "Walks"); larger ones (NLST: 26,254)
# patient by patient.
COLLECTION_WIDE_MAX_PATIENTS = 10_000
# Listings fetched at once ahead of a walk: with the prefetch's 8 transfers, within the HTTP
# client's pool of 16 connections, and near TCIA's own client (10 threads).
WALK_CONNECTIONS = 8
MEMO_ENTRIES = 8192   # derived views of listings (entries by name, rows by patient) kept
NAME_STYLES = ("uid", "readable")  # --names: study and series folders by UID, or readable


@dataclass(frozen=True)
class Node:
    kind: str
    path: str
    # The UIDs of the node and its ancestors; "" below its depth (a patient has no study).
    collection: str = ""
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    record: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    stamp: str | None = None  # the archive date its mtime comes from

    @property
    def is_dir(self) -> bool:
        return self.kind not in (INSTANCE, PREVIEW)

    def child(self, kind: str, name: str, record: dict, **ids) -> "Node":
        path = ("" if self.path == "/" else self.path) + "/" + name
        base = {k: getattr(self, k) for k in ("collection", "patient_id", "study_uid", "series_uid")}
        if kind == STUDY:
            stamp = record.get("StudyDate")
        elif kind == SERIES:
            stamp = record.get("MaxSubmissionTimestamp") or record.get("SeriesDate")
        else:
            stamp = self.stamp  # an instance has its series' date
        return Node(kind, path, **{**base, **ids}, record=record, stamp=stamp)


ROOT_NODE = Node(ROOT, "/")


@dataclass(frozen=True)
class Selection:
    """What part of the archive a mount shows (`--collection`, `--modality`, `--manifest`,
    `--cart`); None is no restriction. Collections match case-insensitively, as the archive's
    own filter does; `series` are exact SeriesInstanceUIDs with their (Collection, PatientID)."""
    collections: frozenset | None = None       # lower-cased names
    modalities: frozenset | None = None        # upper-cased
    series: dict | None = None                 # SeriesInstanceUID -> (Collection, PatientID)

    @functools.cached_property
    def patients(self) -> frozenset:
        """(Collection, PatientID) of the selected series."""
        return frozenset((self.series or {}).values())

    @property
    def everything(self) -> bool:
        return self.collections is None and self.modalities is None and self.series is None

    def collection_ok(self, name: str) -> bool:
        if self.collections is not None and name.lower() not in self.collections:
            return False
        return self.series is None or any(c == name for c, _ in self.patients)

    def series_ok(self, row: dict) -> bool:
        if self.series is not None and row.get("SeriesInstanceUID") not in self.series:
            return False
        return self.modalities is None or str(row.get("Modality", "")).upper() in self.modalities


EVERYTHING = Selection()


class Catalog:
    def __init__(self, client: NbiaClient, store: MetadataStore, negative_ttl_s: float = 5.0,
                 node_ttl_s: float = NODE_TTL_S, selection: Selection = EVERYTHING, names: str = "uid",
                 previews: bool = False):
        if names not in NAME_STYLES:
            raise ValueError(f"names must be one of {', '.join(NAME_STYLES)}")
        self.client = client
        self.store = store
        self.selection = selection
        self.readable = names == "readable"
        self.previews = previews
        self.negative_ttl_s = negative_ttl_s
        self._lock = threading.Lock()  # guards _memo, _nodes and the exact-size fields
        self._memo: cachetools.LRUCache = cachetools.LRUCache(maxsize=MEMO_ENTRIES)
        self._exact_versions: dict[str, int] = {}
        self._nodes: cachetools.TTLCache = cachetools.TTLCache(maxsize=65536, ttl=node_ttl_s)
        self._exact: dict[str, dict[str, int]] = {}  # series -> sop -> exact size
        self._dirty: set[str] = set()                # series whose exact sizes are not on disk yet
        self._flushed_at: dict[str, float] = {}
        self.planner = WalkPlanner()
        self.ahead = ListingQueue(WALK_CONNECTIONS)

    # ------------------------------------------------------------------ listings (one request each)
    def collections(self, max_age_s=None) -> list[str]:
        return self.store.listing("collections", self.client.get_collection_values, max_age_s)

    def patients(self, collection: str, max_age_s=None) -> list[dict]:
        return self.store.listing(
            f"patients\0{collection}",
            lambda: [p.raw for p in in_collection(self.client.get_patients(collection), collection)],
            max_age_s)

    def collection_wide(self, collection: str) -> bool:
        """Whether studies and series of this collection are asked for all patients at once."""
        return len(self.patients(collection)) <= COLLECTION_WIDE_MAX_PATIENTS

    def studies(self, collection: str, patient_id: str, max_age_s=None) -> list[dict]:
        return self._patient_listing("studies", collection, patient_id, max_age_s,
                                     lambda pid: self.client.get_patient_studies(collection, pid))

    def patient_series(self, collection: str, patient_id: str, max_age_s=None) -> list[dict]:
        return self._patient_listing("series", collection, patient_id, max_age_s,
                                     lambda pid: self.client.get_series(collection=collection, patient_id=pid))

    def _patient_key(self, what: str, collection: str, patient_id: str) -> str:
        """Store key of a patient's studies or series: the collection's listing when it is asked
        collection-wide, else the patient's own."""
        if self.collection_wide(collection):
            return f"{what}\0{collection}"
        return f"{what}\0{collection}\0{patient_id}"

    def _patient_listing(self, what: str, collection: str, patient_id: str, max_age_s, fetch) -> list[dict]:
        """`fetch(patient_id)` asks for one patient's records, `fetch(None)` for the collection's."""
        key = self._patient_key(what, collection, patient_id)
        if self.collection_wide(collection):
            rows = self.store.listing(
                key, lambda: [r.raw for r in in_collection(fetch(None), collection)], max_age_s)
            return self._by_patient(key, rows).get(patient_id, [])
        # The archive matches PatientID case-insensitively: keep the patient's own rows.
        return self.store.listing(
            key, lambda: [r.raw for r in in_collection(fetch(patient_id), collection)
                          if r.patient_id == patient_id], max_age_s)

    def _by_patient(self, key: str, rows: list[dict]) -> dict[str, list[dict]]:
        def group(rows):
            out: dict[str, list[dict]] = {}
            for row in rows:
                pid = models.as_str(row.get("PatientID", row.get("PatientId")))
                if pid is not None:
                    out.setdefault(pid, []).append(row)
            return out
        return self._memoised(f"bypatient\0{key}", rows, group)

    def series_record(self, node: Node) -> dict:
        """The getSeries record of the series of `node` (a series or an instance)."""
        rows = self.patient_series(node.collection, node.patient_id)
        by_uid = self._memoised(f"byuid\0{node.collection}\0{node.patient_id}", rows,
                                lambda v: {r.get("SeriesInstanceUID"): r for r in v})
        return by_uid.get(node.series_uid, {})

    def series_total(self, node: Node) -> int | None:
        """Bytes of the series: getSeries' FileSize when the archive gave it (no request),
        else getSeriesSize's TotalSizeInBytes."""
        total = models.as_int(self.series_record(node).get("FileSize"))
        if total is not None:
            return total
        size = self.series_size(node.series_uid)
        return size[0] if size else None

    def instances(self, series_uid: str, max_age_s=None) -> list[str]:
        def fetch():
            return sorted(set(self.client.get_sop_instance_uids(series_uid)))
        return self.store.listing(f"instances\0{series_uid}", fetch, max_age_s)

    def series_size(self, series_uid: str) -> list[int] | None:
        def fetch():
            size = self.client.get_series_size(series_uid)
            return None if size is None else [size.total_bytes, size.object_count]
        return self.store.listing(f"size\0{series_uid}", fetch)

    # ------------------------------------------------------------------ children
    def children(self, node: Node, max_age_s=None) -> dict[str, Node]:
        """The entries of directory `node`, by escaped name (a dict, in name order)."""
        return self._entries(node, max_age_s)[0]

    def child(self, node: Node, name: str, max_age_s=None) -> Node | None:
        """The entry `name` of directory `node`: a listed name or, with readable names, the UID
        name of a study or series (resolved, never listed)."""
        listed, aliases = self._entries(node, max_age_s)
        return listed.get(name) or aliases.get(name)

    def _entries(self, node: Node, max_age_s=None) -> tuple[dict[str, Node], dict[str, Node]]:
        """(listed entries by name, in name order; UID names of readable entries)."""
        sel = self.selection
        value: list[Any]
        if node.kind == ROOT:
            key, value = "collections", self.collections(max_age_s)
            make = lambda v: [(naming.escape(c), node.child(COLLECTION, naming.escape(c),  # noqa: E731
                                                            {"Collection": c}, collection=c), True)
                              for c in v if sel.collection_ok(c)]
        elif node.kind == COLLECTION:
            if not sel.collection_ok(node.collection):
                raise NotFound(node.path)
            key, value = f"patients\0{node.collection}", self.patients(node.collection, max_age_s)
            make = lambda v: self._named(  # noqa: E731
                node, PATIENT, [p for p in v if self._patient_selected(node.collection, p)],
                "PatientId", "PatientID")
        elif node.kind == PATIENT:
            key = f"studies\0{node.collection}\0{node.patient_id}"
            value = self.studies(node.collection, node.patient_id, max_age_s)
            if sel.everything:
                make = lambda v: self._named(node, STUDY, v, "StudyInstanceUID")  # noqa: E731
            else:
                chosen = {r.get("StudyInstanceUID") for r in self.patient_series(node.collection, node.patient_id)
                          if sel.series_ok(r)}
                make = lambda v: self._named(  # noqa: E731
                    node, STUDY, [r for r in v if r.get("StudyInstanceUID") in chosen], "StudyInstanceUID")
                key += "\0" + ",".join(sorted(c for c in chosen if c))
        elif node.kind == STUDY:
            key = f"series\0{node.collection}\0{node.patient_id}"
            value = self.patient_series(node.collection, node.patient_id, max_age_s)
            make = lambda v: self._named(  # noqa: E731
                node, SERIES, [s for s in v if s.get("StudyInstanceUID") == node.study_uid and sel.series_ok(s)],
                "SeriesInstanceUID")
        elif node.kind == SERIES:
            key, value = f"instances\0{node.series_uid}", self.instances(node.series_uid, max_age_s)
            make = lambda v: [(naming.instance_file_name(sop), node.child(  # noqa: E731
                INSTANCE, naming.instance_file_name(sop),
                {"SOPInstanceUID": sop, "SeriesInstanceUID": node.series_uid}, sop_uid=sop), True)
                for sop in v] + self._preview_entry(node, v)
        else:
            raise NotFound(f"{node.path} is not a directory")

        def derive(v):
            entries = make(v)
            return (dict(sorted(((name, n) for name, n, listed in entries if listed), key=lambda e: e[0])),
                    {name: n for name, n, listed in entries if not listed})
        return self._memoised(key + f"\0{node.kind}\0{node.path}", value, derive)

    def _preview_entry(self, series: Node, sops: list[str]) -> list:
        """[(name, node, listed)] of the series' preview: the middle instance in name order."""
        if not self.previews or not sops:
            return []
        sop = sops[len(sops) // 2]
        return [(PREVIEW_NAME, series.child(PREVIEW, PREVIEW_NAME, {"SeriesInstanceUID": series.series_uid},
                                              sop_uid=sop), True)]

    def _patient_selected(self, collection: str, record: dict) -> bool:
        """Whether a patient has a series in the selection (always, without a selection)."""
        sel = self.selection
        if sel.modalities is None and sel.series is None:
            return True
        pid = models.as_str(record.get("PatientId", record.get("PatientID")))
        if pid is None:
            return False
        if sel.series is not None and (collection, pid) not in sel.patients:
            return False
        if sel.modalities is None:
            return True
        if self.collection_wide(collection):  # the collection's series are one listing: free
            return any(sel.series_ok(r) for r in self.patient_series(collection, pid))
        return pid in self._patients_with_modalities(collection)

    def _patients_with_modalities(self, collection: str) -> frozenset:
        modalities = sorted(self.selection.modalities or ())

        def fetch():
            return sorted({pid for m in modalities for pid in self.client.get_patients_by_modality(collection, m)})
        ids = self.store.listing(f"patients-by-modality\0{collection}\0{','.join(modalities)}", fetch)
        return self._memoised(f"modality-set\0{collection}", ids, frozenset)

    def _named(self, parent: Node, kind: str, records: list[dict], *id_keys) -> list:
        """[(name, node, listed)] of records named by their ID; with readable names, studies and
        series are listed by their readable name and also reachable, unlisted, by their ID."""
        id_field = {PATIENT: "patient_id", STUDY: "study_uid", SERIES: "series_uid"}[kind]
        chosen: dict[str, dict] = {}
        for record in records:
            ident = next((models.as_str(record.get(k)) for k in id_keys if record.get(k) is not None), None)
            if ident is not None and ident not in chosen:
                chosen[ident] = record  # a record without its ID cannot be a path; a duplicate shows once
        readable = {}
        if self.readable and kind in (STUDY, SERIES):
            label = naming.study_label if kind == STUDY else naming.series_label
            readable = naming.readable_names({ident: label(r) for ident, r in chosen.items()})
        out = []
        for ident, record in chosen.items():
            name = naming.escape(ident)
            shown = readable.get(ident, name)
            out.append((shown, parent.child(kind, shown, record, **{id_field: ident}), True))
            if shown != name:
                out.append((name, parent.child(kind, name, record, **{id_field: ident}), False))
        return out

    def _memoised(self, key: str, value, derive: Callable):
        """`derive(value)`, worked out once per value (kept while `value` is the listing's
        current object, `MEMO_ENTRIES` of them, least recently used forgotten first)."""
        with self._lock:
            memo = self._memo.get(key)
        if memo is not None and memo[0] is value:
            return memo[1]
        derived = derive(value)
        with self._lock:
            self._memo[key] = (value, derived)
        return derived

    # ------------------------------------------------------------------ resolution
    def resolve(self, path: str) -> Node:
        """The node at `path`; resolved paths are remembered for `node_ttl_s` (the hot path)."""
        with self._lock:
            node = self._nodes.get(path)
        if node is None:
            node = self._walk(path)
            with self._lock:
                self._nodes[path] = node
        return node

    def _walk(self, path: str) -> Node:
        node = ROOT_NODE
        for name in (p for p in path.split("/") if p):
            if not node.is_dir:
                raise NotFound(path)
            found = self.child(node, name)
            if found is None:
                age = self._listing_age(node)
                if age is None or age < self.negative_ttl_s:
                    raise NotFound(path)
                found = self.child(node, name, max_age_s=self.negative_ttl_s)  # maybe new: ask once
                if found is None:
                    raise NotFound(path)
            node = found
        return node

    def _listing_age(self, node: Node) -> float | None:
        if node.kind == ROOT:
            key = "collections"
        elif node.kind == COLLECTION:
            key = f"patients\0{node.collection}"
        elif node.kind == SERIES:
            key = f"instances\0{node.series_uid}"
        else:
            key = self._patient_key("studies" if node.kind == PATIENT else "series",
                                    node.collection, node.patient_id)
        return self.store.age_s(key)

    # ------------------------------------------------------------------ walks
    def listed(self, node: Node) -> None:
        """A directory was listed: tell the walk planner (`nbiafs.walk`) and queue the listings
        it plans, patient by patient, in the order the walk will want them."""
        if node.kind not in (PATIENT, STUDY, SERIES):
            return
        pids, index = self._patient_order(node.collection)
        patient = index.get(node.patient_id)
        if patient is None:
            return
        depth = {PATIENT: PATIENT_FOLDERS, STUDY: STUDY_FOLDERS, SERIES: SERIES_FOLDERS}[node.kind]
        plan = self.planner.listed(node.collection, patient, len(pids), depth,
                                   node.series_uid if node.kind == SERIES else None)
        if plan is not None:
            log.debug("walk of %s: listing patients %d-%d of %d ahead", node.collection, plan.patients.start,
                      plan.patients.stop - 1, len(pids))
            for i in plan.patients:
                self._plan_patient(plan, i, pids[i])

    def _patient_order(self, collection: str) -> tuple[list[str], dict[str, int]]:
        """The collection's listed patients in name order (a walk's order), and their indexes."""
        node = ROOT_NODE.child(COLLECTION, naming.escape(collection), {"Collection": collection},
                               collection=collection)
        entries = self.children(node)
        return self._memoised(f"order\0{collection}", entries, lambda e: (
            [n.patient_id for n in e.values()], {n.patient_id: i for i, n in enumerate(e.values())}))

    def _plan_patient(self, plan: Plan, i: int, pid: str) -> None:
        collection = plan.collection

        def wanted() -> bool:
            return self.planner.current(collection, plan.generation)
        self.ahead.submit((i, 0, 0), ("studies", collection, pid), lambda: self.studies(collection, pid), wanted)
        if plan.depth >= STUDY_FOLDERS:
            then = (lambda: self._plan_series(i, collection, pid, wanted)) if plan.depth >= SERIES_FOLDERS else (
                lambda: self.patient_series(collection, pid))
            self.ahead.submit((i, 0, 1), ("series", collection, pid, plan.depth), then, wanted)

    def _plan_series(self, i: int, collection: str, pid: str, wanted: Callable[[], bool]) -> None:
        """The patient's series listed (asked, or cut from the collection's): queue their SOP
        listings, in the order the walk visits them."""
        rows = [r for r in self.patient_series(collection, pid) if self.selection.series_ok(r)]
        rows.sort(key=lambda r: (str(r.get("StudyInstanceUID")), str(r.get("SeriesInstanceUID"))))
        for k, row in enumerate(rows):
            uid = row.get("SeriesInstanceUID")
            if uid:
                self.ahead.submit((i, 1, k), ("instances", uid), functools.partial(self.instances, uid), wanted)

    def close(self) -> None:
        self.ahead.close()
        self.flush()

    # ------------------------------------------------------------------ sizes
    def instance_size(self, node: Node) -> tuple[int, bool]:
        """(st_size, exact) of an instance."""
        return self.series_sizes(node).get(node.sop_uid, (0, False))

    def series_sizes(self, node: Node) -> dict[str, tuple[int, bool]]:
        series_uid = node.series_uid
        sops = self.instances(series_uid)
        total = self.series_total(node)
        key = f"sizes\0{series_uid}"
        with self._lock:
            version = self._exact_versions.get(series_uid, 0)
            memo = self._memo.get(key)
        if memo is not None and memo[0] is sops and memo[1] == (total, version):
            return memo[2]
        exact = self._exact_sizes(series_uid)
        sizes = spread_sizes(sops, total or 0, exact)
        with self._lock:
            self._memo[key] = (sops, (total, version), sizes)
        return sizes

    def _exact_sizes(self, series_uid: str) -> dict[str, int]:
        """A copy of the exact sizes known for the series (loaded from disk once)."""
        with self._lock:
            known = self._exact.get(series_uid)
            if known is not None:
                return dict(known)
        loaded = dict(self.store.get(f"exact\0{series_uid}", {}) or {})
        with self._lock:
            known = self._exact.setdefault(series_uid, loaded)
            return dict(known)

    def exact_size(self, series_uid: str, sop_uid: str) -> int | None:
        """The exact size recorded for an instance in this mount (memory only), if any."""
        with self._lock:
            known = self._exact.get(series_uid)
            return known.get(sop_uid) if known is not None else None

    def record_exact_size(self, series_uid: str, sop_uid: str, size: int) -> None:
        """Remember a fetched instance's size: at once in memory, on disk (in the background) at
        most once a second per series, and at `flush`; a size lost in a crash is recorded again
        at the next open."""
        self._exact_sizes(series_uid)  # loaded
        with self._lock:
            known = self._exact[series_uid]
            if known.get(sop_uid) == size:
                return
            known[sop_uid] = size
            self._exact_versions[series_uid] = self._exact_versions.get(series_uid, 0) + 1
            self._dirty.add(series_uid)
            due = time.monotonic() - self._flushed_at.get(series_uid, 0.0) >= EXACT_FLUSH_S
        if due:  # the store writes it to disk behind this call: not on the open's path
            try:
                self._persist(series_uid)
            except RuntimeError:  # the store closed meanwhile (unmounting): a lost size is learnt again
                pass

    def record_exact_sizes(self, series_uid: str, sizes: dict[str, int]) -> None:
        """Remember the exact sizes of many instances of a series at once (a source listed
        them before fetching); written to disk at once, behind the caller."""
        self._exact_sizes(series_uid)  # loaded
        with self._lock:
            known = self._exact[series_uid]
            if all(known.get(sop) == size for sop, size in sizes.items()):
                return
            known.update(sizes)
            self._exact_versions[series_uid] = self._exact_versions.get(series_uid, 0) + 1
            self._dirty.add(series_uid)
        try:
            self._persist(series_uid)
        except RuntimeError:  # the store closed meanwhile (unmounting)
            pass

    def flush(self) -> None:
        """Write every exact size not yet on disk (at unmount)."""
        with self._lock:
            dirty = list(self._dirty)
        for series_uid in dirty:
            self._persist(series_uid)

    def _persist(self, series_uid: str) -> None:
        with self._lock:
            self._dirty.discard(series_uid)
            self._flushed_at[series_uid] = time.monotonic()
            snapshot = dict(self._exact.get(series_uid, {}))
            if len(self._exact) > EXACT_SERIES_IN_MEMORY and not self._dirty:
                self._exact.clear()
        self.store.put(f"exact\0{series_uid}", snapshot)


def in_collection(records: list, collection: str) -> list:
    """The records of exactly `collection`. The archive matches Collection case-insensitively,
    so asking for "X" also returns the records of a collection "x"; a record without a
    Collection is kept, and if no record spells the name exactly, the case-insensitive matches
    are kept (an archive spelling the name differently from getCollectionValues)."""
    exact = [r for r in records if r.collection in (None, collection)]
    if exact:
        return exact
    return [r for r in records if r.collection.lower() == collection.lower()]


def spread_sizes(sops: list[str], total: int, exact: dict[str, int]) -> dict[str, tuple[int, bool]]:
    """Exact sizes where known; the rest of `total` spread over the others in name order."""
    unfetched = [s for s in sops if s not in exact]
    remaining = max(0, total - sum(exact[s] for s in sops if s in exact))
    base, extra = divmod(remaining, len(unfetched)) if unfetched else (0, 0)
    sizes = {s: (exact[s], True) for s in sops if s in exact}
    for i, sop in enumerate(unfetched):
        sizes[sop] = (base + (1 if i < extra else 0), False)
    return sizes
