"""Series of the local archive laid out as IDC's S3 mirror lays out TCIA's, with the series
index that describes them, for the tests and the benchmark of `--source`.

IDC names each series version by a random UUID and each instance by another:
`s3://<bucket>/<crdc_series_uuid>/<crdc_instance_uuid>.dcm`, the bytes TCIA's. `put_series`
writes such a copy (through a signed client: the store's anonymous identity only reads), and
may change it as IDC's copy can differ from TCIA's today (an instance revised since, one
missing); `write_index` writes the rows as IDC's `idc_index.parquet` names its columns.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from nbiafs.archive.records import Series

LICENSE = "CC BY 4.0"


def put_series(s3, bucket: str, series: Series, *, changed: dict[str, bytes] | None = None,
               missing: frozenset = frozenset(), license_name: str = LICENSE) -> dict:
    """Copy `series` into `bucket` under a new series UUID; `changed`: other bytes for some
    instances (by SOPInstanceUID), `missing`: instances left out. The index row of the copy
    (count and bytes as IDC's index would give them: of the copy)."""
    series_uuid = str(uuid.uuid4())
    total = count = 0
    for inst in series.instances:
        if inst.sop_uid in missing:
            continue
        data = (changed or {}).get(inst.sop_uid)
        if data is None:
            data = inst.path.read_bytes()
        s3.put_object(Bucket=bucket, Key=f"{series_uuid}/{uuid.uuid4()}.dcm", Body=data,
                      ContentType="application/dicom")
        total += len(data)
        count += 1
    return index_row(series, bucket, series_uuid, count, total, license_name)


def index_row(series: Series, bucket: str, series_uuid: str, count: int, total: int,
              license_name: str = LICENSE) -> dict:
    return {"collection_id": series.collection["Collection"].lower().replace("-", "_"),
            "PatientID": series.patient.get("PatientID"), "StudyInstanceUID": series.study.get("StudyInstanceUID"),
            "SeriesInstanceUID": series.uid, "crdc_series_uuid": series_uuid, "aws_bucket": bucket,
            "series_aws_url": f"s3://{bucket}/{series_uuid}/*", "instanceCount": count,
            "series_size_MB": total / 1e6, "license_short_name": license_name,
            "source_DOI": "10.7937/local", "series_revised_idc_version": 25}


def write_index(rows: list[dict], path: Path) -> Path:
    """The rows as `idc_index.parquet` (its column names and types)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"collection_id": pa.large_string(), "PatientID": pa.large_string(),
               "StudyInstanceUID": pa.large_string(), "SeriesInstanceUID": pa.large_string(),
               "crdc_series_uuid": pa.large_string(), "aws_bucket": pa.large_string(),
               "series_aws_url": pa.large_string(), "instanceCount": pa.int64(), "series_size_MB": pa.float64(),
               "license_short_name": pa.large_string(), "source_DOI": pa.large_string(),
               "series_revised_idc_version": pa.int64()}
    table = pa.table({name: pa.array([r.get(name) for r in rows], type=kind) for name, kind in columns.items()})
    pq.write_table(table, str(path), compression="zstd")
    return path
