"""Stream a zip of stored instances whose DEFLATE form is computed once and kept on disk.

The production server compresses on big machines; compressing a 150 MB CT
series on the fly takes this 2-core machine's local archive about 20 s, which
would make every benchmark measure the archive's CPU instead of the network.
Instances never change, so their raw DEFLATE streams (with CRC-32 and sizes)
are computed once (at generation, or at the first request) and spliced into
each zip. The zip's shape is the production one: entries streamed with data
descriptors (sizes after the data), then the central directory.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

LEVEL = 6
CHUNK = 256 * 1024
ZIP64_LIMIT = 0xFFFFFFFF


class DeflateStore:
    """`<dir>/<name>.deflate` (raw DEFLATE) and `<name>.json` ({"crc", "csize", "usize"})."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def get(self, name: str, source: Path) -> tuple[Path, dict]:
        meta_path = self.directory / f"{name}.json"
        data_path = self.directory / f"{name}.deflate"
        try:
            return data_path, json.loads(meta_path.read_text())
        except (OSError, ValueError):
            pass
        with self._lock:  # compress each file once, even under concurrent requests
            if not meta_path.exists():
                meta = deflate_file(source, data_path)
                tmp = meta_path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(meta))
                os.replace(tmp, meta_path)
        return data_path, json.loads(meta_path.read_text())


def deflate_file(source: Path, dest: Path) -> dict:
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
    crc, usize, csize = 0, 0, 0
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    with open(source, "rb") as src, open(tmp, "wb") as out:
        while block := src.read(CHUNK):
            crc, usize = zlib.crc32(block, crc), usize + len(block)
            data = compressor.compress(block)
            out.write(data)
            csize += len(data)
        data = compressor.flush()
        out.write(data)
        csize += len(data)
    os.replace(tmp, dest)
    return {"crc": crc, "csize": csize, "usize": usize}


def _dos_time(stamp: float) -> tuple[int, int]:
    t = time.localtime(stamp)
    return ((t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2),
            ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday)


class ZipStreamWriter:
    """Writes entries to `write` as they come: local header, data, data descriptor."""

    def __init__(self, write: Callable[[bytes], object]):
        self._write = write
        self._offset = 0
        self._central: list[bytes] = []
        self._time, self._date = _dos_time(time.time())

    def _emit(self, data: bytes) -> None:
        self._write(data)
        self._offset += len(data)

    def add_bytes(self, name: str, data: bytes) -> None:
        compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
        body = compressor.compress(data) + compressor.flush()
        self._entry(name, zlib.crc32(data), len(body), len(data), [body])

    def add_deflated(self, name: str, deflated: Path, meta: dict) -> None:
        def blocks():
            with open(deflated, "rb") as f:
                while block := f.read(CHUNK):
                    yield block
        self._entry(name, meta["crc"], meta["csize"], meta["usize"], blocks())

    def _entry(self, name: str, crc: int, csize: int, usize: int, blocks) -> None:
        if max(csize, usize, self._offset) >= ZIP64_LIMIT:
            raise ValueError("zip64 is not supported by this writer")
        encoded = name.encode("utf-8")
        offset = self._offset
        flags = 0x08  # sizes in a data descriptor, as a streaming server writes them
        self._emit(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, flags, 8, self._time, self._date,
                               0, 0, 0, len(encoded), 0) + encoded)
        for block in blocks:
            self._emit(block)
        self._emit(struct.pack("<4sIII", b"PK\x07\x08", crc, csize, usize))
        self._central.append(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, flags, 8,
                                         self._time, self._date, crc, csize, usize, len(encoded),
                                         0, 0, 0, 0, 0, offset) + encoded)

    def finish(self) -> None:
        start = self._offset
        for record in self._central:
            self._emit(record)
        size = self._offset - start
        self._emit(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(self._central),
                               len(self._central), size, start, 0))
