"""The Ray-free analytics: choosing an index, building it from parts, recall against exact search, removing
rows, the Searcher stage, and near-duplicates within clusters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.analytics import dedup as dd
from pipeline.analytics import index as ix
from pipeline.analytics.vectors import clustered_vectors, l2_normalize


def test_auto_is_exact_for_small_tables_and_ivfpq_within_the_budget_above():
    small = ix.choose_params(50_000, 256)
    assert small.kind == "flat" and "exact" in small.reason
    big = ix.choose_params(1_000_000, 256)
    assert big.kind == "ivfpq" and big.refine == "SQ8" and big.nlist == 2048 and 256 % big.m == 0
    assert 1_000_000 * big.bytes_per_vector() <= ix.parse_memory("4GB")
    tight = ix.choose_params(1_000_000, 256, max_memory="200MB")  # no room for the re-ranking store
    assert tight.kind == "ivfpq" and tight.refine is None
    assert ix.choose_params(10_000, 64, kind="ivfpq").nlist * 39 <= 10_000


@pytest.mark.parametrize("args, fix", [
    ((0, 64), "pipeline extract"),
    ((10, 64, "annoy"), "--kind"),
    ((10, 64, "auto", "dot"), "--metric"),
    ((100_000_000, 1024, "ivfpq", "cosine", "1GB"), "--max-memory"),
])
def test_bad_index_settings_name_the_fix(args, fix):
    with pytest.raises(ValueError, match=fix):
        ix.choose_params(*args)


def test_parse_memory():
    assert ix.parse_memory("4GB") == 4_000_000_000
    assert ix.parse_memory("512MiB") == 512 * 2 ** 20
    assert ix.parse_memory(1024) == 1024
    with pytest.raises(ValueError, match="--max-memory 4GB"):
        ix.parse_memory("lots")


def _build(params: ix.IndexParams, x: np.ndarray, files: int = 3):
    """An index built the way the command does: trained on a sample, one part per 'file', merged."""
    xp = ix.prepare(x, params.metric)
    template = ix.train(params, xp[np.random.default_rng(0).permutation(len(xp))[:params.train_size]])
    index = ix.deserialize(template)
    bounds = np.linspace(0, len(x), files + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        labels = np.arange(a, b)
        ix.merge_part(index, params, ix.encode_part(template, params, xp[a:b], labels, a, b - a), labels)
    return index, xp


def _exact(xp: np.ndarray, q: np.ndarray, q_labels: np.ndarray) -> np.ndarray:
    truth = ix.exact_topk(xp[q], xp, np.arange(len(xp)), ix.RECALL_K + 1)
    return ix.without_self(truth.labels, q_labels, ix.RECALL_K)


def test_ivfpq_from_merged_parts_reaches_the_target_recall_and_pq_alone_does_not():
    x = clustered_vectors(20_000, 64, clusters=100, seed=3)
    params = ix.choose_params(len(x), 64, kind="ivfpq")
    index, xp = _build(params, x)
    assert ix.live_count(index, params) == len(x)
    q = np.random.default_rng(1).choice(len(x), 300, replace=False)
    truth = ix.exact_topk(xp[q], xp, np.arange(len(xp)), ix.RECALL_K + 1)
    rep = ix.measure(index, params, xp[q], q, truth, tune=True)
    assert rep.recall >= ix.TARGET_RECALL and rep.settings["nprobe"] == params.nprobe
    # fresh queries, searched as the Searcher does, against an independent exact search
    q2 = np.random.default_rng(2).choice(len(x), 300, replace=False)
    _, labels = ix.search(index, params, xp[q2], ix.RECALL_K + 1)
    assert ix.recall_at_k(ix.without_self(labels, q2, ix.RECALL_K), _exact(xp, q2, q2)) >= ix.TARGET_RECALL
    # the re-ranking store is what gets there: the same codes without it stay far below
    base = ix.faiss_module().downcast_index(index.base_index)
    _, labels = base.search(xp[q2], ix.RECALL_K + 1)
    assert ix.recall_at_k(ix.without_self(labels, q2, ix.RECALL_K), _exact(xp, q2, q2)) < 0.9


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_removed_labels_are_never_returned(kind):
    x = clustered_vectors(6_000, 32, clusters=40, seed=4)
    params = ix.choose_params(len(x), 32, kind=kind)
    index, xp = _build(params, x, files=2)
    ix.configure(index, params)
    assert ix.remove_labels(index, params, [(1000, 2000)]) == 1000
    assert ix.live_count(index, params) == 5000
    scores, labels = ix.search(index, params, xp[1000:1100], 5)
    assert not ((labels >= 1000) & (labels < 2000)).any()
    assert (labels >= 0).all() and (scores <= 1.0 + 1e-5).all()


def test_hnsw_is_built_from_parts_and_tuned_to_the_target_recall():
    x = clustered_vectors(5_000, 32, clusters=50, seed=10)
    params = ix.choose_params(len(x), 32, kind="hnsw")
    index, xp = _build(params, x, files=2)
    assert ix.live_count(index, params) == len(x)
    q = np.random.default_rng(3).choice(len(x), 200, replace=False)
    truth = ix.exact_topk(xp[q], xp, np.arange(len(xp)), ix.RECALL_K + 1)
    rep = ix.measure(index, params, xp[q], q, truth, tune=True)
    assert rep.recall >= ix.TARGET_RECALL and rep.settings["ef_search"] == params.ef_search


def test_hnsw_refuses_to_drop_rows_naming_index_build():
    params = ix.choose_params(1000, 16, kind="hnsw")
    with pytest.raises(ValueError, match="pipeline index build"):
        ix.remove_labels(None, params, [(0, 10)])


def test_cosine_scores_are_cosine_similarity():
    x = clustered_vectors(500, 16, clusters=5, seed=5)
    params = ix.choose_params(len(x), 16, kind="flat")
    index, xp = _build(params, x, files=1)
    scores, labels = ix.search(index, params, xp[:3], 2)
    assert (labels[:, 0] == np.arange(3)).all()
    np.testing.assert_allclose(scores[:, 1], np.sum(xp[:3] * xp[labels[:, 1]], axis=1), atol=1e-4)


def test_topk_merge_equals_one_exact_search():
    rng = np.random.default_rng(6)
    x, q = rng.standard_normal((900, 8)).astype(np.float32), rng.standard_normal((20, 8)).astype(np.float32)
    whole = ix.exact_topk(q, x, np.arange(900), 7)
    merged = ix.TopK.empty(20, 7)
    for a in range(0, 900, 250):
        merged = merged.merge(ix.exact_topk(q, x[a:a + 250], np.arange(a, min(a + 250, 900)), 7))
    np.testing.assert_array_equal(merged.labels, whole.labels)


# --------------------------------------------------------------------------------------------------
# Near-duplicates


def test_similar_pairs_in_blocks_match_the_full_matrix(monkeypatch):
    x = l2_normalize(clustered_vectors(700, 16, clusters=3, seed=7))
    monkeypatch.setattr(dd, "BLOCK_BYTES", 4 * 700 * 64)  # 64-row blocks
    i, j, s = dd.similar_pairs(x, 0.9)
    full = x @ x.T
    r, c = np.nonzero(np.triu(full >= 0.9, 1))
    assert set(zip(i.tolist(), j.tolist())) == set(zip(r.tolist(), c.tolist()))
    np.testing.assert_allclose(s, full[i, j], atol=1e-5)


def test_greedy_keep_makes_star_groups_around_kept_rows():
    # rows in keep order: 0 ~ 1 ~ 2 (chain), 3 alone
    i, j, s = np.array([0, 1]), np.array([1, 2]), np.array([0.97, 0.96], np.float32)
    dup_of, _ = dd.greedy_keep(4, i, j, s, 0.95)
    assert dup_of.tolist() == [-1, 0, -1, -1]  # 2's only match (1) was removed: 2 stays
    # 2 matches kept rows 0 and 1: it joins the more similar one
    dup_of, sim = dd.greedy_keep(3, np.array([0, 1]), np.array([2, 2]), np.array([0.96, 0.99], np.float32),
                                 0.95)
    assert dup_of.tolist() == [-1, -1, 1] and sim[2] == pytest.approx(0.99)


def _with_copies(n: int, dim: int, copies: int, seed: int):
    x = l2_normalize(clustered_vectors(n, dim, clusters=8, spread=1.0, seed=seed))
    rng = np.random.default_rng(seed)
    src = rng.choice(n, copies, replace=False)
    noisy = l2_normalize(x[src] + 0.02 * rng.standard_normal((copies, dim)).astype(np.float32))
    ids = [f"r{i:05d}" for i in range(n)] + [f"copy-of-r{i:05d}" for i in src]
    return ids, np.concatenate([x, noisy]), {f"copy-of-r{i:05d}": f"r{i:05d}" for i in src}


def _dedup(ids, x, threshold, groups=4, clusters=None, seed=0):
    cents = dd.train_kmeans(x, clusters or dd.choose_clusters(len(x)), seed=seed)
    parts = dd.split_rows(ids, [None] * len(ids), x, cents, groups, threshold)
    results = [dd.dedup_group([p], x.shape[1], min(*dd.THRESHOLDS, threshold)) for p in parts]
    clusters = pa.concat_tables([r.clusters for r in results])
    return dd.resolve(clusters, pa.concat_tables([r.pairs for r in results]), threshold), clusters, results


def test_dedup_finds_planted_copies_and_reports_every_row_once():
    ids, x, planted = _with_copies(3000, 32, 60, seed=8)
    res, clusters, results = _dedup(ids, x, 0.99)
    dups = res.duplicates.to_pylist()
    rep = {d["id"]: d["duplicate_of"] for d in dups}
    found = sum(rep.get(c, c) == rep.get(o, o) for c, o in planted.items())
    assert found >= 0.95 * len(planted)
    assert all(planted.get(d["id"], d["id"]) == planted.get(d["duplicate_of"], d["duplicate_of"])
               for d in dups)
    assert all(d["similarity"] >= 0.99 for d in dups)
    kept = res.keep.column("id").to_pylist()
    assert sorted(kept + list(rep)) == sorted(ids) == sorted(clusters.column("id").to_pylist())
    # each kept row counts the rows removed as its duplicates
    counted = dict(zip(kept, res.keep.column("duplicates").to_pylist()))
    assert all(counted[o] == sum(1 for v in rep.values() if v == o) for o in kept)
    summary = dd.summarize(res, len(ids), 0.99, sum(r.pairs_compared for r in results))
    assert summary["removed"] == len(rep) and summary["by_threshold"]["0.99"]["removed"] == len(rep)
    assert summary["by_threshold"]["0.75"]["removed"] >= summary["removed"]


def test_copies_that_kmeans_splits_between_clusters_are_still_found():
    """Copies on the boundary of two clusters: k-means puts each copy in one cluster and its original in the
    other; comparing within clusters only finds none of them, guests within the margin find all."""
    rng = np.random.default_rng(3)
    a, b = np.zeros(16, np.float32), np.zeros(16, np.float32)
    a[0], b[1] = 1.0, 1.0
    cents = l2_normalize(np.stack([a, b]))
    noise = 0.3 * rng.standard_normal((20, 16)).astype(np.float32)
    noise[:, :2] = 0.0  # exactly between the two centroids
    mid = l2_normalize(np.stack([a + b] * 20) + noise)
    # each original leans to one centroid, its copy (cosine ~0.995) to the other
    lean = 0.06 * (a - b)
    orig, copy = l2_normalize(mid + lean), l2_normalize(mid - lean)
    x = np.concatenate([orig, copy])
    ids = [f"o{i:02d}" for i in range(20)] + [f"c{i:02d}" for i in range(20)]
    near = dd.assign(x, cents)[0]
    assert all(near[i] != near[20 + i] for i in range(20))  # the situation this test is about
    parts = dd.split_rows(ids, [None] * 40, x, cents, 2, 0.95)
    results = [dd.dedup_group([p], 16, 0.95) for p in parts]
    clusters = pa.concat_tables([r.clusters for r in results])
    res = dd.resolve(clusters, pa.concat_tables([r.pairs for r in results]), 0.95, (0.95,))
    rep = {d["id"]: d["duplicate_of"] for d in res.duplicates.to_pylist()}
    found = sum(rep.get(f"c{i:02d}", f"c{i:02d}") == rep.get(f"o{i:02d}", f"o{i:02d}") for i in range(20))
    assert found == 20, rep
    assert clusters.num_rows == 40 and res.keep.num_rows == 20  # guests are compared, not counted twice
    no_guests = [dd.ClusterRows([i for i, g in zip(p.ids, p.guest) if not g], [None] * int((~p.guest).sum()),
                                p.x[~p.guest], p.cluster[~p.guest], p.distance[~p.guest]) for p in parts]
    alone = [dd.dedup_group([p], 16, 0.95) for p in no_guests]
    res0 = dd.resolve(clusters, pa.concat_tables([r.pairs for r in alone]), 0.95, (0.95,))
    assert res0.duplicates.num_rows == 0  # within clusters only: the split copies are all missed
