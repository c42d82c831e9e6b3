"""Semantic near-duplicates and clusters (after SemDeDup and NeMo Curator's semantic dedup), Ray-free.

1. Embeddings are L2-normalized; k-means (faiss, spherical) is trained on a sample.
2. Each file's rows are assigned to their nearest centroid (``assign_file``), and sent to the group of
   clusters that owns it (cluster ``c`` belongs to group ``c % groups``).
3. Within each cluster (``dedup_group``), pairwise cosine similarity is computed in blocks of rows, keeping
   the pairs above the lowest threshold reported. Members are ordered by the keep rule (nearest the
   centroid first, ties by id); walking that order, a row with a kept row at or above the threshold is a
   duplicate of the most similar such row, otherwise it is kept. Each group is one kept row and its
   duplicates. Near-duplicates that k-means put in different clusters are not compared (as in SemDeDup).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.analytics import index as ix
from pipeline.analytics.vectors import l2_normalize, read_vectors

DEFAULT_THRESHOLD = 0.80  # measured on photos with planted copies (tf_efficientnet_lite0, final layer)
THRESHOLDS = (0.75, 0.80, 0.85, 0.90, 0.95, 0.975, 0.99)  # also reported in dedup.json
KEEP_RULE = "in each group the row nearest its cluster's centroid is kept (ties: the smaller id)"
BLOCK_BYTES = 64 << 20  # similarity block size

DUPLICATES_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), ("duplicate_of", pa.string()),
                               ("similarity", pa.float32()), ("cluster", pa.int32())])
KEEP_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), ("cluster", pa.int32()),
                         ("duplicates", pa.int32())])
CLUSTERS_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), ("cluster", pa.int32()),
                             ("distance_to_centroid", pa.float32())])


def choose_clusters(n: int) -> int:
    """About sqrt(n) clusters (at least 1, at most n / 4): ~sqrt(n) rows each, so the pairwise work per
    cluster stays small."""
    return int(max(1, min(max(n // 4, 1), round(math.sqrt(n)))))


def train_kmeans(sample: np.ndarray, clusters: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Spherical k-means centroids (unit length) of normalized sample vectors; on GPUs when faiss has them."""
    faiss = ix.faiss_module()
    x = l2_normalize(sample)
    k = int(min(clusters, len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=ix.gpu_count() > 0,
                      max_points_per_centroid=1 << 30, verbose=False)
    km.train(x)
    return l2_normalize(km.centroids)


@dataclass
class ClusterRows:
    """The rows of one file that fall in one group of clusters."""

    ids: list[str]
    sources: list[str | None]
    x: np.ndarray  # normalized
    cluster: np.ndarray  # int32
    distance: np.ndarray  # float32, cosine distance to the centroid

    @classmethod
    def concat(cls, parts: list[ClusterRows], dim: int) -> ClusterRows:
        if not parts:
            return cls([], [], np.zeros((0, dim), np.float32), np.zeros(0, np.int32), np.zeros(0, np.float32))
        return cls([i for p in parts for i in p.ids], [s for p in parts for s in p.sources],
                   np.concatenate([p.x for p in parts]), np.concatenate([p.cluster for p in parts]),
                   np.concatenate([p.distance for p in parts]))


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid, cosine distance to it) of normalized rows."""
    faiss = ix.faiss_module()
    sim, idx = faiss.knn(np.ascontiguousarray(x), centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)
    return idx[:, 0].astype(np.int32), (1.0 - sim[:, 0]).astype(np.float32)


def assign_file(uri: str, dim: int, centroids: np.ndarray, groups: int) -> list[ClusterRows]:
    """One file's rows, normalized and assigned, split into ``groups`` parts by cluster."""
    v = read_vectors(uri, dim, sources=True)
    x = l2_normalize(v.x)
    cluster, dist = assign(x, centroids)
    out = []
    for g in range(groups):
        sel = np.nonzero(cluster % groups == g)[0]
        out.append(ClusterRows([v.ids[i] for i in sel], [v.sources[i] for i in sel], x[sel], cluster[sel],
                               dist[sel]))
    return out


def similar_pairs(x: np.ndarray, min_sim: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity) for i < j with cosine similarity >= min_sim, computed in row blocks."""
    m = len(x)
    rows = max(1, min(m, BLOCK_BYTES // max(4 * m, 1)))
    ii, jj, ss = [], [], []
    for start in range(0, m, rows):
        s = x[start:start + rows] @ x.T
        r, c = np.nonzero(s >= min_sim)
        upper = c > r + start
        ii.append(r[upper] + start)
        jj.append(c[upper])
        ss.append(s[r[upper], c[upper]])
    if not ii:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(ii), np.concatenate(jj), np.concatenate(ss).astype(np.float32)


def greedy_keep(m: int, i: np.ndarray, j: np.ndarray, s: np.ndarray, threshold: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Walking rows 0..m-1 in keep order: (duplicate_of index or -1, similarity to it) per row."""
    dup_of = np.full(m, -1, np.int64)
    sim = np.zeros(m, np.float32)
    sel = s >= threshold
    i, j, s = i[sel], j[sel], s[sel]
    order = np.lexsort((-s, j))  # by row j, the most similar first
    for a, b, v in zip(i[order], j[order], s[order]):
        if dup_of[b] < 0 and dup_of[a] < 0:  # a's fate is settled: its pairs came first
            dup_of[b], sim[b] = a, v
    return dup_of, sim


@dataclass
class GroupResult:
    """What one group of clusters found: duplicate rows at the threshold, per-threshold counts, every row's
    cluster and distance, and the sources of rows in duplicate pairs (for the report's thumbnails)."""

    duplicates: pa.Table
    keep: pa.Table
    clusters: pa.Table
    removed: dict[str, int] = field(default_factory=dict)  # threshold -> rows removed
    groups: dict[str, int] = field(default_factory=dict)  # threshold -> groups of 2+ rows
    sources: dict[str, str | None] = field(default_factory=dict)
    pairs_compared: int = 0


def _key(t: float) -> str:
    return f"{t:.3f}".rstrip("0").rstrip(".")


def dedup_group(parts: list[ClusterRows], dim: int, threshold: float = DEFAULT_THRESHOLD,
                thresholds: tuple[float, ...] = THRESHOLDS) -> GroupResult:
    """Near-duplicates within each cluster of one group of clusters."""
    rows = ClusterRows.concat(parts, dim)
    ts = sorted(set(thresholds) | {threshold})
    removed = {_key(t): 0 for t in ts}
    groups = {_key(t): 0 for t in ts}
    dup_id, dup_of, dup_sim, dup_cluster = [], [], [], []
    keep_id, keep_cluster, keep_count = [], [], []
    sources: dict[str, str | None] = {}
    compared = 0
    ids = np.asarray(rows.ids, dtype=object)
    for c in np.unique(rows.cluster):
        members = np.nonzero(rows.cluster == c)[0]
        members = members[np.lexsort((ids[members], rows.distance[members]))]  # the keep rule's order
        m = len(members)
        compared += m * (m - 1) // 2
        i, j, s = similar_pairs(rows.x[members], ts[0])
        for t in ts:
            d, _ = greedy_keep(m, i, j, s, t) if len(i) else (np.full(m, -1), None)
            removed[_key(t)] += int((d >= 0).sum())
            groups[_key(t)] += len(np.unique(d[d >= 0]))
        d, sim = greedy_keep(m, i, j, s, threshold) if len(i) else (np.full(m, -1), np.zeros(m, np.float32))
        counts = np.bincount(d[d >= 0], minlength=m) if (d >= 0).any() else np.zeros(m, np.int64)
        for r in range(m):
            row = members[r]
            if d[r] >= 0:
                rep = members[d[r]]
                dup_id.append(rows.ids[row])
                dup_of.append(rows.ids[rep])
                dup_sim.append(float(sim[r]))
                dup_cluster.append(int(c))
                sources[rows.ids[row]] = rows.sources[row]
                sources[rows.ids[rep]] = rows.sources[rep]
            else:
                keep_id.append(rows.ids[row])
                keep_cluster.append(int(c))
                keep_count.append(int(counts[r]))
    return GroupResult(
        duplicates=pa.Table.from_arrays([pa.array(dup_id, pa.string()), pa.array(dup_of, pa.string()),
                                         pa.array(dup_sim, pa.float32()), pa.array(dup_cluster, pa.int32())],
                                        schema=DUPLICATES_SCHEMA),
        keep=pa.Table.from_arrays([pa.array(keep_id, pa.string()), pa.array(keep_cluster, pa.int32()),
                                   pa.array(keep_count, pa.int32())], schema=KEEP_SCHEMA),
        clusters=pa.Table.from_arrays([pa.array(rows.ids, pa.string()), pa.array(rows.cluster, pa.int32()),
                                       pa.array(rows.distance, pa.float32())], schema=CLUSTERS_SCHEMA),
        removed=removed, groups=groups, sources=sources, pairs_compared=compared)


def summarize(results: list[GroupResult], n: int, threshold: float) -> dict[str, Any]:
    """dedup.json's counts: groups and removed fraction at the threshold and at each reported threshold."""
    keys = sorted({k for r in results for k in r.removed}, key=float)
    per = {k: {"removed": sum(r.removed.get(k, 0) for r in results),
               "groups": sum(r.groups.get(k, 0) for r in results)} for k in keys}
    for v in per.values():
        v["removed_fraction"] = round(v["removed"] / n, 6) if n else 0.0
    main = per.get(_key(threshold), {"removed": 0, "groups": 0, "removed_fraction": 0.0})
    return {"rows": n, "threshold": threshold, "groups": main["groups"], "removed": main["removed"],
            "kept": n - main["removed"], "removed_fraction": main["removed_fraction"], "by_threshold": per,
            "pairs_compared": sum(r.pairs_compared for r in results), "keep_rule": KEEP_RULE}
