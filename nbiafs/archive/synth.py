"""Generate a synthetic archive: real DICOM Part-10 files plus an index.

Everything is derived from the spec (seed included), so the same spec always
gives the same UIDs and byte-identical files. Files are written once into a data
directory (keyed by the spec) and served from disk; only the index is held in
memory, so a large spec does not need its size in RAM.

The index is a tree of plain dicts keyed by the NBIA column names
(collection -> patients -> studies -> series -> instances). A key that the real
archive would leave out (a NULL column) is simply absent.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from nbiafs import __version__
from nbiafs.archive import phantom
from nbiafs.archive.spec import ArchiveSpec
from nbiafs.archive.zipwriter import DeflateStore

log = logging.getLogger(__name__)

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's organisation root, for generated UIDs
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
INDEX_NAME = "index.json"

COLLECTION_NAMES = ["Phantom-Thorax-CT", "Phantom-Body-MR", "Phantom-Screening",
                    "Phantom-Longitudinal", "Phantom-Multi-Site"]
RESTRICTED_COLLECTION = "Phantom-Restricted"
RESTRICTED_GRANTED_TO = "researcher"
LICENSE = ("Creative Commons Attribution 4.0 International License",
           "https://creativecommons.org/licenses/by/4.0/")


def _uid(spec: ArchiveSpec, *parts: object) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(spec.seed), *map(str, parts)])


def _date(rng: random.Random, start: str, days: int) -> str:
    d = dt.date.fromisoformat(start) + dt.timedelta(days=rng.randrange(days))
    return d.isoformat()


# --------------------------------------------------------------------------- plan
def plan_archive(spec: ArchiveSpec) -> dict:
    """Return the index tree (without file sizes) that `spec` describes."""
    rng = random.Random(spec.seed)
    collections = []
    for c in range(spec.collections):
        name = COLLECTION_NAMES[c] if c < len(COLLECTION_NAMES) else f"Phantom-{c + 1:02d}"
        modality = "CT" if c % 2 == 0 else "MR"
        coll = _plan_collection(spec, rng, name, modality, spec.patients, restricted=False)
        collections.append(coll)
    if spec.big_series and collections:
        patient = collections[0]["patients"][0]
        study = patient["studies"][0]
        for k in range(spec.big_series):
            big = _plan_series(spec, rng, collections[0]["Collection"], patient["PatientID"], study,
                               100 + k, "CT", spec.big_series_instances, tuple(study["series"][0]["lesion"]),
                               description=f"AXIAL 1.25mm STANDARD {k + 1}")
            big["matrix"] = spec.big_matrix
            big["slice_thickness"] = 1.25
            study["series"].append(big)
    if spec.awkward:
        _add_awkward_cases(spec, rng, collections)
    if spec.hostile:
        _add_hostile_cases(spec, rng, collections)
    carts = {}
    if collections and collections[0]["patients"]:
        first = [s for st in collections[0]["patients"][0]["studies"] for s in st["series"]]
        carts["nbia-demo-cart"] = [s["SeriesInstanceUID"] for s in first[:2]]
    return {"generator": __version__, "spec": dataclasses.asdict(spec),
            "collections": collections, "carts": carts}


def _plan_collection(spec, rng, name, modality, n_patients, restricted):
    abbr = "".join(w[0] for w in name.split("-")).upper()
    coll = {"Collection": name, "restricted": restricted,
            "LicenseName": LICENSE[0], "LicenseURI": LICENSE[1],
            "CollectionURI": f"https://doi.org/10.0000/NBIAFS.{abbr}", "patients": []}
    for p in range(n_patients):
        pid = f"{abbr}-{p + 1:03d}"
        coll["patients"].append(_plan_patient(spec, rng, name, pid, modality))
    return coll


def _plan_patient(spec, rng, collection, pid, modality, n_studies=None):
    patient = {"PatientID": pid, "PatientName": pid, "PatientSex": rng.choice("MF"),
               "Phantom": "YES", "SpeciesCode": "L-85B00",
               "SpeciesDescription": "Homo sapiens", "studies": []}
    for s in range(spec.studies if n_studies is None else n_studies):
        study_uid = _uid(spec, collection, pid, "study", s)
        study_date = _date(rng, "2001-01-01", 3000)
        study: dict[str, Any] = {"StudyInstanceUID": study_uid, "StudyDate": study_date,
                 "StudyDescription": f"{'CT CHEST ABD' if modality == 'CT' else 'MR ABDOMEN'} W CONTRAST",
                 "StudyID": str(1000 + s), "PatientAge": f"{rng.randrange(35, 80):03d}Y",
                 "series": []}
        if s > 0:
            study["LongitudinalTemporalEventType"] = "Diagnosis"
            study["LongitudinalTemporalOffsetFromEvent"] = 30 * s
        lesion = (rng.uniform(-0.45, 0.45), rng.uniform(-0.2, 0.1), rng.uniform(-0.3, 0.5),
                  rng.uniform(0.04, 0.09))
        for k in range(spec.series):
            series_modality = modality if k % 2 == 0 else ("MR" if modality == "CT" else "CT")
            study["series"].append(_plan_series(spec, rng, collection, pid, study, k,
                                                series_modality, spec.instances, lesion))
        patient["studies"].append(study)
    return patient


def _plan_series(spec, rng, collection, pid, study, k, modality, n_instances, lesion,
                 description=None):
    uid = _uid(spec, collection, pid, study["StudyInstanceUID"], "series", k)
    thickness = rng.choice([1.25, 2.5, 3.0, 5.0]) if modality == "CT" else rng.choice([3.0, 4.0, 5.0])
    released = _date(rng, "2019-01-01", 1500)
    series = {
        "SeriesInstanceUID": uid, "Modality": modality,
        "ProtocolName": "CHEST ABD PELVIS" if modality == "CT" else "T1 AXIAL",
        "SeriesDate": study["StudyDate"],
        "SeriesDescription": description or (
            f"AXIAL {thickness:g}mm {'STANDARD' if modality == 'CT' else 'T1 FS POST'}"),
        "BodyPartExamined": "CHEST" if modality == "CT" else "ABDOMEN",
        "SeriesNumber": k + 1 if modality == "MR" else 2 + k,
        "AnnotationsFlag": False,
        "Manufacturer": "NBIAFS PHANTOM WORKS",
        "ManufacturerModelName": "SynthScan 64" if modality == "CT" else "SynthMR 1.5T",
        "SoftwareVersions": __version__,
        "TimeStamp": released,
        "DateReleased": released,
        "ThirdPartyAnalysis": "NO",
        "slice_thickness": thickness,
        "lesion": list(lesion),
        "instances": [],
    }
    for i in range(n_instances):
        series["instances"].append(_plan_instance(spec, uid, i))
    return series


def _plan_instance(spec, series_uid, i):
    return {"SOPInstanceUID": _uid(spec, series_uid, "sop", i),
            "InstanceNumber": i + 1, "AcquisitionNumber": 1}


def _add_awkward_cases(spec, rng, collections):
    """The real archive's awkwardness, each case once (see the module docstring of spec)."""
    first = collections[0]
    # A one-instance series (a localizer) in the first study.
    study = first["patients"][0]["studies"][0]
    loc = _plan_series(spec, rng, first["Collection"], first["patients"][0]["PatientID"],
                       study, 90, "CT", 1, (0.0, 0.0, 0.0, 0.05), description="LOCALIZER")
    loc["SeriesNumber"] = 1
    study["series"].insert(0, loc)
    # A series with optional columns left out (NULLs are omitted by the archive).
    bare = study["series"][-1]
    for key in ("ProtocolName", "SeriesDescription", "BodyPartExamined", "SoftwareVersions"):
        bare.pop(key, None)
    # A patient ID with spaces and lower case, and omitted patient columns.
    odd = first["patients"][-1]
    old_id = odd["PatientID"]
    odd["PatientID"] = odd["PatientName"] = f"phantom {old_id.lower()} b"
    for key in ("PatientSex", "SpeciesCode", "SpeciesDescription"):
        odd.pop(key, None)
    # A patient ID that cannot be a path component as it is (a slash).
    if len(collections) > 1 and collections[1]["patients"]:
        slash = collections[1]["patients"][-1]
        slash["PatientID"] = slash["PatientName"] = slash["PatientID"] + "/A"
    # A patient with no studies.
    first["patients"].append({"PatientID": "NOSTUDY-001", "PatientName": "NOSTUDY-001",
                              "PatientSex": "O", "Phantom": "YES", "studies": []})
    # A restricted collection, visible only to the user granted it.
    restricted = _plan_collection(spec, rng, RESTRICTED_COLLECTION, "CT", 1, restricted=True)
    restricted["granted_to"] = [RESTRICTED_GRANTED_TO]
    collections.append(restricted)


HOSTILE_COLLECTION = "Phantom-Hostile"
HOSTILE_PATIENT_IDS = [".", "..", "", "a/b", "a%2Fb", "%", "L" * 300, "Ünïcødé 患者 001",
                       "CASE-001", "case-001", "-rf", "*?[]"]

ESCAPE_SOP_UID = "../../../../../../tmp/nbiafs-escape"
NAMES_TWIN_SUFFIX = "777123456"


def _add_hostile_cases(spec, rng, collections):
    """Names and records no archive should send, each once, in two extra collections:
    - patient IDs that are not path components as they are, or are awkward for shells
      (`HOSTILE_PATIENT_IDS`), including two that differ only by case (string filters of
      the archive match case-insensitively, so asking for one returns both);
    - a second collection whose name differs only by case (`phantom-hostile`), holding a
      patient with the same ID as one in the first;
    - two patients (DUP-A, DUP-B) sharing one StudyInstanceUID, each with its own series;
    - a series whose ImageCount/ObjectCount claim two instances more than
      getSOPInstanceUIDs lists, and one claiming one fewer;
    - an instance whose SOPInstanceUID in the archive's records is a relative path
      climbing out of wherever it is joined (`ESCAPE_SOP_UID`);
    - a study (NAMES-001) whose readable names are awkward: a description with `/` and a
      line break, two series alike in number, modality and description whose UIDs end in
      the same digits (`NAMES_TWIN_SUFFIX`), one with a 300-character description.
    Files keep DICOM-valid header values (the archive's records are what is hostile)."""
    coll: dict[str, Any] = {"Collection": HOSTILE_COLLECTION, "restricted": False, "LicenseName": LICENSE[0],
            "LicenseURI": LICENSE[1], "CollectionURI": "https://doi.org/10.0000/NBIAFS.PH",
            "patients": []}
    for n, pid in enumerate(HOSTILE_PATIENT_IDS):
        patient = _plan_patient(spec, rng, HOSTILE_COLLECTION, f"hostile-{n}", "CT", n_studies=1)
        patient["PatientID"] = patient["PatientName"] = pid
        patient["DicomPatientID"] = f"HOSTILE-{n:03d}"
        coll["patients"].append(patient)
    dup_a = _plan_patient(spec, rng, HOSTILE_COLLECTION, "DUP-A", "CT", n_studies=1)
    dup_b = _plan_patient(spec, rng, HOSTILE_COLLECTION, "DUP-B", "MR", n_studies=1)
    dup_b["studies"][0]["StudyInstanceUID"] = dup_a["studies"][0]["StudyInstanceUID"]
    counts = _plan_patient(spec, rng, HOSTILE_COLLECTION, "COUNT-001", "CT", n_studies=1)
    over, under = counts["studies"][0]["series"][0], dict(counts["studies"][0]["series"][0])
    over["reported_count"] = len(over["instances"]) + 2
    under_uid = _uid(spec, "COUNT-001", "under")
    under.update(SeriesInstanceUID=under_uid, SeriesNumber=9,
                 instances=[_plan_instance(spec, under_uid, i) for i in range(spec.instances)],
                 reported_count=spec.instances - 1)
    counts["studies"][0]["series"].append(under)
    escape = _plan_patient(spec, rng, HOSTILE_COLLECTION, "ESCAPE-001", "CT", n_studies=1)
    climbing = escape["studies"][0]["series"][0]["instances"][0]
    climbing["DicomSOPInstanceUID"] = climbing["SOPInstanceUID"]
    climbing["SOPInstanceUID"] = ESCAPE_SOP_UID
    names = _plan_patient(spec, rng, HOSTILE_COLLECTION, "NAMES-001", "CT", n_studies=1)
    study = names["studies"][0]
    study["StudyDescription"] = "CT/PET\nFOLLOW-UP"
    twin_a = study["series"][0]
    twin_a.update(SeriesInstanceUID=f"{UID_ROOT}1.{NAMES_TWIN_SUFFIX}", SeriesNumber=5,
                  SeriesDescription="AXIAL/CORONAL")
    twin_b = _plan_series(spec, rng, HOSTILE_COLLECTION, "NAMES-001", study, 5, "CT", spec.instances,
                          twin_a["lesion"], description="AXIAL/CORONAL")
    twin_b.update(SeriesInstanceUID=f"{UID_ROOT}2.{NAMES_TWIN_SUFFIX}", SeriesNumber=5)
    for s in (twin_a, twin_b):
        s["instances"] = [_plan_instance(spec, s["SeriesInstanceUID"], i) for i in range(spec.instances)]
    long_one = _plan_series(spec, rng, HOSTILE_COLLECTION, "NAMES-001", study, 6, "CT", spec.instances,
                            twin_a["lesion"], description="VERY LONG " * 30)
    long_one["DicomSeriesDescription"] = "VERY LONG"  # the file stays valid (LO: 64 characters)
    study["series"] += [twin_b, long_one]
    coll["patients"] += [dup_a, dup_b, counts, escape, names]
    lower = {**coll, "Collection": HOSTILE_COLLECTION.lower(), "patients": [
        _plan_patient(spec, rng, HOSTILE_COLLECTION.lower(), "CASE-001", "MR", n_studies=1)]}
    collections += [coll, lower]


# --------------------------------------------------------------------------- write
def generate(spec: ArchiveSpec, root: Path) -> dict:
    """Generate `spec` under `root` (once) and return its index.

    Files are written into a temporary sibling directory renamed into place at
    the end, so an interrupted run never leaves a half-generated archive.
    """
    root = Path(root)
    index_path = root / INDEX_NAME
    if index_path.exists():
        return json.loads(index_path.read_text())
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "files").mkdir(parents=True)
    index = plan_archive(spec)
    for coll in index["collections"]:
        for patient in coll["patients"]:
            for study in patient["studies"]:
                for series in study["series"]:
                    _write_series(spec, tmp, coll, patient, study, series)
    _deflate_all(tmp, index)
    (tmp / INDEX_NAME).write_text(json.dumps(index))
    try:
        os.rename(tmp, root)
    except OSError:  # another process generated it first
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(index_path.read_text())


def _deflate_all(root: Path, index: dict) -> None:
    """Compress every file once for the zips (see zipwriter.py)."""
    from nbiafs.archive.server import deflate_name
    store = DeflateStore(root / "deflate")
    for coll in index["collections"]:
        for patient in coll["patients"]:
            for study in patient["studies"]:
                for series in study["series"]:
                    for inst in series["instances"]:
                        store.get(deflate_name(series["SeriesInstanceUID"], inst["SOPInstanceUID"]),
                                  root / inst["file"])


def _write_series(spec, root, coll, patient, study, series):
    folder = root / "files" / series["SeriesInstanceUID"]
    folder.mkdir(parents=True, exist_ok=True)
    n = len(series["instances"])
    for idx, inst in enumerate(series["instances"]):
        _write_instance(spec, folder, coll, patient, study, series, inst, idx, n, pad=0)
    # Instance sizes differ by a few bytes, as real ones do, so that the mean
    # size TotalSizeInBytes / ObjectCount is never the size of any file.
    for _attempt in range(8):
        sizes = [i["size"] for i in series["instances"]]
        if n < 2 or sum(sizes) % n or sum(sizes) // n not in sizes:
            break
        last = series["instances"][-1]
        _write_instance(spec, folder, coll, patient, study, series, last, n - 1, n,
                        pad=2 * (_attempt + 1))


def _write_instance(spec, folder, coll, patient, study, series, inst, idx, n, pad):
    ds = build_dataset(spec, coll, patient, study, series, inst, idx, n, pad)
    path = folder / f"{inst.get('DicomSOPInstanceUID', inst['SOPInstanceUID'])}.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    inst["file"] = str(path.relative_to(folder.parent.parent))
    inst["size"] = len(data)
    inst["md5"] = hashlib.md5(data).hexdigest()


def build_dataset(spec, coll, patient, study, series, inst, idx, n, pad=0) -> Dataset:
    modality = series["Modality"]
    matrix = series.get("matrix", spec.matrix)
    fov_mm = 400.0 if modality == "CT" else 380.0
    spacing = fov_mm / matrix
    thickness = series["slice_thickness"]
    z_mm = -idx * thickness  # head first: positions go down the body
    z_norm = 1.0 - 2.0 * (idx + 0.5) / max(n, 1) if n > 1 else 0.0
    rng = np.random.default_rng([spec.seed, idx, int(series["SeriesInstanceUID"][-9:])])
    lesion = tuple(series["lesion"])

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(CT_STORAGE if modality == "CT" else MR_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(inst.get("DicomSOPInstanceUID", inst["SOPInstanceUID"]))
    ds.file_meta.ImplementationClassUID = UID(UID_ROOT + "1")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if series.get("SeriesDescription") != "LOCALIZER" \
        else ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = \
        study["StudyDate"].replace("-", "")
    ds.StudyTime = "101500"
    ds.SeriesTime = "102000"
    ds.AcquisitionTime = ds.ContentTime = f"1020{idx % 60:02d}"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = series["Manufacturer"]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study["StudyDescription"]
    if "SeriesDescription" in series:
        ds.SeriesDescription = series.get("DicomSeriesDescription", series["SeriesDescription"])
    ds.ManufacturerModelName = series["ManufacturerModelName"]
    ds.PatientName = patient.get("DicomPatientID", patient["PatientName"])
    ds.PatientID = patient.get("DicomPatientID", patient["PatientID"])
    ds.PatientBirthDate = ""
    ds.PatientSex = patient.get("PatientSex", "")
    ds.PatientAge = study["PatientAge"]
    ds.PatientIdentityRemoved = "YES"
    if "BodyPartExamined" in series:
        ds.BodyPartExamined = series["BodyPartExamined"]
    ds.SliceThickness = f"{thickness:g}"
    if "ProtocolName" in series:
        ds.ProtocolName = series["ProtocolName"]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.SeriesInstanceUID = series["SeriesInstanceUID"]
    ds.StudyID = study["StudyID"]
    ds.SeriesNumber = series["SeriesNumber"]
    ds.AcquisitionNumber = inst["AcquisitionNumber"]
    ds.InstanceNumber = inst["InstanceNumber"]
    origin = -fov_mm / 2 + spacing / 2
    ds.ImagePositionPatient = [f"{origin:.4f}", f"{origin:.4f}", f"{z_mm:.4f}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = _uid(spec, study["StudyInstanceUID"], "for")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z_mm:.4f}"
    # Free text whose length varies from slice to slice, as real headers do.
    ds.ImageComments = f"nbiafs phantom slice {idx + 1} of {n}" + " z" * (idx % 5) + "x" * pad
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = matrix
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    if modality == "CT":
        hu = phantom.ct_slice(matrix, z_norm, lesion, spec.noise_hu, rng)
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.KVP = 120
        pixels = np.clip(np.rint(hu + 1024), -32768, 32767).astype("<i2")
    else:
        sig = phantom.mr_slice(matrix, z_norm, lesion, spec.noise_hu, rng)
        ds.PixelRepresentation = 0
        ds.WindowCenter = 450
        ds.WindowWidth = 900
        ds.MagneticFieldStrength = 1.5
        ds.RepetitionTime = 500
        ds.EchoTime = 12
        pixels = np.clip(np.rint(sig), 0, 65535).astype("<u2")
    ds.PixelData = pixels.tobytes()
    return ds
