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

v2 quirks handled here (shared/nbia-api.md): an expired or invalid token makes a
query answer an empty 200 that looks like "no data". An empty answer is
therefore checked: the same token asks getCollectionValues, which is never
empty for a live token; if that is empty too, the token is renewed and the
query asked again, and that answer is the one returned. (Tokens only ever go
from valid to invalid, so a token that passes the check was valid for the query.)
A 401 on a download renews the token once and retries.

This module is the only one that imports `requests`, with auth.py.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import requests
import requests.adapters

from nbiafs.api import models
from nbiafs.api.auth import Credentials, TokenAuth
from nbiafs.errors import (ArchiveUnavailable, IntegrityError, NbiaError, NotAuthorized, NotFound,
                           UntrustedCertificate)

log = logging.getLogger(__name__)

PRODUCTION_ROOT = "https://services.cancerimagingarchive.net/nbia-api"
NLST_ROOT = "https://nlst.cancerimagingarchive.net/nbia-api"
PRESETS = {"tcia": PRODUCTION_ROOT, "nlst": NLST_ROOT}
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
DICOM_MAGIC_OFFSET = 128
STREAM_CHUNK = 256 * 1024


@dataclass(frozen=True)
class ClientConfig:
    root_url: str = PRODUCTION_ROOT
    api: str = "v2"                      # "v2" (token) or "v1" (anonymous, public only)
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

    def __post_init__(self):
        if self.api not in ("v1", "v2"):
            raise ValueError(f"api must be v1 or v2, not {self.api!r}")

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout_s, self.read_timeout_s)


class _Retry(Exception):
    """One attempt failed in a way worth trying again."""

    def __init__(self, reason: str, retry_after_s: float | None = None, integrity: bool = False):
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        self.integrity = integrity  # the body was wrong (short, malformed), not missing


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class _Session(requests.Session):
    """A session whose `insecure` really turns verification off: requests lets the
    REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE environment override `Session.verify = False`."""

    def __init__(self, insecure: bool = False):
        super().__init__()
        self.insecure = insecure

    def request(self, *args, **kwargs):
        if self.insecure:
            kwargs["verify"] = False
        return super().request(*args, **kwargs)


class NbiaClient:
    """Thread-safe client of one archive, as one user."""

    def __init__(self, config: ClientConfig = ClientConfig(), credentials: Credentials | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock=time.monotonic):
        self.config = config
        self._sleep = sleep
        self._clock = clock
        self.failing = False  # the last call ran out of attempts: logged once, until one succeeds
        self.http = _Session(insecure=not config.verify_tls)
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=config.pool_size,
                                                max_retries=0)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)
        self.http.headers["User-Agent"] = "nbiafs"
        root = config.root_url.rstrip("/")
        self.services_url = f"{root}/services/{config.api}/"
        self.auth: TokenAuth | None = None
        if config.api == "v2":
            self.auth = TokenAuth(f"{root}/oauth/token", f"{root}/logout",
                                  credentials or Credentials("nbia_guest"), self.http,
                                  timeout_s=config.timeout, margin_s=config.token_margin_s,
                                  clock=clock)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "NbiaClient":
        """Log in (v2) and start the background token refresh."""
        if self.auth:
            self.auth.login()
            self.auth.start()
        return self

    def close(self) -> None:
        """Log out (v2), stop the refresh thread, close the connection pool."""
        if self.auth:
            self.auth.stop(logout=True)
        self.http.close()

    def __enter__(self) -> "NbiaClient":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def user(self) -> str | None:
        return self.auth.credentials.username if self.auth else None

    # ------------------------------------------------------------------ transport
    def _with_retries(self, what: str, budget_s: float, attempt_fn):
        """Run `attempt_fn()` until it returns, raising _Retry to go again; bounded in tries and time."""
        deadline = self._clock() + budget_s
        state: dict = {"deadline": deadline}
        for attempt in range(1, self.config.attempts + 1):
            try:
                result = attempt_fn(state)
            except _Retry as exc:
                wait = exc.retry_after_s
                if wait is None:
                    cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
                    wait = cap / 2 + random.uniform(0, cap / 2)
                if attempt == self.config.attempts or self._clock() + wait >= deadline:
                    if exc.integrity:
                        raise IntegrityError(f"{what}: {exc} (after {attempt} attempts)") from None
                    if not self.failing:
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

    def _send(self, endpoint: str, params: dict, state: dict, stream: bool = False) -> requests.Response:
        """One GET. `state` lives for one call: a 401 renews the token once per call."""
        try:
            r = self.http.get(self.services_url + endpoint, params=params, auth=self.auth,
                              timeout=self._timeout(state), stream=stream)
        except ArchiveUnavailable as exc:  # the token endpoint did not answer: try again
            raise _Retry(str(exc)) from None
        except NbiaError:
            raise
        except requests.exceptions.SSLError as exc:
            raise UntrustedCertificate.from_ssl_error(self.config.root_url, exc) from None
        except requests.RequestException as exc:
            raise _Retry(type(exc).__name__) from None
        if r.status_code == 401 and self.auth is not None and not state.get("renewed"):
            r.close()
            try:
                self.auth.renew_after_rejection(r.request.headers.get("Authorization"))
            except ArchiveUnavailable as exc:  # not renewed: the next attempt may renew
                raise _Retry(str(exc)) from None
            state["renewed"] = True
            raise _Retry("HTTP 401; token renewed", retry_after_s=0.0)
        if r.status_code in RETRY_STATUSES:
            r.close()
            raise _Retry(f"HTTP {r.status_code}", _retry_after(r) if r.status_code in (429, 503) else None)
        return r

    def _timeout(self, state: dict) -> tuple[float, float]:
        """Connect and read timeouts, cut to what is left of the call's budget."""
        left = max(0.05, state["deadline"] - self._clock())
        return (min(self.config.connect_timeout_s, left), min(self.config.read_timeout_s, left))

    def _query(self, endpoint: str, **params) -> list:
        """A metadata query: the parsed JSON rows, [] for an empty (verified) answer."""
        params = {k: v for k, v in params.items() if v is not None}
        rows = self._with_retries(endpoint, self.config.metadata_budget_s,
                                  lambda state: self._query_once(endpoint, params, state))
        if rows or self.auth is None:
            return rows
        return self._verify_empty(endpoint, params)

    def _query_once(self, endpoint: str, params: dict, state: dict) -> list:
        r = self._send(endpoint, params, state)
        if r.status_code == 204 or (r.status_code == 200 and not r.content.strip()):
            return []
        if r.status_code == 400:
            raise NotFound(f"{endpoint}: {r.text.strip()[:200]}")
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

    def _verify_empty(self, endpoint: str, params: dict) -> list:
        """An empty v2 answer may come from a dead token: prove the token alive, or renew and
        ask again; all within one metadata budget (a token endpoint that is down for a moment
        is retried, never turned into an empty listing)."""
        def attempt(state):
            try:
                header = f"Bearer {self.auth.current_token()}"
                if self._probe(header, state):
                    return []  # a live token: the empty answer stands
                log.info("an empty answer came with a dead token; renewing and asking again")
                self.auth.renew_after_rejection(header)
            except ArchiveUnavailable as exc:  # the token endpoint did not answer
                raise _Retry(str(exc)) from None
            again = self._query_once(endpoint, params, state)
            if again:
                return again
            raise _Retry("empty again after renewal: checking the new token", retry_after_s=0.0)
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
        rows = self._query("getPatient", Collection=collection, PatientID=patient_id)
        return models.parse_rows(rows, models.Patient.parse)

    def get_patients_by_modality(self, collection: str, modality: str) -> list[str]:
        rows = self._query("getPatientByCollectionAndModality", Collection=collection, Modality=modality)
        return [p.patient_id for p in models.parse_rows(rows, models.Patient.parse)]

    def new_patients_in_collection(self, collection: str, since: str) -> list[models.Patient]:
        """`since` as YYYY-MM-DD (sent as the API's yyyy/MM/dd)."""
        rows = self._query("NewPatientsInCollection", Collection=collection, Date=since.replace("-", "/"))
        return models.parse_rows(rows, models.Patient.parse)

    def get_patient_studies(self, collection=None, patient_id=None, study_uid=None) -> list[models.Study]:
        rows = self._query("getPatientStudy", Collection=collection, PatientID=patient_id,
                           StudyInstanceUID=study_uid)
        return models.parse_rows(rows, models.Study.parse)

    def new_studies_in_patient_collection(self, collection: str, since: str,
                                          patient_id=None) -> list[models.Study]:
        rows = self._query("NewStudiesInPatientCollection", Collection=collection,
                           PatientID=patient_id, Date=since.replace("-", "/"))
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
        """`since` as YYYY-MM-DD (sent as the API's dd/MM/yyyy)."""
        y, m, d = since.split("-")
        return models.parse_rows(self._query("getUpdatedSeries", fromDate=f"{d}/{m}/{y}"),
                                 models.Series.parse)

    def get_sop_instance_uids(self, series_uid: str) -> list[str]:
        return models.values(self._query("getSOPInstanceUIDs", SeriesInstanceUID=series_uid),
                             "SOPInstanceUID")

    def get_series_size(self, series_uid: str) -> models.SeriesSize | None:
        rows = models.parse_rows(self._query("getSeriesSize", SeriesInstanceUID=series_uid),
                                 models.SeriesSize.parse)
        return rows[0] if rows else None

    def get_series_metadata(self, series_uid: str) -> models.SeriesMetadata | None:
        rows = models.parse_rows(self._query("getSeriesMetaData", SeriesInstanceUID=series_uid),
                                 models.SeriesMetadata.parse)
        return rows[0] if rows else None

    def get_contents_by_name(self, cart: str) -> list[models.Series]:
        return models.parse_rows(self._query("getContentsByName", name=cart), models.Series.parse)

    # ------------------------------------------------------------------ images
    def get_single_image(self, series_uid: str, sop_uid: str, dest: BinaryIO) -> int:
        """Stream one instance into `dest` (truncated first on every attempt); return its size.

        The body must be as long as Content-Length says and carry `DICM` at offset 128;
        otherwise IntegrityError after the retries. On any error `dest` holds no valid
        data and must be discarded by the caller.
        """
        params = {"SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid}
        return self._with_retries("getSingleImage", self.config.image_budget_s,
                                  lambda state: self._single_image_once(params, dest, state))

    def _single_image_once(self, params: dict, dest: BinaryIO, state: dict) -> int:
        dest.seek(0)
        dest.truncate()
        r = self._send("getSingleImage", params, state, stream=True)
        with r:
            self._raise_for_download(r, "getSingleImage")
            expected = r.headers.get("Content-Length")
            size = self._copy_body(r, dest)
        if expected is not None and size != int(expected):
            raise _Retry(f"body of {size} bytes, Content-Length {expected}", integrity=True)
        dest.seek(DICOM_MAGIC_OFFSET)
        if dest.read(4) != b"DICM":
            raise _Retry("not a DICOM Part-10 file (no DICM at offset 128)", integrity=True)
        dest.seek(0, os.SEEK_END)
        return size

    def get_single_image_bytes(self, series_uid: str, sop_uid: str) -> bytes:
        with tempfile.TemporaryFile() as tmp:
            self.get_single_image(series_uid, sop_uid, tmp)
            tmp.seek(0)
            return tmp.read()

    def download_series_zip(self, series_uid: str, dest: Path, new_file_names: bool = False,
                            with_md5: bool = False) -> int:
        """Stream a series zip (getImage or getImageWithMD5Hash) to `dest`; return its size.

        Written to a temporary file beside `dest` and renamed into place, so `dest`
        never holds a partial zip. Checking the entries is the caller's job: a zip cut
        short by the server still ends with 200.
        """
        endpoint = "getImageWithMD5Hash" if with_md5 else "getImage"
        params = {"SeriesInstanceUID": series_uid}
        if new_file_names and not with_md5:
            params["NewFileNames"] = "Yes"
        dest = Path(dest)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".partial-", suffix=".zip")
        try:
            with os.fdopen(fd, "w+b") as tmp:
                size = self._with_retries(endpoint, self.config.image_budget_s * 10,
                                          lambda state: self._zip_once(endpoint, params, tmp, state))
            os.replace(tmp_name, dest)
            return size
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)

    def open_series_zip(self, series_uid: str):
        """Start a getImage zip of the series; return the streaming response (use as a context
        manager and read `iter_content`). Retries until the answer starts; the body is the
        caller's to check (a zip cut short still ends with 200)."""
        params = {"SeriesInstanceUID": series_uid}

        def start(state):
            r = self._send("getImage", params, state, stream=True)
            try:
                self._raise_for_download(r, "getImage")
            except BaseException:
                r.close()
                raise
            return r
        return self._with_retries("getImage", self.config.image_budget_s, start)

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
            if "not been granted" in text:
                raise NotAuthorized(f"{endpoint}: {text}")
            raise NotFound(f"{endpoint}: {text}")
        if r.status_code == 401:
            raise NotAuthorized(f"{endpoint}: the archive rejected the token")
        raise _Retry(f"HTTP {r.status_code}")

    @staticmethod
    def _copy_body(r: requests.Response, dest: BinaryIO) -> int:
        size = 0
        try:
            for block in r.iter_content(STREAM_CHUNK):
                dest.write(block)
                size += len(block)
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            raise _Retry(f"body cut short after {size} bytes ({type(exc).__name__})",
                         integrity=True) from None
        dest.flush()
        return size
