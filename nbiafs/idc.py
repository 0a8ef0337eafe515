"""IDC's open S3 mirror as a byte source: a series' instances come from NCI's Imaging Data
Commons buckets where they are the very bytes TCIA would serve, from TCIA otherwise.

A series is routed once per mount (`route`), in order of cost:

1. IDC's series index (idcindex.py) holds it: its bucket, its prefix (one immutable version),
   `instanceCount` and exact bytes. Not there: TCIA (never mirrored, limited access, redacted).
2. TCIA's getSeriesSize says the same count and bytes. Else TCIA revised it after IDC's copy.
3. The prefix's listing (exact Size and ETag per object) agrees with the index, and the first
   `header_bytes` of each object (ranged GETs, `workers` at once) name SOPInstanceUIDs that are
   exactly TCIA's getSOPInstanceUIDs, each once. The map SOP -> (object, size, ETag) is kept
   in the metadata store for good (the prefix names one version): a remount lists nothing.
   The sizes are told to the catalog at once: `stat` is exact from then on.
Any disagreement sends the whole series to TCIA, counted by reason, logged once per reason.

Then each instance is read from S3 only if its ETag is an MD5 (32 hex digits: one part) equal
to TCIA's md5 of that SOPInstanceUID (v4 getMD5HashForImage, asked beside the GET); and what
arrives must hash to it, have the listed size, be that instance's DICOM file and end whole
(verify.refusal). Else that instance comes from TCIA. Nothing served from IDC differs from
what TCIA would serve.

The mirror is an accelerator: unreachable, too slow (`read_timeout_s`, `get_budget_s`) or 5xx
marks it down (one line); TCIA serves everything until a probe finds it back (one line). A 403
or 404 sends that series (or instance) to TCIA. Requests are unsigned (IDC's buckets are
public; credentials in the environment would only risk a 403), path-style, in us-east-1; the
endpoint is boto3's own (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`).

Locking: `_lock` guards `stats`, `_routes`, `_resolving`, `_down_since`, `_logged`, `_refused`, `_pools`, `_planner`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import cachetools

from nbiafs.dicomhead import instance_uid_of_head
from nbiafs.errors import NbiaError
from nbiafs.idcindex import MirroredSeries, SeriesIndex
from nbiafs.s3errors import copy_body
from nbiafs.s3errors import error_code as _code
from nbiafs.s3errors import error_reason as _reason
from nbiafs.verify import refusal

log = logging.getLogger(__name__)

# TCIA's own servers: with --source auto, the mirror is used for these (IDC mirrors TCIA only).
TCIA_HOSTS = frozenset({"services.cancerimagingarchive.net", "nbia.cancerimagingarchive.net",
                        "public.cancerimagingarchive.net"})
_MD5 = re.compile(r"^[0-9a-f]{32}$")
CHUNK = 1024 * 1024
ROUTES_KEPT = 16_384          # routes remembered in memory (the maps themselves are in the metadata store)
TRANSIENT_ROUTE_S = 30.0      # a series sent to TCIA because the mirror was down is routed again after this
ORIGIN_KEY = "origin\0"       # metadata store: which source this cache's copy of an instance came from
# An instance that failed so is not asked of the mirror again by this mount (its copy is not TCIA's).
LASTING_FAILURES = frozenset({"etag", "md5 differs", "bytes differ", "refused"})


@dataclass(frozen=True)
class MirrorConfig:
    source: str = "auto"               # --source: auto (IDC where verified), tcia (never S3), idc (IDC required)
    index: Path | None = None          # --idc-index; None: the installed idc-index-data's
    workers: int = 32                  # concurrent S3 GETs (headers and whole objects); S3 serves thousands a second
    header_bytes: int = 8192           # ranged GET of an object's first bytes: its file meta names the instance
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 5.0        # silence that marks the mirror down
    get_budget_s: float = 30.0         # one object, whole; past this TCIA serves it
    md5_wait_s: float = 10.0           # TCIA's md5 of an instance read from the mirror
    recheck_s: float = 30.0            # a mirror that is down is probed this often
    route_wait_s: float = 5.0          # a stat waits this long for its series' route being worked out


@dataclass(frozen=True)
class Route:
    where: str                          # "idc" or "tcia"
    reason: str = ""                    # why TCIA
    kind: str = ""                      # the reason's kind, counted in the status view
    series: MirroredSeries | None = None
    objects: dict = field(default_factory=dict)  # sop -> (object name, size, etag)
    until: float = math.inf             # a transient route to TCIA is worked out again after this


class _Down(Exception):
    """The mirror did not answer usefully (unreachable, too slow, 5xx, cut short)."""


class _Refused(Exception):
    """The mirror answered no for this request (403, 404, no such bucket)."""


class _Disagrees(Exception):
    """The mirror's listing or headers disagree with the index or with TCIA."""


def wanted(config: MirrorConfig, root_url: str, explicit_index: bool) -> bool:
    """Whether a mount uses the mirror: `idc` always; `auto` for TCIA's own servers, or when an
    index was named (a mirror of a private deployment, tests); `tcia` never."""
    if config.source == "tcia":
        return False
    if config.source == "idc" or explicit_index:
        return True
    from urllib.parse import urlsplit
    return (urlsplit(root_url).hostname or "").lower() in TCIA_HOSTS


class IdcMirror:
    def __init__(self, config: MirrorConfig, index: SeriesIndex, store,
                 tcia_size: Callable[[str], list | None], tcia_sops: Callable[[str], list],
                 md5_of: Callable[[str], concurrent.futures.Future | None],
                 on_sizes: Callable[[str, dict], None] = lambda series_uid, sizes: None, s3=None,
                 clock=time.monotonic):
        self.config = config
        self.index = index
        self._store = store
        self._tcia_size = tcia_size
        self._tcia_sops = tcia_sops
        self._md5_of = md5_of
        self._on_sizes = on_sizes
        self._s3 = s3
        self._http: ObjectReads | None = None
        self._client_lock = threading.RLock()  # guards _s3 and _http (made once, slowly: not under _lock)
        self._clock = clock
        self._lock = threading.Lock()
        self._routes: cachetools.LRUCache = cachetools.LRUCache(maxsize=ROUTES_KEPT)
        self._resolving: dict[str, threading.Event] = {}
        self._down_since: float | None = None
        self._probe_bucket: str | None = None
        self._logged: set[str] = set()
        self._refused: cachetools.LRUCache = cachetools.LRUCache(maxsize=65_536)  # instances TCIA serves
        self._pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._planner: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self.stats: dict = {"files": 0, "bytes": 0, "series_idc": 0, "series_tcia": 0, "instances_tcia": 0,
                            "tcia_files": 0, "tcia_bytes": 0, "errors": 0, "outages": 0,
                            "reasons": collections.Counter()}

    # ------------------------------------------------------------------ lifecycle
    def connect(self) -> None:
        """Make the S3 clients now, before the mount is up (boto3 takes ~0.2 s to load its
        models): the first series routed need not wait for them. No request is sent (the
        buckets are named by the index, series by series)."""
        self._objects_http()

    def client(self):
        """boto3's client (listings) — its endpoint is also the one object GETs go to."""
        with self._client_lock:
            if self._s3 is None:
                self._s3 = make_client(self.config)
            return self._s3

    def _objects_http(self) -> "ObjectReads":
        with self._client_lock:
            if self._http is None:
                self._http = ObjectReads(self.client().meta.endpoint_url, self.config)
            return self._http

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            pools = list(self._pools.values()) + ([self._planner] if self._planner is not None else [])
            self._pools, self._planner = {}, None
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        self.index.close()

    def _workers(self, kind: str) -> concurrent.futures.ThreadPoolExecutor:
        """The pool of `kind`: "route" (a copy's listing), "heads" (its header reads) or "gets"
        (whole objects); pools apart, so that work waiting for a route never holds the workers
        the route needs. Made on first use: after the daemon has forked."""
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("closed")
            pool = self._pools.get(kind)
            if pool is None:
                pool = self._pools[kind] = concurrent.futures.ThreadPoolExecutor(self.config.workers,
                                                                                 f"nbia-idc-{kind}")
            return pool

    # ------------------------------------------------------------------ health
    def usable(self) -> bool:
        with self._lock:
            return self._down_since is None and not self._stop.is_set()

    def _went_down(self, reason: str, bucket: str) -> None:
        with self._lock:
            self.stats["errors"] += 1
            if self._down_since is not None or self._stop.is_set():
                return
            self._down_since = self._clock()
            self._probe_bucket = bucket
            self.stats["outages"] += 1
        log.warning("IDC's mirror is not answering (%s): reading from TCIA until it is back", reason)
        threading.Thread(target=self._probe_loop, name="nbia-idc-probe", daemon=True).start()

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.config.recheck_s):
            try:
                self.client().list_objects_v2(Bucket=self._probe_bucket, MaxKeys=1)
            except Exception:  # noqa: BLE001 - still down
                continue
            with self._lock:
                since, self._down_since = self._down_since, None
                # Series sent to TCIA while it was down are routed again.
                for uid in [u for u, r in self._routes.items() if r.until != math.inf]:
                    del self._routes[uid]
            log.warning("IDC's mirror is back after %.0f s", self._clock() - (since or self._clock()))
            return

    def _note(self, kind: str, message: str, *args) -> None:
        """Count a fallback by kind; log the first of each kind (the rest at debug level)."""
        with self._lock:
            self.stats["reasons"][kind] += 1
            first = kind not in self._logged
            self._logged.add(kind)
        (log.warning if first else log.debug)(message, *args)

    # ------------------------------------------------------------------ routes
    def mirrored(self, series_uid: str) -> bool:
        """The index holds the series and it is not known to come from TCIA (no request)."""
        with self._lock:
            route = self._routes.get(series_uid)
        if route is not None and route.until > self._clock():
            return route.where == "idc"
        return self.index.lookup(series_uid) is not None

    def known_route(self, series_uid: str) -> Route | None:
        with self._lock:
            route = self._routes.get(series_uid)
        return route if route is not None and route.until > self._clock() else None

    def route(self, series_uid: str) -> Route:
        """Where the series' instances come from, worked out once (concurrent callers wait for
        the one working it out)."""
        while True:
            route = self.known_route(series_uid)
            if route is not None:
                return route
            event, mine = self._claim(series_uid)
            if mine:
                return self._work_out(series_uid, event)
            event.wait()

    def _claim(self, series_uid: str) -> tuple[threading.Event, bool]:
        """The event of the series' route being worked out, and whether the caller works it out."""
        with self._lock:
            event = self._resolving.get(series_uid)
            if event is not None:
                return event, False
            event = self._resolving[series_uid] = threading.Event()
            return event, True

    def _work_out(self, series_uid: str, event: threading.Event) -> Route:
        try:
            route = self._resolve(series_uid)
        except Exception as exc:  # noqa: BLE001 - a route that cannot be worked out is TCIA's, for now
            route = Route("tcia", f"its route could not be worked out ({exc})", "error",
                          until=self._clock() + TRANSIENT_ROUTE_S)
            log.debug("series %s: %s", series_uid, route.reason)
        with self._lock:
            self._routes[series_uid] = route
            del self._resolving[series_uid]
            if route.where == "idc":
                self.stats["series_idc"] += 1
            elif route.series is not None:
                self.stats["series_tcia"] += 1
        event.set()
        return route

    def prepare(self, series_uid: str) -> None:
        """A series folder was listed: work its route out in the background, so that the stats
        that follow get exact sizes (they wait for it: `settle`)."""
        if self._stop.is_set() or self.known_route(series_uid) is not None or not self.mirrored(series_uid):
            return
        event, mine = self._claim(series_uid)  # at once: a stat right after the listing waits for it
        if not mine:
            return
        with self._lock:
            if self._planner is None:
                self._planner = concurrent.futures.ThreadPoolExecutor(4, "nbia-idc-route")
            planner = self._planner
        try:
            planner.submit(self._work_out, series_uid, event)
        except RuntimeError:  # closing
            self._work_out(series_uid, event)

    def settle(self, series_uid: str) -> None:
        """If the series' route is being worked out, wait for it (at most `route_wait_s`)."""
        with self._lock:
            event = self._resolving.get(series_uid)
        if event is not None:
            event.wait(self.config.route_wait_s)

    def _resolve(self, series_uid: str) -> Route:
        row = self.index.lookup(series_uid)
        if row is None:
            return Route("tcia", "not in IDC's index", "not mirrored")
        if not self.usable():
            return self._to_tcia(row, "mirror down", "the mirror is not answering", transient=True)
        # The copy's listing and headers are read while TCIA is asked for the series' size: one
        # round trip to TCIA less before the first stat. (A copy found revised was read for
        # nothing, cheaply; its map is right for its UUID and kept.)
        try:
            listing = self._workers("route").submit(
                self._store.listing, f"idc-objects\0{row.series_uuid}", lambda: self._objects(row), math.inf)
        except RuntimeError:  # closing
            return self._to_tcia(row, "mirror down", "unmounting", transient=True)
        size = self._tcia_size(series_uid)
        if size is None:
            return self._to_tcia(row, "no size", "TCIA gives no size for it")
        tcia_bytes, tcia_count = size
        if (tcia_bytes, tcia_count) != (row.size_bytes, row.instances):
            listing.cancel()
            return self._to_tcia(row, "revised on TCIA",
                                 f"TCIA has {tcia_count} instances, {tcia_bytes} bytes; IDC's copy "
                                 f"{row.instances}, {row.size_bytes}")
        try:
            objects = listing.result()
        except _Disagrees as exc:
            return self._to_tcia(row, "listing", str(exc))
        except _Refused as exc:
            return self._to_tcia(row, "refused", str(exc))
        except _Down as exc:
            self._went_down(str(exc), row.bucket)
            return self._to_tcia(row, "mirror down", str(exc), transient=True)
        sops = self._tcia_sops(series_uid)
        if len(sops) != len(objects) or set(sops) != set(objects):
            return self._to_tcia(row, "instances differ", f"its {len(objects)} objects name other instances "
                                 f"than TCIA's {len(sops)}")
        self._on_sizes(series_uid, {sop: obj[1] for sop, obj in objects.items()})
        return Route("idc", series=row, objects=objects)

    def _to_tcia(self, row: MirroredSeries, kind: str, detail: str, transient: bool = False) -> Route:
        self._note(kind, "series %s comes from TCIA, not IDC's mirror: %s", row.series_uid, detail)
        return Route("tcia", detail, kind, series=row,
                     until=self._clock() + TRANSIENT_ROUTE_S if transient else math.inf)

    def _objects(self, row: MirroredSeries) -> dict:
        """sop -> (object name, size, etag) of the series' prefix, checked against the index."""
        listed_at = self._clock()
        listed = self._list(row)
        if len(listed) != row.instances or sum(size for _n, size, _e in listed) != row.size_bytes:
            raise _Disagrees(f"its listing holds {len(listed)} objects, "
                             f"{sum(size for _n, size, _e in listed)} bytes; the index says {row.instances}, "
                             f"{row.size_bytes}")
        started = self._clock()
        pool = self._workers("heads")
        futures = [pool.submit(self._head_of, row, name) for name, _size, _etag in listed]
        out: dict[str, tuple[str, int, str]] = {}
        for (name, size, etag), future in zip(listed, futures):
            sop = future.result()
            if sop is None:
                raise _Disagrees(f"object {name} names no instance in its first bytes")
            if sop in out:
                raise _Disagrees(f"two objects hold instance {sop}")
            out[sop] = (name, size, etag)
        log.debug("series %s: %d objects of its copy on IDC listed in %.3f s, named in %.3f s", row.series_uid,
                  len(out), started - listed_at, self._clock() - started)
        return out

    def _list(self, row: MirroredSeries) -> list[tuple[str, int, str]]:
        from botocore.exceptions import ClientError
        out = []
        try:
            paginator = self.client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=row.bucket, Prefix=row.prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(row.prefix):]
                    if "/" not in name and name:
                        out.append((name, int(obj["Size"]), str(obj.get("ETag", "")).strip('"').lower()))
        except ClientError as exc:
            code = _code(exc)
            if _transient(code):
                raise _Down(f"listing {row.bucket}: HTTP {code}") from None
            raise _Refused(f"listing s3://{row.bucket}/{row.prefix} refused ({code})") from None
        except Exception as exc:  # noqa: BLE001 - connection errors and timeouts
            raise _Down(_reason(exc)) from None
        return sorted(out)

    def _head_of(self, row: MirroredSeries, name: str) -> str | None:
        """The instance an object holds, from its first bytes (more if its header is longer)."""
        for span in (self.config.header_bytes, 16 * self.config.header_bytes):
            head = self._range(row.bucket, row.prefix + name, span)
            sop = instance_uid_of_head(head)
            if sop is not None or len(head) < span:
                return sop
        return None

    def _range(self, bucket: str, key: str, span: int) -> bytes:
        with self._objects_http().get(bucket, key, span) as r:
            try:
                return r.read()
            except Exception as exc:  # noqa: BLE001 - urllib3's errors of a body cut short
                raise _Down(_reason(exc)) from None

    # ------------------------------------------------------------------ instances
    def get(self, series_uid: str, sop_uid: str, dest: BinaryIO) -> int | None:
        """Write the instance into `dest` from the mirror if its series is routed there and it
        passes every check; its size, or None (TCIA must serve it)."""
        if not self.usable() or not self.mirrored(series_uid):
            return None
        route = self.route(series_uid)
        if route.where != "idc" or route.series is None:
            return None
        obj = route.objects.get(sop_uid)
        key = f"{series_uid}/{sop_uid}"
        with self._lock:
            if obj is None or key in self._refused:  # failed a check before: TCIA's, without asking again
                return None
        name, size, etag = obj
        failed = self._serve(route.series, sop_uid, name, size, etag, dest)
        if failed is None:
            self._store.put(f"{ORIGIN_KEY}{key}", "idc")
            return os.fstat(dest.fileno()).st_size
        if failed in LASTING_FAILURES:
            with self._lock:
                self._refused[key] = True
        return None

    def _serve(self, series: MirroredSeries, sop_uid: str, name: str, size: int, etag: str,
               dest: BinaryIO) -> str | None:
        """None once the object is in `dest`, checked; else the kind of failure (counted, logged)."""
        if not _MD5.match(etag):
            self._instance_to_tcia("etag", "instance %s comes from TCIA: its object's ETag %s is not an md5",
                                   sop_uid, etag)
            return "etag"
        md5 = self._md5_of(sop_uid)  # asked while the object streams in
        if md5 is None:
            self._instance_to_tcia("no md5", "instance %s comes from TCIA: TCIA gives no md5 to check the "
                                   "mirror's copy against", sop_uid)
            return "no md5"
        try:
            got, digest = self._download(series.bucket, series.prefix + name, dest)
        except _Refused as exc:
            self._instance_to_tcia("refused", "instance %s comes from TCIA: %s", sop_uid, exc)
            return "refused"
        except _Down as exc:
            self._went_down(str(exc), series.bucket)
            self._instance_to_tcia("mirror down", "instance %s comes from TCIA: %s", sop_uid, exc)
            return "mirror down"
        try:
            expected = md5.result(timeout=self.config.md5_wait_s)
        except Exception as exc:  # noqa: BLE001 - no md5 from TCIA: not served from the mirror
            self._instance_to_tcia("no md5", "instance %s comes from TCIA: its md5 is not available (%s)",
                                   sop_uid, type(exc).__name__)
            return "no md5"
        if expected is None:
            self._instance_to_tcia("no md5", "instance %s comes from TCIA: TCIA gives no md5 for it", sop_uid)
            return "no md5"
        if expected != etag:
            self._instance_to_tcia("md5 differs", "instance %s comes from TCIA: its md5 there is %s, the "
                                   "mirror's copy %s (revised on TCIA)", sop_uid, expected, etag)
            return "md5 differs"
        reason = refusal(dest, sop_uid, got, size, digest, etag)
        if reason is not None:
            self._instance_to_tcia("bytes differ", "instance %s comes from TCIA: the mirror's bytes are wrong "
                                   "(%s)", sop_uid, reason)
            return "bytes differ"
        with self._lock:
            self.stats["files"] += 1
            self.stats["bytes"] += got
        return None

    def _instance_to_tcia(self, kind: str, message: str, *args) -> None:
        with self._lock:
            self.stats["instances_tcia"] += 1
        self._note(kind, message, *args)

    def _download(self, bucket: str, key: str, dest: BinaryIO) -> tuple[int, str]:
        """(size, md5) of the object, written into `dest`."""
        dest.seek(0)
        dest.truncate()
        deadline = self._clock() + self.config.get_budget_s
        with self._objects_http().get(bucket, key) as r:  # urllib3 checks Content-Length
            got = copy_body(r.stream(CHUNK), dest, self._clock, deadline, self.config.get_budget_s, _Down)
        dest.flush()
        return got

    def get_many(self, series_uid: str, sop_uids, into: Callable[[], contextlib.AbstractContextManager],
                 deliver: Callable[[list[tuple[str, str]]], None], stopped: Callable[[], bool]) -> list[str]:
        """Fetch instances of a series `workers` at once, each into a file from `into()`, handing
        the verified ones to `deliver([(sop_uid, path), …])` in the order given: each instance
        as soon as it and those before it are in, together with those after it that are in
        already (one hand-over to the cache each time: a store costs milliseconds, and GETs can
        outrun them). Returns the instances not delivered (for TCIA to send)."""
        def one(sop_uid: str) -> str | None:
            if stopped() or not self.usable():
                return None
            with into() as f:
                path = f.name
                try:
                    size = self.get(series_uid, sop_uid, f)
                except OSError as exc:  # the local disk (full): not the mirror's failure, nor a bug
                    log.warning("instance %s could not be written here (%s); TCIA is asked for it", sop_uid, exc)
                    size = None
                except Exception:  # noqa: BLE001 - a bug here must not keep TCIA from sending it
                    log.exception("IDC's mirror failed on %s", sop_uid)
                    size = None
            if size is None:
                os.unlink(path)
                return None
            return path

        sops = list(sop_uids)
        try:
            pool = self._workers("gets")
            futures = [pool.submit(one, sop) for sop in sops]
        except RuntimeError:  # closing
            return sops
        left: list[str] = []
        i = 0
        while i < len(sops):
            batch: list[tuple[str, str]] = []
            while i < len(sops) and (not batch or futures[i].done()):
                try:
                    path = futures[i].result()
                except (concurrent.futures.CancelledError, OSError, NbiaError):
                    path = None
                if path is None:
                    left.append(sops[i])
                else:
                    batch.append((sops[i], path))
                i += 1
            if not batch:
                continue
            try:
                deliver(batch)
            finally:
                for _sop, path in batch:
                    if os.path.exists(path):
                        os.unlink(path)
        return left

    # ------------------------------------------------------------------ what a file says
    def origin(self, series_uid: str, sop_uid: str) -> str | None:
        """"idc" if this cache's copy of the instance came from the mirror, "tcia" or None
        otherwise."""
        return self._store.get(f"{ORIGIN_KEY}{series_uid}/{sop_uid}")

    def license(self, series_uid: str) -> str | None:
        row = self.index.lookup(series_uid)
        return row.license if row is not None else None

    def counted_tcia(self, series_uid: str, sop_uid: str, size: int) -> None:
        """An instance TCIA sent (for the status view's side by side). In a series routed to the
        mirror, it is recorded as TCIA's (it may replace an evicted copy from the mirror)."""
        with self._lock:
            self.stats["tcia_files"] += 1
            self.stats["tcia_bytes"] += size
            route = self._routes.get(series_uid)
        if route is not None and route.where == "idc":
            self._store.put(f"{ORIGIN_KEY}{series_uid}/{sop_uid}", "tcia")

    def status_line(self) -> str:
        from nbiafs.status import human_bytes
        with self._lock:
            s = dict(self.stats)
            reasons = collections.Counter(self.stats["reasons"])
            down = self._down_since is not None
        why = ", ".join(f"{k} {n}" for k, n in sorted(reasons.items()))
        return (f"{'down (reading from TCIA)' if down else 'up'}, {self.index.rows} series in the index; "
                f"{s['files']} files ({human_bytes(s['bytes'])}) from IDC, {s['tcia_files']} files "
                f"({human_bytes(s['tcia_bytes'])}) from TCIA; series: {s['series_idc']} from IDC, "
                f"{s['series_tcia']} sent to TCIA; instances sent to TCIA: {s['instances_tcia']}"
                + (f" (why: {why})" if why else ""))


class ObjectReads:
    """Unsigned GETs of objects, path-style, at the endpoint boto3 resolved, over urllib3 (the
    HTTP library under boto3) directly: a GET costs 0.47 ms of CPU this way and 1.32 ms through
    boto3 (measured on loopback), and a series is hundreds of GETs on one interpreter lock.
    Listings stay with boto3 (pagination, XML): one a series."""

    def __init__(self, endpoint_url: str, config: MirrorConfig):
        import certifi
        import urllib3

        self._base = endpoint_url.rstrip("/")
        self._errors = (urllib3.exceptions.HTTPError, OSError)
        self._pool = urllib3.PoolManager(
            num_pools=4, maxsize=config.workers + 8, retries=False,
            ca_certs=os.environ.get("AWS_CA_BUNDLE") or certifi.where(),  # as botocore picks its CAs
            timeout=urllib3.Timeout(connect=config.connect_timeout_s, read=config.read_timeout_s))

    @contextlib.contextmanager
    def get(self, bucket: str, key: str, span: int | None = None):
        """The response of a GET of the object (its first `span` bytes), streaming; _Refused
        (403, 404) or _Down (unreachable, silent, 5xx). Tried twice: the first try may meet a
        pooled connection the store closed while idle."""
        from urllib.parse import quote
        url = f"{self._base}/{quote(bucket)}/{quote(key, safe='/~')}"
        headers = {"Range": f"bytes=0-{span - 1}"} if span else {}
        r = None
        for attempt in range(2):
            try:
                r = self._pool.request("GET", url, headers=headers, preload_content=False)
                break
            except self._errors as exc:
                if attempt:
                    raise _Down(_reason(exc)) from None
        assert r is not None
        try:
            if r.status not in (200, 206):
                code = str(r.status)
                if _transient(code) or r.status == 429:
                    raise _Down(f"GET s3://{bucket}/{key}: HTTP {code}")
                raise _Refused(f"GET s3://{bucket}/{key} refused (HTTP {code})")
            yield r
        except BaseException:
            r.close()  # the connection may hold the rest of a body: not reused
            raise
        r.release_conn()  # read to its end: back to the pool


def make_client(config: MirrorConfig):
    """An unsigned boto3 S3 client, path-style, us-east-1; boto3 finds the endpoint
    (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, or AWS itself)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    return boto3.session.Session().client("s3", region_name="us-east-1", config=Config(
        signature_version=UNSIGNED, s3={"addressing_style": "path"},
        connect_timeout=config.connect_timeout_s, read_timeout=config.read_timeout_s,
        retries={"total_max_attempts": 2, "mode": "standard"}, max_pool_connections=config.workers + 8,
        request_checksum_calculation="when_required", response_checksum_validation="when_required"))


def _transient(code: str) -> bool:
    return code.startswith("5") or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout")


