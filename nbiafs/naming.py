"""How archive values become path components, reversibly. Pure functions.

The rule (docs/SEMANTICS.md, "Names"):
- `%` becomes `%25`, `/` becomes `%2F`, NUL becomes `%00`;
- a character that cannot be encoded as UTF-8 (a lone surrogate from JSON such
  as ``"\\udc80"``) becomes the `%XX` escapes of its surrogate-pass bytes;
- the whole names `.` and `..` become `%2E` and `%2E%2E`;
- the empty name becomes `%` (a lone `%` never arises otherwise).
Everything else, spaces and case included, is kept as it is, so ordinary IDs
read the same on disk as in the archive. `unescape(escape(x)) == x` for every
name of at most 255 bytes once escaped (NAME_MAX). A longer one is cut to 200
bytes (at a character boundary) followed by `~` and 16 hex digits of the
SHA-256 of the whole value: unique, stable, and the full value stays in the
entry's extended attributes.
"""

from __future__ import annotations

import hashlib
import re

_ESCAPE = {"%": "%25", "/": "%2F", "\0": "%00"}
_HEX = re.compile(r"%([0-9A-F]{2})")


NAME_MAX = 255
LONG_NAME_KEEP = 200


def escape(value: str, max_bytes: int = NAME_MAX) -> str:
    name = _escape(value)
    encoded = name.encode("utf-8")
    if len(encoded) <= max_bytes:
        return name
    head = encoded[:LONG_NAME_KEEP].decode("utf-8", "ignore")
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{head}~{digest}"


def _escape(value: str) -> str:
    if value == "":
        return "%"
    if value in (".", ".."):
        return "%2E" * len(value)
    out = []
    for ch in value:
        if ch in _ESCAPE:
            out.append(_ESCAPE[ch])
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        else:
            out.append(ch)
    return "".join(out)


def unescape(name: str) -> str:
    if name == "%":
        return ""
    data = bytearray()
    pos = 0
    for m in _HEX.finditer(name):
        data += name[pos:m.start()].encode("utf-8", "surrogatepass")
        data.append(int(m.group(1), 16))
        pos = m.end()
    data += name[pos:].encode("utf-8", "surrogatepass")
    return data.decode("utf-8", "surrogatepass")


def instance_file_name(sop_uid: str) -> str:
    return escape(sop_uid, NAME_MAX - len(".dcm")) + ".dcm"
