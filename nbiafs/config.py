"""Typed configuration of a mount, built once by the CLI."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nbiafs.api.client import ClientConfig
from nbiafs.idc import MirrorConfig
from nbiafs.prefetch import PrefetchConfig
from nbiafs.tier import TierConfig

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def parse_size(text: str) -> int:
    """`500M`, `2G`, `10GiB`, `1.5G`, `1048576` -> bytes (binary units)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"bad size {text!r}: use a number with an optional unit K, M, G or T (e.g. 20G)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"bad size {text!r}: must be more than zero")
    return value


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nbiafs"


@dataclass(frozen=True)
class CacheConfig:
    root: Path = default_cache_dir()
    max_bytes: int = 20 * 1024 ** 3          # instance cache limit (20 GiB)
    listing_ttl_s: float = 3600.0            # listings are re-asked after this; served stale on outage
    negative_ttl_s: float = 5.0              # a missing name re-checks its parent at most this often (gcsfuse: 5 s)
    memory_records: int = 200_000            # listing records held in memory (cachetools LRU)

    def scope_dir(self, client: ClientConfig, identity: str | None) -> Path:
        """One private subdirectory per archive and identity (a named user, or None for the
        public view that the guest and anonymous v1 share): what one user's mount cached is
        never served to another user's mount sharing the cache directory. The API version is
        not part of it: records are kept in one shape whatever the version (api/models.py)."""
        key = f"{client.root_url.rstrip('/')}|{identity or ''}"
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MountConfig:
    mountpoint: Path
    client: ClientConfig
    cache: CacheConfig
    prefetch: PrefetchConfig = PrefetchConfig()
    user: str | None = None
    foreground: bool = False
    allow_other: bool = False
    entry_timeout_s: float = 1.0     # kernel caching of names; attributes are never cached (attr_timeout=0)
    # What the mount shows (all when empty): --collection, --modality, --manifest, --cart
    collections: tuple = ()
    modalities: tuple = ()
    manifest_series: tuple | None = None   # SeriesInstanceUIDs of a .tcia manifest
    cart: str | None = None
    names: str = "uid"               # --names: study and series folders by UID or readable
    previews: bool = False           # --previews: .preview.png in each series folder
    shared_cache: TierConfig | None = None  # --shared-cache s3://BUCKET/PREFIX: the cluster's second level
    mirror: MirrorConfig = MirrorConfig()    # --source, --idc-index: IDC's S3 mirror of TCIA
