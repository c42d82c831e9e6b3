"""`pipeline dedup`: semantic near-duplicates, clusters and outliers of an embeddings table.

Sample (a Ray task per file) -> spherical k-means on the driver -> assign each file's rows to clusters and
score them as outliers against a reference sample (a task per file) -> pairwise cosine within each cluster
(a task per group of clusters) -> the image headers of rows with a near-duplicate (``--keep largest``) ->
Parquet tables, a JSON summary and a PNG report (sample duplicate pairs side by side, the removed fraction
per threshold).
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.analytics import dedup as dd
from pipeline.analytics import store
from pipeline.analytics.keep import image_infos
from pipeline.commands.run import new_run_id
from pipeline.config import DedupConfig
from pipeline.output.layout import write_parquet
from pipeline.output.reader import EmbeddingReader
from pipeline.output.writer import write_run_record

OUTPUTS = {"duplicates": "duplicates.parquet", "keep": "keep.parquet", "clusters": "clusters.parquet",
           "summary": "dedup.json", "report": "dedup.png"}


def _reference(samples: list[store.Sample], k: int, seed: int) -> dd.Reference:
    """Up to OUTLIER_REFERENCE rows of the k-means sample, drawn with ``seed``: what outlier scores are
    measured against."""
    labels = np.concatenate([s.labels for s in samples])
    pick = np.sort(np.random.default_rng(seed).permutation(len(labels))[:dd.OUTLIER_REFERENCE])
    return dd.Reference(np.ascontiguousarray(np.concatenate([s.x for s in samples])[pick]), labels[pick], k)


def _percentiles(x: np.ndarray) -> dict[str, float]:
    x = x[np.isfinite(x)]
    if not len(x):
        return {}
    return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)), "max": float(x.max())}


def _thumbnail(source: str | None, side: int = 160):
    """A small RGB image read from an image file's source URI; None for tar or Parquet sources or when it
    cannot be read."""
    from pipeline.config import IMAGE_EXTENSIONS

    if not source or not source.lower().endswith(IMAGE_EXTENSIONS):
        return None
    try:
        from pipeline.preprocess.decode import DecodeError, decode_image

        img = decode_image(storage.read_bytes(source), max_pixels=1 << 28, max_bytes=1 << 28)
    except (ValueError, OSError):
        return None
    if isinstance(img, DecodeError):
        return None
    img.thumbnail((side, side))
    return img


def dedup(cfg: DedupConfig) -> dict[str, Any]:
    """Find near-duplicates and clusters; returns the summary (also dedup.json and a run record)."""
    from pipeline.ray.analytics import dedup_groups, map_files

    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat()
    reader = EmbeddingReader(cfg.embeddings)
    n, dim = reader.num_rows, reader.dim
    if n == 0:
        raise ValueError(f"the embeddings table '{reader.uri}' has no rows: run `pipeline extract` into it "
                         "first, or point --embeddings at a table with rows")
    storage.check_writable(cfg.output)
    clusters = min(cfg.clusters or dd.choose_clusters(n), n)
    cpus = cfg.runtime.num_cpus or 2
    groups = min(cfg.groups or 4 * cpus, clusters)
    times: dict[str, float] = {}

    t = time.perf_counter()
    counts = [min(r, math.ceil(min(cfg.sample, n) * r / n)) for r in reader.rows]
    firsts = [int(v) for v in np.concatenate([[0], np.cumsum(reader.rows)[:-1]])]
    samples = map_files(store.sample_file, [((f.uri, f.rel, dim, "cosine", first, c, cfg.seed), {})
                                            for f, first, c in zip(reader.files, firsts, counts) if c],
                        cfg.runtime, "sampling")
    reference = _reference(samples, cfg.outlier_k, cfg.seed)
    centroids = dd.train_kmeans(np.concatenate([s.x for s in samples]), clusters, seed=cfg.seed)
    clusters = len(centroids)
    groups = min(groups, clusters)
    times["kmeans_s"] = time.perf_counter() - t

    t = time.perf_counter()
    results = dedup_groups([f.uri for f in reader.files], dim, centroids, groups, cfg.threshold,
                           min(*dd.THRESHOLDS, cfg.threshold), cfg.runtime, reference, firsts)
    cl = pa.concat_tables([r.clusters for r in results]).sort_by("id")
    sources: dict[str, str | None] = {}
    for r in results:
        sources.update(r.sources)
    times["dedup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    infos = image_infos(sources) if cfg.keep == "largest" else {}  # rows with a near-duplicate only
    resolution = dd.resolve(cl, pa.concat_tables([r.pairs for r in results]), cfg.threshold, dd.THRESHOLDS,
                            cfg.keep, infos)
    times["keep_s"] = time.perf_counter() - t

    t = time.perf_counter()
    duplicates = resolution.duplicates.sort_by([("similarity", "descending"), ("id", "ascending")])
    keep = resolution.keep.sort_by("id")
    uris = {k: storage.join(cfg.output, v) for k, v in OUTPUTS.items()}
    write_parquet(uris["duplicates"], duplicates)
    write_parquet(uris["keep"], keep)
    write_parquet(uris["clusters"], cl)
    summary = dd.summarize(resolution, n, cfg.threshold, sum(r.pairs_compared for r in results), cfg.keep)
    summary.update({
        "clusters": clusters, "groups_of_clusters": groups,
        "headers_read": sum(v is not None for v in infos.values()), "headers_unread": sum(
            v is None for v in infos.values()),
        "distance_to_centroid": _percentiles(cl.column("distance_to_centroid").to_numpy()),
        "outlier_score": {**_percentiles(cl.column("outlier_score").to_numpy()), "k": reference.k,
                          "reference_rows": len(reference.x)},
        "outliers_note": "clusters.parquet: sort by outlier_score (cosine distance to the k-th nearest row), "
                         "descending, for the outliers",
    })

    pairs = []
    for row in duplicates.slice(0, cfg.report_pairs).to_pylist():
        pairs.append((_thumbnail(sources.get(row["duplicate_of"])), _thumbnail(sources.get(row["id"])),
                      row["duplicate_of"], row["id"], row["similarity"]))
    from pipeline.reports import dedup_png

    storage.write_bytes(uris["report"], dedup_png(pairs, summary))
    times["write_s"] = time.perf_counter() - t
    record = {"kind": "dedup", "embeddings": reader.uri, "output": cfg.output, "started_at": started,
              **summary, "outputs": uris, "timings": {k: round(v, 3) for k, v in times.items()},
              "total_s": round(time.perf_counter() - t0, 3), "config": json.loads(cfg.model_dump_json())}
    storage.write_json(uris["summary"], record, indent=2, default=str)
    record["run_record"] = write_run_record(cfg.output, new_run_id(), record)
    return record


def format_dedup(s: dict[str, Any]) -> str:
    by = s["by_threshold"]
    curve = ", ".join(f"{t}: {v['removed_fraction']:.1%}" for t, v in by.items())
    return "\n".join([
        f"{s['rows']} rows in {s['clusters']} clusters: {s['groups']} groups of near-duplicates at cosine >= "
        f"{s['threshold']}, {s['removed']} rows removed ({s['removed_fraction']:.1%}), {s['kept']} kept "
        f"in {s['total_s']:.1f}s",
        f"  removed by threshold: {curve}",
        f"  keep rule:  {s['keep_rule']}",
        f"  outputs:    {', '.join(s['outputs'].values())}",
        f"  run record: {s['run_record']}"])
