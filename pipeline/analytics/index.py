"""A faiss nearest-neighbour index over an embeddings table: which kind, training, per-file parts, merging,
removing rows, searching, and recall@10 against exact search. Ray-free: ``pipeline/ray/analytics.py`` runs
the per-file functions as tasks, ``pipeline/commands/index.py`` tells the story of a build or an add.

Every vector has a *label*, an int64 that faiss returns: the position of its row in the index (a file's rows
get a contiguous range when the file is added; labels are never reused). ``ids.parquet`` maps labels back
to the table's ids. With ``metric: cosine`` vectors are L2-normalized and searched by L2 distance, whose
order on unit vectors is the cosine order; scores are reported as cosine similarity (``1 - d^2 / 2``).

Kinds (``choose_params``):
- ``flat``: exact search (``IDMap2,Flat``); rows are removed by label.
- ``ivfpq``: an inverted file of ``nlist`` k-means cells with product-quantized residuals (``PQ{m}x8``),
  the kind autofaiss picks for a memory budget, plus, when the budget allows, a refinement store of 8-bit
  scalar-quantized vectors that re-ranks ``k_factor * k`` candidates (``Refine(SQ8)``): IVF-PQ alone tops
  out near 0.7-0.85 recall@10 on 256-d vectors, re-ranked it reaches 0.95+. Trained on a sample; new
  vectors are encoded with the trained quantizers (no retraining). A removed row leaves the inverted lists;
  its refinement code stays, unused, until the next build.
- ``hnsw``: a graph (``IDMap2,HNSW32``); the graph is built on one machine (faiss threads) and cannot drop
  rows (an add that would remove some asks for ``index build``).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FLAT_MAX_ROWS = 100_000  # auto: exact search up to this many vectors
RECALL_K = 10
TARGET_RECALL = 0.95  # the search settings are tuned to reach this on the held-out queries
TUNE_MARGIN_SE = 2.0  # ... plus this many standard errors of the tuning queries' mean recall
RECALL_FLOOR = 0.90  # below this after an add: rebuild
RECALL_QUERIES = 1000
KINDS = ("auto", "flat", "ivfpq", "hnsw")
METRICS = ("cosine", "l2")
PQ_M = (64, 48, 32, 24, 16, 12, 8, 4)  # product-quantizer sub-vectors tried, largest first
DEFAULT_MEMORY = "4GB"


def faiss_module():
    """faiss, or ImportError with the install command."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - a dependency
        raise ImportError("nearest-neighbour indexes need faiss: pip install faiss-cpu") from e
    return faiss


def gpu_count() -> int:
    """GPUs the installed faiss can use (0 with faiss-cpu)."""
    faiss = faiss_module()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_memory(value: str | int | float) -> int:
    """'4GB', '512MiB', '1.5G' or a number of bytes -> bytes; ValueError naming the form."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"max memory '{value}' is not a size: use a number with a unit, e.g. --max-memory "
                         "4GB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class IndexParams:
    """What kind of index, with which parameters, and why (recorded in index.json)."""

    kind: str
    metric: str
    dim: int
    nlist: int = 0  # ivfpq: inverted lists (k-means cells)
    m: int = 0  # ivfpq: PQ sub-vectors (bytes per vector at 8 bits)
    nbits: int = 8
    refine: str | None = None  # ivfpq: "SQ8" re-ranking store, or None
    k_factor: int = 0  # ivfpq with refine: candidates re-ranked per result
    nprobe: int = 0  # ivfpq: cells searched (tuned at build)
    hnsw_m: int = 0
    ef_search: int = 0  # hnsw: candidate list at search (tuned at build)
    train_size: int = 0  # vectors sampled to train
    reason: str = ""

    def factory(self) -> str:
        """The faiss index_factory string."""
        if self.kind == "flat":
            return "IDMap2,Flat"
        if self.kind == "hnsw":
            return f"IDMap2,HNSW{self.hnsw_m}"
        return (f"IVF{self.nlist},PQ{self.m}x{self.nbits}np"  # np: no polysemous training (slow, unused)
                + (f",Refine({self.refine})" if self.refine else ""))

    def bytes_per_vector(self) -> float:
        """Memory per indexed vector (codes, id, refinement store; graph links for hnsw)."""
        if self.kind == "flat":
            return 4 * self.dim + 16
        if self.kind == "hnsw":
            return 4 * self.dim + 8 * self.hnsw_m + 16
        return self.m * self.nbits / 8 + 8 + (self.dim if self.refine else 0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "factory": self.factory()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexParams:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _pow2(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(x, 1))))


def choose_params(n: int, dim: int, kind: str = "auto", metric: str = "cosine",
                  max_memory: str | int = DEFAULT_MEMORY) -> IndexParams:
    """The index for ``n`` vectors of ``dim`` within ``max_memory``: ``auto`` is exact search up to
    FLAT_MAX_ROWS vectors (and while they fit), IVF-PQ above."""
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got '{kind}' (--kind)")
    if metric not in METRICS:
        raise ValueError(f"metric must be cosine or l2, got '{metric}' (--metric)")
    if n < 1:
        raise ValueError("the embeddings table is empty: run `pipeline extract` first, or point --embeddings "
                         "at a table with rows")
    budget = parse_memory(max_memory)
    flat = IndexParams("flat", metric, dim)
    if kind == "flat" or (kind == "auto" and n <= FLAT_MAX_ROWS and n * flat.bytes_per_vector() <= budget):
        flat.reason = ("--kind flat" if kind == "flat" else
                       f"auto: {n} vectors <= {FLAT_MAX_ROWS}: exact search fits in {budget / 1e9:.1f} GB")
        return flat
    if kind == "hnsw":
        return IndexParams("hnsw", metric, dim, hnsw_m=32, ef_search=64, reason="--kind hnsw")
    # IVF-PQ: ~2 sqrt(n) cells (a power of two), >= 39 training points per cell.
    nlist = int(min(65536, max(1, _pow2(2 * math.sqrt(n)))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    train_size = int(min(n, max(40 * nlist, 256 * 40)))
    ms = [m for m in PQ_M if dim % m == 0 and m <= dim] or [1]
    best = ms[0] if dim // ms[0] >= 4 or ms[0] == ms[-1] else next((m for m in ms if dim // m >= 4), ms[-1])
    for refine in ("SQ8", None):
        for m in [m for m in ms if m <= best]:
            p = IndexParams("ivfpq", metric, dim, nlist=nlist, m=m, refine=refine,
                            k_factor=8 if refine else 0, nprobe=min(nlist, 16), train_size=train_size)
            need = n * p.bytes_per_vector() + nlist * dim * 4
            if need <= budget:
                why = f"auto: more than {FLAT_MAX_ROWS} vectors" if kind == "auto" else "--kind ivfpq"
                p.reason = (f"{why}; {nlist} cells (~2 sqrt(n)), PQ{m} codes"
                            + (" + SQ8 re-ranking store" if refine else " (no room for re-ranking)")
                            + f": {need / 1e9:.2f} GB of {budget / 1e9:.1f} GB")
                return p
    raise ValueError(f"{n} vectors of {dim} dims do not fit in {budget / 1e9:.2f} GB even as IVF-PQ with "
                     f"{ms[-1]}-byte codes: raise --max-memory")


# --------------------------------------------------------------------------------------------------
# Building


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as the index holds them: float32, normalized for cosine."""
    from pipeline.analytics.vectors import l2_normalize

    return l2_normalize(x) if metric == "cosine" else np.ascontiguousarray(x, dtype=np.float32)


def serialize(index: Any) -> bytes:
    return faiss_module().serialize_index(index).tobytes()


def deserialize(data: bytes) -> Any:
    return faiss_module().deserialize_index(np.frombuffer(data, dtype=np.uint8))


def _parts(index: Any, params: IndexParams) -> tuple[Any, Any]:
    """(the part that holds labels, the refinement store or None)."""
    faiss = faiss_module()
    if params.kind == "ivfpq" and params.refine:
        return faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)
    return faiss.downcast_index(index), None


def train(params: IndexParams, sample: np.ndarray) -> bytes:
    """The empty index, trained on ``sample`` (prepared vectors), serialized. The IVF k-means runs on the
    GPUs when the installed faiss has them."""
    faiss = faiss_module()
    index = faiss.index_factory(params.dim, params.factory(), faiss.METRIC_L2)
    if params.kind == "ivfpq":
        ivf = faiss.extract_index_ivf(index)
        if gpu_count():  # pragma: no cover - needs faiss-gpu
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(params.dim))
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        if gpu_count():  # pragma: no cover
            ivf.clustering_index = None
    return serialize(index)


def encode_part(template: bytes, params: IndexParams, x: np.ndarray, labels: np.ndarray, first: int,
                count: int) -> bytes:
    """An index part holding ``x`` (prepared vectors) under ``labels`` (ascending, in a file's range
    ``first`` .. ``first + count``), serialized. The refinement store gets all ``count`` positions (zeros
    where a row has no embedding) so that its positions stay the labels. hnsw cannot be merged: its part
    is the raw vectors."""
    if params.kind == "hnsw":
        return np.ascontiguousarray(x, dtype=np.float32).tobytes()
    index = deserialize(template)
    holder, refine = _parts(index, params)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    holder.add_with_ids(x, labels)
    if refine is not None:
        if len(labels) != count:
            full = np.zeros((count, params.dim), np.float32)
            full[labels - first] = x
            x = full
        refine.add(x)
        index.ntotal = refine.ntotal
    return serialize(index)


def merge_part(index: Any, params: IndexParams, part: bytes, labels: np.ndarray) -> None:
    """Append a part (parts must come in label order: the refinement store is positional)."""
    if params.kind == "hnsw":
        x = np.frombuffer(part, dtype=np.float32).reshape(-1, params.dim)
        faiss_module().downcast_index(index).add_with_ids(x, np.ascontiguousarray(labels, dtype=np.int64))
        return
    holder, refine = _parts(index, params)
    other = deserialize(part)
    o_holder, o_refine = _parts(other, params)
    if params.kind == "ivfpq":
        holder.merge_from(o_holder, 0)
    else:
        holder.merge_from(o_holder)
    if refine is not None:
        refine.merge_from(o_refine)
        index.ntotal = refine.ntotal
    else:
        index.ntotal = holder.ntotal


def remove_labels(index: Any, params: IndexParams, ranges: list[tuple[int, int]]) -> int:
    """Remove the labels in [start, stop) ranges; returns how many vectors left the index."""
    if not ranges:
        return 0
    if params.kind == "hnsw":
        raise ValueError("an hnsw index cannot drop rows, and some embedding files were replaced or removed: "
                         "rebuild it with `pipeline index build`")
    faiss = faiss_module()
    holder, _ = _parts(index, params)
    removed = 0
    for start, stop in ranges:
        removed += int(holder.remove_ids(faiss.IDSelectorRange(int(start), int(stop))))
    if params.kind == "flat":
        index.ntotal = holder.ntotal
    return removed


def live_count(index: Any, params: IndexParams) -> int:
    """Vectors a search can return."""
    holder, _ = _parts(index, params)
    return int(holder.ntotal)


# --------------------------------------------------------------------------------------------------
# Searching


def configure(index: Any, params: IndexParams) -> None:
    """Apply the tuned search settings (nprobe, k_factor, efSearch)."""
    faiss = faiss_module()
    if params.kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = params.nprobe
        if params.refine:
            index.k_factor = params.k_factor
    elif params.kind == "hnsw":
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch = params.ef_search


def search(index: Any, params: IndexParams, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of the k nearest for each prepared query vector; labels -1 where fewer exist.
    Scores: cosine similarity (metric cosine) or Euclidean distance (l2)."""
    d, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), k)
    return to_scores(d, params.metric), labels


def to_scores(d: np.ndarray, metric: str) -> np.ndarray:
    """faiss's squared L2 distances as the reported score."""
    if metric == "cosine":
        return (1.0 - d / 2.0).astype(np.float32)
    return np.sqrt(np.maximum(d, 0)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Exact ground truth and recall


@dataclass
class TopK:
    """The k nearest labels of each query with squared L2 distances (exact search, merged over files)."""

    d: np.ndarray  # (q, k) float32, ascending; inf where missing
    labels: np.ndarray  # (q, k) int64; -1 where missing

    @classmethod
    def empty(cls, q: int, k: int) -> TopK:
        return cls(np.full((q, k), np.inf, np.float32), np.full((q, k), -1, np.int64))

    def merge(self, other: TopK) -> TopK:
        """The k nearest of both (ties: smaller label first)."""
        k = self.d.shape[1]
        d = np.concatenate([self.d, other.d], axis=1)
        lab = np.concatenate([self.labels, other.labels], axis=1)
        order = np.lexsort((lab, d), axis=1)[:, :k]
        return TopK(np.take_along_axis(d, order, 1), np.take_along_axis(lab, order, 1))


def exact_topk(queries: np.ndarray, x: np.ndarray, labels: np.ndarray, k: int) -> TopK:
    """Exact k nearest of each query among ``x`` (prepared) by squared L2, as labels."""
    faiss = faiss_module()
    out = TopK.empty(len(queries), k)
    if len(x) == 0 or len(queries) == 0:
        return out
    kk = min(k, len(x))
    d, i = faiss.knn(np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(x, np.float32), kk)
    out.d[:, :kk] = d
    out.labels[:, :kk] = np.where(i >= 0, labels[np.maximum(i, 0)], -1)
    return out


def without_self(labels: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """The first k labels of each row that are not the query's own (held-out evaluation)."""
    out = np.full((len(labels), k), -1, np.int64)
    for r, (row, own) in enumerate(zip(labels, query_labels)):
        kept = row[(row != own) & (row >= 0)][:k]
        out[r, :len(kept)] = kept
    return out


def recall_hits(approx: np.ndarray, exact: np.ndarray, k: int = RECALL_K) -> tuple[np.ndarray, np.ndarray]:
    """Per query: how many of its exact k nearest the index also returned in its k, and how many there are."""
    hits, total = np.zeros(len(exact), np.int64), np.zeros(len(exact), np.int64)
    for r, (a, e) in enumerate(zip(approx, exact)):
        e = e[e >= 0][:k]
        hits[r], total[r] = len(np.intersect1d(a[:k], e)), len(e)
    return hits, total


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = RECALL_K) -> float:
    """Mean share of each query's exact k nearest that the index also returned in its k (k-recall@k)."""
    hits, total = recall_hits(approx, exact, k)
    return float(hits.sum() / total.sum()) if total.sum() else float("nan")


def search_without_self(index: Any, params: IndexParams, queries: np.ndarray, query_labels: np.ndarray
                        ) -> np.ndarray:
    """The RECALL_K nearest labels of queries that are rows of the index, each query's own row left out:
    what a query from outside the index gets. One more result is asked for (the row itself); with a
    re-ranking store, its candidates stay k_factor * RECALL_K, as for a search of RECALL_K."""
    configure(index, params)
    if params.kind == "ivfpq" and params.refine:
        index.k_factor = params.k_factor * RECALL_K / (RECALL_K + 1) + 1e-6
    try:
        _, labels = index.search(np.ascontiguousarray(queries, dtype=np.float32), RECALL_K + 1)
    finally:
        configure(index, params)
    return without_self(labels, query_labels, RECALL_K)


@dataclass
class QuerySet:
    """Held-out queries: rows of the index (their own row never counts) that the quantizers were not
    trained on, with their exact nearest labels (RECALL_K + 1, the row itself among them)."""

    x: np.ndarray
    labels: np.ndarray
    truth: TopK

    def recall(self, index: Any, params: IndexParams) -> tuple[float, float, float]:
        """(recall@10, its standard error over the queries, queries per second) with the current setting."""
        exact = without_self(self.truth.labels, self.labels, RECALL_K)
        t = time.perf_counter()
        approx = search_without_self(index, params, self.x, self.labels)
        qps = len(self.x) / max(time.perf_counter() - t, 1e-9)
        hits, total = recall_hits(approx, exact)
        per = hits[total > 0] / total[total > 0]
        se = float(per.std(ddof=1) / math.sqrt(len(per))) if len(per) > 1 else 0.0
        return (float(hits.sum() / total.sum()) if total.sum() else float("nan")), se, qps


@dataclass
class RecallReport:
    """recall@10 of the index against exact search on held-out queries, and the settings tried."""

    recall: float
    queries: int
    settings: dict[str, Any]
    tried: list[dict[str, Any]] = field(default_factory=list)
    standard_error: float = 0.0
    tuning: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"recall_at_10": round(self.recall, 4), "queries": self.queries,
                "standard_error": round(self.standard_error, 4), **self.settings, "tried": self.tried,
                **({"tuning": self.tuning} if self.tuning else {})}


def tune_search(index: Any, params: IndexParams, queries: QuerySet) -> tuple[list[dict], dict[str, Any]]:
    """The cheapest search setting (nprobe for ivfpq, efSearch for hnsw) whose recall@10 on ``queries``
    reaches TARGET_RECALL plus TUNE_MARGIN_SE standard errors, kept in ``params`` (the best one tried when
    none does); returns the settings tried and what was asked."""
    name = "nprobe" if params.kind == "ivfpq" else "ef_search"
    top = params.nlist if params.kind == "ivfpq" else 1024
    candidates = [v for v in (4, 8, 16, 32, 64, 128, 256, 512, 1024) if v <= top] or [top]
    tried: list[dict[str, Any]] = []
    best, chosen = (-1.0, candidates[0]), None
    for v in candidates:
        setattr(params, name, v)
        r, se, qps = queries.recall(index, params)
        need = TARGET_RECALL + TUNE_MARGIN_SE * se
        tried.append({name: v, "recall_at_10": round(r, 4), "needed": round(need, 4),
                      "queries_per_s": round(qps, 1)})
        best = (r, v) if r > best[0] + 1e-9 else best
        if r >= need:
            chosen = v
            break
    setattr(params, name, chosen if chosen is not None else best[1])
    return tried, {"queries": len(queries.x), "target": TARGET_RECALL, "reached": chosen is not None,
                   "margin_standard_errors": TUNE_MARGIN_SE}


def measure(index: Any, params: IndexParams, queries: np.ndarray, query_labels: np.ndarray, truth: TopK,
            *, tune: bool, tuning: QuerySet | None = None) -> RecallReport:
    """recall@10 on held-out queries (each query's own row left out of both lists). With ``tune`` the search
    setting is tuned first (``tune_search``) on the ``tuning`` queries, a set apart from the reported ones
    (or on the reported ones) and kept in ``params``; otherwise the current setting is measured."""
    held = QuerySet(np.ascontiguousarray(queries, dtype=np.float32), np.asarray(query_labels), truth)
    if len(held.x) == 0:
        return RecallReport(float("nan"), 0, {})
    if params.kind == "flat":
        return RecallReport(held.recall(index, params)[0], len(held.x), {})
    name = "nprobe" if params.kind == "ivfpq" else "ef_search"
    tried, asked = [], {}
    if tune:
        tried, asked = tune_search(index, params, tuning if tuning is not None and len(tuning.x) else held)
    r, se, _ = held.recall(index, params)
    return RecallReport(r, len(held.x), {name: getattr(params, name)}, tried, se, asked)
