"""The FUSE adapter: the only module that imports the binding (mfusepy on libfuse3). Thin: it
converts, maps errors, hands reads to libfuse, and tells the kernel when a size changed.

Every operation runs under `_errno_boundary`: an `NbiaError` becomes its errno,
anything unexpected is logged with its traceback and becomes EIO. No exception
reaches the binding, which would report EINVAL or even unmount.

Why libfuse3 (mfusepy, the maintained fork of fusepy, same API): it can invalidate one path's
attributes in the kernel (`fuse_invalidate_path`), so attributes and names are cached by the
kernel for `ATTR_TIMEOUT_S` instead of being asked of Python at every stat, open and read; and
its `read_buf` lets a read be answered with the cache file's descriptor, so libfuse splices the
bytes from the cache file to the kernel itself (`FUSE_CAP_SPLICE_WRITE`, asked at init: no copy
through a buffer of libfuse's) and Python only says where they are.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import functools
import heapq
import io
import logging
import os
import queue
import re
import sqlite3
import threading
import time

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would take libfuse2 first
import mfusepy  # noqa: E402
from mfusepy import FUSE, FuseOSError, Operations  # noqa: E402, F401 - FuseOSError re-exported

from nbiafs.errors import NbiaError  # noqa: E402
from nbiafs.filesystem import NbiaFilesystem  # noqa: E402

log = logging.getLogger(__name__)

ATTR_TIMEOUT_S = 3600.0   # sizes change only from estimate to exact, and are invalidated then
INVALIDATE_WAIT_S = 2.0   # `KernelInvalidator.wait` waits this long at most
READ_AHEAD_KB = 1024      # the mount's readahead window: reads of 1 MiB (FUSE's max_pages)

FUSE_CAP_SPLICE_WRITE = 1 << 7
FUSE_CAP_SPLICE_MOVE = 1 << 8
FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2


class _FuseBuf(ctypes.Structure):  # struct fuse_buf (fuse_common.h)
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _FuseBufvec(ctypes.Structure):  # struct fuse_bufvec, with its one inline buffer
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _FuseBuf * 1)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libfuse = mfusepy._libfuse
FUSE_MAJOR = mfusepy.fuse_version_major
if FUSE_MAJOR >= 3:
    _libfuse.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    _libfuse.fuse_invalidate_path.restype = ctypes.c_int


# A callback from a libfuse thread enters Python through ctypes, which makes a Python thread
# state for that thread and deletes it on the way out, at every request (opens and closes one
# after another: 121 µs each without this, 56 µs with it). The first callback in each libfuse
# thread takes one more hold of its state, never given back, so the state lives as long as the
# thread; libfuse keeps its threads (no idle thread is retired: mount.IDLE_FUSE_THREADS), so
# there are at most that many.
_thread_state = threading.local()
_PyGILState_Ensure = ctypes.pythonapi.PyGILState_Ensure


def _keep_thread_state() -> None:
    if not getattr(_thread_state, "kept", False):
        _PyGILState_Ensure()
        _thread_state.kept = True


def _errno_boundary(method):
    @functools.wraps(method)
    def wrapper(self, *args):
        _keep_thread_state()
        try:
            return method(self, *args)
        except FuseOSError:
            raise
        except NbiaError as exc:
            if exc.errno == errno.EIO:
                log.warning("%s %s: %s", method.__name__, args[0] if args else "", exc)
                self.fs.errors.note(method.__name__, args[0] if args else "", str(exc))
            else:
                log.debug("%s %s: %s", method.__name__, args[0] if args else "", exc)
            raise FuseOSError(exc.errno) from None
        except (OSError, sqlite3.Error) as exc:
            # A local failure (the cache's disk, its index): EIO. Its own errno would mislead: a
            # cache file missing under a name that exists is not ENOENT for the path asked.
            log.warning("%s %s: %s", method.__name__, args[0] if args else "", exc)
            self.fs.errors.note(method.__name__, args[0] if args else "", str(exc))
            raise FuseOSError(errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s %s; answering EIO", method.__name__,
                          args[0] if args else "")
            self.fs.errors.note(method.__name__, args[0] if args else "", "unexpected error (see the log)")
            raise FuseOSError(errno.EIO) from None
    return wrapper


def _caller() -> int:
    """The thread that made the request being answered (FUSE's context), 0 if unknown."""
    try:
        return int(_libfuse.fuse_get_context().contents.pid)
    except (AttributeError, ValueError, OSError):
        return 0


def _read_only(*_args):
    raise FuseOSError(errno.EROFS)


class KernelInvalidator:
    """Tells the kernel that paths' attributes changed (libfuse3's fuse_invalidate_path): in
    order, from its own thread (`submit`, which returns an event set once done; `pending` says
    whether a path is queued and not yet told), since a thread answering a lookup or readdir
    must not send such a notice; or at once from the thread answering an open of the path
    (`invalidate_now`), which may (an inode notice never blocks on a read-only mount: no dirty
    pages to write back).

    An invalidation the kernel answers with ENOENT did nothing: it had no inode for the path.
    Either it had forgotten the path, or the reply that gives it the inode (with the estimate
    being invalidated) was still on its way: sent by another thread, not yet read by the kernel,
    which then keeps the estimate for the attribute timeout. Such a path stays *unconfirmed*:
    it is invalidated again `RETRY_AFTER_S` later, and by any open of it (`unconfirmed`), when
    the kernel surely has its inode."""

    RETRY_AFTER_S = (0.05, 0.5, 5.0)
    MAX_UNCONFIRMED = 65536

    def __init__(self, invalidate=None):
        self._invalidate = invalidate  # (path bytes) -> 0 or -errno; libfuse's by default
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._unconfirmed: dict[str, int] = {}  # path -> retries done (insertion order: oldest first)
        self._queued: collections.Counter = collections.Counter()  # paths submitted, not yet told
        self._retries: list[tuple[float, str]] = []  # (when, path), a heap

    def start(self, fuse_handle: int | None) -> None:
        if self._invalidate is None and fuse_handle:
            self._invalidate = functools.partial(_libfuse.fuse_invalidate_path, fuse_handle)
        if self._invalidate is not None and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nbia-invalidate", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def submit(self, paths) -> threading.Event | None:
        if self._thread is None:
            return None
        event = threading.Event()
        paths = list(paths)
        with self._lock:
            self._queued.update(paths)
        self._queue.put((paths, event))
        return event

    def pending(self, path: str) -> bool:
        with self._lock:
            return path in self._queued

    def invalidate_now(self, path: str) -> None:
        """Invalidate `path` in the calling thread (one answering an open of it)."""
        if self._invalidate is not None and self._thread is not None:
            self._tell(path, retried=False)

    def unconfirmed(self, path: str) -> bool:
        """Whether the kernel may still hold an attribute of `path` that was invalidated while
        it did not know the path (see the class)."""
        with self._lock:
            return path in self._unconfirmed

    def wait(self, done: threading.Event) -> None:
        if not done.wait(INVALIDATE_WAIT_S):
            log.warning("the kernel did not take an invalidation within %.0f s", INVALIDATE_WAIT_S)

    def _loop(self) -> None:
        while True:
            timeout = None
            with self._lock:
                if self._retries:
                    timeout = max(0.0, self._retries[0][0] - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                self._retry_due()
                continue
            if item is None:
                return
            paths, event = item
            for path in paths:
                self._tell(path, retried=False)
                with self._lock:
                    self._queued[path] -= 1
                    if self._queued[path] <= 0:
                        del self._queued[path]
            event.set()
            self._retry_due()

    def _retry_due(self) -> None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._retries or self._retries[0][0] > now:
                    return
                _, path = heapq.heappop(self._retries)
                if path not in self._unconfirmed:
                    continue  # confirmed meanwhile (an open)
            self._tell(path, retried=True)

    def _tell(self, path: str, retried: bool) -> None:
        assert self._invalidate is not None
        result = self._invalidate(path.encode("utf-8", "surrogateescape"))
        with self._lock:
            if result != -errno.ENOENT:  # done (0), or an error no retry would mend
                self._unconfirmed.pop(path, None)
                return
            done = self._unconfirmed.pop(path, -1) + 1 if retried else 0
            self._unconfirmed[path] = done
            if done < len(self.RETRY_AFTER_S):
                heapq.heappush(self._retries, (time.monotonic() + self.RETRY_AFTER_S[done], path))
            while len(self._unconfirmed) > self.MAX_UNCONFIRMED:  # forgotten by the kernel, mostly
                self._unconfirmed.pop(next(iter(self._unconfirmed)))


class FuseOperations(Operations):
    """Operations over `NbiaFilesystem` (raw_fi=True: `fi` is the fuse_file_info)."""

    use_ns = True

    def __init__(self, fs: NbiaFilesystem, on_init=None, on_destroy=None, mountpoint: str | None = None):
        self.fs = fs
        self._on_init = on_init
        self._on_destroy = on_destroy
        self._mountpoint = mountpoint
        self.invalidator = KernelInvalidator()
        fs.kernel = self.invalidator

    def init_with_config(self, conn, config):
        if conn is not None:  # reads answered from a descriptor: spliced, not copied through a buffer
            conn.want |= conn.capable & (FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE)
        # Threads start here, after libfuse has daemonised (a fork would lose them).
        if FUSE_MAJOR >= 3:
            self.invalidator.start(_libfuse.fuse_get_context().contents.fuse)
        if self._mountpoint:
            threading.Thread(target=widen_readahead, args=(self._mountpoint,), name="nbia-readahead",
                             daemon=True).start()
        if self._on_init:
            self._on_init()

    def destroy(self, path):
        self.invalidator.stop()
        if self._on_destroy:
            self._on_destroy()

    @_errno_boundary
    def getattr(self, path, fh=None):
        return _ns(self.fs.getattr(path))

    @_errno_boundary
    def readdir(self, path, fh):
        entries: list[tuple[str, dict | None, int]] = [(".", None, 0), ("..", None, 0)]
        entries += [(name, attrs, 0) for name, attrs in self.fs.readdir(path, _caller())]
        return entries

    @_errno_boundary
    def open(self, path, fi):
        fh, immutable = self.fs.open(path, fi.flags, _caller())
        fi.fh = fh
        fi.keep_cache = 1 if immutable else 0  # instances never change: keep the page cache
        fi.direct_io = 0 if immutable else 1   # the status text: read to its end, whatever st_size said
        return 0

    @_errno_boundary
    def read_buf(self, path, bufpp, size, offset, fi):
        """The read, answered with where the bytes are: the cache file's descriptor and offset
        (libfuse reads or splices them); the status text from memory."""
        handle = self.fs.handle(fi.fh)
        vec = _FuseBufvec.from_address(_malloc(ctypes.sizeof(_FuseBufvec)))
        vec.count, vec.idx, vec.off = 1, 0, 0
        buf = vec.buf[0]
        if isinstance(handle, io.BytesIO):
            data = handle.getvalue()[offset:offset + size]
            buf.mem = _malloc(max(1, len(data)))  # freed by libfuse with the vector
            ctypes.memmove(buf.mem, data, len(data))
            buf.size, buf.flags, buf.fd, buf.pos = len(data), 0, -1, 0
        else:
            buf.size, buf.flags, buf.mem = size, FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK, None
            buf.fd, buf.pos = handle.fileno(), offset
        ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = ctypes.addressof(vec)
        return 0

    @_errno_boundary
    def release(self, path, fi):
        self.fs.release(fi.fh)
        return 0

    @_errno_boundary
    def getxattr(self, path, name, position=0):
        return self.fs.getxattr(path, name)

    @_errno_boundary
    def listxattr(self, path):
        return self.fs.listxattr(path)

    @_errno_boundary
    def statfs(self, path):
        return self.fs.statfs()

    @_errno_boundary
    def access(self, path, amode):
        self.fs.access(path, amode)
        return 0

    # Not implemented on purpose, so the kernel stops asking after the first ENOSYS and a
    # close or a directory listing costs no extra call into Python.
    opendir = releasedir = flush = fsync = fsyncdir = None

    chmod = chown = create = link = mkdir = mknod = rename = rmdir = _read_only
    setxattr = removexattr = symlink = truncate = unlink = utimens = write = _read_only


def _malloc(size: int) -> int:
    address = _libc.malloc(size)
    if not address:
        raise MemoryError("malloc failed")
    return address


_TIMES = ("st_atime", "st_mtime", "st_ctime")


def _ns(attrs: dict) -> dict:
    """Times in whole nanoseconds (use_ns), as the binding wants them."""
    for key in _TIMES:
        value = attrs.get(key)
        if isinstance(value, float):
            attrs[key] = int(value * 1e9)
    return attrs


def widen_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead (and so send READs of) up to READ_AHEAD_KB on this mount, not
    its 128 KiB default; root only (the mount's backing-device setting in sysfs)."""
    device = _mount_device(mountpoint)
    if device is None:
        return
    path = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
        log.debug("readahead of %s (%s) set to %d KiB", mountpoint, device, READ_AHEAD_KB)
    except OSError as exc:
        log.debug("readahead of %s stays at the kernel's default (%s)", mountpoint, exc.strerror)


def _mount_device(mountpoint: str, attempts: int = 50) -> str | None:
    """MAJOR:MINOR of the FUSE mount at `mountpoint`, from /proc/self/mountinfo (never a stat
    of the mount itself, which would ask this daemon)."""
    target = os.path.realpath(mountpoint)
    for _ in range(attempts):
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 4 and _unescape(fields[4]) == target and "fuse" in line.split(" - ")[-1]:
                        return fields[2]
        except OSError:
            return None
        time.sleep(0.1)  # init runs just before the mount appears
    return None


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def serve(operations: FuseOperations, mountpoint: str, **options) -> None:
    """Mount and answer requests until unmounted (libfuse's loop; RuntimeError on failure)."""
    FUSE(operations, mountpoint, **options)
