"""The errno boundary of the FUSE adapter: what each kind of failure becomes for the kernel."""

from __future__ import annotations

import errno
import types

import pytest

from nbiafs.errors import ArchiveUnavailable, NotFound
from nbiafs.fuse_ops import FuseOperations, FuseOSError
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
