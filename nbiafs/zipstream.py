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

import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import struct
import tempfile
import types
import zlib
from typing import BinaryIO, Iterator

_deflate: types.ModuleType
try:  # ISA-L: the same inflate and CRC-32 as zlib's, in about half and a third of the time
    from isal import isal_zlib as _deflate
except ImportError:  # a platform without its wheels
    _deflate = zlib

LOCAL_HEADER = b"PK\x03\x04"
DATA_DESCRIPTOR = b"PK\x07\x08"
CENTRAL_HEADER = b"PK\x01\x02"
END_OF_CENTRAL = b"PK\x05\x06"
ZIP64_END = b"PK\x06\x06"
CHUNK = 256 * 1024
PLAIN_PIECE = 1024 * 1024  # inflated bytes handed to the writer at once, at most
WRITER_BACKLOG = 16        # pieces waiting for the writer, at most


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

    Two threads share the work: this one reads and inflates, a writer (`_Writer`) writes,
    hashes and CRCs what was inflated, in order. Inflating, hashing and writing all let go of
    the GIL, so on two cores the halves overlap; an entry is yielded once the next one has been
    inflated (or the stream has ended) and its own writing is done.
    """
    reader = _Reader(iter(chunks))
    with _Writer(want_md5=md5s is not None) as writer:
        pending: _Inflated | None = None   # inflated, not yet yielded
        lookahead: _Inflated | None = None
        try:
            while True:
                failure: BaseException | None = None
                try:
                    lookahead = _inflate_next(reader, new_file, writer)
                except Exception as exc:  # the entries before it were complete: theirs first
                    failure = exc
                if pending is not None:
                    entry, pending = pending, None
                    yield from _hand_over(entry, md5s)
                if failure is not None:
                    raise failure
                if lookahead is None:
                    return
                pending, lookahead = lookahead, None
        finally:
            for left in (pending, lookahead):
                if left is not None:  # the caller stopped, or an error: nobody takes these
                    left.abandon()


class _Abandoned(Exception):
    """Thrown into an entry's file context when the entry is dropped unread."""


class _Job:
    """One entry's bytes on their way through the writer: its CRC, size and md5 so far."""

    def __init__(self, out: BinaryIO, want_md5: bool):
        self.out = out
        self.digest = hashlib.md5() if want_md5 else None
        self.crc = 0
        self.size = 0
        self.futures: list[concurrent.futures.Future] = []

    def absorb(self, data: bytes) -> None:  # in the writer's thread, jobs in order
        self.out.write(data)
        if self.digest is not None:
            self.digest.update(data)
        self.crc = _deflate.crc32(data, self.crc)
        self.size += len(data)

    def wait(self) -> None:
        """Until everything handed over is written; raises the first write error."""
        for future in self.futures:
            future.result()

    def settle(self) -> None:
        """Until the writer is done with this job, whatever happened to it."""
        concurrent.futures.wait(self.futures)


class _Writer:
    """The thread that writes, hashes and CRCs inflated bytes, in the order handed over; at
    most WRITER_BACKLOG pieces wait for it (each PLAIN_PIECE at most)."""

    def __init__(self, want_md5: bool):
        self.want_md5 = want_md5
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nbia-unzip")
        self._backlog: collections.deque = collections.deque()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)

    def put(self, job: _Job, data: bytes) -> None:
        while len(self._backlog) >= WRITER_BACKLOG:
            concurrent.futures.wait([self._backlog.popleft()])
        future = self._pool.submit(job.absorb, data)
        job.futures.append(future)
        self._backlog.append(future)


class _Inflated:
    """An entry read to its end: its file (in its context), its writer job, what the zip says."""

    def __init__(self, name: str, stack: contextlib.ExitStack, job: _Job, crc: int, usize: int):
        self.name, self.stack, self.job, self.crc, self.usize = name, stack, job, crc, usize

    def abandon(self) -> None:
        self.job.settle()
        self.stack.__exit__(_Abandoned, _Abandoned(self.name), None)


def _inflate_next(reader: _Reader, new_file, writer: _Writer) -> _Inflated | None:
    """Read the next entry, its bytes handed to the writer; None at the central directory."""
    signature = reader.read_exact(4)
    if signature in (CENTRAL_HEADER, END_OF_CENTRAL, ZIP64_END):
        return None
    if signature != LOCAL_HEADER:
        raise TruncatedZip(f"unexpected bytes {signature!r} where an entry should start")
    (_version, flags, method, _time, _date, crc, csize, usize, name_len,
     extra_len) = struct.unpack("<HHHHHIIIHH", reader.read_exact(26))
    name = reader.read_exact(name_len).decode("utf-8" if flags & 0x800 else "cp437")
    extra = reader.read_exact(extra_len)
    zip64 = any(v == 0xFFFFFFFF for v in (csize, usize)) or _has_zip64(extra)
    stack = contextlib.ExitStack()
    job = None
    try:
        job = _Job(stack.enter_context(new_file()), writer.want_md5)
        _copy_data(reader, functools.partial(writer.put, job), method, flags, csize)
        if flags & 0x08:
            crc, usize = _read_descriptor(reader, zip64)
    except BaseException as exc:
        if job is not None:
            job.settle()
        stack.__exit__(type(exc), exc, exc.__traceback__)  # the file's context drops it
        raise
    return _Inflated(name, stack, job, crc, usize)


def _hand_over(entry: _Inflated, md5s: dict[str, str] | None) -> Iterator[tuple[str, BinaryIO]]:
    """Yield the entry once the writer is done with it and its CRC and size are right."""
    with entry.stack:
        entry.job.wait()
        job = entry.job
        if job.crc != entry.crc or (entry.usize != 0xFFFFFFFF and job.size != entry.usize):
            raise TruncatedZip(f"entry {entry.name}: CRC or size mismatch")
        if md5s is not None and job.digest is not None:
            md5s[entry.name] = job.digest.hexdigest()
        job.out.seek(0)
        yield entry.name, job.out


def _has_zip64(extra: bytes) -> bool:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack("<HH", extra[pos:pos + 4])
        if tag == 0x0001:
            return True
        pos += 4 + size
    return False


def _copy_data(reader: _Reader, emit, method: int, flags: int, csize: int) -> None:
    """Pass an entry's content to `emit`, in pieces of PLAIN_PIECE at most."""
    if method == 8:  # deflate: the stream itself says where it ends
        inflater = _deflate.decompressobj(-15)
        while not inflater.eof:
            data = inflater.unconsumed_tail or reader.read_some()
            if not data:
                raise TruncatedZip("stream ended inside an entry")
            try:
                plain = inflater.decompress(data, PLAIN_PIECE)
            except _deflate.error as exc:
                raise TruncatedZip(f"corrupt deflate data ({exc})") from None
            if plain:
                emit(plain)
        reader.push_back(inflater.unused_data)
        return
    if method == 0 and not flags & 0x08:
        remaining = csize
        while remaining:
            data = reader.read_exact(min(CHUNK, remaining))
            emit(data)
            remaining -= len(data)
        return
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
