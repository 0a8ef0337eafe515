"""`nbiafs mount` with one race made certain: the exact size of a chosen instance becomes known
(as when the prefetch stores it) while the lookup that tells the kernel its estimate is being
answered, after the estimate was worked out and before the kernel has the path.

Run by tests/test_mount.py: `python kernel_race_driver.py SIZES_JSON MOUNT_ARGS…`, where
SIZES_JSON maps mount paths to their exact sizes. Everything else is the real daemon.
"""

import json
import sys
import time

from nbiafs import cli, fuse_ops

EXACT = json.loads(sys.argv[1])
_getattr = fuse_ops.FuseOperations.getattr
_raced: set[str] = set()


def getattr_raced(self, path, fh=None):
    attrs = _getattr(self, path, fh)
    if path in EXACT and path not in _raced:
        _raced.add(path)
        node = self.fs.catalog.resolve(path)
        # What the prefetch's store does; then wait here until the kernel was told.
        self.fs.record_exact_size(node.series_uid, node.sop_uid, EXACT[path])
        while self.invalidator.pending(path):
            time.sleep(0.001)
    return attrs


fuse_ops.FuseOperations.getattr = getattr_raced
sys.exit(cli.main(["mount", *sys.argv[2:]]))
