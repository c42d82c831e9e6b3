"""Semantic near-duplicates and clusters (after SemDeDup and NeMo Curator's semantic dedup), Ray-free.

1. Embeddings are L2-normalized; k-means (faiss, spherical) is trained on a sample.
2. Each file's rows are assigned to their nearest centroid (``assign_file``) and sent to the group of
   clusters that owns it (cluster ``c`` belongs to group ``c % groups``). A row whose second-nearest
   centroid is nearly as close (``guest_margin``) is also sent there as a guest: near-duplicates that k-means
   split between two neighbouring clusters are still compared (SemDeDup compares within a cluster only, and
   misses them).
3. Within each cluster (``dedup_group``), pairwise cosine similarity is computed in blocks of rows between
   its own rows and between its own rows and its guests, keeping the pairs above the lowest threshold
   reported.
4. ``resolve`` (on the driver, over the pairs of every group): rows are ordered by the keep rule
   (``pipeline.analytics.keep``: the most pixels, then lossless, then the smallest id by default); walking
   that order, a row with a kept row at or above the threshold is a duplicate of the most similar such row,
   otherwise it is kept. Each group is one kept row and its duplicates.

Outliers: every row's ``outlier_score`` is the cosine distance to its k-th nearest other row (k = 10 by
default) among a reference sample of the table (``OUTLIER_REFERENCE`` rows drawn with the k-means sample;
every row when the table is no larger): exact k-th-neighbour distances up to that size, a sampled density
above it (there the k-th of the sample stands for about the k * n / reference-th of the table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.analytics import index as ix
from pipeline.analytics.keep import KEEP_RULES, keep_order
from pipeline.analytics.vectors import l2_normalize, read_vectors
from pipeline.config import DedupConfig

# 0.8, measured on scikit-image's photos with planted copies (samples.make_near_copies, four sets, 192
# copies) through tf_efficientnet_lite0 at blocks.5 with --pool grid3: every copy scores >= 0.837 to its
# original, two photos that are not copies <= 0.703. Globally pooled features separate them worse (blocks.5
# avg: 0.880 against 0.879; final: a copy of a grey photo re-encoded at quality 40 scores 0.74 to its
# original, two tiles of one scene up to 0.81 to each other).
DEFAULT_THRESHOLD: float = DedupConfig.model_fields["threshold"].default
THRESHOLDS = (0.75, 0.80, 0.85, 0.90, 0.95, 0.975, 0.99)  # also reported in dedup.json
OUTLIER_K = 10  # outlier_score: cosine distance to the k-th nearest other row
# rows of the reference sample the outlier scores are measured against: 5,000 costs less than the pairwise
# comparison does (100k x 256 rows, 2 busy cores: 10 s against 12-16 s for the pairs; 10,000 took 20-32 s)
OUTLIER_REFERENCE = 5_000
BLOCK_BYTES = 64 << 20  # similarity block size

DUPLICATES_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), ("duplicate_of", pa.string()),
                               ("similarity", pa.float32()), ("cluster", pa.int32())])
KEEP_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), ("cluster", pa.int32()),
                         ("duplicates", pa.int32())])
CLUSTERS_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), ("cluster", pa.int32()),
                             ("distance_to_centroid", pa.float32()), ("outlier_score", pa.float32())])


def choose_clusters(n: int) -> int:
    """About sqrt(n) clusters (at least 1, at most n / 4): ~sqrt(n) rows each, so the pairwise work per
    cluster stays small."""
    return int(max(1, min(max(n // 4, 1), round(math.sqrt(n)))))


def train_kmeans(sample: np.ndarray, clusters: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Spherical k-means centroids (unit length) of normalized sample vectors; on GPUs when faiss has them."""
    faiss = ix.faiss_module()
    x = l2_normalize(sample)
    k = int(min(clusters, len(x)))
    # ~sqrt(n) clusters have fewer than faiss's 39 points each below ~1,500 rows: expected here, not a warning
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=ix.gpu_count() > 0,
                      max_points_per_centroid=1 << 30, min_points_per_centroid=1, verbose=False)
    km.train(x)
    return l2_normalize(km.centroids)


@dataclass
class ClusterRows:
    """The rows of one file that fall in one group of clusters."""

    ids: list[str]
    sources: list[str | None]
    x: np.ndarray  # normalized
    cluster: np.ndarray  # int32: the cluster it is compared in (for a guest, its second-nearest)
    distance: np.ndarray  # float32, cosine distance to its nearest centroid (the keep rule's key)
    guest: np.ndarray | None = None  # bool: compared here, but its own cluster is another one
    outlier: np.ndarray | None = None  # float32: cosine distance to the k-th nearest row (NaN: not measured)

    def __post_init__(self) -> None:
        if self.guest is None:
            self.guest = np.zeros(len(self.ids), bool)
        if self.outlier is None:
            self.outlier = np.full(len(self.ids), np.nan, np.float32)

    @classmethod
    def concat(cls, parts: list[ClusterRows], dim: int) -> ClusterRows:
        if not parts:
            return cls([], [], np.zeros((0, dim), np.float32), np.zeros(0, np.int32), np.zeros(0, np.float32))
        return cls([i for p in parts for i in p.ids], [s for p in parts for s in p.sources],
                   np.concatenate([p.x for p in parts]), np.concatenate([p.cluster for p in parts]),
                   np.concatenate([p.distance for p in parts]), np.concatenate([p.guest for p in parts]),
                   np.concatenate([p.outlier for p in parts]))


@dataclass
class Reference:
    """The rows outlier scores are measured against: normalized vectors and their labels (a row's label is
    its file's first label plus its row number, so a row finds itself and is left out)."""

    x: np.ndarray
    labels: np.ndarray
    k: int = OUTLIER_K


def kth_distance(x: np.ndarray, labels: np.ndarray, ref: Reference) -> np.ndarray:
    """Cosine distance from each normalized row to its k-th nearest row of ``ref`` other than itself (k at
    most the reference's other rows); float32, NaN for an empty reference."""
    faiss = ix.faiss_module()
    n_ref = len(ref.x)
    if n_ref == 0 or len(x) == 0:
        return np.full(len(x), np.nan, np.float32)
    k = max(1, min(ref.k, n_ref - 1)) if n_ref > 1 else 1
    kk = min(k + 1, n_ref)
    sim, idx = faiss.knn(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(ref.x, np.float32), kk,
                         metric=faiss.METRIC_INNER_PRODUCT)
    other = (idx >= 0) & (ref.labels[np.maximum(idx, 0)] != np.asarray(labels)[:, None])
    rank = np.cumsum(other, axis=1)
    at = np.argmax((rank == k) & other, axis=1)  # the k-th row that is not the row itself
    found = rank[:, -1] >= k
    d = (1.0 - sim[np.arange(len(x)), at]).astype(np.float32)
    return np.where(found, np.maximum(d, 0.0), np.nan).astype(np.float32)


def assign(x: np.ndarray, centroids: np.ndarray, nearest: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroids, cosine distances to them) of normalized rows: (n,) arrays for ``nearest`` 1,
    else (n, nearest)."""
    faiss = ix.faiss_module()
    k = min(nearest, len(centroids))
    sim, idx = faiss.knn(np.ascontiguousarray(x), centroids, k, metric=faiss.METRIC_INNER_PRODUCT)
    idx, dist = idx.astype(np.int32), (1.0 - sim).astype(np.float32)
    if k < nearest:  # a single centroid: no second one
        idx = np.concatenate([idx, np.full((len(x), nearest - k), -1, np.int32)], axis=1)
        dist = np.concatenate([dist, np.full((len(x), nearest - k), np.inf, np.float32)], axis=1)
    return (idx[:, 0], dist[:, 0]) if nearest == 1 else (idx, dist)


def guest_margin(threshold: float) -> float:
    """How much farther (in angle, radians) a row's second-nearest centroid may be than its nearest for the
    row to be compared in that cluster too: twice the angle of the threshold. Two rows at cosine >=
    threshold whose nearest centroids differ are each within this margin of the other's centroid (triangle
    inequality on the sphere)."""
    return 2.0 * math.acos(min(max(threshold, -1.0), 1.0))


def split_rows(ids: list[str], sources: list[str | None], x: np.ndarray, centroids: np.ndarray, groups: int,
               threshold: float = DEFAULT_THRESHOLD, outlier: np.ndarray | None = None) -> list[ClusterRows]:
    """Normalized rows assigned and split into ``groups`` parts by cluster; each part also holds the guests
    of its clusters (rows whose second-nearest centroid is one of them, within ``guest_margin(threshold)``
    of their nearest). ``outlier``: the rows' outlier scores (NaN when not given)."""
    outlier = np.full(len(ids), np.nan, np.float32) if outlier is None else outlier
    idx, dist = assign(x, centroids, nearest=2)
    angle = np.arccos(np.clip(1.0 - dist, -1.0, 1.0))
    guest = (idx[:, 1] >= 0) & (angle[:, 1] - angle[:, 0] <= guest_margin(threshold))
    out = []
    for g in range(groups):
        own = np.nonzero(idx[:, 0] % groups == g)[0]
        visit = np.nonzero(guest & (idx[:, 1] % groups == g))[0]
        sel = np.concatenate([own, visit])
        out.append(ClusterRows([ids[i] for i in sel], [sources[i] for i in sel], x[sel],
                               np.concatenate([idx[own, 0], idx[visit, 1]]), dist[sel, 0],
                               np.concatenate([np.zeros(len(own), bool), np.ones(len(visit), bool)]),
                               outlier[sel]))
    return out


def assign_file(uri: str, dim: int, centroids: np.ndarray, groups: int, threshold: float = DEFAULT_THRESHOLD,
                reference: Reference | None = None, first_label: int = 0) -> list[ClusterRows]:
    """One file's rows, normalized, assigned and split (``split_rows``), with their outlier scores against
    ``reference`` (the file's rows are labelled ``first_label`` + row number)."""
    v = read_vectors(uri, dim, sources=True)
    x = l2_normalize(v.x)
    outlier = kth_distance(x, first_label + v.rows, reference) if reference is not None else None
    return split_rows(v.ids, v.sources, x, centroids, groups, threshold, outlier)


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


PAIRS_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("similarity", pa.float32())])


@dataclass
class GroupResult:
    """What one group of clusters found: the pairs at or above the lowest reported threshold (``a`` < ``b``
    by id, at least one of them the group's own row), every own row's cluster and distance, and the sources
    of the rows in pairs (for the report's thumbnails)."""

    pairs: pa.Table
    clusters: pa.Table
    sources: dict[str, str | None] = field(default_factory=dict)
    pairs_compared: int = 0


def _key(t: float) -> str:
    return f"{t:.3f}".rstrip("0").rstrip(".")


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def dedup_group(parts: list[ClusterRows], dim: int, min_similarity: float = min(THRESHOLDS)) -> GroupResult:
    """The similar pairs within each cluster of one group of clusters (own rows with own rows and with the
    cluster's guests)."""
    rows = ClusterRows.concat(parts, dim)
    pa_, pb, ps = [], [], []
    sources: dict[str, str | None] = {}
    compared = 0
    ids = np.asarray(rows.ids, dtype=object)
    for c in np.unique(rows.cluster):
        members = np.nonzero(rows.cluster == c)[0]
        guest = rows.guest[members]
        own = int((~guest).sum())
        if own == 0:
            continue
        compared += own * (own - 1) // 2 + own * (len(members) - own)
        i, j, sim = similar_pairs(rows.x[members], min_similarity)
        mixed = ~(guest[i] & guest[j])
        i, j, sim = members[i[mixed]], members[j[mixed]], sim[mixed]
        a, b = ids[i], ids[j]
        swap = a > b
        a, b = np.where(swap, b, a), np.where(swap, a, b)
        pa_.append(a)
        pb.append(b)
        ps.append(sim)
        for r in np.unique(np.concatenate([i, j])):
            sources[rows.ids[r]] = rows.sources[r]
    own_rows = np.nonzero(~rows.guest)[0]
    return GroupResult(
        pairs=pa.Table.from_arrays([pa.array(_cat(pa_, object), pa.string()), pa.array(_cat(pb, object),
                                    pa.string()), pa.array(_cat(ps, np.float32), pa.float32())],
                                   schema=PAIRS_SCHEMA),
        clusters=pa.Table.from_arrays([pa.array([rows.ids[r] for r in own_rows], pa.string()),
                                       pa.array(rows.cluster[own_rows], pa.int32()),
                                       pa.array(rows.distance[own_rows], pa.float32()),
                                       pa.array(rows.outlier[own_rows], pa.float32())],
                                      schema=CLUSTERS_SCHEMA),
        sources=sources, pairs_compared=compared)


@dataclass
class Resolution:
    """The duplicates at the threshold, the kept rows, and per reported threshold the rows removed and the
    groups of 2+ rows."""

    duplicates: pa.Table
    keep: pa.Table
    removed: dict[str, int]
    groups: dict[str, int]


def resolve(clusters: pa.Table, pairs: pa.Table, threshold: float = DEFAULT_THRESHOLD,
            thresholds: tuple[float, ...] = THRESHOLDS, keep: str = "centroid",
            infos: dict[str, Any] | None = None) -> Resolution:
    """Duplicates and kept rows from every group's pairs: rows in keep order (rule ``keep`` of
    ``pipeline.analytics.keep``, with the image headers ``infos`` for ``largest``), the greedy walk of
    ``greedy_keep`` at each threshold."""
    ts = sorted(set(thresholds) | {threshold})
    if pairs.num_rows:  # a pair found in two clusters (both rows guests of each other's) counts once
        pairs = pairs.group_by(["a", "b"]).aggregate([("similarity", "max")]).select(
            ["a", "b", "similarity_max"]).rename_columns(["a", "b", "similarity"])
    in_pairs = pc.unique(pa.concat_arrays([pairs.column("a").combine_chunks(),
                                           pairs.column("b").combine_chunks()])) if pairs.num_rows else \
        pa.array([], pa.string())
    rows = clusters.filter(pc.is_in(clusters.column("id"), value_set=in_pairs))
    rows = rows.take(pa.array(keep_order(rows.column("id").to_pylist(),  # the keep rule
                                         rows.column("distance_to_centroid").to_numpy(), keep, infos)))
    order = rows.column("id").combine_chunks()
    m = len(order)
    i = pc.index_in(pairs.column("a"), value_set=order).to_numpy(zero_copy_only=False).astype(np.int64) \
        if m else np.zeros(0, np.int64)
    j = pc.index_in(pairs.column("b"), value_set=order).to_numpy(zero_copy_only=False).astype(np.int64) \
        if m else np.zeros(0, np.int64)
    sim = pairs.column("similarity").to_numpy().astype(np.float32) if m else np.zeros(0, np.float32)
    i, j = np.minimum(i, j), np.maximum(i, j)  # i first in keep order
    removed, groups = {}, {}
    for t in ts:
        d, _ = greedy_keep(m, i, j, sim, t)
        removed[_key(t)] = int((d >= 0).sum())
        groups[_key(t)] = len(np.unique(d[d >= 0]))
    d, s = greedy_keep(m, i, j, sim, threshold)
    dup = np.nonzero(d >= 0)[0]
    cluster_of = rows.column("cluster").to_numpy()
    duplicates = pa.Table.from_arrays(
        [pc.take(order, pa.array(dup)), pc.take(order, pa.array(d[dup])), pa.array(s[dup], pa.float32()),
         pa.array(cluster_of[dup] if m else np.zeros(0, np.int32), pa.int32())], schema=DUPLICATES_SCHEMA)
    counts = np.bincount(d[dup], minlength=m) if len(dup) else np.zeros(m, np.int64)
    gone = pc.is_in(clusters.column("id"), value_set=duplicates.column("id").combine_chunks())
    kept = clusters.filter(pc.invert(gone))
    at = pc.index_in(kept.column("id"), value_set=order)  # null for rows in no pair
    n_dups = pc.fill_null(pc.take(pa.array(counts, pa.int32()), at), 0)
    keep = pa.Table.from_arrays([kept.column("id"), kept.column("cluster"), n_dups], schema=KEEP_SCHEMA)
    return Resolution(duplicates, keep, removed, groups)


def summarize(resolution: Resolution, n: int, threshold: float, pairs_compared: int = 0,
              keep: str = "centroid") -> dict[str, Any]:
    """dedup.json's counts: groups and removed fraction at the threshold and at each reported threshold."""
    keys = sorted(resolution.removed, key=float)
    per = {k: {"removed": resolution.removed[k], "groups": resolution.groups[k]} for k in keys}
    for v in per.values():
        v["removed_fraction"] = round(v["removed"] / n, 6) if n else 0.0
    main = per.get(_key(threshold), {"removed": 0, "groups": 0, "removed_fraction": 0.0})
    return {"rows": n, "threshold": threshold, "groups": main["groups"], "removed": main["removed"],
            "kept": n - main["removed"], "removed_fraction": main["removed_fraction"], "by_threshold": per,
            "pairs_compared": pairs_compared, "keep": keep, "keep_rule": KEEP_RULES[keep]}
