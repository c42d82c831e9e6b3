"""`pipeline dedup`: semantic near-duplicates, clusters and outliers of an embeddings table.

Sample (a Ray task per file) -> spherical k-means on the driver -> assign each file's rows to clusters (a
task per file) -> pairwise cosine within each cluster (a task per group of clusters) -> Parquet tables, a
JSON summary and a PNG report (sample duplicate pairs side by side, the removed fraction per threshold).
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
from pipeline.commands.run import new_run_id
from pipeline.config import DedupConfig
from pipeline.output.layout import write_parquet
from pipeline.output.reader import EmbeddingReader
from pipeline.output.writer import write_run_record

OUTPUTS = {"duplicates": "duplicates.parquet", "keep": "keep.parquet", "clusters": "clusters.parquet",
           "summary": "dedup.json", "report": "dedup.png"}




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
    samples = map_files(store.sample_file, [((f.uri, f.rel, dim, "cosine", 0, c, cfg.seed), {})
                                            for f, c in zip(reader.files, counts) if c],
                        cfg.runtime, "sampling")
    centroids = dd.train_kmeans(np.concatenate([s.x for s in samples]), clusters, seed=cfg.seed)
    clusters = len(centroids)
    groups = min(groups, clusters)
    times["kmeans_s"] = time.perf_counter() - t

    t = time.perf_counter()
    results = dedup_groups([f.uri for f in reader.files], dim, centroids, groups, cfg.threshold,
                           min(*dd.THRESHOLDS, cfg.threshold), cfg.runtime)
    cl = pa.concat_tables([r.clusters for r in results]).sort_by("id")
    resolution = dd.resolve(cl, pa.concat_tables([r.pairs for r in results]), cfg.threshold, dd.THRESHOLDS)
    times["dedup_s"] = time.perf_counter() - t

    t = time.perf_counter()
    duplicates = resolution.duplicates.sort_by([("similarity", "descending"), ("id", "ascending")])
    keep = resolution.keep.sort_by("id")
    uris = {k: storage.join(cfg.output, v) for k, v in OUTPUTS.items()}
    write_parquet(uris["duplicates"], duplicates)
    write_parquet(uris["keep"], keep)
    write_parquet(uris["clusters"], cl)
    summary = dd.summarize(resolution, n, cfg.threshold, sum(r.pairs_compared for r in results))
    dist = cl.column("distance_to_centroid").to_numpy()
    summary.update({
        "clusters": clusters, "groups_of_clusters": groups,
        "distance_to_centroid": {"p50": float(np.percentile(dist, 50)), "p99": float(np.percentile(dist, 99)),
                                 "max": float(dist.max())},
        "outliers_note": "clusters.parquet: sort by distance_to_centroid, descending, for the outliers",
    })

    sources: dict[str, str | None] = {}
    for r in results:
        sources.update(r.sources)
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
