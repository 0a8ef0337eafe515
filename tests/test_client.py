"""The NBIA client against the local archive over HTTP: parsing, retries, tokens, secrecy."""

from __future__ import annotations

import io
import logging
import threading
import time
import zipfile
from dataclasses import replace

import pytest

from nbiafs.api import models
from nbiafs.api.auth import Credentials, resolve_credentials
from nbiafs.api.client import ClientConfig, NbiaClient
from nbiafs.archive.tokens import DEFAULT_USERS
from nbiafs.errors import (ArchiveUnavailable, AuthenticationFailed, IntegrityError, NotAuthorized,
                           NotFound)

USER, PASSWORD = next(iter(DEFAULT_USERS.items()))


def fast_config(archive, **kw) -> ClientConfig:
    """Production policy with shorter budgets, so failures are quick to observe."""
    return replace(ClientConfig(root_url=archive.url), metadata_budget_s=20, image_budget_s=20, **kw)


@pytest.fixture
def client(nbia_archive):
    with NbiaClient(fast_config(nbia_archive)) as c:
        yield c


def big_series(archive):
    return max(archive.index.series_by_uid.values(), key=lambda s: len(s.instances))


# --------------------------------------------------------------------------- parsing
def test_tolerant_parsing():
    p = models.Patient.parse({"PatientId": "A 1", "Collection": "C", "Unknown": 3})
    assert p.patient_id == "A 1" and p.sex is None
    assert models.Study.parse({"StudyInstanceUID": "1.2", "PatientID": "A", "SeriesCount": "3.0"}).series_count == 3
    s = models.Series.parse({"SeriesInstanceUID": "1", "ImageCount": "1234.0", "FileSize": 5.0,
                             "SeriesNumber": "7"})
    assert (s.image_count, s.file_size, s.number, s.description) == (1234, 5, 7, None)
    assert models.SeriesSize.parse({}) is None
    assert models.SeriesSize.parse({"TotalSizeInBytes": "10", "ObjectCount": 2}) == models.SeriesSize(10, 2)
    meta = models.Series.parse({"Series UID": "1", "Number of Images": "4", "File Size": "99"})
    assert (meta.series_uid, meta.image_count, meta.file_size) == ("1", 4, 99)
    assert models.values([{}, {"BodyPartExamined": "CHEST"}], "BodyPartExamined") == ["CHEST"]
    assert models.as_int("garbage") is None and models.as_int(True) is None


# --------------------------------------------------------------------------- endpoints
def test_every_endpoint(client, nbia_archive):
    assert "Phantom-Thorax-CT" in client.get_collection_values()
    assert client.get_modality_values("Phantom-Thorax-CT")
    assert client.get_body_part_values()
    assert client.get_manufacturer_values() == ["NBIAFS PHANTOM WORKS"]
    patients = client.get_patients("Phantom-Thorax-CT")
    assert any(" " in p.patient_id for p in patients)
    assert client.get_patients_by_modality("Phantom-Body-MR", "MR")
    assert client.new_patients_in_collection("Phantom-Body-MR", "2000-01-01")
    studies = client.get_patient_studies("Phantom-Thorax-CT", patients[0].patient_id)
    assert studies and studies[0].patient_id == patients[0].patient_id
    assert client.new_studies_in_patient_collection("Phantom-Body-MR", "2000-01-01")
    series = client.get_series(study_uid=studies[0].study_uid)
    assert series and all(s.image_count for s in series)
    assert client.get_updated_series("2000-01-01")
    big = big_series(nbia_archive)
    assert sorted(client.get_sop_instance_uids(big.uid)) == sorted(i.sop_uid for i in big.instances)
    assert client.get_series_size(big.uid) == models.SeriesSize(big.total_size, len(big.instances))
    assert client.get_series_size("1.2.3") is None
    [meta] = client.get_series_metadata([big.uid, "1.2.3"])
    assert (meta.series_uid, meta.image_count, meta.file_size) == (big.uid, len(big.instances), big.total_size)
    inst = big.instances[0]
    assert client.get_single_image_bytes(big.uid, inst.sop_uid) == inst.path.read_bytes()


def test_series_zip_streamed_to_disk(client, nbia_archive, tmp_path):
    big = big_series(nbia_archive)
    dest = tmp_path / "series.zip"
    size = client.download_series_zip(big.uid, dest, new_file_names=True)
    assert dest.stat().st_size == size
    names = zipfile.ZipFile(dest).namelist()
    assert names[0] == "LICENSE" and len(names) == len(big.instances) + 1
    assert [p.name for p in tmp_path.iterdir()] == ["series.zip"]
    with pytest.raises(NotAuthorized):  # v4: an unknown series is "not granted"
        client.download_series_zip("1.2.3.4", tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


def test_v1_anonymous(nbia_archive_legacy):
    nbia_archive = nbia_archive_legacy
    with NbiaClient(fast_config(nbia_archive, api="v1")) as c:
        assert c.auth is None and "Phantom-Thorax-CT" in c.get_collection_values()
        assert len(c.get_contents_by_name("nbia-demo-cart")) == 2
    assert "oauth/token:password" not in nbia_archive.counters()["endpoints"]


def test_v2_client_against_the_legacy_archive(nbia_archive_legacy, tmp_path):
    archive = nbia_archive_legacy
    big = big_series(archive)
    with NbiaClient(fast_config(archive, api="v2")) as c:
        assert c.auth is not None and c.user == "nbia_guest"
        [meta] = c.get_series_metadata([big.uid])  # getSeriesMetaData, keys with spaces
        assert (meta.series_uid, meta.image_count) == (big.uid, len(big.instances))
        assert c.get_md5(big.instances[0].sop_uid) is None  # v4 only
        assert len(c.get_contents_by_name("nbia-demo-cart")) == 2
        with pytest.raises(NotFound):
            c.download_series_zip("1.2.3.4", tmp_path / "x.zip")
    assert set(archive.counters()["versions"]) == {"v2"}


def test_v4_guest_needs_no_token(client, nbia_archive):
    assert client.api == "v4" and client.negotiated and client.auth is None and client.user == "nbia_guest"
    assert client.get_collection_values() == ["Phantom-Body-MR", "Phantom-Thorax-CT"]
    counts = nbia_archive.counters()
    assert not any(k.startswith(("oauth", "logout")) for k in counts["endpoints"])
    assert counts["versions"] == {"v4": counts["total"]}


def test_genuinely_empty_answer_is_checked_once_and_returned(nbia_archive_legacy):
    with NbiaClient(fast_config(nbia_archive_legacy, api="v2")) as client:
        nbia_archive_legacy.reset_counters()
        assert client.get_patient_studies("Phantom-Thorax-CT", "NOSTUDY-001") == []
    counts = nbia_archive_legacy.counters()["endpoints"]
    assert counts == {"getPatientStudy": 1, "getCollectionValues": 1, "logout": 1}


def test_v4_guest_empty_answer_is_believed_without_a_check(client, nbia_archive):
    nbia_archive.reset_counters()
    assert client.get_patient_studies("Phantom-Thorax-CT", "NOSTUDY-001") == []
    assert nbia_archive.counters()["endpoints"] == {"getPatientStudy": 1}


@pytest.fixture(params=["v2-guest", "v4-user"])
def token_client(request, nbia_archive):
    """A client with a token session: the guest's on v2, a named user's on v4."""
    if request.param == "v2-guest":
        nbia_archive.set_versions("v1", "v2", "v4")
        c = NbiaClient(fast_config(nbia_archive, api="v2"))
    else:
        c = NbiaClient(fast_config(nbia_archive), Credentials(USER, PASSWORD))
    with c:
        yield c


def test_empty_answer_from_a_dead_token_is_never_returned(token_client, nbia_archive):
    client = token_client
    expected = len(client.get_series(collection="Phantom-Thorax-CT"))
    nbia_archive.tokens.expire_all()  # the client still believes its token is valid
    assert len(client.get_series(collection="Phantom-Thorax-CT")) == expected
    nbia_archive.tokens.revoke_refresh_tokens()
    nbia_archive.tokens.expire_all()
    assert len(client.get_series(collection="Phantom-Thorax-CT")) == expected


def test_an_empty_answer_is_judged_by_the_token_it_came_with(token_client, nbia_archive):
    """Between an empty answer (from a dead token) and its check, another thread renewed the
    session's token: the check must prove the token the answer came with, not the new one,
    or the dead token's "no data" would be taken for the truth (and cached as a listing)."""
    client = token_client
    expected = len(client.get_series(collection="Phantom-Thorax-CT"))
    assert expected > 0
    dead = f"Bearer {client.auth.current_token()}"
    nbia_archive.tokens.expire_all()
    client.auth.renew_after_rejection(dead)  # what the other thread did: the session's token is live
    assert f"Bearer {client.auth.current_token()}" != dead
    rows = client._verify_empty("getSeries", {"Collection": "Phantom-Thorax-CT"}, seen={"empty_with": dead})
    assert len(rows) == expected


def test_download_with_dead_token_renews_once_and_retries(token_client, nbia_archive):
    client = token_client
    big = big_series(nbia_archive)
    nbia_archive.tokens.expire_all()
    nbia_archive.reset_counters()
    inst = big.instances[1]
    assert client.get_single_image_bytes(big.uid, inst.sop_uid) == inst.path.read_bytes()
    counts = nbia_archive.counters()["endpoints"]
    assert counts["getSingleImage"] == 2 and counts["oauth/token:refresh_token"] == 1


def test_restricted_series_is_not_authorized_for_guest(client, nbia_archive, tmp_path):
    restricted = next(s for s in nbia_archive.index.series_by_uid.values()
                      if s.collection.get("restricted"))
    with pytest.raises(NotAuthorized):
        client.download_series_zip(restricted.uid, tmp_path / "r.zip")


# --------------------------------------------------------------------------- tokens over time
def test_long_run_across_token_lifetimes_needs_one_login(nbia_archive):
    """15 s of listings and reads by 4 threads with 3 s tokens: all complete, one password grant
    (a named user on v4: the token session is kept on v4)."""
    nbia_archive.tokens.access_lifetime_s = 3.0
    nbia_archive.tokens.refresh_lifetime_s = 6.0
    big = big_series(nbia_archive)
    expected_series = len(list(nbia_archive.index.iter_series(USER)))
    errors, calls = [], [0]
    with NbiaClient(fast_config(nbia_archive), Credentials(USER, PASSWORD)) as c:
        stop = time.monotonic() + 15.0

        def worker(k):
            while time.monotonic() < stop:
                try:
                    assert len(c.get_series()) == expected_series
                    inst = big.instances[(calls[0] + k) % len(big.instances)]
                    assert c.get_single_image_bytes(big.uid, inst.sop_uid) == inst.path.read_bytes()
                    calls[0] += 1
                except Exception as exc:  # collected, asserted below
                    errors.append(repr(exc))
                time.sleep(0.05)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    counts = nbia_archive.counters()["endpoints"]
    assert errors == []
    assert calls[0] > 40
    assert counts["oauth/token:password"] == 1
    assert counts["oauth/token:refresh_token"] >= 4  # 15 s / 3 s tokens
    assert counts["logout"] == 1


def test_rejected_refresh_token_leads_to_fresh_login_without_failed_call(nbia_archive):
    nbia_archive.tokens.access_lifetime_s = 2.0
    with NbiaClient(fast_config(nbia_archive), Credentials(USER, PASSWORD)) as c:
        n = len(c.get_series())
        nbia_archive.tokens.revoke_refresh_tokens()
        stop = time.monotonic() + 4.0
        while time.monotonic() < stop:
            assert len(c.get_series()) == n
            time.sleep(0.1)
    counts = nbia_archive.counters()["endpoints"]
    assert counts["oauth/token:password"] == 2


def test_named_user_sees_restricted_collection(nbia_archive):
    with NbiaClient(fast_config(nbia_archive), Credentials(USER, PASSWORD)) as c:
        assert "Phantom-Restricted" in c.get_collection_values()


def test_wrong_password_is_authentication_failed(nbia_archive):
    c = NbiaClient(fast_config(nbia_archive), Credentials(USER, "not-the-password"))
    with pytest.raises(AuthenticationFailed) as info:
        c.start()
    assert "not-the-password" not in str(info.value)
    c.close()


def test_credentials_from_environment_and_netrc(tmp_path, monkeypatch):
    assert resolve_credentials(None, "http://h/nbia-api", environ={}).username == "nbia_guest"
    env = {"NBIA_USER": "alice", "NBIA_PASSWORD": "s3cret"}
    creds = resolve_credentials(None, "http://h/nbia-api", environ=env)
    assert creds == Credentials("alice", "s3cret") and "s3cret" not in repr(creds)
    (tmp_path / ".netrc").write_text("machine archive.example login bob password fromnetrc\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    creds = resolve_credentials("bob", "https://archive.example/nbia-api", environ={})
    assert creds.password == "fromnetrc"
    with pytest.raises(AuthenticationFailed):
        resolve_credentials("carol", "https://other.example/nbia-api", interactive=False, environ={})


# --------------------------------------------------------------------------- faults
def test_two_second_outage_is_ridden_out(client, nbia_archive):
    big = big_series(nbia_archive)
    inst = big.instances[2]
    nbia_archive.set_faults(image_outage=True)
    timer = threading.Timer(2.0, nbia_archive.clear_faults)
    timer.start()
    try:
        assert client.get_single_image_bytes(big.uid, inst.sop_uid) == inst.path.read_bytes()
    finally:
        timer.cancel()
    assert nbia_archive.counters()["endpoints"]["getSingleImage"] >= 2


def test_permanent_outage_is_archive_unavailable_within_budget(nbia_archive):
    big = big_series(nbia_archive)
    nbia_archive.set_faults(image_outage=True)
    with NbiaClient(replace(fast_config(nbia_archive), image_budget_s=3.0)) as c:
        start = time.monotonic()
        with pytest.raises(ArchiveUnavailable) as info:
            c.get_single_image_bytes(big.uid, big.instances[0].sop_uid)
        elapsed = time.monotonic() - start
    assert "HTTP 500" in str(info.value) and info.value.errno == 5
    assert elapsed <= 3.5


def test_stall_is_bounded_by_the_budget(nbia_archive):
    with NbiaClient(replace(fast_config(nbia_archive, api="v4"), metadata_budget_s=2.0)) as c:
        nbia_archive.set_faults(stall="all")
        start = time.monotonic()
        with pytest.raises(ArchiveUnavailable):
            c.get_series()
        assert time.monotonic() - start <= 2.5


@pytest.mark.parametrize("fault", [{"truncate_images": 1.0}, {"corrupt_images": "nodicm"},
                                   {"corrupt_images": "html"}])
def test_bad_image_bodies_are_integrity_errors(nbia_archive, fault):
    big = big_series(nbia_archive)
    nbia_archive.set_faults(**fault)
    dest = io.BytesIO()
    with NbiaClient(replace(fast_config(nbia_archive), attempts=2)) as c:
        with pytest.raises(IntegrityError):
            c.get_single_image(big.uid, big.instances[0].sop_uid, dest)
    assert nbia_archive.counters()["endpoints"]["getSingleImage"] == 2


def test_malformed_json_is_retried_then_integrity_error(nbia_archive):
    nbia_archive.set_faults(corrupt_json=True)
    with NbiaClient(replace(fast_config(nbia_archive), attempts=2)) as c:
        with pytest.raises(IntegrityError):
            c.get_series()
        nbia_archive.clear_faults()
        assert c.get_series()


# --------------------------------------------------------------------------- secrecy
def test_no_password_or_token_in_logs_or_errors(nbia_archive, caplog):
    caplog.set_level(logging.DEBUG)
    nbia_archive.tokens.access_lifetime_s = 1.0
    big = big_series(nbia_archive)
    messages = []
    config = replace(fast_config(nbia_archive), image_budget_s=1.0)
    with NbiaClient(config, Credentials(USER, PASSWORD)) as c:
        c.get_series()
        time.sleep(1.2)  # at least one refresh
        nbia_archive.set_faults(image_outage=True)
        for sop in ("1.2.3", big.instances[0].sop_uid):
            with pytest.raises(ArchiveUnavailable) as info:
                c.get_single_image_bytes(big.uid, sop)
            messages += [str(info.value), repr(info.value)]
        nbia_archive.clear_faults()
        nbia_archive.tokens.expire_all()
        c.get_series()
    bad = NbiaClient(config, Credentials(USER, PASSWORD + "x"))
    with pytest.raises(AuthenticationFailed) as info:
        bad.start()
    messages.append(str(info.value))
    bad.close()
    secrets = [PASSWORD, PASSWORD + "x", *nbia_archive.tokens.issued]
    assert len(secrets) > 6
    assert "token refreshed" in caplog.text and "logged in" in caplog.text
    text = caplog.text + "\n".join(messages)
    for secret in secrets:
        assert secret not in text


# --------------------------------------------------------------------------- the environment
class _Recorder:
    """A loopback HTTP server that answers every GET with `[]` and records the request line and
    Authorization header of each (as a proxy sees an absolute URI in the request line)."""

    def __init__(self):
        import http.server
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                seen.append((self.requestline, self.headers.get("Authorization")))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"[]")

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_netrc_password_is_never_sent_with_guest_requests(tmp_path, monkeypatch):
    """requests would add a ~/.netrc entry for the host as Basic auth to every request without a
    token; nbiafs reads ~/.netrc only to log in a named user."""
    archive = _Recorder()
    try:
        netrc = tmp_path / ".netrc"
        netrc.write_text("machine 127.0.0.1 login someone password s3cret-in-netrc\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("NETRC", str(netrc))
        with NbiaClient(ClientConfig(root_url=f"{archive.url}/nbia-api", api="v4")) as c:
            assert c.get_collection_values() == []
        assert archive.seen and all(auth is None for _line, auth in archive.seen)
    finally:
        archive.close()


def test_the_proxy_of_the_environment_is_used(monkeypatch):
    """The environment is read once, when the client is made: HTTP_PROXY still routes requests."""
    proxy = _Recorder()
    try:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        with NbiaClient(ClientConfig(root_url="http://archive.invalid/nbia-api", api="v4")) as c:
            assert c.get_collection_values() == []
        targets = {line.split()[1] for line, _auth in proxy.seen}
        assert targets == {"http://archive.invalid/nbia-api/services/v4/getCollectionValues"}
    finally:
        proxy.close()
