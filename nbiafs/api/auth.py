"""The authenticated session: OAuth password grant, background refresh, logout.

`TokenAuth` is a `requests` auth hook. It attaches the current bearer token
without taking a lock, so requests never queue behind a refresh while the token
is valid. A background thread refreshes the token `margin` before it expires
(refresh grant; a new password grant when the refresh token is rejected or has
expired). Only a caller holding an already expired token waits, and no longer
than one token request's own timeout.

Credentials come from the environment (NBIA_USER/NBIA_PASSWORD), ~/.netrc, or
a prompt, never from the command line; the guest `nbia_guest` is the default.
Neither the password nor any token is ever logged or put in an exception.

Locking: `_lock` guards `_token` (the current `_Token`) and serialises grants;
`_token` is replaced as a whole, so a lock-free read sees a consistent token.
"""

from __future__ import annotations

import getpass
import logging
import netrc
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from nbiafs.errors import ArchiveUnavailable, AuthenticationFailed, NoSuchApi, UntrustedCertificate

log = logging.getLogger(__name__)

GUEST = "nbia_guest"
# TCIA's guide uses client_id=NBIA for the password grant and client_id=nbia for refresh.
PASSWORD_CLIENT_ID = "NBIA"
REFRESH_CLIENT_ID = "nbia"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = ""

    def __repr__(self) -> str:  # never show the password
        return f"Credentials(username={self.username!r})"

    __str__ = __repr__


def resolve_credentials(user: str | None, root_url: str, interactive: bool | None = None,
                        environ=os.environ) -> Credentials:
    """Find the credentials of `user` (or of NBIA_USER, or the guest).

    Order: NBIA_PASSWORD for NBIA_USER (or for `user` when NBIA_USER is unset or the same);
    a ~/.netrc entry for the archive's host; an interactive prompt when stdin is a terminal.
    """
    user = user or environ.get("NBIA_USER") or None
    if user is None or user == GUEST:
        return Credentials(GUEST)
    env_user = environ.get("NBIA_USER")
    if environ.get("NBIA_PASSWORD") is not None and env_user in (None, user):
        return Credentials(user, environ["NBIA_PASSWORD"])
    host = urlsplit(root_url).hostname or ""
    try:
        entry = netrc.netrc().authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        entry = None
    if entry and entry[0] in (user, None, "") and entry[2] is not None:
        return Credentials(user, entry[2])
    if interactive is None:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        return Credentials(user, getpass.getpass(f"NBIA password for {user} at {host}: "))
    raise AuthenticationFailed(
        f"no password for user {user}: set NBIA_PASSWORD, add a ~/.netrc entry for {host}, "
        "or run in a terminal to be asked")


@dataclass(frozen=True)
class _Token:
    access: str
    refresh: str | None
    expires_at: float          # monotonic
    refresh_expires_at: float  # monotonic
    lifetime_s: float


class TokenAuth(requests.auth.AuthBase):
    """Bearer tokens for one user, kept fresh by a background thread."""

    def __init__(self, token_url: str, logout_url: str, credentials: Credentials,
                 http: requests.Session, timeout_s: tuple[float, float] = (5.0, 15.0),
                 margin_s: float = 60.0, clock=time.monotonic):
        self.token_url = token_url
        self.logout_url = logout_url
        self.credentials = credentials
        self._http = http
        self._timeout_s = timeout_s
        self._margin_s = margin_s
        self._clock = clock
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.password_grants = 0
        self.refresh_grants = 0

    @property
    def logged_in(self) -> bool:
        return self._token is not None

    def seconds_left(self) -> float | None:
        """Lifetime left of the current access token (None before the first grant)."""
        token = self._token
        return None if token is None else token.expires_at - self._clock()

    # ------------------------------------------------------------------ hook
    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self.current_token()}"
        return request

    def current_token(self) -> str:
        token = self._token
        if token is not None and self._clock() < token.expires_at:
            return token.access
        return self._renew(stale=token).access

    def renew_after_rejection(self, rejected_header: str | None) -> None:
        """A request was refused (401, or an empty answer that proved the token dead).

        Renews once, unless another thread already replaced the rejected token.
        """
        token = self._token
        if token is not None and rejected_header != f"Bearer {token.access}":
            return
        self._renew(stale=token)

    # ------------------------------------------------------------------ grants
    def login(self) -> None:
        """Password grant now; raises AuthenticationFailed or ArchiveUnavailable."""
        with self._lock:
            self._token = self._password_grant()

    def _renew(self, stale: _Token | None) -> _Token:
        if not self._lock.acquire(timeout=sum(self._timeout_s)):
            raise ArchiveUnavailable("token renewal", 1, "another renewal is stalled")
        try:
            token = self._token
            if token is not None and token is not stale and self._clock() < token.expires_at:
                return token  # another thread renewed it while we waited
            self._token = self._refresh_or_login(token)
            return self._token
        finally:
            self._lock.release()

    def _refresh_or_login(self, token: _Token | None) -> _Token:
        if token is not None and token.refresh and self._clock() < token.refresh_expires_at:
            try:
                return self._refresh_grant(token.refresh)
            except AuthenticationFailed:
                log.info("refresh token rejected; logging in again as %s", self.credentials.username)
        return self._password_grant()

    def _password_grant(self) -> _Token:
        self.password_grants += 1
        token = self._grant({"username": self.credentials.username,
                             "password": self.credentials.password,
                             "client_id": PASSWORD_CLIENT_ID, "grant_type": "password"})
        log.info("logged in to the archive as %s", self.credentials.username)
        return token

    def _refresh_grant(self, refresh_token: str) -> _Token:
        self.refresh_grants += 1
        token = self._grant({"grant_type": "refresh_token", "refresh_token": refresh_token,
                             "client_id": REFRESH_CLIENT_ID})
        log.info("token refreshed")
        return token

    def _grant(self, form: dict) -> _Token:
        try:
            r = self._http.post(self.token_url, data=form, timeout=self._timeout_s)
        except requests.exceptions.SSLError as exc:
            raise UntrustedCertificate.from_ssl_error(self.token_url, exc) from None
        except requests.RequestException as exc:
            raise ArchiveUnavailable("token request", 1, type(exc).__name__) from None
        if r.status_code in (400, 401):
            raise AuthenticationFailed(
                f"the archive refused the credentials of {self.credentials.username}"
                if form["grant_type"] == "password" else "refresh token rejected")
        if r.status_code in (404, 405):
            raise NoSuchApi(f"the archive has no token endpoint at {self.token_url}")
        if r.status_code != 200:
            raise ArchiveUnavailable("token request", 1, f"HTTP {r.status_code}")
        try:
            reply = r.json()
            access = reply["access_token"]
            lifetime = float(reply.get("expires_in") or 7200)
            refresh_lifetime = float(reply.get("refresh_expires_in") or lifetime)
        except (ValueError, KeyError, TypeError):
            raise ArchiveUnavailable("token request", 1, "malformed token reply") from None
        now = self._clock()
        return _Token(access, reply.get("refresh_token"), now + lifetime, now + refresh_lifetime,
                      lifetime)

    # ------------------------------------------------------------------ background refresh
    def start(self) -> None:
        """Start the background refresh (it logs in first if `login()` was not called or failed)."""
        self._thread = threading.Thread(target=self._refresh_loop, name="nbia-token-refresh",
                                        daemon=True)
        self._thread.start()

    def _margin(self, token: _Token) -> float:
        # A minute before expiry, or a fifth of the lifetime when tokens are short.
        return min(self._margin_s, token.lifetime_s / 5)

    def _refresh_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            token = self._token
            wait = token.expires_at - self._margin(token) - self._clock() if token else 0.0
            if wait > 0 and self._stop.wait(min(wait, 3600)):
                return
            if self._token is not token and self._token is not None:
                continue  # renewed meanwhile by a caller
            try:
                self._renew(stale=token)
                failures = 0
            except Exception as exc:  # keep the thread alive whatever happens
                failures += 1
                delay = min(30.0, 0.5 * 2 ** failures) * random.uniform(0.5, 1.0)
                log.warning("token refresh failed (%s); retrying in %.1f s", exc, delay)
                if self._stop.wait(delay):
                    return

    def stop(self, logout: bool = True) -> None:
        """Stop the refresh thread and, by default, log out (POST, best effort)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        token = self._token
        if logout and token is not None:
            try:
                self._http.post(self.logout_url, headers={"Authorization": f"Bearer {token.access}"},
                                timeout=self._timeout_s)
            except requests.RequestException:
                log.debug("logout failed; the token will expire by itself")
        self._token = None
