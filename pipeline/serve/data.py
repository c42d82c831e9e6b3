"""What `pipeline serve` shows, read once from the outputs (Ray-free, read-only): the table's ids, sources,
labels and embeddings (one snapshot through the ledger), the index (or an exact search over the table when
there is none), the dedup groups, clusters and outlier scores, the probe, a head's metrics, and the runs."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.analytics import index as ix
from pipeline.analytics import store
from pipeline.output.layout import ERRORS_DIR, RUNS_DIR
from pipeline.output.reader import read_embeddings, snapshot_files
from pipeline.output.spec import EmbeddingSpec


class DamagedFile(ValueError):
    """A file beside the output that cannot be read as what wrote it writes (the page says which)."""


MAP_POINTS = 5000  # rows drawn on the clusters map (a sample of larger tables, by a hash of id)
OUTLIERS_SHOWN = 48
ERRORS_SHOWN = 500


@dataclass
class Rows:
    """The table: row i has ids[i], sources[i], labels[i] and the unit-length vector x[i]."""

    ids: list[str]
    sources: list[str | None]
    labels: list[str | None]
    x: np.ndarray
    where: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.where = {r: i for i, r in enumerate(self.ids)}

    def describe(self, i: int, score: float | None = None) -> dict[str, Any]:
        out = {"id": self.ids[i], "label": self.labels[i], "source": self.sources[i]}
        if score is not None:
            out["score"] = round(float(score), 4)
        return out


def snapshot(output: str) -> tuple[list[str], EmbeddingSpec]:
    """The files of OUTPUT's embeddings the ledger lists, and their spec (from the first file's footer);
    ValueError naming the fix for a folder that is no extract output or holds no rows yet."""
    files = snapshot_files(output)
    if not files:
        raise ValueError(f"'{output}' holds no embeddings yet: run `pipeline extract --output {output}`")
    with storage.open_input(files[0]) as f:
        return files, EmbeddingSpec.from_schema(pq.ParquetFile(f).schema_arrow)


def read_rows(files: list[str], dim: int) -> Rows:
    """The snapshot's rows, vectors scaled to unit length (cosine = dot product), read file by file into one
    preallocated float32 matrix (1M x 256: 1 GiB held, about as much again at the peak)."""
    counts = []
    for uri in files:
        with storage.open_input(uri) as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    x = np.empty((sum(counts), dim), np.float32)
    ids: list[str] = []
    sources: list[str | None] = []
    labels: list[str | None] = []
    at = 0
    for uri, n in zip(files, counts):
        with storage.open_input(uri) as f:
            t = pq.read_table(f, columns=["id", "source", "label", "embedding"])
        block = x[at:at + n]
        block[:] = t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False) \
            .reshape(n, dim)
        np.nan_to_num(block, copy=False, nan=0.0, posinf=0.0, neginf=0.0)  # a damaged row cannot break PCA
        block /= np.maximum(np.sqrt(np.einsum("ij,ij->i", block, block)), 1e-12)[:, None]
        ids += t.column("id").to_pylist()
        sources += t.column("source").to_pylist()
        labels += t.column("label").to_pylist()
        at += n
        del t
    pa.default_memory_pool().release_unused()
    return Rows(ids, sources, labels, x)


class Index:
    """A faiss index folder loaded for search (memory-mapped when large), its row ids by label."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.meta = store.read_meta(uri)
        self.params = ix.IndexParams.from_dict(self.meta["params"])
        self.index = store.load_index(uri, self.meta)
        self.ids = store.id_lookup(store.read_ids(uri, self.meta), int(self.meta["next_label"])).to_pylist()
        self.size = int(self.index.ntotal)

    def search(self, q: np.ndarray, k: int) -> list[tuple[str, float]]:
        x = ix.prepare(q[None, :].copy(), self.params.metric)
        scores, labels = ix.search(self.index, self.params, x, k)
        return [(self.ids[i], float(s)) for i, s in zip(labels[0], scores[0]) if i >= 0 and self.ids[i]]


def exact_search(rows: Rows, q: np.ndarray, k: int) -> list[tuple[str, float]]:
    s = rows.x @ (q / max(float(np.linalg.norm(q)), 1e-12))
    top = np.argpartition(-s, min(k, len(s) - 1))[:k] if len(s) > k else np.arange(len(s))
    top = top[np.argsort(-s[top], kind="stable")]
    return [(rows.ids[i], float(s[i])) for i in top]


def read_json(uri: str | None, needs: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """A JSON object with the keys ``needs``; None when there is no file; DamagedFile when it is no such."""
    if uri is None or not storage.exists(uri):
        return None
    try:
        out = json.loads(storage.read_bytes(uri))
    except (ValueError, OSError) as e:
        raise DamagedFile(f"'{uri}' cannot be read ({e}): rerun the command that wrote it") from None
    if not isinstance(out, dict) or any(k not in out for k in needs):
        raise DamagedFile(f"'{uri}' is not what `pipeline` writes there (an object with {', '.join(needs)}): "
                          "rerun the command that wrote it")
    return out


def read_parquet(uri: str, columns: tuple[str, ...]) -> pa.Table | None:
    """The table with ``columns``; None when there is no file; DamagedFile when it cannot be read so."""
    if not storage.exists(uri):
        return None
    try:
        with storage.open_input(uri) as f:
            t = pq.read_table(f)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DamagedFile(f"'{uri}' cannot be read ({e}): rerun the command that wrote it") from None
    missing = [c for c in columns if c not in t.schema.names]
    if missing:
        raise DamagedFile(f"'{uri}' has no column {', '.join(missing)}: rerun the command that wrote it")
    return t


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The rows projected on their first two principal components."""
    c = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    return c @ vt[:2].T if vt.shape[0] >= 2 else np.zeros((len(x), 2), np.float32)


def map_points(rows: Rows, clusters: dict[str, int]) -> dict[str, Any]:
    """A 2-D map: UMAP when umap-learn is installed, else PCA; at most MAP_POINTS rows (by a hash of id)."""
    n = len(rows.ids)
    pick = np.arange(n)
    if n > MAP_POINTS:
        h = pc.hash(pa.array(rows.ids)) if hasattr(pc, "hash") else None
        order = np.argsort(np.asarray(h) if h is not None else np.random.default_rng(0).random(n))
        pick = np.sort(order[:MAP_POINTS])
    x = rows.x[pick]
    method = "pca"
    try:
        import umap  # optional

        xy = umap.UMAP(n_components=2, random_state=0).fit_transform(x) if len(x) > 15 else pca_2d(x)
        method = "umap" if len(x) > 15 else "pca"
    except ImportError:
        xy = pca_2d(x)
    return {"method": method, "rows": n, "shown": len(pick),
            "points": [{"id": rows.ids[i], "label": rows.labels[i], "cluster": clusters.get(rows.ids[i]),
                        "x": round(float(a), 5), "y": round(float(b), 5)} for i, (a, b) in zip(pick, xy)]}


class Catalog:
    """Everything the page shows. The table loads in a background thread (``ready``); JSON files are read
    when asked, so a run that finished since the app started shows up."""

    def __init__(self, output: str, index: str | None = None, dedup: str | None = None,
                 probe: str | None = None, head: str | None = None) -> None:
        self.output, self.index_uri, self.dedup_uri = output, index, dedup
        self.probe_uri, self.head_uri = probe, head
        self.rows: Rows | None = None
        self.index: Index | None = None
        self.index_note: str | None = None  # why an index beside the output is not used
        self.error: str | None = None
        self.loaded_s: float | None = None
        self.ready = threading.Event()
        self.files, self.spec = snapshot(output)

    def load(self) -> None:
        t0 = time.perf_counter()
        try:
            self.rows = read_rows(self.files, int(self.spec.dim))
        except Exception as e:  # noqa: BLE001 - shown on the page and by /healthz
            self.error = f"{type(e).__name__}: {e}"
        if self.index_uri and self.rows is not None:
            self.load_index()
        self.loaded_s = round(time.perf_counter() - t0, 3)
        self.ready.set()

    def load_index(self) -> None:
        """The index, unless it cannot be read or holds other rows: then exact search, and why."""
        try:
            index = Index(self.index_uri)
        except Exception as e:  # noqa: BLE001 - the page falls back to exact search and says why
            self.index_note = f"'{self.index_uri}' cannot be read ({type(e).__name__}: {e}): exact search"
            return
        held = [i for i in index.ids if i is not None]
        found = sum(i in self.rows.where for i in held)
        if found < 0.5 * max(len(held), 1):
            self.index_note = (f"'{self.index_uri}' holds other rows ({found} of its {len(held)} ids are in "
                               "this table): exact search; rebuild it with `pipeline index build`")
            return
        self.index = index

    def start(self) -> None:
        threading.Thread(target=self.load, name="catalog-load", daemon=True).start()

    def search(self, q: np.ndarray, k: int, exclude: str | None = None) -> list[dict[str, Any]]:
        rows = self.rows
        want = k + (1 if exclude else 0)
        hits = self.index.search(q, want) if self.index is not None else exact_search(rows, q, want)
        out = []
        for rid, score in hits:
            i = rows.where.get(rid)
            if rid == exclude or i is None:
                continue  # the query itself, or a row the index holds that this snapshot no longer has
            out.append(rows.describe(i, score))
        return out[:k]

    def vector(self, row_id: str) -> np.ndarray | None:
        i = self.rows.where.get(row_id)
        return None if i is None else self.rows.x[i]

    def source_of(self, row_id: str) -> str | None:
        i = self.rows.where.get(row_id) if self.rows is not None else None
        return None if i is None else self.rows.sources[i]

    # -- what sits beside the table ----------------------------------------------------------------------
    def duplicates(self) -> dict[str, Any] | None:
        if not self.dedup_uri:
            return None
        summary = read_json(storage.join(self.dedup_uri, "dedup.json")) or {}
        dup = read_parquet(storage.join(self.dedup_uri, "duplicates.parquet"),
                           ("id", "duplicate_of", "similarity"))
        if dup is None:
            return None
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in dup.to_pylist():
            groups.setdefault(r["duplicate_of"], []).append({"id": r["id"],
                                                             "similarity": r["similarity"] or 0.0})
        ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        return {"threshold": summary.get("threshold"), "keep_rule": summary.get("keep_rule"),
                "rows": summary.get("rows"), "by_threshold": summary.get("by_threshold", {}),
                "groups": [{"kept": kept, "removed": sorted(m, key=lambda r: -r["similarity"])}
                           for kept, m in ordered]}

    def clusters(self) -> dict[str, Any]:
        table = read_parquet(storage.join(self.dedup_uri, "clusters.parquet"), ("id", "cluster")) \
            if self.dedup_uri else None
        assigned = dict(zip(table.column("id").to_pylist(), table.column("cluster").to_pylist())) \
            if table is not None else {}
        out = map_points(self.rows, assigned)
        for key, column in (("outliers", "outlier_score"), ("far_from_centre", "distance_to_centroid")):
            out[key] = []
            if table is not None and column in table.schema.names:
                top = table.sort_by([(column, "descending")]).slice(0, OUTLIERS_SHOWN).to_pylist()
                out[key] = [{**r, "label": self.rows.labels[self.rows.where[r["id"]]]}
                            for r in top if r["id"] in self.rows.where]
        return out

    def probe(self) -> dict[str, Any] | None:
        if not self.probe_uri:
            return None
        return read_json(storage.join(self.probe_uri, "probe.json"), ("best", "results"))

    def head(self) -> dict[str, Any] | None:
        meta = read_json(storage.join(self.head_uri, "head.json")) if self.head_uri else None
        if meta is None:
            return None
        return {"classes": meta.get("classes"), "head": meta.get("head"), "metrics": meta.get("metrics"),
                "embeddings": meta.get("embeddings"), "uri": self.head_uri}

    def runs(self) -> list[dict[str, Any]]:
        root = storage.join(self.output, RUNS_DIR)
        if not storage.exists(root):
            return []
        out = []
        for f in storage.list_files(root, hidden=()):
            if f.rel.endswith(".json"):
                try:
                    r = json.loads(storage.read_bytes(f.uri))
                except (ValueError, OSError):
                    continue  # a record being written or damaged: left out
                if not isinstance(r, dict):
                    continue
                out.append({k: r.get(k) for k in ("run_id", "kind", "started_at", "source", "counts",
                                                  "error_kinds", "images_per_s", "timings", "plan",
                                                  "ledger", "run_date")})
        return sorted(out, key=lambda r: str(r.get("started_at") or ""), reverse=True)

    def errors(self, run_date: str | None = None) -> dict[str, Any]:
        """The error rows of the snapshot (of one nightly run date when given): id, source, kind, message."""
        if not snapshot_files(self.output, ERRORS_DIR):
            return {"rows": 0, "shown": []}
        try:
            t = read_embeddings(self.output, ERRORS_DIR)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise DamagedFile(f"the error rows of '{self.output}' cannot be read ({e}): `pipeline verify "
                              f"{self.output} --repair`") from None
        if run_date and "run_date" in t.schema.names:
            t = t.filter(pc.equal(t.column("run_date").cast(pa.string()), run_date))
        keep = [c for c in ("id", "source", "error_kind", "error_message", "run_date") if c in t.schema.names]
        shown = t.select(keep).slice(0, ERRORS_SHOWN).to_pylist()
        return {"rows": t.num_rows, "shown": [{k: (str(v) if v is not None else None) for k, v in r.items()}
                                              for r in shown]}
