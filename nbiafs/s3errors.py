"""How an S3 error is named in a log line, for the two S3 sources (tier.py, idc.py)."""

from __future__ import annotations


def error_code(exc) -> str:
    """The S3 error code of a botocore ClientError (else its HTTP status, else "?")."""
    error = getattr(exc, "response", {}).get("Error", {})
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code") or status or "?")


def error_reason(exc: BaseException) -> str:
    """The exception's type and first line, at most 200 characters."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
