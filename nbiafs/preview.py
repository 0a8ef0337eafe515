"""`.preview.png` (`--previews`): one instance of a series as a PNG, for file managers and image
viewers (docs/SEMANTICS.md, "Previews"). Pure: DICOM in, PNG bytes out.

Grey images go through the modality LUT (RescaleSlope/Intercept), then the instance's own
window (the first WindowCenter/WindowWidth, DICOM's linear VOI function, PS3.3 C.11.2.1.2);
without a window, the 0.5-99.5 percentiles of the image. MONOCHROME1 is inverted. Colour
images (RGB, YBR, palette) are shown in RGB. A multi-frame instance shows its middle frame.
Images larger than `MAX_SIDE` are reduced by whole factors (block means).

Compressed pixel data is decoded by pydicom's decoders: pylibjpeg with its libjpeg (JPEG
baseline, extended, lossless; JPEG-LS), openjpeg (JPEG 2000) and rle (RLE) plugins, from the
`codecs` extra, which scripts/setup.sh installs; without them Pillow covers 8-bit JPEG baseline
and JPEG 2000, and pydicom itself RLE.
"""

from __future__ import annotations

import errno
import logging
import struct
import zlib
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from nbiafs.dicomhead import Unnamed
from nbiafs.errors import NbiaError

# pydicom logs every decoder that cannot decode an image as an ERROR with a traceback; the
# mount reports the reason itself, once per open, as a warning (PreviewError).
logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)

MAX_SIDE = 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PreviewError(NbiaError):
    """The instance cannot be shown (no pixel data, or a compression pydicom cannot decode)."""

    errno = errno.EIO


def render(source: BinaryIO) -> bytes:
    """The PNG of the DICOM instance read from `source`."""
    return png(reduce(image_of(source)))


def image_of(source: BinaryIO) -> np.ndarray:
    """The 8-bit image (grey, or RGB) of the DICOM instance read from `source`."""
    try:
        ds = pydicom.dcmread(Unnamed(source))  # a cache file, which may be renamed meanwhile
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise PreviewError(f"not a DICOM file: {exc}") from None
    try:
        pixels = ds.pixel_array
    except (AttributeError, ValueError, NotImplementedError, RuntimeError, KeyError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f" ({syntax.name})" if syntax is not None else ""
        reason = " ".join(str(exc).split())
        if syntax is not None and syntax.is_compressed and not _codecs_installed():
            reason += "; decoders for compressed pixel data come with: pip install 'nbiafs[codecs]'"
        raise PreviewError(f"cannot show the pixels of this instance{what}: {reason}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3:  # colour: pydicom gives RGB (YBR converted)
        image = _to_8bit(pixels.astype(np.float64), 0, float(pixels.max() or 1))
    elif photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        rgb = apply_color_lut(pixels, ds).astype(np.float64)
        image = _to_8bit(rgb, 0, float(rgb.max() or 1))
    else:
        image = windowed(ds, pixels)
        if photometric == "MONOCHROME1":
            image = 255 - image
    return image


def _codecs_installed() -> bool:
    from importlib.util import find_spec
    return all(find_spec(m) is not None for m in ("pylibjpeg", "libjpeg", "openjpeg", "rle"))


def windowed(ds, pixels: np.ndarray) -> np.ndarray:
    """8-bit grey values of `pixels` through the modality LUT and the instance's window."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    values = pixels.astype(np.float64) * slope + intercept
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        # PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped.
        scaled = ((values - (center - 0.5)) / max(width - 1, 1e-9) + 0.5) * 255.0
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    return _to_8bit(values, float(lo), float(hi))


def _first(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _to_8bit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = hi - lo if hi > lo else 1.0
    return np.clip(np.rint((values - lo) / span * 255.0), 0, 255).astype(np.uint8)


def reduce(image: np.ndarray, max_side: int | None = None) -> np.ndarray:
    """Reduced by the smallest whole factor that brings both sides to at most `max_side`
    (MAX_SIDE)."""
    factor = -(-max(image.shape[:2]) // (max_side or MAX_SIDE))
    if factor <= 1:
        return image
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, *image.shape[2:])
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def png(image: np.ndarray) -> bytes:
    """An 8-bit greyscale (2-D) or RGB (H×W×3) array as PNG bytes (filter 0 rows, zlib)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    colour_type = 2 if image.ndim == 3 else 0
    rows = image.reshape(height, -1)
    raw = np.hstack([np.zeros((height, 1), dtype=np.uint8), rows]).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
