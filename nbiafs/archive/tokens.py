"""Users and OAuth tokens of the local archive, shaped like TCIA's Keycloak.

The guest ``nbia_guest`` (any password) sees public collections; named users
have a password and may be granted restricted collections (through the
collection's ``granted_to`` list in the index). Token lifetimes are
configurable so that tests can watch tokens expire within seconds.

Each grant gets a short label (``<user>#<n>``) used by the request counters, so
that counters never show a token itself.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

GUEST = "nbia_guest"

# The default named user of the local archive, granted the restricted demo
# collection. A local fixture, not a real account: override with --users.
DEFAULT_USERS = {"researcher": "phantom-research-pw"}


@dataclass
class Grant:
    user: str
    label: str
    expires_at: float


class InvalidGrant(Exception):
    """Bad credentials or a bad/expired refresh token."""


class TokenStore:
    """Issues, refreshes, checks and revokes tokens. All methods are thread-safe."""

    def __init__(self, users: dict[str, str] | None = None, access_lifetime_s: float = 7200.0,
                 refresh_lifetime_s: float = 7200.0, clock=time.monotonic):
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.access_lifetime_s = access_lifetime_s
        self.refresh_lifetime_s = refresh_lifetime_s
        self._clock = clock
        self._lock = threading.Lock()  # guards the three fields below
        self._access: dict[str, Grant] = {}
        self._refresh: dict[str, Grant] = {}
        self._grants = 0
        self.issued: list[str] = []  # every token handed out, so tests can search for leaks

    @staticmethod
    def load_users(path: Path) -> dict[str, str]:
        """A JSON object ``{"user": "password", ...}``."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object of user name to password")
        return data

    def password_grant(self, username: str, password: str) -> dict:
        if username != GUEST and (username not in self.users
                                  or not secrets.compare_digest(self.users[username], password)):
            raise InvalidGrant("Invalid user credentials")
        with self._lock:
            self._grants += 1
            label = f"{username}#{self._grants}"
        return self._issue(username, label)

    def refresh_grant(self, refresh_token: str) -> dict:
        with self._lock:
            grant = self._refresh.pop(refresh_token, None)
        if grant is None or grant.expires_at <= self._clock():
            raise InvalidGrant("Invalid refresh token")
        return self._issue(grant.user, grant.label)

    def _issue(self, user: str, label: str) -> dict:
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._access[access] = Grant(user, label, now + self.access_lifetime_s)
            self._refresh[refresh] = Grant(user, label, now + self.refresh_lifetime_s)
            self.issued += [access, refresh]
            self._forget_expired(now)
        return {"access_token": access, "expires_in": int(self.access_lifetime_s),
                "refresh_expires_in": int(self.refresh_lifetime_s), "refresh_token": refresh,
                "token_type": "Bearer", "id_token": secrets.token_urlsafe(16),
                "not-before-policy": 0, "session_state": secrets.token_hex(16),
                "scope": "openid profile email"}

    def check(self, access_token: str) -> Grant | None:
        """The live grant of `access_token`, or None if unknown, expired or revoked."""
        with self._lock:
            grant = self._access.get(access_token)
        if grant is None or grant.expires_at <= self._clock():
            return None
        return grant

    def revoke(self, access_token: str) -> bool:
        """Logout: drop the access token and every refresh token of its session."""
        with self._lock:
            grant = self._access.pop(access_token, None)
            if grant is None:
                return False
            for rt in [rt for rt, g in self._refresh.items() if g.label == grant.label]:
                del self._refresh[rt]
        return True

    def expire_all(self) -> None:
        """Make every access token expire now (tests: simulate a long idle)."""
        with self._lock:
            for grant in self._access.values():
                grant.expires_at = 0.0

    def revoke_refresh_tokens(self) -> None:
        """Reject every outstanding refresh token (tests: Keycloak session ended)."""
        with self._lock:
            self._refresh.clear()

    def _forget_expired(self, now: float) -> None:
        for table in (self._access, self._refresh):
            for tok in [t for t, g in table.items() if g.expires_at <= now - 3600]:
                del table[tok]
