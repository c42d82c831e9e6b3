"""Ray Data wiring: shards -> read tasks -> a stage on an actor pool -> Parquet sink.

``ShardDatasource`` makes one read task per shard (rows of encoded bytes; the read task tells the ledger
when it has read the whole shard); ``ParquetDatasink`` hands blocks to the Ray-free ``ParquetSink`` and
sums the typed ``WriteStats`` once. ``map_images`` connects them around a stage class (the Embedder);
``predict`` maps a head over stored embeddings; ``collect_labels`` reads only ids and labels.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasink, Datasource, ReadTask
from ray.data.exceptions import ExecutionTimeoutError

from pipeline import storage
from pipeline.output.ledger import Ledger
from pipeline.output.writer import ParquetSink, WriteStats
from pipeline.plan import READ_TASK_CPUS
from pipeline.ray import data_context, init_ray
from pipeline.sources import Shard, read_shard


def _read_shard(shard: Shard, source_cfg: Any, ledger: Ledger | None) -> Iterator[pa.Table]:
    rows = 0
    for table in read_shard(shard, source_cfg):
        rows += table.num_rows
        yield table
    if ledger is not None:  # the whole shard was read: its row count is final
        ledger.shard_read(shard.key, shard.version, rows, shard.first)


class ShardDatasource(Datasource):
    """One read task per shard; rows stream out in small blocks of encoded bytes.

    With ``ledger`` each read task records the shard's row count in that output's ledger.
    """

    def __init__(self, shards: list[Shard], source_cfg: Any, ledger: Ledger | None = None) -> None:
        super().__init__()
        self.shards = shards
        self.source_cfg = source_cfg
        self.ledger = ledger

    def estimate_inmemory_data_size(self) -> int:
        return sum(s.size for s in self.shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for shard in self.shards:
            meta = BlockMetadata(num_rows=None, size_bytes=shard.size, input_files=list(shard.uris[:1]),
                                 exec_stats=None)
            read = functools.partial(_read_shard, shard, self.source_cfg, self.ledger)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "ReadShards"


class ParquetDatasink(Datasink[WriteStats]):
    """Blocks of stage output -> ParquetSink files; staged parts are reported to the ledger as written."""

    def __init__(self, sink: ParquetSink, rows_per_write: int = 1024) -> None:
        self.sink = sink
        self.rows_per_write = rows_per_write
        self.result = WriteStats()

    def write(self, blocks: Any, ctx: Any) -> WriteStats:
        total = WriteStats()
        for block in blocks:
            if not isinstance(block, pa.Table):
                block = pa.Table.from_pandas(block)
            stats = self.sink.write(block)
            if self.sink.staged:
                Ledger(self.sink.output_uri, generation=self.sink.generation).parts_written(stats.parts)
            total = total + stats.without_parts()
        return total

    def on_write_complete(self, write_result: Any) -> None:
        self.result = WriteStats.total(write_result.write_returns)

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    def get_name(self) -> str:
        return "WriteParquet"


# Write tasks ask for no CPU: Ray Data reserves the actors' CPUs first, and a write task that asks for any
# of the rest waited for the whole actor pool to finish on a node the actors fill (2 CPUs: no shard
# committed before the last image was embedded). writers() caps how many run at once.
WRITE_TASK_CPUS = 0.0


def writers(actors: int) -> int:
    """Concurrent write tasks beside ``actors`` actors: one per two (each writes rows_per_file rows at a
    time, a fraction of what an actor embeds meanwhile), at least one."""
    return max(1, actors // 2)


def read_shards(shards: list[Shard], source_cfg: Any, ledger: Ledger | None = None) -> ray.data.Dataset:
    return ray.data.read_datasource(ShardDatasource(shards, source_cfg, ledger), num_cpus=READ_TASK_CPUS)


def map_images(stage: type, stage_kwargs: dict[str, Any], shards: list[Shard], source_cfg: Any, runtime: Any,
               sink: ParquetSink, *, limit: int | None = None, rows_per_file: int = 1024
               ) -> tuple[WriteStats, float]:
    """Run ``stage`` (a Ray-free callable class such as the Embedder, built once per actor with
    ``stage_kwargs``) over the shards' rows on an actor pool, into ``sink``; returns (the summed write
    stats, the perf_counter time the run started)."""
    init_ray(runtime)
    data_context(runtime)
    lo, hi = runtime.actor_range()
    calls = runtime.actor_calls()
    ds = read_shards(shards, source_cfg,
                     Ledger(sink.output_uri, generation=sink.generation) if sink.staged else None)
    if limit is not None:
        ds = ds.limit(limit)
    ds = ds.map_batches(
        stage,
        fn_constructor_kwargs=stage_kwargs,
        compute=ActorPoolStrategy(min_size=lo, max_size=hi, max_concurrent_calls_per_actor=calls,
                                  enable_true_multi_threading=calls > 1),
        batch_size=runtime.batch_size,
        batch_format="pyarrow",
        num_cpus=runtime.cpus_per_actor,
        num_gpus=runtime.gpus_per_actor or None,
        resources=runtime.actor_resources or None,
        udf_modifying_row_count=False,
    )
    datasink = ParquetDatasink(sink, rows_per_file)
    t_run = time.perf_counter()
    need = {"CPU": runtime.cpus_per_actor, "GPU": runtime.gpus_per_actor or 0, **runtime.actor_resources}
    with stall_guard(runtime, f"the {stage.__name__} actors", need):
        ds.write_datasink(datasink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS}, concurrency=writers(lo))
    return datasink.result, t_run


@contextlib.contextmanager
def stall_guard(runtime: Any, what: str, need: dict[str, float]) -> Iterator[None]:
    """Turn Ray Data's no-progress timeout into one error that names the stalled operator, what one of its
    workers asks for, what the cluster has free, and the settings to change; a rerun resumes."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - Ray Data may wrap the timeout
        cause = e
        while cause is not None and not isinstance(cause, ExecutionTimeoutError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        text = str(cause)
        running = [ln.strip(" -") for ln in text.splitlines() if ln.startswith("  - ")]
        asks = ", ".join(f"{k}: {v:g}" for k, v in need.items() if v)
        free = ", ".join(f"{k}: {v:g}" for k, v in sorted(ray.available_resources().items())
                         if not k.startswith(("node:", "memory", "object_store", "accelerator_type")))
        raise RuntimeError(
            f"no progress for {runtime.stall_timeout_s:g}s (runtime.stall_timeout_s): "
            f"{'; '.join(running) or 'the pipeline'} waiting; one of {what} asks for {{{asks}}}, the cluster "
            f"has {{{free or 'nothing'}}} free. Check `ray status`, lower the request "
            "(--set runtime.cpus_per_actor / --gpus-per-actor / runtime.actor_resources) or raise "
            "runtime.stall_timeout_s; rerunning resumes") from None


def predict(stage: type, stage_kwargs: dict[str, Any], files: list[storage.FileInfo], out_uri: str,
            runtime: Any, batch_size: int) -> int:
    """Map a head predictor over embeddings files into Parquet at ``out_uri`` (replaced); returns rows."""
    import pyarrow.dataset as pads

    init_ray(runtime)
    data_context(runtime)
    fs, _ = storage.get_fs(files[0].uri)
    lo, hi = runtime.actor_range()
    ds = ray.data.read_parquet([storage.get_fs(f.uri)[1] for f in files], filesystem=fs,
                               columns=["id", "embedding"])
    ds = ds.map_batches(
        stage, fn_constructor_kwargs=stage_kwargs, compute=ActorPoolStrategy(min_size=lo, max_size=hi),
        batch_size=batch_size, batch_format="pyarrow", num_cpus=runtime.cpus_per_actor,
        resources=runtime.actor_resources or None, udf_modifying_row_count=False,
    )
    out_fs, out_path = storage.get_fs(out_uri)
    if storage.exists(out_uri):
        storage.remove_tree(out_uri)
    ds.write_parquet(out_path, filesystem=out_fs, ray_remote_args={"num_cpus": WRITE_TASK_CPUS},
                     concurrency=writers(lo))
    return pads.dataset(out_path, filesystem=out_fs, format="parquet").count_rows()


def collect_labels(shards: list[Shard], source_cfg: Any, runtime: Any) -> tuple[list[str], list[str | None]]:
    """(ids, labels) of the readable rows, in one pass that keeps only id and label."""
    import pyarrow.compute as pc

    init_ray(runtime)
    ids: list[str] = []
    labels: list[str | None] = []
    ds = read_shards(shards, source_cfg).select_columns(["id", "label", "error_kind"])
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=65536):
        b = b.filter(pc.is_null(b.column("error_kind")))
        ids += b.column("id").to_pylist()
        labels += b.column("label").to_pylist()
    return ids, labels
