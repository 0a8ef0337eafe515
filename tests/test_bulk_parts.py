"""Pure parts of the bulk transfer: the streaming zip reader and the SOP UID reader."""

from __future__ import annotations

import io
import zipfile

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from nbiafs.dicomhead import sop_instance_uid
from nbiafs.zipstream import TruncatedZip, iter_entries


class Unseekable(io.RawIOBase):
    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.data += b
        return len(b)


def streamed_zip(entries: dict[str, bytes]) -> bytes:
    """A zip written as the archive streams it: unseekable, with data descriptors."""
    sink = Unseekable()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            with zf.open(name, "w") as dst:
                dst.write(data)
    return bytes(sink.data)


def chunks(data: bytes, size: int = 1000):
    return (data[i:i + size] for i in range(0, len(data), size))


def test_entries_arrive_one_by_one_with_their_content():
    entries = {"LICENSE": b"license text", "00000001.dcm": b"A" * 50000, "00000002.dcm": bytes(range(256)) * 300}
    got = {name: f.read() for name, f in iter_entries(chunks(streamed_zip(entries)))}
    assert got == entries


def test_a_zip_cut_short_keeps_the_complete_entries():
    entries = {f"{i:08d}.dcm": bytes([i]) * 20000 for i in range(1, 6)}
    data = streamed_zip(entries)
    seen = []
    with pytest.raises(TruncatedZip):
        for name, f in iter_entries(chunks(data[: len(data) * 3 // 5])):
            seen.append((name, f.read()))
    assert seen and all(entries[n] == d for n, d in seen) and len(seen) < 5


def test_corrupt_data_is_detected():
    data = bytearray(streamed_zip({"a.dcm": b"hello world" * 1000}))
    data[60] ^= 0xFF
    with pytest.raises(TruncatedZip):
        list(iter_entries(chunks(bytes(data))))


def test_sop_uid_explicit_and_implicit(nbia_archive):
    path = next(iter(nbia_archive.index.series_by_uid.values())).instances[0].path
    ds = pydicom.dcmread(path)
    with open(path, "rb") as f:
        assert sop_instance_uid(f) == ds.SOPInstanceUID and f.tell() == 0
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert sop_instance_uid(buf) == ds.SOPInstanceUID
    assert sop_instance_uid(io.BytesIO(b"LICENSE text, not DICOM" * 20)) is None
