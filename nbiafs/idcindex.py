"""IDC's series index, reduced once to what routing needs, and looked up by SeriesInstanceUID.

IDC publishes one row per series of its mirror in `idc_index.parquet` (PyPI `idc-index-data`:
1,044,191 rows, 74 MB, in release v25). A mount needs six of its ~30 columns, for one series
at a time; holding the table in memory would cost hundreds of MB. So, at first use, the
Parquet file is reduced (in a child process: pyarrow never enters the mount's memory) to an
SQLite file beside the caches, keyed by SeriesInstanceUID, with the bucket and licence names
in small tables of their own and the series' UUID as 16 bytes. A lookup is one B-tree search.

Only the current index is read: `prior_versions_index.parquet` names superseded versions,
and a current series is never routed to one of them.

A reduced file is named by the source file's path, size and mtime, so a new release of
`idc-index-data` is reduced again; it is written to a temporary name and renamed, so a
reduction cut short leaves nothing a mount would read.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

INDEX_DIR = "idc"  # the cache directory's folder of reduced indexes, beside the scopes

# The columns read from idc_index.parquet (see shared/idc-mirror.md).
COLUMNS = ("SeriesInstanceUID", "crdc_series_uuid", "aws_bucket", "instanceCount", "series_size_MB",
           "license_short_name")
BATCH_ROWS = 65_536       # rows converted to Python at a time while reducing (bounded memory)
REDUCE_TIMEOUT_S = 900.0  # a reduction of the full index takes ~10 s; this only catches a hang
FORMAT = "1"              # of the reduced file; a change reduces again


class IndexUnusable(Exception):
    """The series index cannot be used (missing, not IDC's Parquet, columns missing): one line."""


@dataclass(frozen=True)
class MirroredSeries:
    """One series as IDC's index describes it."""
    series_uid: str
    series_uuid: str      # crdc_series_uuid: the object prefix, one immutable version
    bucket: str
    instances: int        # instanceCount
    size_bytes: int       # series_size_MB * 1e6: the exact bytes
    license: str | None

    @property
    def prefix(self) -> str:
        return f"{self.series_uuid}/"


def default_index() -> Path | None:
    """The `idc_index.parquet` of the installed `idc-index-data`, or None if it is not installed
    (found without importing it: its module looks itself up through importlib.metadata)."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        files = distribution("idc-index-data").files or []
    except PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/").endswith("idc_index_data/idc_index.parquet"):
            path = Path(str(f.locate()))
            return path if path.is_file() else None
    return None


def reduced_path(source: Path, directory: Path) -> Path:
    """Where the reduction of `source` is kept (named by its path, size and mtime)."""
    st = source.stat()
    key = f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|{FORMAT}"
    return directory / f"idc-index-{hashlib.sha256(key.encode()).hexdigest()[:16]}.sqlite"


def ensure_reduced(source: Path, directory: Path) -> Path:
    """The reduced form of `source`, made now (in a child process) if it is not there yet."""
    try:
        dest = reduced_path(source, directory)
    except OSError as exc:
        raise IndexUnusable(f"IDC series index {source}: {exc.strerror}") from None
    if dest.is_file():
        return dest
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        done = subprocess.run([sys.executable, "-m", "nbiafs.idcindex", str(source), str(dest)],
                              capture_output=True, text=True, timeout=REDUCE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise IndexUnusable(f"IDC series index {source}: reducing it took more than {REDUCE_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        lines = (done.stderr or "").strip().splitlines()
        raise IndexUnusable(lines[-1] if lines else f"IDC series index {source}: reduction failed")
    return dest


def reduce(source: Path, dest: Path) -> int:
    """Reduce the Parquet index at `source` into the SQLite file `dest`; the rows kept."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise IndexUnusable("reading IDC's series index needs pyarrow: pip install 'nbiafs[idc]'") from None
    try:
        parquet = pq.ParquetFile(str(source))
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a missing or foreign file
        raise IndexUnusable(f"IDC series index {source} is not a Parquet file ({type(exc).__name__})") from None
    missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
    if missing:
        raise IndexUnusable(f"IDC series index {source} lacks the columns {', '.join(missing)}")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(str(tmp))
    kept = 0
    try:
        db.executescript("""
            PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
            CREATE TABLE about (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE buckets (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
            CREATE TABLE licenses (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
            CREATE TABLE series (uid TEXT PRIMARY KEY, uuid BLOB NOT NULL, bucket INTEGER NOT NULL,
                                 instances INTEGER NOT NULL, bytes INTEGER NOT NULL, license INTEGER)
                                 WITHOUT ROWID;
        """)
        names: dict[tuple[str, str], int] = {}

        def code(table: str, name: str) -> int:
            got = names.get((table, name))
            if got is None:
                got = names[(table, name)] = len([k for k in names if k[0] == table]) + 1
                db.execute(f"INSERT INTO {table} (id, name) VALUES (?, ?)", (got, name))
            return got

        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(COLUMNS)):
            rows = []
            for uid, uuid_text, bucket, count, size_mb, license_name in zip(
                    *(batch.column(c).to_pylist() for c in COLUMNS)):
                row = _row(uid, uuid_text, bucket, count, size_mb)
                if row is None:
                    continue
                rows.append((row[0], row[1], code("buckets", bucket), row[2], row[3],
                             code("licenses", license_name) if license_name else None))
            db.executemany("INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?, ?, ?)", rows)
            kept += len(rows)
        db.executemany("INSERT INTO about VALUES (?, ?)",
                       [("source", str(source)), ("rows", str(kept)), ("format", FORMAT)])
        db.commit()
    finally:
        db.close()
    os.chmod(tmp, 0o600)
    os.replace(tmp, dest)
    return kept


def _row(uid, uuid_text, bucket, count, size_mb) -> tuple[str, bytes, int, int] | None:
    """(uid, uuid bytes, instances, exact bytes) of one index row, None for a row that cannot be
    routed (no bucket, not a UUID, no count, a size that is not a whole number of bytes)."""
    if not uid or not bucket or count is None or size_mb is None:
        return None
    try:
        series_uuid = uuid.UUID(str(uuid_text))
    except ValueError:
        return None
    exact = round(size_mb * 1e6)
    if abs(size_mb * 1e6 - exact) > 0.01 or exact <= 0 or count <= 0:
        return None
    return str(uid), series_uuid.bytes, int(count), int(exact)


class SeriesIndex:
    """Lookups in a reduced index (read-only; one connection, shared under a lock: a lookup
    is microseconds)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            # Held (shared) while in use: `nbiafs cache clear` leaves an index in use alone.
            self._hold = hold_index(path)
        except OSError as exc:
            raise IndexUnusable(f"reduced IDC series index {path}: {exc.strerror}") from None
        try:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            self._buckets = dict(self._db.execute("SELECT id, name FROM buckets"))
            self._licenses = dict(self._db.execute("SELECT id, name FROM licenses"))
            self.rows = int(dict(self._db.execute("SELECT key, value FROM about")).get("rows", "0"))
        except sqlite3.Error as exc:
            os.close(self._hold)
            raise IndexUnusable(f"reduced IDC series index {path} is unreadable ({exc}); delete it to reduce "
                              "the index again") from None
        self._lock = threading.Lock()  # guards _db

    def lookup(self, series_uid: str) -> MirroredSeries | None:
        with self._lock:
            row = self._db.execute("SELECT uuid, bucket, instances, bytes, license FROM series WHERE uid = ?",
                                   (series_uid,)).fetchone()
        if row is None:
            return None
        raw, bucket, instances, size_bytes, license_id = row
        return MirroredSeries(series_uid, str(uuid.UUID(bytes=bytes(raw))), self._buckets[bucket], instances,
                              size_bytes, self._licenses.get(license_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._hold)


def hold_index(path: Path) -> int:
    """A shared lock on a reduced index for as long as a mount uses it; the fd to close."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def index_in_use(path: Path) -> bool:
    """Whether a running mount holds the reduced index at `path` (see `hold_index`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def main(argv: list[str]) -> int:
    """`python -m nbiafs.idcindex SOURCE.parquet DEST.sqlite` (what `ensure_reduced` runs)."""
    if len(argv) != 2:
        print("usage: python -m nbiafs.idcindex SOURCE.parquet DEST.sqlite", file=sys.stderr)
        return 2
    try:
        kept = reduce(Path(argv[0]), Path(argv[1]))
    except IndexUnusable as exc:
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"reducing IDC's series index: {exc}", file=sys.stderr)
        return 1
    print(kept)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
