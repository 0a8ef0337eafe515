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
MEDIA_SOP_INSTANCE_UID, TRANSFER_SYNTAX_UID = 0x0003, 0x0010  # file meta (0002,xxxx)
META_TEXT = frozenset({MEDIA_SOP_INSTANCE_UID, TRANSFER_SYNTAX_UID})


class Unnamed:
    """`f` handed to pydicom without its file name. pydicom stats a named file as it reads it
    (for a timestamp it keeps), between a check that the name exists and the stat; a file of
    the cache can be renamed (stored by the cache's own thread) at any moment, and that stat
    then fails on a file that is open and whole."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def read(self, size: int = -1) -> bytes:
        return self._f.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


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
            uid = str(pydicom.dcmread(Unnamed(f), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                      .SOPInstanceUID)
        except Exception:  # noqa: BLE001 - unreadable: not an instance we can name
            uid = None
        f.seek(0)
    return uid or None


def instance_uid_of_head(head: bytes) -> str | None:
    """The instance UID named by the first bytes of a DICOM Part-10 file: the file meta's
    MediaStorageSOPInstanceUID (0002,0003), else (0008,0018) where these bytes hold it; None
    when neither is in them (or they are not DICOM)."""
    if head[128:132] != b"DICM":
        return None
    meta = _file_meta(head)
    if meta is None:
        return None
    if MEDIA_SOP_INSTANCE_UID in meta[0]:
        return meta[0][MEDIA_SOP_INSTANCE_UID] or None
    return _walk(head)


def _file_meta(head: bytes) -> tuple[dict[int, str], int] | None:
    """The text values of the file meta's elements wholly in `head` (by element number of
    group 0002) and the offset after the meta; None if these bytes cannot be read so."""
    pos, values = 132, {}
    try:
        while pos + 8 <= len(head):  # file meta: always explicit VR little endian
            group, elem, vpos, length = _element(head, pos, True)
            if group != 0x0002:
                break
            if elem in META_TEXT and vpos + length <= len(head):
                values[elem] = head[vpos:vpos + length].rstrip(b"\0 ").decode("ascii")
            pos = vpos + length
    except (struct.error, UnicodeDecodeError):
        return None
    return values, pos


def _element(head: bytes, pos: int, explicit: bool):
    """(group, element, value offset, value length) of the element at `pos`."""
    group, elem = struct.unpack_from("<HH", head, pos)
    if not explicit:
        return group, elem, pos + 8, struct.unpack_from("<I", head, pos + 4)[0]
    if head[pos + 4:pos + 6] in LONG_VRS:
        return group, elem, pos + 12, struct.unpack_from("<I", head, pos + 8)[0]
    return group, elem, pos + 8, struct.unpack_from("<H", head, pos + 6)[0]


def _walk(head: bytes) -> str | None:
    meta = _file_meta(head)
    if meta is None:
        return None
    syntax, pos = meta[0].get(TRANSFER_SYNTAX_UID), meta[1]
    try:
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


# --------------------------------------------------------------------------- completeness
MAX_DEPTH = 16  # nested sequences followed; deeper (or hostile) files are not judged
ITEM, ITEM_END, SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
UNDEFINED = 0xFFFFFFFF


class _Cut(Exception):
    """The file ends inside an element: it was cut short."""


def ends_complete(f: BinaryIO) -> bool | None:
    """Whether the DICOM Part-10 file `f` holds whole elements up to its last byte: False when
    it was cut short (an element's value, an item or a sequence runs past the end; pydicom reads
    such a file without a word), True when the last element ends at the last byte, None where
    this walker does not judge (big endian, deflated, nesting deeper than MAX_DEPTH). Walks
    element headers only: a few reads per element outside pixel data."""
    end = f.seek(0, 2)
    try:
        if _read(f, 128, 4) != b"DICM":
            return False
        pos, syntax = 132, None
        while pos < end:  # file meta: explicit VR little endian
            group, elem, vpos, length = _element(_read(f, pos, 12, 8), 0, True)
            vpos += pos
            if group != 0x0002:
                break
            if elem == 0x0010:
                syntax = _read(f, vpos, length).rstrip(b"\0 ").decode("ascii", "replace")
            pos = vpos + length
        if syntax in UNSUPPORTED:
            return None
        explicit = syntax != IMPLICIT_LE
    except (_Cut, struct.error):  # struct.error: a header shorter than its VR needs
        return False
    # Some files say explicit VR and are written implicit (pydicom reads them with a warning):
    # whole in either reading is whole.
    for vr_explicit in (explicit, False) if explicit else (False,):
        try:
            if _dataset(f, pos, end, vr_explicit, 0, None) == end:
                return True
        except (_Cut, struct.error):
            continue
        except _TooDeep:
            return None
    return False


class _TooDeep(Exception):
    pass


def _read(f: BinaryIO, pos: int, size: int, at_least: int | None = None) -> bytes:
    f.seek(pos)
    data = f.read(size)
    if len(data) < (size if at_least is None else at_least):
        raise _Cut
    return data


def _dataset(f: BinaryIO, pos: int, end: int, explicit: bool, depth: int, until) -> int:
    """Walk elements from `pos`; stop at the end of the file (top level) or after the delimiter
    `until`. Returns the position after the last element."""
    if depth > MAX_DEPTH:
        raise _TooDeep
    while pos < end:
        head = _read(f, pos, 12, 8)
        tag = struct.unpack_from("<HH", head)
        if tag[0] == 0xFFFE:  # item and delimiters: no VR, a 4-byte length
            if until is not None and tag == until:
                return pos + 8
            raise _Cut  # an item or delimiter where an element belongs: not this file's structure
        _group, _elem, vpos, length = _element(head, 0, explicit)
        vpos += pos
        vr = head[4:6] if explicit else None
        if length == UNDEFINED:
            # A sequence, encapsulated pixel data, or UN of undefined length (whose content is
            # implicit VR): items up to a sequence delimiter.
            pos = _items(f, vpos, end, explicit and vr != b"UN", depth + 1)
        else:
            pos = vpos + length
            if pos > end:
                raise _Cut
    if until is not None:
        raise _Cut  # the file ended before the delimiter
    return pos


def _items(f: BinaryIO, pos: int, end: int, explicit: bool, depth: int) -> int:
    while True:
        head = _read(f, pos, 8)
        tag = struct.unpack_from("<HH", head)
        length = struct.unpack_from("<I", head, 4)[0]
        if tag == SEQUENCE_END:
            return pos + 8
        if tag != ITEM:
            raise _Cut
        if length == UNDEFINED:
            pos = _dataset(f, pos + 8, end, explicit, depth, ITEM_END)
        else:
            pos += 8 + length
            if pos > end:
                raise _Cut
