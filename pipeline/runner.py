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
from pipeline.config import ClassifyConfig, ConfigError, ExtractConfig, RuntimeConfig
from pipeline.sink import EMBEDDING_COLUMNS, EMBEDDINGS_DIR, ERRORS_DIR, Output, ParquetSink, write_run_record
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


def prepare_output(output_uri: str, overwrite: bool, subdirs: list[str]) -> None:
    """Refuse to mix a new run into existing output unless overwrite (which clears it first)."""
    storage.check_writable(output_uri)
    existing = []
    subdirs = [*subdirs, ERRORS_DIR]
    for sub in subdirs:
        uri = storage.join(output_uri, sub)
        if storage.exists(uri):
            existing += storage.list_files(uri)
    if not existing:
        return
    if not overwrite:
        raise ConfigError(
            f"output '{output_uri}' already holds {len(existing)} files under {', '.join(subdirs)}: pass "
            "--overwrite to replace them, or choose a new --output"
        )
    for sub in subdirs:
        uri = storage.join(output_uri, sub)
        if storage.exists(uri):
            storage.remove_tree(uri)


# --------------------------------------------------------------------------------------------------
# Ray wiring


def _init_ray(runtime: RuntimeConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=runtime.num_cpus, include_dashboard=False, log_to_driver=True)


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


def _run_stage(
    *,
    kind: str,
    source_cfg,
    runtime,
    output_uri: str,
    stage,
    stage_kwargs: dict[str, Any],
    outputs: list[Output],
    shards: list[Shard],
    skipped: int,
    t_start: float,
    extra: dict[str, Any],
    config: dict[str, Any],
    limit: int | None = None,
) -> dict[str, Any]:
    """Ray: shard read tasks -> actor pool running ``stage`` -> Parquet sink; returns the run summary."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    run_id = _new_run_id()
    started = datetime.now(timezone.utc).isoformat()
    t_validated = time.perf_counter()
    _init_ray(runtime)
    DataContext.get_current().enable_progress_bars = runtime.progress
    lo, hi = runtime.actor_range()
    ds = ray.data.read_datasource(_datasource(shards, source_cfg), num_cpus=0.25)
    if limit is not None:
        ds = ds.limit(limit)
    ds = ds.map_batches(
        stage,
        fn_constructor_kwargs={
            "device": runtime.device,
            "autocast": runtime.autocast,
            "max_pixels": runtime.max_pixels,
            "max_bytes": source_cfg.max_bytes,
            **stage_kwargs,
        },
        compute=ActorPoolStrategy(min_size=lo, max_size=hi),
        batch_size=runtime.batch_size,
        batch_format="pyarrow",
        num_cpus=runtime.cpus_per_actor,
        num_gpus=runtime.gpus_per_actor or None,
        udf_modifying_row_count=False,
    )
    datasink = _datasink(ParquetSink(output_uri, outputs=outputs))
    t_run = time.perf_counter()
    ds.write_datasink(datasink)
    t_done = time.perf_counter()

    res = datasink.result or {"embedded": 0, "failed": 0, "files": 0, "error_kinds": {}}
    inputs = res["embedded"] + res["failed"]
    run_s = t_done - t_run
    summary = {
        "run_id": run_id,
        "kind": kind,
        "started_at": started,
        "source": source_cfg.uri,
        "output": output_uri,
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
        "actors": {"min": lo, "max": hi, "cpus_per_actor": runtime.cpus_per_actor,
                   "gpus_per_actor": runtime.gpus_per_actor},
        **extra,
        "config": config,
    }
    summary["run_record"] = write_run_record(output_uri, run_id, summary)
    return summary


def _spec(backbone, i: int, dtype: str) -> dict[str, Any]:
    return {**backbone.spec(i), "dtype": dtype, "versions": versions()}


def extract(cfg: ExtractConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run an extraction; returns the run summary (also written to OUTPUT/_runs/<run_id>.json)."""
    t_start = time.perf_counter()
    # Validate everything on the driver, before Ray does any work.
    shards, skipped = list_shards(cfg.source)
    check_source(cfg.source, shards)
    spec = _spec(build_backbone(cfg.backbone, "cpu"), 0, cfg.output.dtype)
    outputs = [Output(EMBEDDINGS_DIR, EMBEDDING_COLUMNS, spec)]
    prepare_output(cfg.output.uri, overwrite, [o.subdir for o in outputs])
    return _run_stage(
        kind="extract", source_cfg=cfg.source, runtime=cfg.runtime, output_uri=cfg.output.uri,
        stage=_stage("Embedder"),
        stage_kwargs={"backbone": cfg.backbone.model_dump(), "dtype": cfg.output.dtype},
        outputs=outputs, shards=shards, skipped=skipped, t_start=t_start, extra={"spec": spec},
        config=json.loads(cfg.model_dump_json()),
    )


PREDICTIONS_DIR = "predictions"


def classify(cfg: ClassifyConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """The pretrained model as a classifier: ``OUTPUT/predictions/`` with top-k ImageNet classes per image."""
    t_start = time.perf_counter()
    shards, skipped = list_shards(cfg.source)
    check_source(cfg.source, shards)
    backbone_cfg = cfg.backbone.model_copy(update={"layer": "logits", "normalize": False})
    backbone = build_backbone(backbone_cfg, "cpu")
    spec = {**_spec(backbone, 0, "float32"), "top_k": cfg.top_k}
    columns = {"id": "id", "source": "source", "labels": "labels", "scores": "scores", "classes": "classes"}
    outputs = [Output(PREDICTIONS_DIR, columns, spec)]
    prepare_output(cfg.output.uri, overwrite, [PREDICTIONS_DIR])
    return _run_stage(
        kind="classify", source_cfg=cfg.source, runtime=cfg.runtime, output_uri=cfg.output.uri,
        stage=_stage("Classifier"),
        stage_kwargs={"backbone": backbone_cfg.model_dump(), "top_k": cfg.top_k},
        outputs=outputs, shards=shards, skipped=skipped, t_start=t_start, extra={"spec": spec},
        config=json.loads(cfg.model_dump_json()),
    )


def _stage(name: str):
    from pipeline import embed

    return getattr(embed, name)


def format_summary(s: dict[str, Any]) -> str:
    c, spec = s["counts"], s["spec"]
    done = "classified" if s.get("kind") == "classify" else "embedded"
    lines = [
        f"run {s['run_id']}: {c['inputs']} images -> {c['embedded']} {done}, {c['failed']} failed, "
        f"{c['skipped']} skipped (not images) in {s['timings']['total_s']:.1f}s "
        f"({s['images_per_s']} images/s over the Ray run, actor start-up included)",
    ]
    if s.get("kind") == "classify":
        lines.append(f"  predictions: {storage.join(s['output'], PREDICTIONS_DIR)} "
                     f"(top-{spec['top_k']} classes of {spec['model']})")
    else:
        lines.append(f"  embeddings: {storage.join(s['output'], EMBEDDINGS_DIR)} (dim {spec['dim']}, "
                     f"{spec['model']} @ {spec['layer']}, pool {spec['pool']})")
    if c["failed"]:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(s["error_kinds"].items()))
        lines.append(f"  errors:     {storage.join(s['output'], ERRORS_DIR)} ({kinds})")
    lines.append(f"  run record: {s['run_record']}")
    return "\n".join(lines)
