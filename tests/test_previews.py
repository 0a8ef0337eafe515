"""`--previews`: a `.preview.png` in each series folder, through real mounts. The PNG is decoded
here by its own reader and compared with the archive's instance windowed by pydicom."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import public_series, series_path
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from nbiafs.preview import png, reduce, render

PREVIEWS = ("--previews", "--timeout", "3")


def read_png(data: bytes) -> np.ndarray:
    """A small PNG reader for what a preview may be: 8-bit grey or RGB, not interlaced."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and colour in (0, 2) and interlace == 0
    channels = 3 if colour == 2 else 1
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + width * channels)
    assert not rows[:, 0].any()  # filter type 0 on every row
    image = rows[:, 1:]
    return image.reshape(height, width, 3) if channels == 3 else image


def windowed_by_pydicom(path: Path) -> np.ndarray:
    """The instance through pydicom's own modality and VOI LUTs, scaled to 0-255."""
    ds = pydicom.dcmread(path)
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    lo, hi = apply_voi_lut(np.array([-1e9, 1e9]), ds)  # the output range pydicom maps to
    return np.rint((values - lo) / (hi - lo) * 255)


def many_instance_series(archive):
    return max(public_series(archive), key=lambda s: len(s.instances))


def test_preview_is_the_middle_instance_windowed(nbia_archive, mount_factory, tmp_path):
    s = many_instance_series(nbia_archive)
    assert len(s.instances) >= 5
    m = mount_factory(nbia_archive.url, extra=PREVIEWS)
    folder = m.path(series_path(s))
    listing = subprocess.run(["ls", "-la", str(folder)], capture_output=True, text=True, check=True).stdout
    assert ".preview.png" in listing
    assert ".preview.png" not in subprocess.run(["ls", str(folder)], capture_output=True, text=True).stdout
    preview = folder / ".preview.png"
    assert preview.stat().st_size == 0 and os.getxattr(preview, "user.nbiafs.cached") == b"no"
    nbia_archive.reset_counters()

    subprocess.run(["cp", str(preview), str(tmp_path / "p.png")], check=True)  # st_size said 0
    data = (tmp_path / "p.png").read_bytes()
    image = read_png(data)
    middle = sorted(s.instances, key=lambda i: i.sop_uid)[len(s.instances) // 2]
    assert os.getxattr(preview, "user.nbiafs.preview_of").decode() == middle.sop_uid
    expected = windowed_by_pydicom(middle.path)
    assert image.shape == expected.shape
    assert np.abs(image.astype(int) - expected).max() <= 1
    assert np.ptp(image) > 50  # an image, not a flat field
    others = [i for i in s.instances if i is not middle]
    assert any(np.abs(windowed_by_pydicom(i.path) - image).max() > 1 for i in others)  # not any slice
    assert preview.stat().st_size == len(data)  # exact once rendered
    time.sleep(1.0)
    calls = nbia_archive.counters()["endpoints"]
    # One instance fetched; the preview starts no prefetch of the series.
    assert calls.get("getSingleImage", 0) == 1 and calls.get("getImage", 0) == 0, calls
    # The instance it was rendered from is an ordinary cached file now.
    name = f"{middle.sop_uid}.dcm"
    assert os.getxattr(folder / name, "user.nbiafs.cached") == b"yes"
    assert hashlib.md5((folder / name).read_bytes()).hexdigest() == middle.md5
    m.stop()

    again = mount_factory(nbia_archive.url, name="again", cache_dir=m.cache_dir, extra=PREVIEWS)
    nbia_archive.reset_counters()
    preview = again.path(series_path(s), ".preview.png")
    assert preview.stat().st_size == len(data)  # remembered
    assert preview.read_bytes() == data
    assert nbia_archive.counters()["endpoints"].get("getSingleImage", 0) == 0


def test_a_preview_renders_while_its_instance_file_is_renamed(nbia_archive, tmp_path, monkeypatch):
    """The instance a preview shows is read from an open file of the cache, which the cache's
    own thread renames (stores) at any moment. Rendering never looks at that file by name: here
    the name is gone while a check of it still says it exists (the instant before a rename)."""
    instance = many_instance_series(nbia_archive).instances[0]
    part = tmp_path / "download.part"
    part.write_bytes(Path(instance.path).read_bytes())
    with open(part, "rb") as source:
        part.rename(tmp_path / "stored.val")
        monkeypatch.setattr(os.path, "exists", lambda _path: True)
        data = render(source)
        monkeypatch.undo()
    assert np.abs(read_png(data).astype(int) - windowed_by_pydicom(instance.path)).max() <= 1


def test_no_previews_by_default(mounted, nbia_archive_server):
    s = many_instance_series(nbia_archive_server)
    assert ".preview.png" not in os.listdir(mounted.path(series_path(s)))
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.path(series_path(s), ".preview.png"))


def test_a_preview_the_archive_fails_to_serve_is_eio_then_works(nbia_archive, mount_factory):
    s = many_instance_series(nbia_archive)
    m = mount_factory(nbia_archive.url, name="outage", extra=PREVIEWS)
    preview = m.path(series_path(s), ".preview.png")
    nbia_archive.set_faults(image_outage=True)
    with pytest.raises(OSError) as info:
        preview.read_bytes()
    assert info.value.errno == 5  # EIO
    assert preview.stat().st_size == 0 and os.getxattr(preview, "user.nbiafs.cached") == b"no"
    nbia_archive.set_faults(image_outage=False)
    assert read_png(preview.read_bytes()).size > 0


def test_png_writer_and_reduction():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert (read_png(png(grey)) == grey).all()
    rgb = np.stack([grey, grey[::-1], grey.T], axis=-1)
    assert (read_png(png(rgb)) == rgb).all()
    big = np.full((3000, 1500), 200, dtype=np.uint8)
    big[:3, :3] = 0
    small = reduce(big)
    assert small.shape == (1000, 500) and small[0, 0] == 0 and small[1, 1] == 200
