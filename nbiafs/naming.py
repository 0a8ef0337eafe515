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


# ---------------------------------------------------------------------- readable names
# `--names readable` (docs/SEMANTICS.md, "Readable names"): a study or series folder is named
# for what it holds, followed by the last digits of its UID:
#     2000-01-01 CT CHEST ABD W CONTRAST [338421]
#     2 CT ARTERIAL PHASE [770712]
# Fields the archive leaves empty are left out. The digits are the last UID_DIGITS characters
# of the UID without its dots; when two siblings' names still collide, both show more, up to
# the whole UID. Names depend only on the listing, so they are the same in every mount.
UID_DIGITS = 6


def study_label(record: dict) -> str:
    return _words(_date(record.get("StudyDate")), record.get("StudyDescription"))


def series_label(record: dict) -> str:
    return _words(record.get("SeriesNumber"), record.get("Modality"), record.get("SeriesDescription"))


def readable_names(labels: dict[str, str]) -> dict[str, str]:
    """{UID: label} of siblings -> {UID: escaped name}, each unique among them."""
    digits: dict[str, int | None] = {uid: UID_DIGITS for uid in labels}
    while True:
        names = {uid: _readable(label, uid, digits[uid]) for uid, label in labels.items()}
        holders: dict[str, list[str]] = {}
        for uid, name in names.items():
            holders.setdefault(name, []).append(uid)
        clashes = [uids for uids in holders.values() if len(uids) > 1]
        if not clashes:
            return names
        grew = False
        for uids in clashes:
            for uid in uids:
                shown = digits[uid]
                if shown is not None:  # None: the whole UID, dots included
                    digits[uid] = None if shown >= len(uid.replace(".", "")) else shown * 2
                    grew = True
        if not grew:  # only the same label and the same whole UID: cannot be (UIDs are unique)
            return names


def _readable(label: str, uid: str, digits: int | None) -> str:
    tag = uid if digits is None else uid.replace(".", "")[-digits:]
    suffix = _escape(f" [{tag}]" if label else f"[{tag}]")
    room = NAME_MAX - len(suffix.encode("utf-8"))
    if room <= 0:
        return escape(uid)  # a UID of more than 240 bytes: its own (escaped, shortened) name
    head = _escape(label)
    while len(head.encode("utf-8")) > room:  # cut the label, never the UID's digits
        label = label[:-1]
        head = _escape(label)
    return head.rstrip() + suffix if label else suffix.lstrip()


def _words(*values) -> str:
    return " ".join(" ".join(str(v).split()) for v in values if v is not None and str(v).strip())


def _date(text) -> str | None:
    """`2015-05-27 00:00:00.0` or `05-27-2015` -> `2015-05-27`; anything else as it is."""
    if not text:
        return None
    text = str(text)
    if len(text) >= 10 and text[4] == "-" and text[7] == "-":
        return text[:10]
    if len(text) >= 10 and text[2] == "-" and text[5] == "-":
        return f"{text[6:10]}-{text[:2]}-{text[3:5]}"
    return text
