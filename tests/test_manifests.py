"""Manifest sources: CSV/Parquet lists of object URIs and S3 Inventory reports, shards cut from their rows."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.config import ConfigError, SourceConfig
from pipeline.sources import list_shards, read_shard


def _images(root: Path, n: int) -> list[str]:
    uris = []
    for i in range(n):
        p = root / f"cls{i % 3}" / f"{i:04d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\xff\xd8" + bytes([i % 256]) * 20)
        uris.append(str(p))
    return uris


def _rows(shards, cfg) -> list[dict]:
    return [r for s in shards for t in read_shard(s, cfg) for r in t.to_pylist()]


def test_csv_manifest_ids_labels_missing_and_skipped(tmp_path):
    root = tmp_path / "bucket"
    uris = _images(root, 30)
    missing = [str(root / "cls0" / f"gone{i}.jpg") for i in range(4)]
    listed = sorted(uris + missing)
    lines = ["uri,label"] + [f"{u},L{i % 2}" for i, u in enumerate(listed)]
    lines += [f"{listed[-1]},L9", f"{root}/notes.txt,x"]  # a repeated row; not an image
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(lines) + "\n")
    cfg = SourceConfig(uri=str(manifest), root=str(root), labels="label", files_per_shard=8)
    shards, skipped = list_shards(cfg)
    assert skipped == 2 and {s.format for s in shards} == {"manifest"}
    assert all(1 <= s.count <= 8 for s in shards)
    rows = _rows(shards, cfg)
    assert [r["id"] for r in rows] == [u[len(str(root)) + 1:] for u in listed]
    assert [r["label"] for r in rows] == [f"L{i % 2}" for i in range(len(listed))]
    kinds = {r["id"]: r["error_kind"] for r in rows}
    assert sorted(k for k, v in kinds.items() if v) == sorted(m[len(str(root)) + 1:] for m in missing)
    assert {v for v in kinds.values() if v} == {"missing"}
    # the same manifest from a listing's point of view: one more object changes one or two shards
    again, _ = list_shards(cfg)
    assert [s.key for s in again] == [s.key for s in shards]
    folder = SourceConfig(uri=str(manifest), labels="folder", files_per_shard=8)
    rows = _rows(list_shards(folder)[0], folder)
    assert rows[0]["id"] == listed[0] and rows[0]["label"] == "cls0"  # no root: ids are full URIs


def test_parquet_manifest_with_id_column(tmp_path):
    uris = _images(tmp_path / "imgs", 10)
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"url": uris, "photo_id": [f"p{i}" for i in range(10)],
                             "size": [22] * 10}), path)
    cfg = SourceConfig(uri=str(path), format="manifest", id_column="photo_id")
    shards, skipped = list_shards(cfg)
    assert skipped == 0
    rows = _rows(shards, cfg)
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(10)]
    assert all(r["error_kind"] is None and len(r["bytes"]) == 22 for r in rows)


def test_manifest_config_errors_name_the_fix(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("name,kind\na.jpg,x\n")
    with pytest.raises(ConfigError, match="source.uri_column"):
        list_shards(SourceConfig(uri=str(bad)))
    ok = tmp_path / "ok.csv"
    ok.write_text("uri\n/x/a.jpg\n")
    with pytest.raises(ConfigError, match="source.labels"):
        list_shards(SourceConfig(uri=str(ok), labels="species"))
    with pytest.raises(ConfigError, match="source.id_column"):
        list_shards(SourceConfig(uri=str(ok), id_column="key"))
    none = tmp_path / "none.csv"
    none.write_text("uri\n/x/a.txt\n")
    with pytest.raises(ConfigError, match="names no images"):
        list_shards(SourceConfig(uri=str(none)))


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_s3_inventory_report_is_read_directly(bucket, fmt):
    """An S3 Inventory report (manifest.json + gzipped CSV with URL-encoded keys, or Parquet) names the
    objects; ids are relative to the inventoried bucket; delete markers and old versions are skipped."""
    name = bucket.split("://", 1)[1]
    keys = [f"photos/d{i % 2}/img {i:03d}.jpg" for i in range(12)]
    for k in keys[:10]:  # the last two are in the report but not in the bucket
        storage.write_bytes(f"{bucket}/{k}", b"\xff\xd8jpeg" + k.encode())
    rows = [(name, k, 20, "etag" + str(i), "true", "false") for i, k in enumerate(keys)]
    rows += [(name, "photos/old.jpg", 5, "e", "false", "false"),  # not the current version
             (name, "photos/x.png", 0, "", "true", "true"),  # a delete marker
             (name, "photos/readme.md", 3, "e", "true", "false")]
    data_key = f"inv/data/part-0.{'csv.gz' if fmt == 'CSV' else 'parquet'}"
    if fmt == "CSV":
        text = "".join(f'"{b}","{quote_plus(k, safe="/")}","{s}","{e}","{latest}","{dm}"\n'
                       for b, k, s, e, latest, dm in rows)
        storage.write_bytes(f"{bucket}/{data_key}", gzip.compress(text.encode()))
        schema = "Bucket, Key, Size, ETag, IsLatest, IsDeleteMarker"
    else:
        cols = ["bucket", "key", "size", "e_tag", "is_latest", "is_delete_marker"]
        table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)})
        table = table.set_column(2, "size", pa.array([r[2] for r in rows], pa.int64()))
        table = table.set_column(4, "is_latest", pa.array([r[4] == "true" for r in rows]))
        table = table.set_column(5, "is_delete_marker", pa.array([r[5] == "true" for r in rows]))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(f"{bucket}/{data_key}", buf.getvalue())
        schema = "message s3.inventory { ... }"
    manifest = {"sourceBucket": name, "destinationBucket": f"arn:aws:s3:::{name}", "version": "2016-11-30",
                "fileFormat": fmt, "fileSchema": schema, "files": [{"key": data_key, "size": 1}]}
    storage.write_bytes(f"{bucket}/inv/2026-11-30T00-00Z/manifest.json", json.dumps(manifest).encode())
    cfg = SourceConfig(uri=f"{bucket}/inv/2026-11-30T00-00Z/manifest.json", labels="folder")
    shards, skipped = list_shards(cfg)
    assert skipped == 3
    got = _rows(shards, cfg)
    assert [r["id"] for r in got] == keys
    assert [r["label"] for r in got] == [f"d{i % 2}" for i in range(12)]
    assert [r["error_kind"] for r in got] == [None] * 10 + ["missing"] * 2
    assert got[3]["bytes"] == b"\xff\xd8jpeg" + keys[3].encode()


def test_a_checksum_column_makes_an_edit_that_keeps_size_and_mtime_a_changed_shard(tmp_path):
    """A same-size in-place edit with its mtime kept (rsync -a, cp -p) shows only in the content: a manifest's
    checksum column is the shard version, before an ETag or a modification time."""
    uris = _images(tmp_path / "imgs", 12)
    path = tmp_path / "m.parquet"

    def write(sums: list[str]) -> list:
        table = pa.table({"uri": uris, "size": [22] * 12, "mtime": ["2026-12-01"] * 12, "sha256": sums})
        pq.write_table(table, path)
        return list_shards(SourceConfig(uri=str(path), format="manifest", root=str(tmp_path / "imgs"),
                                        files_per_shard=4))[0]

    sums = [f"{i:064x}" for i in range(12)]
    before = write(sums)
    sums[5] = "f" * 64  # one object's content changed; its size and mtime did not
    after = write(sums)
    changed = [a.key for a, b in zip(after, before, strict=True) if a.version != b.version]
    assert [a.key for a in after] == [b.key for b in before] and len(changed) == 1
    (shard,) = [s for s in after if s.key == changed[0]]
    assert "cls2/0005.jpg" in shard.rels
