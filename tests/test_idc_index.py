"""IDC's series index: reduced once (in a child process) from IDC's Parquet layout to the lookup
file a mount reads, rows that cannot be routed left out, a new release reduced again."""

from __future__ import annotations

import os
import uuid

import pytest

pa = pytest.importorskip("pyarrow")  # the `idc` and `test` extras install it (scripts/setup.sh)
pq = pytest.importorskip("pyarrow.parquet")

from nbiafs.idcindex import (COLUMNS, IndexUnusable, SeriesIndex, default_index,  # noqa: E402
                             ensure_reduced, reduced_path)


def rows():
    good = str(uuid.uuid4())
    return [
        # instanceCount and series_size_MB exactly as IDC's index gives them (bytes / 1e6)
        {"SeriesInstanceUID": "1.2.3.1", "crdc_series_uuid": good, "aws_bucket": "idc-open-data",
         "instanceCount": 120, "series_size_MB": 63.158274, "license_short_name": "CC BY 4.0"},
        {"SeriesInstanceUID": "1.2.3.2", "crdc_series_uuid": str(uuid.uuid4()), "aws_bucket": "idc-open-data-cr",
         "instanceCount": 1, "series_size_MB": 0.000517, "license_short_name": "CC BY-NC 4.0"},
        {"SeriesInstanceUID": "1.2.3.3", "crdc_series_uuid": "not-a-uuid", "aws_bucket": "idc-open-data",
         "instanceCount": 3, "series_size_MB": 1.0, "license_short_name": "CC BY 4.0"},
        {"SeriesInstanceUID": "1.2.3.4", "crdc_series_uuid": str(uuid.uuid4()), "aws_bucket": None,
         "instanceCount": 3, "series_size_MB": 1.0, "license_short_name": "CC BY 4.0"},
        {"SeriesInstanceUID": "1.2.3.5", "crdc_series_uuid": str(uuid.uuid4()), "aws_bucket": "idc-open-data",
         "instanceCount": 3, "series_size_MB": 1.0000005, "license_short_name": None},
    ]


def write(path, records, extra_column=True):
    table = {c: [r[c] for r in records] for c in COLUMNS}
    if extra_column:
        table["Modality"] = ["CT"] * len(records)
    pq.write_table(pa.table(table), str(path))
    return path


def test_a_reduced_index_answers_what_routing_needs(tmp_path):
    records = rows()
    source = write(tmp_path / "idc_index.parquet", records)
    index = SeriesIndex(ensure_reduced(source, tmp_path / "idc"))
    first = index.lookup("1.2.3.1")
    assert first is not None
    assert (first.bucket, first.instances, first.size_bytes, first.license) == (
        "idc-open-data", 120, 63_158_274, "CC BY 4.0")
    assert first.prefix == f"{records[0]['crdc_series_uuid']}/"
    second = index.lookup("1.2.3.2")
    assert second is not None and (second.bucket, second.size_bytes, second.license) == (
        "idc-open-data-cr", 517, "CC BY-NC 4.0")
    # Not a UUID, no bucket, a size that is not whole bytes: never routed.
    assert [index.lookup(u) for u in ("1.2.3.3", "1.2.3.4", "1.2.3.5")] == [None, None, None]
    assert index.lookup("9.9.9") is None
    assert index.rows == 2
    index.close()


def test_the_reduction_is_private_made_once_and_again_for_a_new_release(tmp_path):
    source = write(tmp_path / "idc_index.parquet", rows())
    reduced = ensure_reduced(source, tmp_path / "idc")
    assert oct(reduced.stat().st_mode & 0o777) == "0o600"
    stamp = reduced.stat().st_mtime_ns
    assert ensure_reduced(source, tmp_path / "idc") == reduced and reduced.stat().st_mtime_ns == stamp
    write(source, rows()[:1])
    os.utime(source, ns=(stamp + 10**9, stamp + 10**9))
    again = ensure_reduced(source, tmp_path / "idc")
    assert again != reduced and again == reduced_path(source, tmp_path / "idc")
    assert SeriesIndex(again).rows == 1
    assert not [p for p in (tmp_path / "idc").iterdir() if p.name.endswith(".tmp")]


def test_an_index_that_cannot_be_used_is_one_line(tmp_path):
    missing = tmp_path / "lacking.parquet"
    pq.write_table(pa.table({"SeriesInstanceUID": ["1.2"], "aws_bucket": ["b"]}), str(missing))
    with pytest.raises(IndexUnusable, match=r"lacks the columns crdc_series_uuid, instanceCount"):
        ensure_reduced(missing, tmp_path / "idc")
    text = tmp_path / "text.parquet"
    text.write_text("SeriesInstanceUID\n1.2\n")
    with pytest.raises(IndexUnusable, match=r"is not a Parquet file"):
        ensure_reduced(text, tmp_path / "idc")
    broken = tmp_path / "idc" / "broken.sqlite"
    broken.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(IndexUnusable, match=r"unreadable .* delete it"):
        SeriesIndex(broken)


@pytest.mark.slow
def test_the_installed_index_is_found_and_reduced_whole(tmp_path):
    path = default_index()
    assert path is not None and path.name == "idc_index.parquet", "scripts/setup.sh installs idc-index-data"
    table = pq.ParquetFile(str(path)).read_row_group(0, columns=list(COLUMNS)).slice(0, 1).to_pylist()[0]
    index = SeriesIndex(ensure_reduced(path, tmp_path / "idc"))
    assert index.rows > 900_000  # v25: 1,044,191 series, every one routable
    found = index.lookup(table["SeriesInstanceUID"])
    assert found is not None
    assert (found.series_uuid, found.bucket, found.instances) == (
        table["crdc_series_uuid"], table["aws_bucket"], table["instanceCount"])
    assert found.size_bytes == round(table["series_size_MB"] * 1e6)
