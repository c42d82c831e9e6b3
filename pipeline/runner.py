"""THE one module that wires Ray: shards -> Ray read tasks -> Embedder actor pool -> Parquet sink.

Everything that can fail because of the user's input (source, model, layer, weights, output) is checked on the
driver before Ray starts any work.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from pipeline import __version__, storage
from pipeline.backbones import build_backbone
from pipeline.config import ConfigError, ExtractConfig
from pipeline.sink import EMBEDDINGS_DIR, ERRORS_DIR, ParquetSink, write_run_record
from pipeline.sources import Shard, check_source, list_shards, read_shard


def versions() -> dict[str, str]:
    import pyarrow
    import timm
    import torch
    import torchvision

    out = {"pipeline": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
           "timm": timm.__version__, "pyarrow": pyarrow.__version__,
           "python": sys.version.split()[0]}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def prepare_output(output_uri: str, overwrite: bool) -> None:
    """Refuse to mix a new run into existing embeddings unless overwrite (which clears them first)."""
    storage.check_writable(output_uri)
    existing = []
    for sub in (EMBEDDINGS_DIR, ERRORS_DIR):
        uri = storage.join(output_uri, sub)
        if storage.exists(uri):
            existing += storage.list_files(uri)
    if not existing:
        return
    if not overwrite:
        raise ConfigError(
            f"output '{output_uri}' already holds {len(existing)} embedding/error files: pass --overwrite to "
            "replace them, or choose a new --output"
        )
    for sub in (EMBEDDINGS_DIR, ERRORS_DIR):
        uri = storage.join(output_uri, sub)
        if storage.exists(uri):
            storage.remove_tree(uri)


# --------------------------------------------------------------------------------------------------
# Ray wiring


def _init_ray(cfg: ExtractConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.runtime.num_cpus, include_dashboard=False, log_to_driver=True)


def _datasource(shards: list[Shard], source_cfg):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ShardDatasource(Datasource):
        """One read task per shard; rows stream out in small blocks of encoded bytes."""

        def __init__(self) -> None:
            super().__init__()

        def estimate_inmemory_data_size(self) -> int:
            return sum(s.size for s in shards)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            tasks = []
            for shard in shards:
                def read_fn(shard=shard):
                    yield from read_shard(shard, source_cfg)
                meta = BlockMetadata(num_rows=None, size_bytes=shard.size, input_files=list(shard.uris[:1]),
                                     exec_stats=None)
                tasks.append(ReadTask(read_fn, meta, per_task_row_limit=per_task_row_limit))
            return tasks

        def get_name(self) -> str:
            return "ReadShards"

    return ShardDatasource()


def _datasink(sink: ParquetSink):
    from ray.data.datasource import Datasink

    class EmbeddingDatasink(Datasink):
        def __init__(self) -> None:
            self.result: dict[str, Any] = {}

        def write(self, blocks, ctx) -> dict[str, Any]:
            import pyarrow as pa

            total: dict[str, Any] = {"embedded": 0, "failed": 0, "files": [], "error_kinds": {}}
            for block in blocks:
                if not isinstance(block, pa.Table):
                    block = pa.Table.from_pandas(block)
                s = sink.write(block)
                total["embedded"] += s["embedded"]
                total["failed"] += s["failed"]
                total["files"] += s["files"]
                for k, v in s["error_kinds"].items():
                    total["error_kinds"][k] = total["error_kinds"].get(k, 0) + v
            return total

        def on_write_complete(self, write_result) -> None:
            agg: dict[str, Any] = {"embedded": 0, "failed": 0, "files": 0, "error_kinds": {}}
            for r in write_result.write_returns:
                agg["embedded"] += r["embedded"]
                agg["failed"] += r["failed"]
                agg["files"] += len(r["files"])
                for k, v in r["error_kinds"].items():
                    agg["error_kinds"][k] = agg["error_kinds"].get(k, 0) + v
            self.result = agg

        @property
        def min_rows_per_write(self) -> int:
            return 1024

        def get_name(self) -> str:
            return "WriteParquet"

    return EmbeddingDatasink()


def extract(cfg: ExtractConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run an extraction; returns the run summary (also written to OUTPUT/_runs/<run_id>.json)."""
    t_start = time.perf_counter()
    run_id = _new_run_id()
    started = datetime.now(timezone.utc).isoformat()

    # 1. Validate everything on the driver, before Ray does any work.
    shards, skipped = list_shards(cfg.source)
    check_source(cfg.source, shards)
    backbone = build_backbone(cfg.backbone, "cpu")
    spec = {**backbone.spec(), "dtype": cfg.output.dtype, "versions": versions()}
    prepare_output(cfg.output.uri, overwrite)
    del backbone
    t_validated = time.perf_counter()

    # 2. Ray: read tasks -> actor pool -> sink.
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    _init_ray(cfg)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.runtime.progress
    lo, hi = cfg.runtime.actor_range()
    rt = cfg.runtime
    ds = ray.data.read_datasource(_datasource(shards, cfg.source), num_cpus=0.25)
    ds = ds.map_batches(
        _embedder_class(),
        fn_constructor_kwargs={
            "backbone": cfg.backbone.model_dump(),
            "device": rt.device,
            "autocast": rt.autocast,
            "dtype": cfg.output.dtype,
            "max_pixels": rt.max_pixels,
            "max_bytes": cfg.source.max_bytes,
        },
        compute=ActorPoolStrategy(min_size=lo, max_size=hi),
        batch_size=rt.batch_size,
        batch_format="pyarrow",
        num_cpus=rt.cpus_per_actor,
        num_gpus=rt.gpus_per_actor or None,
        udf_modifying_row_count=False,
    )
    datasink = _datasink(ParquetSink(cfg.output.uri, spec, cfg.output.dtype))
    t_run = time.perf_counter()
    ds.write_datasink(datasink)
    t_done = time.perf_counter()

    res = datasink.result or {"embedded": 0, "failed": 0, "files": 0, "error_kinds": {}}
    inputs = res["embedded"] + res["failed"]
    run_s = t_done - t_run
    summary = {
        "run_id": run_id,
        "started_at": started,
        "source": cfg.source.uri,
        "output": cfg.output.uri,
        "counts": {"inputs": inputs, "embedded": res["embedded"], "failed": res["failed"],
                   "skipped": skipped},
        "error_kinds": res["error_kinds"],
        "shards": len(shards),
        "files_written": res["files"],
        "timings": {
            "validate_s": round(t_validated - t_start, 3),
            "startup_s": round(t_run - t_validated, 3),
            "run_s": round(run_s, 3),
            "total_s": round(t_done - t_start, 3),
        },
        "images_per_s": round(inputs / run_s, 2) if run_s > 0 else None,
        "actors": {"min": lo, "max": hi, "cpus_per_actor": rt.cpus_per_actor,
                   "gpus_per_actor": rt.gpus_per_actor},
        "spec": spec,
        "config": json.loads(cfg.model_dump_json()),
    }
    summary["run_record"] = write_run_record(cfg.output.uri, run_id, summary)
    return summary


def _embedder_class():
    from pipeline.embed import Embedder

    return Embedder


def format_summary(s: dict[str, Any]) -> str:
    c = s["counts"]
    lines = [
        f"run {s['run_id']}: {c['inputs']} images -> {c['embedded']} embedded, {c['failed']} failed, "
        f"{c['skipped']} skipped (not images) in {s['timings']['total_s']:.1f}s "
        f"({s['images_per_s']} images/s after startup)",
        f"  embeddings: {storage.join(s['output'], EMBEDDINGS_DIR)} (dim {s['spec']['dim']}, "
        f"{s['spec']['model']} @ {s['spec']['layer']}, pool {s['spec']['pool']})",
    ]
    if c["failed"]:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(s["error_kinds"].items()))
        lines.append(f"  errors:     {storage.join(s['output'], ERRORS_DIR)} ({kinds})")
    lines.append(f"  run record: {s['run_record']}")
    return "\n".join(lines)
