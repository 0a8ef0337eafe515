"""The NBIA query endpoints of the local archive: parameters in, rows out.

Each function takes the archive index, the caller's user (None for anonymous
v1) and the query parameters, and returns a list of records (dicts in column
order) or raises `MissingParameter`. HTTP, formats and faults live in
`server.py`; images in `images.py`.
"""

from __future__ import annotations

import datetime as dt
import hashlib

from nbiafs.archive.records import CART_KEYS, UPDATED_SERIES_KEYS, ArchiveIndex, Series


class MissingParameter(Exception):
    def __init__(self, name: str):
        super().__init__(f"A parameter, {name} is required for this API call.")


class BadParameter(Exception):
    """A parameter the server cannot parse (production answers 500)."""


def require(params: dict, *names: str) -> None:
    for name in names:
        if not params.get(name):
            raise MissingParameter(name)


def _match(filter_value: str | None, value: str | None) -> bool:
    """String filters match case-insensitively; an absent filter matches all."""
    if not filter_value:
        return True
    return value is not None and value.lower() == filter_value.lower()


def _parse_date(text: str, fmt: str) -> dt.date:
    try:
        return dt.datetime.strptime(text, fmt).date()
    except ValueError as exc:
        raise BadParameter(str(exc)) from None


def _series_filtered(index: ArchiveIndex, user, params: dict) -> list[Series]:
    out = []
    for s in index.iter_series(user):
        raw = s.raw
        if not (_match(params.get("Collection"), s.collection["Collection"])
                and _match(params.get("PatientID"), s.patient["PatientID"])
                and _match(params.get("Modality"), raw.get("Modality"))
                and _match(params.get("BodyPartExamined"), raw.get("BodyPartExamined"))
                and _match(params.get("Manufacturer"), raw.get("Manufacturer"))
                and _match(params.get("ManufacturerModelName"), raw.get("ManufacturerModelName"))):
            continue
        if params.get("StudyInstanceUID") and s.study["StudyInstanceUID"] != params["StudyInstanceUID"]:
            continue
        if params.get("SeriesInstanceUID") and s.uid != params["SeriesInstanceUID"]:
            continue
        out.append(s)
    return out


def _distinct(values) -> list:
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return sorted(seen, key=lambda v: (v is None, v or ""))


def get_collection_values(index, user, params):
    names = sorted(c["Collection"] for c in index.visible_collections(user))  # byte order
    return [{"Collection": n} for n in names]


def get_modality_values(index, user, params):
    series = _series_filtered(index, user, params)
    return [{"Modality": m} for m in _distinct(s.raw.get("Modality") for s in series) if m]


def get_body_part_values(index, user, params):
    series = _series_filtered(index, user, params)
    parts = _distinct((s.raw.get("BodyPartExamined") or "").upper() or None for s in series)
    return [{"BodyPartExamined": p} if p else {} for p in parts]


def get_manufacturer_values(index, user, params):
    series = _series_filtered(index, user, params)
    return [{"Manufacturer": m} for m in _distinct(s.raw.get("Manufacturer") for s in series) if m]


def _patients(index, user, collection=None, patient_id=None):
    for coll in index.visible_collections(user):
        if not _match(collection, coll["Collection"]):
            continue
        for patient in coll["patients"]:
            if _match(patient_id, patient["PatientID"]):
                yield coll, patient


def get_patient(index, user, params):
    pid = params.get("PatientId") or params.get("PatientID")
    return [index.patient_record(c, p) for c, p in _patients(index, user, params.get("Collection"), pid)]


def get_patient_by_collection_and_modality(index, user, params):
    require(params, "Collection", "Modality")
    out = []
    for _coll, patient in _patients(index, user, params["Collection"]):
        if any(_match(params["Modality"], raw.get("Modality"))
               for st in patient["studies"] for raw in st["series"]):
            out.append({"PatientId": patient["PatientID"]})
    return out


def _released_since(patient: dict, since: dt.date, study: dict | None = None) -> bool:
    studies = [study] if study else patient["studies"]
    return any(raw.get("DateReleased") and dt.date.fromisoformat(raw["DateReleased"][:10]) >= since
               for st in studies for raw in st["series"])


def new_patients_in_collection(index, user, params):
    require(params, "Collection", "Date")
    since = _parse_date(params["Date"], "%Y/%m/%d")
    return [index.patient_record(c, p) for c, p in _patients(index, user, params["Collection"])
            if _released_since(p, since)]


def get_patient_study(index, user, params):
    out = []
    for coll, patient in _patients(index, user, params.get("Collection"), params.get("PatientID")):
        for study in patient["studies"]:
            if params.get("StudyInstanceUID") and study["StudyInstanceUID"] != params["StudyInstanceUID"]:
                continue
            out.append(index.study_record(coll, patient, study))
    return out


def new_studies_in_patient_collection(index, user, params):
    require(params, "Collection", "Date")
    since = _parse_date(params["Date"], "%Y/%m/%d")
    out = []
    for coll, patient in _patients(index, user, params["Collection"], params.get("PatientID")):
        for study in patient["studies"]:
            if _released_since(patient, since, study):
                out.append(index.study_record(coll, patient, study))
    return out


def get_series(index, user, params):
    return [index.series_record(s) for s in _series_filtered(index, user, params)]


def get_updated_series(index, user, params):
    require(params, "fromDate")
    since = _parse_date(params["fromDate"], "%d/%m/%Y")
    return [index.series_record(s, UPDATED_SERIES_KEYS) for s in index.iter_series(user)
            if s.raw.get("DateReleased") and dt.date.fromisoformat(s.raw["DateReleased"][:10]) >= since]


def get_sop_instance_uids(index, user, params):
    require(params, "SeriesInstanceUID")
    s = index.visible_series(user, params["SeriesInstanceUID"])
    if s is None:
        return []
    # "In no particular order": a stable order unrelated to the instance numbers.
    uids = sorted((i.sop_uid for i in s.instances),
                  key=lambda u: hashlib.md5(u.encode()).digest())
    return [{"SOPInstanceUID": u} for u in uids]


def get_series_size(index, user, params):
    require(params, "SeriesInstanceUID")
    s = index.visible_series(user, params["SeriesInstanceUID"])
    if s is None:
        return [{}]
    return [{"TotalSizeInBytes": s.total_size, "ObjectCount": s.reported_count}]


def get_series_metadata(index, user, params):
    require(params, "SeriesInstanceUID")
    s = index.visible_series(user, params["SeriesInstanceUID"])
    return [index.metadata_record(s)] if s else []


def get_contents_by_name(index, user, params):
    require(params, "name")
    out = []
    for uid in index.carts.get(params["name"], []):
        s = index.visible_series(user, uid)
        if s is not None:
            out.append(index.series_record(s, CART_KEYS))
    return out


QUERY_ENDPOINTS = {
    "getCollectionValues": get_collection_values,
    "getModalityValues": get_modality_values,
    "getBodyPartValues": get_body_part_values,
    "getManufacturerValues": get_manufacturer_values,
    "getPatient": get_patient,
    "getPatientByCollectionAndModality": get_patient_by_collection_and_modality,
    "NewPatientsInCollection": new_patients_in_collection,
    "getPatientStudy": get_patient_study,
    "NewStudiesInPatientCollection": new_studies_in_patient_collection,
    "getSeries": get_series,
    "getUpdatedSeries": get_updated_series,
    "getSOPInstanceUIDs": get_sop_instance_uids,
    "getSeriesSize": get_series_size,
    "getSeriesMetaData": get_series_metadata,
    "getContentsByName": get_contents_by_name,
}
