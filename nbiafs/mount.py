"""Wires a mount together, owns its threads and its shutdown.

    client (login) -> metadata store + instance cache -> catalog -> filesystem -> FUSE

Checks that can fail are made before anything is mounted, each ending in a
one-line `MountError`: FUSE missing, a bad mountpoint (missing, not a
directory, not empty, already mounted, a stale mount), an unusable cache
directory, credentials refused, the archive unreachable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import resource
import shutil
import threading
import time
from pathlib import Path

from nbiafs.api.auth import resolve_credentials
from nbiafs.api.client import NbiaClient
from nbiafs.blobcache import InstanceCache
from nbiafs.catalog import Catalog, Selection
from nbiafs.config import MountConfig
from nbiafs.errors import (ArchiveUnavailable, AuthenticationFailed, NbiaError, NoSuchApi, NotAuthorized,
                           UntrustedCertificate)
from nbiafs import idc, idcindex
from nbiafs.filesystem import NbiaFilesystem
from nbiafs.idc import IdcMirror
from nbiafs.metastore import MetadataStore
from nbiafs.prefetch import Prefetcher
from nbiafs.sources import InstanceSource
from nbiafs.status import (StatusSources, TierRecord, hold_scope, read_scope_record, render_status,
                           write_scope_record)
from nbiafs.tier import SharedTier, TierRefused, archive_name

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc mallopt parameter


class MountError(Exception):
    """Mounting cannot proceed; the message is one line for the user."""


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: load the fuse kernel module (modprobe fuse) "
                         "or, in a container, pass --device /dev/fuse")
    if not (ctypes.util.find_library("fuse3") or os.environ.get("FUSE_LIBRARY_PATH")):
        raise MountError("libfuse3 is not installed: run scripts/setup.sh "
                         "(or: apt-get install fuse3 libfuse3-3)")
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        raise MountError("fusermount3 is missing: apt-get install fuse3")


def check_mountpoint(mountpoint: Path) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint} does not exist (create it with mkdir)") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(f"{mountpoint} is a stale mount (its daemon died); clean it with: "
                             f"fusermount -u {mountpoint}") from None
        raise MountError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        try:  # the kernel may answer stat from its cache; statfs always asks the daemon
            os.statvfs(mountpoint)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise MountError(f"{mountpoint} is a stale mount (its daemon died); clean it with: "
                                 f"fusermount -u {mountpoint}") from None
        raise MountError(f"{mountpoint} is already a mountpoint (busy); unmount it first with: "
                         f"fusermount -u {mountpoint}")
    if any(os.scandir(mountpoint)):
        raise MountError(f"mountpoint {mountpoint} is not empty")
    del st


def prepare_cache_dir(path: Path) -> Path:
    """Create the cache directory private to its user (0700), or explain why not."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise MountError(f"cache directory {path} is not usable: {exc.strerror}") from None
    return path


class Mount:
    """Everything one mount owns. `start()` logs in and opens caches; `stop()` undoes it."""

    def __init__(self, config: MountConfig, client: NbiaClient | None = None, on_mounted=None):
        self.config = config
        self.client = client
        self._on_mounted = on_mounted
        self.fs: NbiaFilesystem | None = None
        self._store: MetadataStore | None = None
        self._cache: InstanceCache | None = None
        self.prefetcher: Prefetcher | None = None
        self._scope_lock: int | None = None
        self._status: StatusSources | None = None
        self.tier: SharedTier | None = None
        self.mirror: IdcMirror | None = None
        self._tier_record: TierRecord | None = None
        self._guest: GuestView | None = None
        self.served = False  # FUSE init ran: the mount was up
        self._stopped = False

    def start(self) -> NbiaFilesystem:
        """Log in and build the filesystem. Raises MountError with one line on failure."""
        os.umask(0o077)  # cache files 0600, directories 0700
        config = self.config
        client = self.client
        if client is None:
            try:
                credentials = (resolve_credentials(config.user, config.client.root_url)
                               if config.client.api != "v1" else None)
                client = self.client = NbiaClient(config.client, credentials)
            except (AuthenticationFailed, NotAuthorized) as exc:
                raise MountError(str(exc)) from None
        prepare_cache_dir(config.cache.root)
        scope = config.cache.scope_dir(config.client, client.identity)
        try:
            client.connect()  # with --api auto: which version the archive speaks
        except (AuthenticationFailed, UntrustedCertificate, NoSuchApi, NotAuthorized) as exc:
            raise MountError(str(exc)) from None
        except ArchiveUnavailable as exc:
            if not (scope / "metadata").is_dir():
                raise MountError(f"cannot reach the archive at {config.client.root_url}: {exc}") from None
            if client.api is None:  # the version the last mount of this cache spoke
                client.use_api(read_scope_record(scope).get("api") or "v4")
            log.warning("the archive is unreachable (%s); serving what earlier mounts cached "
                        "until it comes back", exc)
        api = client.api or "v4"
        prepare_cache_dir(scope)
        write_scope_record(scope, config.client.root_url, api, client.user)
        self._scope_lock = hold_scope(scope)  # `nbiafs cache clear` leaves this scope alone
        store = self._store = MetadataStore(scope / "metadata", config.cache.listing_ttl_s,
                                            config.cache.memory_records)
        cache = self._cache = InstanceCache(scope / "instances", config.cache.max_bytes)
        catalog = Catalog(client, store, config.cache.negative_ttl_s,
                          selection=self._selection(config, client, store), names=config.names,
                          previews=config.previews)
        tier = self.tier = self._shared_tier(config, client, scope)
        fs: NbiaFilesystem  # made below; the sources and the prefetch tell it of exact sizes
        mirror = self.mirror = self._idc_mirror(config, client, store, catalog,
                                                lambda uid, sizes: fs.record_exact_sizes(uid, sizes))
        source = InstanceSource(client, cache, tier, exact_size=catalog.exact_size, mirror=mirror)
        prefetcher = self.prefetcher = Prefetcher(cache, client, config.prefetch,
                                                  on_stored=lambda *stored: fs.record_exact_size(*stored),
                                                  source=source)
        fs = self.fs = NbiaFilesystem(catalog, cache, prefetcher, status=self.status_text, source=source)
        self._status = StatusSources(config.mountpoint, config.client.root_url, api,
                                     client.user, scope, time.time(), client, cache,
                                     prefetcher if config.prefetch.enabled else None, fs.errors, tier,
                                     catalog.ahead, mirror)
        return fs

    def _shared_tier(self, config: MountConfig, client: NbiaClient, scope: Path) -> SharedTier | None:
        if config.shared_cache is None:
            return None
        if client.identity is not None:
            self._guest = GuestView(config.client, client.api or "v4")
        tier = SharedTier(config.shared_cache, archive_name(config.client.root_url), client.identity,
                          md5_of=client.md5_request, guest_sees=self._guest.sees if self._guest else None)
        try:
            tier.connect()
        except TierRefused as exc:
            raise MountError(str(exc)) from None
        self._tier_record = TierRecord(scope, config.shared_cache.url, tier.stats)
        return tier

    @staticmethod
    def _idc_mirror(config: MountConfig, client: NbiaClient, store: MetadataStore, catalog: Catalog,
                    on_sizes) -> IdcMirror | None:
        """IDC's mirror, when this mount uses it (`idc.wanted`), with its series index reduced
        (once, at first use) beside the caches."""
        wanted = idc.wanted(config.mirror, config.client.root_url, config.mirror.index is not None)
        if not wanted:
            return None
        path = config.mirror.index or idcindex.default_index()
        if path is None:
            if config.mirror.source == "idc":
                raise MountError("--source idc needs IDC's series index: pip install 'nbiafs[idc]' "
                                 "(idc-index-data), or give one with --idc-index")
            log.warning("IDC's series index is not installed (pip install 'nbiafs[idc]'): every series "
                        "comes from TCIA")
            return None
        if (client.api or "v4") != "v4":
            message = (f"IDC's mirror is checked against TCIA's md5 of each instance, which API "
                       f"{client.api} does not give")
            if config.mirror.source == "idc":
                raise MountError(f"--source idc: {message}; mount with --api v4")
            log.warning("%s: every series comes from TCIA", message)
            return None
        try:
            if not path.is_file():
                raise idcindex.IndexUnusable(f"IDC series index {path}: no such file")
            if not idcindex.reduced_path(path, config.cache.root / idcindex.INDEX_DIR).is_file():
                log.warning("preparing IDC's series index %s for lookups (once; the full index takes ~10 s)", path)
            index = idcindex.SeriesIndex(idcindex.ensure_reduced(path, config.cache.root / idcindex.INDEX_DIR))
        except idcindex.IndexUnusable as exc:
            raise MountError(str(exc)) from None
        mirror = IdcMirror(config.mirror, index, store, tcia_size=catalog.series_size, tcia_sops=catalog.instances,
                           md5_of=lambda sop: client.md5_request(sop, always=True), on_sizes=on_sizes)
        mirror.connect()
        return mirror

    @staticmethod
    def _selection(config: MountConfig, client: NbiaClient, store: MetadataStore) -> Selection:
        """The part of the archive to show; manifests and carts are resolved to their series'
        (Collection, PatientID) here, once (cached with the listings)."""
        series = None
        cart = config.cart
        if cart is not None:
            try:
                rows = store.listing(f"cart\0{cart}", lambda: [
                    [s.series_uid, s.collection, s.patient_id] for s in client.get_contents_by_name(cart)])
            except NbiaError as exc:
                raise MountError(f"cannot read cart {config.cart!r}: {exc}") from None
            series = {uid: (c, p) for uid, c, p in rows if c and p}
            if not series:
                raise MountError(f"cart {config.cart!r} is empty or not shared with "
                                 f"{client.user or 'anonymous users'}")
        if config.manifest_series is not None:
            found = resolve_series(client, store, config.manifest_series)
            missing = len(config.manifest_series) - len(found)
            if not found:
                raise MountError(f"none of the {len(config.manifest_series)} series of the manifest is in the "
                                 f"archive for {client.user or 'anonymous users'}")
            if missing:
                log.warning("%d of the %d series of the manifest are not in the archive (or not visible "
                            "to %s): not shown", missing, len(config.manifest_series), client.user)
            series = found if series is None else {u: v for u, v in series.items() if u in found}
        return Selection(
            collections=frozenset(c.lower() for c in config.collections) or None,
            modalities=frozenset(m.upper() for m in config.modalities) or None,
            series=series)

    def status_text(self) -> str:
        return render_status(self._status) if self._status is not None else "starting\n"

    def start_threads(self) -> None:
        """Background work (token refresh, prefetch); called from FUSE init, after daemonising."""
        self.served = True
        if self._on_mounted is not None:
            self._on_mounted()
        client = self.client
        token = "a token session" if client is not None and client.auth is not None else "no token"
        log.info("mounted %s at %s as %s (API %s%s, %s)", self.config.client.root_url, self.config.mountpoint,
                 (client.user if client is not None else None) or "anonymous",
                 client.api if client is not None else "?",
                 ", found by asking the archive" if client is not None and client.negotiated else "", token)
        if client is not None:
            client.start_refresh()
        if self.prefetcher is not None:
            self.prefetcher.start()
        if self._cache is not None:
            self._cache.start()
        if self.tier is not None:
            self.tier.start()

        if self._tier_record is not None:
            self._tier_record.start()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.prefetcher is not None:
            self.prefetcher.stop()
            if self._cache is not None:
                stats = self.prefetcher.stats
                log.info("unmounting: %d instances downloaded (%d from %d zips, %d prefetched one by one), "
                         "%d opens served from the cache", self._cache.downloads, stats["zip_instances"],
                         stats["zips"], stats["single_instances"], self._cache.hits)
        if self.tier is not None:  # before the cache closes: its queued puts read from it
            self.tier.stop()
            stats = self.tier.stats
            log.info("shared cache: %d instances read from it, %d put into it, %d refused, %d errors",
                     stats["hits"], stats["puts"], stats["rejected"], stats["errors"])
        if self._tier_record is not None:
            self._tier_record.stop()
        if self.mirror is not None:
            stats = self.mirror.stats
            log.info("IDC's mirror: %d instances read from it (%d series), %d from TCIA; %d series and %d "
                     "instances sent to TCIA", stats["files"], stats["series_idc"], stats["tcia_files"],
                     stats["series_tcia"], stats["instances_tcia"])
            self.mirror.close()
        if self._guest is not None:
            self._guest.close()
        if self.fs is not None:
            self.fs.catalog.close()
        if self.fs is not None:
            self.fs.close()
        if self.client is not None:
            try:
                self.client.close()
            except NbiaError as exc:
                log.debug("while closing the client: %s", exc)
        for closable in (self._cache, self._store):
            if closable is not None:
                closable.close()
        if self._scope_lock is not None:
            os.close(self._scope_lock)
            self._scope_lock = None


class GuestView:
    """Whether the archive's public view (the guest) sees a series: a named user's mount puts
    what the guest sees under the tier's public prefix, everything else under its own. The
    guest's client is made on first use, from a put thread."""

    def __init__(self, config, api: str):
        self._config = config
        self._api = api
        self._lock = threading.Lock()  # guards _client
        self._client: NbiaClient | None = None

    def sees(self, series_uid: str) -> bool:
        with self._lock:
            if self._client is None:
                guest = NbiaClient(self._config)
                guest.use_api(self._api)
                self._client = guest.connect()
            client = self._client
        return bool(client.get_series(series_uid=series_uid))

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except NbiaError as exc:
                log.debug("while closing the guest's client: %s", exc)


MAX_FUSE_THREADS = 64   # libfuse3's worker threads at most (each blocked open holds one)
# kept when idle: all of them, so a thread keeps its Python thread state for the mount's life
# (fuse_ops._keep_thread_state); libfuse3 3.14 logs a bogus error unless it is given
IDLE_FUSE_THREADS = MAX_FUSE_THREADS
RESOLVE_CONNECTIONS = 8  # v1/v2: getSeries requests at once (TCIA's client uses up to 10)


def resolve_series(client: NbiaClient, store: MetadataStore, uids) -> dict:
    """SeriesInstanceUID -> (Collection, PatientID) for the series the archive shows this user:
    on v4 one POST getSeriesMetadata per 10,000 series, on v1/v2 one getSeries each, 8 at a
    time; remembered with the listings (and served from there while the archive is down)."""
    uids = sorted(set(uids))
    key = "series-set\0" + hashlib.sha256("\n".join(uids).encode()).hexdigest()

    def fetch():
        return {s.series_uid: [s.collection, s.patient_id] for s in client.series_records(uids, RESOLVE_CONNECTIONS)
                if s.collection and s.patient_id}
    try:
        found = store.listing(key, fetch)
    except NbiaError as exc:
        raise MountError(f"cannot resolve the manifest's series: {exc}") from None
    return {uid: tuple(where) for uid, where in found.items() if uid in uids}


def limit_malloc_arenas() -> None:
    """glibc gives each thread its own malloc arena (up to 8 per core); with the FUSE, prefetch
    and listing threads that fragments into hundreds of MB of RSS. Two arenas are plenty."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def raise_open_file_limit() -> None:
    """Each thread that touches a cache holds its own SQLite connection (2 files per cache), and
    libfuse starts threads as requests arrive: lift the soft limit of open files to the hard one
    so a burst of requests never meets EMFILE (the default soft limit is often 1024)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def run(config: MountConfig) -> None:
    """Check, mount and serve until unmounted (SIGINT/SIGTERM or fusermount -u)."""
    limit_malloc_arenas()
    raise_open_file_limit()
    check_fuse()
    check_mountpoint(config.mountpoint)
    # At the default level (INFO), starting is quiet: a failure is its one-line message, and
    # the first line logged is "mounted …" (from FUSE init). -v (DEBUG) shows everything.
    root_logger = logging.getLogger()
    quiet_start = root_logger.level == logging.INFO
    if quiet_start:
        root_logger.setLevel(logging.WARNING)
    mount = Mount(config, on_mounted=(lambda: root_logger.setLevel(logging.INFO)) if quiet_start else None)
    fs = mount.start()
    try:
        from nbiafs import fuse_ops
    except (ImportError, OSError, EnvironmentError) as exc:
        mount.stop()
        raise MountError(f"cannot load libfuse3: {exc}") from None
    ops = fuse_ops.FuseOperations(fs, on_init=mount.start_threads, on_destroy=mount.stop,
                                  mountpoint=str(config.mountpoint))
    # libfuse3 invalidates a path when its size changes, so the kernel may cache attributes
    # and names; libfuse2 (only if FUSE_LIBRARY_PATH points at it) cannot: never cached there.
    cached_s = fuse_ops.ATTR_TIMEOUT_S if fuse_ops.FUSE_MAJOR >= 3 else 0
    options = dict(foreground=config.foreground, ro=True, nothreads=False, raw_fi=True,
                   fsname="nbiafs", subtype="nbiafs", use_ino=True,
                   attr_timeout=cached_s, entry_timeout=cached_s or config.entry_timeout_s,
                   negative_timeout=1, allow_other=config.allow_other, max_threads=MAX_FUSE_THREADS,
                   max_idle_threads=IDLE_FUSE_THREADS)
    log.info("mounting %s at %s", config.client.root_url, config.mountpoint)
    try:
        fuse_ops.serve(ops, str(config.mountpoint), **options)
    except RuntimeError as exc:
        if mount.served:  # libfuse3 reports an end by SIGINT/SIGTERM as an error: it is not one
            return
        mount.stop()
        raise MountError(f"mounting {config.mountpoint} failed (libfuse error {exc}); "
                         "see the messages above") from None
