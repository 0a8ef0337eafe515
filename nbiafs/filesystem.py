"""The filesystem's operations, free of FUSE: plain Python that unit tests can call.

Read-only: directories 0555, files 0444, owned by the mounting user. Sizes and
times are documented in docs/SEMANTICS.md. `open()` of an instance downloads it
(through the instance cache) before returning, records its exact size and has the
kernel forget the estimate it was told, so a reader's fstat and reads after open
never see an estimate.

Errors are `NbiaError`s carrying their errno; the FUSE adapter maps them.
"""

from __future__ import annotations

import datetime as dt
import errno
import functools
import hashlib
import io
import itertools
import logging
import os
import stat
import threading
import time
from typing import BinaryIO, Callable, Protocol

from nbiafs import preview
from nbiafs.blobcache import InstanceCache
from nbiafs.catalog import INSTANCE, PREVIEW, SERIES, Catalog, Node
from nbiafs.errors import NbiaError, ReadOnly
from nbiafs.pattern import RANDOM
from nbiafs.prefetch import Prefetcher
from nbiafs.sources import InstanceSource, key_of
from nbiafs.status import STATUS_DIR, STATUS_FILE, ErrorLog

log = logging.getLogger(__name__)

# Collections and patients carry no date in the archive: they show 2000-01-01 (UTC).
UNDATED_MTIME = 946684800.0
BLOCK = 4096
XATTR_PREFIX = "user.nbia."
STATE_XATTR = "user.nbiafs.cached"
PREVIEW_XATTR = "user.nbiafs.preview_of"  # the SOPInstanceUID a preview shows
SOURCE_XATTR = "user.nbia.source"       # where a cached instance came from: idc or tcia
LICENSE_XATTR = "user.nbia.license"     # a series' licence: IDC's index, else the archive's LicenseName


class NoAttribute(NbiaError):
    errno = errno.ENODATA


@functools.lru_cache(maxsize=4096)
def archive_time(text: str | None) -> float | None:
    """`2015-05-27 17:12:21.0`, `2015-05-27`, `05-27-2015` -> POSIX time (UTC)."""
    if not text:
        return None
    for fmt, length in (("%Y-%m-%d %H:%M:%S", 19), ("%Y-%m-%d", 10), ("%m-%d-%Y", 10)):
        try:
            stamp = dt.datetime.strptime(text[:length], fmt)
        except ValueError:
            continue
        return stamp.replace(tzinfo=dt.timezone.utc).timestamp()
    return None


def inode(path: str) -> int:
    """A stable inode number: the same path gets the same number in every mount."""
    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big") >> 1 or 1


STATUS_DIR_PATH = f"/{STATUS_DIR}"
STATUS_PATH = f"/{STATUS_DIR}/{STATUS_FILE}"
STATUS_PATHS = (STATUS_DIR_PATH, STATUS_PATH)


class KernelCache(Protocol):
    """The kernel's attribute cache, to be told when sizes it was given change: in the
    background (`submit`), or at once from an open of the path (`invalidate_now`)."""

    def submit(self, paths) -> threading.Event | None: ...

    def pending(self, path: str) -> bool: ...

    def unconfirmed(self, path: str) -> bool: ...

    def invalidate_now(self, path: str) -> None: ...


class _NoKernelCache:
    """Not mounted (the filesystem alone, in tests), or libfuse2: the kernel caches nothing."""

    def submit(self, paths) -> threading.Event | None:
        return None

    def pending(self, path: str) -> bool:
        return False

    def unconfirmed(self, path: str) -> bool:
        return False

    def invalidate_now(self, path: str) -> None:
        pass


class NbiaFilesystem:
    """`/.nbiafs/status` is the one entry not from the archive: the mount's status as text,
    rendered at each open by `status` (a callable), read with direct I/O. Like ZFS's `.zfs`,
    `/.nbiafs` is reachable by name but not listed, so walks and copies of the mount never
    meet it."""

    def __init__(self, catalog: Catalog, cache: InstanceCache, prefetcher: Prefetcher | None = None,
                 uid: int | None = None, gid: int | None = None, status: Callable[[], str] | None = None,
                 source: InstanceSource | None = None):
        self.catalog = catalog
        self.cache = cache
        self.source = source if source is not None else InstanceSource(catalog.client, cache,
                                                                       exact_size=catalog.exact_size)
        self.prefetcher = prefetcher
        self.status = status
        self.errors = ErrorLog()
        self._started = time.time()
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self._handles: dict[int, BinaryIO] = {}
        self._handles_lock = threading.Lock()  # guards _handles and _estimated
        self._next_fh = itertools.count(1)
        # The kernel caches attributes (fuse_ops.ATTR_TIMEOUT_S): the paths whose size it was
        # told as an estimate, by series, are invalidated when a size of that series becomes
        # exact (the estimates of the others move with it).
        self.kernel: KernelCache = _NoKernelCache()
        self._estimated: dict[str, set[str]] = {}

    def _is_status(self, path: str) -> bool:
        return self.status is not None and path in STATUS_PATHS

    # ------------------------------------------------------------------ attributes
    def getattr(self, path: str) -> dict:
        if self._is_status(path):
            return self._status_attributes(path)
        return self.attributes(self.catalog.resolve(path))

    def _status_text(self) -> str:
        return self.status() if self.status is not None else ""

    def _status_attributes(self, path: str) -> dict:
        attrs = {"st_ino": inode(path), "st_uid": self.uid, "st_gid": self.gid, "st_mtime": self._started,
                 "st_ctime": self._started, "st_atime": self._started}
        if path == STATUS_DIR_PATH:
            attrs.update(st_mode=stat.S_IFDIR | 0o555, st_nlink=2, st_size=0, st_blocks=0)
        else:  # the size of the text as it is now; reads use direct I/O and go to the end anyway
            size = len(self._status_text().encode())
            attrs.update(st_mode=stat.S_IFREG | 0o444, st_nlink=1, st_size=size, st_blocks=(size + 511) // 512)
        return attrs

    def attributes(self, node: Node) -> dict:
        mtime = self._mtime(node)
        attrs = {"st_ino": inode(node.path), "st_uid": self.uid, "st_gid": self.gid,
                 "st_mtime": mtime, "st_ctime": mtime, "st_atime": mtime}
        if node.is_dir:
            # Size 0, so that `du -sb` of a series is exactly its getSeriesSize total.
            attrs.update(st_mode=stat.S_IFDIR | 0o555, st_nlink=2, st_size=0, st_blocks=0)
        else:
            if node.kind == PREVIEW:  # 0 until first opened (rendered), then exact
                rendered = self.catalog.store.get(preview_key(node))
                size, exact = (rendered, True) if rendered is not None else (0, False)
            else:
                self.source.settle(node.series_uid)  # a route being worked out brings exact sizes
                size, exact = self.catalog.instance_size(node)
            if not exact:
                with self._handles_lock:
                    self._estimated.setdefault(node.series_uid, set()).add(node.path)
            attrs.update(st_mode=stat.S_IFREG | 0o444, st_nlink=1, st_size=size,
                         st_blocks=(size + 511) // 512)
        return attrs

    @staticmethod
    def entry(node: Node) -> dict:
        """What a directory listing says of `node`."""
        mode = stat.S_IFDIR | 0o555 if node.is_dir else stat.S_IFREG | 0o444
        return {"st_ino": inode(node.path), "st_mode": mode}

    @staticmethod
    def _mtime(node: Node) -> float:
        stamp = archive_time(node.stamp)
        return stamp if stamp is not None else UNDATED_MTIME

    # ------------------------------------------------------------------ directories
    def readdir(self, path: str, tid: int = 0) -> list[tuple[str, dict]]:
        """`tid`: the calling thread (FUSE's context), 0 when unknown."""
        if self.status is not None and path == STATUS_DIR_PATH:
            return [(STATUS_FILE, self._status_attributes(STATUS_PATH))]
        node = self.catalog.resolve(path)
        if not node.is_dir:
            raise NbiaError(f"{path}: not a directory")
        # Names, modes and inode numbers only: the binding hands the kernel nothing else from a
        # listing (no READDIRPLUS attributes), so no size is told, and none need be worked out.
        entries = [(name, self.entry(child)) for name, child in self.catalog.children(node).items()]
        self.catalog.listed(node)
        if node.kind == SERIES:
            self.source.prepare(node.series_uid)
            if self.prefetcher is not None:
                self.prefetcher.folder_listed(node.series_uid, self.prefetcher.pattern.reader_of(tid))
        return entries

    # ------------------------------------------------------------------ files
    def open(self, path: str, flags: int, tid: int = 0) -> tuple[int, bool]:
        """Open an instance for reading; returns (file handle, immutable: keep the page cache).
        `tid`: the calling thread (FUSE's context), 0 when unknown."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise ReadOnly(f"{path}: read-only filesystem")
        if self.status is not None and path == STATUS_PATH:
            handle: BinaryIO = io.BytesIO(self._status_text().encode())
            with self._handles_lock:
                fh = next(self._next_fh)
                self._handles[fh] = handle
            return fh, False
        node = self.catalog.resolve(path)
        if node.kind == PREVIEW:
            handle = self.open_preview(node)
        elif node.kind == INSTANCE:
            handle = self.open_instance(node, tid)
        else:
            raise NbiaError(f"{path}: is a directory")
        with self._handles_lock:
            fh = next(self._next_fh)
            self._handles[fh] = handle
        return fh, True

    def open_instance(self, node: Node, tid: int = 0) -> BinaryIO:
        key = key_of(node.series_uid, node.sop_uid)
        kind, reader = RANDOM, 0
        if self.prefetcher is not None:  # how this open's reader reads: it decides the prefetch
            reader = self.prefetcher.pattern.reader_of(tid)
            kind = self.prefetcher.note_open(node.series_uid, node.sop_uid, reader)
        handle = self.cache.open_known(key)
        if handle is not None and self.catalog.exact_size(node.series_uid, node.sop_uid) == os.fstat(
                handle.fileno()).st_size:
            # The hot path of re-reads: cached, its exact size told; one open(2), no lookups.
            # Still makes sure the kernel forgot an estimate of it (the prefetch stored it).
            self._invalidate_estimates(node.series_uid, opening=node.path)
            if self.prefetcher is not None:
                self.prefetcher.opening_cached(node.series_uid, node.sop_uid)
            return handle
        if handle is not None:
            handle.close()
        overtake_after_s = None
        if self.prefetcher is not None:
            self.prefetcher.opening(node.series_uid, node.sop_uid, self.catalog.instances(node.series_uid),
                                    self.catalog.series_total(node) or 0, kind)
            overtake_after_s = self.prefetcher.overtake_after(node.series_uid, reader)
        handle, _downloaded = self.cache.open(
            key, lambda dest: self.source.fetch(node.series_uid, node.sop_uid, dest), overtake_after_s=overtake_after_s)
        # The exact size is known before open returns: the kernel never sees an estimate again.
        self.record_exact_size(node.series_uid, node.sop_uid, os.fstat(handle.fileno()).st_size,
                               opening=node.path)
        if self.prefetcher is not None:
            # Told after this instance is here, so its download never shares the link with
            # the rest of its series: the file being opened comes first.
            self.prefetcher.opened(node.series_uid, node.sop_uid, self.catalog.instances(node.series_uid),
                                   self.catalog.series_total(node) or 0, kind)
        return handle

    def open_preview(self, node: Node) -> BinaryIO:
        """The series' preview, rendered (and kept in the cache) on first open from the instance
        it shows; that instance is fetched through the cache but does not start the series'
        prefetch: a preview is for not fetching the series."""
        def render(dest: BinaryIO) -> int:
            source, _ = self.cache.open(
                key_of(node.series_uid, node.sop_uid),
                lambda f: self.source.fetch(node.series_uid, node.sop_uid, f))
            with source:
                self.record_exact_size(node.series_uid, node.sop_uid, os.fstat(source.fileno()).st_size)
                data = preview.render(source)
            dest.write(data)
            return len(data)
        handle, _ = self.cache.open(preview_key(node), render, counted=False)
        size = os.fstat(handle.fileno()).st_size
        if self.catalog.store.get(preview_key(node)) != size:  # st_size exact from now on
            self.catalog.store.put(preview_key(node), size)
        self._invalidate_estimates(node.series_uid, opening=node.path)
        return handle

    def record_exact_size(self, series_uid: str, sop_uid: str, size: int, opening: str | None = None) -> None:
        """An instance's exact size is known (opened, or stored by the prefetch): remember it, and
        have the kernel forget the estimates of its series it cached (`opening`: the path being
        opened, whose estimate is forgotten before this returns, so its reader's fstat and reads
        see the exact size)."""
        self.catalog.record_exact_size(series_uid, sop_uid, size)
        self._invalidate_estimates(series_uid, opening)

    def record_exact_sizes(self, series_uid: str, sizes: dict[str, int]) -> None:
        """Many exact sizes of a series are known before any is fetched (IDC's listing): the
        kernel forgets the estimates it holds of them."""
        self.catalog.record_exact_sizes(series_uid, sizes)
        self._invalidate_estimates(series_uid)

    def _invalidate_estimates(self, series_uid: str, opening: str | None = None) -> None:
        """The series' paths told an estimate are invalidated in the background, except
        `opening`, the path being opened: the kernel may hold an estimate of it if it was told
        one (still in the set, or queued and not yet told), or if an invalidation of it came
        while the kernel did not know it (`KernelCache.unconfirmed`: an estimate may have
        reached it since). Then it is invalidated here, by the thread answering the open (the
        kernel allows it: an open is not among the requests such a notice may deadlock with;
        the kernel knows the path now)."""
        with self._handles_lock:
            paths = self._estimated.pop(series_uid, None) or set()
            now = opening is not None and (opening in paths or self.kernel.pending(opening)
                                           or self.kernel.unconfirmed(opening))
            paths.discard(opening)
            if paths:
                self.kernel.submit(paths)
        if opening is not None and now:
            self.kernel.invalidate_now(opening)

    def handle(self, fh: int) -> BinaryIO:
        """The open file behind `fh`: a cache file, or the status text (a BytesIO)."""
        with self._handles_lock:
            handle = self._handles.get(fh)
        if handle is None:
            raise NbiaError(f"read on unknown file handle {fh}")
        return handle

    def release(self, fh: int) -> None:
        with self._handles_lock:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.close()

    # ------------------------------------------------------------------ extended attributes
    def listxattr(self, path: str) -> list[str]:
        if self._is_status(path):
            return []
        return list(self._xattrs(self.catalog.resolve(path)))

    def getxattr(self, path: str, name: str) -> bytes:
        if self._is_status(path):
            raise NoAttribute(f"{path}: no attribute {name}")
        xattrs = self._xattrs(self.catalog.resolve(path)) if name.startswith("user.") else {}
        if name not in xattrs:
            raise NoAttribute(f"{path}: no attribute {name}")
        return xattrs[name].encode("utf-8", "surrogatepass")

    def _xattrs(self, node: Node) -> dict[str, str]:
        record = dict(node.record)
        if node.kind == SERIES:
            size = self.catalog.series_size(node.series_uid)
            if size is not None:
                record.update(TotalSizeInBytes=size[0], ObjectCount=size[1])
        out = {XATTR_PREFIX + key.replace(" ", "_"): _text(value) for key, value in record.items()
               if value is not None and value != ""}
        if node.kind in (SERIES, INSTANCE):
            license_name = (self.source.license(node.series_uid)
                            or self.catalog.series_record(node).get("LicenseName"))
            if license_name:
                out[LICENSE_XATTR] = license_name
        if node.kind == INSTANCE:
            cached = self.cache.contains(key_of(node.series_uid, node.sop_uid))
            out[STATE_XATTR] = "yes" if cached else "no"
            if cached:
                out[SOURCE_XATTR] = self.source.origin(node.series_uid, node.sop_uid)
        elif node.kind == PREVIEW:
            out = {PREVIEW_XATTR: node.sop_uid,
                   STATE_XATTR: "yes" if self.cache.contains(preview_key(node)) else "no"}
        return out

    # ------------------------------------------------------------------ filesystem
    def statfs(self) -> dict:
        limit = self.cache.max_bytes
        free = max(0, limit - self.cache.volume())
        return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": limit // BLOCK,
                "f_bfree": free // BLOCK, "f_bavail": free // BLOCK, "f_files": 0,
                "f_ffree": 0, "f_favail": 0, "f_namemax": 255}

    def access(self, path: str, mode: int) -> None:
        if not self._is_status(path):
            self.catalog.resolve(path)
        if mode & os.W_OK:
            raise ReadOnly(f"{path}: read-only filesystem")

    def close(self) -> None:
        with self._handles_lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle.close()


def preview_key(node: Node) -> str:
    """The cache key of a preview, and the metadata key of its size: by the instance it shows."""
    return f"preview\0{node.series_uid}\0{node.sop_uid}"


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

