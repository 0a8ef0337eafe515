"""The local archive answers v1/v2 as the production NBIA server does (shared/nbia-api.md), over HTTP."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import zipfile

import pydicom
import pytest
import requests

from nbiafs.archive.records import (CART_KEYS, METADATA_KEYS, PATIENT_KEYS, SERIES_KEYS,
                                    STUDY_KEYS, UPDATED_SERIES_KEYS)
from nbiafs.archive.server import SERVER_ERROR_BODY

GUEST_FORM = {"username": "nbia_guest", "password": "", "client_id": "NBIA",
              "grant_type": "password"}


def token(archive, form=GUEST_FORM) -> dict:
    r = requests.post(archive.url + "/oauth/token", data=form, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def v2(nbia_archive_legacy):
    """GET a v2 endpoint as the guest; returns the response."""
    bearer = token(nbia_archive_legacy)["access_token"]

    def get(endpoint, **params):
        return requests.get(f"{nbia_archive_legacy.url}/services/v2/{endpoint}", params=params,
                            headers={"Authorization": f"Bearer {bearer}"}, timeout=30)
    return get


def v1(archive, endpoint, **params):
    return requests.get(f"{archive.url}/services/v1/{endpoint}", params=params, timeout=30)


def assert_key_order(rows, keys):
    for row in rows:
        present = list(row)
        assert present == [k for k in keys if k in row], present
        assert all(v is not None for v in row.values()), "a NULL column must be left out"


def all_series(get):
    return get("getSeries").json()


# --------------------------------------------------------------------------- shapes
def test_collection_values_sorted_in_byte_order(nbia_archive_legacy, v2):
    r = v2("getCollectionValues")
    assert r.headers["Content-Type"] == "application/json"
    names = [row["Collection"] for row in r.json()]
    assert names == sorted(names) and "Phantom-Restricted" not in names
    assert [list(row) for row in r.json()] == [["Collection"]] * len(names)


def test_patient_uses_PatientId_and_omits_nulls(v2):
    rows = v2("getPatient", Collection="phantom-thorax-ct").json()  # case-insensitive filter
    assert rows and all("PatientId" in r and "PatientID" not in r for r in rows)
    assert_key_order(rows, PATIENT_KEYS)
    odd = [r for r in rows if " " in r["PatientId"]]
    assert odd and odd[0]["PatientId"] != odd[0]["PatientId"].upper()
    assert "PatientSex" not in odd[0]  # an omitted column, not null
    assert any(r["PatientId"] == "NOSTUDY-001" for r in rows)


def test_patient_study_uses_PatientID(v2):
    rows = v2("getPatientStudy", Collection="Phantom-Thorax-CT").json()
    assert rows and all("PatientID" in r and "PatientId" not in r for r in rows)
    assert_key_order(rows, STUDY_KEYS)
    assert all(isinstance(r["SeriesCount"], int) for r in rows)
    assert rows[0]["StudyDate"].endswith(" 00:00:00.0")


def test_patient_without_studies_gives_empty_body(v2):
    r = v2("getPatientStudy", Collection="Phantom-Thorax-CT", PatientID="NOSTUDY-001")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["Content-Type"] == "application/json"


def test_series_columns_types_and_omitted_keys(v2):
    rows = all_series(v2)
    assert_key_order(rows, SERIES_KEYS)
    for r in rows:
        assert isinstance(r["ImageCount"], int) and isinstance(r["FileSize"], int)
        assert isinstance(r["SeriesNumber"], int) and isinstance(r["AnnotationsFlag"], bool)
    assert any("SeriesDescription" not in r for r in rows)
    assert any(r["ImageCount"] == 1 for r in rows)


@pytest.mark.parametrize("endpoint,key", [("getModalityValues", "Modality"),
                                          ("getManufacturerValues", "Manufacturer")])
def test_value_lists(v2, endpoint, key):
    rows = v2(endpoint, Collection="Phantom-Thorax-CT").json()
    assert rows and all(list(r) == [key] for r in rows)


def test_body_part_values_upper_case_and_null_as_empty_object(v2):
    rows = v2("getBodyPartValues").json()
    assert {} in rows
    assert all(r["BodyPartExamined"].isupper() for r in rows if r)


def test_patient_by_collection_and_modality(v2):
    rows = v2("getPatientByCollectionAndModality", Collection="Phantom-Body-MR", Modality="MR").json()
    assert rows and all(list(r) == ["PatientId"] for r in rows)


def test_new_patients_and_studies(v2):
    rows = v2("NewPatientsInCollection", Collection="Phantom-Body-MR", Date="2000/01/01").json()
    assert rows and all("PatientId" in r for r in rows)
    assert v2("NewPatientsInCollection", Collection="Phantom-Body-MR", Date="2100/01/01").content == b""
    rows = v2("NewStudiesInPatientCollection", Collection="Phantom-Body-MR", Date="2000/01/01").json()
    assert_key_order(rows, STUDY_KEYS)


def test_updated_series_takes_day_first_dates(v2):
    rows = v2("getUpdatedSeries", fromDate="01/01/2000").json()
    assert rows
    assert_key_order(rows, UPDATED_SERIES_KEYS)
    assert v2("getUpdatedSeries", fromDate="01/01/2100").content == b""


def test_sop_instance_uids_unordered(v2):
    big = max(all_series(v2), key=lambda s: s["ImageCount"])
    rows = v2("getSOPInstanceUIDs", SeriesInstanceUID=big["SeriesInstanceUID"]).json()
    assert len(rows) == big["ImageCount"] and all(list(r) == ["SOPInstanceUID"] for r in rows)
    uids = [r["SOPInstanceUID"] for r in rows]
    assert uids != sorted(uids)


def test_series_size_matches_files_and_is_never_a_file_size(nbia_archive_legacy, v2):
    for row in all_series(v2):
        size = v2("getSeriesSize", SeriesInstanceUID=row["SeriesInstanceUID"]).json()
        assert list(size[0]) == ["TotalSizeInBytes", "ObjectCount"]
        total, count = size[0]["TotalSizeInBytes"], size[0]["ObjectCount"]
        files = nbia_archive_legacy.index.series_by_uid[row["SeriesInstanceUID"]].instances
        sizes = [f.path.stat().st_size for f in files]
        assert total == sum(sizes) == row["FileSize"] and count == len(sizes)
        if count > 1:
            assert total / count not in sizes and len(set(sizes)) > 1
    assert v2("getSeriesSize", SeriesInstanceUID="1.2.3.4").json() == [{}]


def test_series_metadata_keys_with_spaces_all_strings(v2):
    uid = all_series(v2)[0]["SeriesInstanceUID"]
    rows = v2("getSeriesMetaData", SeriesInstanceUID=uid).json()
    assert_key_order(rows, METADATA_KEYS)
    assert all(isinstance(v, str) for v in rows[0].values()) and "Series UID" in rows[0]
    missing = v2("getSeriesMetaData", SeriesInstanceUID="1.2.3.4")
    assert missing.status_code == 204 and missing.content == b""


def test_contents_by_name_is_always_json(v2):
    rows = v2("getContentsByName", name="nbia-demo-cart", format="csv").json()
    assert len(rows) == 2
    assert_key_order(rows, CART_KEYS)
    assert list(rows[0])[-1] == "Date Released"
    assert v2("getContentsByName", name="no-such-cart").content == b""


# --------------------------------------------------------------------------- formats and errors
def test_csv_format(v2):
    r = v2("getSeries", Collection="Phantom-Thorax-CT", format="CSV")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert r.headers["Content-Type"].startswith("text/csv")
    assert len(rows) == len(v2("getSeries", Collection="Phantom-Thorax-CT").json())
    assert list(rows[0])[0] == "SeriesInstanceUID"


def test_unknown_format(v2):
    r = v2("getCollectionValues", format="yaml")
    assert r.status_code == 500 and r.content == SERVER_ERROR_BODY
    assert v2("getPatient", Collection="nope", format="yaml").content == b""


@pytest.mark.parametrize("endpoint,params,missing", [
    ("getSOPInstanceUIDs", {}, "SeriesInstanceUID"),
    ("getSeriesSize", {}, "SeriesInstanceUID"),
    ("getSingleImage", {"SeriesInstanceUID": "1.2"}, "SOPInstanceUID"),
    ("getImage", {}, "SeriesInstanceUID"),
    ("getPatientByCollectionAndModality", {"Collection": "x"}, "Modality"),
    ("NewPatientsInCollection", {"Collection": "x"}, "Date"),
    ("getUpdatedSeries", {}, "fromDate"),
])
def test_missing_parameter_is_a_400_sentence(v2, endpoint, params, missing):
    r = v2(endpoint, **params)
    assert r.status_code == 400
    assert r.text == f"A parameter, {missing} is required for this API call."
    assert r.headers["Content-Type"] == "application/json"


def test_unknown_sop_is_a_500_text(v2):
    uid = all_series(v2)[0]["SeriesInstanceUID"]
    r = v2("getSingleImage", SeriesInstanceUID=uid, SOPInstanceUID="1.2.3")
    assert r.status_code == 500 and r.headers["Content-Type"] == "text/plain"
    assert r.content == SERVER_ERROR_BODY and len(r.content) == 48


def test_unknown_series_zip_is_a_400(v2):
    r = v2("getImage", SeriesInstanceUID="1.2.3.4")
    assert r.status_code == 400
    assert r.text == "Image with given SeriesInstanceUID,1.2.3.4, is not in public domain."


# --------------------------------------------------------------------------- images
def _instances(v2, uid):
    return [r["SOPInstanceUID"] for r in v2("getSOPInstanceUIDs", SeriesInstanceUID=uid).json()]


def test_single_image_headers_and_bytes(nbia_archive_legacy, v2):
    uid = max(all_series(v2), key=lambda s: s["ImageCount"])["SeriesInstanceUID"]
    sop = _instances(v2, uid)[0]
    r = v2("getSingleImage", SeriesInstanceUID=uid, SOPInstanceUID=sop)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/dicom"
    assert r.headers["Content-Disposition"] == f"attachment; filename={sop}.dcm"
    assert int(r.headers["Content-Length"]) == len(r.content) and r.content[128:132] == b"DICM"
    ds = pydicom.dcmread(io.BytesIO(r.content))
    assert ds.SOPInstanceUID == sop and ds.SeriesInstanceUID == uid
    assert "Accept-Ranges" not in r.headers


def _zip(v2, endpoint, uid, **params):
    r = v2(endpoint, SeriesInstanceUID=uid, **params)
    assert r.status_code == 200
    assert r.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in r.headers
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["Content-Disposition"] == f'attachment; filename="{uid}.zip"'
    return zipfile.ZipFile(io.BytesIO(r.content))


def test_zip_entries_license_and_database_names_match_single_images(v2):
    s = max(all_series(v2), key=lambda s: s["ImageCount"])
    uid = s["SeriesInstanceUID"]
    zf = _zip(v2, "getImage", uid)
    names = zf.namelist()
    assert names[0] == "LICENSE" and names[1] == "00000001.dcm" and len(names) == s["ImageCount"] + 1
    assert zf.read("LICENSE").decode().startswith("License Information. The Phantom-")
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
    singles = {}
    for sop in _instances(v2, uid):
        singles[sop] = v2("getSingleImage", SeriesInstanceUID=uid, SOPInstanceUID=sop).content
    for name in names[1:]:
        data = zf.read(name)
        sop = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        assert singles.pop(sop) == data
    assert not singles


def test_zip_new_file_names_follow_instance_number(v2):
    s = max(all_series(v2), key=lambda s: s["ImageCount"])
    zf = _zip(v2, "getImage", s["SeriesInstanceUID"], NewFileNames="Yes")
    names = zf.namelist()[1:]
    assert names[:2] == ["1-001.dcm", "1-002.dcm"]
    numbers = [int(pydicom.dcmread(io.BytesIO(zf.read(n)), stop_before_pixels=True).InstanceNumber)
               for n in names]
    assert numbers == sorted(numbers)


def test_zip_with_md5_hashes(v2):
    s = max(all_series(v2), key=lambda s: s["ImageCount"])
    zf = _zip(v2, "getImageWithMD5Hash", s["SeriesInstanceUID"])
    names = zf.namelist()
    assert "LICENSE" not in names and names[-1] == "md5hashes.csv"
    rows = list(csv.DictReader(io.StringIO(zf.read("md5hashes.csv").decode())))
    assert list(rows[0]) == ["Filename", "MD5Hash"] and len(rows) == len(names) - 1
    for row in rows:
        assert hashlib.md5(zf.read(row["Filename"])).hexdigest() == row["MD5Hash"]


def test_every_file_reads_with_pydicom_and_dcmdump(nbia_archive_legacy):
    dcmdump = shutil.which("dcmdump")
    assert dcmdump, "DCMTK is installed by scripts/setup.sh"
    paths = [i.path for s in nbia_archive_legacy.index.series_by_uid.values() for i in s.instances]
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
    out = subprocess.run([dcmdump, "-q", *map(str, paths)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("(0008,0018)") == len(paths)


# --------------------------------------------------------------------------- auth
def test_v2_without_token(nbia_archive_legacy):
    base = nbia_archive_legacy.url + "/services/v2/"
    for endpoint in ("getCollectionValues", "getSingleImage", "getImage"):
        r = requests.get(base + endpoint, params={"SeriesInstanceUID": "1", "SOPInstanceUID": "2"})
        assert r.status_code == 500 and r.content == SERVER_ERROR_BODY, endpoint
    r = requests.get(base + "getSeries")
    assert r.status_code == 200 and r.content == b""


def test_v2_with_invalid_or_expired_token(nbia_archive_legacy):
    base = nbia_archive_legacy.url + "/services/v2/"
    nbia_archive_legacy.tokens.access_lifetime_s = 0.0
    expired = token(nbia_archive_legacy)["access_token"]
    for bearer in ("not-a-token", expired):
        h = {"Authorization": f"Bearer {bearer}"}
        for endpoint in ("getSingleImage", "getImage"):
            r = requests.get(base + endpoint, headers=h, params={"SeriesInstanceUID": "1"})
            assert r.status_code == 401 and r.content == b""
        for endpoint in ("getCollectionValues", "getSeries", "getPatient"):
            r = requests.get(base + endpoint, headers=h)
            assert r.status_code == 200 and r.content == b"", endpoint


def test_token_reply_shape_refresh_and_logout(nbia_archive_legacy):
    reply = token(nbia_archive_legacy)
    assert list(reply) == ["access_token", "expires_in", "refresh_expires_in", "refresh_token",
                           "token_type", "id_token", "not-before-policy", "session_state", "scope"]
    assert reply["token_type"] == "Bearer" and reply["expires_in"] == 7200
    refreshed = requests.post(nbia_archive_legacy.url + "/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": reply["refresh_token"], "client_id": "nbia"})
    assert refreshed.status_code == 200 and refreshed.json()["access_token"] != reply["access_token"]
    again = requests.post(nbia_archive_legacy.url + "/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": reply["refresh_token"], "client_id": "nbia"})
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    bearer = {"Authorization": f"Bearer {refreshed.json()['access_token']}"}
    base = nbia_archive_legacy.url + "/services/v2/getCollectionValues"
    assert requests.get(base, headers=bearer).json()
    assert requests.get(nbia_archive_legacy.url + "/logout", headers=bearer).status_code == 405
    assert requests.post(nbia_archive_legacy.url + "/logout", headers=bearer).status_code == 200
    assert requests.get(base, headers=bearer).content == b""


def test_bad_credentials_are_a_401(nbia_archive_legacy):
    r = requests.post(nbia_archive_legacy.url + "/oauth/token", data=dict(
        GUEST_FORM, username="researcher", password="wrong"))
    assert r.status_code == 401
    assert r.json() == {"error": "invalid_grant", "error_description": "Invalid user credentials"}


def test_restricted_collection_only_for_granted_user(nbia_archive_legacy):
    from nbiafs.archive.tokens import DEFAULT_USERS
    user, password = next(iter(DEFAULT_USERS.items()))
    bearer = token(nbia_archive_legacy, dict(GUEST_FORM, username=user, password=password))["access_token"]
    h = {"Authorization": f"Bearer {bearer}"}
    names = [r["Collection"] for r in requests.get(
        nbia_archive_legacy.url + "/services/v2/getCollectionValues", headers=h).json()]
    assert "Phantom-Restricted" in names
    series = requests.get(nbia_archive_legacy.url + "/services/v2/getSeries",
                          params={"Collection": "Phantom-Restricted"}, headers=h).json()
    uid = series[0]["SeriesInstanceUID"]
    assert requests.get(nbia_archive_legacy.url + "/services/v2/getImage", headers=h,
                        params={"SeriesInstanceUID": uid}).status_code == 200
    guest = token(nbia_archive_legacy)["access_token"]
    r = requests.get(nbia_archive_legacy.url + "/services/v2/getImage",
                     headers={"Authorization": f"Bearer {guest}"}, params={"SeriesInstanceUID": uid})
    assert r.status_code == 400 and "has not been granted the access" in r.text
    assert v1(nbia_archive_legacy, "getSeries", Collection="Phantom-Restricted").content == b""


def test_v1_is_anonymous_and_ignores_authorization(nbia_archive_legacy):
    r = requests.get(nbia_archive_legacy.url + "/services/v1/getCollectionValues",
                     headers={"Authorization": "Bearer garbage"})
    assert r.status_code == 200 and r.json()


# --------------------------------------------------------------------------- faults and counters
def _first_image(archive):
    s = next(s for s in archive.index.series_by_uid.values() if len(s.instances) > 2)
    return s.uid, s.instances[0]


def test_image_outage_and_recovery(nbia_archive_legacy):
    uid, inst = _first_image(nbia_archive_legacy)
    params = {"SeriesInstanceUID": uid, "SOPInstanceUID": inst.sop_uid}
    nbia_archive_legacy.set_faults(image_outage=True)
    assert v1(nbia_archive_legacy, "getSingleImage", **params).status_code == 500
    assert v1(nbia_archive_legacy, "getSeries").status_code == 200
    nbia_archive_legacy.clear_faults()
    assert v1(nbia_archive_legacy, "getSingleImage", **params).content == inst.path.read_bytes()


def test_truncated_single_image_is_short_of_content_length(nbia_archive_legacy):
    uid, inst = _first_image(nbia_archive_legacy)
    nbia_archive_legacy.set_faults(truncate_images=1.0)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        v1(nbia_archive_legacy, "getSingleImage", SeriesInstanceUID=uid, SOPInstanceUID=inst.sop_uid)


def test_zip_cut_short_still_ends_with_200(nbia_archive_legacy):
    uid, _ = _first_image(nbia_archive_legacy)
    full = len(nbia_archive_legacy.index.series_by_uid[uid].instances)
    nbia_archive_legacy.set_faults(zip_drop_entries=1)
    r = v1(nbia_archive_legacy, "getImage", SeriesInstanceUID=uid)
    assert r.status_code == 200
    assert len(zipfile.ZipFile(io.BytesIO(r.content)).namelist()) == full  # LICENSE + full - 1
    nbia_archive_legacy.set_faults(zip_drop_entries=0, zip_truncate=True)
    r = v1(nbia_archive_legacy, "getImage", SeriesInstanceUID=uid)
    assert r.status_code == 200
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(r.content))


def test_stall_never_answers_until_lifted(nbia_archive_legacy):
    nbia_archive_legacy.set_faults(stall="all")
    with pytest.raises(requests.exceptions.ReadTimeout):
        v1_timeout = requests.get(nbia_archive_legacy.url + "/services/v1/getSeries", timeout=0.5)
        assert v1_timeout is None
    nbia_archive_legacy.clear_faults()
    assert v1(nbia_archive_legacy, "getCollectionValues").status_code == 200


def test_bandwidth_cap_paces_the_body(nbia_archive_legacy):
    uid, _ = _first_image(nbia_archive_legacy)
    import time
    from nbiafs.archive.faults import BURST_S
    nbia_archive_legacy.set_faults(connection_mbit_s=0.1)  # 12.5 kB/s
    start = time.monotonic()
    body = v1(nbia_archive_legacy, "getImage", SeriesInstanceUID=uid).content
    elapsed = time.monotonic() - start
    assert len(body) / 12_500 > 0.5
    assert elapsed >= len(body) / 12_500 - BURST_S - 0.01


def test_counters_per_endpoint_and_token_over_http(nbia_archive_legacy, v2):
    nbia_archive_legacy.reset_counters()
    v2("getSeries")
    v2("getSeries")
    v1(nbia_archive_legacy, "getCollectionValues")
    over_http = requests.get(nbia_archive_legacy.url.replace("/nbia-api", "/_nbiafs/counters")).json()
    assert over_http == nbia_archive_legacy.counters()
    assert over_http["endpoints"] == {"getSeries": 2, "getCollectionValues": 1}
    assert list(over_http["tokens"].values()) == [2]
    assert list(over_http["tokens"])[0].startswith("nbia_guest#")


def test_faults_over_http(nbia_archive_legacy):
    admin = nbia_archive_legacy.url.replace("/nbia-api", "/_nbiafs/faults")
    assert requests.post(admin, data=json.dumps({"latency_s": 0.01})).json()["latency_s"] == 0.01
    assert nbia_archive_legacy.faults.latency_s == 0.01
    assert requests.post(admin, data=json.dumps({"bogus": 1})).status_code == 400
    requests.post(admin, data=json.dumps({"clear": True}))
    assert nbia_archive_legacy.faults.latency_s == 0.0
