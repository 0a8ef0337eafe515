"""Typed records of the NBIA API, parsed tolerantly, in one shape whatever the API version.

The real server leaves NULL columns out, spells the patient key `PatientId` in
getPatient and `PatientID` elsewhere, sends numbers as numbers or sometimes as
strings (`"1234"`, `"1234.0"`, `"500.000000"`), and uses keys with spaces in
v1/v2 getSeriesMetaData. Parsing accepts all of that and ignores unknown keys.

Versions differ (shared/nbia-api-v4.md §8): v4 renamed `TimeStamp` to
`MaxSubmissionTimestamp` and `CollectionURI` to `DataDescriptionURI`, added
`Site`, `ReleasedStatus`, `Authorized` and patient columns to getSeries, dropped
`PatientBirthDate`, and writes dates `MM-DD-YYYY` where v1/v2 write
`YYYY-MM-DD HH:MM:SS.0`. `normalize` maps every record to one shape, here and
only here, so that times, readable names, sizes and extended attributes mean the
same on every version (docs/SEMANTICS.md, "API versions"):

- keys: v4's names (v1/v2 names renamed; getSeriesMetaData's spaced keys too);
- dates: ISO `YYYY-MM-DD` (v4 gives no time of day, so neither does v1/v2 here);
- `Authorized` (always 1: the server returns only rows the user may see) and
  `PatientBirthDate` (removed from TCIA's API in 2025) are dropped;
- `AnnotationsFlag` is a boolean; counts and sizes are integers;
- a patient without `Phantom`, `SpeciesCode` or `SpeciesDescription` gets what v4 answers
  for a NULL there (`NO`, `337915000`, `Homo sapiens`).

The normalized record is kept (`raw`) so the filesystem can show every column as
an extended attribute.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

log = logging.getLogger(__name__)

# v1/v2 name -> the one name (v4's). getSeriesMetaData (v1/v2) names its keys with spaces.
RENAMED = {
    "TimeStamp": "MaxSubmissionTimestamp", "CollectionURI": "DataDescriptionURI",
    "Date Released": "DateReleased",  # getContentsByName
    "Series UID": "SeriesInstanceUID", "Subject ID": "PatientID", "Study UID": "StudyInstanceUID",
    "Study Description": "StudyDesc", "Study Date": "StudyDate", "Series Description": "SeriesDescription",
    "Number of Images": "ImageCount", "File Size": "FileSize", "Series Number": "SeriesNumber",
    "License Name": "LicenseName", "License URL": "LicenseURI", "Series Date": "SeriesDate",
    "Protocol Name": "ProtocolName", "Body Part Examined": "BodyPartExamined",
    "Annotations Flag": "AnnotationsFlag", "Manufacturer Model Name": "ManufacturerModelName",
    "Software Versions": "SoftwareVersions", "Data Description URI": "DataDescriptionURI",
    "3rd Party Analysis": "ThirdPartyAnalysis", "SOP Class UID": "SOPClassUID",
    "Annotation Size": "AnnotationSize", "File Location": "FileLocation",
}
DROPPED = frozenset({"Authorized", "PatientBirthDate"})
# What v4 answers for a patient whose column is NULL (shared/nbia-api-v4.md §3), so v1/v2 get it too.
PATIENT_DEFAULTS = {"Phantom": "NO", "SpeciesCode": "337915000", "SpeciesDescription": "Homo sapiens"}
DATE_KEYS = frozenset({"StudyDate", "SeriesDate", "DateReleased", "MaxSubmissionTimestamp"})
INT_KEYS = frozenset({"ImageCount", "FileSize", "SeriesNumber", "SeriesCount", "TotalSizeInBytes",
                      "ObjectCount"})


def iso_date(value: Any) -> str | None:
    """`2015-05-27 17:12:21.0` (v1/v2), `05-27-2015` (v4), `2015-05-27` -> `2015-05-27`;
    anything else is returned as it is (never invented)."""
    if value is None:
        return None
    text = str(value).strip()
    for fmt, length in (("%Y-%m-%d", 10), ("%m-%d-%Y", 10), ("%Y/%m/%d", 10), ("%m/%d/%Y", 10)):
        try:
            return dt.datetime.strptime(text[:length], fmt).date().isoformat()
        except ValueError:
            continue
    return text or None


def as_bool(value: Any) -> bool | None:
    if isinstance(value, bool) or value is None:
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "y"):
        return True
    if text in ("false", "no", "0", "n"):
        return False
    return None


def normalize(raw: Mapping) -> dict:
    """One record of any endpoint and version in the one shape (see the module docstring)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key = RENAMED.get(key, key)
        if key in DROPPED or value is None or key in out:
            continue
        if key in DATE_KEYS:
            value = iso_date(value)
        elif key in INT_KEYS:
            value = _integral(value)
        elif key == "AnnotationsFlag":
            flag = as_bool(value)
            value = value if flag is None else flag
        if value is not None:
            out[key] = value
    return out


def as_int(value: Any) -> int | None:
    """1234, "1234", "1234.0", 1234.0 -> 1234; None, "", garbage -> None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return int(number) if number == number and abs(number) != float("inf") else None


def _integral(value: Any) -> Any:
    """1234, "1234", "500.000000" -> an int; anything else (2.5, "n/a") as it is."""
    number = as_int(value)
    try:
        return number if number is not None and float(str(value).strip()) == number else value
    except ValueError:
        return value


def as_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def _patient_id(raw: Mapping) -> str | None:
    return as_str(raw.get("PatientID", raw.get("PatientId")))


@dataclass(frozen=True)
class Patient:
    patient_id: str
    collection: str | None
    name: str | None = None
    sex: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def parse(cls, raw: Mapping) -> "Patient | None":
        raw = {**PATIENT_DEFAULTS, **normalize(raw)}  # as v4 fills them: the same on v1/v2
        pid = _patient_id(raw)
        if pid is None:
            return None
        return cls(pid, as_str(raw.get("Collection")), as_str(raw.get("PatientName")),
                   as_str(raw.get("PatientSex")), dict(raw))


@dataclass(frozen=True)
class Study:
    study_uid: str
    patient_id: str | None
    collection: str | None
    date: str | None = None
    description: str | None = None
    series_count: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def parse(cls, raw: Mapping) -> "Study | None":
        raw = normalize(raw)
        uid = as_str(raw.get("StudyInstanceUID"))
        if uid is None:
            return None
        return cls(uid, _patient_id(raw), as_str(raw.get("Collection")),
                   as_str(raw.get("StudyDate")), as_str(raw.get("StudyDescription")),
                   as_int(raw.get("SeriesCount")), dict(raw))


@dataclass(frozen=True)
class Series:
    series_uid: str
    study_uid: str | None
    patient_id: str | None
    collection: str | None
    modality: str | None = None
    description: str | None = None
    number: int | None = None
    image_count: int | None = None
    file_size: int | None = None
    date: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def parse(cls, raw: Mapping) -> "Series | None":
        raw = normalize(raw)
        uid = as_str(raw.get("SeriesInstanceUID"))
        if uid is None:
            return None
        return cls(uid, as_str(raw.get("StudyInstanceUID")), _patient_id(raw),
                   as_str(raw.get("Collection")), as_str(raw.get("Modality")),
                   as_str(raw.get("SeriesDescription")), as_int(raw.get("SeriesNumber")),
                   as_int(raw.get("ImageCount")), as_int(raw.get("FileSize")),
                   as_str(raw.get("SeriesDate")), dict(raw))


@dataclass(frozen=True)
class SeriesSize:
    total_bytes: int
    object_count: int

    @classmethod
    def parse(cls, raw: Mapping) -> "SeriesSize | None":
        total, count = as_int(raw.get("TotalSizeInBytes")), as_int(raw.get("ObjectCount"))
        if total is None or count is None:
            return None  # `[{}]`: the archive does not know the series
        return cls(total, count)


def parse_rows(rows: list, parse) -> list:
    """Parse each object; skip `{}` and rows lacking their identifying key."""
    out, lacking = [], 0
    for raw in rows:
        if isinstance(raw, Mapping):
            record = parse(raw)
            if record is not None:
                out.append(record)
            elif raw:
                lacking += 1
    if lacking:  # an empty ID cannot be a path, nor asked for (an empty filter means "all")
        log.warning("%d %s record(s) without their ID skipped", lacking,
                    getattr(parse, "__qualname__", "archive").split(".")[0].lower())
    return out


def values(rows: list, key: str) -> list[str]:
    """A value list (getCollectionValues…): the non-empty values of `key`, `{}` skipped."""
    return [v for raw in rows if isinstance(raw, Mapping) and (v := as_str(raw.get(key)))]
