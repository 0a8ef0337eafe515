"""Typed records of the NBIA API, parsed tolerantly.

The real server leaves NULL columns out, spells the patient key `PatientId` in
getPatient and `PatientID` elsewhere, sends numbers as numbers or sometimes as
strings (`"1234"`, `"1234.0"`), and uses keys with spaces in getSeriesMetaData.
Parsing accepts all of that, ignores unknown keys, and keeps the raw record
(`raw`) so that the filesystem can expose every column as an extended attribute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class SeriesMetadata:
    """getSeriesMetaData: keys with spaces, every value a string."""

    series_uid: str
    collection: str | None
    patient_id: str | None
    study_uid: str | None
    image_count: int | None
    file_size: int | None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def parse(cls, raw: Mapping) -> "SeriesMetadata | None":
        uid = as_str(raw.get("Series UID"))
        if uid is None:
            return None
        return cls(uid, as_str(raw.get("Collection")), as_str(raw.get("Subject ID")),
                   as_str(raw.get("Study UID")), as_int(raw.get("Number of Images")),
                   as_int(raw.get("File Size")), dict(raw))


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
