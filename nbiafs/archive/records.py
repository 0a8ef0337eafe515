"""The archive's index, with lookups and the NBIA record shape of every endpoint.

Records are built in the production column order and omit absent (NULL)
columns, exactly as the real server does (shared/nbia-api.md). Dates are stored
as ISO dates in the index and rendered as ``"YYYY-MM-DD 00:00:00.0"``.
Visibility: a restricted collection is seen only by users granted it; every
lookup takes the set of collections the caller may see.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

PATIENT_KEYS = ["PatientId", "PatientName", "PatientBirthDate", "PatientSex", "EthnicGroup",
                "Collection", "Phantom", "SpeciesCode", "SpeciesDescription"]
STUDY_KEYS = ["StudyInstanceUID", "StudyDate", "StudyDescription", "AdmittingDiagnosesDescription",
              "StudyID", "PatientAge", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
              "EthnicGroup", "Collection", "SeriesCount", "LongitudinalTemporalEventType",
              "LongitudinalTemporalOffsetFromEvent"]
SERIES_KEYS = ["SeriesInstanceUID", "StudyInstanceUID", "Modality", "ProtocolName", "SeriesDate",
               "SeriesDescription", "BodyPartExamined", "SeriesNumber", "AnnotationsFlag",
               "Collection", "PatientID", "Manufacturer", "ManufacturerModelName",
               "SoftwareVersions", "ImageCount", "TimeStamp", "LicenseName", "LicenseURI",
               "CollectionURI", "FileSize", "DateReleased", "StudyDesc", "StudyDate",
               "ThirdPartyAnalysis"]
UPDATED_SERIES_KEYS = SERIES_KEYS[:15] + ["DateReleased"]
CART_KEYS = SERIES_KEYS[:15] + ["Date Released"]
METADATA_KEYS = ["Series UID", "Collection", "3rd Party Analysis", "Data Description URI",
                 "Subject ID", "Study UID", "Study Description", "Study Date",
                 "Series Description", "Manufacturer", "Modality", "SOP Class UID",
                 "Number of Images", "File Size", "File Location", "Series Number",
                 "License Name", "License URL", "Annotation Size", "Date Released",
                 "Series Date", "Protocol Name", "Body Part Examined", "Annotations Flag",
                 "Manufacturer Model Name", "Software Versions", "TimeStamp"]
SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def nbia_datetime(iso: str | None) -> str | None:
    """`2015-05-27` -> `2015-05-27 00:00:00.0`, the v1/v2 date rendering."""
    if not iso:
        return None
    return f"{iso[:10]} 00:00:00.0"


def ordered(keys: list[str], values: dict) -> dict:
    """Keep `keys` in order, dropping the ones that are absent or None."""
    return {k: values[k] for k in keys if values.get(k) is not None}


@dataclass
class Instance:
    sop_uid: str
    path: Path
    size: int
    md5: str
    instance_number: int
    acquisition_number: int


@dataclass
class Series:
    raw: dict
    collection: dict
    patient: dict
    study: dict
    instances: list[Instance] = field(default_factory=list)

    @property
    def uid(self) -> str:
        return self.raw["SeriesInstanceUID"]

    @property
    def reported_count(self) -> int:
        """ImageCount/ObjectCount as the archive's records give them (the hostile spec makes
        them disagree with the instance list)."""
        return self.raw.get("reported_count", len(self.instances))

    @property
    def total_size(self) -> int:
        return sum(i.size for i in self.instances)


class ArchiveIndex:
    """Read-only lookups over a generated (or scanned) archive. Thread-safe: never mutated."""

    def __init__(self, tree: dict, files_root: Path, deflate_dir: Path | None = None):
        self.files_root = Path(files_root)
        self.deflate_dir = deflate_dir  # compressed forms for zips; None: a temporary one
        self.collections: list[dict] = tree["collections"]
        self.carts: dict[str, list[str]] = tree.get("carts", {})
        self.series_by_uid: dict[str, Series] = {}
        self.instance_by_sop: dict[str, tuple[Series, Instance]] = {}
        for coll in self.collections:
            for patient in coll["patients"]:
                for study in patient["studies"]:
                    for raw in study["series"]:
                        s = Series(raw, coll, patient, study)
                        s.instances = [
                            Instance(i["SOPInstanceUID"], self.files_root / i["file"], i["size"],
                                     i["md5"], i.get("InstanceNumber", 0),
                                     i.get("AcquisitionNumber") or 1)
                            for i in raw["instances"]]
                        self.series_by_uid[s.uid] = s
                        for inst in s.instances:
                            self.instance_by_sop.setdefault(inst.sop_uid, (s, inst))

    # ------------------------------------------------------------ visibility
    def visible_collections(self, user: str | None) -> list[dict]:
        """Collections `user` may see; None is the anonymous v1 caller (public only)."""
        return [c for c in self.collections
                if not c.get("restricted") or (user is not None and user in c.get("granted_to", []))]

    def visible_series(self, user: str | None, uid: str) -> Series | None:
        s = self.series_by_uid.get(uid)
        if s is None or s.collection not in self.visible_collections(user):
            return None
        return s

    # ------------------------------------------------------------ records
    def patient_record(self, coll: dict, patient: dict) -> dict:
        values = dict(patient, PatientId=patient["PatientID"], Collection=coll["Collection"])
        return ordered(PATIENT_KEYS, values)

    def study_record(self, coll: dict, patient: dict, study: dict) -> dict:
        values = {**patient, **study, "Collection": coll["Collection"],
                  "StudyDate": nbia_datetime(study.get("StudyDate")),
                  "SeriesCount": len(study["series"])}
        return ordered(STUDY_KEYS, values)

    def series_record(self, s: Series, keys: list[str] = SERIES_KEYS) -> dict:
        raw = s.raw
        values = {**raw, "StudyInstanceUID": s.study["StudyInstanceUID"],
                  "Collection": s.collection["Collection"], "PatientID": s.patient["PatientID"],
                  "SeriesDate": nbia_datetime(raw.get("SeriesDate")),
                  "TimeStamp": nbia_datetime(raw.get("TimeStamp")),
                  "DateReleased": nbia_datetime(raw.get("DateReleased")),
                  "Date Released": nbia_datetime(raw.get("DateReleased")),
                  "ImageCount": s.reported_count, "FileSize": s.total_size,
                  "LicenseName": s.collection.get("LicenseName"),
                  "LicenseURI": s.collection.get("LicenseURI"),
                  "CollectionURI": s.collection.get("CollectionURI"),
                  "StudyDesc": s.study.get("StudyDescription"),
                  "StudyDate": nbia_datetime(s.study.get("StudyDate"))}
        return ordered(keys, values)

    def metadata_record(self, s: Series) -> dict:
        """getSeriesMetaData: keys with spaces, every value a string."""
        raw = s.raw
        values = {
            "Series UID": s.uid, "Collection": s.collection["Collection"],
            "3rd Party Analysis": raw.get("ThirdPartyAnalysis"),
            "Data Description URI": s.collection.get("CollectionURI"),
            "Subject ID": s.patient["PatientID"], "Study UID": s.study["StudyInstanceUID"],
            "Study Description": s.study.get("StudyDescription"),
            "Study Date": _mdy(s.study.get("StudyDate")),
            "Series Description": raw.get("SeriesDescription"),
            "Manufacturer": raw.get("Manufacturer"), "Modality": raw.get("Modality"),
            "SOP Class UID": SOP_CLASS.get(raw.get("Modality", "")),
            "Number of Images": str(s.reported_count), "File Size": str(s.total_size),
            "File Location": f"./{s.collection['Collection']}/{s.patient['PatientID']}/"
                             f"{s.study['StudyInstanceUID']}/{s.uid}",
            "Series Number": _str(raw.get("SeriesNumber")),
            "License Name": s.collection.get("LicenseName"),
            "License URL": s.collection.get("LicenseURI"), "Annotation Size": "0",
            "Date Released": _mdy(raw.get("DateReleased")),
            "Series Date": _mdy(raw.get("SeriesDate")),
            "Protocol Name": raw.get("ProtocolName"),
            "Body Part Examined": raw.get("BodyPartExamined"),
            "Annotations Flag": _str(raw.get("AnnotationsFlag")),
            "Manufacturer Model Name": raw.get("ManufacturerModelName"),
            "Software Versions": raw.get("SoftwareVersions"),
            "TimeStamp": _mdy(raw.get("TimeStamp")),
        }
        return ordered(METADATA_KEYS, values)

    # ------------------------------------------------------------ walks
    def iter_series(self, user: str | None):
        for coll in self.visible_collections(user):
            for patient in coll["patients"]:
                for study in patient["studies"]:
                    for raw in study["series"]:
                        yield self.series_by_uid[raw["SeriesInstanceUID"]]


def _str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _mdy(iso: str | None) -> str | None:
    if not iso:
        return None
    return dt.date.fromisoformat(iso[:10]).strftime("%m-%d-%Y")
