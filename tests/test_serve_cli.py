"""`nbiafs serve` as a process: URL on the first line, serves, stops on SIGTERM; --dicom-dir."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import requests


def serve(*args, data_dir):
    proc = subprocess.Popen([sys.executable, "-m", "nbiafs", "serve", "--port", "0",
                             "--data-dir", str(data_dir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_serve_prints_url_first_and_stops_on_sigterm(tmp_path, nbia_archive_data):
    proc, url = serve("--spec", "test", data_dir=nbia_archive_data)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/nbia-api")
        names = requests.get(url + "/services/v1/getCollectionValues", timeout=10).json()
        assert {"Collection": "Phantom-Thorax-CT"} in names
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_serve_a_folder_of_dicom_files(tmp_path, nbia_archive):
    series = next(s for s in nbia_archive.index.series_by_uid.values() if len(s.instances) > 2)
    folder = tmp_path / "My-Collection" / "any" / "layout"
    folder.mkdir(parents=True)
    for inst in series.instances:
        shutil.copy(inst.path, folder / f"{inst.instance_number}.dcm")
    (folder / "notes.txt").write_text("not DICOM")
    proc, url = serve("--dicom-dir", str(tmp_path), data_dir=tmp_path / "unused")
    try:
        assert requests.get(url + "/services/v1/getCollectionValues").json() == [
            {"Collection": "My-Collection"}]
        rows = requests.get(url + "/services/v1/getSeries").json()
        assert [r["SeriesInstanceUID"] for r in rows] == [series.uid]
        assert rows[0]["ImageCount"] == len(series.instances)
        assert rows[0]["FileSize"] == series.total_size
        inst = series.instances[0]
        body = requests.get(url + "/services/v1/getSingleImage", params={
            "SeriesInstanceUID": series.uid, "SOPInstanceUID": inst.sop_uid}).content
        assert body == inst.path.read_bytes()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


def test_bad_spec_is_one_line_and_non_zero(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nbiafs", "serve", "--spec", "3x3",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("nbiafs: bad archive spec")
    assert "Traceback" not in out.stderr


def test_serve_v4_only(nbia_archive_data):
    proc, url = serve("--spec", "test", "--versions", "v4", data_dir=nbia_archive_data)
    try:
        assert requests.get(url + "/services/v4/getCollectionValues", timeout=10).json()
        for version in ("v1", "v2"):
            assert requests.get(f"{url}/services/{version}/getCollectionValues", timeout=10).status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_bad_versions_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nbiafs", "serve", "--versions", "v3", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "versions" in out.stderr, out.stderr
