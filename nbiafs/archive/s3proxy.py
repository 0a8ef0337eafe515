"""A fault-injecting HTTP proxy in front of an S3 endpoint, for the tests of IDC's mirror:
what a real S3 engine never does on loopback (cut a body short, flip a byte in transit,
refuse one object, fall silent, go away), on demand, per object.

    proxy = S3FaultProxy(store.endpoint).start()
    proxy.fault(part, "truncate" | "flip" | "403" | "404" | "503" | "stall")  # part of path or query
    proxy.down = True          # every connection closed at once: unreachable
    proxy.requests             # (method, path, query, range) of each request seen

Bodies are read whole from the store and answered with a Content-Length (test objects are
small); path-style requests only (as nbiafs sends them).
"""

from __future__ import annotations

import http.client
import http.server
import threading
from urllib.parse import urlsplit

STALL_S = 60.0
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


class S3FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()  # guards _faults and requests
        self._faults: dict[str, str] = {}
        self.requests: list[tuple[str, str, str, str]] = []
        self.down = False
        self._released = threading.Event()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fault(self, key_part: str, action: str) -> None:
        with self._lock:
            self._faults[key_part] = action

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()
        self.down = False

    def seen(self) -> list[tuple[str, str, str, str]]:
        with self._lock:
            return list(self.requests)

    def _action(self, path: str) -> str | None:
        with self._lock:
            return next((a for part, a in self._faults.items() if part in path), None)

    def start(self) -> "S3FaultProxy":
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                proxy._serve(self)

            def do_HEAD(self) -> None:
                proxy._serve(self)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path, _, query = h.path.partition("?")
        with self._lock:
            self.requests.append((h.command, path, query, h.headers.get("Range", "")))
        if self.down:
            h.close_connection = True
            h.connection.close()
            return
        action = self._action(h.path)  # the path and its query (a listing names its prefix there)
        if action == "stall":
            self._released.wait(STALL_S)
            h.close_connection = True
            return
        if action in ("403", "404", "503"):
            code = {"403": "AccessDenied", "404": "NoSuchKey", "503": "SlowDown"}[action]
            body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
            h.send_response(int(action))
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        conn = http.client.HTTPConnection(*self._upstream, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_HEADERS}
            conn.request(h.command, h.path, headers=headers)
            r = conn.getresponse()
            body = r.read()
            h.send_response(r.status)
            for k, v in r.getheaders():
                if k.lower() not in HOP_HEADERS:
                    h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if h.command == "HEAD":
                return
            if action == "truncate" and r.status in (200, 206):
                h.wfile.write(body[:len(body) // 2])
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(2)
                return
            if action == "flip" and r.status in (200, 206) and body:
                middle = len(body) // 2
                body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
            h.wfile.write(body)
        finally:
            conn.close()
