"""The shared second-level cache (`--shared-cache s3://…`), against a real SeaweedFS on loopback
and the local archive: mounts with separate local caches, as the nodes of a cluster have."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import public_series, series_path

from nbiafs.archive.objectstore import LocalObjectStore
from nbiafs.archive.tokens import DEFAULT_USERS

pytestmark = pytest.mark.mount
USER, PASSWORD = next(iter(DEFAULT_USERS.items()))
NAMED = {"NBIA_USER": USER, "NBIA_PASSWORD": PASSWORD}
IMAGE_ENDPOINTS = ("getSingleImage", "getImage", "getImageWithMD5Hash")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SeaweedFS for the module; each test takes its own prefix of the bucket."""
    s = LocalObjectStore(tmp_path_factory.mktemp("weed")).start()
    yield s
    s.stop()


@pytest.fixture
def prefix():
    return f"run-{uuid.uuid4().hex[:8]}"


def tier_mount(mount_factory, archive, store, prefix, name, extra=(), env=None):
    return mount_factory(archive.url, name=name, env={**store.environment(), **(env or {})},
                         extra=("--shared-cache", f"s3://{store.bucket}/{prefix}", *extra))


def shared_counts(m) -> dict:
    line = next(x for x in (m.mountpoint / ".nbiafs" / "status").read_text().splitlines() if x.startswith("shared:"))
    numbers = {k: int(v) for v, k in re.findall(r"(\d+) (instances read|not there|refused by|put|queued|errors)",
                                                line)}
    numbers["up"] = " up:" in line
    return numbers


def settle(m, timeout=30.0) -> dict:
    """Wait until the mount has no puts waiting and its prefetch is idle; its shared counters."""
    deadline = time.monotonic() + timeout
    while True:
        counts = shared_counts(m)
        status = (m.mountpoint / ".nbiafs" / "status").read_text()
        busy = re.search(r"(\d+) in flight, (\d+) queued", status)
        if counts["queued"] == 0 and busy and busy.groups() == ("0", "0"):
            time.sleep(0.3)  # a put taken from the queue is still being sent
            again = shared_counts(m)
            if again == counts:
                return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"puts did not finish: {status}")
        time.sleep(0.2)


def read_series(m, series, how: str) -> dict[str, str]:
    """Read a series through the mount as a user would; md5 of each file."""
    folder = m.path(series_path(series))
    if how == "cp":
        dest = m.mountpoint.parent / f"copy-{uuid.uuid4().hex[:6]}"
        subprocess.run(["cp", "-r", str(folder), str(dest)], check=True, timeout=120)
        out = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in dest.iterdir()}
        shutil.rmtree(dest)
        return out
    res = subprocess.run(["md5sum", *sorted(str(p) for p in folder.iterdir())], capture_output=True, text=True,
                         check=True, timeout=120)
    return {os.path.basename(line.split("  ", 1)[1]): line.split()[0] for line in res.stdout.splitlines()}


def expected(series) -> dict[str, str]:
    return {f"{i.sop_uid}.dcm": i.md5 for i in series.instances}


def images_sent(archive) -> int:
    counts = archive.counters()["endpoints"]
    return sum(counts.get(e, 0) for e in IMAGE_ENDPOINTS)


def objects(store, prefix) -> dict[str, int]:
    s3 = store.client()
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix + "/"):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


# --------------------------------------------------------------------------- a cluster of three
def test_three_nodes_fetch_each_instance_from_the_archive_once(nbia_archive, mount_factory, store, prefix):
    two = sorted(public_series(nbia_archive), key=lambda s: -len(s.instances))[:2]
    nodes = [tier_mount(mount_factory, nbia_archive, store, prefix, f"node{n}") for n in (1, 2, 3)]
    # Node 1 reads the first series with cp -r (a folder reader: a zip of the series) and the
    # second file by file in name order; what it fetched goes into the tier in the background.
    firsts = set()
    for series, how in zip(two, ("cp", "md5sum")):
        assert read_series(nodes[0], series, how) == expected(series)
        # GNU cp opens a folder's files in inode order (gnulib's savedir), md5sum as sorted
        listed = {e.name: e.inode() for e in os.scandir(nodes[0].path(series_path(series)))}
        firsts.add((min(listed, key=listed.__getitem__) if how == "cp" else min(listed))[:-4])
    first = settle(nodes[0])
    total = sum(len(s.instances) for s in two)
    assert first["put"] == total and first["instances read"] == 0
    after_first = nbia_archive.counters()
    sent = after_first["instances"]
    assert {i.sop_uid for s in two for i in s.instances} <= set(sent)
    # Nodes 2 and 3 read the same two series, each the other way round: all from the tier.
    for node in nodes[1:]:
        for series, how in zip(two, ("md5sum", "cp")):
            assert read_series(node, series, how) == expected(series)
        counts = settle(node)
        assert counts["instances read"] == total and counts["refused by"] == 0 and counts["put"] == 0
    after_all = nbia_archive.counters()
    assert images_sent(nbia_archive) == sum(after_first["endpoints"].get(e, 0) for e in IMAGE_ENDPOINTS)
    assert after_all["instances"] == sent and after_all["image_bytes"] == after_first["image_bytes"]
    # Each instance left the archive once for the whole cluster, but the first file node 1
    # opened in each series: a folder reader's first open is fetched on its own while the
    # series' zip starts beside it (its first byte does not wait for the zip), which brings it
    # again. That is node 1's own cost; nodes 2 and 3 added nothing.
    assert {uid for uid, n in sent.items() if n > 1} <= firsts and max(sent.values()) <= 2
    keys = objects(store, prefix)
    assert len(keys) == total and all("/public/" in k for k in keys)
    # What each node did with the tier outlives the mount, in `nbiafs cache info`.
    for node, line in ((nodes[0], f": 0 instances read from it (0 refused by the checks), {total} put, 0 errors"),
                       (nodes[1], f": {total} instances read from it (0 refused by the checks), 0 put, 0 errors")):
        node.stop()
        info = subprocess.run([sys.executable, "-m", "nbiafs", "cache", "info", "--cache-dir", str(node.cache_dir)],
                              capture_output=True, text=True, timeout=60)
        assert f"shared cache s3://{store.bucket}/{prefix}{line}" in info.stdout, info.stdout


# --------------------------------------------------------------------------- trust nothing
def tamper(store, key: str, data: bytes) -> None:
    store.client().put_object(Bucket=store.bucket, Key=key, Body=data)


def test_corrupt_truncated_or_planted_objects_are_never_served(nbia_archive, mount_factory, store, prefix):
    series = max(public_series(nbia_archive), key=lambda s: len(s.instances))
    other = next(s for s in public_series(nbia_archive) if s.uid != series.uid and len(s.instances) >= 3)
    writer = tier_mount(mount_factory, nbia_archive, store, prefix, "writer")
    assert read_series(writer, series, "md5sum") == expected(series)
    settle(writer)
    keys = {k.rsplit("/", 1)[1][:-4]: k for k in objects(store, prefix)}
    insts = series.instances
    original = {i.sop_uid: i.path.read_bytes() for i in insts[:4]}
    flipped = bytearray(original[insts[0].sop_uid])
    flipped[-100] ^= 0xFF  # one pixel: same size, same header, still whole
    tamper(store, keys[insts[0].sop_uid], bytes(flipped))
    tamper(store, keys[insts[1].sop_uid], other.instances[0].path.read_bytes())  # another instance
    tamper(store, keys[insts[2].sop_uid], original[insts[2].sop_uid][:-2000])  # cut short
    tamper(store, keys[insts[3].sop_uid], b"<html>Service Unavailable</html>")
    # Planted before anyone read it: an instance of the other series, under its right name.
    planted_key = keys[insts[0].sop_uid].replace(series.uid, other.uid).replace(
        insts[0].sop_uid, other.instances[1].sop_uid)
    tamper(store, planted_key, other.instances[2].path.read_bytes())
    nbia_archive.reset_counters()
    reader = tier_mount(mount_factory, nbia_archive, store, prefix, "reader")
    assert read_series(reader, series, "md5sum") == expected(series)
    assert read_series(reader, other, "md5sum") == expected(other)
    counts = settle(reader)
    assert counts["refused by"] == 5
    sent = nbia_archive.counters()["instances"]
    for inst in insts[:4]:
        assert sent.get(inst.sop_uid) == 1  # refused, so fetched from the archive
    assert not any(sent.get(i.sop_uid) for i in insts[4:])  # the good objects came from the tier
    # Each refused object was replaced by what the archive sent.
    s3 = store.client()
    for inst in insts[:4]:
        body = s3.get_object(Bucket=store.bucket, Key=keys[inst.sop_uid])["Body"].read()
        assert hashlib.md5(body).hexdigest() == inst.md5
    log = reader.log()
    assert log.count("refused (") == 5
    assert "md5" in log and "it is instance" in log and "not a DICOM" in log


def test_without_md5_checks_a_cut_object_is_still_refused(nbia_archive, mount_factory, store, prefix):
    """--no-verify-md5 (or an archive without md5s): size, DICM, identity and wholeness remain."""
    series = max(public_series(nbia_archive), key=lambda s: len(s.instances))
    writer = tier_mount(mount_factory, nbia_archive, store, prefix, "writer", extra=("--no-verify-md5",))
    read_series(writer, series, "md5sum")
    settle(writer)
    keys = {k.rsplit("/", 1)[1][:-4]: k for k in objects(store, prefix)}
    inst = series.instances[5]
    tamper(store, keys[inst.sop_uid], inst.path.read_bytes()[:-1])
    reader = tier_mount(mount_factory, nbia_archive, store, prefix, "reader", extra=("--no-verify-md5",))
    path = reader.path(series_path(series), f"{inst.sop_uid}.dcm")
    assert hashlib.md5(path.read_bytes()).hexdigest() == inst.md5
    assert "cut short" in reader.log()


# --------------------------------------------------------------------------- faults
def test_tier_killed_mid_read_then_back(nbia_archive, mount_factory, tmp_path, prefix):
    store = LocalObjectStore(tmp_path / "weed").start()
    try:
        every = public_series(nbia_archive)
        writer = tier_mount(mount_factory, nbia_archive, store, prefix, "writer")
        for s in every:
            read_series(writer, s, "md5sum")
        settle(writer)
        writer.stop()
        reader = tier_mount(mount_factory, nbia_archive, store, prefix, "reader", extra=("--no-prefetch",))
        files = [(s, i) for s in every for i in s.instances]
        results: dict[str, str] = {}
        took: list[float] = []
        errors: list[BaseException] = []

        def read_all():
            try:
                for s, inst in files:
                    started = time.monotonic()
                    data = reader.path(series_path(s), f"{inst.sop_uid}.dcm").read_bytes()
                    took.append(time.monotonic() - started)
                    results[inst.sop_uid] = hashlib.md5(data).hexdigest()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        t = threading.Thread(target=read_all)
        t.start()
        while len(results) < len(files) // 3 and t.is_alive():
            time.sleep(0.01)
        store.kill()
        killed_at = len(results)
        t.join(timeout=120)
        assert not errors and not t.is_alive()
        assert killed_at < len(files)  # it was killed mid-read
        assert results == {i.sop_uid: i.md5 for _s, i in files}
        assert max(took) < 5.0  # a dead tier costs one connect timeout (1 s) at most, then is skipped
        assert "is not answering" in reader.log()
        # Back: found by the probe, used again.
        store.start()
        deadline = time.monotonic() + 30
        while "is back after" not in reader.log():
            assert time.monotonic() < deadline, reader.log()
            time.sleep(0.2)
        hits = shared_counts(reader)["instances read"]
        fresh = tier_mount(mount_factory, nbia_archive, store, prefix, "fresh", extra=("--no-prefetch",))
        s = every[0]
        assert read_series(fresh, s, "md5sum") == expected(s)
        assert shared_counts(fresh)["instances read"] == len(s.instances)
        assert reader.log().count("is not answering") == 1 and reader.log().count("is back after") == 1
        assert hits >= killed_at
    finally:
        store.stop()


def test_tier_answering_errors_then_slowly(nbia_archive, mount_factory, store, prefix, tmp_path):
    """A tier that refuses puts (read-only credentials elsewhere) or lists nothing: reads work."""
    series = public_series(nbia_archive)[0]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {"AWS_SECRET_ACCESS_KEY": "wrong-" + store.secret_key}
    res = subprocess.run([sys.executable, "-m", "nbiafs", "mount", "--url", nbia_archive.url, "--cache-dir",
                          str(tmp_path / "c"), "--shared-cache", f"s3://{store.bucket}/{prefix}",
                          str(mnt)], env={**os.environ, **store.environment(), **env},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "access refused" in res.stderr
    assert store.secret_key not in res.stderr
    res = subprocess.run([sys.executable, "-m", "nbiafs", "mount", "--url", nbia_archive.url, "--cache-dir",
                          str(tmp_path / "c"), "--shared-cache", f"s3://no-such-bucket-{prefix}",
                          str(mnt)], env={**os.environ, **store.environment()},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and res.stderr.strip() == \
        f"nbiafs: shared cache s3://no-such-bucket-{prefix}: no such bucket"
    res = subprocess.run([sys.executable, "-m", "nbiafs", "mount", "--shared-cache", "http://x", str(mnt)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and res.stderr.startswith("nbiafs: --shared-cache:") and "Traceback" not in res.stderr
    # A tier that does not answer at all when the mount starts: mounted, and reads come from the archive.
    down = {**store.environment(), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    m = mount_factory(nbia_archive.url, name="down", env=down,
                      extra=("--shared-cache", f"s3://{store.bucket}/{prefix}"))
    assert read_series(m, series, "md5sum") == expected(series)
    assert not shared_counts(m)["up"] and "is not answering" in m.log()


# --------------------------------------------------------------------------- identities
def test_restricted_series_never_reach_a_guest_through_the_tier(nbia_archive, mount_factory, store, prefix):
    restricted = next(s for s in nbia_archive.index.iter_series(USER) if s.collection.get("restricted"))
    public = public_series(nbia_archive)[0]
    named = tier_mount(mount_factory, nbia_archive, store, prefix, "named", env=NAMED)
    assert read_series(named, restricted, "md5sum") == expected(restricted)
    assert read_series(named, public, "md5sum") == expected(public)
    settle(named)
    keys = objects(store, prefix)
    restricted_keys = [k for k in keys if restricted.uid in k]
    public_keys = [k for k in keys if public.uid in k]
    assert len(restricted_keys) == len(restricted.instances) and len(public_keys) == len(public.instances)
    assert all("/user-" in k and "/public/" not in k for k in restricted_keys)
    assert all("/public/" in k for k in public_keys)  # public data is shared whoever read it
    assert USER not in " ".join(keys)  # the user is named by a hash, not in clear
    # A guest mount of the same tier: the public series comes from it, the restricted one is not there.
    nbia_archive.reset_counters()
    guest = tier_mount(mount_factory, nbia_archive, store, prefix, "guest")
    assert read_series(guest, public, "md5sum") == expected(public)
    assert shared_counts(guest)["instances read"] == len(public.instances)
    with pytest.raises(OSError) as info:
        os.stat(guest.path(series_path(restricted), f"{restricted.instances[0].sop_uid}.dcm"))
    assert info.value.errno == errno.ENOENT
    # Even asked for by UID, the guest's tier reads never look under the user's prefix.
    from nbiafs.tier import SharedTier, archive_name, parse_tier_url
    tier = SharedTier(parse_tier_url(f"s3://{store.bucket}/{prefix}"), archive_name(nbia_archive.url), None,
                      md5_of=lambda sop: None, s3=store.client())
    assert tier.listing(restricted.uid) == set()
    # The same user on another node reads the restricted series from the tier.
    again = tier_mount(mount_factory, nbia_archive, store, prefix, "named2", env=NAMED)
    assert read_series(again, restricted, "md5sum") == expected(restricted)
    assert shared_counts(again)["instances read"] == len(restricted.instances)
    assert not any(nbia_archive.counters()["instances"].get(i.sop_uid) for i in restricted.instances)
    for m in (named, guest, again):
        assert PASSWORD not in m.log() and store.secret_key not in m.log()


# --------------------------------------------------------------------------- nodes at once
def test_nodes_reading_at_once_ask_the_archive_for_a_series_zip_once(nbia_archive, mount_factory, store, prefix):
    series = max(public_series(nbia_archive), key=lambda s: len(s.instances))
    nodes = [tier_mount(mount_factory, nbia_archive, store, prefix, f"at-once{n}") for n in range(3)]
    nbia_archive.set_faults(latency_s=0.05)  # the zip takes a while: the others find its lease
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda m: read_series(m, series, "cp"), nodes))
    want = expected(series)
    bad = [{k: (r.get(k, "missing"), v) for k, v in want.items() if r.get(k) != v} for r in results]
    assert not any(bad) and all(set(r) == set(want) for r in results), (bad, [m.log()[-3000:] for m in nodes])
    counts = nbia_archive.counters()
    zips = sum(counts["endpoints"].get(e, 0) for e in ("getImage", "getImageWithMD5Hash"))
    assert zips == 1
    # Each node fetched the first file it opened on its own (before any plan), nothing else.
    assert counts["endpoints"].get("getSingleImage", 0) <= 3
    followed = sum(settle(m)["instances read"] for m in nodes)
    assert followed >= 2 * (len(series.instances) - 3)
    assert not [k for k in objects(store, prefix) if k.endswith("/lease")]  # given up once its puts were in


def test_a_lease_nobody_fulfils_costs_a_bounded_wait(nbia_archive, mount_factory, store, prefix):
    """A node took a series' lease and died: a reader waits at most until its prefetch gives up
    on a series nobody's opens move (PrefetchConfig.idle_stop_s) or the lease goes stale."""
    from nbiafs.prefetch import PrefetchConfig
    from nbiafs.tier import LEASE_STALE_S, archive_name
    series = max(public_series(nbia_archive), key=lambda s: len(s.instances))
    key = f"{prefix}/{archive_name(nbia_archive.url)}/public/{series.uid}/lease"
    store.client().put_object(Bucket=store.bucket, Key=key, Body=b"")
    m = tier_mount(mount_factory, nbia_archive, store, prefix, "after-a-dead-node")
    started = time.monotonic()
    assert read_series(m, series, "cp") == expected(series)
    took = time.monotonic() - started
    assert took < min(PrefetchConfig.idle_stop_s, LEASE_STALE_S) + 5
    sent = nbia_archive.counters()["instances"]
    assert all(sent.get(i.sop_uid) == 1 for i in series.instances)  # then all came from the archive


def test_the_demo_runs_with_a_shared_cache(nbia_archive_data, tmp_path):
    from conftest import start_demo
    mnt = tmp_path / "demo"
    proc = start_demo(mnt, nbia_archive_data, "--shared-cache", stdout=subprocess.PIPE)
    try:
        first = next(p for p in sorted(mnt.rglob("*.dcm")))
        assert first.read_bytes()[128:132] == b"DICM"
        deadline = time.monotonic() + 30
        while not re.search(r" [1-9]\d* put \(0 queued", (mnt / ".nbiafs" / "status").read_text()):
            assert time.monotonic() < deadline, (mnt / ".nbiafs" / "status").read_text()
            time.sleep(0.2)
        assert " up: " in (mnt / ".nbiafs" / "status").read_text()
    finally:
        proc.send_signal(2)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err
    assert "The shared cache is s3://" in out
    # its object store stopped with it
    assert not subprocess.run(["pgrep", "-f", "weed server.*nbiafs-demo-s3-"], capture_output=True).stdout
