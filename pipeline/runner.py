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
from pipeline.backbones import Backbone, build_backbone, input_size
from pipeline.config import ClassifyConfig, ConfigError, ExtractConfig, ProbeConfig, RuntimeConfig
from pipeline.embed import compile_target
from pipeline.finetune import FinetuneConfig
from pipeline.ledger import Ledger
from pipeline.sink import (
    EMBEDDING_COLUMNS,
    EMBEDDINGS_DIR,
    ERRORS_DIR,
    PREDICTIONS_DIR,
    Output,
    ParquetSink,
    merge_actor_time,
    write_run_record,
)
from pipeline.sources import Shard, check_source, list_shards, read_shard


def versions() -> dict[str, str]:
    import pyarrow
    import timm
    import torch
    import torchvision

    # str(): torch.__version__ is a TorchVersion, and a spec holding one (the sink carries the spec into every
    # write task) makes each Ray worker that unpickles it import torch (about 450 MiB more RSS per process).
    out = {"pipeline": __version__, "torch": str(torch.__version__), "torchvision": torchvision.__version__,
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


def _comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of a spec that decides whether rows are interchangeable (library versions are not)."""
    return {k: v for k, v in spec.items() if k != "versions"}


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


def plan_output(output_uri: str, source_uri: str, outputs: list[Output], shards: list[Shard], *,
                overwrite: bool) -> tuple[list[Shard], dict[str, Any]]:
    """Decide what a run has to do at an output, from its ledger; returns (shards to run, plan counts).

    A rerun resumes: committed shards whose version is unchanged are skipped, and leftovers of an
    interrupted run are committed when complete or dropped. Shards that changed or left the source lose
    their old rows. An output made from another source or with another spec (model, weights, layer,
    pool, dtype...) is refused unless ``overwrite``, which clears it first.
    """
    storage.check_writable(output_uri)
    ledger = Ledger(output_uri)
    want = {"source": source_uri, "tables": {o.subdir: _comparable(o.spec) for o in outputs}}
    state = ledger.state()
    tables = [*[o.subdir for o in outputs], ERRORS_DIR]
    if overwrite:
        ledger.clear()
        for sub in tables:
            storage.remove_tree(storage.join(output_uri, sub))
    elif state is None:
        existing = [f for sub in tables if storage.exists(storage.join(output_uri, sub))
                    for f in storage.list_files(storage.join(output_uri, sub))]
        if existing:
            raise ConfigError(
                f"output '{output_uri}' already holds {len(existing)} files under {', '.join(tables)} "
                "that no run of this tool recorded: pass --overwrite to replace them, or choose a new "
                "--output"
            )
    elif state != want:
        diff = _differences(state, want)
        raise ConfigError(
            f"output '{output_uri}' holds rows made differently ({'; '.join(diff[:3])}"
            f"{'; ...' if len(diff) > 3 else ''}): pass --overwrite to replace them, or choose a new --output"
        )
    ledger.write_state(want)

    listed = {s.key: s for s in shards}
    committed = {} if overwrite else ledger.committed()
    recovered = 0
    for key in ledger.leftover_keys():
        if key in listed and key not in committed:
            entry = ledger.try_commit(key, version=listed[key].version)
            if entry:
                committed[key] = entry
                recovered += 1
    ledger.clear_staging()
    stale = [e for k, e in committed.items() if k not in listed or e["version"] != listed[k].version]
    for entry in stale:
        ledger.remove_shard(entry)
        del committed[entry["key"]]
    todo = [s for s in shards if s.key not in committed]
    done = list(committed.values())
    return todo, {
        "listed": len(shards), "to_run": len(todo), "done_before": len(done), "recovered": recovered,
        "removed_stale": len(stale),
        "rows_before": {"embedded": sum(e["embedded"] for e in done),
                        "failed": sum(e["failed"] for e in done)},
    }


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


def _datasource(shards: list[Shard], source_cfg, ledger_uri: str | None = None):
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
                    rows = 0
                    for table in read_shard(shard, source_cfg):
                        rows += table.num_rows
                        yield table
                    if ledger_uri is not None:  # the whole shard was read: its row count is final
                        ledger = Ledger(ledger_uri)
                        ledger.record_total(shard.key, shard.version, rows)
                        ledger.try_commit(shard.key, shard.version)
                meta = BlockMetadata(num_rows=None, size_bytes=shard.size, input_files=list(shard.uris[:1]),
                                     exec_stats=None)
                tasks.append(ReadTask(read_fn, meta, per_task_row_limit=per_task_row_limit))
            return tasks

        def get_name(self) -> str:
            return "ReadShards"

    return ShardDatasource()


def _datasink(sink: ParquetSink, rows_per_write: int = 1024):
    from ray.data.datasource import Datasink

    class EmbeddingDatasink(Datasink):
        def __init__(self) -> None:
            self.result: dict[str, Any] = {}

        def write(self, blocks, ctx) -> dict[str, Any]:
            import pyarrow as pa

            total: dict[str, Any] = {"embedded": 0, "failed": 0, "files": [], "error_kinds": {},
                                     "actor_time": {}}
            for block in blocks:
                if not isinstance(block, pa.Table):
                    block = pa.Table.from_pandas(block)
                s = sink.write(block)
                if sink.staged:
                    ledger = Ledger(sink.output_uri)
                    for part in s["parts"]:
                        ledger.record_part(part)
                    for key in {p["shard"] for p in s["parts"]}:
                        ledger.try_commit(key)
                total["embedded"] += s["embedded"]
                total["failed"] += s["failed"]
                total["files"] += s["files"]
                total["actor_time"] = merge_actor_time(total["actor_time"], s["actor_time"])
                for k, v in s["error_kinds"].items():
                    total["error_kinds"][k] = total["error_kinds"].get(k, 0) + v
            return total

        def on_write_complete(self, write_result) -> None:
            agg: dict[str, Any] = {"embedded": 0, "failed": 0, "files": 0, "error_kinds": {},
                                   "actor_time": {}}
            for r in write_result.write_returns:
                agg["actor_time"] = merge_actor_time(agg["actor_time"], r["actor_time"])
                agg["embedded"] += r["embedded"]
                agg["failed"] += r["failed"]
                agg["files"] += len(r["files"])
                for k, v in r["error_kinds"].items():
                    agg["error_kinds"][k] = agg["error_kinds"].get(k, 0) + v
            self.result = agg

        @property
        def min_rows_per_write(self) -> int:
            return rows_per_write

        def get_name(self) -> str:
            return "WriteParquet"

    return EmbeddingDatasink()


def _for_model(runtime: RuntimeConfig, backbone: Backbone) -> RuntimeConfig:
    """The runtime for this model, checked on the driver: the batch size resolved from the model's input size
    (when runtime.batch_size is unset), and a cut that runtime.compile cannot compile refused here rather
    than in every actor."""
    if runtime.compile:
        compile_target(backbone)
    return runtime.model_copy(update={"batch_size": runtime.batch_for(input_size(backbone.preprocessing))})


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
    plan: dict[str, Any] | None = None,
    partition: str | None = None,
    rows_per_file: int = 1024,
) -> dict[str, Any]:
    """Ray: shard read tasks -> actor pool running ``stage`` -> Parquet sink; returns the run summary.

    With a ``plan`` (from plan_output) the run goes through the shard ledger: rows are staged and each
    shard becomes visible when all its rows are written; without one (the probe) files are written in place.
    """
    run_id = _new_run_id()
    started = datetime.now(timezone.utc).isoformat()
    t_validated = time.perf_counter()
    lo, hi = runtime.actor_range()
    staged = plan is not None
    sink = ParquetSink(output_uri, outputs=outputs, staged=staged, partition=partition)
    if shards:
        res, t_run = _execute(runtime, source_cfg, stage, stage_kwargs, shards, sink, limit, rows_per_file)
    else:  # nothing new: no Ray at all
        res, t_run = {"embedded": 0, "failed": 0, "files": 0, "error_kinds": {}}, time.perf_counter()
    if staged:
        ledger = Ledger(output_uri, run_id)
        unfinished = [s.key for s in shards
                      if ledger.entry(s.key) is None and ledger.try_commit(s.key) is None]
        if unfinished:
            raise RuntimeError(
                f"{len(unfinished)} of {len(shards)} shards did not commit (first: {unfinished[0]}); "
                "rerun the same command to finish them"
            )
    t_done = time.perf_counter()
    inputs = res["embedded"] + res["failed"]
    run_s = t_done - t_run
    at = res.get("actor_time") or {}
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
        "images_per_s": round(inputs / run_s, 2) if run_s > 0 and inputs else None,
        "actor_time_s": {"decode": round(at.get("decode_s", 0.0), 3),
                         "forward": round(at.get("forward_s", 0.0), 3)},
        "gpu_utilization": (round(at["gpu_util_sum"] / at["gpu_util_rows"], 1)
                            if at.get("gpu_util_rows") else None),
        "actors": {"min": lo, "max": hi, "cpus_per_actor": runtime.cpus_per_actor,
                   "gpus_per_actor": runtime.gpus_per_actor, "batch_size": runtime.batch_size},
        **extra,
        "config": config,
    }
    if plan is not None:
        summary["ledger"] = {**plan, "ran": len(shards),
                             "output_rows": {"embedded": plan["rows_before"]["embedded"] + res["embedded"],
                                             "failed": plan["rows_before"]["failed"] + res["failed"]}}
        summary["ledger"].pop("rows_before")
        if partition:
            summary["partition"] = partition
    summary["run_record"] = write_run_record(output_uri, run_id, summary)
    return summary


def _execute(runtime, source_cfg, stage, stage_kwargs, shards, sink: ParquetSink, limit, rows_per_file):
    """Run the Ray Data pipeline; returns (aggregated write results, time the run started)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    _init_ray(runtime)
    DataContext.get_current().enable_progress_bars = runtime.progress
    lo, hi = runtime.actor_range()
    ledger_uri = sink.output_uri if sink.staged else None
    ds = ray.data.read_datasource(_datasource(shards, source_cfg, ledger_uri), num_cpus=0.25)
    if limit is not None:
        ds = ds.limit(limit)
    ds = ds.map_batches(
        stage,
        fn_constructor_kwargs={
            "device": runtime.device,
            "autocast": runtime.autocast,
            "max_pixels": runtime.max_pixels,
            "jpeg_draft": runtime.jpeg_draft,
            "decoder": runtime.decoder,
            "channels_last": runtime.channels_last,
            "compile": runtime.compile,
            "max_bytes": source_cfg.max_bytes,
            **stage_kwargs,
        },
        compute=ActorPoolStrategy(min_size=lo, max_size=hi,
                                  max_concurrent_calls_per_actor=runtime.actor_calls(),
                                  enable_true_multi_threading=runtime.actor_calls() > 1),
        batch_size=runtime.batch_size,
        batch_format="pyarrow",
        num_cpus=runtime.cpus_per_actor,
        num_gpus=runtime.gpus_per_actor or None,
        resources=runtime.actor_resources or None,
        udf_modifying_row_count=False,
    )
    datasink = _datasink(sink, rows_per_file)
    t_run = time.perf_counter()
    ds.write_datasink(datasink)
    return datasink.result or {"embedded": 0, "failed": 0, "files": 0, "error_kinds": {}}, t_run


def _spec(backbone, i: int, dtype: str) -> dict[str, Any]:
    return {**backbone.spec(i), "dtype": dtype, "versions": versions()}


def _partition(incremental: bool, run_date: str | None) -> str | None:
    if not incremental:
        if run_date:
            raise ConfigError("run_date only applies to --incremental runs: add --incremental or drop it")
        return None
    day = run_date or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    try:
        datetime.strptime(day, "%Y-%m-%d")
    except ValueError:
        raise ConfigError(f"run date '{day}' is not YYYY-MM-DD: fix --run-date") from None
    return f"run_date={day}"


def extract(cfg: ExtractConfig, *, overwrite: bool = False, incremental: bool = False,
            run_date: str | None = None) -> dict[str, Any]:
    """Run an extraction; returns the run summary (also written to OUTPUT/_runs/<run_id>.json).

    Reruns resume: shards the output already holds are skipped. ``incremental`` (the nightly mode) puts
    this run's rows under ``embeddings/run_date=YYYY-MM-DD/``.
    """
    t_start = time.perf_counter()
    # Validate everything on the driver, before Ray does any work.
    partition = _partition(incremental, run_date)
    shards, skipped = list_shards(cfg.source)
    check_source(cfg.source, shards)
    backbone = build_backbone(cfg.backbone, "cpu")
    runtime = _for_model(cfg.runtime, backbone)
    spec = _spec(backbone, 0, cfg.output.dtype)
    outputs = [Output(EMBEDDINGS_DIR, EMBEDDING_COLUMNS, spec)]
    todo, plan = plan_output(cfg.output.uri, cfg.source.uri, outputs, shards, overwrite=overwrite)
    return _run_stage(
        kind="extract", source_cfg=cfg.source, runtime=runtime, output_uri=cfg.output.uri,
        stage=_stage("Embedder"),
        stage_kwargs={"backbone": cfg.backbone.model_dump(), "dtype": cfg.output.dtype},
        outputs=outputs, shards=todo, skipped=skipped, t_start=t_start, extra={"spec": spec},
        config=json.loads(cfg.model_dump_json()), plan=plan, partition=partition,
        rows_per_file=cfg.output.rows_per_file,
    )


def classify(cfg: ClassifyConfig, *, overwrite: bool = False, incremental: bool = False,
             run_date: str | None = None) -> dict[str, Any]:
    """The pretrained model as a classifier: ``OUTPUT/predictions/`` with top-k ImageNet classes per image."""
    t_start = time.perf_counter()
    shards, skipped = list_shards(cfg.source)
    check_source(cfg.source, shards)
    backbone_cfg = cfg.backbone.model_copy(update={"layer": "logits", "normalize": False})
    backbone = build_backbone(backbone_cfg, "cpu")
    runtime = _for_model(cfg.runtime, backbone)
    spec = {**_spec(backbone, 0, "float32"), "top_k": cfg.top_k}
    columns = {"id": "id", "source": "source", "labels": "labels", "scores": "scores", "classes": "classes"}
    outputs = [Output(PREDICTIONS_DIR, columns, spec)]
    partition = _partition(incremental, run_date)
    todo, plan = plan_output(cfg.output.uri, cfg.source.uri, outputs, shards, overwrite=overwrite)
    return _run_stage(
        kind="classify", source_cfg=cfg.source, runtime=runtime, output_uri=cfg.output.uri,
        stage=_stage("Classifier"),
        stage_kwargs={"backbone": backbone_cfg.model_dump(), "top_k": cfg.top_k},
        outputs=outputs, shards=todo, skipped=skipped, t_start=t_start, extra={"spec": spec},
        config=json.loads(cfg.model_dump_json()), plan=plan, partition=partition,
        rows_per_file=cfg.output.rows_per_file,
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
    at = s.get("actor_time_s") or {}
    if at.get("decode") or at.get("forward"):
        busy = at["decode"] + at["forward"]
        gpu = f", GPU {s['gpu_utilization']:.0f}% busy" if s.get("gpu_utilization") is not None else ""
        lines.append(f"  actors:     {s['actors']['max']} x {s['actors']['cpus_per_actor']:g} CPU; decode "
                     f"{at['decode']:.1f}s + model {at['forward']:.1f}s of actor time "
                     f"({at['forward'] / busy:.0%} in the model){gpu}")
    if c["failed"]:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(s["error_kinds"].items()))
        lines.append(f"  errors:     {storage.join(s['output'], ERRORS_DIR)} ({kinds})")
    if "ledger" in s:
        g = s["ledger"]
        note = f"{g['ran']} of {g['listed']} shards ran, {g['done_before']} already done"
        if g["recovered"]:
            note += f" ({g['recovered']} finished from an interrupted run)"
        if g["removed_stale"]:
            note += f", {g['removed_stale']} changed or gone shards replaced"
        rows = g["output_rows"]
        lines.append(f"  ledger:     {note}; the output now holds {rows['embedded']} rows, "
                     f"{rows['failed']} errors" + (f"; this run under {s['partition']}/" if s.get("partition")
                                                   else ""))
    lines.append(f"  run record: {s['run_record']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Heads: predict over stored embeddings with Ray; the probe sweep


def predict(head_uri: str, embeddings_uri: str, output_uri: str, *, top_k: int = 1,
            runtime: RuntimeConfig | None = None, partition: str | None = None) -> dict[str, Any]:
    """Apply a trained head to stored embeddings as a Ray Data map: ``OUTPUT/predictions/*.parquet``
    (id, label, score[, top_labels, top_scores]). Refuses embeddings whose spec differs from the head's.
    With ``partition`` (``run_date=YYYY-MM-DD``) only that folder under predictions/ is replaced."""
    from pipeline.heads import EmbeddingReader, HeadPredictor

    runtime = runtime or RuntimeConfig()
    t_start = time.perf_counter()
    predictor = HeadPredictor(head_uri, top_k=top_k)  # loads and validates the head on the driver
    reader = EmbeddingReader(embeddings_uri)
    predictor.check_spec(reader.spec)
    del predictor

    import ray
    from ray.data import ActorPoolStrategy, DataContext

    _init_ray(runtime)
    DataContext.get_current().enable_progress_bars = runtime.progress
    fs, _ = storage.get_fs(reader.uri)
    paths = [storage.get_fs(f.uri)[1] for f in reader.files]
    lo, hi = runtime.actor_range()
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["id", "embedding"])
    ds = ds.map_batches(
        _predictor_class(), fn_constructor_kwargs={"head_uri": head_uri, "top_k": top_k},
        compute=ActorPoolStrategy(min_size=lo, max_size=hi), batch_size=max(runtime.batch_size or 0, 1024),
        batch_format="pyarrow", num_cpus=runtime.cpus_per_actor, resources=runtime.actor_resources or None,
        udf_modifying_row_count=False,
    )
    out_uri = storage.join(output_uri, PREDICTIONS_DIR, *([partition] if partition else []))
    out_fs, out_path = storage.get_fs(out_uri)
    if storage.exists(out_uri):
        storage.remove_tree(out_uri)
    ds.write_parquet(out_path, filesystem=out_fs)
    t_done = time.perf_counter()
    import pyarrow.dataset as pads

    rows = pads.dataset(out_path, filesystem=out_fs, format="parquet").count_rows()
    summary = {"kind": "predict", "head": head_uri, "embeddings": reader.uri, "predictions": out_uri,
               "rows": rows,
               "total_s": round(t_done - t_start, 3)}
    summary["run_record"] = write_run_record(output_uri, _new_run_id(), summary)
    return summary


def _predictor_class():
    from pipeline.heads import HeadPredictor

    return HeadPredictor


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _forward_cost_ms(backbone, layers: list[str], batch: int = 8, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per image of a forward pass cut at each layer (CPU, batch of 8): the extraction cost."""
    import torch

    from pipeline.backbones import input_size, make_capture

    h, w = input_size(backbone.preprocessing)
    x = torch.randn(batch, 3, h, w)
    out = {}
    for layer in layers:
        capture = make_capture(backbone.model, backbone.model_name, [layer])
        times = []
        with torch.inference_mode():
            capture(x)
            for _ in range(repeats):
                t = time.perf_counter()
                capture(x)
                times.append(time.perf_counter() - t)
        out[layer] = round(1000 * sorted(times)[len(times) // 2] / batch, 3)
    return out


def probe(cfg: ProbeConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Which backbone and layer are best for these labels: extract each model's candidate layers in one
    pass over the images, train the same head on each, rank by validation accuracy.

    Writes ``OUTPUT/<model>/<layer>/embeddings/`` and ``.../head/`` per candidate, ``OUTPUT/probe.json`` and
    ``OUTPUT/probe.png``.
    """
    from pipeline.backbones import stage_names
    from pipeline.config import BackboneConfig
    from pipeline.embed import embedding_column
    from pipeline.heads import HeadTrainConfig, train_head
    from pipeline.sources import sample_shards

    t_start = time.perf_counter()
    shards, skipped = list_shards(cfg.source)
    check_source(cfg.source, shards)
    limit = None
    if cfg.sample:
        sampled = sample_shards(shards, cfg.sample, cfg.source.files_per_shard)
        if sampled is None:
            limit = cfg.sample
        else:
            shards = sampled

    plans = []
    for model in cfg.models:
        bcfg = BackboneConfig(model=model, weights=cfg.weights, pool=cfg.pool)
        if cfg.layers == ["all"]:
            from pipeline.backbones import create_model

            layers = [*stage_names(create_model(model, "none")[0], model), "final", "logits"]
        else:
            layers = list(cfg.layers)
        backbone = build_backbone(bcfg, "cpu", layers)  # validates every layer and pooling up front
        runtime = _for_model(cfg.runtime, backbone)
        outputs = [
            Output(f"{_slug(model)}/{layer}/{EMBEDDINGS_DIR}",
                   {**EMBEDDING_COLUMNS, "embedding": embedding_column(i, len(layers))},
                   _spec(backbone, i, "float32"))
            for i, layer in enumerate(layers)
        ]
        plans.append((model, bcfg, layers, backbone.dims, outputs, _forward_cost_ms(backbone, layers),
                      runtime))
        del backbone
    subdirs = [o.subdir for p in plans for o in p[4]]
    prepare_output(cfg.output.uri, overwrite, subdirs)

    results, runs = [], []
    for model, bcfg, layers, dims, outputs, cost, runtime in plans:
        model_out = storage.join(cfg.output.uri, _slug(model))
        s = _run_stage(
            kind="probe-extract", source_cfg=cfg.source, runtime=runtime, output_uri=cfg.output.uri,
            stage=_stage("Embedder"), stage_kwargs={"backbone": bcfg.model_dump(), "layers": layers},
            outputs=outputs, shards=shards, skipped=skipped, t_start=time.perf_counter(),
            extra={"model": model, "layers": layers}, config=json.loads(cfg.model_dump_json()), limit=limit,
        )
        runs.append(s["run_id"])
        for layer, dim in zip(layers, dims):
            layer_dir = storage.join(model_out, layer)
            head = train_head(HeadTrainConfig(
                embeddings=layer_dir, output=storage.join(layer_dir, "head"), head=cfg.head,
                val_fraction=cfg.val_fraction, epochs=cfg.epochs), progress=False)
            val = head["metrics"]["validation"] or {}
            results.append({
                "model": model, "layer": layer, "dim": dim,
                "accuracy": val.get("accuracy"), "macro_f1": val.get("macro_f1"),
                "train_accuracy": (head["metrics"]["train"] or {}).get("accuracy"),
                "forward_ms_per_image": cost[layer],
                "train_rows": head["split"]["train"], "val_rows": head["split"]["validation"],
                "head": storage.join(layer_dir, "head"),
            })
            if progress:
                print(f"probe: {model} @ {layer:<10} dim {dim:<5} val accuracy {val.get('accuracy', 0):.3f} "
                      f"macro-F1 {val.get('macro_f1', 0):.3f}", file=sys.stderr)

    ranked = [r for r in results if r["accuracy"] is not None]
    if not ranked:
        raise ConfigError("no layer could be evaluated: the sample has no validation rows; raise --sample")
    best = max(ranked, key=lambda r: (r["accuracy"], r["macro_f1"] or 0, -r["forward_ms_per_image"]))
    report = {
        "best": {k: best[k] for k in ("model", "layer", "dim", "accuracy", "macro_f1")},
        "results": results,
        "head": cfg.head,
        "runs": runs,
        "total_s": round(time.perf_counter() - t_start, 3),
        "config": json.loads(cfg.model_dump_json()),
    }
    storage.write_bytes(storage.join(cfg.output.uri, "probe.json"), json.dumps(report, indent=2).encode())
    storage.write_bytes(storage.join(cfg.output.uri, "probe.png"), _probe_png(results, best))
    report["probe_json"] = storage.join(cfg.output.uri, "probe.json")
    return report


def _probe_png(results: list[dict[str, Any]], best: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['layer']} ({r['dim']})" for r in results]
    acc = [r["accuracy"] or 0 for r in results]
    f1 = [r["macro_f1"] or 0 for r in results]
    cost = [r["forward_ms_per_image"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(results) + 4), 4.5))
    xs = range(len(results))
    ax1.bar([x - 0.2 for x in xs], acc, 0.4, label="validation accuracy")
    ax1.bar([x + 0.2 for x in xs], f1, 0.4, label="macro-F1")
    bi = results.index(best)
    ax1.annotate("best", (bi, acc[bi]), ha="center", va="bottom", fontweight="bold")
    ax1.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=8)
    ax1.set_ylim(0, 1.2)
    ax1.set_title("head quality per cut")
    ax1.legend(loc="upper right", ncol=2, fontsize=8)
    ax2.scatter(cost, acc)
    for r, c, a in zip(results, cost, acc):
        ax2.annotate(r["layer"], (c, a), fontsize=8)
    ax2.set_xlabel("forward cost to the cut (ms/image, CPU)")
    ax2.set_ylabel("validation accuracy")
    ax2.set_title("accuracy vs extraction cost")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Fine-tuning: Ray Train


def _collect_labels(shards: list[Shard], source_cfg, runtime) -> tuple[list[str], list[str | None]]:
    """(ids, labels) of the readable rows: from the listing for loose files with --labels folder, else one
    Ray Data pass over the shards that keeps only id and label (bytes are dropped inside the read tasks)."""
    import pyarrow.compute as pc

    from pipeline.finetune import folder_labels

    if shards[0].format == "files" and source_cfg.labels == "folder":
        return folder_labels(shards)
    import ray

    _init_ray(runtime)
    ds = ray.data.read_datasource(_datasource(shards, source_cfg), num_cpus=0.25)
    ids: list[str] = []
    labels: list[str | None] = []
    for b in ds.select_columns(["id", "label", "error_kind"]).iter_batches(batch_format="pyarrow",
                                                                          batch_size=65536):
        b = b.filter(pc.is_null(b.column("error_kind")))
        ids += b.column("id").to_pylist()
        labels += b.column("label").to_pylist()
    return ids, labels


def _train_storage(uri: str):
    """(storage_path, storage_filesystem) for Ray Train: a local path, or a pyarrow wrapper around the
    project's fsspec filesystem (s3:// with the AWS environment, gs://...)."""
    fs, path = storage.get_fs(uri)
    if storage.protocol_of(uri) == "file":
        return path, None
    import pyarrow.fs as pafs

    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _finetune_data_config():
    from ray.train import DataConfig

    class TrainValSplit(DataConfig):
        """Training rows split equally across workers (every DDP worker takes the same number of steps);
        validation rows split without dropping any (each worker evaluates its part, the sums are reduced)."""

        def __init__(self) -> None:
            super().__init__(datasets_to_split=["train"])

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != "val"}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                val = datasets["val"]
                if val.name is None:
                    val.set_name("val")
                val = val.copy(val)
                val.context.execution_options = self._resolve_execution_options("val")
                hints = worker_node_ids if self._enable_shard_locality else None
                for i, it in enumerate(val.streaming_split(world_size, equal=False, locality_hints=hints)):
                    out[i]["val"] = it
            return out

    return TrainValSplit()


def _finetune_collate(decoder):
    from ray.data.collate_fn import ArrowBatchCollateFn

    class DecodeCollate(ArrowBatchCollateFn):
        """Encoded rows -> augmented image tensors, decoded in the training worker."""

        def __call__(self, batch):
            return decoder(batch)

    return DecodeCollate()


def _finetune_worker(config: dict[str, Any]) -> None:
    """Ray Train loop, run by every worker: resume from the last checkpoint if any, evaluate once before
    training (epoch 0), then train/evaluate each epoch and checkpoint (rank 0 writes, all report)."""
    import contextlib
    import tempfile

    import ray.train
    import ray.train.torch
    import torch

    from pipeline import finetune as F

    cfg = F.FinetuneConfig.model_validate(config["cfg"])
    tc, rc = cfg.train, cfg.runtime
    classes: list[str] = config["classes"]
    k = len(classes)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    tm = F.build_training_model(cfg, classes)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "classes": classes,
                             "classifier": tm.classifier, "fingerprint": config["fingerprint"],
                             "weights_source": tm.weights_source, "weights_sha256": tm.weights_sha256,
                             "frozen": {"until": tc.freeze_until, "tensors": len(tm.frozen_keys),
                                        "parameters": sum(p.numel() for p in tm.model.parameters()
                                                          if not p.requires_grad)},
                             "trainable_parameters": sum(p.numel() for p in tm.model.parameters()
                                                         if p.requires_grad)}
    ckpt = ray.train.get_checkpoint()
    with (ckpt.as_directory() if ckpt else contextlib.nullcontext(None)) as restored:
        if restored:
            state = F.load_checkpoint_state(restored)
            F.load_checkpoint_model(restored, tm.model)
        model = ray.train.torch.prepare_model(tm.model)  # to the worker's device; DDP when world > 1
        optimizer = F.make_optimizer(tm, cfg.model, tc)
        if restored:
            F.load_checkpoint_optimizer(restored, optimizer)
            for g in optimizer.param_groups:  # the schedule follows this run's lr
                g["base_lr"] = tc.lr * g["lr_scale"]

    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and rc.autocast == "fp16" else None
    decode = {"max_pixels": rc.max_pixels, "max_bytes": cfg.source.max_bytes}
    train_collate = _finetune_collate(F.BatchDecoder(tm.train_transform, classes, tm.input_size, **decode))
    val_collate = _finetune_collate(F.BatchDecoder(tm.eval_transform, classes, tm.input_size, **decode))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    total_steps = config["steps_per_epoch"] * tc.epochs

    def validate():
        if val_shard is None:
            return None
        batches = val_shard.iter_torch_batches(batch_size=tc.batch_size, collate_fn=val_collate)
        return F.all_reduce(F.evaluate(model, batches, k, device=device, autocast=rc.autocast), k, device)

    def say(entry):
        if rank == 0 and config["progress"]:
            sys.stderr.write(F.epoch_line(entry, tc.epochs) + "\n")  # not print: Ray Train patches it
            sys.stderr.flush()

    state["runs"] = [*state.get("runs", []), {"run_id": config["run_id"], "start_epoch": state["epoch"]}]
    if not state["history"]:
        F.seed_everything(tc.seed, 0, rank)
        t0 = time.perf_counter()
        va = validate()
        state["history"].append({"epoch": 0, **(va.metrics("val") if va else {}),
                                 "seconds": round(time.perf_counter() - t0, 3), "run_id": config["run_id"]})
        say(state["history"][0])
    for epoch in range(state["epoch"] + 1, tc.epochs + 1):
        shuffle_seed = F.seed_everything(tc.seed, epoch, rank)
        t0 = time.perf_counter()
        batches = train_shard.iter_torch_batches(
            batch_size=tc.batch_size, collate_fn=train_collate,
            local_shuffle_buffer_size=max(tc.batch_size, tc.shuffle_buffer), local_shuffle_seed=shuffle_seed)
        sums, step = F.train_epoch(model, batches, optimizer, loss_fn, device=device, step=state["step"],
                                   total_steps=total_steps, stat_modules=tm.stat_modules,
                                   autocast=rc.autocast, scaler=scaler)
        tr = F.all_reduce(sums, k, device)
        t_train = time.perf_counter() - t0
        va = validate()
        entry = {"epoch": epoch, **tr.metrics("train"), **(va.metrics("val") if va else {}),
                 "seconds": round(time.perf_counter() - t0, 3), "train_seconds": round(t_train, 3),
                 "lr": max(g["lr"] for g in optimizer.param_groups), "steps": step - state["step"],
                 "run_id": config["run_id"]}
        state.update(epoch=epoch, step=step, history=[*state["history"], entry],
                     val_confusion=va.confusion.tolist() if va else None)
        say(entry)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                F.save_checkpoint(d, model, optimizer, state)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            metrics = {key: v for key, v in entry.items() if isinstance(v, (int, float)) and v is not None}
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=F.checkpoint_name(epoch))


def finetune(cfg: FinetuneConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fine-tune a pretrained backbone on labelled images with Ray Train (DDP over ``runtime.workers``).

    Checkpoints go to ``OUTPUT/checkpoints/epoch-NNNN/`` every epoch; a rerun into the same output continues
    from the last one (``--overwrite`` starts over). Writes ``OUTPUT/backbone.safetensors`` (for `extract
    --weights`), ``OUTPUT/head/`` (for `heads predict` on embeddings of that backbone at --layer final),
    ``OUTPUT/finetune.json`` and ``OUTPUT/report.png``; returns finetune.json's content.
    """
    import math

    from pipeline import finetune as F

    t_start = time.perf_counter()
    run_id = _new_run_id()
    out = cfg.output.uri
    # Everything the user can get wrong is checked before Ray starts: source, model, weights, freeze layer.
    shards, skipped = list_shards(cfg.source)
    check_source(cfg.source, shards)
    del F.build_training_model(cfg).model  # validates model, weights and freeze_until
    storage.check_writable(out)
    if overwrite:
        for name in (F.CHECKPOINTS_DIR, *F.ARTIFACTS):
            uri = storage.join(out, name)
            if storage.exists(uri):
                storage.remove_tree(uri)
    latest = F.latest_checkpoint(out)
    done = [a for a in (F.BACKBONE_FILE, F.FINETUNE_JSON) if storage.exists(storage.join(out, a))]
    if latest is None and done:
        raise ConfigError(f"output '{out}' already holds a fine-tuned model ({', '.join(done)}) but no "
                          "checkpoints to continue from: pass --overwrite to replace it, or choose a new "
                          "--output")

    ids, labels = _collect_labels(shards, cfg.source, cfg.runtime)
    split = F.make_split(ids, labels, cfg.train.val_fraction)
    fingerprint = F.resume_fingerprint(cfg, split.classes)
    if latest is not None:
        diff = F.resume_differences(latest[1].get("fingerprint") or {}, fingerprint)
        if diff:
            raise ConfigError(f"output '{out}' holds checkpoints of a different fine-tuning run "
                              f"({'; '.join(diff)}): pass --overwrite to start over, or choose a new "
                              "--output")
        if progress:
            todo = "" if latest[1]["epoch"] < cfg.train.epochs else \
                "; nothing left to train, the artifacts are written from it"
            print(f"finetune: resuming from {latest[0]} (epoch {latest[1]['epoch']} of "
                  f"{cfg.train.epochs}{todo})", file=sys.stderr)
    if split.train_rows < cfg.runtime.workers:
        raise ConfigError(f"only {split.train_rows} training images for {cfg.runtime.workers} workers: add "
                          "images or lower --workers")

    import ray
    from ray.data import DataContext
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t_validated = time.perf_counter()
    _init_ray(cfg.runtime)
    DataContext.get_current().enable_progress_bars = cfg.runtime.progress and progress
    train_shards = F.mixed_shards(shards, cfg.source.files_per_shard)
    rows = ray.data.read_datasource(_datasource(train_shards, cfg.source), num_cpus=0.25)
    datasets = {"train": rows.map_batches(F.select_rows, fn_kwargs={"which": "train", "split": split},
                                          batch_format="pyarrow", num_cpus=0.25)}
    if split.val_rows:
        datasets["val"] = rows.map_batches(F.select_rows, fn_kwargs={"which": "val", "split": split},
                                           batch_format="pyarrow", num_cpus=0.25)
    rt = cfg.runtime
    steps_per_epoch = max(1, math.ceil((split.train_rows // rt.workers) / cfg.train.batch_size))
    path, fs = _train_storage(out)
    trainer = TorchTrainer(
        _finetune_worker,
        train_loop_config={"cfg": json.loads(cfg.model_dump_json()), "classes": split.classes,
                           "fingerprint": fingerprint, "run_id": run_id, "has_val": bool(split.val_rows),
                           "steps_per_epoch": steps_per_epoch, "progress": progress and rt.progress},
        scaling_config=ScalingConfig(
            num_workers=rt.workers, use_gpu=rt.gpus_per_worker > 0,
            resources_per_worker={"CPU": rt.cpus_per_worker,
                                  **({"GPU": rt.gpus_per_worker} if rt.gpus_per_worker else {})}),
        run_config=RunConfig(
            name=F.CHECKPOINTS_DIR, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=rt.max_failures),
            logging_config=LoggingConfig(log_level="INFO" if progress and rt.progress else "WARNING")),
        datasets=datasets,
        dataset_config=_finetune_data_config(),
    )
    t_run = time.perf_counter()
    result = trainer.fit()
    t_done = time.perf_counter()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    from safetensors.torch import load_file

    with result.checkpoint.as_directory() as d:
        state = F.load_checkpoint_state(d)
        model_state = load_file(os.path.join(d, F.CKPT_MODEL))
    new_epochs = [h["epoch"] for h in state["history"] if h.get("run_id") == run_id and h["epoch"] > 0]
    this_run = [r for r in state.get("runs", []) if r["run_id"] == run_id]
    extra = {
        "run_id": run_id,
        "resumed_from_epoch": this_run[0]["start_epoch"] if this_run else int(state["epoch"]),
        "runs": state.get("runs", []),
        "epochs_this_run": new_epochs,
        "frozen": state.get("frozen"),
        "trainable_parameters": state.get("trainable_parameters"),
        "workers": rt.workers,
        "steps_per_epoch": steps_per_epoch,
        "checkpoints": storage.join(out, F.CHECKPOINTS_DIR),
        "last_checkpoint": F.checkpoint_name(state["epoch"]),
        "skipped_files": skipped,
        "timings": {"validate_s": round(t_validated - t_start, 3), "startup_s": round(t_run - t_validated, 3),
                    "train_s": round(t_done - t_run, 3), "total_s": round(time.perf_counter() - t_start, 3)},
        "versions": versions(),
    }
    report = F.write_artifacts(cfg, model_state, state, split, extra)
    record = {"kind": "finetune", **{k: v for k, v in report.items() if k != "epochs"},
              "epochs": state["history"]}
    report["run_record"] = write_run_record(out, run_id, record)
    return report
