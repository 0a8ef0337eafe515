"""API v4 of the local archive: parameters in, rows out, as production answers today.

Everything here follows shared/nbia-api-v4.md (the server's own code wins over its spec):
strict, case-sensitive query parameters (an unknown key is a 400 naming the allowed ones),
v4's columns and their order, dates `MM-DD-YYYY` in and out (a date that does not parse
gives an empty result), `Authorized` on every tabular row, the missing-parameter sentences
of v4, Jackson endpoints (getDicomTags, descriptions, taxonomy) that keep nulls and `/`,
the POST form endpoints (getSeriesMetadata, the manifests) and the count endpoints.
HTTP, auth, downloads and faults live in `server.py`.

Each query function takes the index, the caller's user (the guest `nbia_guest` without a
token) and the parameters, and returns rows (dicts in column order, NULLs left out) or
raises `MissingParameter` / `BadRequest`.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import html
import io
import json
import random
import re
from xml.sax.saxutils import escape as xml_escape

from nbiafs.archive.records import ArchiveIndex, Series, ordered

GUEST = "nbia_guest"
PARAMS_ERROR = "Invalid query parameter: '{key}'. Allowed parameters are: [{allowed}]"
FORMATS = {"json": "application/json", "csv": "text/csv", "xml": "application/xml",
           "html": "text/html"}
DEFAULT_SPECIES = ("337915000", "Homo sapiens")

PATIENT_KEYS = ["PatientId", "PatientName", "PatientSex", "EthnicGroup", "Collection", "Phantom",
                "SpeciesCode", "SpeciesDescription", "Authorized"]
STUDY_KEYS = ["StudyInstanceUID", "StudyDate", "StudyDescription", "AdmittingDiagnosesDescription",
              "StudyID", "PatientAge", "PatientID", "PatientName", "PatientSex", "EthnicGroup",
              "Collection", "SeriesCount", "LongitudinalTemporalEventType",
              "LongitudinalTemporalOffsetFromEvent", "Authorized"]
SERIES_KEYS = ["SeriesInstanceUID", "StudyInstanceUID", "Modality", "ProtocolName", "SeriesDate",
               "SeriesDescription", "BodyPartExamined", "SeriesNumber", "AnnotationsFlag", "Collection",
               "Site", "PatientID", "PatientSex", "PatientAge", "AdmittingDiagnosisDescription",
               "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "ImageCount",
               "MaxSubmissionTimestamp", "LicenseName", "LicenseURI", "DataDescriptionURI", "FileSize",
               "ReleasedStatus", "DateReleased", "StudyDesc", "StudyDate", "ThirdPartyAnalysis",
               "Authorized"]
METADATA_KEYS = ["PatientID", "PatientName", "PatientSex", "EthnicGroup", "Phantom", "SpeciesCode",
                 "SpeciesDescription", "StudyInstanceUID", "StudyDate", "StudyDesc",
                 "AdmittingDiagnosisDescription", "StudyID", "PatientAge", "LongitudinalTemporalEventType",
                 "LongitudinalTemporalOffsetFromEvent", "SeriesInstanceUID", "Collection", "Site",
                 "Modality", "ProtocolName", "SeriesDate", "SeriesDescription", "BodyPartExamined",
                 "SeriesNumber", "AnnotationsFlag", "Manufacturer", "ManufacturerModelName",
                 "PixelSpacing(mm)-Row", "SliceThickness(mm)", "SoftwareVersions", "ImageCount",
                 "MaxSubmissionTimestamp", "LicenseName", "LicenseURI", "DataDescriptionURI", "FileSize",
                 "ReleasedStatus", "DateReleased", "ThirdPartyAnalysis", "Authorized"]
SERIES_FILTERS = ["Collection", "PatientID", "StudyInstanceUID", "Modality", "BodyPartExamined",
                  "ManufacturerModelName", "Manufacturer", "SeriesInstanceUID"]

# The query parameters each GET endpoint allows (None: not checked at all, §2).
ALLOWED: dict[str, frozenset | None] = {
    "getCollectionValues": frozenset({"format"}),
    "getModalityValues": frozenset({"Collection", "BodyPartExamined", "format"}),
    "getBodyPartValues": frozenset({"Collection", "Modality", "format"}),
    "getManufacturerValues": frozenset({"Collection", "Modality", "BodyPartExamined", "format"}),
    "getPatient": frozenset({"Collection", "PatientId", "format"}),
    "getPatientByCollectionAndModality": frozenset({"Collection", "Modality", "format"}),
    "NewPatientsInCollection": frozenset({"Collection", "fromDate", "format"}),
    "getPatientStudy": frozenset({"Collection", "PatientID", "StudyInstanceUID", "format"}),
    "NewStudiesInPatientCollection": frozenset({"Collection", "PatientID", "fromDate", "format"}),
    "getSeries": frozenset(SERIES_FILTERS + ["format"]),
    "getUpdatedSeries": frozenset({"fromDate", "format"}),
    "getSeriesSize": frozenset({"SeriesInstanceUID", "format"}),
    "getSOPInstanceUIDs": frozenset({"SeriesInstanceUID", "format"}),
    "getImage": frozenset({"SeriesInstanceUID", "NewFileNames", "IncludeMD5"}),
    "getImageWithMD5Hash": frozenset({"SeriesInstanceUID"}),
    "getSingleImage": frozenset({"SeriesInstanceUID", "SOPInstanceUID"}),
    "getMD5HashForImage": frozenset({"SOPInstanceUID"}),
    "getDicomTags": frozenset({"SeriesUID"}),
    "getModalityValuesAndCounts": frozenset({"Collection", "BodyPartExamined"}),
    "getBodyPartValuesAndCounts": frozenset({"Collection", "Modality"}),
    "getManufacturerValuesAndCounts": frozenset({"Collection", "Modality", "BodyPartExamined"}),
    "getCollectionDescriptions": frozenset({"collectionName"}),
    "getCollectionValuesAndCounts": None, "getSpeciesValuesAndCounts": None,
    "getSpeciesTax": None, "getMinMaxTimepoints": None,
}
POST_ENDPOINTS = frozenset({"getSeriesMetadata", "getManifestText", "getManifestForCollection",
                            "getManifestFromPatientStudySeries", "getThumbnail"})


class MissingParameter(Exception):
    """A 400 whose body is v4's sentence."""


class BadRequest(Exception):
    """Any other 400 with a sentence (unknown parameter, not granted)."""


class ServerError(Exception):
    """An uncaught exception in production: 500, `Server was not able to process your request`."""


def not_granted(uid: str) -> BadRequest:
    return BadRequest(f"The user has not been granted the access to image with given SeriesInstanceUID,"
                      f"{uid}. Please contact System Admin to resolve this issue.")


# --------------------------------------------------------------------------- parameters
class ParameterCheck:
    """The unknown-parameter 400, its bracketed list in an order that is random per server
    start (production prints a `Set.of()`, whose order changes per JVM: never match on it)."""

    def __init__(self, seed: int | None = None):
        self._rng = random.Random(seed)
        self._order = {name: self._shuffled(allowed) for name, allowed in ALLOWED.items() if allowed}

    def _shuffled(self, allowed) -> list[str]:
        names = sorted(allowed)
        self._rng.shuffle(names)
        return names

    def error(self, endpoint: str, params: dict, old: bool = False) -> str | None:
        """The 400 sentence for the first unknown key, or None. `old`: a build from before
        IncludeMD5 (2025-11-26), which getImage refuses."""
        allowed = ALLOWED.get(endpoint)
        if allowed is None:
            return None
        order = self._order[endpoint]
        if old and endpoint == "getImage":
            allowed, order = allowed - {"IncludeMD5"}, [k for k in order if k != "IncludeMD5"]
        for key in params:
            if key not in allowed:  # case-sensitive: `collection=` is refused
                return PARAMS_ERROR.format(key=key, allowed=", ".join(order))
        return None


def require(params: dict, names: list[str], sentence: str) -> None:
    if any(not params.get(n) for n in names):
        raise MissingParameter(sentence)


def _match(filter_value: str | None, value) -> bool:
    """Case-insensitive filters (UPPER = UPPER); an absent filter matches all."""
    if not filter_value:
        return True
    return value is not None and str(value).upper() == filter_value.upper()


def mdy(iso: str | None) -> str | None:
    """`2015-05-27` -> `05-27-2015`."""
    if not iso:
        return None
    return dt.date.fromisoformat(iso[:10]).strftime("%m-%d-%Y")


def parse_mdy(text: str | None) -> dt.date | None:
    try:
        return dt.datetime.strptime(text or "", "%m-%d-%Y").date()
    except ValueError:
        return None


# --------------------------------------------------------------------------- records
def patient_record(coll: dict, patient: dict) -> dict:
    values = dict(patient, PatientId=patient["PatientID"], Collection=coll["Collection"],
                  Phantom=patient.get("Phantom") or "NO",
                  SpeciesCode=patient.get("SpeciesCode") or DEFAULT_SPECIES[0],
                  SpeciesDescription=patient.get("SpeciesDescription") or DEFAULT_SPECIES[1], Authorized=1)
    return ordered(PATIENT_KEYS, values)


def study_record(coll: dict, patient: dict, study: dict) -> dict:
    values = {**patient, **study, "Collection": coll["Collection"], "StudyDate": mdy(study.get("StudyDate")),
              "SeriesCount": len(study["series"]), "Authorized": 1}
    return ordered(STUDY_KEYS, values)


def _series_values(s: Series) -> dict:
    raw, coll, patient, study = s.raw, s.collection, s.patient, s.study
    return {**raw, "StudyInstanceUID": study["StudyInstanceUID"], "Collection": coll["Collection"],
            "Site": coll.get("Site", coll["Collection"]), "PatientID": patient["PatientID"],
            "PatientSex": patient.get("PatientSex"), "PatientAge": study.get("PatientAge"),
            "PatientName": patient.get("PatientName"), "EthnicGroup": patient.get("EthnicGroup"),
            "Phantom": patient.get("Phantom") or "NO",
            "SpeciesCode": patient.get("SpeciesCode") or DEFAULT_SPECIES[0],
            "SpeciesDescription": patient.get("SpeciesDescription") or DEFAULT_SPECIES[1],
            "StudyID": study.get("StudyID"),
            "SeriesDate": mdy(raw.get("SeriesDate")), "MaxSubmissionTimestamp": mdy(raw.get("TimeStamp")),
            "DateReleased": mdy(raw.get("DateReleased")), "ImageCount": s.reported_count,
            "FileSize": s.total_size, "LicenseName": coll.get("LicenseName"), "LicenseURI": coll.get("LicenseURI"),
            "DataDescriptionURI": coll.get("CollectionURI"), "StudyDesc": study.get("StudyDescription"),
            "StudyDate": mdy(study.get("StudyDate")), "Authorized": 1}


def series_record(s: Series) -> dict:
    return ordered(SERIES_KEYS, _series_values(s))


def metadata_record(s: Series) -> dict:
    """A getSeriesMetadata row: getSeries' facts and the patient's, SeriesNumber as a decimal
    string and Authorized as a string, as the server's JSON has them."""
    values = _series_values(s)
    thickness = s.raw.get("slice_thickness")
    values.update({
        "SeriesNumber": f"{float(s.raw['SeriesNumber']):.6f}" if s.raw.get("SeriesNumber") is not None else None,
        "AnnotationsFlag": _flag(s.raw.get("AnnotationsFlag")), "Authorized": "1",
        "SliceThickness(mm)": f"{thickness:g}" if thickness is not None else None,
        "PixelSpacing(mm)-Row": s.raw.get("pixel_spacing")})
    return ordered(METADATA_KEYS, values)


def _flag(value):
    if value is None:
        return None
    return "1" if value else "0"


# --------------------------------------------------------------------------- tabular GETs
def _visible_series(index: ArchiveIndex, user, params: dict) -> list[Series]:
    out = []
    for s in index.iter_series(user):
        values = {"Collection": s.collection["Collection"], "PatientID": s.patient["PatientID"],
                  "Modality": s.raw.get("Modality"), "BodyPartExamined": s.raw.get("BodyPartExamined"),
                  "Manufacturer": s.raw.get("Manufacturer"),
                  "ManufacturerModelName": s.raw.get("ManufacturerModelName")}
        if not all(_match(params.get(k), v) for k, v in values.items()):
            continue
        if params.get("StudyInstanceUID") and s.study["StudyInstanceUID"] != params["StudyInstanceUID"]:
            continue
        if params.get("SeriesInstanceUID") and s.uid != params["SeriesInstanceUID"]:
            continue
        out.append(s)
    return out


def _upper_values(series: list[Series], key: str, column: str) -> list[dict]:
    values = sorted({str(s.raw[key]).upper() if s.raw.get(key) else None for s in series},
                    key=lambda v: (v is not None, v or ""))
    return [{column: v} if v else {} for v in values]


def get_collection_values(index, user, params):
    return [{"Collection": c["Collection"]} for c in sorted(index.visible_collections(user),
                                                           key=lambda c: c["Collection"])]


def get_modality_values(index, user, params):
    return _upper_values(_visible_series(index, user, params), "Modality", "Modality")


def get_body_part_values(index, user, params):
    return _upper_values(_visible_series(index, user, params), "BodyPartExamined", "BodyPartExamined")


def get_manufacturer_values(index, user, params):
    return _upper_values(_visible_series(index, user, params), "Manufacturer", "Manufacturer")


def _patients(index, user, collection=None, patient_id=None, exact_id=False):
    for coll in index.visible_collections(user):
        if not _match(collection, coll["Collection"]):
            continue
        for patient in coll["patients"]:
            if patient_id and (patient["PatientID"] != patient_id if exact_id
                               else not _match(patient_id, patient["PatientID"])):
                continue
            yield coll, patient


def get_patient(index, user, params):
    # getPatient's PatientId matches exactly (the UIDs and it are compared as stored).
    return [patient_record(c, p) for c, p in
            _patients(index, user, params.get("Collection"), params.get("PatientId"), exact_id=True)]


def get_patient_by_collection_and_modality(index, user, params):
    require(params, ["Collection", "Modality"], "A parameter, Collection and Modality, are required for this API call.")
    return [{"PatientId": p["PatientID"], "Authorized": 1} for c, p in _patients(index, user, params["Collection"])
            if any(_match(params["Modality"], raw.get("Modality")) for st in p["studies"] for raw in st["series"])]


def _released_since(studies: list[dict], since: dt.date) -> bool:
    return any(raw.get("DateReleased") and dt.date.fromisoformat(raw["DateReleased"][:10]) >= since
               for st in studies for raw in st["series"])


def new_patients_in_collection(index, user, params):
    require(params, ["Collection", "fromDate"], "A parameter, Collection and Date are required for this API call.")
    since = parse_mdy(params["fromDate"])
    if since is None:
        return []  # a date that does not parse: an empty answer, not an error
    return [patient_record(c, p) for c, p in _patients(index, user, params["Collection"])
            if _released_since(p["studies"], since)]


def get_patient_study(index, user, params):
    return [study_record(c, p, st) for c, p in _patients(index, user, params.get("Collection"), params.get("PatientID"))
            for st in p["studies"]
            if not params.get("StudyInstanceUID") or st["StudyInstanceUID"] == params["StudyInstanceUID"]]


def new_studies_in_patient_collection(index, user, params):
    require(params, ["Collection", "fromDate"], "A parameter, Collection and Date are required for this API call.")
    since = parse_mdy(params["fromDate"])
    if since is None:
        return []
    return [study_record(c, p, st) for c, p in _patients(index, user, params["Collection"], params.get("PatientID"))
            for st in p["studies"] if _released_since([st], since)]


def get_series(index, user, params):
    return [series_record(s) for s in _visible_series(index, user, params)]


def get_updated_series(index, user, params):
    """Public collections only; released strictly after `fromDate` (default 01-01-1900)."""
    since = parse_mdy(params.get("fromDate") or "01-01-1900")
    if since is None:
        return []
    return [series_record(s) for s in index.iter_series(None)
            if s.raw.get("DateReleased") and dt.date.fromisoformat(s.raw["DateReleased"][:10]) > since]


def get_series_size(index, user, params):
    require(params, ["SeriesInstanceUID"], "A parameter, SeriesInstanceUID is required for this API call.")
    s = index.visible_series(None, params["SeriesInstanceUID"])  # public series only
    if s is None:
        return []
    return [{"TotalSizeInBytes": s.total_size, "ObjectCount": s.reported_count}]


def get_sop_instance_uids(index, user, params):
    """No authorisation or visibility filter on v4 (§3): any known series answers."""
    require(params, ["SeriesInstanceUID"], "A parameter, SeriesInstanceUID is required for this API call.")
    s = index.series_by_uid.get(params["SeriesInstanceUID"])
    if s is None:
        return []
    uids = sorted((i.sop_uid for i in s.instances), key=lambda u: hashlib.md5(u.encode()).digest())
    return [{"SOPInstanceUID": u} for u in uids]


# --------------------------------------------------------------------------- counts (JSON only)
def _counts(series: list[Series], key, column: str, upper=True) -> list[dict]:
    patients: dict[str, set] = {}
    for s in series:
        value = key(s)
        if value:
            value = str(value).upper() if upper else str(value)
            patients.setdefault(value, set()).add((s.collection["Collection"], s.patient["PatientID"]))
    return [{column: v, "Count": len(p), "Authorized": 1} for v, p in sorted(patients.items())]


def get_collection_values_and_counts(index, user, params):
    return [{"Collection": c["Collection"], "Count": len(c["patients"]), "Authorized": 1}
            for c in sorted(index.visible_collections(user), key=lambda c: c["Collection"])]


def get_modality_values_and_counts(index, user, params):
    return _counts(_visible_series(index, user, params), lambda s: s.raw.get("Modality"), "Modality")


def get_body_part_values_and_counts(index, user, params):
    return _counts(_visible_series(index, user, params), lambda s: s.raw.get("BodyPartExamined"), "BodyPart")


def get_manufacturer_values_and_counts(index, user, params):
    return _counts(_visible_series(index, user, params), lambda s: s.raw.get("Manufacturer"), "Manufacturer")


def get_species_values_and_counts(index, user, params):
    return _counts(_visible_series(index, user, {}),
                   lambda s: s.patient.get("SpeciesCode") or DEFAULT_SPECIES[0], "Species", upper=False)


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
    "getSeriesSize": get_series_size,
    "getSOPInstanceUIDs": get_sop_instance_uids,
}
COUNT_ENDPOINTS = {
    "getCollectionValuesAndCounts": get_collection_values_and_counts,
    "getModalityValuesAndCounts": get_modality_values_and_counts,
    "getBodyPartValuesAndCounts": get_body_part_values_and_counts,
    "getManufacturerValuesAndCounts": get_manufacturer_values_and_counts,
    "getSpeciesValuesAndCounts": get_species_values_and_counts,
}


# --------------------------------------------------------------------------- Jackson endpoints
def get_species_tax(index, user, params):
    codes = {(p.get("SpeciesCode") or DEFAULT_SPECIES[0], p.get("SpeciesDescription") or DEFAULT_SPECIES[1])
             for c in index.visible_collections(user) for p in c["patients"]}
    return [{"speciesCode": code, "speciesDescription": name} for code, name in sorted(codes)]


def get_collection_descriptions(index, user, params):
    wanted = params.get("collectionName")
    return [{"description": f"<p>The {c['Collection']} collection of the local archive.</p>", "id": n,
             "collectionName": c["Collection"], "descriptionURI": c.get("CollectionURI")}
            for n, c in enumerate(index.visible_collections(user), 1) if not wanted or c["Collection"] == wanted]


def get_min_max_timepoints(index, user, params):
    return {"maxTimepoints": {"type": 0}, "minTimepoints": {"type": 0}}


def get_dicom_tags(index, user, params, dataset_of):
    """The tags of the series' first image (database order): `[{element, name, data}]`, group
    0002 included; sequence items one `>` deeper, each sequence closed by an `End <name>` row."""
    uid = params.get("SeriesUID")
    if not uid:
        raise MissingParameter("A parameter, SeriesUID is required for this API call.")
    s = index.visible_series(user, uid)
    if s is None:
        raise not_granted(uid)
    if not s.instances:
        return []
    first = min(s.instances, key=lambda i: hashlib.md5(i.sop_uid.encode()).digest())
    ds = dataset_of(first.path)
    rows: list[dict] = []
    _tag_rows(ds.file_meta, 0, rows)
    _tag_rows(ds, 0, rows)
    return rows


def _tag_rows(ds, depth: int, rows: list) -> None:
    prefix = ">" * depth
    for elem in ds:
        element = f"{prefix}({elem.tag.group:04X},{elem.tag.element:04X})"
        if elem.VR == "SQ":
            rows.append({"element": element, "name": elem.name, "data": None})
            for item in elem.value:
                _tag_rows(item, depth + 1, rows)
            rows.append({"element": element, "name": f"End {elem.name}", "data": None})
            continue
        rows.append({"element": element, "name": elem.name, "data": _tag_text(elem)})


def _tag_text(elem) -> str | None:
    if elem.tag.element == 0x0010 and elem.tag.group == 0x7FE0:
        return None  # pixel data is not shown
    value = elem.value
    if value is None or value == "":
        return None
    if isinstance(value, (bytes, bytearray)):
        return None if len(value) > 64 else value.hex()
    if elem.VM > 1 and not isinstance(value, str):
        return "\\".join(str(v) for v in value)
    return str(value)


JACKSON_ENDPOINTS = {
    "getSpeciesTax": get_species_tax,
    "getCollectionDescriptions": get_collection_descriptions,
    "getMinMaxTimepoints": get_min_max_timepoints,
}


# --------------------------------------------------------------------------- POST forms
def series_list(pairs: list[tuple[str, str]]) -> list[str]:
    """getSeriesMetadata's `list`: repeatable, comma lists allowed, characters outside [0-9.,]
    stripped."""
    uids = []
    for key, value in pairs:
        if key == "list":
            uids += [u for u in re.sub(r"[^0-9.,]", "", value).split(",") if u]
    return list(dict.fromkeys(uids))


def get_series_metadata(index, user, pairs):
    uids = series_list(pairs)
    if not uids:
        raise MissingParameter("A form parameter, list, containing at least one SeriesInstanceUID is required.")
    return [metadata_record(s) for uid in uids if (s := index.visible_series(user, uid)) is not None]


def manifest_text(base_url: str, uids: list[str], annotation: bool, basket: str) -> str:
    head = [f"downloadServerUrl={base_url}/nbia-download/servlet/DownloadServlet",
            f"includeAnnotation={'true' if annotation else 'false'}", "noOfrRetry=4",
            f"databasketId={basket}", "manifestVersion=3.0", "ListOfSeriesToDownload="]
    return "\n".join(head + uids) + "\n"


def _form(pairs, key, default=None):
    return next((v for k, v in pairs if k == key), default)


def _flag_true(text) -> bool:
    return str(text).strip().lower() in ("true", "yes", "1")


def manifest_for_text(index, user, pairs, base_url: str) -> str:
    if _form(pairs, "includeAnnotation") is None:
        raise ServerError("includeAnnotation is null")
    uids = [v for k, v in pairs if k == "list" and v]  # one line per value, commas kept
    basket = f"manifest-{int(dt.datetime.now().timestamp() * 1000)}.tcia"
    return manifest_text(base_url, uids, _flag_true(_form(pairs, "includeAnnotation")), basket)


def manifest_for_collection(index, user, pairs, base_url: str) -> str:
    name = _form(pairs, "collection", "")
    everything = _form(pairs, "visibility", "1") == "13"
    colls = index.collections if everything else index.visible_collections(user)
    uids = [s["SeriesInstanceUID"] for c in colls if c["Collection"] == name
            for p in c["patients"] for st in p["studies"] for s in st["series"]]
    basket = f"{name}-{dt.datetime.now().strftime('%Y-%m-%d_%H-%M')}.tcia"
    return manifest_text(base_url, uids, _flag_true(_form(pairs, "includeAnnotation", "true")), basket)


def manifest_from_patient_study_series(index, user, pairs, base_url: str) -> str:
    def items(key):
        return {v.strip() for v in (_form(pairs, key) or "").split(",") if v.strip()}
    patients, studies, series = items("patientIDs"), items("studyUIDs"), items("seriesUIDs")
    uids = [s.uid for s in index.iter_series(user)
            if s.patient["PatientID"] in patients or s.study["StudyInstanceUID"] in studies or s.uid in series]
    basket = f"manifest-{int(dt.datetime.now().timestamp() * 1000)}.tcia"
    return manifest_text(base_url, uids, _flag_true(_form(pairs, "includeAnnotation", "false")), basket)


MANIFEST_ENDPOINTS = {
    "getManifestText": manifest_for_text,
    "getManifestForCollection": manifest_for_collection,
    "getManifestFromPatientStudySeries": manifest_from_patient_study_series,
}


# --------------------------------------------------------------------------- rendering
def render(rows: list[dict], fmt: str) -> tuple[bytes, str]:
    """Tabular rows as v4's Jettison writer has them: compact JSON with `/` written `\\/`; CSV
    with every field quoted (single-column lists unquoted); `<Results><Row>` XML; an HTML table."""
    if fmt == "json":
        return json.dumps(rows, separators=(",", ":")).replace("/", "\\/").encode(), FORMATS["json"]
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    if fmt == "csv":
        out = io.StringIO()
        if len(keys) == 1:
            writer = csv.writer(out, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        else:
            writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(keys)
        for row in rows:
            writer.writerow(["" if row.get(k) is None else _csv_text(row[k]) for k in keys])
        return out.getvalue().encode(), FORMATS["csv"]
    if fmt == "xml":
        items = "".join("<Row>" + "".join(f"<{k} type='{_java_type(v)}'>{xml_escape(_csv_text(v))}</{k}>"
                                          for k, v in r.items()) + "</Row>" for r in rows)
        return f"<Results>{items}</Results>".encode(), FORMATS["xml"]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_csv_text(r.get(k, '')))}</td>" for k in keys)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>".encode(), FORMATS["html"]


def _csv_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _java_type(value) -> str:
    if isinstance(value, bool):
        return "java.lang.Boolean"
    if isinstance(value, int):
        return "java.lang.Long"
    return "java.lang.String"


def render_jackson(value) -> bytes:
    """Jackson: nulls kept, `/` not escaped."""
    return json.dumps(value, separators=(",", ":")).encode()
