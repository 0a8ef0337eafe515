"""nbiafs: The Cancer Imaging Archive's NBIA REST API as a read-only filesystem.

From Python: `with nbiafs.mounted(mountpoint, **options) as root: ...` (nbiafs.background).
"""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):  # importing nbiafs stays cheap; the mount API loads on first use
    if name in ("mounted", "Mounted", "MountFailed"):
        from nbiafs import background
        return getattr(background, name)
    raise AttributeError(f"module 'nbiafs' has no attribute {name!r}")


__all__ = ["Mounted", "MountFailed", "mounted", "__version__"]
