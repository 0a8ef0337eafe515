"""The NBIA client: one method per endpoint, over one pooled `requests.Session`.

Retry policy (anchors: TCIA's data retriever, s3fs, mountpoint-s3; see
shared/fuse-notes.md): connection errors, timeouts, 429 (honouring Retry-After),
500/502/503/504 and malformed bodies are retried with "equal jitter"
exponential backoff (a wait of cap/2 plus a random part up to cap/2, the cap
doubling from 0.5 s to at most 8 s), at most `attempts` tries, and never past
the call's time budget: the read timeout of each attempt is cut to what is left
of the budget. Then `ArchiveUnavailable` (EIO), or `IntegrityError` (EIO) when
the last failure was a bad body. Eight attempts wait at least 15.75 s in all,
so an outage of a few seconds is ridden out; a stall costs at most the budget.

API versions (shared/nbia-api-v4.md): `auto` (the default) asks v4 first, the
version TCIA's production server speaks today, without a token; then v2 (a token
session), then v1. v4 needs no token for the guest; a named user's token session
is kept on v4 too. v4 rejects any query parameter it does not list, and spells
parameters case-sensitively, so each method sends exactly the names of the
version in use; records come back in one shape whatever the version (models.py).

Integrity on v4: a single fetch asks getMD5HashForImage at the same time as
getSingleImage and checks the body against it before the instance is accepted
(no extra round trip); series zips come with `md5hashes.csv` (`IncludeMD5=Yes`,
else getImageWithMD5Hash), checked by the prefetcher.

Token quirks handled here (shared/nbia-api.md): an expired or invalid token makes a
query answer an empty 200 that looks like "no data". An empty answer is
therefore checked: the same token asks getCollectionValues, which is never
empty for a live token; if that is empty too, the token is renewed and the
query asked again, and that answer is the one returned. (Tokens only ever go
from valid to invalid, so a token that passes the check was valid for the query.)
A 401 on a download renews the token once and retries.

This module is the only one that imports `requests`, with auth.py.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import logging
import os
import random
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import requests
import requests.adapters

from nbiafs.api import models
from nbiafs.api.auth import GUEST, Credentials, TokenAuth
from nbiafs.errors import (ArchiveUnavailable, IntegrityError, NbiaError, NoSuchApi, NotAuthorized,
                           NotFound, RejectedParameter, UntrustedCertificate)

log = logging.getLogger(__name__)

PRODUCTION_ROOT = "https://nbia.cancerimagingarchive.net/nbia-api"
NLST_ROOT = "https://nlst.cancerimagingarchive.net/nbia-api"
PRESETS = {"tcia": PRODUCTION_ROOT, "nlst": NLST_ROOT}
API_CHOICES = ("auto", "v4", "v2", "v1")
VERSIONS = ("v4", "v2", "v1")   # the order `auto` tries them in
METADATA_BATCH = 10_000          # UIDs per POST getSeriesMetadata (tcia-utils' chunk; the server's limit)
VERSION_CHECK_ATTEMPTS = 3
MD5_HEX = re.compile(r"^[0-9a-fA-F]{32}$")
MD5_WAIT_MIN_S = 1.0             # after the image, how long its md5 answer is waited for at least
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
DICOM_MAGIC_OFFSET = 128
STREAM_CHUNK = 256 * 1024


@dataclass(frozen=True)
class ClientConfig:
    root_url: str = PRODUCTION_ROOT
    api: str = "auto"                    # "auto", "v4" (token optional), "v2" (token), "v1" (anonymous)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0         # longest silence between two bytes of an answer
    attempts: int = 8                    # tries per call (s3fs: 5; mountpoint-s3, rclone: 10)
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    metadata_budget_s: float = 60.0      # whole-call time limit of a metadata query
    image_budget_s: float = 120.0        # whole-call time limit of an image download
    pool_size: int = 16                  # prefetch concurrency (8) plus FUSE threads
    verify_tls: bool = True
    token_margin_s: float = 60.0         # refresh this long before expiry (or 1/5 of lifetime)
    verify_md5: bool = True              # v4: check each single fetch against getMD5HashForImage

    def __post_init__(self):
        if self.api not in API_CHOICES:
            raise ValueError(f"api must be one of {', '.join(API_CHOICES)}, not {self.api!r}")

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout_s, self.read_timeout_s)


class _Retry(Exception):
    """One attempt failed in a way worth trying again."""

    def __init__(self, reason: str, retry_after_s: float | None = None, integrity: bool = False):
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        self.integrity = integrity  # the body was wrong (short, malformed), not missing


def _text(header: str | bytes | None) -> str | None:
    """A header as sent (requests keeps what it was given: str or bytes)."""
    return header.decode("latin-1") if isinstance(header, bytes) else header


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class _Session(requests.Session):
    """A session that reads the environment once, when it is made: the proxies for `url` (with
    NO_PROXY) and REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (unless `insecure`: verification off).
    requests would read them again at every request (`trust_env`: 0.2-0.3 ms each, stats of
    ~/.netrc and the CA bundle among them), would let the CA-bundle variables override
    `verify = False`, and would send a ~/.netrc password as Basic auth with every request that
    carries no token (the guest's); nbiafs reads ~/.netrc itself, for logging in only."""

    def __init__(self, url: str, insecure: bool = False):
        super().__init__()
        self.proxies.update(requests.utils.get_environ_proxies(url))
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        self.verify = False if insecure else bundle or True
        self.trust_env = False


class NbiaClient:
    """Thread-safe client of one archive, as one user (the guest unless credentials name one).

    `api` is the version in use: the configured one, or with `auto` the one `connect()`
    found (None until then). Locking: `_lock` guards `_md5_pool` and `integrity`."""

    def __init__(self, config: ClientConfig = ClientConfig(), credentials: Credentials | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock=time.monotonic):
        self.config = config
        self._sleep = sleep
        self._clock = clock
        self.failing = False  # the last call ran out of attempts: logged once, until one succeeds
        self.http = _Session(config.root_url, insecure=not config.verify_tls)
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=config.pool_size,
                                                max_retries=0)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)
        self.http.headers["User-Agent"] = "nbiafs"
        self.root = config.root_url.rstrip("/")
        self.credentials = credentials or Credentials(GUEST)
        self.api: str | None = None if config.api == "auto" else config.api
        self.negotiated = False        # `api` was found by asking the archive
        self.auth: TokenAuth | None = None
        self._lock = threading.Lock()
        self._md5_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._zip_md5 = "IncludeMD5"   # v4: how zips get their md5hashes.csv (see open_series_zip)
        self.integrity = {"md5_checked": 0, "md5_unknown": 0, "md5_mismatches": 0}
        if self.api is not None:
            self.use_api(self.api)

    @property
    def named_user(self) -> bool:
        return self.credentials.username != GUEST

    def use_api(self, api: str, token: bool | None = None) -> None:
        """Speak `api` from now on: a token session on v2, and on v4 for a named user (or when
        `token`, for an archive that refuses the guest without one); none on v1."""
        if api not in VERSIONS:
            raise ValueError(f"api must be one of {', '.join(VERSIONS)}, not {api!r}")
        if api == "v1" and self.named_user:
            raise NotAuthorized(f"API v1 is anonymous: it cannot log in as {self.credentials.username}")
        self.api = api
        wants_token = api == "v2" or (api == "v4" and (self.named_user or bool(token)))
        if wants_token and self.auth is None:
            self.auth = TokenAuth(f"{self.root}/oauth/token", f"{self.root}/logout", self.credentials,
                                  self.http, timeout_s=self.config.timeout,
                                  margin_s=self.config.token_margin_s, clock=self._clock)
        elif not wants_token:
            self.auth = None

    @property
    def services_url(self) -> str:
        return self.version_url(self.api or "v4")

    def version_url(self, version: str) -> str:
        return f"{self.root}/services/{version}/"

    # ------------------------------------------------------------------ lifecycle
    def connect(self) -> "NbiaClient":
        """Find the API version (`auto`) and log in where a token is used. Raises
        ArchiveUnavailable, AuthenticationFailed, UntrustedCertificate or NoSuchApi."""
        if self.api is None:
            self._negotiate()
            return self._login()
        if self.api != "v2" and self._status_of(self.services_url + "getCollectionValues") in (404, 405):
            raise NoSuchApi(f"{self.root} does not speak API {self.api} (services/{self.api} answers 404); "
                            "try --api auto")
        self._login()
        if self.api == "v2" and self._status_of(self.services_url + "getCollectionValues", self.auth) in (404, 405):
            raise NoSuchApi(f"{self.root} does not speak API v2 (services/v2 answers 404); try --api auto")
        return self

    def _login(self) -> "NbiaClient":
        if self.auth is not None and not self.auth.logged_in:
            self.auth.login()
        return self

    def start(self) -> "NbiaClient":
        """`connect()`, then start the background token refresh."""
        self.connect()
        self.start_refresh()
        return self

    def start_refresh(self) -> None:
        if self.auth is not None:
            self.auth.start()

    def close(self) -> None:
        """Log out (token sessions), stop the refresh thread, close the connection pool."""
        if self.auth:
            self.auth.stop(logout=True)
        with self._lock:
            pool, self._md5_pool = self._md5_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.http.close()

    def __enter__(self) -> "NbiaClient":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def user(self) -> str | None:
        """The user the archive serves: the token's user, the guest on v4 without a token, None on v1."""
        if self.auth is not None:
            return self.auth.credentials.username
        return GUEST if self.api == "v4" else None

    @property
    def identity(self) -> str | None:
        """Whose view of the archive this is: a named user, or None for the public view (the
        guest on v4 or v2 and anonymous v1 see the same public collections)."""
        return self.credentials.username if self.named_user else None

    # ------------------------------------------------------------------ version negotiation
    def _negotiate(self) -> None:
        """v4 if it answers (no token), else v2 if the token endpoint grants one, else v1."""
        status = self._status_of(self.version_url("v4") + "getCollectionValues")
        if status not in (404, 405):
            self.use_api("v4", token=status in (401, 403))
        else:
            self.use_api("v2")
            assert self.auth is not None  # use_api("v2") starts the token session
            try:
                self.auth.login()
            except NoSuchApi:
                if self.named_user:
                    raise NoSuchApi(f"{self.root} has neither API v4 nor a token endpoint for v2: "
                                    f"it cannot log in {self.credentials.username}") from None
                if self._status_of(self.version_url("v1") + "getCollectionValues") in (404, 405):
                    raise NoSuchApi(f"no NBIA API at {self.root} (services/v4, services/v2 and "
                                    "services/v1 all answer 404)") from None
                self.use_api("v1")
        self.negotiated = True
        log.debug("the archive at %s speaks API %s", self.root, self.api)

    def _status_of(self, url: str, auth=None) -> int:
        """The HTTP status of a GET (without a token unless `auth`), retried like any call while
        the archive fails (connection errors, 5xx)."""
        def attempt(state):
            try:
                r = self.http.get(url, auth=auth, timeout=self._timeout(state))
            except requests.exceptions.SSLError as exc:
                raise UntrustedCertificate.from_ssl_error(self.root, exc) from None
            except requests.RequestException as exc:
                raise _Retry(type(exc).__name__) from None
            r.close()
            if r.status_code in RETRY_STATUSES:
                raise _Retry(f"HTTP {r.status_code}", _retry_after(r))
            return r.status_code
        # A few tries (about 1.5 s): at mount time an unreachable archive is said at once, and a
        # mount with a warm cache starts from it (mount.py) instead of waiting out a full budget.
        return self._with_retries("API version check", self.config.metadata_budget_s, attempt,
                                  attempts=VERSION_CHECK_ATTEMPTS, announce=False)

    # ------------------------------------------------------------------ transport
    def _with_retries(self, what: str, budget_s: float, attempt_fn, attempts: int | None = None,
                      announce: bool = True):
        """Run `attempt_fn()` until it returns, raising _Retry to go again; bounded in tries and time.
        `announce`: log (once) that the archive is not answering when it gives up."""
        deadline = self._clock() + budget_s
        state: dict = {"deadline": deadline}
        attempts = attempts or self.config.attempts
        for attempt in range(1, attempts + 1):
            try:
                result = attempt_fn(state)
            except _Retry as exc:
                wait = exc.retry_after_s
                if wait is None:
                    cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
                    wait = cap / 2 + random.uniform(0, cap / 2)
                if attempt == attempts or self._clock() + wait >= deadline:
                    if exc.integrity:
                        raise IntegrityError(f"{what}: {exc} (after {attempt} attempts)") from None
                    if announce and not self.failing:
                        self.failing = True
                        log.warning("the archive is not answering (%s: %s); calls fail with EIO until "
                                    "it does", what, exc)
                    raise ArchiveUnavailable(what, attempt, str(exc)) from None
                log.debug("%s: attempt %d failed (%s); retrying in %.2f s", what, attempt, exc, wait)
                self._sleep(wait)
                continue
            if self.failing:
                self.failing = False
                log.info("the archive answers again")
            return result
        raise AssertionError("unreachable: the last attempt raises")

    def _send(self, endpoint: str, params: dict, state: dict, stream: bool = False,
              version: str | None = None, form: dict | None = None) -> requests.Response:
        """One GET (or a POST of `form`). `state` lives for one call: a 401 renews the token once
        per call, and so does a 500 that a probe shows came from a dead token (v4's getSeries)."""
        url = self.version_url(version or self.api or "v4") + endpoint
        try:
            if form is not None:
                r = self.http.post(url, data=form, auth=self.auth, timeout=self._timeout(state), stream=stream)
            else:
                r = self.http.get(url, params=params, auth=self.auth, timeout=self._timeout(state), stream=stream)
        except ArchiveUnavailable as exc:  # the token endpoint did not answer: try again
            raise _Retry(str(exc)) from None
        except NbiaError:
            raise
        except requests.exceptions.SSLError as exc:
            raise UntrustedCertificate.from_ssl_error(self.config.root_url, exc) from None
        except requests.RequestException as exc:
            raise _Retry(type(exc).__name__) from None
        if self.auth is not None and not state.get("renewed") and (
                r.status_code == 401 or (r.status_code == 500 and self._dead_token(r, state))):
            status = r.status_code
            r.close()
            try:
                self.auth.renew_after_rejection(_text(r.request.headers.get("Authorization")))
            except ArchiveUnavailable as exc:  # not renewed: the next attempt may renew
                raise _Retry(str(exc)) from None
            state["renewed"] = True
            raise _Retry(f"HTTP {status}; token renewed", retry_after_s=0.0)
        if r.status_code in RETRY_STATUSES:
            r.close()
            raise _Retry(f"HTTP {r.status_code}", _retry_after(r) if r.status_code in (429, 503) else None)
        return r

    def _dead_token(self, r: requests.Response, state: dict) -> bool:
        """A 500 with a token may be v4's answer to a dead token: probe once per call."""
        if state.get("probed"):
            return False
        state["probed"] = True
        header = _text(r.request.headers.get("Authorization")) or ""
        try:
            return not self._probe(header, state)
        except _Retry:
            return False

    def _timeout(self, state: dict) -> tuple[float, float]:
        """Connect and read timeouts, cut to what is left of the call's budget."""
        left = max(0.05, state["deadline"] - self._clock())
        return (min(self.config.connect_timeout_s, left), min(self.config.read_timeout_s, left))

    def _query(self, endpoint: str, version: str | None = None, form: dict | None = None, **params) -> list:
        """A metadata query: the parsed JSON rows, [] for an empty (verified) answer."""
        params = {k: v for k, v in params.items() if v is not None}
        seen: dict = {}
        rows = self._with_retries(endpoint, self.config.metadata_budget_s,
                                  lambda state: self._query_once(endpoint, params, state, version, form, seen))
        if rows or self.auth is None or version == "v1":
            return rows
        return self._verify_empty(endpoint, params, version, form, seen)

    def _query_once(self, endpoint: str, params: dict, state: dict, version: str | None = None,
                    form: dict | None = None, seen: dict | None = None) -> list:
        """One attempt; an empty answer notes in `seen["empty_with"]` the Authorization it
        came with (the token to prove alive before the answer stands)."""
        r = self._send(endpoint, params, state, version=version, form=form)
        if r.status_code == 204 or (r.status_code == 200 and not r.content.strip()):
            if seen is not None:
                seen["empty_with"] = _text(r.request.headers.get("Authorization"))
            return []
        if r.status_code == 400:
            text = r.text.strip()[:300]
            if text.startswith(("Invalid query parameter", "Invalid form parameter")):
                raise RejectedParameter(f"{endpoint}: the archive rejected a parameter nbiafs sent "
                                        f"({text}); please report this")
            raise NotFound(f"{endpoint}: {text[:200]}")
        if r.status_code == 403:
            raise NotAuthorized(f"{endpoint}: refused by the archive")
        if r.status_code == 404:
            raise NotFound(f"{endpoint}: no such endpoint at this archive")
        if r.status_code != 200:
            raise _Retry(f"HTTP {r.status_code}")
        try:
            rows = r.json()
        except ValueError:
            raise _Retry("malformed JSON", integrity=True) from None
        if isinstance(rows, dict):
            rows = [rows]
        if not isinstance(rows, list):
            raise _Retry("unexpected JSON shape", integrity=True)
        return rows

    def _verify_empty(self, endpoint: str, params: dict, version: str | None = None,
                      form: dict | None = None, seen: dict | None = None) -> list:
        """An empty answer may come from a dead token: prove alive the token it came with
        (`seen["empty_with"]`; not the session's current one, which another thread may have
        renewed meanwhile), or renew and ask again; all within one metadata budget (a token
        endpoint that is down for a moment is retried, never turned into an empty listing)."""
        auth = self.auth
        assert auth is not None  # only token sessions verify empty answers
        seen = {} if seen is None else seen

        def attempt(state):
            try:
                header = seen.get("empty_with") or f"Bearer {auth.current_token()}"
                if self._probe(header, state):
                    return []  # the token it came with is alive: the empty answer stands
                log.info("an empty answer came with a dead token; renewing and asking again")
                auth.renew_after_rejection(header)
            except ArchiveUnavailable as exc:  # the token endpoint did not answer
                raise _Retry(str(exc)) from None
            again = self._query_once(endpoint, params, state, version, form, seen)
            if again:
                return again
            raise _Retry("empty again after renewal: checking the token it came with", retry_after_s=0.0)
        return self._with_retries(endpoint, self.config.metadata_budget_s, attempt)

    def _probe(self, header: str, state: dict) -> bool:
        try:
            r = self.http.get(self.services_url + "getCollectionValues", headers={"Authorization": header},
                              timeout=self._timeout(state))
        except requests.exceptions.SSLError as exc:
            raise UntrustedCertificate.from_ssl_error(self.config.root_url, exc) from None
        except requests.RequestException as exc:
            raise _Retry(type(exc).__name__) from None
        if r.status_code in RETRY_STATUSES and r.status_code != 500:
            raise _Retry(f"HTTP {r.status_code}")
        return r.status_code == 200 and bool(r.content.strip())

    # ------------------------------------------------------------------ metadata endpoints
    def get_collection_values(self) -> list[str]:
        return models.values(self._query("getCollectionValues"), "Collection")

    def get_modality_values(self, collection=None, body_part=None) -> list[str]:
        rows = self._query("getModalityValues", Collection=collection, BodyPartExamined=body_part)
        return models.values(rows, "Modality")

    def get_body_part_values(self, collection=None, modality=None) -> list[str]:
        rows = self._query("getBodyPartValues", Collection=collection, Modality=modality)
        return models.values(rows, "BodyPartExamined")

    def get_manufacturer_values(self, collection=None, modality=None, body_part=None) -> list[str]:
        rows = self._query("getManufacturerValues", Collection=collection, Modality=modality,
                           BodyPartExamined=body_part)
        return models.values(rows, "Manufacturer")

    def get_patients(self, collection=None, patient_id=None) -> list[models.Patient]:
        # `PatientId` (lower d) in the getPatient family on every version; v4 refuses `PatientID` here.
        rows = self._query("getPatient", Collection=collection, PatientId=patient_id)
        return models.parse_rows(rows, models.Patient.parse)

    def get_patients_by_modality(self, collection: str, modality: str) -> list[str]:
        rows = self._query("getPatientByCollectionAndModality", Collection=collection, Modality=modality)
        return [p.patient_id for p in models.parse_rows(rows, models.Patient.parse)]

    def _since(self, since: str) -> dict:
        """The release-date filter of New*: v4 `fromDate=MM-DD-YYYY`, v1/v2 `Date=yyyy/MM/dd`."""
        day = dt.date.fromisoformat(since)
        if self.api == "v4":
            return {"fromDate": day.strftime("%m-%d-%Y")}
        return {"Date": day.strftime("%Y/%m/%d")}

    def new_patients_in_collection(self, collection: str, since: str) -> list[models.Patient]:
        """Patients with data released on or after `since` (YYYY-MM-DD)."""
        rows = self._query("NewPatientsInCollection", Collection=collection, **self._since(since))
        return models.parse_rows(rows, models.Patient.parse)

    def get_patient_studies(self, collection=None, patient_id=None, study_uid=None) -> list[models.Study]:
        rows = self._query("getPatientStudy", Collection=collection, PatientID=patient_id,
                           StudyInstanceUID=study_uid)
        return models.parse_rows(rows, models.Study.parse)

    def new_studies_in_patient_collection(self, collection: str, since: str,
                                          patient_id=None) -> list[models.Study]:
        rows = self._query("NewStudiesInPatientCollection", Collection=collection,
                           PatientID=patient_id, **self._since(since))
        return models.parse_rows(rows, models.Study.parse)

    def get_series(self, collection=None, patient_id=None, study_uid=None, series_uid=None,
                   modality=None, body_part=None, manufacturer=None,
                   manufacturer_model=None) -> list[models.Series]:
        rows = self._query("getSeries", Collection=collection, PatientID=patient_id,
                           StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                           Modality=modality, BodyPartExamined=body_part, Manufacturer=manufacturer,
                           ManufacturerModelName=manufacturer_model)
        return models.parse_rows(rows, models.Series.parse)

    def get_updated_series(self, since: str) -> list[models.Series]:
        """Series released on or after `since` (YYYY-MM-DD): v1/v2 take `dd/MM/yyyy` (on or after),
        v4 `MM-DD-YYYY` (strictly after, so the day before is sent)."""
        day = dt.date.fromisoformat(since)
        if self.api == "v4":
            value = (day - dt.timedelta(days=1)).strftime("%m-%d-%Y")
        else:
            value = day.strftime("%d/%m/%Y")
        return models.parse_rows(self._query("getUpdatedSeries", fromDate=value), models.Series.parse)

    def get_sop_instance_uids(self, series_uid: str) -> list[str]:
        return models.values(self._query("getSOPInstanceUIDs", SeriesInstanceUID=series_uid),
                             "SOPInstanceUID")

    def get_series_size(self, series_uid: str) -> models.SeriesSize | None:
        rows = models.parse_rows(self._query("getSeriesSize", SeriesInstanceUID=series_uid),
                                 models.SeriesSize.parse)
        return rows[0] if rows else None

    def get_series_metadata(self, series_uids) -> list[models.Series]:
        """The records of many series at once, in the one shape: on v4 `POST getSeriesMetadata`
        (10,000 UIDs a request); on v1/v2 `getSeriesMetaData` one series at a time. UIDs the
        archive does not show this user are simply absent."""
        uids = list(dict.fromkeys(series_uids))
        if self.api != "v4":
            out = []
            for uid in uids:
                rows = self._query("getSeriesMetaData", SeriesInstanceUID=uid)
                out += models.parse_rows(rows, models.Series.parse)
            return out
        out = []
        for i in range(0, len(uids), METADATA_BATCH):
            form = {"list": ",".join(uids[i:i + METADATA_BATCH]), "format": "json"}
            out += models.parse_rows(self._query("getSeriesMetadata", form=form), models.Series.parse)
        return out

    def series_records(self, series_uids, connections: int = 8) -> list[models.Series]:
        """Full series records of many UIDs in the fewest requests the version allows: v4's bulk
        getSeriesMetadata, else one getSeries?SeriesInstanceUID= per UID, `connections` at a time."""
        uids = list(dict.fromkeys(series_uids))
        if self.api == "v4":
            return self.get_series_metadata(uids)
        with concurrent.futures.ThreadPoolExecutor(connections, "nbia-series") as pool:
            found = pool.map(lambda uid: [s for s in self.get_series(series_uid=uid) if s.series_uid == uid], uids)
            return [s for rows in found for s in rows]

    def get_contents_by_name(self, cart: str) -> list[models.Series]:
        """A shared cart. getContentsByName was never moved to v4 (tcia-utils asks v1 too): on v4
        it is asked on v2 with a token session, else on v1."""
        version = None if self.api != "v4" else ("v2" if self.auth is not None else "v1")
        try:
            rows = self._query("getContentsByName", version=version, name=cart)
        except NotFound as exc:
            if "no such endpoint" not in str(exc):
                raise
            raise NoSuchApi(f"shared carts are read with getContentsByName, which TCIA never moved to API v4, "
                            f"and this archive does not serve {version or self.api}") from None
        return models.parse_rows(rows, models.Series.parse)

    def get_md5(self, sop_uid: str) -> str | None:
        """The archive's md5 of one instance (v4 getMD5HashForImage), None where it has none."""
        if self.api != "v4":
            return None
        return self._with_retries("getMD5HashForImage", self.config.metadata_budget_s,
                                  lambda state: self._md5_once(sop_uid, state))

    def _md5_once(self, sop_uid: str, state: dict) -> str | None:
        r = self._send("getMD5HashForImage", {"SOPInstanceUID": sop_uid}, state)
        text = r.text.strip() if r.status_code == 200 else ""
        if r.status_code == 400 and r.text.startswith("Invalid query parameter"):
            raise RejectedParameter(f"getMD5HashForImage: {r.text.strip()[:200]}")
        return text.lower() if MD5_HEX.match(text) else None

    # ------------------------------------------------------------------ images
    def get_single_image(self, series_uid: str, sop_uid: str, dest: BinaryIO,
                         verify_md5: bool | None = None) -> int:
        """Stream one instance into `dest` (truncated first on every attempt); return its size.

        The body must be as long as Content-Length says and carry `DICM` at offset 128; on v4
        (unless `verify_md5` is False, or `ClientConfig.verify_md5`) its md5 must also equal the
        archive's getMD5HashForImage, asked at the same time as the image so that the check
        costs no round trip. Otherwise IntegrityError after the retries. On any error `dest`
        holds no valid data and must be discarded by the caller.
        """
        params = {"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid}
        verify = self.config.verify_md5 if verify_md5 is None else verify_md5
        md5 = [self._md5_pool_submit(sop_uid)] if verify and self.api == "v4" else None
        return self._with_retries("getSingleImage", self.config.image_budget_s,
                                  lambda state: self._single_image_once(params, dest, state, md5))

    def _md5_pool_submit(self, sop_uid: str) -> concurrent.futures.Future:
        return self._in_md5_pool(self._md5_attempt, sop_uid)

    def _in_md5_pool(self, fn, *args) -> concurrent.futures.Future:
        with self._lock:
            if self._md5_pool is None:  # made on first use: after the daemon has forked
                self._md5_pool = concurrent.futures.ThreadPoolExecutor(self.config.pool_size, "nbia-md5")
            return self._md5_pool.submit(fn, *args)

    def md5_request(self, sop_uid: str, always: bool = False) -> concurrent.futures.Future | None:
        """The archive's md5 of one instance, asked in the background (one try, within the read
        timeout): a future of the md5, of None where the archive has none, or of the error that
        kept it from answering. None when there is nothing to ask (not v4, or md5 checks off
        and not `always`: bytes from another source than the archive are always checked)."""
        if self.api != "v4" or not (self.config.verify_md5 or always):
            return None
        return self._in_md5_pool(
            lambda: self._md5_once(sop_uid, {"deadline": self._clock() + self.config.read_timeout_s}))

    def _md5_attempt(self, sop_uid: str) -> str | None:
        """One try at the archive's md5: it only adds a check, so it never delays an image for
        long nor fails one (a failed md5 request is an unknown md5)."""
        try:
            return self._md5_once(sop_uid, {"deadline": self._clock() + self.config.read_timeout_s})
        except (_Retry, NbiaError) as exc:
            log.debug("md5 of %s not available (%s)", sop_uid, exc)
            return None

    def _single_image_once(self, params: dict, dest: BinaryIO, state: dict,
                           md5: list | None = None) -> int:
        """One attempt; `md5` holds the future of the archive's md5 (asked again after a
        mismatch: either side may have been wrong)."""
        dest.seek(0)
        dest.truncate()
        started = self._clock()
        r = self._send("getSingleImage", params, state, stream=True)
        hasher = hashlib.md5() if md5 is not None else None
        with r:
            self._raise_for_download(r, "getSingleImage")
            expected = r.headers.get("Content-Length")
            size = self._copy_body(r, dest, hasher)
        if expected is not None and size != int(expected):
            raise _Retry(f"body of {size} bytes, Content-Length {expected}", integrity=True)
        dest.seek(DICOM_MAGIC_OFFSET)
        if dest.read(4) != b"DICM":
            raise _Retry("not a DICOM Part-10 file (no DICM at offset 128)", integrity=True)
        dest.seek(0, os.SEEK_END)
        if md5 is not None and hasher is not None:
            try:
                self._check_md5(md5[0], hasher.hexdigest(), self._clock() - started, state, params["SOPInstanceUID"])
            except _Retry:
                md5[0] = self._md5_pool_submit(params["SOPInstanceUID"])
                raise
        return size

    def _check_md5(self, md5: concurrent.futures.Future, actual: str, took_s: float, state: dict,
                   sop_uid: str) -> None:
        """Compare with the archive's md5 once it is here: waited for as long as the image took
        (at least MD5_WAIT_MIN_S, never past the call's budget); an md5 that does not come in
        time, or that the archive does not have, leaves the other checks in force."""
        wait = min(max(MD5_WAIT_MIN_S, took_s), max(0.0, state["deadline"] - self._clock()))
        try:
            expected = md5.result(timeout=wait)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            expected = None
        with self._lock:
            if expected is None:
                self.integrity["md5_unknown"] += 1
                return
            if expected != actual:
                self.integrity["md5_mismatches"] += 1
            else:
                self.integrity["md5_checked"] += 1
        if expected != actual:
            log.warning("instance %s: md5 %s, but the archive's is %s; fetching it again", sop_uid,
                        actual, expected)
            raise _Retry("md5 differs from the archive's getMD5HashForImage", integrity=True)

    def get_single_image_bytes(self, series_uid: str, sop_uid: str) -> bytes:
        with tempfile.TemporaryFile() as tmp:
            self.get_single_image(series_uid, sop_uid, tmp)
            tmp.seek(0)
            return tmp.read()

    def _zip_request(self, series_uid: str, with_md5: bool, new_file_names: bool = False) -> tuple[str, dict]:
        """(endpoint, params) of a series zip; with `with_md5` one that ends with md5hashes.csv:
        v4 `getImage?IncludeMD5=Yes` (keeps LICENSE and the names asked for), or, on a v4 build
        that refuses that parameter and on v1/v2, getImageWithMD5Hash."""
        params = {"SeriesInstanceUID": series_uid}
        if with_md5 and (self.api != "v4" or self._zip_md5 != "IncludeMD5"):
            return "getImageWithMD5Hash", params
        if new_file_names:
            params["NewFileNames"] = "Yes"
        if with_md5:
            params["IncludeMD5"] = "Yes"
        return "getImage", params

    def _zip_with_fallback(self, series_uid: str, with_md5: bool, new_file_names: bool, run):
        endpoint, params = self._zip_request(series_uid, with_md5, new_file_names)
        try:
            return run(endpoint, params)
        except RejectedParameter:
            if "IncludeMD5" not in params:
                raise
            log.info("this archive's getImage does not take IncludeMD5: zips come from getImageWithMD5Hash")
            self._zip_md5 = "WithMD5Hash"
            endpoint, params = self._zip_request(series_uid, with_md5, new_file_names)
            return run(endpoint, params)

    def download_series_zip(self, series_uid: str, dest: Path, new_file_names: bool = False,
                            with_md5: bool = False) -> int:
        """Stream a series zip to `dest` (see `_zip_request`); return its size.

        Written to a temporary file beside `dest` and renamed into place, so `dest`
        never holds a partial zip. Checking the entries is the caller's job: a zip cut
        short by the server still ends with 200.
        """
        dest = Path(dest)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".partial-", suffix=".zip")
        try:
            with os.fdopen(fd, "w+b") as tmp:
                size = self._zip_with_fallback(series_uid, with_md5, new_file_names, lambda endpoint, params: (
                    self._with_retries(endpoint, self.config.image_budget_s * 10,
                                       lambda state: self._zip_once(endpoint, params, tmp, state))))
            os.replace(tmp_name, dest)
            return size
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)

    def open_series_zip(self, series_uid: str, with_md5: bool = False):
        """Start a zip of the series (see `_zip_request`); return the streaming response (use as
        a context manager and read `iter_content`). Retries until the answer starts; the body is
        the caller's to check (a zip cut short still ends with 200)."""
        def run(endpoint, params):
            def start(state):
                r = self._send(endpoint, params, state, stream=True)
                try:
                    self._raise_for_download(r, endpoint)
                except BaseException:
                    r.close()
                    raise
                return r
            return self._with_retries(endpoint, self.config.image_budget_s, start)
        return self._zip_with_fallback(series_uid, with_md5, False, run)

    def _zip_once(self, endpoint: str, params: dict, dest: BinaryIO, state: dict) -> int:
        dest.seek(0)
        dest.truncate()
        r = self._send(endpoint, params, state, stream=True)
        with r:
            self._raise_for_download(r, endpoint)
            return self._copy_body(r, dest)

    def _raise_for_download(self, r: requests.Response, endpoint: str) -> None:
        if r.status_code == 200:
            ctype = r.headers.get("Content-Type", "")
            if ctype.startswith("text/html"):
                raise _Retry("an HTML page instead of data", integrity=True)
            return
        if r.status_code == 400:
            text = r.text.strip()[:200]
            if text.startswith("Invalid query parameter"):
                raise RejectedParameter(f"{endpoint}: {text}")
            if "not been granted" in text:
                raise NotAuthorized(f"{endpoint}: {text}")
            raise NotFound(f"{endpoint}: {text}")
        if r.status_code == 401:
            raise NotAuthorized(f"{endpoint}: the archive rejected the token")
        raise _Retry(f"HTTP {r.status_code}")

    @staticmethod
    def _copy_body(r: requests.Response, dest: BinaryIO, hasher=None) -> int:
        size = 0
        try:
            for block in r.iter_content(STREAM_CHUNK):
                dest.write(block)
                size += len(block)
                if hasher is not None:
                    hasher.update(block)
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            raise _Retry(f"body cut short after {size} bytes ({type(exc).__name__})",
                         integrity=True) from None
        dest.flush()
        return size
