"""`pipeline finetune`: weight initialization. Validate the request, collect labels and the split on the
driver, train with Ray Train (``pipeline.ray.train``), write the artifacts and the run record."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from pipeline import finetune as ft
from pipeline import storage
from pipeline.commands.run import new_run_id, versions
from pipeline.config import ConfigError
from pipeline.output.writer import merge_error_rows, write_run_record
from pipeline.plan import plan_finetune
from pipeline.sources import Shard, check_source, list_shards


def collect_labels(shards: list[Shard], source_cfg: Any, runtime: Any) -> tuple[list[str], list[str | None]]:
    """(ids, labels) of the readable rows: from the listing for loose files with --labels folder, else one
    Ray Data pass over the shards that keeps only id and label (bytes are dropped inside the read tasks)."""
    if shards[0].format == "files" and source_cfg.labels == "folder":
        return ft.folder_labels(shards)
    from pipeline.ray.data import collect_labels as ray_collect_labels

    return ray_collect_labels(shards, source_cfg, runtime)


def _check_output(cfg: Any, overwrite: bool) -> tuple[str, dict[str, Any]] | None:
    """Clear the output with ``overwrite``; refuse artifacts without checkpoints; the latest checkpoint."""
    out = cfg.output.uri
    storage.check_writable(out)
    if overwrite:
        for name in (ft.CHECKPOINTS_DIR, *ft.ARTIFACTS):
            uri = storage.join(out, name)
            if storage.exists(uri):
                storage.remove_tree(uri)
    latest = ft.latest_checkpoint(out)
    done = [a for a in (ft.BACKBONE_FILE, ft.FINETUNE_JSON) if storage.exists(storage.join(out, a))]
    if latest is None and done:
        raise ConfigError(f"output '{out}' already holds a fine-tuned model ({', '.join(done)}) but no "
                          "checkpoints to continue from: pass --overwrite to replace it, or choose a new "
                          "--output")
    return latest


def finetune(cfg: Any, *, overwrite: bool = False, progress: bool = True, listed: tuple[list[Shard], int] |
             None = None, labelled: tuple[list[str], list[str | None]] | None = None) -> dict[str, Any]:
    """Fine-tune a pretrained backbone on labelled images with Ray Train (DDP over ``runtime.workers``).

    Checkpoints go to ``OUTPUT/checkpoints/epoch-NNNN/`` every epoch; a rerun into the same output continues
    from the last one (``--overwrite`` starts over). Writes ``OUTPUT/backbone.safetensors`` (for `extract
    --weights`), ``OUTPUT/head/`` (for `heads predict` on embeddings of that backbone at --layer final),
    ``OUTPUT/finetune.json`` and ``OUTPUT/report.png``; returns finetune.json's content. ``listed`` (shards,
    skipped) and ``labelled`` (ids, labels): a caller's listing and labels (`compare` fine-tunes its sample).
    """
    t_start, run_id, out = time.perf_counter(), new_run_id(), cfg.output.uri
    # Everything the user can get wrong is checked before Ray starts: source, model, weights, freeze layer.
    shards, skipped = listed or list_shards(cfg.source)
    check_source(cfg.source, shards)
    del ft.build_training_model(cfg).model  # validates model, weights and freeze_until
    latest = _check_output(cfg, overwrite)

    ids, labels = labelled or collect_labels(shards, cfg.source, cfg.runtime)
    split = ft.make_split(ids, labels, cfg.train.val_fraction)
    fingerprint = ft.resume_fingerprint(cfg, split.classes)
    if latest is not None:
        diff = ft.resume_differences(latest[1].get("fingerprint") or {}, fingerprint)
        if diff:
            raise ConfigError(f"output '{out}' holds checkpoints of a different fine-tuning run "
                              f"({'; '.join(diff)}): pass --overwrite to start over, or choose a new "
                              "--output")
        if progress:
            todo = "" if latest[1]["epoch"] < cfg.train.epochs else \
                "; nothing left to train, the artifacts are written from it"
            print(f"finetune: resuming from {latest[0]} (epoch {latest[1]['epoch']} of "
                  f"{cfg.train.epochs}{todo})", file=sys.stderr)
    from pipeline.ray.cluster import cluster_shape, wait_for

    decision = plan_finetune(cluster_shape(cfg.runtime), cfg.runtime)
    if decision.waits_for:
        wait_for(decision.waits_for, decision.runtime, "worker", "--gpus-per-worker or --cpus-per-worker")
    cfg = cfg.model_copy(update={"runtime": decision.runtime})
    rt = cfg.runtime
    if split.train_rows < rt.workers:
        raise ConfigError(f"only {split.train_rows} training images for {rt.workers} workers: add "
                          "images or lower --workers")

    from safetensors.torch import load_file

    from pipeline.ray.train import fit

    t_run = time.perf_counter()
    checkpoint, steps_per_epoch = fit(cfg, shards, split, fingerprint=fingerprint, run_id=run_id,
                                      progress=progress)
    t_done = time.perf_counter()
    with checkpoint.as_directory() as d:
        state = ft.load_checkpoint_state(d)
        model_state = load_file(os.path.join(d, ft.CKPT_MODEL))
    errors = merge_error_rows(out, ft.ERROR_PARTS, ft.ERRORS_NAME)
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
        "plan": decision.record(),
        "steps_per_epoch": steps_per_epoch,
        "checkpoints": storage.join(out, ft.CHECKPOINTS_DIR),
        "last_checkpoint": ft.checkpoint_name(state["epoch"]),
        "skipped_files": skipped,
        "failed_images": errors["failed"],
        "error_kinds": errors["error_kinds"],
        "timings": {"validate_s": round(t_run - t_start, 3), "train_s": round(t_done - t_run, 3),
                    "total_s": round(time.perf_counter() - t_start, 3)},
        "versions": versions(),
    }
    report = ft.write_artifacts(cfg, model_state, state, split, extra)
    record = {"kind": "finetune", **{k: v for k, v in report.items() if k != "epochs"},
              "epochs": state["history"]}
    report["run_record"] = write_run_record(out, run_id, record)
    return report


def format_finetune(report: dict) -> str:
    """Per-epoch metrics and where the artifacts went."""
    def f(v) -> str:
        return "     -" if v is None else f"{v:6.3f}"

    lines = [f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'val loss':>8}  {'val acc':>7}  {'s':>6}"]
    for h in report["epochs"]:
        lines.append(f"{h['epoch']:>5}  {f(h.get('train_loss')):>10}  {f(h.get('train_acc')):>9}  "
                     f"{f(h.get('val_loss')):>8}  {f(h.get('val_acc')):>7}  {h.get('seconds', 0):>6.1f}")
    out = report["output"]
    lines.append(f"backbone: {out['backbone']} (sha256 {report['backbone']['sha256'][:12]}...; use it with "
                 f"`pipeline extract --model {report['model']} --weights {out['backbone']}`)")
    lines.append(f"head:     {out['head']} (for `pipeline heads predict` on those embeddings, --layer final)")
    if report.get("failed_images"):
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(report["error_kinds"].items()))
        lines.append(f"errors:   {report['failed_images']} unreadable images left out, in "
                     f"{storage.join(report['config']['output']['uri'], ft.ERRORS_DIR)} ({kinds})")
    lines.append(f"report:   {out['finetune_json']}, {out['report']}")
    return "\n".join(lines)
