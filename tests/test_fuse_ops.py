"""The FUSE adapter: what each kind of failure becomes for the kernel (its errno boundary), and how
it tells the kernel that sizes changed (its invalidator)."""

from __future__ import annotations

import errno
import threading
import time
import types

import pytest

from nbiafs.errors import ArchiveUnavailable, NotFound
from nbiafs.fuse_ops import FuseOperations, FuseOSError, KernelInvalidator
from nbiafs.status import ErrorLog


def operations(failure: BaseException) -> FuseOperations:
    def fail(*_args):
        raise failure
    fs = types.SimpleNamespace(getattr=fail, errors=ErrorLog())
    return FuseOperations(fs)


@pytest.mark.parametrize("failure, expected, noted", [
    (NotFound("/x"), errno.ENOENT, False),
    (ArchiveUnavailable("getSingleImage", 3, "HTTP 500"), errno.EIO, True),
    # A cache file gone under a name that exists is the daemon's failure, not an unknown path.
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/cache/blobs/ab/cd/x.val"), errno.EIO, True),
    (PermissionError(errno.EACCES, "Permission denied"), errno.EIO, True),
    (RuntimeError("a bug"), errno.EIO, True),
])
def test_failures_become_their_errno(failure, expected, noted):
    ops = operations(failure)
    with pytest.raises(FuseOSError) as info:
        ops.getattr("/C/P/1.dcm")
    assert info.value.errno == expected
    assert (ops.fs.errors.count > 0) == noted


class Kernel:
    """Stands for the kernel behind fuse_invalidate_path: ENOENT for paths it does not know."""

    def __init__(self, known=()):
        self.known = set(known)
        self.told: list[str] = []
        self.lock = threading.Lock()

    def invalidate(self, path: bytes) -> int:
        with self.lock:
            self.told.append(path.decode())
            return 0 if path.decode() in self.known else -errno.ENOENT


def invalidator(kernel: Kernel, retry_after=(0.01, 0.02, 0.05)) -> KernelInvalidator:
    inv = KernelInvalidator(kernel.invalidate)
    inv.RETRY_AFTER_S = retry_after
    inv.start(None)
    return inv


def test_an_invalidation_the_kernel_could_not_take_is_tried_again_until_it_takes():
    kernel = Kernel(known={"/a"})
    inv = invalidator(kernel)
    try:
        inv.wait(inv.submit(["/a", "/b"]))
        assert not inv.unconfirmed("/a") and inv.unconfirmed("/b")
        kernel.known.add("/b")  # the lookup's reply with the estimate reached the kernel
        deadline = time.monotonic() + 5
        while inv.unconfirmed("/b"):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        told = kernel.told.count("/b")
        time.sleep(0.1)  # past every retry: a confirmed path is not told again
        assert told >= 2 and kernel.told.count("/b") == told and kernel.told.count("/a") == 1
    finally:
        inv.stop()


def test_retries_end_and_an_open_still_confirms():
    kernel = Kernel()
    inv = invalidator(kernel)
    try:
        inv.wait(inv.submit(["/gone"]))
        deadline = time.monotonic() + 5
        while kernel.told.count("/gone") < 1 + len(inv.RETRY_AFTER_S):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.1)
        assert kernel.told.count("/gone") == 1 + len(inv.RETRY_AFTER_S)  # and no more
        assert inv.unconfirmed("/gone")  # an open of it will invalidate it once more
        kernel.known.add("/gone")
        inv.wait(inv.submit(["/gone"]))
        assert not inv.unconfirmed("/gone")
    finally:
        inv.stop()


def test_unconfirmed_paths_are_bounded():
    kernel = Kernel()
    inv = invalidator(kernel, retry_after=())
    inv.MAX_UNCONFIRMED = 10
    try:
        inv.wait(inv.submit([f"/{n}" for n in range(25)]))
        assert [n for n in range(25) if inv.unconfirmed(f"/{n}")] == list(range(15, 25))
    finally:
        inv.stop()
