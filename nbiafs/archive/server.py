"""The local NBIA-compatible archive: a threaded HTTP server on loopback.

Answers `/nbia-api/services/v1|v2|v4/<Endpoint>`, `/nbia-api/oauth/token` and
`/nbia-api/logout` with the shapes, quirks and status codes of the production
server (v1/v2: shared/nbia-api.md; v4: shared/nbia-api-v4.md and `v4.py`),
applies the current `Faults`, and counts requests per endpoint, per version and
per token grant. `versions` chooses what is served (`("v4",)`: v4 only, as
production may soon be); the others answer 404. Test control lives under `/_nbiafs/`
(counters, faults), which the real server does not have.

Use from Python::

    with LocalArchive.from_spec("test") as archive:
        archive.url              # http://127.0.0.1:PORT/nbia-api
        archive.set_faults(image_outage=True)
        archive.counters()
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import html
import io
import json
import logging
import random
import shutil
import ssl
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape as xml_escape

from nbiafs.archive import endpoints, v4
from nbiafs.archive.faults import IMAGE_ENDPOINTS, Faults, Throttle, pace
from nbiafs.archive.records import ArchiveIndex, Instance, Series
from nbiafs.archive.tokens import InvalidGrant, TokenStore
from nbiafs.archive.zipwriter import DeflateStore, ZipStreamWriter

log = logging.getLogger(__name__)

SERVER_ERROR_BODY = b"Server was not able to process your request\nnull"  # 48 bytes, text/plain
CHUNK = 64 * 1024          # file reads
WIRE_CHUNK = 16 * 1024     # what goes on the wire at once: paced links see a steady stream
# Endpoints that answer 500 (not an empty 200) to a v2 request without a token.
TOKEN_REQUIRED = IMAGE_ENDPOINTS | {"getCollectionValues"}
FORMATS = {"json": "application/json", "csv": "text/csv", "xml": "application/xml",
           "html": "text/html"}
VERSIONS = ("v1", "v2", "v4")
THUMBNAIL_SIDE = 512


class _Stop(Exception):
    """The request ends here without an answer (stall, cut connection)."""


class LocalArchive:
    """The server, its index, tokens, faults and counters; start()/stop() or a with-block."""

    def __init__(self, index: ArchiveIndex, tokens: TokenStore | None = None,
                 faults: Faults | None = None, host: str = "127.0.0.1", port: int = 0,
                 seed: int = 0, tls: "ssl.SSLContext | None" = None, versions=VERSIONS):
        self.index = index
        self._versions = self._checked_versions(versions)
        self.param_check = v4.ParameterCheck()
        self.tokens = tokens or TokenStore()
        self._faults = faults or Faults()
        # guards _faults, _rng, _counts, _by_*, _instances, _image_bytes, _total_link, _versions
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._counts: Counter = Counter()
        self._by_token: Counter = Counter()
        self._by_version: Counter = Counter()
        self._instances: Counter = Counter()  # SOPInstanceUID -> times its bytes were sent
        self._image_bytes = 0                 # bytes of image answers (single images and zips)
        self._in_flight = 0                   # API requests being answered now, and the most at once
        self._max_in_flight = 0
        self._total_link: Throttle | None = None
        self._stopping = threading.Event()
        self._own_deflate_dir = index.deflate_dir is None
        self.deflated = DeflateStore(index.deflate_dir or Path(tempfile.mkdtemp(prefix="nbiafs-deflate-")))
        self._httpd = _Server((host, port), _Handler)
        self._httpd.archive = self
        self.tls = tls is not None  # https, e.g. with a self-signed certificate (TLS tests)
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self._thread: threading.Thread | None = None
        self._apply_total_link()

    @classmethod
    def from_spec(cls, spec="test", data_root: Path | None = None, **kw) -> "LocalArchive":
        from nbiafs.archive.content import load_synthetic
        return cls(load_synthetic(spec, data_root), **kw)

    # ------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        return f"{'https' if self.tls else 'http'}://{host}:{port}/nbia-api"

    def start(self) -> "LocalArchive":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="nbia-archive",
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        if self._own_deflate_dir:
            shutil.rmtree(self.deflated.directory, ignore_errors=True)

    def __enter__(self) -> "LocalArchive":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ versions
    @staticmethod
    def _checked_versions(versions) -> frozenset:
        chosen = frozenset(versions)
        if not chosen or not chosen <= set(VERSIONS):
            raise ValueError(f"versions: choose from {', '.join(VERSIONS)}, not {', '.join(sorted(chosen)) or 'none'}")
        return chosen

    @property
    def versions(self) -> frozenset:
        with self._lock:
            return self._versions

    def set_versions(self, *versions: str) -> None:
        """Serve only these API versions from now on (the others answer 404)."""
        chosen = self._checked_versions(versions)
        with self._lock:
            self._versions = chosen

    # ------------------------------------------------------------ faults
    @property
    def faults(self) -> Faults:
        with self._lock:
            return self._faults

    def set_faults(self, **changes) -> Faults:
        """Change fault settings (see `Faults`); unspecified ones keep their value."""
        with self._lock:
            self._faults = self._faults.replace(**changes)
        self._apply_total_link()
        return self.faults

    def clear_faults(self) -> None:
        with self._lock:
            self._faults = Faults()
        self._apply_total_link()

    def _apply_total_link(self) -> None:
        with self._lock:
            mbit = self._faults.total_mbit_s
            if not mbit:
                self._total_link = None
            elif self._total_link is None or self._total_link.rate != mbit * 1e6 / 8:
                self._total_link = Throttle(mbit)

    def _chance(self, p: float) -> bool:
        if p <= 0:
            return False
        with self._lock:
            return self._rng.random() < p

    def _links(self, conn_link: Throttle | None) -> list[Throttle]:
        with self._lock:
            return [t for t in (conn_link, self._total_link) if t is not None]

    # ------------------------------------------------------------ counters
    def count(self, endpoint: str, token_label: str | None, version: str | None = None) -> None:
        with self._lock:
            self._counts[endpoint] += 1
            if token_label:
                self._by_token[token_label] += 1
            if version:
                self._by_version[version] += 1

    def sent_image(self, sop_uids, size: int) -> None:
        """An image answer went out: the instances it carried and its bytes on the wire."""
        with self._lock:
            self._instances.update(sop_uids)
            self._image_bytes += size

    def answering(self, change: int) -> None:
        """An API request started (+1) or was answered (-1)."""
        with self._lock:
            self._in_flight += change
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def counters(self) -> dict:
        """{"endpoints": {name: n}, "versions": {"v4": n}, "tokens": {"<user>#<grant>": n},
        "total": n, "instances": {SOPInstanceUID: times sent, by getSingleImage or in a zip},
        "image_bytes": n, "max_in_flight": most API requests answered at once}."""
        with self._lock:
            return {"endpoints": dict(self._counts), "versions": dict(self._by_version),
                    "tokens": dict(self._by_token), "total": sum(self._counts.values()),
                    "instances": dict(self._instances), "image_bytes": self._image_bytes,
                    "max_in_flight": self._max_in_flight}

    def reset_counters(self) -> None:
        with self._lock:
            self._counts.clear()
            self._by_token.clear()
            self._by_version.clear()
            self._instances.clear()
            self._image_bytes = 0
            self._max_in_flight = self._in_flight


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    archive: LocalArchive

    def handle_error(self, request, client_address):  # a client hung up: not our problem
        log.debug("connection from %s ended abruptly", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
    # and delayed ACKs add ~40 ms to every answer, which the real server does not have.
    disable_nagle_algorithm = True
    server: _Server

    # --------------------------------------------------------------- plumbing
    def log_message(self, fmt, *args):  # the query string can name users; keep it out
        log.debug("%s %s", self.command, urlsplit(self.path).path)

    @property
    def archive(self) -> LocalArchive:
        return self.server.archive

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._send(405, b"", "text/plain")

    do_DELETE = do_PATCH = do_PUT

    def _dispatch(self):
        self._body_read = False
        parts = urlsplit(self.path)
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        path = parts.path.rstrip("/")
        try:
            if path.startswith("/_nbiafs/"):
                return self._admin(path[len("/_nbiafs/"):])
            tokens = bool(self.archive.versions & {"v2", "v4"})  # v1 alone has no token session
            if path == "/nbia-api/oauth/token" and tokens:
                return self._token()
            if path == "/nbia-api/logout" and tokens:
                return self._logout()
            segs = path.split("/")
            if len(segs) == 5 and segs[1:3] == ["nbia-api", "services"] and segs[3] in self.archive.versions:
                self.archive.answering(+1)
                try:
                    if segs[3] == "v4":
                        return self._service_v4(segs[4], parse_qsl(parts.query, keep_blank_values=True))
                    return self._service(segs[3], segs[4], params)
                finally:
                    self.archive.answering(-1)
            self._send(404, b"Not Found", "text/plain")
        except _Stop:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, status: int, body: bytes, ctype: str | None = "application/json",
              headers: dict | None = None, link: Throttle | None = None):
        if not self._body_read:  # a request body left unread would be taken for the next request
            self._read_form_pairs()
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._write(body, link)

    def _write(self, data: bytes, link: Throttle | None = None):
        links = self.archive._links(link)
        if not links:
            self.wfile.write(data)
            return
        for off in range(0, len(data), WIRE_CHUNK):
            piece = data[off:off + WIRE_CHUNK]
            pace(links, len(piece))
            self.wfile.write(piece)

    def _read_form(self) -> dict:
        return dict(self._read_form_pairs())

    def _read_form_pairs(self) -> list[tuple[str, str]]:
        if self._body_read:
            return []
        self._body_read = True
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        return parse_qsl(body, keep_blank_values=True)

    def _bearer(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            scheme, _, token = auth.partition(":")  # TCIA's own curl examples omit the space
            if scheme.lower() != "bearer":
                return None
        return token.strip() or None

    def _apply_delays(self, endpoint: str, faults: Faults) -> None:
        if faults.stalls(endpoint):
            while not self.archive._stopping.wait(0.1):
                if not self.archive.faults.stalls(endpoint):
                    break
            raise _Stop()
        delay = faults.delay_s(endpoint)
        if delay > 0:
            time.sleep(delay)

    # --------------------------------------------------------------- oauth
    def _token(self):
        if self.command != "POST":
            return self._send(405, b"", "text/plain")
        form = self._read_form()
        faults = self.archive.faults
        self.archive.count(f"oauth/token:{form.get('grant_type', '?')}", None)
        self._apply_delays("oauth/token", faults)
        if faults.token_outage:
            return self._send(503, b"Service Unavailable", "text/plain")
        try:
            if form.get("grant_type") == "password":
                reply = self.archive.tokens.password_grant(form.get("username", ""),
                                                           form.get("password", ""))
            elif form.get("grant_type") == "refresh_token":
                reply = self.archive.tokens.refresh_grant(form.get("refresh_token", ""))
            else:
                return self._send(400, json.dumps({"error": "unsupported_grant_type"}).encode())
        except InvalidGrant as exc:
            status = 401 if form.get("grant_type") == "password" else 400
            body = {"error": "invalid_grant", "error_description": str(exc)}
            return self._send(status, json.dumps(body).encode())
        self._send(200, json.dumps(reply).encode())

    def _logout(self):
        if self.command != "POST":
            return self._send(405, b"", "text/plain")
        token = self._bearer()
        self.archive.count("logout", None)
        if token:
            self.archive.tokens.revoke(token)
        self._send(200, b"", None)

    # --------------------------------------------------------------- services
    def _service(self, version: str, endpoint: str, params: dict):
        handler = endpoints.QUERY_ENDPOINTS.get(endpoint)
        if handler is None and endpoint not in IMAGE_ENDPOINTS:
            return self._send(404, b"Not Found", "text/plain")
        faults = self.archive.faults
        user, label, token_state = None, None, "none"
        if version == "v2":
            token = self._bearer()
            grant = self.archive.tokens.check(token) if token else None
            token_state = "valid" if grant else ("invalid" if token else "absent")
            if grant:
                user, label = grant.user, grant.label
        self.archive.count(endpoint, label, version)
        self._apply_delays(endpoint, faults)
        if version == "v2" and token_state != "valid":
            # Production v2: no token -> 500 on downloads and getCollectionValues; a bad or
            # expired token -> 401 (empty) on downloads; every query -> an empty 200.
            if token_state == "absent" and endpoint in TOKEN_REQUIRED:
                return self._send(500, SERVER_ERROR_BODY, "text/plain")
            if endpoint in IMAGE_ENDPOINTS:
                return self._send(401, b"", None)
            return self._send(200, b"", "application/json")
        if endpoint in IMAGE_ENDPOINTS:
            return self._image(endpoint, user, params, faults)
        self._query(handler, endpoint, user, params, faults)

    def _query(self, handler, endpoint, user, params, faults: Faults):
        try:
            rows = handler(self.archive.index, user, params)
        except endpoints.MissingParameter as exc:
            return self._send(400, str(exc).encode(), "application/json")
        except endpoints.BadParameter:
            return self._send(500, SERVER_ERROR_BODY, "text/plain")
        if not rows:
            if endpoint == "getSeriesMetaData":
                return self._send(204, b"", None)
            return self._send(200, b"", "application/json")
        fmt = "json" if endpoint == "getContentsByName" else params.get("format", "json").lower()
        if fmt not in FORMATS:
            return self._send(500, SERVER_ERROR_BODY, "text/plain")
        body = render(rows, fmt)
        if faults.corrupt_json and fmt == "json":
            body = body[: max(1, len(body) // 2)]
        self._send(200, body, FORMATS[fmt])

    # --------------------------------------------------------------- images
    def _image(self, endpoint, user, params, faults: Faults):
        try:
            endpoints.require(params, "SeriesInstanceUID",
                              *(["SOPInstanceUID"] if endpoint == "getSingleImage" else []))
        except endpoints.MissingParameter as exc:
            return self._send(400, str(exc).encode(), "application/json")
        if faults.image_outage or self.archive._chance(faults.image_error_rate):
            return self._send(500, SERVER_ERROR_BODY, "text/plain")
        link = Throttle(faults.connection_mbit_s) if faults.connection_mbit_s else None
        uid = params["SeriesInstanceUID"]
        series = self.archive.index.visible_series(user, uid)
        if endpoint == "getSingleImage":
            return self._single_image(series, params["SOPInstanceUID"], faults, link)
        if series is None:
            if self.archive.index.series_by_uid.get(uid) is not None:
                msg = f"The user has not been granted the access to the series {uid}."
            else:
                msg = f"Image with given SeriesInstanceUID,{uid}, is not in public domain."
            return self._send(400, msg.encode(), "application/json")
        self._zip(endpoint, series, params, faults, link)

    def _single_image(self, series: Series | None, sop_uid: str, faults: Faults, link):
        inst = next((i for i in series.instances if i.sop_uid == sop_uid), None) if series else None
        if inst is None:
            return self._send(500, SERVER_ERROR_BODY, "text/plain")
        if faults.corrupt_images == "html":
            page = (b"<html><head><title>Service Unavailable</title></head><body>"
                    b"<h1>The server is temporarily unable to service your request.</h1></body></html>")
            return self._send(200, page, "text/html")
        data = inst.path.read_bytes()
        if faults.corrupt_images == "nodicm":
            data = data[:128] + b"XXXX" + data[132:]
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom")
        self.send_header("Content-Disposition", f"attachment; filename={sop_uid}.dcm")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.archive._chance(faults.truncate_images):
            self._write(data[: len(data) // 2], link)
            self.wfile.flush()
            raise _Stop()
        self._write(data, link)
        self.archive.sent_image([sop_uid], len(data))

    def _zip(self, endpoint, series: Series, params, faults: Faults, link):
        with_md5 = endpoint == "getImageWithMD5Hash"
        new_names = params.get("NewFileNames", "").lower() == "yes" and not with_md5
        self._send_zip(series, faults, link, license=not with_md5, md5=with_md5, new_names=new_names)

    def _send_zip(self, series: Series, faults: Faults, link, license: bool, md5: bool, new_names: bool):
        """A chunked zip as production streams it: `LICENSE` first (unless not `license`), the
        instances, `md5hashes.csv` last when `md5`."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Disposition", f'attachment; filename="{series.uid}.zip"')
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sink = _ChunkedWriter(self, link)
        writer = ZipStreamWriter(sink.write)
        if license:
            writer.add_bytes("LICENSE", license_text(series.collection).encode())
        instances = series_zip_order(series, new_names)
        if faults.zip_drop_entries:
            instances = instances[: max(0, len(instances) - faults.zip_drop_entries)]
        hashes = []
        for name, inst in instances:
            deflated, meta = self.archive.deflated.get(deflate_name(series.uid, inst.sop_uid), inst.path)
            writer.add_deflated(name, deflated, meta)
            hashes.append((name, "0" * 32 if faults.wrong_zip_md5 else inst.md5))
        if md5:
            rows = "".join(f"{n},{h}\n" for n, h in sorted(hashes, key=lambda r: r[1]))
            writer.add_bytes("md5hashes.csv", ("Filename,MD5Hash\n" + rows).encode())
        if not faults.zip_truncate:  # truncated: the stream ends before the central directory
            writer.finish()
        sink.finish()
        self.archive.sent_image([inst.sop_uid for _name, inst in instances], sink.sent)

    # --------------------------------------------------------------- v4
    def _service_v4(self, endpoint: str, pairs: list[tuple[str, str]]):
        archive, faults = self.archive, self.archive.faults
        params = dict(pairs)
        posted = endpoint in v4.POST_ENDPOINTS
        if not (posted or endpoint in v4.ALLOWED or endpoint in v4.QUERY_ENDPOINTS):
            return self._send(404, b"Not Found", "text/plain")
        if (self.command == "POST") != posted:
            return self._send(405, b"", "text/plain")
        token = self._bearer()
        user, label, token_state = v4.GUEST, None, "absent"
        if token and token != "undefined":  # no token, or `Bearer undefined`: the guest
            grant = archive.tokens.check(token)
            token_state = "valid" if grant else "invalid"
            if grant:
                user, label = grant.user, grant.label
        form = self._read_form_pairs() if posted else []
        archive.count(endpoint, label, "v4")
        self._apply_delays(endpoint, faults)
        if token_state == "invalid":
            # Where the user is resolved directly (downloads): 401 without a body; getSeries
            # fails (500); elsewhere the bad token is swallowed: an empty 200.
            if endpoint in IMAGE_ENDPOINTS:
                return self._send(401, b"", None)
            if endpoint == "getSeries":
                return self._send(500, SERVER_ERROR_BODY, "text/plain")
            return self._send(200, b"", None)
        error = None if posted else archive.param_check.error(endpoint, params, old=faults.old_v4)
        if error:
            return self._send(400, error.encode(), "application/json")
        try:
            return self._answer_v4(endpoint, user, params, form, faults)
        except (v4.MissingParameter, v4.BadRequest) as exc:
            return self._send(400, str(exc).encode(), "application/json")
        except v4.ServerError as exc:
            return self._send(500, SERVER_ERROR_BODY.split(b"\n")[0] + b"\n" + str(exc).encode(), "text/plain")

    def _answer_v4(self, endpoint, user, params, form, faults: Faults):
        index = self.archive.index
        if endpoint in IMAGE_ENDPOINTS:
            return self._image_v4(endpoint, user, params, faults)
        if endpoint == "getMD5HashForImage":
            found = index.instance_by_sop.get(params.get("SOPInstanceUID", ""))
            visible = found is not None and index.visible_series(user, found[0].uid) is not None
            md5 = ("0" * 32 if faults.wrong_md5 else found[1].md5) if found is not None and visible else ""
            return self._send(200, md5.encode(), "text/plain")
        if endpoint == "getThumbnail":
            return self._thumbnail(user, form)
        if endpoint == "getDicomTags":
            rows = v4.get_dicom_tags(index, user, params, _dataset)
            return self._send(200, v4.render_jackson(rows) if rows else b"", "application/json" if rows else None)
        if endpoint in v4.JACKSON_ENDPOINTS:
            return self._send(200, v4.render_jackson(v4.JACKSON_ENDPOINTS[endpoint](index, user, params)))
        if endpoint in v4.MANIFEST_ENDPOINTS:
            base = self.archive.url.rsplit("/nbia-api", 1)[0]
            text = v4.MANIFEST_ENDPOINTS[endpoint](index, user, form, base)
            return self._send(200, text.encode(), "application/x-nbia-manifest-file")
        if endpoint == "getSeriesMetadata":
            rows = v4.get_series_metadata(index, user, form)
            fmt = dict(form).get("format", "csv").lower()
            disposition = {"Content-Disposition": 'attachment; filename="SeriesMetaData.csv"'}
            return self._tabular_v4(rows, fmt, faults, disposition if fmt == "csv" else None)
        if endpoint in v4.COUNT_ENDPOINTS:
            return self._tabular_v4(v4.COUNT_ENDPOINTS[endpoint](index, user, params), "json", faults)
        rows = v4.QUERY_ENDPOINTS[endpoint](index, user, params)
        return self._tabular_v4(rows, params.get("format", "json").lower(), faults)

    def _tabular_v4(self, rows: list[dict], fmt: str, faults: Faults, headers: dict | None = None):
        if not rows:  # production: 200, an empty body, no Content-Type
            return self._send(200, b"", None)
        if fmt not in v4.FORMATS:
            raise v4.ServerError(f"Unsupported format: {fmt}")
        body, ctype = v4.render(rows, fmt)
        if faults.corrupt_json and fmt == "json":
            body = body[: max(1, len(body) // 2)]
        self._send(200, body, ctype, headers)

    def _image_v4(self, endpoint, user, params, faults: Faults):
        single = endpoint == "getSingleImage"
        if single:
            v4.require(params, ["SeriesInstanceUID", "SOPInstanceUID"],
                       "A parameter, SeriesInstanceUID and SOPInstanceUID, are required for this API call.")
        else:
            v4.require(params, ["SeriesInstanceUID"], "A parameter, SeriesInstanceUID, is required for this API call.")
        if faults.image_outage or self.archive._chance(faults.image_error_rate):
            return self._send(500, SERVER_ERROR_BODY, "text/plain")
        link = Throttle(faults.connection_mbit_s) if faults.connection_mbit_s else None
        uid = params["SeriesInstanceUID"]
        series = self.archive.index.visible_series(user, uid)
        if single:
            return self._single_image(series, params["SOPInstanceUID"], faults, link)
        if series is None:
            raise v4.not_granted(uid)
        with_md5 = endpoint == "getImageWithMD5Hash" or params.get("IncludeMD5", "").lower() == "yes"
        new_names = endpoint == "getImage" and params.get("NewFileNames", "").lower() == "yes"
        self._send_zip(series, faults, link, license=endpoint == "getImage", md5=with_md5, new_names=new_names)

    def _thumbnail(self, user, form):
        """POST seriesUID, objectUID -> a JPEG of at most 512 x 512 (production serves ones its
        pipeline made beforehand; here it is made from the instance); anything missing -> 500."""
        fields = dict(form)
        series = self.archive.index.visible_series(user, fields.get("seriesUID", ""))
        inst = next((i for i in series.instances if i.sop_uid == fields.get("objectUID")), None) if series else None
        if inst is None:
            raise v4.ServerError("null")
        from PIL import Image

        from nbiafs import preview
        with open(inst.path, "rb") as f:
            image = preview.reduce(preview.image_of(f), THUMBNAIL_SIDE)
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="JPEG", quality=85)
        self._send(200, out.getvalue(), "image/jpeg")

    # --------------------------------------------------------------- test control
    def _admin(self, what: str):
        """GET counters, GET/POST faults (JSON changes; {"clear": true} resets), POST
        counters/reset, tokens/expire, tokens/revoke-refresh. Not part of the NBIA API."""
        archive = self.archive
        if what == "counters":
            return self._send(200, json.dumps(archive.counters()).encode())
        if what == "faults":
            if self.command == "POST":
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    self._body_read = True
                    changes = json.loads(self.rfile.read(length) or b"{}")
                    if changes.pop("clear", False):
                        archive.clear_faults()
                    archive.set_faults(**changes)
                except (ValueError, TypeError) as exc:
                    return self._send(400, str(exc).encode(), "text/plain")
            return self._send(200, json.dumps(dataclasses.asdict(archive.faults)).encode())
        actions = {"counters/reset": archive.reset_counters,
                   "tokens/expire": archive.tokens.expire_all,
                   "tokens/revoke-refresh": archive.tokens.revoke_refresh_tokens}
        if what not in actions:
            return self._send(404, b"Not Found", "text/plain")
        if self.command != "POST":
            return self._send(405, b"", "text/plain")
        actions[what]()
        self._send(200, b"{}")


class _ChunkedWriter(io.RawIOBase):
    """A non-seekable sink that sends what zipfile writes as HTTP chunks."""

    def __init__(self, handler: _Handler, link):
        self.handler, self.link = handler, link
        self.buffer = bytearray()
        self.sent = 0

    def writable(self):
        return True

    def write(self, data) -> int:
        self.buffer += data
        if len(self.buffer) >= WIRE_CHUNK:
            self._flush_chunk()
        return len(data)

    def _flush_chunk(self):
        if self.buffer:
            data = bytes(self.buffer)
            self.buffer.clear()
            self.sent += len(data)
            self.handler._write(f"{len(data):X}\r\n".encode() + data + b"\r\n", self.link)

    def finish(self):
        self._flush_chunk()
        self.handler.wfile.write(b"0\r\n\r\n")


def _dataset(path: Path):
    import pydicom
    return pydicom.dcmread(path, stop_before_pixels=True)


def deflate_name(series_uid: str, sop_uid: str) -> str:
    return hashlib.md5(f"{series_uid}/{sop_uid}".encode()).hexdigest()


def license_text(collection: dict) -> str:
    return (f"License Information. The {collection['Collection']} collection is distributed under "
            f"the {collection.get('LicenseName', '')} at {collection.get('LicenseURI', '')} By "
            "downloading the data, you agree to abide by terms of this license.")


def series_zip_order(series: Series, new_names: bool) -> list[tuple[str, Instance]]:
    """Zip entry names: database order `00000001.dcm…`, or `<acq>-<nnn>.dcm` by InstanceNumber."""
    if not new_names:
        order = sorted(series.instances, key=lambda i: hashlib.md5(i.sop_uid.encode()).digest())
        return [(f"{n:08d}.dcm", inst) for n, inst in enumerate(order, 1)]
    order = sorted(series.instances, key=lambda i: (i.acquisition_number, i.instance_number))
    width = max(3, len(str(len(order))))
    return [(f"{inst.acquisition_number}-{n:0{width}d}.dcm", inst) for n, inst in enumerate(order, 1)]


def render(rows: list[dict], fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps(rows, separators=(",", ":")).encode()
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().encode()
    if fmt == "xml":
        items = "".join("<row>" + "".join(f"<{k.replace(' ', '_')}>{xml_escape(str(v))}"
                                          f"</{k.replace(' ', '_')}>" for k, v in r.items())
                        + "</row>" for r in rows)
        return f'<?xml version="1.0" encoding="UTF-8"?><rows>{items}</rows>'.encode()
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(k, '')))}</td>" for k in keys)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>".encode()
