"""The one check of bytes from the shared tier (verify.py), its DICOM completeness walk
(dicomhead.ends_complete), and the tier's configuration: no network, no mount."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from nbiafs.dicomhead import ends_complete
from nbiafs.settings import SettingsError, parse_mount_options
from nbiafs.tier import archive_name, parse_tier_url
from nbiafs.verify import refusal

TESTDATA = Path(get_testdata_file("CT_small.dcm")).parent
# pydicom's own truncated files, and files this walk does not judge (big endian, deflated)
TRUNCATED = {"MR_truncated.dcm", "rtplan_truncated.dcm"}
NOT_JUDGED = {"ExplVR_BigEnd.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "SC_rgb_small_odd_big_endian.dcm",
              "image_dfl.dcm", "liver_expb_1frame.dcm", "rtdose_expb.dcm", "rtdose_expb_1frame.dcm"}


def part10_files() -> list[Path]:
    return [p for p in sorted(TESTDATA.glob("*.dcm")) if p.read_bytes()[128:132] == b"DICM"]


def test_every_whole_file_of_pydicom_is_whole_and_every_cut_one_is_not():
    files = part10_files()
    assert len(files) > 60
    for path in files:
        data = path.read_bytes()
        verdict = ends_complete(io.BytesIO(data))
        if path.name in TRUNCATED:
            assert verdict is False, path.name
            continue
        if path.name in NOT_JUDGED:
            assert verdict is None, path.name
            continue
        assert verdict is True, path.name
        # Cut inside the last element (pixel data, or a trailing padding element): never whole.
        for cut in (1, 2, 7, 100):
            if cut < len(data) - 400:
                assert ends_complete(io.BytesIO(data[:-cut])) is False, (path.name, cut)
        assert ends_complete(io.BytesIO(data + b"\0" * 3)) is False, path.name  # bytes after the end


def test_a_file_declaring_explicit_vr_but_written_implicit_is_whole():
    data = Path(get_testdata_file("SC_rgb_jpeg.dcm")).read_bytes()  # such a file, as pydicom keeps it
    assert ends_complete(io.BytesIO(data)) is True
    assert ends_complete(io.BytesIO(data[:-10])) is False


def test_encapsulated_pixel_data_cut_between_fragments_is_not_whole():
    data = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    end = data.rindex(b"\xfe\xff\xdd\xe0")  # the sequence delimiter that closes the fragments
    assert ends_complete(io.BytesIO(data[:end])) is False
    assert ends_complete(io.BytesIO(data[:end + 8])) is True


def refused(data: bytes, sop: str, **kw) -> str | None:
    return refusal(io.BytesIO(data), sop, len(data), **kw)


def test_refusal_names_what_is_wrong():
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    sop = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    md5 = hashlib.md5(data).hexdigest()
    assert refused(data, sop) is None
    assert refused(data, sop, expected_size=len(data), md5=md5, expected_md5=md5) is None
    assert refused(data, sop, md5=md5, expected_md5="0" * 32) == f"md5 {md5}, the archive's is {'0' * 32}"
    assert refused(data, "1.2.3") == f"it is instance {sop}"
    assert refused(b"<html>503</html>", sop) == "not a DICOM Part-10 file"
    assert refused(data, sop, expected_size=len(data) + 1) == \
        f"{len(data)} bytes where the instance has {len(data) + 1}"
    assert refused(data[:-5], sop) == "cut short (its last element runs past the end)"
    # With no md5 and no exact size, a changed pixel passes what bytes alone can show: the md5 is
    # what catches it (the mount refuses a tier object when the archive's md5 cannot be had).
    changed = bytearray(data)
    changed[-3] ^= 0xFF
    assert refused(bytes(changed), sop) is None
    assert refused(bytes(changed), sop, md5=hashlib.md5(changed).hexdigest(), expected_md5=md5) is not None


@pytest.mark.parametrize("url,bucket,prefix", [
    ("s3://tier", "tier", ""),
    ("s3://tier/", "tier", ""),
    ("s3://my.tier-1/nbiafs/cluster-a/", "my.tier-1", "nbiafs/cluster-a"),
])
def test_tier_urls(url, bucket, prefix):
    config = parse_tier_url(url)
    assert (config.bucket, config.prefix) == (bucket, prefix)
    assert config.url == f"s3://{bucket}" + (f"/{prefix}" if prefix else "")


@pytest.mark.parametrize("url", ["http://tier/x", "s3://", "s3://UPPER", "s3://a", "tier", "s3://a..b/x"])
def test_bad_tier_urls_are_one_line(url):
    with pytest.raises(ValueError) as info:
        parse_tier_url(url)
    assert "\n" not in str(info.value) and "s3://BUCKET[/PREFIX]" in str(info.value)


def test_archive_names_are_hosts():
    assert archive_name("https://nbia.cancerimagingarchive.net/nbia-api") == "nbia.cancerimagingarchive.net"
    assert archive_name("http://127.0.0.1:8080/nbia-api/") == "127.0.0.1:8080"


def test_shared_cache_is_a_setting_and_its_secrets_are_not():
    assert parse_mount_options("shared_cache=s3://tier/x")["shared_cache"] == "s3://tier/x"
    with pytest.raises(SettingsError) as info:
        parse_mount_options("aws_secret_access_key=abc")
    assert "AWS_SECRET_ACCESS_KEY" in str(info.value) and "abc" not in str(info.value)


def test_the_s3_client_is_unsigned_without_credentials_and_signed_with_them(monkeypatch, tmp_path):
    from botocore import UNSIGNED

    from nbiafs.tier import TierConfig, make_client
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    anonymous = make_client(TierConfig(bucket="tier"))
    assert anonymous.meta.config.signature_version is UNSIGNED
    assert anonymous.meta.region_name == "us-east-1"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    signed = make_client(TierConfig(bucket="tier"))
    assert signed.meta.config.signature_version is not UNSIGNED
    assert signed.meta.endpoint_url == "http://127.0.0.1:9"
    assert signed.meta.config.retries["total_max_attempts"] == 2 and signed.meta.config.connect_timeout == 1.0
