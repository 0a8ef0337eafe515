"""Previews of compressed series: pydicom's own bundled sample files (written by DCMTK, GDCM and
others, not by nbiafs) served by the local archive from a DICOM folder, mounted with
--previews. Every transfer syntax below must render; lossless ones must equal the preview of
the same image stored another way (decoded from a file outside the mount)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1,
                         JPEGLSLossless, RLELossless)
from test_previews import read_png

from nbiafs import naming
from nbiafs.archive.content import load_dicom_dir
from nbiafs.archive.server import LocalArchive
from nbiafs.preview import image_of, reduce

SAMPLES = Path(pydicom.__file__).parent / "data" / "test_files"

# file -> (its transfer syntax, a file of the same image stored losslessly another way, or None)
CASES = {
    "examples_ybr_color.dcm": (JPEGBaseline8Bit, None),
    "JPGExtended.dcm": (JPEGExtended12Bit, None),
    "SC_rgb_jpeg_gdcm.dcm": (JPEGLosslessSV1, "SC_rgb_rle.dcm"),
    "MR_small_jpeg_ls_lossless.dcm": (JPEGLSLossless, "MR_small.dcm"),
    "examples_jpeg2k.dcm": (JPEG2000Lossless, None),
    "693_J2KI.dcm": (JPEG2000, None),
    "rtdose_rle_1frame.dcm": (RLELossless, "rtdose_1frame.dcm"),
}


@pytest.fixture(scope="module")
def compressed_archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pydicom-samples")
    for name, (syntax, _) in CASES.items():
        ds = pydicom.dcmread(SAMPLES / name, stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == syntax, name
        coll = folder / syntax.name.split(" (")[0].replace(" ", "-").replace(",", "")
        coll.mkdir(exist_ok=True)
        shutil.copyfile(SAMPLES / name, coll / name)
    archive = LocalArchive(load_dicom_dir(folder)).start()
    yield archive, folder
    archive.stop()


def test_every_compressed_syntax_has_a_preview(compressed_archive, mount_factory):
    archive, folder = compressed_archive
    m = mount_factory(archive.url, "compressed", extra=("--previews",))
    served = {s.instances[0].sop_uid: s for s in archive.index.iter_series("nbia_guest")}
    assert len(served) == len(CASES)
    for name, (syntax, twin) in CASES.items():
        path = next(folder.rglob(name))
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        s = served[ds.SOPInstanceUID]
        folder_in_mount = m.path(*(naming.escape(p) for p in (s.collection["Collection"], s.patient["PatientID"],
                                                              s.study["StudyInstanceUID"], s.uid)))
        instance = folder_in_mount / naming.instance_file_name(ds.SOPInstanceUID)
        assert hashlib.md5(instance.read_bytes()).digest() == hashlib.md5(path.read_bytes()).digest(), name
        shown = read_png((folder_in_mount / ".preview.png").read_bytes())
        with open(path, "rb") as f:
            expected = reduce(image_of(f))
        assert shown.shape == expected.shape, (name, syntax.name)
        assert shown.std() > 1, f"{name} ({syntax.name}): a blank preview"
        assert np.array_equal(shown, expected), name  # what the mount shows is what the file holds
        if twin:
            with open(SAMPLES / twin, "rb") as f:
                assert np.array_equal(shown, reduce(image_of(f))), f"{name} differs from {twin}"
    assert "Traceback" not in m.log()
    assert os.path.ismount(m.mountpoint)
