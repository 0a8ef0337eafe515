"""TCIA portal manifests (`.tcia` files): the series they list.

A manifest is a few `key=value` lines followed by `ListOfSeriesToDownload=` and one
SeriesInstanceUID per line:

    downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/DownloadServlet
    includeAnnotation=true
    noOfrRetry=4
    databasketId=manifest-1600709154662.tcia
    manifestVersion=3.0
    ListOfSeriesToDownload=
    1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192
    ...
"""

from __future__ import annotations

import re
from pathlib import Path

_UID = re.compile(r"^[0-9A-Za-z.\-_]+$")


class ManifestError(Exception):
    """A manifest that cannot be used: one line for the user."""


def parse_manifest(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        raise ManifestError(f"manifest {path}: {exc.strerror}") from None
    lines = [line.strip() for line in text.splitlines()]
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("ListOfSeriesToDownload="))
    except StopIteration:
        raise ManifestError(f"manifest {path}: no ListOfSeriesToDownload= line "
                            "(is it a .tcia file from the TCIA portal?)") from None
    first = lines[start].split("=", 1)[1].strip()
    uids = [u for u in [first, *lines[start + 1:]] if u and not u.startswith("#")]
    bad = [u for u in uids if not _UID.match(u)]
    if bad:
        raise ManifestError(f"manifest {path}: {bad[0][:80]!r} is not a SeriesInstanceUID")
    if not uids:
        raise ManifestError(f"manifest {path}: lists no series")
    return list(dict.fromkeys(uids))
