"""IDC's S3 mirror as a byte source (`--source`, `--idc-index`): a real SeaweedFS on loopback
whose anonymous identity may only read and list (as IDC's buckets), a fault proxy in front of
it, a series index written here in IDC's Parquet layout, and the local archive serving the
same series. Each test mounts for real and reads through the kernel."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import public_series, series_path

from nbiafs.archive.idcmirror import index_row, put_series, write_index
from nbiafs.archive.objectstore import LocalObjectStore
from nbiafs.archive.s3proxy import S3FaultProxy

pytestmark = pytest.mark.mount
BUCKET = "idc-open-data-local"
IMAGES = ("getSingleImage", "getImage", "getImageWithMD5Hash")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def flipped(data: bytes) -> bytes:
    """The same length, one byte of pixel data changed (the end of the file)."""
    return data[:-10] + bytes([data[-10] ^ 0x55]) + data[-9:]


class Mirror:
    """The store, the proxy, and which archive series plays which part."""

    def __init__(self, store, proxy, index, parts):
        self.store, self.proxy, self.index, self.parts = store, proxy, index, parts

    def env(self, **more) -> dict:
        # No credentials at all: the mount's requests must be unsigned to be let in.
        return {"AWS_ENDPOINT_URL_S3": self.proxy.endpoint, "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, **more}


@pytest.fixture(scope="module")
def mirror(nbia_archive_server, tmp_path_factory):
    base = tmp_path_factory.mktemp("idc")
    store = LocalObjectStore(base / "weed", bucket=BUCKET, anonymous_read=True).start()
    proxy = S3FaultProxy(store.endpoint).start()
    s3 = store.client()
    series = sorted((s for s in public_series(nbia_archive_server) if len(s.instances) >= 12), key=lambda s: s.uid)
    names = ["same", "revised", "tcia_only", "listing", "one_revised", "faults", "remount", "down", "slow"]
    parts = dict(zip(names, series))
    rows = []
    for name in ("same", "faults", "remount", "down", "slow"):
        rows.append(put_series(s3, BUCKET, parts[name]))
    # Revised on TCIA after IDC's copy: IDC holds (and its index describes) another version.
    first = parts["revised"].instances[0]
    rows.append(put_series(s3, BUCKET, parts["revised"], changed={first.sop_uid: first.path.read_bytes() + b"\0\0"}))
    # The listing disagrees with the index: an object is missing from the bucket.
    s = parts["listing"]
    row = put_series(s3, BUCKET, s, missing=frozenset({s.instances[-1].sop_uid}))
    rows.append(index_row(s, BUCKET, row["crdc_series_uuid"], len(s.instances), s.total_size))
    # One instance revised on TCIA with the same size: caught by its md5 alone.
    inst = parts["one_revised"].instances[3]
    rows.append(put_series(s3, BUCKET, parts["one_revised"], changed={inst.sop_uid: flipped(inst.path.read_bytes())}))
    index = write_index(rows, base / "idc_index.parquet")
    yield Mirror(store, proxy, index, parts)
    proxy.stop()
    store.stop()


@pytest.fixture
def fresh(mirror, nbia_archive):
    mirror.proxy.clear()
    yield mirror
    mirror.proxy.clear()


def idc_mount(mount_factory, archive, mirror, name="m", extra=(), env=None, cache_dir=None):
    return mount_factory(archive.url, name=name, cache_dir=cache_dir, env=mirror.env(**(env or {})),
                         extra=("--idc-index", str(mirror.index), *extra))


def idc_status(m) -> str:
    return next(x for x in (m.mountpoint / ".nbiafs" / "status").read_text().splitlines() if x.startswith("idc:"))


def copy(m, series) -> dict[str, str]:
    """`cp -r` of the series folder; md5 of each file copied."""
    dest = m.mountpoint.parent / f"copy-{uuid.uuid4().hex[:6]}"
    subprocess.run(["cp", "-r", str(m.path(series_path(series))), str(dest)], check=True, timeout=120)
    out = {p.name: md5(p.read_bytes()) for p in dest.iterdir()}
    shutil.rmtree(dest)
    return out


def truth(series) -> dict[str, str]:
    return {f"{i.sop_uid}.dcm": md5(i.path.read_bytes()) for i in series.instances}


def images_sent(archive, series) -> int:
    sent = archive.counters()["instances"]
    return sum(sent.get(i.sop_uid, 0) for i in series.instances)


def objects_of(mirror, series, requests) -> list:
    """The proxy's requests for this series' objects (its prefix, from the index)."""
    prefix = _prefix(mirror, series)
    return [r for r in requests if prefix in r[1] or prefix in r[2]]


def test_a_mirrored_series_comes_from_idc_with_exact_sizes_and_nothing_from_tcia(fresh, nbia_archive,
                                                                                   mount_factory):
    series = fresh.parts["same"]
    # Credentials that the store does not know: a signed request would be refused.
    m = idc_mount(mount_factory, nbia_archive, fresh, env={"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN",
                                                          "AWS_SECRET_ACCESS_KEY": "not-a-secret"})
    folder = m.path(series_path(series))
    names = sorted(os.listdir(folder))
    # Exact from the first stat: the listing started the route, the stat waited for it.
    assert {n: os.stat(folder / n).st_size for n in names} == {f"{i.sop_uid}.dcm": i.size for i in series.instances}
    assert copy(m, series) == truth(series)
    assert images_sent(nbia_archive, series) == 0
    assert not any(nbia_archive.counters()["endpoints"].get(e) for e in IMAGES)
    line = idc_status(m)
    assert f"{len(series.instances)} files" in line and "1 from IDC" in line, line
    first = folder / names[0]
    assert os.getxattr(first, "user.nbia.source") == b"idc"
    assert os.getxattr(first, "user.nbia.license") == b"CC BY 4.0"
    assert os.getxattr(folder, "user.nbia.license") == b"CC BY 4.0"
    # Requests were unsigned (no credentials anywhere) and the listing happened once.
    requests = objects_of(fresh, series, fresh.proxy.seen())
    assert sum(1 for r in requests if "list-type=2" in r[2]) == 1
    assert sum(1 for r in requests if r[3].startswith("bytes=0-")) == len(series.instances)


def test_a_series_revised_on_tcia_after_the_copy_comes_from_tcia(fresh, nbia_archive, mount_factory):
    series = fresh.parts["revised"]
    m = idc_mount(mount_factory, nbia_archive, fresh)
    assert copy(m, series) == truth(series)
    assert images_sent(nbia_archive, series) >= len(series.instances)
    line = idc_status(m)
    assert "1 sent to TCIA" in line and "revised on TCIA 1" in line, line
    # Its copy was listed (beside TCIA's answer), never read.
    assert not [r for r in objects_of(fresh, series, fresh.proxy.seen()) if r[1].endswith(".dcm") and not r[3]]
    first = m.path(series_path(series)) / f"{series.instances[0].sop_uid}.dcm"
    assert os.getxattr(first, "user.nbia.source") == b"tcia"


def test_a_series_only_on_tcia_comes_from_tcia_without_asking_s3(fresh, nbia_archive, mount_factory):
    series = fresh.parts["tcia_only"]
    m = idc_mount(mount_factory, nbia_archive, fresh)
    assert copy(m, series) == truth(series)
    assert images_sent(nbia_archive, series) >= len(series.instances)
    assert fresh.proxy.seen() == []
    assert "series: 0 from IDC, 0 sent to TCIA" in idc_status(m)


def test_a_listing_that_disagrees_with_the_index_sends_the_series_to_tcia(fresh, nbia_archive, mount_factory):
    series = fresh.parts["listing"]
    m = idc_mount(mount_factory, nbia_archive, fresh)
    assert copy(m, series) == truth(series)
    line = idc_status(m)
    assert "listing 1" in line and "0 files (0 B) from IDC" in line, line
    assert images_sent(nbia_archive, series) >= len(series.instances)


def test_one_instance_revised_on_tcia_comes_from_tcia_the_rest_from_idc(fresh, nbia_archive, mount_factory):
    series = fresh.parts["one_revised"]
    revised = series.instances[3]
    m = idc_mount(mount_factory, nbia_archive, fresh)
    assert copy(m, series) == truth(series)
    sent = nbia_archive.counters()["instances"]
    assert sent.get(revised.sop_uid) == 1
    assert sum(sent.get(i.sop_uid, 0) for i in series.instances) == 1
    line = idc_status(m)
    assert f"{len(series.instances) - 1} files" in line and "md5 differs 1" in line, line
    assert os.getxattr(m.path(series_path(series)) / f"{revised.sop_uid}.dcm", "user.nbia.source") == b"tcia"


@pytest.mark.parametrize("fault,kind", [("truncate", "mirror down"), ("flip", "bytes differ"),
                                        ("403", "refused"), ("404", "refused")])
def test_an_object_that_fails_comes_from_tcia_never_eio(fresh, nbia_archive, mount_factory, fault, kind):
    series = fresh.parts["faults"]
    m = idc_mount(mount_factory, nbia_archive, fresh, extra=("--no-prefetch",))
    folder = m.path(series_path(series))
    victim = series.instances[5]
    os.listdir(folder)  # the route is worked out with the store answering (a stat waits for it)
    assert os.stat(folder / f"{victim.sop_uid}.dcm").st_size == victim.size
    requests = objects_of(fresh, series, fresh.proxy.seen())
    key = next(r[1] for r in requests if r[3].startswith("bytes=0-") and _holds(fresh, r[1], victim))
    fresh.proxy.fault(key.rsplit("/", 1)[1], fault)
    for inst in series.instances[4:7]:
        assert md5((folder / f"{inst.sop_uid}.dcm").read_bytes()) == md5(inst.path.read_bytes())
    sent = nbia_archive.counters()["instances"]
    assert sent.get(victim.sop_uid) == 1
    if fault != "truncate":  # (a body cut short marks the mirror down: the next ones come from TCIA)
        assert not sent.get(series.instances[4].sop_uid) and not sent.get(series.instances[6].sop_uid)
    assert f"{kind} 1" in idc_status(m), idc_status(m)


def _holds(mirror, path: str, inst) -> bool:
    """Whether the object at `path` (/bucket/key) is instance `inst` (asked of the store)."""
    bucket, key = path.lstrip("/").split("/", 1)
    head = mirror.store.client().get_object(Bucket=bucket, Key=key, Range="bytes=0-8191")["Body"].read()
    return inst.sop_uid.encode() in head


def test_a_listing_refused_sends_the_series_to_tcia(fresh, nbia_archive, mount_factory):
    series = fresh.parts["listing"]  # any series of the index: the listing of its prefix is refused
    fresh.proxy.fault(_prefix(fresh, series), "403")
    m = idc_mount(mount_factory, nbia_archive, fresh)
    assert copy(m, series) == truth(series)
    line = idc_status(m)
    assert "refused 1" in line and "1 sent to TCIA" in line and line.startswith("idc:        up"), line


def _prefix(mirror, series) -> str:
    import pyarrow.parquet as pq
    rows = pq.read_table(str(mirror.index)).to_pylist()
    return next(r["crdc_series_uuid"] for r in rows if r["SeriesInstanceUID"] == series.uid)


def test_a_remount_lists_nothing_and_reads_no_headers(fresh, nbia_archive, mount_factory, tmp_path):
    series = fresh.parts["remount"]
    cache = tmp_path / "shared-cache-dir"
    m = idc_mount(mount_factory, nbia_archive, fresh, name="first", cache_dir=cache)
    folder = m.path(series_path(series))
    sizes = {n: os.stat(folder / n).st_size for n in os.listdir(folder)}
    assert len(objects_of(fresh, series, fresh.proxy.seen())) == 1 + len(series.instances)
    m.stop()
    fresh.proxy.clear()
    again = idc_mount(mount_factory, nbia_archive, fresh, name="second", cache_dir=cache)
    folder = again.path(series_path(series))
    assert {n: os.stat(folder / n).st_size for n in os.listdir(folder)} == sizes
    assert copy(again, series) == truth(series)
    requests = objects_of(fresh, series, fresh.proxy.seen())
    assert len(requests) == len(series.instances)
    assert all(r[2] == "" and r[3] == "" for r in requests), requests  # whole GETs only
    assert images_sent(nbia_archive, series) == 0


def test_cache_info_and_clear_show_the_reduced_index_and_leave_it_to_its_mount(fresh, nbia_archive, mount_factory,
                                                                             tmp_path):
    cache = tmp_path / "cache-dir"
    m = idc_mount(mount_factory, nbia_archive, fresh, cache_dir=cache)
    assert os.listdir(m.path(series_path(fresh.parts["remount"])))

    def cache_cli(action):
        return subprocess.run([sys.executable, "-m", "nbiafs", "cache", action, "--cache-dir", str(cache)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    info = cache_cli("info").stdout
    index_line = next(line for line in info.splitlines() if "idc/" in line)
    assert "IDC series index" in index_line and "?" not in info, info
    assert sum("(API v4)" in line for line in info.splitlines()) == 1, info  # the one scope

    held = cache_cli("clear")
    assert held.returncode == 1 and held.stderr.count("\n") == 1, held.stderr
    assert "IDC series index" in held.stderr and "in use by a running mount" in held.stderr
    assert "idc/" in cache_cli("info").stdout
    assert copy(m, fresh.parts["remount"]) == truth(fresh.parts["remount"])  # the mount goes on
    m.stop()

    done = cache_cli("clear")
    assert done.returncode == 0 and "1 reduced IDC series index" in done.stdout, done.stdout + done.stderr
    assert "no cache yet" in cache_cli("info").stdout


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB filesystem of its own (tmpfs), for a cache directory that fills up."""
    path = tmp_path / "small-disk"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Take the free space of `disk` but `leave` bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, os.path.getsize(filler) - leave))
    return filler


def test_a_full_cache_disk_is_eio_and_not_an_outage_of_the_mirror(fresh, nbia_archive, mount_factory, small_disk):
    series = fresh.parts["same"]
    big = max(series.instances, key=lambda i: i.size)
    m = idc_mount(mount_factory, nbia_archive, fresh, cache_dir=small_disk, extra=("--no-prefetch",))
    folder = m.path(series_path(series))
    assert f"{big.sop_uid}.dcm" in os.listdir(folder)  # the listing starts the route
    assert os.stat(folder / f"{big.sop_uid}.dcm").st_size == big.size  # and the stat waits for it
    filler = fill(small_disk, leave=big.size // 4)
    nbia_archive.reset_counters()
    with pytest.raises(OSError) as failed:
        (folder / f"{big.sop_uid}.dcm").read_bytes()
    assert failed.value.errno == errno.EIO
    assert idc_status(m).startswith("idc:        up"), idc_status(m)

    filler.unlink()
    assert (folder / f"{big.sop_uid}.dcm").read_bytes() == big.path.read_bytes()
    assert os.getxattr(folder / f"{big.sop_uid}.dcm", "user.nbia.source") == b"idc"
    assert images_sent(nbia_archive, series) == 0
    assert idc_status(m).startswith("idc:        up"), idc_status(m)


def test_an_unreachable_mirror_sends_everything_to_tcia(fresh, nbia_archive, mount_factory):
    series = fresh.parts["down"]
    fresh.proxy.down = True
    m = idc_mount(mount_factory, nbia_archive, fresh)
    assert copy(m, series) == truth(series)
    line = idc_status(m)
    assert line.startswith("idc:        down"), line
    assert images_sent(nbia_archive, series) >= len(series.instances)


@pytest.mark.slow
def test_a_silent_object_comes_from_tcia_after_the_read_timeout(fresh, nbia_archive, mount_factory):
    series = fresh.parts["slow"]
    m = idc_mount(mount_factory, nbia_archive, fresh, extra=("--no-prefetch",))
    folder = m.path(series_path(series))
    victim = series.instances[0]
    os.listdir(folder)
    assert os.stat(folder / f"{victim.sop_uid}.dcm").st_size == victim.size
    requests = objects_of(fresh, series, fresh.proxy.seen())
    key = next(r[1] for r in requests if r[3].startswith("bytes=0-") and _holds(fresh, r[1], victim))
    fresh.proxy.fault(key.rsplit("/", 1)[1], "stall")
    assert md5((folder / f"{victim.sop_uid}.dcm").read_bytes()) == md5(victim.path.read_bytes())
    assert nbia_archive.counters()["instances"].get(victim.sop_uid) == 1
    assert "mirror down 1" in idc_status(m)


def test_source_tcia_never_asks_s3(fresh, nbia_archive, mount_factory):
    series = fresh.parts["same"]
    m = mount_factory(nbia_archive.url, env=fresh.env(), extra=("--source", "tcia"))
    assert copy(m, series) == truth(series)
    assert fresh.proxy.seen() == []
    assert not any(x.startswith("idc:") for x in (m.mountpoint / ".nbiafs" / "status").read_text().splitlines())


def _mount_cli(tmp_path, archive, *args, env=None) -> subprocess.CompletedProcess:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "nbiafs", "mount", "--url", archive.url, "--cache-dir",
                           str(tmp_path / "cache"), *args, str(mnt)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,message", [
    (("--idc-index", "/nonexistent/idc_index.parquet"),
     r"IDC series index /nonexistent/idc_index.parquet: no such file"),
    (("--source", "tcia", "--idc-index", "x.parquet"), r"--idc-index has no use with --source tcia"),
    (("--source", "s3"), r"invalid choice: 's3'"),
])
def test_bad_mirror_options_are_one_line(tmp_path, nbia_archive, args, message):
    done = _mount_cli(tmp_path, nbia_archive, *args)
    assert done.returncode != 0
    assert re.search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_an_index_that_is_not_idcs_is_one_line(tmp_path, nbia_archive):
    bogus = tmp_path / "idc_index.parquet"
    bogus.write_text("SeriesInstanceUID,crdc_series_uuid\n")
    done = _mount_cli(tmp_path, nbia_archive, "--idc-index", str(bogus))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("is not a Parquet file (ArrowInvalid)"), done.stderr
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"SeriesInstanceUID": ["1.2.3"]}), str(bogus))
    done = _mount_cli(tmp_path, nbia_archive, "--idc-index", str(bogus))
    assert done.returncode != 0 and "lacks the columns crdc_series_uuid, aws_bucket" in done.stderr, done.stderr


def test_the_demo_runs_with_a_copy_of_idcs_mirror(nbia_archive_data, tmp_path):
    from conftest import start_demo
    mnt = tmp_path / "demo"
    proc = start_demo(mnt, nbia_archive_data, "--idc", "--names", "uid", stdout=subprocess.PIPE)
    try:
        series_folders = sorted(p for p in mnt.glob("*/*/*/*") if p.is_dir())
        sources = {}
        for folder in series_folders:
            first = sorted(folder.glob("*.dcm"))[0]
            assert first.read_bytes()[128:132] == b"DICM"
            sources[folder.name] = os.getxattr(first, "user.nbia.source")
        # Every series but the one left out of the copy came from it.
        assert sorted(sources.values()).count(b"idc") == len(series_folders) - 1, sources
        assert list(sources.values()).count(b"tcia") == 1, sources
        status = (mnt / ".nbiafs" / "status").read_text()
        assert f"series: {len(series_folders) - 1} from IDC" in status, status
    finally:
        proc.send_signal(2)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "IDC's mirror (a local copy) is at http://127.0.0.1:" in out
    assert not subprocess.run(["pgrep", "-f", "weed server.*nbiafs-demo-idc-"], capture_output=True).stdout
