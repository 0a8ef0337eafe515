"""Where the local archive's content comes from: a synthetic spec or a DICOM folder.

Synthetic archives are generated once into ``$NBIAFS_ARCHIVE_DATA`` (default
``$XDG_CACHE_HOME/nbiafs-archive``, i.e. ``~/.cache/nbiafs-archive``), one
subdirectory per spec, and reused by later starts.

A DICOM folder (``--dicom-dir DIR``) is indexed from the files' headers: each
subdirectory of DIR is a collection (named after the subdirectory); files
directly in DIR belong to a collection named after DIR itself. Patients,
studies and series come from PatientID, StudyInstanceUID and SeriesInstanceUID.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from nbiafs.archive.records import ArchiveIndex
from nbiafs.archive.spec import ArchiveSpec, parse_spec
from nbiafs.archive.synth import LICENSE, generate

log = logging.getLogger(__name__)


def default_data_root() -> Path:
    if os.environ.get("NBIAFS_ARCHIVE_DATA"):
        return Path(os.environ["NBIAFS_ARCHIVE_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nbiafs-archive"


def load_synthetic(spec: ArchiveSpec | str, data_root: Path | None = None) -> ArchiveIndex:
    if isinstance(spec, str):
        spec = parse_spec(spec)
    root = Path(data_root or default_data_root()) / spec.key()
    tree = generate(spec, root)
    return ArchiveIndex(tree, root, root / "deflate")


def _date(value) -> str | None:
    text = str(value or "").strip()
    if len(text) >= 8 and text[:8].isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:8]}"
    return None


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip()


def load_dicom_dir(folder: Path) -> ArchiveIndex:
    """Index every DICOM Part-10 file below `folder` (non-DICOM files are skipped)."""
    folder = Path(folder).resolve()
    collections: dict[str, dict] = {}
    series_by_uid: dict[str, dict] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        sop, series_uid = _text(ds, "SOPInstanceUID"), _text(ds, "SeriesInstanceUID")
        study_uid, pid = _text(ds, "StudyInstanceUID"), _text(ds, "PatientID")
        if not (sop and series_uid and study_uid and pid):
            log.warning("skipping %s: missing patient/study/series/instance UID", path)
            continue
        rel = path.relative_to(folder)
        coll_name = rel.parts[0] if len(rel.parts) > 1 else folder.name
        coll = collections.setdefault(coll_name, {
            "Collection": coll_name, "restricted": False, "LicenseName": LICENSE[0],
            "LicenseURI": LICENSE[1], "patients": []})
        patient = _find_or_add(coll["patients"], "PatientID", pid, {
            "PatientID": pid, "PatientName": _text(ds, "PatientName"),
            "PatientSex": _text(ds, "PatientSex"), "studies": []})
        study = _find_or_add(patient["studies"], "StudyInstanceUID", study_uid, {
            "StudyInstanceUID": study_uid, "StudyDate": _date(ds.get("StudyDate")),
            "StudyDescription": _text(ds, "StudyDescription"), "StudyID": _text(ds, "StudyID"),
            "PatientAge": _text(ds, "PatientAge"), "series": []})
        series = series_by_uid.get(series_uid)
        if series is None:
            series = series_by_uid[series_uid] = {
                "SeriesInstanceUID": series_uid, "Modality": _text(ds, "Modality"),
                "ProtocolName": _text(ds, "ProtocolName"), "SeriesDate": _date(ds.get("SeriesDate")),
                "SeriesDescription": _text(ds, "SeriesDescription"),
                "BodyPartExamined": _text(ds, "BodyPartExamined"),
                "SeriesNumber": int(ds.SeriesNumber) if _text(ds, "SeriesNumber") else None,
                "AnnotationsFlag": False, "Manufacturer": _text(ds, "Manufacturer"),
                "ManufacturerModelName": _text(ds, "ManufacturerModelName"),
                "SoftwareVersions": _text(ds, "SoftwareVersions"), "instances": []}
            study["series"].append(series)
        data = path.read_bytes()
        series["instances"].append({
            "SOPInstanceUID": sop, "file": str(rel), "size": len(data),
            "md5": hashlib.md5(data).hexdigest(),
            "InstanceNumber": int(ds.InstanceNumber) if _text(ds, "InstanceNumber") else 0,
            "AcquisitionNumber": int(ds.AcquisitionNumber) if _text(ds, "AcquisitionNumber") else 1})
    for series in series_by_uid.values():
        for key in [k for k, v in series.items() if v is None]:
            del series[key]
    return ArchiveIndex({"collections": list(collections.values()), "carts": {}}, folder)


def _find_or_add(items: list[dict], key: str, value: str, new: dict) -> dict:
    """The item of `items` whose `key` is `value`, or `new`, added."""
    for item in items:
        if item[key] == value:
            return item
    items.append(new)
    return new
