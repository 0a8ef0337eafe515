"""The one errno table: every error nbiafs raises says what happened and carries its errno.

The FUSE adapter turns an `NbiaError` into its `errno`, and anything else into
a logged EIO (fusepy would otherwise report EINVAL or even unmount). Messages
never contain credentials or tokens.
"""

from __future__ import annotations

import errno
import re
from urllib.parse import urlsplit


class NbiaError(Exception):
    """Base class. `errno` is what a filesystem call failing with it returns."""

    errno = errno.EIO


class NotFound(NbiaError):
    """The archive has no such collection, patient, study, series or instance."""

    errno = errno.ENOENT


class NotAuthorized(NbiaError):
    """The archive refuses this user access (restricted collection, rejected token)."""

    errno = errno.EACCES


class AuthenticationFailed(NotAuthorized):
    """The token endpoint rejected the credentials."""


class ArchiveUnavailable(NbiaError):
    """The archive did not answer usefully within the retry budget (outage, stall, 5xx)."""

    errno = errno.EIO

    def __init__(self, what: str, attempts: int, last_error: str):
        super().__init__(f"archive unavailable: {what} failed after {attempts} attempt"
                         f"{'s' if attempts != 1 else ''} ({last_error})")
        self.attempts = attempts


class UntrustedCertificate(NbiaError):
    """The archive's TLS certificate failed verification: not retried, never ignored silently."""

    errno = errno.EIO

    def __init__(self, url: str, reason: str):
        super().__init__(f"the TLS certificate of {url} is not trusted ({reason}); give its CA with "
                         "REQUESTS_CA_BUNDLE=FILE, or skip verification with --insecure")

    @classmethod
    def from_ssl_error(cls, url: str, exc: BaseException) -> "UntrustedCertificate":
        url = urlsplit(url).netloc or url
        m = re.search(r"certificate verify failed: ([^()'\]\\]+)", str(exc))
        return cls(url, m.group(1).strip() if m else type(exc).__name__)


class IntegrityError(NbiaError):
    """A body was truncated, malformed or not what was asked for (no DICM, bad zip, bad JSON)."""

    errno = errno.EIO


class NoSuchApi(NbiaError):
    """The archive does not speak the API version asked for (or any NBIA API at that URL)."""

    errno = errno.EIO


class RejectedParameter(NbiaError):
    """v4 refused a query parameter (`Invalid query parameter`): a client bug, never "no data"."""

    errno = errno.EIO


class ReadOnly(NbiaError):
    errno = errno.EROFS
