"""What a mount is doing, for humans: `MOUNTPOINT/.nbiafs/status` and `nbiafs status`;
and the cache directory seen from outside a mount: `nbiafs cache info|clear`.

The status never shows a secret: the user's name, the token's remaining lifetime, never the
token or the password. Each cache scope records what it belongs to (`scope.json`: URL, API,
user) and is held by a running mount through a shared lock on `scope.lock`, so `cache clear`
never pulls a cache from under a mount.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nbiafs import __version__
from nbiafs.idcindex import INDEX_DIR, index_in_use

if TYPE_CHECKING:
    from nbiafs.api.client import NbiaClient
    from nbiafs.blobcache import InstanceCache
    from nbiafs.idc import IdcMirror
    from nbiafs.prefetch import Prefetcher
    from nbiafs.tier import SharedTier
    from nbiafs.walk import ListingQueue

STATUS_DIR = ".nbiafs"
STATUS_FILE = "status"
SCOPE_FILE = "scope.json"
LOCK_FILE = "scope.lock"
TIER_FILE = "shared-cache.json"  # the shared tier's counters, summed over this scope's mounts
TIER_RECORD_INTERVAL_S = 30.0
TIER_COUNTERS = ("hits", "misses", "rejected", "puts", "put_errors", "puts_dropped", "errors", "outages")


def human_bytes(n: float) -> str:
    """Binary units, as `--cache-size` and `du -h` count: 20G is 20 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class ErrorLog:
    """Errors answered to the kernel (EIO and unexpected ones): a count and the last one."""

    def __init__(self):
        self._lock = threading.Lock()  # guards count, last
        self.count = 0
        self.last: str | None = None

    def note(self, operation: str, path: str, message: str) -> None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S UTC")
        with self._lock:
            self.count += 1
            self.last = f"{stamp} {operation} {path}: {message}"


@dataclass
class StatusSources:
    """What the status is read from (filled in by `mount.Mount`)."""
    mountpoint: Path
    root_url: str
    api: str
    user: str | None
    scope_dir: Path
    started: float          # time.time() at mount
    client: NbiaClient
    cache: InstanceCache
    prefetcher: Prefetcher | None
    errors: ErrorLog
    tier: SharedTier | None = None
    ahead: ListingQueue | None = None  # listings fetched ahead of walks
    mirror: IdcMirror | None = None    # IDC's S3 mirror, when used


def render_status(src: StatusSources) -> str:
    now = time.time()
    started = dt.datetime.fromtimestamp(src.started, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"nbiafs {__version__} at {src.mountpoint}, mounted {started} (up {human_duration(now - src.started)})",
             f"archive:    {src.root_url} (API {_api(src)})",
             f"user:       {_user(src)}"]
    auth = getattr(src.client, "auth", None)
    if auth is not None:
        left = auth.seconds_left()
        renewals = auth.password_grants + auth.refresh_grants - 1
        token = "none yet (the archive was unreachable)" if left is None else (
            f"valid for {human_duration(left)} more" if left > 0 else "expired, renewing")
        lines.append(f"token:      {token} (renewed {max(0, renewals)} times)")
    cache = src.cache
    used, limit = cache.volume(), cache.max_bytes
    lines.append(f"cache:      {human_bytes(used)} of {human_bytes(limit)} used ({100 * used / limit:.1f} %), "
                 f"{cache.count()} files, in {src.scope_dir}")
    opens = cache.hits + cache.downloads
    rate = f"{100 * cache.hits / opens:.0f} %" if opens else "-"
    lines.append(f"opens:      {opens} served, {cache.hits} from the cache (hit rate {rate})")
    queued = src.prefetcher.queued() if src.prefetcher is not None else 0
    zips = src.prefetcher.stats["zips"] if src.prefetcher is not None else 0
    abandoned = src.prefetcher.stats["zips_abandoned"] if src.prefetcher is not None else 0
    unread = src.prefetcher.unread() if src.prefetcher is not None else 0
    lines.append(f"downloads:  {cache.downloads} done, {cache.downloads_in_flight()} in flight, {queued} queued "
                 f"for prefetch, {zips} series zips" + (f" ({abandoned} abandoned)" if abandoned else "")
                 + f"; {unread} prefetched, never read"
                 + (f"; {cache.overtaken} fetched alone by opens that stopped waiting for their series' zip"
                    if cache.overtaken else ""))
    if src.ahead is not None:
        a = src.ahead
        lines.append(f"listings:   {a.done} fetched ahead of walks, {a.running()} running, {a.queued()} queued, "
                     f"{a.dropped} dropped (their walk had ended)")
    if src.tier is not None:
        lines.append(f"shared:     {_tier_line(src.tier)}")
    if src.mirror is not None:
        lines.append(f"idc:        {src.mirror.status_line()}")
    integrity = _integrity(src)
    if integrity is not None:
        lines.append(f"integrity:  {integrity}")
    lines.append(f"errors:     {src.errors.count}" + (f" (last: {src.errors.last})" if src.errors.last else ""))
    return "\n".join(lines) + "\n"


def _tier_line(tier: SharedTier) -> str:
    t = dict(tier.stats)
    state = "up" if tier.usable() else "down (reading from the archive)"
    return (f"{tier.config.url} {state}: {t['hits']} instances read from it, {t['misses']} not there, "
            f"{t['rejected']} refused by the checks; {t['puts']} put ({tier.queued()} queued, "
            f"{t['puts_dropped']} dropped, {t['put_errors']} refused); {t['errors']} errors, "
            f"{t['outages']} outages")


class TierRecord:
    """The tier's counters in the scope (`shared-cache.json`), added to those of earlier mounts,
    rewritten every TIER_RECORD_INTERVAL_S and at unmount: what `nbiafs cache info` shows."""

    def __init__(self, scope: Path, url: str, stats: dict):
        self._path = scope / TIER_FILE
        self._url = url
        self._stats = stats
        earlier = read_tier_record(scope)
        self._earlier = {k: int(earlier.get(k, 0)) for k in TIER_COUNTERS} if earlier.get("url") == url else {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="nbia-tier-record", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(TIER_RECORD_INTERVAL_S):
            self.write()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.write()

    def write(self) -> None:
        now = dict(self._stats)
        record: dict = {k: self._earlier.get(k, 0) + int(now.get(k, 0)) for k in TIER_COUNTERS}
        record.update(url=self._url, updated=time.time())
        with contextlib.suppress(OSError):
            _write_record(self._path, record)


def read_tier_record(scope: Path) -> dict:
    return _read_record(scope / TIER_FILE)


def _integrity(src: StatusSources) -> str | None:
    """Checks against the archive's md5: single fetches (the client) and zip entries (the
    prefetcher); shown on v4, or wherever a check was made."""
    single = getattr(src.client, "integrity", None)
    if single is None:
        return None
    zips = src.prefetcher.stats if src.prefetcher is not None else {}
    from_zips, zip_mismatches = zips.get("zip_md5_checked", 0), zips.get("zip_md5_mismatches", 0)
    if getattr(src.client, "api", None) != "v4" and not (any(single.values()) or from_zips or zip_mismatches):
        return None
    return (f"{single['md5_checked'] + from_zips} instances matched the archive's md5 ({from_zips} from zips), "
            f"{single['md5_unknown']} without one, {single['md5_mismatches'] + zip_mismatches} mismatches refetched")


def _api(src: StatusSources) -> str:
    api = getattr(src.client, "api", None) or src.api
    return f"{api}, found by asking the archive" if getattr(src.client, "negotiated", False) else api


def _user(src: StatusSources) -> str:
    auth = getattr(src.client, "auth", None)
    if auth is not None:
        return auth.credentials.username
    if getattr(src.client, "api", None) == "v4":
        return "nbia_guest (no token: v4 serves the guest without one)"
    return src.user or "anonymous (v1)"


# --------------------------------------------------------------------------- scopes
def _write_record(path: Path, record: dict) -> None:
    """A small JSON file, replaced whole (a reader never sees half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _read_record(path: Path) -> dict:
    """What `_write_record` wrote ({} if nothing readable)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_scope_record(scope: Path, root_url: str, api: str, user: str | None) -> None:
    _write_record(scope / SCOPE_FILE, {"url": root_url, "api": api, "user": user})


def read_scope_record(scope: Path) -> dict:
    """What `write_scope_record` wrote ({} if nothing readable)."""
    return _read_record(scope / SCOPE_FILE)


@contextlib.contextmanager
def unused_scope(scope: Path):
    """Yields whether no running mount holds `scope` (see `hold_scope`), keeping it so."""
    fd = os.open(scope / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def hold_scope(scope: Path) -> int:
    """Take the shared lock for a mount's lifetime; returns the fd to close at unmount."""
    fd = os.open(scope / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


@dataclass
class ScopeInfo:
    path: Path
    url: str
    api: str
    user: str | None
    bytes: int
    files: int          # instances and previews in the instance cache
    last_used: float


def scopes(root: Path) -> list[ScopeInfo]:
    out: list[ScopeInfo] = []
    if not root.is_dir():
        return out
    for scope in sorted(p for p in root.iterdir() if p.is_dir() and p.name != INDEX_DIR):
        try:
            record = json.loads((scope / SCOPE_FILE).read_text())
        except (OSError, ValueError):
            record = {"url": "?", "api": "?", "user": None}
        size, files, last = 0, 0, scope.stat().st_mtime
        blobs = scope / "instances"
        for path in scope.rglob("*"):
            with contextlib.suppress(OSError):
                st = path.lstat()
                if path.is_file():
                    size += st.st_size
                    last = max(last, st.st_mtime)
                    files += path.suffix == ".val" and blobs in path.parents
        out.append(ScopeInfo(scope, record.get("url", "?"), record.get("api", "?"), record.get("user"),
                             size, files, last))
    return out


@dataclass
class IndexInfo:
    """A reduced IDC series index (`--idc-index`), kept for every scope of the cache directory."""
    path: Path
    bytes: int
    last_used: float


def reduced_indexes(root: Path) -> list[IndexInfo]:
    out = []
    for path in sorted((root / INDEX_DIR).glob("*.sqlite")):
        with contextlib.suppress(OSError):
            st = path.stat()
            out.append(IndexInfo(path, st.st_size, st.st_mtime))
    return out


def clear_indexes(indexes: list[IndexInfo]) -> tuple[list[IndexInfo], list[IndexInfo]]:
    """Delete each reduced index no running mount holds; returns (cleared, in use). A temporary
    file of a reduction under way is left alone (its mount renames it into place)."""
    cleared, busy = [], []
    for index in indexes:
        try:
            if index_in_use(index.path):
                busy.append(index)
                continue
            index.path.unlink()
        except FileNotFoundError:
            pass
        cleared.append(index)
    return cleared, busy


def format_scopes(root: Path, infos: list[ScopeInfo], indexes: list[IndexInfo] | None = None) -> str:
    indexes = indexes or []
    if not infos and not indexes:
        return f"{root}: no cache yet\n"
    lines = [f"{root}:"]
    for s in infos:
        last = dt.datetime.fromtimestamp(s.last_used, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines.append(f"  {s.path.name}  {s.url} (API {s.api}), user {s.user or 'anonymous'}: "
                     f"{human_bytes(s.bytes)}, {s.files} files, last used {last}")
        tier = read_tier_record(s.path)
        if tier.get("url"):
            lines.append(f"    shared cache {tier['url']}: {tier.get('hits', 0)} instances read from it "
                         f"({tier.get('rejected', 0)} refused by the checks), {tier.get('puts', 0)} put, "
                         f"{tier.get('errors', 0) + tier.get('put_errors', 0)} errors")
    for index in indexes:
        last = dt.datetime.fromtimestamp(index.last_used, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines.append(f"  {INDEX_DIR}/{index.path.name}  IDC series index (--idc-index, reduced for lookups): "
                     f"{human_bytes(index.bytes)}, made {last}")
    lines.append(f"  total {human_bytes(sum(s.bytes for s in infos) + sum(i.bytes for i in indexes))}")
    return "\n".join(lines) + "\n"


def clear_scopes(infos: list[ScopeInfo]) -> tuple[list[ScopeInfo], list[ScopeInfo]]:
    """Delete each scope not held by a running mount; returns (cleared, in use)."""
    cleared, busy = [], []
    for s in infos:
        with unused_scope(s.path) as free:
            if not free:
                busy.append(s)
                continue
            for child in s.path.iterdir():
                if child.name == LOCK_FILE:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        with contextlib.suppress(OSError):
            (s.path / LOCK_FILE).unlink()
            s.path.rmdir()
        cleared.append(s)
    return cleared, busy
