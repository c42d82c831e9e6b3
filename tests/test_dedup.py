"""Similar images and near-duplicates on real photos (scikit-image's) with planted copies: re-encoded,
resized and cropped copies find their original as the top neighbour through the Embedder; `pipeline dedup`
groups them with their originals, reports no false pairs, gives the same groups on a rerun, keeps the
lossless full-size original of every group, and scores a planted off-distribution row as the top outlier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.analytics.vectors import clustered_vectors, write_embeddings
from pipeline.commands.dedup import dedup
from pipeline.commands.index import build
from pipeline.commands.neighbors import neighbors
from pipeline.config import DedupConfig, IndexBuildConfig, NeighborsConfig, SourceConfig

RT = {"progress": False, "batch_size": 32}


def test_copies_find_their_original_as_the_top_neighbour(photos):
    root, planted = photos
    idx = str(root / "idx")
    s = build(IndexBuildConfig(embeddings=str(root / "feat/originals"), output=idx, runtime=RT))
    assert s["index_kind"] == "flat" and s["vectors"] == 32
    out = root / "nn"
    copies = SourceConfig(uri=str(root / "img/copies"))
    s = neighbors(NeighborsConfig(index=idx, output=str(out), images=copies, k=3, runtime=RT))
    assert s["queries"] == len(planted) and s["failed"] == 0
    top = {r["query_id"]: r["id"] for r in pads.dataset(out / "neighbors").to_table().to_pylist()
           if r["rank"] == 0}
    wrong = {q: i for q, i in top.items() if i != planted[f"copies/{q}"]}
    assert not wrong and len(top) == len(planted)


def _groups(out: Path) -> dict[str, str]:
    return {r["id"]: r["duplicate_of"] for r in pq.read_table(out / "duplicates.parquet").to_pylist()}


def test_dedup_finds_planted_copies_without_false_pairs_and_reruns_the_same(photos):
    root, planted = photos
    runs = []
    for i in range(2):
        out = root / f"dedup{i}"
        s = dedup(DedupConfig(embeddings=str(root / "feat/img"), output=str(out), runtime=RT))
        runs.append(_groups(out))
    assert runs[0] == runs[1]
    rep = runs[0]
    found = sum(rep.get(c, c) == rep.get(o, o) for c, o in planted.items())
    false = [(a, b) for a, b in rep.items() if planted.get(a, a) != planted.get(b, b)]
    # blocks.5 pooled on a 3x3 grid: copies score >= 0.837 to their original, other photos <= 0.703
    assert found == len(planted), (found, len(planted))
    assert not false, false
    meta = json.loads((out / "dedup.json").read_text())
    assert meta["removed"] == len(rep) and meta["rows"] == 32 + len(planted)
    assert set(meta["by_threshold"]) >= {"0.8", "0.9", "0.95"} and meta["keep_rule"]
    kept = pq.read_table(out / "keep.parquet").column("id").to_pylist()
    clusters = pq.read_table(out / "clusters.parquet")
    assert sorted(kept + list(rep)) == sorted(clusters.column("id").to_pylist())
    assert (out / "dedup.png").read_bytes()[:4] == b"\x89PNG" and s["run_record"]


def test_every_group_keeps_its_lossless_full_size_original(photos):
    """Each original (PNG) has a same-size JPEG copy (quality 40), a 60 % copy and a 90 % crop: the default
    rule keeps the original (most pixels, then lossless); smallest id keeps a copy (copies/ < originals/)."""
    root, planted = photos
    originals = set(planted.values())
    out = root / "dedup-largest"
    s = dedup(DedupConfig(embeddings=str(root / "feat/img"), output=str(out), runtime=RT))
    assert s["keep"] == "largest" and s["headers_unread"] == 0 and s["headers_read"] >= len(planted)
    kept = set(pq.read_table(out / "keep.parquet").column("id").to_pylist())
    rep = _groups(out)
    assert originals <= kept, sorted(originals - kept)
    assert {c: rep.get(c) for c in planted} == planted  # each copy removed as a duplicate of its original
    out = root / "dedup-first"
    dedup(DedupConfig(embeddings=str(root / "feat/img"), output=str(out), keep="first", runtime=RT))
    kept = set(pq.read_table(out / "keep.parquet").column("id").to_pylist())
    assert not originals & kept  # the same groups, each keeping a copy


def test_a_planted_off_distribution_row_has_the_top_outlier_score(ray_session, tmp_path):
    x = clustered_vectors(3000, 24, clusters=12, seed=5)
    rng = np.random.default_rng(5)
    odd = 3 * rng.standard_normal((1, 24)).astype(np.float32)  # from no cluster
    x = np.concatenate([x[:1700], odd, x[1700:]])
    ids = [f"r{i:05d}" for i in range(len(x))]
    write_embeddings(str(tmp_path / "feat/embeddings/a.parquet"), x[:1500], ids[:1500])
    write_embeddings(str(tmp_path / "feat/embeddings/b.parquet"), x[1500:], ids[1500:])
    s = dedup(DedupConfig(embeddings=str(tmp_path / "feat"), output=str(tmp_path / "d"), runtime=RT))
    cl = pq.read_table(tmp_path / "d/clusters.parquet").sort_by([("outlier_score", "descending")])
    assert cl.column("id")[0].as_py() == "r01700"
    score = cl.column("outlier_score").to_numpy()
    assert np.isfinite(score).all() and score[0] > 2 * score[1]
    assert s["outlier_score"]["k"] == 10 and s["outlier_score"]["reference_rows"] == len(x)
