"""Read the SOP Instance UID (0008,0018) from the first bytes of a DICOM Part-10 file, fast.

Bulk transfers name their entries `00000001.dcm…`, so every entry's instance UID
must be read from the file. pydicom takes about a millisecond a file for this;
walking the few elements before (0008,0018) by hand takes microseconds. Files
this walker does not understand (big endian, deflated, undefined lengths before
the UID) are read with pydicom instead.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

import pydicom

HEAD_BYTES = 8192
IMPLICIT_LE = "1.2.840.10008.1.2"
UNSUPPORTED = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated
LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
SOP_INSTANCE_UID = (0x0008, 0x0018)


def sop_instance_uid(f: BinaryIO) -> str | None:
    """(0008,0018) of the DICOM file `f` (left at offset 0), or None if it is not DICOM."""
    f.seek(0)
    head = f.read(HEAD_BYTES)
    f.seek(0)
    if head[128:132] != b"DICM":
        return None
    uid = _walk(head)
    if uid is None:
        try:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                      .SOPInstanceUID)
        except Exception:  # noqa: BLE001 - unreadable: not an instance we can name
            uid = None
        f.seek(0)
    return uid or None


def _element(head: bytes, pos: int, explicit: bool):
    """(group, element, value offset, value length) of the element at `pos`."""
    group, elem = struct.unpack_from("<HH", head, pos)
    if not explicit:
        return group, elem, pos + 8, struct.unpack_from("<I", head, pos + 4)[0]
    if head[pos + 4:pos + 6] in LONG_VRS:
        return group, elem, pos + 12, struct.unpack_from("<I", head, pos + 8)[0]
    return group, elem, pos + 8, struct.unpack_from("<H", head, pos + 6)[0]


def _walk(head: bytes) -> str | None:
    pos, syntax = 132, None
    try:
        while pos + 8 <= len(head):  # file meta: always explicit VR little endian
            group, elem, vpos, length = _element(head, pos, True)
            if group != 0x0002:
                break
            if elem == 0x0010:
                syntax = head[vpos:vpos + length].rstrip(b"\0 ").decode("ascii")
            pos = vpos + length
        if syntax is None or syntax in UNSUPPORTED:
            return None
        explicit = syntax != IMPLICIT_LE
        while pos + 8 <= len(head):
            group, elem, vpos, length = _element(head, pos, explicit)
            if (group, elem) > SOP_INSTANCE_UID or length == 0xFFFFFFFF:
                return None
            if (group, elem) == SOP_INSTANCE_UID:
                if vpos + length > len(head):
                    return None
                return head[vpos:vpos + length].rstrip(b"\0 ").decode("ascii")
            pos = vpos + length
    except (struct.error, UnicodeDecodeError):
        return None
    return None
