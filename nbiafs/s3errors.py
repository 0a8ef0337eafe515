"""What the two S3 sources (tier.py, idc.py) share: how an S3 error is named in a log line, and
how an object's body is copied into a local file."""

from __future__ import annotations

import hashlib
from typing import BinaryIO, Callable, Iterable


def error_code(exc) -> str:
    """The S3 error code of a botocore ClientError (else its HTTP status, else "?")."""
    error = getattr(exc, "response", {}).get("Error", {})
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code") or status or "?")


def error_reason(exc: BaseException) -> str:
    """The exception's type and first line, at most 200 characters."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def copy_body(chunks: Iterable[bytes], dest: BinaryIO, clock: Callable[[], float], deadline: float,
              budget_s: float, down: Callable[[str], Exception]) -> tuple[int, str]:
    """Write an object's body into `dest` as it streams in; (size, md5). A body still streaming
    at `deadline` (`budget_s` after it was asked), or one that breaks off, raises `down(reason)`;
    a write that fails (the local disk full) raises its OSError: the store is not down for it."""
    hasher = hashlib.md5()
    size = 0
    stream = iter(chunks)
    while True:
        try:
            chunk = next(stream, None)
        except Exception as exc:  # noqa: BLE001 - the stream broke off
            raise down(error_reason(exc)) from None
        if chunk is None:
            break
        dest.write(chunk)
        hasher.update(chunk)
        size += len(chunk)
        if clock() > deadline:
            raise down(f"one object took more than {budget_s:.0f} s")
    return size, hasher.hexdigest()
