"""Pure parts of the bulk transfer: the streaming zip reader and the SOP UID reader."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
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


def test_entries_larger_than_a_piece_arrive_whole_with_their_md5():
    noisy = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32)  # 5 MiB, barely compressible
    entries = {"big.dcm": noisy, "zeros.dcm": bytes(40 * 1024 * 1024), "small.dcm": b"x" * 10}
    md5s: dict[str, str] = {}
    got = {name: f.read() for name, f in iter_entries(chunks(streamed_zip(entries), 256 * 1024), md5s=md5s)}
    assert got == entries
    assert md5s == {name: hashlib.md5(data).hexdigest() for name, data in entries.items()}


def test_a_reader_that_stops_leaves_no_file_but_the_ones_it_took(tmp_path):
    """Files made as the cache makes them (kept when the reader stops after taking one,
    removed when an entry fails or is dropped): stopping after the second entry leaves
    exactly the two taken, though the third was already being read."""
    @contextlib.contextmanager
    def held_file():
        f = tempfile.NamedTemporaryFile(dir=tmp_path, delete=False)
        try:
            yield f
        except GeneratorExit:
            raise
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    entries = {f"{i:08d}.dcm": bytes([i]) * 300_000 for i in range(1, 8)}
    taken = []
    for name, f in iter_entries(chunks(streamed_zip(entries), 64 * 1024), held_file):
        assert f.read() == entries[name]
        taken.append(f.name)
        if len(taken) == 2:
            break
    assert sorted(str(p) for p in tmp_path.iterdir()) == sorted(taken)


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


@pytest.mark.parametrize("library", ["isal", "zlib"])
def test_either_inflater_reads_entries_and_refuses_corrupt_data(library, monkeypatch):
    """ISA-L's inflate where its wheels exist, zlib's elsewhere: the same bytes, the same refusals."""
    import zlib

    import nbiafs.zipstream as zipstream
    module = pytest.importorskip("isal.isal_zlib") if library == "isal" else zlib
    monkeypatch.setattr(zipstream, "_deflate", module)
    noisy = hashlib.sha256(b"other seed").digest() * (3 * 1024 * 1024 // 32)
    entries = {"a.dcm": noisy, "b.dcm": b"hello world" * 1000}
    assert {name: f.read() for name, f in iter_entries(chunks(streamed_zip(entries), 64 * 1024))} == entries
    data = bytearray(streamed_zip({"a.dcm": b"hello world" * 1000}))
    data[60] ^= 0xFF
    with pytest.raises(TruncatedZip):
        list(iter_entries(chunks(bytes(data))))
