"""Which row of a group of near-duplicates is kept: the rules' ordering, image headers read (formats,
lossless or not) without decoding, unreadable files ranked last instead of failing, and outlier scores as
exact k-th-neighbour distances."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.analytics import dedup as dd
from pipeline.analytics.keep import ImageInfo, check_rule, image_info, image_infos, keep_order
from pipeline.analytics.vectors import clustered_vectors, l2_normalize


def _ordered(ids, infos=None, rule="largest", distance=None):
    d = np.zeros(len(ids)) if distance is None else np.asarray(distance)
    return [ids[i] for i in keep_order(ids, d, rule, infos)]


def test_largest_orders_by_pixels_then_lossless_then_bytes_then_id_and_unread_last():
    infos = {
        "a-small-png": ImageInfo(100 * 100, "PNG", True, 9000),
        "b-big-jpeg": ImageInfo(400 * 300, "JPEG", False, 20_000),
        "c-big-png": ImageInfo(400 * 300, "PNG", True, 90_000),
        "d-big-jpeg": ImageInfo(400 * 300, "JPEG", False, 20_000),
        "e-big-jpeg-q95": ImageInfo(400 * 300, "JPEG", False, 60_000),
        "f-unread": None,
        "0-unread": None,
    }
    ids = sorted(infos, reverse=True)
    assert _ordered(ids, infos) == ["c-big-png", "e-big-jpeg-q95", "b-big-jpeg", "d-big-jpeg", "a-small-png",
                                    "0-unread", "f-unread"]
    # no headers at all (WebDataset or Parquet sources): the smallest id
    assert _ordered(ids, {}) == sorted(ids)


def test_first_and_centroid_rules():
    ids = ["c", "a", "b"]
    assert _ordered(ids, rule="first") == ["a", "b", "c"]
    assert _ordered(ids, rule="centroid", distance=[0.1, 0.3, 0.1]) == ["b", "c", "a"]  # ties: the id
    with pytest.raises(ValueError, match="--keep largest"):
        check_rule("biggest")


def test_image_headers_tell_pixels_and_lossless(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "a.jpg", quality=90)
    img.save(tmp_path / "a.bmp")
    img.save(tmp_path / "lossless.webp", lossless=True)
    img.save(tmp_path / "lossy.webp", quality=80)
    img.save(tmp_path / "raw.tif")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    got = image_infos({p: str(tmp_path / p) for p in ("a.png", "a.jpg", "a.bmp", "lossless.webp",
                                                       "lossy.webp", "raw.tif", "bad.jpg", "gone.png")}
                      | {"tar-row": None})
    assert {k: v.lossless for k, v in got.items() if v} == {
        "a.png": True, "a.jpg": False, "a.bmp": True, "lossless.webp": True, "lossy.webp": False,
        "raw.tif": True}
    assert all(v.pixels == 1200 for v in got.values() if v)
    assert all(v.bytes == (tmp_path / k).stat().st_size for k, v in got.items() if v)
    assert got["bad.jpg"] is None and got["gone.png"] is None and got["tar-row"] is None
    assert image_info(str(tmp_path / "a.jpg")).format == "JPEG"


def test_of_two_same_size_jpegs_of_a_photo_the_less_compressed_one_is_kept(tmp_path):
    from pipeline.samples import photo

    img = photo("chelsea")
    img.save(tmp_path / "b-original.jpg", quality=92)
    img.save(tmp_path / "a-copy-q40.jpg", quality=40)
    ids = ["a-copy-q40.jpg", "b-original.jpg"]
    infos = image_infos({i: str(tmp_path / i) for i in ids})
    assert infos["a-copy-q40.jpg"].pixels == infos["b-original.jpg"].pixels
    assert _ordered(ids, infos)[0] == "b-original.jpg"


def test_resolve_keeps_the_rule_s_first_row_of_each_group():
    clusters = pa.table({"id": ["copy", "orig", "other"], "cluster": pa.array([0, 0, 1], pa.int32()),
                         "distance_to_centroid": pa.array([0.01, 0.2, 0.0], pa.float32()),
                         "outlier_score": pa.array([0.1, 0.1, 0.5], pa.float32())})
    pairs = pa.table({"a": ["copy"], "b": ["orig"], "similarity": pa.array([0.97], pa.float32())},
                     schema=dd.PAIRS_SCHEMA)
    infos = {"copy": ImageInfo(600 * 400, "JPEG", False), "orig": ImageInfo(600 * 400, "PNG", True)}
    res = dd.resolve(clusters, pairs, 0.9, (0.9,), "largest", infos)
    assert res.duplicates.select(["id", "duplicate_of"]).to_pylist() == [{"id": "copy",
                                                                          "duplicate_of": "orig"}]
    res = dd.resolve(clusters, pairs, 0.9, (0.9,), "centroid")
    assert res.duplicates["id"][0].as_py() == "orig"  # the copy is nearer the centroid


def test_outlier_scores_are_the_exact_kth_neighbour_distance_without_the_row_itself():
    x = l2_normalize(clustered_vectors(400, 16, clusters=5, seed=2))
    labels = np.arange(400, dtype=np.int64) + 1000
    ref = dd.Reference(x[::2], labels[::2], k=7)  # half the rows are in the reference
    got = dd.kth_distance(x, labels, ref)
    d = 1.0 - x @ x[::2].T
    d[labels[:, None] == labels[::2][None, :]] = np.inf  # a row is not its own neighbour
    want = np.sort(d, axis=1)[:, 6]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.isnan(dd.kth_distance(x[:3], labels[:3], dd.Reference(x[:0], labels[:0]))).all()
