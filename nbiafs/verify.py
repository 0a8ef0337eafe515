"""The one check of an instance's bytes that came from a source other nodes write (the shared
tier), before the cache accepts them.

The archive's own answers are checked where they arrive (api/client.py: Content-Length,
`DICM`, the archive's md5; prefetch.py: zip CRCs and md5hashes.csv). Bytes from a bucket
that every node of a cluster can write are trusted for nothing: they must be the DICOM file
of the instance asked for, whole, and, where the archive's md5 is known, exactly its bytes.
"""

from __future__ import annotations

from typing import BinaryIO

from nbiafs.dicomhead import ends_complete, sop_instance_uid


def refusal(f: BinaryIO, sop_uid: str, size: int, expected_size: int | None = None,
            md5: str | None = None, expected_md5: str | None = None) -> str | None:
    """Why the `size` bytes in `f` are not instance `sop_uid` (None: they are). `expected_size`:
    the exact size, where one is known; `md5`/`expected_md5`: the bytes' md5 and the archive's."""
    found = sop_instance_uid(f)
    if found is None:
        return "not a DICOM Part-10 file"
    if found != sop_uid:
        return f"it is instance {found}"
    if expected_size is not None and size != expected_size:
        return f"{size} bytes where the instance has {expected_size}"
    if expected_md5 is not None and md5 is not None and md5 != expected_md5:
        return f"md5 {md5}, the archive's is {expected_md5}"
    if ends_complete(f) is False:
        return "cut short (its last element runs past the end)"
    f.seek(0)
    return None
