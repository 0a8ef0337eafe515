"""The shared second-level cache: instances kept in an S3-compatible bucket, so that the mounts
of a cluster fetch each instance from the archive once.

Instances are immutable and named by UID, so one object per instance is safe to share:

    s3://BUCKET/PREFIX/<archive host>/public/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    s3://BUCKET/PREFIX/<archive host>/user-<sha256(user)[:16]>/<Series…>/<SOP…>.dcm

`public` holds what the archive's public view (the guest) sees, shared by every mount; a
named user's mount puts an instance there only if the guest can see its series, and under its
own prefix otherwise, so restricted data never reaches another identity through the tier.
A named user reads both (public bytes are his to see too).

Nothing read from the tier is trusted: every object is checked by `verify.refusal` (size,
`DICM`, its SOPInstanceUID, whole, and the archive's md5 where the archive has one) before
the cache takes it; one that fails is never served, the instance comes from the archive,
and its put replaces the object.

The tier is an accelerator, never a dependency: a failure (unreachable, slow beyond
`read_timeout_s` or `get_budget_s`, 5xx) marks it down, one log line, and it is skipped
until a background probe finds it back (one more line). Puts run in `put_workers` threads
from a bounded queue of names (the bytes stay in the local cache until sent); a put that
does not fit, or meets a tier that is down, is dropped: the next node to miss fetches it.

Credentials and endpoint are boto3's own: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/config and credentials; unsigned (anonymous)
requests when none is found.

Locking: `_lock` guards `stats`, `_down_since`, `_refused`, `_public`, `_bad` and `_putting`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable
from urllib.parse import urlsplit

import cachetools

from nbiafs.s3errors import copy_body
from nbiafs.s3errors import error_code as _code
from nbiafs.s3errors import error_reason as _reason
from nbiafs.verify import refusal

log = logging.getLogger(__name__)

_URL = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(/.*)?$")
CHUNK = 1024 * 1024
LEASE_NAME = "lease"       # beside a series' objects; never a .dcm, so never listed as one
LEASE_RENEW_S = 10.0       # the lease holder renews it this often while its zip streams in
LEASE_STALE_S = 30.0       # a lease not renewed for this long is a dead or stalled node's


class TierRefused(Exception):
    """The tier cannot be used as configured (no such bucket, credentials refused): one line."""


@dataclass(frozen=True)
class TierConfig:
    bucket: str
    prefix: str = ""                # without leading or trailing "/"
    connect_timeout_s: float = 1.0  # in-cluster object stores answer in milliseconds
    read_timeout_s: float = 3.0     # silence that marks the tier down (the archive is asked instead)
    get_budget_s: float = 10.0      # one object, whole; past this the archive is asked instead
    md5_wait_s: float = 10.0        # the archive's md5 of an object read from the tier
    get_workers: int = 16           # concurrent GETs of a series prefetch (S3 serves thousands a second)
    put_workers: int = 4            # concurrent PUTs, in the background
    queue_max: int = 4096           # puts waiting (names only: the bytes stay in the local cache)
    recheck_s: float = 5.0          # a tier that is down is probed this often

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_tier_url(text: str) -> TierConfig:
    """`s3://BUCKET` or `s3://BUCKET/PREFIX` -> TierConfig; ValueError with one line otherwise."""
    m = _URL.match(text.strip())
    if not m or ".." in m.group(1):
        raise ValueError(f"{text!r} is not s3://BUCKET[/PREFIX] (a bucket name is 3-63 characters of "
                         "a-z, 0-9, '.' and '-')")
    return TierConfig(bucket=m.group(1), prefix=(m.group(2) or "").strip("/"))


def archive_name(root_url: str) -> str:
    """The archive's part of the keys: its host (and port), as every node names it."""
    parts = urlsplit(root_url)
    return (parts.netloc or "archive").lower()


class _Down(Exception):
    """The tier did not answer usefully (unreachable, too slow, 5xx)."""


class SharedTier:
    def __init__(self, config: TierConfig, archive: str, identity: str | None,
                 md5_of: Callable[[str], concurrent.futures.Future | None],
                 guest_sees: Callable[[str], bool] | None = None, s3=None, clock=time.monotonic):
        self.config = config
        self._base = "/".join(p for p in (config.prefix, archive) if p) + "/"
        self._own = f"user-{hashlib.sha256(identity.encode()).hexdigest()[:16]}" if identity else None
        self._md5_of = md5_of
        self._guest_sees = guest_sees  # named users: is this series public? (only asked for puts)
        self._s3 = s3
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._refused: set[str] = set()       # put errors logged once per kind
        self._public: cachetools.LRUCache = cachetools.LRUCache(maxsize=16384)  # series -> guest sees it
        self._bad: cachetools.LRUCache = cachetools.LRUCache(maxsize=16384)  # keys refused, until replaced
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_max)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._gets: concurrent.futures.ThreadPoolExecutor | None = None
        self._putting = 0  # puts taken from the queue, not finished (guarded by _lock)
        self.stats = {"hits": 0, "misses": 0, "rejected": 0, "puts": 0, "put_errors": 0, "puts_dropped": 0,
                      "errors": 0, "outages": 0}

    # ------------------------------------------------------------------ lifecycle
    def connect(self) -> None:
        """Make the S3 client and look at the bucket: TierRefused if it cannot be used as
        configured; a tier that does not answer only starts out down."""
        if self._s3 is None:
            self._s3 = make_client(self.config)
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            self._s3.head_bucket(Bucket=self.config.bucket)
        except ClientError as exc:
            code = _code(exc)
            if code in ("404", "NoSuchBucket"):
                raise TierRefused(f"shared cache {self.config.url}: no such bucket") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "401"):
                raise TierRefused(f"shared cache {self.config.url}: access refused ({code}); give credentials "
                                  "as boto3 takes them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                                  "AWS_PROFILE, ~/.aws/credentials)") from None
            self._went_down(f"HTTP {code}")
        except BotoCoreError as exc:
            self._went_down(_reason(exc))

    def start(self) -> None:
        for n in range(self.config.put_workers):
            t = threading.Thread(target=self._put_loop, name=f"nbia-tier-put-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop; puts already queued get `grace_s` to finish, the rest are dropped."""
        deadline = time.monotonic() + grace_s
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._stop.set()
        if self._gets is not None:
            self._gets.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ health
    def usable(self) -> bool:
        with self._lock:
            return self._down_since is None

    def _went_down(self, reason: str) -> None:
        with self._lock:
            self.stats["errors"] += 1
            if self._down_since is not None or self._stop.is_set():
                return
            self._down_since = self._clock()
            self.stats["outages"] += 1
        log.warning("shared cache %s is not answering (%s): reading from the archive until it is back",
                    self.config.url, reason)
        threading.Thread(target=self._probe_loop, name="nbia-tier-probe", daemon=True).start()

    def _probe_loop(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError
        while not self._stop.wait(self.config.recheck_s):
            try:
                self._s3.head_bucket(Bucket=self.config.bucket)
            except (BotoCoreError, ClientError):
                continue
            with self._lock:
                since, self._down_since = self._down_since, None
            log.warning("shared cache %s is back after %.0f s", self.config.url,
                        self._clock() - (since if since is not None else self._clock()))
            return

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.stats[what] += n

    # ------------------------------------------------------------------ keys
    def _key(self, scope: str, series_uid: str, sop_uid: str) -> str:
        return f"{self._base}{scope}/{series_uid}/{sop_uid}.dcm"

    def _read_scopes(self) -> list[str]:
        return ["public"] + ([self._own] if self._own else [])

    def _put_scope(self, series_uid: str) -> str:
        if self._own is None:
            return "public"
        with self._lock:
            public = self._public.get(series_uid)
        if public is None:
            try:
                public = bool(self._guest_sees is not None and self._guest_sees(series_uid))
            except Exception as exc:  # noqa: BLE001 - not known to be public: kept private
                log.debug("could not ask whether series %s is public (%s)", series_uid, exc)
                return self._own
            with self._lock:
                self._public[series_uid] = public
        return "public" if public else self._own

    # ------------------------------------------------------------------ reads
    def listing(self, series_uid: str) -> set[str]:
        """The instances of a series the tier holds (one LIST per scope; empty when down)."""
        if not self.usable():
            return set()
        found: set[str] = set()
        try:
            for scope in self._read_scopes():
                prefix = f"{self._base}{scope}/{series_uid}/"
                paginator = self._s3.get_paginator("list_objects_v2")
                for page in paginator.paginate(Bucket=self.config.bucket, Prefix=prefix):
                    for obj in page.get("Contents", []):
                        name = obj["Key"][len(prefix):]
                        if name.endswith(".dcm") and "/" not in name:
                            found.add(name[:-4])
        except Exception as exc:  # noqa: BLE001 - botocore and urllib3 errors alike: the tier is down
            self._went_down(_reason(exc))
            return set()
        return found

    def get(self, series_uid: str, sop_uid: str, dest: BinaryIO, expected_size: int | None = None) -> int | None:
        """Write the instance into `dest` if the tier holds it and it passes every check; its
        size, or None (a miss, a refused object, or a tier that is down: ask the archive)."""
        if not self.usable():
            return None
        md5: list = []  # the archive's md5, asked once an object is found (while its body streams in)

        def ask_md5() -> None:
            if not md5:
                md5.append(self._md5_of(sop_uid))

        for scope in self._read_scopes():
            key = self._key(scope, series_uid, sop_uid)
            with self._lock:
                if key in self._bad:  # refused before, not replaced since: not read again
                    continue
            try:
                got = self._download(key, dest, ask_md5)
            except _Down as exc:
                self._went_down(str(exc))
                return None
            if got is None:
                continue
            size, digest = got
            reason = self._check(dest, sop_uid, size, expected_size, digest, md5[0])
            if reason is None:
                self._count("hits")
                return size
            with self._lock:
                self.stats["rejected"] += 1
                self._bad[key] = True
            log.warning("shared cache: %s refused (%s); fetching the instance from the archive", key, reason)
        self._count("misses")
        return None

    def _check(self, dest: BinaryIO, sop_uid: str, size: int, expected_size: int | None, digest: str,
               md5: concurrent.futures.Future | None) -> str | None:
        expected_md5 = None
        if md5 is not None:
            try:
                expected_md5 = md5.result(timeout=self.config.md5_wait_s)
            except Exception as exc:  # noqa: BLE001 - no md5 from the archive: not served from the tier
                return f"the archive's md5 is not available ({type(exc).__name__})"
        return refusal(dest, sop_uid, size, expected_size, digest, expected_md5)

    def _download(self, key: str, dest: BinaryIO, found: Callable[[], object]) -> tuple[int, str] | None:
        """(size, md5) of the object written into `dest`, None if there is none; `found()` is
        called once it is known to exist."""
        from botocore.exceptions import ClientError
        dest.seek(0)
        dest.truncate()
        deadline = self._clock() + self.config.get_budget_s
        try:
            r = self._s3.get_object(Bucket=self.config.bucket, Key=key)
        except ClientError as exc:
            code = _code(exc)
            if code in ("NoSuchKey", "404"):
                return None
            if code.startswith("5") or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
                raise _Down(f"HTTP {code}") from None
            self._count("errors")
            log.debug("shared cache: GET %s refused (%s)", key, code)
            return None
        except Exception as exc:  # noqa: BLE001 - connection and timeout errors
            raise _Down(_reason(exc)) from None
        found()
        body = r["Body"]
        try:
            got = copy_body(body.iter_chunks(CHUNK), dest, self._clock, deadline, self.config.get_budget_s, _Down)
        finally:
            body.close()
        size, _md5 = got
        length = r.get("ContentLength")
        if length is not None and size != length:
            raise _Down(f"object cut short ({size} of {length} bytes)")
        dest.flush()
        return got

    def get_many(self, series_uid: str, sop_uids, into: Callable[[], contextlib.AbstractContextManager],
                 deliver: Callable[[str, str], None], expected_size: Callable[[str], int | None],
                 stopped: Callable[[], bool]) -> list[str]:
        """Fetch several instances of a series at once (`get_workers` GETs), each into a file
        from `into()`, handing each verified one to `deliver(sop_uid, path)` as it lands, in
        the order given; returns the instances not delivered (for the archive to send)."""
        with self._lock:
            if self._gets is None:
                self._gets = concurrent.futures.ThreadPoolExecutor(self.config.get_workers, "nbia-tier-get")
            pool = self._gets

        def one(sop_uid: str) -> str | None:
            if stopped() or not self.usable():
                return None
            with into() as f:
                size = self.get(series_uid, sop_uid, f, expected_size(sop_uid))
                path = f.name
            if size is None:
                os.unlink(path)
                return None
            return path

        sops = list(sop_uids)
        left = []
        try:
            futures = [pool.submit(one, sop) for sop in sops]
        except RuntimeError:  # stopping
            return sops
        for sop, future in zip(sops, futures):
            try:
                path = future.result()
            except (concurrent.futures.CancelledError, OSError):
                path = None
            if path is None:
                left.append(sop)
                continue
            try:
                deliver(sop, path)
            finally:
                if os.path.exists(path):
                    os.unlink(path)
        return left

    # ------------------------------------------------------------------ series leases
    def _lease_key(self, series_uid: str) -> str:
        return f"{self._base}{self._put_scope(series_uid)}/{series_uid}/{LEASE_NAME}"

    def take_lease(self, series_uid: str) -> bool | None:
        """Become the one node fetching this series' zip from the archive: True (ours: fetch
        it), False (another node's fresh lease: take its instances as it puts them), None
        (cannot tell: a tier that is down or takes no conditional writes; fetch it).

        A lease is an object created with `If-None-Match: *`, which S3 (since 2024), MinIO,
        Ceph and SeaweedFS create for one writer only; one older than LEASE_STALE_S is a dead
        node's and is taken over."""
        if not self.usable():
            return None
        from botocore.exceptions import ClientError
        key = self._lease_key(series_uid)
        for _attempt in range(2):
            try:
                self._s3.put_object(Bucket=self.config.bucket, Key=key, Body=b"", IfNoneMatch="*")
                return True
            except ClientError as exc:
                if _code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    log.debug("shared cache: no lease on series %s (%s)", series_uid, _code(exc))
                    return None
            except Exception as exc:  # noqa: BLE001 - connection errors
                self._went_down(_reason(exc))
                return None
            if self.lease_age(series_uid) < LEASE_STALE_S:
                return False
            with contextlib.suppress(Exception):
                self._s3.delete_object(Bucket=self.config.bucket, Key=key)
        return None

    def renew_lease(self, series_uid: str) -> None:
        with contextlib.suppress(Exception):  # a lease not renewed goes stale: others then fetch
            self._s3.put_object(Bucket=self.config.bucket, Key=self._lease_key(series_uid), Body=b"")

    def lease_age(self, series_uid: str) -> float:
        """Seconds since this series' lease was taken (infinite when there is none)."""
        try:
            head = self._s3.head_object(Bucket=self.config.bucket, Key=self._lease_key(series_uid))
        except Exception:  # noqa: BLE001 - none, or not readable: nobody is known to fetch it
            return float("inf")
        return max(0.0, time.time() - head["LastModified"].timestamp())

    def drop_lease_later(self, series_uid: str) -> None:
        """Give the lease up once the puts queued before it are sent."""
        try:
            self._queue.put_nowait((series_uid, None, None))
        except queue.Full:
            self._drop_lease(series_uid)

    def _drop_lease(self, series_uid: str) -> None:
        with contextlib.suppress(Exception):  # a lease left behind only goes stale
            self._s3.delete_object(Bucket=self.config.bucket, Key=self._lease_key(series_uid))

    # ------------------------------------------------------------------ puts
    def put_later(self, series_uid: str, sop_uid: str, opener: Callable[[], BinaryIO | None]) -> None:
        """Put an instance the archive sent into the tier, in the background; `opener` gives its
        bytes (from the local cache) when its turn comes, or None if they are gone."""
        if self._stop.is_set() or not self.usable():
            self._count("puts_dropped")
            return
        try:
            self._queue.put_nowait((series_uid, sop_uid, opener))
        except queue.Full:
            self._count("puts_dropped")

    def queued(self) -> int:
        """Puts waiting or being sent."""
        with self._lock:
            return self._queue.qsize() + self._putting

    def _put_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            series_uid, sop_uid, opener = item
            if sop_uid is None:  # after the puts taken before it (by any thread) are sent
                deadline = time.monotonic() + self.config.get_budget_s
                while self.queued() > self._queue.qsize() and time.monotonic() < deadline:
                    time.sleep(0.01)
                self._drop_lease(series_uid)
                continue
            if not self.usable():
                self._count("puts_dropped")
                continue
            with self._lock:
                self._putting += 1
            try:
                self._put(series_uid, sop_uid, opener)
            except Exception:  # a put thread must not die: the next puts still go
                log.exception("shared cache: putting %s failed", sop_uid)
                self._count("put_errors")
            finally:
                with self._lock:
                    self._putting -= 1

    def _put(self, series_uid: str, sop_uid: str, opener: Callable[[], BinaryIO | None]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError
        handle = opener()
        if handle is None:  # evicted before its turn
            self._count("puts_dropped")
            return
        key = self._key(self._put_scope(series_uid), series_uid, sop_uid)
        with handle:
            size = os.fstat(handle.fileno()).st_size
            try:
                self._s3.put_object(Bucket=self.config.bucket, Key=key, Body=handle, ContentLength=size,
                                    ContentType="application/dicom")
            except ClientError as exc:
                code = _code(exc)
                if code.startswith("5") or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
                    self._went_down(f"HTTP {code}")
                    return
                self._count("put_errors")
                with self._lock:
                    first = code not in self._refused
                    self._refused.add(code)
                if first:
                    log.warning("shared cache %s refuses puts (%s): this mount only reads it", self.config.url,
                                code)
                return
            except (BotoCoreError, OSError) as exc:
                self._went_down(_reason(exc))
                return
        with self._lock:
            self.stats["puts"] += 1
            self._bad.pop(key, None)


def make_client(config: TierConfig):
    """boto3's S3 client, configured the way boto3 users expect (environment, profile, config
    files); unsigned requests when no credentials are found. At most two tries per request: a
    slow or failing tier is skipped for the archive, not retried at length."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    session = boto3.session.Session()
    unsigned = session.get_credentials() is None
    options = dict(connect_timeout=config.connect_timeout_s, read_timeout=config.read_timeout_s,
                   # Two tries: the second for a pooled connection the store closed while idle
                   # (SeaweedFS does after a few seconds); a tier that fails twice is skipped.
                   retries={"total_max_attempts": 2, "mode": "standard"},
                   max_pool_connections=config.get_workers + config.put_workers + 8,
                   # Plain PUTs (no streaming checksum trailers), which every S3-compatible store takes;
                   # what is read back is verified against the archive anyway.
                   request_checksum_calculation="when_required", response_checksum_validation="when_required")
    if unsigned:
        options["signature_version"] = UNSIGNED
    return session.client("s3", region_name=session.region_name or "us-east-1", config=Config(**options))
