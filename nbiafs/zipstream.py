"""Read a zip as it streams in: each entry is handed over as soon as it is complete.

The archive's getImage zip is streamed without a length and its entries carry
their sizes in data descriptors (after the data), so `zipfile`, which needs the
central directory at the end, cannot read it before the last byte. This reader
walks the local headers instead, inflates each entry into a temporary file,
checks its CRC-32 and size against the descriptor, and yields it. A stream that
ends early (a zip cut short) raises `TruncatedZip` after the complete entries
have been yielded, so the caller keeps what arrived and fetches the rest.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
import zlib
from typing import BinaryIO, Iterator

LOCAL_HEADER = b"PK\x03\x04"
DATA_DESCRIPTOR = b"PK\x07\x08"
CENTRAL_HEADER = b"PK\x01\x02"
END_OF_CENTRAL = b"PK\x05\x06"
ZIP64_END = b"PK\x06\x06"
CHUNK = 256 * 1024


class TruncatedZip(Exception):
    """The stream ended, or stopped making sense, before the central directory."""


class _Reader:
    """Exact reads over an iterator of byte chunks, with push-back."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buf = bytearray()

    def _fill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._buf += chunk
                return True
        return False

    def read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise TruncatedZip(f"stream ended {n - len(self._buf)} bytes short")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def read_some(self) -> bytes:
        if not self._buf and not self._fill():
            return b""
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def push_back(self, data: bytes) -> None:
        self._buf[:0] = data


def iter_entries(chunks: Iterator[bytes], new_file=tempfile.TemporaryFile,
                 md5s: dict[str, str] | None = None) -> Iterator[tuple[str, BinaryIO]]:
    """Yield (name, file positioned at 0) for each complete, CRC-checked entry.

    Each entry is written into `new_file()` (a context manager giving a binary file);
    the caller owns it only during the iteration step. Raises TruncatedZip if the
    stream ends before the central directory. With `md5s`, the md5 of each entry's content,
    computed as it is inflated, is put there by name before the entry is yielded.
    """
    reader = _Reader(iter(chunks))
    while True:
        signature = reader.read_exact(4)
        if signature in (CENTRAL_HEADER, END_OF_CENTRAL, ZIP64_END):
            return
        if signature != LOCAL_HEADER:
            raise TruncatedZip(f"unexpected bytes {signature!r} where an entry should start")
        (_version, flags, method, _time, _date, crc, csize, usize, name_len,
         extra_len) = struct.unpack("<HHHHHIIIHH", reader.read_exact(26))
        name = reader.read_exact(name_len).decode("utf-8" if flags & 0x800 else "cp437")
        extra = reader.read_exact(extra_len)
        zip64 = any(v == 0xFFFFFFFF for v in (csize, usize)) or _has_zip64(extra)
        with new_file() as out:
            digest = hashlib.md5() if md5s is not None else None
            actual_crc, actual_size = _copy_data(reader, out, method, flags, csize, digest)
            if flags & 0x08:
                crc, usize = _read_descriptor(reader, zip64)
            if actual_crc != crc or (usize != 0xFFFFFFFF and actual_size != usize):
                raise TruncatedZip(f"entry {name}: CRC or size mismatch")
            if md5s is not None and digest is not None:
                md5s[name] = digest.hexdigest()
            out.seek(0)
            yield name, out


def _has_zip64(extra: bytes) -> bool:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack("<HH", extra[pos:pos + 4])
        if tag == 0x0001:
            return True
        pos += 4 + size
    return False


def _copy_data(reader: _Reader, out: BinaryIO, method: int, flags: int, csize: int,
               digest=None) -> tuple[int, int]:
    crc, size = 0, 0
    if method == 8:  # deflate: the stream itself says where it ends
        inflater = zlib.decompressobj(-15)
        while not inflater.eof:
            data = reader.read_some()
            if not data:
                raise TruncatedZip("stream ended inside an entry")
            try:
                plain = inflater.decompress(data)
            except zlib.error as exc:
                raise TruncatedZip(f"corrupt deflate data ({exc})") from None
            out.write(plain)
            if digest is not None:
                digest.update(plain)
            crc, size = zlib.crc32(plain, crc), size + len(plain)
            if inflater.eof:
                reader.push_back(inflater.unused_data)
        return crc, size
    if method == 0 and not flags & 0x08:
        remaining = csize
        while remaining:
            data = reader.read_exact(min(CHUNK, remaining))
            out.write(data)
            if digest is not None:
                digest.update(data)
            crc, size, remaining = zlib.crc32(data, crc), size + len(data), remaining - len(data)
        return crc, size
    raise TruncatedZip(f"unsupported zip entry (method {method}, flags {flags:#x})")


def _read_descriptor(reader: _Reader, zip64: bool) -> tuple[int, int]:
    head = reader.read_exact(4)
    if head == DATA_DESCRIPTOR:
        head = reader.read_exact(4)
    crc = struct.unpack("<I", head)[0]
    if zip64:
        _csize, usize = struct.unpack("<QQ", reader.read_exact(16))
    else:
        _csize, usize = struct.unpack("<II", reader.read_exact(8))
    return crc, usize
