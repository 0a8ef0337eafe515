"""The fusepy adapter: the only module that imports `fuse`. Thin: it converts and maps errors.

Every operation runs under `_errno_boundary`: an `NbiaError` becomes its errno,
anything unexpected is logged with its traceback and becomes EIO. No exception
reaches fusepy, which would report EINVAL or even unmount.
"""

from __future__ import annotations

import errno
import functools
import logging

from fuse import FuseOSError, Operations  # noqa: F401 - re-exported for mount.py

from nbiafs.errors import NbiaError
from nbiafs.filesystem import NbiaFilesystem

log = logging.getLogger(__name__)


def _errno_boundary(method):
    @functools.wraps(method)
    def wrapper(self, *args):
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
        except OSError as exc:
            # A local failure (the cache's disk): EIO. Its own errno would mislead: a cache
            # file missing under a name that exists is not ENOENT for the path asked.
            log.warning("%s %s: %s", method.__name__, args[0] if args else "", exc)
            self.fs.errors.note(method.__name__, args[0] if args else "", str(exc))
            raise FuseOSError(errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s %s; answering EIO", method.__name__,
                          args[0] if args else "")
            self.fs.errors.note(method.__name__, args[0] if args else "", "unexpected error (see the log)")
            raise FuseOSError(errno.EIO) from None
    return wrapper


def _read_only(*_args):
    raise FuseOSError(errno.EROFS)


class FuseOperations(Operations):
    """fusepy operations over `NbiaFilesystem` (raw_fi=True: `fi` is the fuse_file_info)."""

    use_ns = False

    def __init__(self, fs: NbiaFilesystem, on_init=None, on_destroy=None):
        self.fs = fs
        self._on_init = on_init
        self._on_destroy = on_destroy

    def init(self, path):
        # Threads start here, after libfuse has daemonised (a fork would lose them).
        if self._on_init:
            self._on_init()

    def destroy(self, path):
        if self._on_destroy:
            self._on_destroy()

    @_errno_boundary
    def getattr(self, path, fh=None):
        return self.fs.getattr(path)

    @_errno_boundary
    def readdir(self, path, fh):
        entries: list[tuple[str, dict | None, int]] = [(".", None, 0), ("..", None, 0)]
        entries += [(name, attrs, 0) for name, attrs in self.fs.readdir(path)]
        return entries

    @_errno_boundary
    def open(self, path, fi):
        fh, immutable = self.fs.open(path, fi.flags)
        fi.fh = fh
        fi.keep_cache = 1 if immutable else 0  # instances never change: keep the page cache
        fi.direct_io = 0 if immutable else 1   # the status text: read to its end, whatever st_size said
        return 0

    @_errno_boundary
    def read(self, path, size, offset, fi):
        return self.fs.read(fi.fh, size, offset)

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
