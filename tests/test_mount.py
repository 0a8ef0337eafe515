"""The mounted filesystem, through the kernel, with real tools, against the local archive."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import threading
import time

import pydicom
import pytest
from conftest import need, public_series, series_path

pytestmark = pytest.mark.mount


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def big_series(archive):
    return max(public_series(archive), key=lambda s: len(s.instances))


def archive_md5(series) -> dict[str, str]:
    return {f"{i.sop_uid}.dcm": i.md5 for i in series.instances}


# --------------------------------------------------------------------------- listings
def test_tree_matches_the_archive(mounted, nbia_archive_server):
    archive = nbia_archive_server
    assert sorted(os.listdir(mounted.mountpoint)) == ["Phantom-Body-MR", "Phantom-Thorax-CT"]
    for series in public_series(archive):
        names = sorted(os.listdir(mounted.path(series_path(series))))
        assert names == sorted(f"{i.sop_uid}.dcm" for i in series.instances)
    thorax = sorted(os.listdir(mounted.path("Phantom-Thorax-CT")))
    assert "NOSTUDY-001" in thorax and any(" " in p and p.islower() for p in thorax)
    assert os.listdir(mounted.path("Phantom-Thorax-CT", "NOSTUDY-001")) == []


def test_ls_find_stat_need_no_download(mounted, nbia_archive_server):
    nbia_archive_server.reset_counters()
    ls = run("ls", "-lR", str(mounted.mountpoint))
    assert ls.returncode == 0 and ls.stderr == ""
    found = run("find", str(mounted.mountpoint), "-name", "*.dcm")
    assert found.stdout.count(".dcm\n") == sum(len(s.instances) for s in public_series(nbia_archive_server))
    series = big_series(nbia_archive_server)
    st = run("stat", "-c", "%s %F %a", str(mounted.path(series_path(series), f"{series.instances[0].sop_uid}.dcm")))
    assert st.stdout.split(" ", 1)[1].strip() == "regular file 444"
    counts = nbia_archive_server.counters()["endpoints"]
    assert not {"getSingleImage", "getImage"} & set(counts)


def test_du_equals_series_size_before_and_after_reading(mounted, nbia_archive_server):
    series = big_series(nbia_archive_server)
    folder = str(mounted.path(series_path(series)))
    before = int(run("du", "-sb", folder).stdout.split()[0])
    assert before == series.total_size
    files = sorted(os.listdir(folder))
    for name in files[: len(files) // 2]:  # half fetched, half estimated
        subprocess.run(["cat", os.path.join(folder, name)], capture_output=True, check=True)
    assert int(run("du", "-sb", folder).stdout.split()[0]) == series.total_size
    for name in files:
        subprocess.run(["cat", os.path.join(folder, name)], capture_output=True, check=True)
    assert int(run("du", "-sb", folder).stdout.split()[0]) == series.total_size


# --------------------------------------------------------------------------- contents
def test_cat_md5sum_cp_tar_match_the_archive(mounted, nbia_archive_server, tmp_path):
    series = public_series(nbia_archive_server)[-1]
    folder = mounted.path(series_path(series))
    sums = run("md5sum", *sorted(str(p) for p in folder.iterdir()))
    got = {os.path.basename(line.split("  ", 1)[1]): line.split()[0] for line in sums.stdout.splitlines()}
    assert got == archive_md5(series)
    inst = series.instances[0]
    assert subprocess.run(["cat", str(folder / f"{inst.sop_uid}.dcm")], capture_output=True).stdout \
        == inst.path.read_bytes()
    assert run("cp", "-r", str(folder), str(tmp_path / "copy")).returncode == 0
    copied = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in (tmp_path / "copy").iterdir()}
    assert copied == archive_md5(series)
    assert run("tar", "-cf", str(tmp_path / "s.tar"), "-C", str(folder.parent), folder.name).returncode == 0
    with tarfile.open(tmp_path / "s.tar") as tar:
        members = {os.path.basename(m.name): hashlib.md5(tar.extractfile(m).read()).hexdigest()
                   for m in tar.getmembers() if m.isfile()}
    assert members == archive_md5(series)


def test_getfattr_shows_the_archive_record(mounted, nbia_archive_server):
    series = big_series(nbia_archive_server)
    out = run(need("getfattr"), "-d", str(mounted.path(series_path(series))))
    assert out.returncode == 0, out.stderr
    assert f'user.nbia.SeriesInstanceUID="{series.uid}"' in out.stdout
    assert f'user.nbia.Modality="{series.raw["Modality"]}"' in out.stdout
    assert f'user.nbia.ImageCount="{len(series.instances)}"' in out.stdout
    assert f'user.nbia.TotalSizeInBytes="{series.total_size}"' in out.stdout
    patient = run("getfattr", "-n", "user.nbia.PatientId", "--only-values",
                  str(mounted.path("Phantom-Thorax-CT", "PTC-001")))
    assert patient.stdout == "PTC-001"
    missing = run("getfattr", "-n", "user.nbia.NoSuchKey", str(mounted.mountpoint / "Phantom-Thorax-CT"))
    assert missing.returncode != 0 and "No such attribute" in missing.stderr


def test_pydicom_dcmdump_and_simpleitk_read_a_series(mounted, nbia_archive_server):
    series = big_series(nbia_archive_server)
    folder = mounted.path(series_path(series))
    for inst in series.instances:
        ds = pydicom.dcmread(folder / f"{inst.sop_uid}.dcm")
        local = pydicom.dcmread(inst.path)
        assert ds.SOPInstanceUID == inst.sop_uid and (ds.pixel_array == local.pixel_array).all()
    dump = run(need("dcmdump"), "-q", *(str(folder / f"{i.sop_uid}.dcm") for i in series.instances))
    assert dump.returncode == 0 and dump.stdout.count("(7fe0,0010)") == len(series.instances)
    import SimpleITK as sitk
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    assert len(names) == len(series.instances)
    reader.SetFileNames(names)
    image = reader.Execute()
    local = pydicom.dcmread(series.instances[0].path)
    assert image.GetSize() == (local.Columns, local.Rows, len(series.instances))


def test_dcm2niix_on_the_mount_equals_a_local_copy(mounted, nbia_archive_server, tmp_path):
    dcm2niix = need("dcm2niix")
    series = [s for s in public_series(nbia_archive_server) if len(s.instances) > 2][1]
    local = tmp_path / "local"
    local.mkdir()
    for inst in series.instances:
        (local / f"{inst.sop_uid}.dcm").write_bytes(inst.path.read_bytes())
    outputs = {}
    for name, folder in (("mount", mounted.path(series_path(series))), ("local", local)):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        res = run(dcm2niix, "-z", "n", "-f", "vol", "-o", str(out), str(folder))
        assert res.returncode == 0, res.stdout + res.stderr
        outputs[name] = {p.name: hashlib.md5(p.read_bytes()).hexdigest()
                         for p in out.iterdir() if p.suffix == ".nii"}
    assert outputs["mount"] and outputs["mount"] == outputs["local"]


# --------------------------------------------------------------------------- sizes under race
def test_size_race_over_never_fetched_instances(mount_factory, nbia_archive_server, tmp_path):
    """Each never-fetched instance is read first by one tool; none may see a wrong size or byte."""
    m = mount_factory(nbia_archive_server.url, name="race")
    instances = [(s, i) for s in public_series(nbia_archive_server) for i in s.instances]
    assert len(instances) >= 100
    dcmdump, dcm2niix = need("dcmdump"), need("dcm2niix")
    mismatches = []
    for n, (series, inst) in enumerate(instances):
        path = str(m.path(series_path(series), f"{inst.sop_uid}.dcm"))
        truth = inst.path.read_bytes()
        reader = ("cat", "pydicom", "dcmdump", "dcm2niix", "seek_end")[n % 5]
        if reader == "cat":
            ok = subprocess.run(["cat", path], capture_output=True).stdout == truth
        elif reader == "pydicom":
            ds = pydicom.dcmread(path)
            ok = ds.SOPInstanceUID == inst.sop_uid and (0, 0) not in ds and \
                ds.PixelData == pydicom.dcmread(inst.path).PixelData
        elif reader == "dcmdump":
            res = run(dcmdump, "-q", "+E", path)
            ok = res.returncode == 0 and "(7fe0,0010)" in res.stdout and "E:" not in res.stderr
        elif reader == "dcm2niix":
            out = tmp_path / f"n{n}"
            out.mkdir()
            res = run(dcm2niix, "-s", "y", "-z", "n", "-o", str(out), path)
            ok = res.returncode == 0 and "Error" not in res.stdout + res.stderr
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                ok = os.lseek(fd, 0, os.SEEK_END) == len(truth)
            finally:
                os.close(fd)
        size_ok = os.stat(path).st_size == len(truth)
        with open(path, "rb") as f:
            bytes_ok = f.read() == truth
        if not (ok and size_ok and bytes_ok):
            mismatches.append((reader, n, ok, size_ok, bytes_ok, len(truth), os.stat(path).st_size))
    assert mismatches == []


def test_an_exact_size_learnt_while_the_kernel_is_told_the_estimate(nbia_archive_server, tmp_path):
    """The prefetch stores an instance while a lookup of it is answering with its estimate: the
    invalidation reaches a kernel that does not know the path yet (ENOENT), and the estimate
    arrives after it. An open must still see the exact size and every byte; a stat, a moment
    later. (tests/kernel_race_driver.py makes the race certain; the rest is the real daemon.)"""
    def truncating(series):  # an instance whose estimate is smaller than the file
        base = sum(i.path.stat().st_size for i in series.instances) // len(series.instances)
        return next(i for i in series.instances if i.path.stat().st_size >= base + 2)
    opened_series, stated_series = [s for s in public_series(nbia_archive_server) if len(s.instances) > 2][:2]
    opened, stated = truncating(opened_series), truncating(stated_series)
    rel = {"opened": f"/{series_path(opened_series)}/{opened.sop_uid}.dcm",
           "stated": f"/{series_path(stated_series)}/{stated.sop_uid}.dcm"}
    truth = {"opened": opened.path.read_bytes(), "stated": stated.path.read_bytes()}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    exact = {rel[k]: len(truth[k]) for k in rel}
    driver = os.path.join(os.path.dirname(__file__), "kernel_race_driver.py")
    with open(tmp_path / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, driver, json.dumps(exact), str(mnt), "--foreground",
                                 "--url", nbia_archive_server.url, "--cache-dir", str(tmp_path / "cache"),
                                 "--no-prefetch", "--log-level", "INFO"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.05)
        told = {k: os.stat(f"{mnt}{rel[k]}").st_size for k in rel}  # the raced lookups
        assert all(told[k] < len(truth[k]) for k in rel), told  # the kernel was told the estimate
        with open(f"{mnt}{rel['opened']}", "rb") as f:
            assert os.fstat(f.fileno()).st_size == len(truth["opened"])
            assert f.read() == truth["opened"]
        deadline = time.monotonic() + 10
        while os.stat(f"{mnt}{rel['stated']}").st_size != len(truth["stated"]):
            assert time.monotonic() < deadline, "the kernel kept the estimate"
            time.sleep(0.05)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proc.wait(timeout=30)
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("action", ["touch", "mkdir", "rm", "write", "mv", "chmod"])
def test_writes_are_erofs(mounted, nbia_archive_server, action):
    series = big_series(nbia_archive_server)
    folder = str(mounted.path(series_path(series)))
    some = os.path.join(folder, f"{series.instances[0].sop_uid}.dcm")
    calls = {"touch": lambda: open(os.path.join(folder, "new.dcm"), "wb"),
             "mkdir": lambda: os.mkdir(os.path.join(folder, "d")),
             "rm": lambda: os.unlink(some),
             "write": lambda: open(some, "r+b"),
             "mv": lambda: os.rename(some, some + ".x"),
             "chmod": lambda: os.chmod(some, 0o644)}
    with pytest.raises(OSError) as info:
        calls[action]()
    assert info.value.errno == errno.EROFS


def test_unknown_names_are_enoent_without_flooding(mounted, nbia_archive_server):
    nbia_archive_server.reset_counters()
    for k in range(50):
        for path in (mounted.path(f"No-Such-Collection-{k}"),
                     mounted.path("Phantom-Thorax-CT", f"NOBODY-{k}"),
                     mounted.path("Phantom-Thorax-CT", "PTC-001", "1.2.3", f"{k}.dcm")):
            with pytest.raises(FileNotFoundError):
                os.stat(path)
    assert nbia_archive_server.counters()["total"] <= 6  # a re-check per listing, not per probe


def test_statfs(mounted):
    st = os.statvfs(mounted.mountpoint)
    assert st.f_namemax == 255 and st.f_bsize == 4096 and st.f_blocks > 0


# --------------------------------------------------------------------------- persistence
def test_remount_lists_from_persisted_metadata_without_requests(mount_factory, nbia_archive_server, tmp_path):
    first = mount_factory(nbia_archive_server.url, name="first", cache_dir=tmp_path / "shared-cache")
    series = big_series(nbia_archive_server)
    inst = series.instances[0]
    inst_path = first.path(series_path(series), f"{inst.sop_uid}.dcm")
    assert inst_path.read_bytes() == inst.path.read_bytes()
    listing = run("ls", "-lR", str(first.mountpoint)).stdout.replace(str(first.mountpoint), "")
    first.stop()
    nbia_archive_server.reset_counters()
    second = mount_factory(nbia_archive_server.url, name="second", cache_dir=tmp_path / "shared-cache")
    again = run("ls", "-lR", str(second.mountpoint)).stdout.replace(str(second.mountpoint), "")
    assert again == listing
    assert second.path(series_path(series), f"{inst.sop_uid}.dcm").read_bytes() == inst.path.read_bytes()
    counts = nbia_archive_server.counters()["endpoints"]
    assert counts == {"getCollectionValues": 1}, counts  # which API version (v4, no login), then nothing


def test_remount_keeps_inode_numbers(mount_factory, nbia_archive_server):
    series = big_series(nbia_archive_server)
    rel = series_path(series)
    inodes = []
    for name in ("ino-a", "ino-b"):
        m = mount_factory(nbia_archive_server.url, name=name)
        inodes.append([os.stat(m.path(rel, f"{i.sop_uid}.dcm")).st_ino for i in series.instances]
                      + [os.stat(m.path(rel)).st_ino])
        m.stop()
    assert inodes[0] == inodes[1] and len(set(inodes[0])) == len(inodes[0])


def test_concurrent_opens_of_one_instance_download_once(mount_factory, nbia_archive_server):
    m = mount_factory(nbia_archive_server.url, name="flight")
    series = big_series(nbia_archive_server)
    inst = series.instances[3]
    path = m.path(series_path(series), f"{inst.sop_uid}.dcm")
    os.listdir(path.parent)
    nbia_archive_server.reset_counters()
    nbia_archive_server.set_faults(latency_s=0.3)  # all opens arrive while the download runs
    results = []
    try:
        threads = [threading.Thread(target=lambda: results.append(path.read_bytes())) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        nbia_archive_server.clear_faults()
    assert results == [inst.path.read_bytes()] * 8
    assert nbia_archive_server.counters()["endpoints"]["getSingleImage"] == 1


def test_a_slash_in_an_id_is_escaped_and_reversible(mounted, nbia_archive_server):
    patient = next(p for c in nbia_archive_server.index.collections for p in c["patients"]
                   if "/" in p["PatientID"])
    escaped = patient["PatientID"].replace("/", "%2F")
    folder = mounted.path("Phantom-Body-MR", escaped)
    assert escaped in os.listdir(mounted.path("Phantom-Body-MR"))
    out = run("getfattr", "-n", "user.nbia.PatientId", "--only-values", str(folder))
    assert out.stdout == patient["PatientID"]
    study = os.listdir(folder)[0]
    series = os.listdir(folder / study)[0]
    first = sorted(os.listdir(folder / study / series))[0]
    assert (folder / study / series / first).read_bytes()[128:132] == b"DICM"


def test_remount_while_the_archive_is_down_serves_what_was_cached(nbia_archive_factory, mount_factory,
                                                                  tmp_path):
    archive = nbia_archive_factory()
    first = mount_factory(archive.url, name="online", cache_dir=tmp_path / "cache")
    series = big_series(archive)
    inst = series.instances[0]
    assert first.path(series_path(series), f"{inst.sop_uid}.dcm").read_bytes() == inst.path.read_bytes()
    listing = run("ls", "-lR", str(first.mountpoint)).stdout.replace(str(first.mountpoint), "")
    first.stop()
    archive.stop()
    offline = mount_factory(archive.url, name="offline", cache_dir=tmp_path / "cache")
    assert run("ls", "-lR", str(offline.mountpoint)).stdout.replace(str(offline.mountpoint), "") == listing
    assert offline.path(series_path(series), f"{inst.sop_uid}.dcm").read_bytes() == inst.path.read_bytes()
    assert "archive is unreachable" in offline.log()


def test_outage_gives_eio_in_budget_and_recovers_without_remount(nbia_archive, mount_factory):
    m = mount_factory(nbia_archive.url, name="outage", extra=("--timeout", "2", "--no-prefetch"))
    series = big_series(nbia_archive)
    folder = m.path(series_path(series))
    names = sorted(os.listdir(folder))
    cached = folder / names[0]
    assert cached.read_bytes()[128:132] == b"DICM"
    nbia_archive.set_faults(image_outage=True)
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        (folder / names[1]).read_bytes()
    to_eio = time.monotonic() - start
    assert info.value.errno == errno.EIO and to_eio < 6
    assert cached.read_bytes()[128:132] == b"DICM"          # cached data keeps working
    assert sorted(os.listdir(folder)) == names              # and cached listings
    nbia_archive.clear_faults()
    truth = next(i for i in series.instances if f"{i.sop_uid}.dcm" == names[1])
    start = time.monotonic()
    assert (folder / names[1]).read_bytes() == truth.path.read_bytes()
    print(f"[figure] image outage: EIO after {to_eio:.2f} s with --timeout 2; the same path read "
          f"{time.monotonic() - start:.2f} s after the archive recovered, no remount")
    assert "archive unavailable" in m.log()


def test_kill_9_during_downloads_leaves_no_partial_instance(nbia_archive, mount_factory, tmp_path):
    cache = tmp_path / "crash-cache"
    first = mount_factory(nbia_archive.url, name="crash1", cache_dir=cache)
    series = big_series(nbia_archive)
    folder = first.path(series_path(series))
    names = sorted(os.listdir(folder))
    nbia_archive.set_faults(connection_mbit_s=0.05)  # a 10 kB file takes 1.6 s: caught mid-download
    reader = subprocess.Popen(["cat", *(str(folder / n) for n in names)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(0.6)
    first.proc.kill()
    first.proc.wait(timeout=10)
    reader.wait(timeout=30)
    nbia_archive.clear_faults()
    assert list(cache.rglob("*.part")), "the daemon died mid-download: a partial file is left"
    subprocess.run(["fusermount", "-u", str(first.mountpoint)], check=True)
    second = mount_factory(nbia_archive.url, name="crash2", cache_dir=cache)
    assert list(cache.rglob("*.part")) == []  # removed at start, never served
    folder = second.path(series_path(series))
    assert {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in names} == archive_md5(series)
