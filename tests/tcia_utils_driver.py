"""Drive TCIA's own client, tcia-utils, unmodified, against the local archive.

Run by tests/test_tcia_utils.py with the Python of a virtual environment that holds only
tcia-utils and what it needs (never nbiafs): `python tcia_utils_driver.py ARCHIVE_URL WORKDIR`.
The one change is the transport: every request tcia-utils sends to TCIA's production host goes
to ARCHIVE_URL instead (its paths, parameters and bodies untouched). Prints one JSON object
with what each call returned, for the test to check against the archive's own index.
"""

import json
import os
import sys

import requests.adapters

ARCHIVE, WORKDIR = sys.argv[1].rstrip("/"), sys.argv[2]
PRODUCTION = "https://nbia.cancerimagingarchive.net/nbia-api"
sent = []
_send = requests.adapters.HTTPAdapter.send


def redirected_send(self, request, **kwargs):
    assert request.url.startswith(PRODUCTION), request.url  # nothing else may be asked
    request.url = ARCHIVE + request.url[len(PRODUCTION):]
    sent.append(f"{request.method} {request.url[len(ARCHIVE):].split('?')[0]}")
    return _send(self, request, **kwargs)


requests.adapters.HTTPAdapter.send = redirected_send

from tcia_utils import nbia  # noqa: E402  (after the transport is redirected)


def main() -> None:
    os.chdir(WORKDIR)
    out: dict = {}
    out["collections"] = [r["Collection"] for r in nbia.getCollections()]
    collection = sys.argv[3]
    out["patients"] = [r["PatientId"] for r in nbia.getPatient(collection)]
    studies = nbia.getStudy(collection)
    out["studies"] = [r["StudyInstanceUID"] for r in studies]
    series = nbia.getSeries(collection=collection)
    out["series"] = {r["SeriesInstanceUID"]: {"ImageCount": r["ImageCount"], "FileSize": r["FileSize"],
                                              "SeriesDate": r.get("SeriesDate")} for r in series}
    big = max(series, key=lambda r: r["ImageCount"])
    uid = big["SeriesInstanceUID"]
    out["series_size"] = nbia.getSeriesSize(uid)
    sops = [r["SOPInstanceUID"] for r in nbia.getSopInstanceUids(uid)]
    out["sops"] = sops
    nbia.downloadSeries([uid], input_type="list", path="series")
    folder = os.path.join("series", uid)
    out["downloaded"] = {name: open(os.path.join(folder, name), "rb").read()[128:132].decode("latin-1")
                         for name in sorted(os.listdir(folder))}
    nbia.downloadSeries([uid], input_type="list", path="hashed", hash="y")
    out["downloaded_with_md5"] = sorted(os.listdir(os.path.join("hashed", uid)))
    nbia.downloadImage(uid, sops[0], path="single")
    with open(os.path.join("single", uid, f"{sops[0]}.dcm"), "rb") as f:
        out["single_image_md5"] = __import__("hashlib").md5(f.read()).hexdigest()
    frame = nbia.getSeriesList([r["SeriesInstanceUID"] for r in series])
    out["series_list"] = {row["SeriesInstanceUID"]: int(row["ImageCount"]) for _, row in frame.iterrows()}
    tags = nbia.getDicomTags(uid)
    out["dicom_tags"] = {row["element"]: row["data"] for _, row in tags.iterrows()
                         if row["element"] in ("(0008,0060)", "(0020,000E)", "(0002,0010)")}
    cart = nbia.getSharedCart(sys.argv[4])
    out["shared_cart"] = sorted(r["SeriesInstanceUID"] for r in cart)
    out["sent"] = sent
    print(json.dumps(out))


if __name__ == "__main__":
    main()
