"""The local archive answers API v4 as production does (shared/nbia-api-v4.md), over HTTP: a test
per row of that page that the local archive implements, section by section."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from nbiafs.archive import v4
from nbiafs.archive.server import SERVER_ERROR_BODY
from nbiafs.archive.tokens import DEFAULT_USERS
from nbiafs.manifest import parse_manifest

USER, PASSWORD = next(iter(DEFAULT_USERS.items()))


@pytest.fixture
def get(nbia_archive):
    def call(endpoint, headers=None, **params):
        return requests.get(f"{nbia_archive.url}/services/v4/{endpoint}", params=params, headers=headers,
                            timeout=30)
    return call


@pytest.fixture
def post(nbia_archive):
    def call(endpoint, data, headers=None):
        return requests.post(f"{nbia_archive.url}/services/v4/{endpoint}", data=data, headers=headers, timeout=30)
    return call


def bearer(archive, user=USER, password=PASSWORD) -> dict:
    r = requests.post(archive.url + "/oauth/token", data={"username": user, "password": password,
                                                          "client_id": "NBIA", "grant_type": "password"})
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def big(archive, user="nbia_guest"):
    return max(archive.index.iter_series(user), key=lambda s: len(s.instances))


def restricted(archive):
    return next(s for s in archive.index.series_by_uid.values() if s.collection.get("restricted"))


def keys_in_order(rows, keys):
    for row in rows:
        assert list(row) == [k for k in keys if k in row], list(row)
        assert None not in row.values()


# --------------------------------------------------------------------------- §1 hosts, auth, versions
def test_no_token_is_the_guest_and_bearer_undefined_too(get, nbia_archive):
    plain = get("getCollectionValues").json()
    assert get("getCollectionValues", headers={"Authorization": "Bearer undefined"}).json() == plain
    assert {"Collection": "Phantom-Restricted"} not in plain
    assert {"Collection": "Phantom-Restricted"} in get("getCollectionValues", headers=bearer(nbia_archive)).json()


def test_bad_token_401_on_downloads_500_on_getSeries_empty_elsewhere(get, nbia_archive):
    bad = {"Authorization": "Bearer not-a-token"}
    s = big(nbia_archive)
    r = get("getSingleImage", headers=bad, SeriesInstanceUID=s.uid, SOPInstanceUID=s.instances[0].sop_uid)
    assert r.status_code == 401 and r.content == b""
    assert get("getSeries", headers=bad).status_code == 500
    r = get("getPatient", headers=bad)
    assert r.status_code == 200 and r.content == b"" and "Content-Type" not in r.headers


def test_versions_switch_serves_v4_only(nbia_archive):
    for version in ("v1", "v2"):
        assert requests.get(f"{nbia_archive.url}/services/{version}/getCollectionValues").status_code == 404
    nbia_archive.set_versions("v1", "v2", "v4")
    assert requests.get(f"{nbia_archive.url}/services/v1/getCollectionValues").status_code == 200


# --------------------------------------------------------------------------- §2 common behaviour
def test_unknown_parameter_is_a_400_naming_the_allowed_ones(get):
    r = get("getSeries", Colection="x")
    assert r.status_code == 400
    m = re.fullmatch(r"Invalid query parameter: 'Colection'\. Allowed parameters are: \[(.*)\]", r.text)
    assert m and set(m.group(1).split(", ")) == set(v4.SERIES_FILTERS) | {"format"}


def test_parameter_names_are_case_sensitive(get):
    assert get("getSeries", collection="Phantom-Thorax-CT").status_code == 400
    assert get("getPatient", PatientID="PTC-001").status_code == 400  # getPatient takes PatientId
    assert get("getPatient", PatientId="PTC-001").json()[0]["PatientId"] == "PTC-001"


def test_unchecked_endpoints_accept_any_parameter(get):
    for endpoint in ("getCollectionValuesAndCounts", "getSpeciesValuesAndCounts", "getSpeciesTax",
                     "getMinMaxTimepoints"):
        assert get(endpoint, anything="1").status_code == 200


@pytest.mark.parametrize("endpoint,params,sentence", [
    ("getSOPInstanceUIDs", {}, "A parameter, SeriesInstanceUID is required for this API call."),
    ("getSeriesSize", {}, "A parameter, SeriesInstanceUID is required for this API call."),
    ("getImage", {}, "A parameter, SeriesInstanceUID, is required for this API call."),
    ("getImageWithMD5Hash", {}, "A parameter, SeriesInstanceUID, is required for this API call."),
    ("getSingleImage", {"SeriesInstanceUID": "1.2"},
     "A parameter, SeriesInstanceUID and SOPInstanceUID, are required for this API call."),
    ("getPatientByCollectionAndModality", {"Collection": "x"},
     "A parameter, Collection and Modality, are required for this API call."),
    ("NewPatientsInCollection", {"Collection": "x"},
     "A parameter, Collection and Date are required for this API call."),
    ("NewStudiesInPatientCollection", {}, "A parameter, Collection and Date are required for this API call."),
])
def test_missing_required_parameter_sentences(get, endpoint, params, sentence):
    r = get(endpoint, **params)
    assert (r.status_code, r.text, r.headers["Content-Type"]) == (400, sentence, "application/json")


def test_series_metadata_without_a_list(post):
    r = post("getSeriesMetadata", {"format": "json"})
    assert r.status_code == 400
    assert r.text == "A form parameter, list, containing at least one SeriesInstanceUID is required."


def test_empty_result_is_200_empty_body_without_content_type(get):
    r = get("getPatientStudy", Collection="Phantom-Thorax-CT", PatientID="NOSTUDY-001")
    assert (r.status_code, r.content) == (200, b"") and "Content-Type" not in r.headers
    assert get("getSeriesSize", SeriesInstanceUID="1.2.3").content == b""
    assert get("getCollectionDescriptions", collectionName="nope").json() == []  # Jackson: []


def test_unknown_format_with_data_is_a_500(get):
    r = get("getCollectionValues", format="yaml")
    assert r.status_code == 500 and r.text.startswith(SERVER_ERROR_BODY.decode().split("\n")[0] + "\n")
    assert get("getPatient", Collection="nope", format="yaml").content == b""


def test_tabular_json_compact_ordered_nulls_omitted_slashes_escaped(get):
    r = get("getSeries", Collection="Phantom-Thorax-CT")
    assert r.headers["Content-Type"] == "application/json"
    assert "\\/" in r.text and "https://" not in r.text and ", " not in r.text and '": ' not in r.text
    rows = r.json()
    keys_in_order(rows, v4.SERIES_KEYS)
    assert all(isinstance(x["FileSize"], int) and isinstance(x["SeriesNumber"], int) for x in rows)
    assert any("SeriesDescription" not in x for x in rows) and all(x["Authorized"] == 1 for x in rows)


def test_formats_xml_csv_html(get):
    lacking = sum("SeriesDescription" not in r for r in get("getSeries", Collection="Phantom-Thorax-CT").json())
    assert lacking
    xml = get("getModalityValues", format="XML")
    assert xml.headers["Content-Type"] == "application/xml"
    assert xml.text == ("<Results><Row><Modality type='java.lang.String'>CT</Modality></Row>"
                        "<Row><Modality type='java.lang.String'>MR</Modality></Row></Results>")
    single = get("getCollectionValues", format="csv").text
    assert single == "Collection\nPhantom-Body-MR\nPhantom-Thorax-CT\n"  # one column: unquoted
    multi = get("getSeries", Collection="Phantom-Thorax-CT", format="csv").text
    lines = multi.split("\n")
    assert lines[0].startswith('"SeriesInstanceUID","StudyInstanceUID"') and multi.endswith("\n")
    assert all(field.startswith('"') for field in lines[1].split(","))
    rows = list(csv.DictReader(io.StringIO(multi)))
    assert sum(r["SeriesDescription"] == "" for r in rows) == lacking  # a NULL is ""
    assert "<table>" in get("getCollectionValues", format="html").text


def test_dates_are_month_day_year_in_and_out(get, nbia_archive):
    s = big(nbia_archive)
    row = get("getSeries", SeriesInstanceUID=s.uid).json()[0]
    assert re.fullmatch(r"\d\d-\d\d-\d{4}", row["SeriesDate"]) and re.fullmatch(r"\d\d-\d\d-\d{4}", row["DateReleased"])
    y, m, d = s.raw["SeriesDate"].split("-")
    assert row["SeriesDate"] == f"{m}-{d}-{y}"
    assert get("NewPatientsInCollection", Collection="Phantom-Body-MR", fromDate="01-01-2000").json()
    assert get("NewPatientsInCollection", Collection="Phantom-Body-MR", fromDate="2000/01/01").content == b""


def test_case_insensitive_filters_but_exact_patient_id_in_getPatient(get):
    assert len(get("getSeries", Collection="PHANTOM-THORAX-CT", Modality="ct").json()) > 1
    assert get("getPatientStudy", Collection="phantom-thorax-ct", PatientID="ptc-001").json()
    assert get("getPatient", PatientId="ptc-001").content == b""


def test_restricted_rows_only_for_the_granted_user(get, nbia_archive):
    assert all(r["Collection"] != "Phantom-Restricted" for r in get("getSeries").json())
    rows = get("getSeries", headers=bearer(nbia_archive), Collection="Phantom-Restricted").json()
    assert rows and all(r["Authorized"] == 1 for r in rows)


# --------------------------------------------------------------------------- §3 tabular GETs
def test_value_lists_upper_cased_sorted_null_as_empty_object(get):
    assert get("getModalityValues").json() == [{"Modality": "CT"}, {"Modality": "MR"}]
    parts = get("getBodyPartValues").json()
    assert {} in parts and all(p["BodyPartExamined"].isupper() for p in parts if p)
    assert get("getManufacturerValues").json() == [{"Manufacturer": "NBIAFS PHANTOM WORKS"}]


def test_get_patient_columns_and_defaults(get):
    rows = get("getPatient", Collection="Phantom-Thorax-CT").json()
    keys_in_order(rows, v4.PATIENT_KEYS)
    assert all({"Phantom", "SpeciesCode", "SpeciesDescription", "Authorized"} <= set(r) for r in rows)
    assert "PatientBirthDate" not in rows[0]


def test_patient_by_collection_and_modality_has_two_columns(get):
    rows = get("getPatientByCollectionAndModality", Collection="Phantom-Body-MR", Modality="MR").json()
    assert rows and all(list(r) == ["PatientId", "Authorized"] for r in rows)


def test_patient_study_and_new_studies(get):
    rows = get("getPatientStudy", Collection="Phantom-Thorax-CT").json()
    keys_in_order(rows, v4.STUDY_KEYS)
    assert all(isinstance(r["SeriesCount"], int) and r["Authorized"] == 1 for r in rows)
    new = get("NewStudiesInPatientCollection", Collection="Phantom-Body-MR", fromDate="01-01-2000").json()
    keys_in_order(new, v4.STUDY_KEYS)
    assert get("NewStudiesInPatientCollection", Collection="Phantom-Body-MR", fromDate="01-01-2100").content == b""


def test_series_without_a_filter_is_every_visible_series(get, nbia_archive):
    assert len(get("getSeries").json()) == len(list(nbia_archive.index.iter_series("nbia_guest")))


def test_updated_series_strictly_after_public_only(get, nbia_archive):
    everything = get("getUpdatedSeries").json()  # default 01-01-1900
    assert len(everything) == len(list(nbia_archive.index.iter_series(None)))
    s = big(nbia_archive)
    y, m, d = s.raw["DateReleased"].split("-")
    on_the_day = [r["SeriesInstanceUID"] for r in get("getUpdatedSeries", fromDate=f"{m}-{d}-{y}").json() or []]
    assert s.uid not in on_the_day  # strictly after
    assert not [r for r in get("getUpdatedSeries", headers=bearer(nbia_archive)).json()
                if r["Collection"] == "Phantom-Restricted"]


def test_series_size_public_only(get, nbia_archive):
    s = big(nbia_archive)
    assert get("getSeriesSize", SeriesInstanceUID=s.uid).text == (
        f'[{{"TotalSizeInBytes":{s.total_size},"ObjectCount":{len(s.instances)}}}]')
    secret = restricted(nbia_archive)
    assert get("getSeriesSize", headers=bearer(nbia_archive), SeriesInstanceUID=secret.uid).content == b""


def test_sop_instance_uids_without_visibility_filter(get, nbia_archive):
    secret = restricted(nbia_archive)
    rows = get("getSOPInstanceUIDs", SeriesInstanceUID=secret.uid).json()  # as the guest
    assert sorted(r["SOPInstanceUID"] for r in rows) == sorted(i.sop_uid for i in secret.instances)


# --------------------------------------------------------------------------- §4 downloads
def _zip(r) -> zipfile.ZipFile:
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in r.headers
    return zipfile.ZipFile(io.BytesIO(r.content))


def test_get_image_license_first_database_names_and_include_md5_last(get, nbia_archive):
    s = big(nbia_archive)
    r = get("getImage", SeriesInstanceUID=s.uid)
    assert r.headers["Content-Disposition"] == f'attachment; filename="{s.uid}.zip"'
    names = _zip(r).namelist()
    assert names == ["LICENSE"] + [f"{n:08d}.dcm" for n in range(1, len(s.instances) + 1)]
    z = _zip(get("getImage", SeriesInstanceUID=s.uid, IncludeMD5="YES", NewFileNames="Yes"))
    assert z.namelist()[0] == "LICENSE" and z.namelist()[-1] == "md5hashes.csv" and z.namelist()[1] == "1-001.dcm"
    lines = z.read("md5hashes.csv").decode().splitlines()
    assert lines[0] == "Filename,MD5Hash"
    listed = dict(line.split(",") for line in lines[1:])
    assert listed == {n: hashlib.md5(z.read(n)).hexdigest() for n in z.namelist() if n.endswith(".dcm")}


def test_get_image_with_md5_hash_has_no_license(get, nbia_archive):
    s = big(nbia_archive)
    names = _zip(get("getImageWithMD5Hash", SeriesInstanceUID=s.uid)).namelist()
    assert names == [f"{n:08d}.dcm" for n in range(1, len(s.instances) + 1)] + ["md5hashes.csv"]


def test_unknown_or_unauthorised_series_zip_is_not_granted(get, nbia_archive):
    for uid in ("1.2.3.4", restricted(nbia_archive).uid):
        r = get("getImage", SeriesInstanceUID=uid)
        assert r.status_code == 400 and r.text == (
            f"The user has not been granted the access to image with given SeriesInstanceUID,{uid}. "
            "Please contact System Admin to resolve this issue.")


def test_single_image_bytes_and_unknown_500(get, nbia_archive):
    s = big(nbia_archive)
    inst = s.instances[0]
    r = get("getSingleImage", SeriesInstanceUID=s.uid, SOPInstanceUID=inst.sop_uid)
    assert r.headers["Content-Type"] == "application/dicom" and r.content == inst.path.read_bytes()
    assert r.headers["Content-Disposition"].startswith("attachment")
    assert get("getSingleImage", SeriesInstanceUID=s.uid, SOPInstanceUID="1.2.3").status_code == 500


def test_md5_for_image(get, nbia_archive):
    inst = big(nbia_archive).instances[0]
    r = get("getMD5HashForImage", SOPInstanceUID=inst.sop_uid)
    assert (r.status_code, r.headers["Content-Type"], r.text) == (200, "text/plain", inst.md5)
    assert r.text == hashlib.md5(inst.path.read_bytes()).hexdigest()
    assert get("getMD5HashForImage", SOPInstanceUID=inst.sop_uid, format="json").status_code == 400
    assert get("getMD5HashForImage", SOPInstanceUID="1.2.3").content == b""


def test_thumbnail_is_a_small_jpeg(post, nbia_archive):
    s = big(nbia_archive)
    r = post("getThumbnail", {"seriesUID": s.uid, "objectUID": s.instances[0].sop_uid})
    assert r.headers["Content-Type"] == "image/jpeg" and r.content[:3] == b"\xff\xd8\xff"
    from PIL import Image
    assert max(Image.open(io.BytesIO(r.content)).size) <= 512
    assert post("getThumbnail", {"seriesUID": s.uid}).status_code == 500


def test_dicom_tags_of_the_first_image(get, nbia_archive):
    s = big(nbia_archive)
    rows = get("getDicomTags", SeriesUID=s.uid).json()
    assert all(list(r) == ["element", "name", "data"] for r in rows)
    by_element = {r["element"]: r for r in rows}
    assert by_element["(0008,0060)"] == {"element": "(0008,0060)", "name": "Modality", "data": "CT"}
    assert by_element["(0002,0010)"]["name"] == "Transfer Syntax UID"  # group 0002 is included
    first = min(s.instances, key=lambda i: hashlib.md5(i.sop_uid.encode()).digest())  # database order
    assert by_element["(0008,0018)"]["data"] == first.sop_uid
    assert get("getDicomTags", SeriesUID="1.2.3").status_code == 400


def test_dicom_tags_nest_sequences_and_close_them():
    item = Dataset()
    item.SeriesInstanceUID = "1.2.3"
    item.ReferencedInstanceSequence = Sequence([Dataset()])
    item.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    ds = Dataset()
    ds.ReferencedSeriesSequence = Sequence([item])
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    rows: list = []
    v4._tag_rows(ds, 0, rows)
    assert [(r["element"], r["name"]) for r in rows] == [
        ("(0008,0008)", "Image Type"),
        ("(0008,1115)", "Referenced Series Sequence"),
        (">(0008,114A)", "Referenced Instance Sequence"),
        (">>(0008,1155)", "Referenced SOP Instance UID"),
        (">(0008,114A)", "End Referenced Instance Sequence"),
        (">(0020,000E)", "Series Instance UID"),
        ("(0008,1115)", "End Referenced Series Sequence")]
    assert rows[0]["data"] == "ORIGINAL\\PRIMARY" and rows[1]["data"] is None


# --------------------------------------------------------------------------- §5 POST forms
def test_series_metadata_list_forms_csv_and_json(post, nbia_archive):
    mine = list(nbia_archive.index.iter_series("nbia_guest"))[:3]
    a, b, c = (s.uid for s in mine)
    r = post("getSeriesMetadata", [("list", f"{a},{b}"), ("list", f" {c}x")])  # repeatable, commas, stripped
    assert r.headers["Content-Type"] == "text/csv"
    assert r.headers["Content-Disposition"] == 'attachment; filename="SeriesMetaData.csv"'
    assert r.text.startswith('"PatientID","PatientName"')
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [x["SeriesInstanceUID"] for x in rows] == [a, b, c]
    js = post("getSeriesMetadata", {"list": a, "format": "json"}).json()[0]
    keys_in_order([js], v4.METADATA_KEYS)
    assert isinstance(js["ImageCount"], int) and isinstance(js["FileSize"], int)
    assert re.fullmatch(r"\d+\.000000", js["SeriesNumber"]) and js["Authorized"] == "1"
    assert post("getSeriesMetadata", {"list": "1.2.3"}).content == b""


def test_manifests_have_six_header_lines_and_parse(post, nbia_archive, tmp_path):
    r = post("getManifestForCollection", {"collection": "Phantom-Body-MR"})
    assert r.headers["Content-Type"] == "application/x-nbia-manifest-file"
    lines = r.text.splitlines()
    assert [line.split("=")[0] for line in lines[:6]] == ["downloadServerUrl", "includeAnnotation", "noOfrRetry",
                                                           "databasketId", "manifestVersion", "ListOfSeriesToDownload"]
    assert re.fullmatch(r"databasketId=Phantom-Body-MR-\d{4}-\d\d-\d\d_\d\d-\d\d\.tcia", lines[3])
    expected = {s.uid for s in nbia_archive.index.iter_series(None) if s.collection["Collection"] == "Phantom-Body-MR"}
    (tmp_path / "m.tcia").write_text(r.text)
    assert set(parse_manifest(tmp_path / "m.tcia")) == set(lines[6:]) == expected
    text = post("getManifestText", [("list", "1.2,3.4"), ("list", "5.6"), ("includeAnnotation", "false")]).text
    assert text.splitlines()[1] == "includeAnnotation=false" and text.splitlines()[6:] == ["1.2,3.4", "5.6"]
    assert post("getManifestText", {"list": "1.2"}).status_code == 500  # includeAnnotation missing
    s = big(nbia_archive)
    some = post("getManifestFromPatientStudySeries", {"seriesUIDs": s.uid, "patientIDs": "PBM-001"}).text
    assert s.uid in some.splitlines()[6:] and len(some.splitlines()) > 7


# --------------------------------------------------------------------------- §6 counts and misc
def test_counts_and_misc(get, nbia_archive):
    counts = get("getCollectionValuesAndCounts").json()
    assert counts == [{"Collection": c["Collection"], "Count": len(c["patients"]), "Authorized": 1}
                      for c in sorted(nbia_archive.index.visible_collections(None), key=lambda c: c["Collection"])]
    assert all(list(r) == ["Modality", "Count", "Authorized"] for r in get("getModalityValuesAndCounts").json())
    assert all(list(r) == ["BodyPart", "Count", "Authorized"] for r in get("getBodyPartValuesAndCounts").json())
    assert get("getModalityValuesAndCounts", format="json").status_code == 400
    assert get("getSpeciesTax").json()[0].keys() == {"speciesCode", "speciesDescription"}
    desc = get("getCollectionDescriptions", collectionName="Phantom-Body-MR").json()
    assert list(desc[0]) == ["description", "id", "collectionName", "descriptionURI"] and "/" in json.dumps(desc)
    assert set(get("getMinMaxTimepoints").json()) == {"maxTimepoints", "minTimepoints"}


# --------------------------------------------------------------------------- §8 v1 -> v4
def test_v1_and_v4_describe_the_same_series_with_renamed_columns(get, nbia_archive):
    nbia_archive.set_versions("v1", "v4")
    s = big(nbia_archive)
    old = requests.get(f"{nbia_archive.url}/services/v1/getSeries", params={"SeriesInstanceUID": s.uid}).json()[0]
    new = get("getSeries", SeriesInstanceUID=s.uid).json()[0]
    assert "TimeStamp" in old and "MaxSubmissionTimestamp" in new and "TimeStamp" not in new
    assert old["CollectionURI"] == new["DataDescriptionURI"]
    assert {"Site", "PatientSex", "PatientAge", "Authorized"} <= set(new) - set(old)
    assert old["SeriesDate"][:10] == "-".join([new["SeriesDate"][6:], new["SeriesDate"][:5]])
    study_v1 = requests.get(f"{nbia_archive.url}/services/v1/getPatientStudy",
                            params={"StudyInstanceUID": s.study["StudyInstanceUID"]}).json()[0]
    assert "PatientBirthDate" not in get("getPatientStudy", StudyInstanceUID=s.study["StudyInstanceUID"]).json()[0]
    assert study_v1["PatientID"] == s.patient["PatientID"]


def test_synthetic_instances_read_with_pydicom(get, nbia_archive):
    s = big(nbia_archive)
    r = get("getSingleImage", SeriesInstanceUID=s.uid, SOPInstanceUID=s.instances[-1].sop_uid)
    assert pydicom.dcmread(io.BytesIO(r.content)).SOPInstanceUID == s.instances[-1].sop_uid
