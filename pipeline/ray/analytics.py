"""Ray wiring of the analytics: one task per embeddings file (sampling, encoding index parts, exact search
for recall, k-means assignment), one task per group of clusters (near-duplicates), and the neighbours search
as a Ray Data map over an actor pool holding the index. The work itself is in ``pipeline/analytics/``."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
from ray.data.datasource import Datasink

from pipeline import storage
from pipeline.analytics.dedup import GroupResult, assign_file, dedup_group
from pipeline.analytics.search import NeighborsWriter, add_counts
from pipeline.plan import READ_TASK_CPUS
from pipeline.ray import data_context, init_ray


def _cpus(runtime: Any) -> float:
    """CPUs per task or actor: the setting, else 1."""
    return float(runtime.cpus_per_actor or 1.0)


def _progress(what: str, done: int, total: int, t0: float, enabled: bool) -> None:
    if enabled:
        print(f"\r{what}: {done}/{total} ({time.perf_counter() - t0:.0f}s)",
              end="\n" if done == total else "", file=sys.stderr, flush=True)


def _wait(refs: list[Any], what: str, progress: bool) -> list[Any]:
    """The results in order, with a progress line as tasks finish; a failed task raises its error."""
    t0 = time.perf_counter()
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=1)
        _progress(what, len(refs) - len(pending), len(refs), t0, progress)
    return ray.get(refs)


def map_files(fn: Callable[..., Any], calls: list[tuple[tuple, dict[str, Any]]], runtime: Any, what: str,
              shared: dict[str, Any] | None = None) -> list[Any]:
    """Run ``fn(*args, **kwargs, **shared)`` as one task per call (one per embeddings file), ``shared`` values
    put in the object store once; returns the results in call order."""
    init_ray(runtime)
    if not calls:
        return []
    refs_shared = {k: ray.put(v) for k, v in (shared or {}).items()}
    task = ray.remote(num_cpus=_cpus(runtime), max_retries=2)(_call)
    refs = [task.remote(fn, args, kwargs, list(refs_shared), *refs_shared.values()) for args, kwargs in calls]
    return _wait(refs, what, runtime.progress)


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], names: list[str], *values: Any) -> Any:
    return fn(*args, **kwargs, **dict(zip(names, values)))


def _assign_one(uri: str, dim: int, centroids: Any, groups: int, threshold: float, reference: Any = None,
                first_label: int = 0) -> Any:
    # one group: a single return value
    return assign_file(uri, dim, centroids, groups, threshold, reference, first_label)[0]


def _dedup_group(dim: int, min_similarity: float, *parts: Any) -> GroupResult:
    return dedup_group(list(parts), dim, min_similarity)


def dedup_groups(file_uris: list[str], dim: int, centroids: Any, groups: int, threshold: float,
                 min_similarity: float, runtime: Any, reference: Any = None,
                 first_labels: list[int] | None = None) -> list[GroupResult]:
    """Assign every file's rows to clusters (a task per file, its rows split by group of clusters, guests
    within the margin of ``threshold`` included, outlier scores against ``reference``), then find the
    similar pairs per group of clusters (a task per group, fed the parts straight from the object store)."""
    init_ray(runtime)
    cents = ray.put(centroids)
    ref = ray.put(reference)
    firsts = first_labels or [0] * len(file_uris)
    fn = assign_file if groups > 1 else _assign_one
    assign = ray.remote(num_cpus=_cpus(runtime), num_returns=groups, max_retries=2)(fn)
    parts = []
    for uri, first in zip(file_uris, firsts):
        out = assign.remote(uri, dim, cents, groups, threshold, ref, first)
        parts.append(out if groups > 1 else [out])
    task = ray.remote(num_cpus=_cpus(runtime), max_retries=2)(_dedup_group)
    refs = [task.remote(dim, min_similarity, *[p[g] for p in parts]) for g in range(groups)]
    return _wait(refs, "near-duplicates per group of clusters", runtime.progress)


class NeighborsDatasink(Datasink[dict]):
    """Blocks of Searcher rows -> NeighborsWriter files named by write task and block."""

    def __init__(self, output_uri: str) -> None:
        self.writer = NeighborsWriter(output_uri)
        self.result: dict[str, Any] = {"rows": 0, "queries": 0, "failed": 0, "error_kinds": {}}

    def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": 0, "queries": 0, "failed": 0, "error_kinds": {}}
        for b, block in enumerate(blocks):
            if not isinstance(block, pa.Table):
                block = pa.Table.from_pandas(block)
            add_counts(out, self.writer.write_block(block, f"part-{ctx.task_idx:05d}-{b:04d}"))
        return out

    def on_write_complete(self, write_result: Any) -> None:
        total: dict[str, Any] = {"rows": 0, "queries": 0, "failed": 0, "error_kinds": {}}
        for r in write_result.write_returns:
            add_counts(total, r)
        self.result = total

    def get_name(self) -> str:
        return "WriteNeighbors"


def _search_map(ds: ray.data.Dataset, stage: type, stage_kwargs: dict[str, Any], out_uri: str, runtime: Any,
                batch_size: int) -> dict[str, Any]:
    lo, hi = runtime.actor_range()
    cpus = _cpus(runtime)
    if "spec" not in stage_kwargs:  # no EmbedderSpec: the searcher reads stored embeddings
        # faiss searches each batch on the searcher's threads, set in every
        # call (Ray's OMP_NUM_THREADS would leave it one). Unset, one searcher per node that reserves all but
        # one CPU, left to Ray Data's listing, read and write tasks (which mostly wait on storage), and
        # searches on all the node's cores.
        if runtime.cpus_per_actor is None:
            nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
            node_cpus = min(c for c in nodes if c > 0) if any(nodes) else 1.0
            cpus = max(1.0, node_cpus - 1)
            threads = max(1, int(math.floor(node_cpus)))
            if not runtime.actors:
                lo, hi = 1, max(1, sum(1 for c in nodes if c >= cpus))
        else:
            threads = max(1, math.ceil(cpus))
        stage_kwargs = {**stage_kwargs, "threads": threads}
    ds = ds.map_batches(
        stage, fn_constructor_kwargs=stage_kwargs, compute=ActorPoolStrategy(min_size=lo, max_size=hi),
        batch_size=batch_size, batch_format="pyarrow", num_cpus=cpus,
        num_gpus=runtime.gpus_per_actor or None, resources=runtime.actor_resources or None)
    sink = NeighborsDatasink(out_uri)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": READ_TASK_CPUS})
    return sink.result


def search_tables(files: list[storage.FileInfo], stage: type, stage_kwargs: dict[str, Any], out_uri: str,
                  runtime: Any, batch_size: int) -> dict[str, Any]:
    """Neighbours of the rows of embeddings files: read_parquet -> the Searcher's actor pool -> Parquet."""
    init_ray(runtime)
    data_context(runtime)
    fs, _ = storage.get_fs(files[0].uri)
    ds = ray.data.read_parquet([storage.get_fs(f.uri)[1] for f in files], filesystem=fs,
                               columns=["id", "embedding"], num_cpus=READ_TASK_CPUS)
    return _search_map(ds, stage, stage_kwargs, out_uri, runtime, batch_size)


def search_images(shards: list[Any], source_cfg: Any, stage: type, stage_kwargs: dict[str, Any], out_uri: str,
                  runtime: Any) -> dict[str, Any]:
    """Neighbours of images: shard read tasks -> an actor pool embedding and searching -> Parquet."""
    from pipeline.ray.data import read_shards  # noqa: I001 - the image path reuses extract's read tasks

    init_ray(runtime)
    data_context(runtime)
    ds = read_shards(shards, source_cfg)
    return _search_map(ds, stage, stage_kwargs, out_uri, runtime, runtime.batch_size or 32)
