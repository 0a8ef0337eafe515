"""TCIA's own Python client, tcia-utils 3.3.5 (the newest; v4 only, plus v1 for shared carts),
unmodified, in a virtual environment of its own, against the local archive over HTTP.

The venv is made once in `.venv-tcia-utils` beside the project (pip from PyPI, about 20 s) and
reused while it holds that version. Only the transport is redirected (tests/tcia_utils_driver.py);
every answer is checked against the archive's own index.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import venv
from pathlib import Path

import pytest

TCIA_UTILS = "tcia-utils==3.3.5"
ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-tcia-utils"
DRIVER = Path(__file__).resolve().parent / "tcia_utils_driver.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tcia_python() -> Path:
    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import importlib.metadata as m; print(m.version('tcia-utils'))"]
    if not python.exists() or subprocess.run(check, capture_output=True, text=True).stdout.strip() != "3.3.5":
        venv.create(VENV, with_pip=True, clear=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", TCIA_UTILS],
                       check=True, stdin=subprocess.DEVNULL, timeout=900)
    return python


def test_tcia_utils_unmodified_against_the_local_archive(tcia_python, nbia_archive_legacy, tmp_path):
    archive = nbia_archive_legacy  # v4, and v1 for getContentsByName, as TCIA serves today
    collection = "Phantom-Thorax-CT"
    res = subprocess.run([str(tcia_python), str(DRIVER), archive.url, str(tmp_path), collection, "nbia-demo-cart"],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout)
    index = archive.index
    coll = next(c for c in index.collections if c["Collection"] == collection)
    everything = list(index.iter_series("nbia_guest"))
    mine = [s for s in everything if s.collection is coll]

    assert got["collections"] == sorted(c["Collection"] for c in index.visible_collections("nbia_guest"))
    assert got["patients"] == [p["PatientID"] for p in coll["patients"]]
    assert sorted(got["studies"]) == sorted(st["StudyInstanceUID"] for p in coll["patients"] for st in p["studies"])
    assert got["series"] == {s.uid: {"ImageCount": len(s.instances), "FileSize": s.total_size,
                                     "SeriesDate": _mdy(s.raw["SeriesDate"])} for s in mine}
    big = max(mine, key=lambda s: len(s.instances))
    assert got["series_size"] == [{"TotalSizeInBytes": big.total_size, "ObjectCount": len(big.instances)}]
    assert sorted(got["sops"]) == sorted(i.sop_uid for i in big.instances)
    # downloadSeries: getImage?NewFileNames=Yes unzipped (LICENSE and every instance, all DICOM)
    dicoms = {n: magic for n, magic in got["downloaded"].items() if n != "LICENSE"}
    assert len(dicoms) == len(big.instances) and set(dicoms.values()) == {"DICM"} and "LICENSE" in got["downloaded"]
    assert got["downloaded_with_md5"] == [f"{n:08d}.dcm" for n in range(1, len(big.instances) + 1)] + ["md5hashes.csv"]
    first = got["sops"][0]  # downloadImage fetched the first of getSopInstanceUids
    assert got["single_image_md5"] == hashlib.md5(index.instance_by_sop[first][1].path.read_bytes()).hexdigest()
    assert got["series_list"] == {s.uid: len(s.instances) for s in mine}
    assert got["dicom_tags"] == {"(0008,0060)": "CT", "(0020,000E)": big.uid, "(0002,0010)": "1.2.840.10008.1.2.1"}
    assert got["shared_cart"] == sorted(index.carts["nbia-demo-cart"])
    # It spoke v4 throughout, v1 only for the cart; the archive saw the same.
    assert {line.split("/")[2] for line in got["sent"]} == {"v4", "v1"}
    assert [line for line in got["sent"] if "/v1/" in line] == ["GET /services/v1/getContentsByName"]
    counts = archive.counters()
    assert counts["versions"] == {"v4": len(got["sent"]) - 1, "v1": 1}
    assert not any(k.startswith("oauth") for k in counts["endpoints"])  # no token: the guest


def test_tcia_utils_against_a_v4_only_archive_still_works_but_for_carts(tcia_python, nbia_archive, tmp_path):
    """As production will be once v1 is retired: everything answers, getSharedCart finds nothing."""
    res = subprocess.run([str(tcia_python), str(DRIVER), nbia_archive.url, str(tmp_path), "Phantom-Body-MR",
                          "nbia-demo-cart"], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode != 0 and "TypeError" in res.stderr  # getSharedCart: None (HTTP 404), then iterated
    assert "404" in res.stderr and "getContentsByName" in res.stderr
    assert nbia_archive.counters()["versions"] == {"v4": 11}


def _mdy(iso: str) -> str:
    y, m, d = iso[:10].split("-")
    return f"{m}-{d}-{y}"
