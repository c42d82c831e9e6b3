"""What the commands that map images through the Embedder share: run ids, library versions, the nightly
partition, the runtime resolved for a model, one run from shards to a run record, and its text summary."""

from __future__ import annotations

import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline import storage
from pipeline.backbone import Backbone, check_compilable
from pipeline.backbone.models import BackboneError, input_size
from pipeline.config import ConfigError, RuntimeConfig, SourceConfig
from pipeline.embed import Embedder, EmbedderSpec
from pipeline.output.layout import EMBEDDINGS_DIR, ERRORS_DIR, PREDICTIONS_DIR
from pipeline.output.ledger import Ledger, Work
from pipeline.output.spec import package_version
from pipeline.output.writer import Output, ParquetSink, WriteStats, write_run_record
from pipeline.plan import Decision, plan_images
from pipeline.sources import Shard


def versions() -> dict[str, str]:
    import pyarrow
    import timm
    import torch
    import torchvision

    # str(): torch.__version__ is a TorchVersion, and a spec holding one (the sink carries the spec into every
    # write task) makes each Ray worker that unpickles it import torch (about 450 MiB more RSS per process).
    out = {"pipeline": package_version("pipeline"), "torch": str(torch.__version__),
           "torchvision": torchvision.__version__, "timm": timm.__version__, "pyarrow": pyarrow.__version__,
           "python": sys.version.split()[0]}
    ray = package_version("ray")  # from its metadata: Ray itself is imported only under pipeline/ray/
    if ray != "unknown":
        out["ray"] = ray
    return out


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def partition_for(incremental: bool, run_date: str | None) -> str | None:
    """``run_date=YYYY-MM-DD`` for an incremental run (default today, UTC); None otherwise."""
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


def estimated_images(shards: list[Shard]) -> int:
    """Images the shards hold: counted for loose files, estimated from the bytes for .tar/Parquet shards."""
    return sum(s.count if s.loose else max(1, s.size // 100_000) for s in shards)


class Planner:
    """What the planner (pipeline/plan.py) needs of one model on this cluster, measured once on the driver:
    the cluster's shape, whether the cut compiles, how much of fp32 each bf16 mode keeps (where a bf16 plan
    is possible), one image's largest activation and FLOPs; ``plan`` is then pure. A cut that
    runtime.compile cannot compile is refused here, a request the cluster can never satisfy by ``plan``."""

    def __init__(self, runtime: RuntimeConfig, backbone: Backbone) -> None:
        from pipeline.backbone.inference import activation_bytes, precision_agreement
        from pipeline.preprocess.tensorprep import TensorPrepError, TensorTransform
        from pipeline.ray.cluster import cluster_shape

        self.runtime = runtime
        compilable = True
        if runtime.compile is True:
            check_compilable(backbone)
        else:
            try:
                check_compilable(backbone)
            except BackboneError:
                compilable = False
        self.cluster = cluster_shape(runtime)
        bf16_possible = runtime.autocast == "auto" and (self.cluster.cpu_bf16 or self.cluster.gpu_nodes())
        try:
            TensorTransform.from_transform(backbone.transform)
            tensor_decodable = True
        except TensorPrepError:
            tensor_decodable = False
        self.measured = {
            "input_hw": input_size(backbone.preprocessing), "compilable": compilable,
            "agreement": precision_agreement(backbone) if bf16_possible else None,
            "tensor_decodable": tensor_decodable,
            "model_bytes": sum(p.numel() * p.element_size() for p in backbone.model.parameters()),
            "activations": activation_bytes(backbone) if runtime.forward_batch is None else None,
            "flops": backbone.image_flops() if runtime.actors is None else 0}

    def plan(self, images: int, wait: bool = True) -> Decision:
        """The runtime for a run over ``images``; with ``wait``, on an autoscaling cluster, waits for a node
        that fits one actor."""
        from pipeline.ray.cluster import wait_for

        decision = plan_images(self.cluster, self.runtime, images=images, **self.measured)
        if wait and decision.waits_for:
            wait_for(decision.waits_for, decision.runtime, "actor",
                     "--gpus-per-actor, --set runtime.cpus_per_actor or --set runtime.actor_resources")
        return decision


def plan_for(runtime: RuntimeConfig, backbone: Backbone, images: int) -> Decision:
    """The runtime for this model on this cluster over ``images`` (Planner: measured, checked, planned)."""
    return Planner(runtime, backbone).plan(images)


@dataclass
class ImageRun:
    """One pass of a stage over shards into an output (extract, classify, one model of a probe)."""

    kind: str
    source: SourceConfig
    runtime: RuntimeConfig
    output_uri: str
    stage: EmbedderSpec  # what each actor's Embedder is built from, with the planned runtime
    outputs: list[Output]
    config: dict[str, Any]
    extra: dict[str, Any]
    decision: Decision | None = None  # the resource plan, recorded in the run summary
    rows_per_file: int = 1024
    work: Work | None = None  # from the ledger; None: files written in place (the probe)
    partition: str | None = None
    limit: int | None = None
    run_id: str = ""  # given when the run took the output's lease under it
    lease: Any = None  # that lease (pipeline.output.lease.Lease): checked before the run's end is committed

    def run(self, shards: list[Shard], skipped: int, t_start: float) -> dict[str, Any]:
        """Ray: shard read tasks -> actor pool running the stage -> Parquet sink; returns the run summary
        (also written to OUTPUT/_runs/<run_id>.json). Through the ledger when planned: rows are staged
        and each shard becomes visible when all its rows are written."""
        run_id = self.run_id or new_run_id()
        started = datetime.now(timezone.utc).isoformat()
        t_validated = time.perf_counter()
        staged = self.work is not None
        ledger = self.work.ledger.with_run(run_id) if staged and self.work.ledger is not None else None
        sink = ParquetSink(self.output_uri, outputs=self.outputs, staged=staged, partition=self.partition,
                           generation=ledger.generation if ledger is not None else "")
        if shards:
            from pipeline.ray.data import map_images

            stats, t_run = map_images(Embedder, {"spec": self.stage}, shards, self.source, self.runtime, sink,
                                      limit=self.limit, rows_per_file=self.rows_per_file)
        else:  # nothing new: no Ray at all
            stats, t_run = WriteStats(), time.perf_counter()
        if self.lease is not None:
            self.lease.check()
        if staged:
            (ledger or Ledger(self.output_uri, run_id)).finish([s.key for s in shards],
                                                              tables=[o.subdir for o in self.outputs])
        t_done = time.perf_counter()
        summary = self._summary(run_id, started, stats, len(shards), skipped,
                                (t_start, t_validated, t_run, t_done))
        summary["run_record"] = write_run_record(self.output_uri, run_id, summary)
        return summary

    def _summary(self, run_id: str, started: str, stats: WriteStats, n_shards: int, skipped: int,
                 times: tuple[float, float, float, float]) -> dict[str, Any]:
        t_start, t_validated, t_run, t_done = times
        inputs = stats.embedded + stats.failed
        run_s = t_done - t_run
        at = stats.actor_time
        lo, hi = self.runtime.actor_range()
        summary = {
            "run_id": run_id,
            "kind": self.kind,
            "started_at": started,
            "source": self.source.uri,
            "output": self.output_uri,
            "counts": {"inputs": inputs, "embedded": stats.embedded, "failed": stats.failed,
                       "skipped": skipped},
            "error_kinds": stats.error_kinds,
            "shards": n_shards,
            "files_written": len(stats.files),
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
            "actors": {"min": lo, "max": hi, "cpus_per_actor": self.runtime.cpus_per_actor,
                       "gpus_per_actor": self.runtime.gpus_per_actor, "batch_size": self.runtime.batch_size},
            **({"plan": self.decision.record()} if self.decision else {}),
            **self.extra,
            "config": self.config,
        }
        if self.work is not None:
            before = self.work.rows_before
            summary["ledger"] = {**self.work.counts(), "ran": n_shards,
                                 "output_rows": {"embedded": before["embedded"] + stats.embedded,
                                                 "failed": before["failed"] + stats.failed}}
            if self.partition:
                summary["partition"] = self.partition
        return summary


def format_summary(s: dict[str, Any]) -> str:
    """The run summary of extract or classify, as the CLI prints it."""
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
        if g.get("damaged"):
            note += f", {g['damaged']} shards with missing or damaged files run again"
        if g.get("orphans_removed"):
            note += f", {g['orphans_removed']} files of no committed shard removed"
        rows = g["output_rows"]
        lines.append(f"  ledger:     {note}; the output now holds {rows['embedded']} rows, "
                     f"{rows['failed']} errors" + (f"; this run under {s['partition']}/" if s.get("partition")
                                                   else ""))
    if s.get("plan"):
        lines.append(textwrap.fill("; ".join(s["plan"]["reasons"]), 110, initial_indent="  plan:       ",
                                   subsequent_indent=" " * 14))
    lines.append(f"  run record: {s['run_record']}")
    return "\n".join(lines)
