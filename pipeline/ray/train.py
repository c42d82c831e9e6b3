"""Ray Train wiring for fine-tuning: TorchTrainer (DDP) over Ray Data streams of encoded images.

``fit`` builds the train/validation datasets from the shards, the trainer and its storage (the output URI,
local or object storage), and runs ``worker_loop`` on every worker: resume from the last checkpoint,
evaluate before training (epoch 0), then train, evaluate and checkpoint each epoch. The model, optimizer,
loops and checkpoint files are the Ray-free parts in ``pipeline.finetune``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.train import DataConfig

from pipeline import finetune as ft
from pipeline import storage
from pipeline.output.writer import write_error_rows
from pipeline.plan import READ_TASK_CPUS
from pipeline.ray import data_context, init_ray
from pipeline.ray.data import read_shards

HEALTH_CHECK_INTERVAL_S = 0.5  # how often Ray Train's controller asks its workers how they are doing


def train_storage(uri: str):
    """(storage_path, storage_filesystem) for Ray Train: a local path, or a pyarrow wrapper around the
    project's fsspec filesystem (s3:// with the AWS environment, gs://...)."""
    fs, path = storage.get_fs(uri)
    if storage.protocol_of(uri) == "file":
        return path, None
    import pyarrow.fs as pafs

    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


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


class DecodeCollate(ArrowBatchCollateFn):
    """Encoded rows -> augmented image tensors, decoded in the training worker."""

    def __init__(self, decoder: Any) -> None:
        super().__init__()
        self.decoder = decoder

    def __call__(self, batch):
        return self.decoder(batch)


def worker_loop(config: dict[str, Any]) -> None:
    """Ray Train loop, run by every worker: resume from the last checkpoint if any, evaluate once before
    training (epoch 0), then train/evaluate each epoch and checkpoint (rank 0 writes, all report)."""
    import torch

    cfg = ft.FinetuneConfig.model_validate(config["cfg"])
    tc, rc = cfg.train, cfg.runtime
    classes: list[str] = config["classes"]
    k = len(classes)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    tm = ft.build_training_model(cfg, classes)
    state = _initial_state(tm, classes, config["fingerprint"], tc.freeze_until)
    ckpt = ray.train.get_checkpoint()
    with (ckpt.as_directory() if ckpt else contextlib.nullcontext(None)) as restored:
        if restored:
            state = ft.load_checkpoint_state(restored)
            ft.load_checkpoint_model(restored, tm.model)
        model = ray.train.torch.prepare_model(tm.model)  # to the worker's device; DDP when world > 1
        optimizer = ft.make_optimizer(tm, cfg.backbone.model, tc)
        if restored:
            ft.load_checkpoint_optimizer(restored, optimizer)
            for g in optimizer.param_groups:  # the schedule follows this run's lr
                g["base_lr"] = tc.lr * g["lr_scale"]

    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and rc.autocast == "fp16" else None
    decode = {"max_pixels": rc.max_pixels, "max_bytes": cfg.source.max_bytes}
    train_rows = ft.TrainBatches(tm.train_transform, classes, tm.input_size, **decode)
    val_rows = ft.TrainBatches(tm.eval_transform, classes, tm.input_size, **decode)
    train_collate, val_collate = DecodeCollate(train_rows), DecodeCollate(val_rows)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    total_steps = config["steps_per_epoch"] * tc.epochs

    def validate():
        if val_shard is None:
            return None
        batches = val_shard.iter_torch_batches(batch_size=tc.batch_size, collate_fn=val_collate)
        return ft.all_reduce(ft.evaluate(model, batches, k, device=device, autocast=rc.autocast), k, device)

    def say(entry):
        if rank == 0 and config["progress"]:
            sys.stderr.write(ft.epoch_line(entry, tc.epochs) + "\n")  # not print: Ray Train patches it
            sys.stderr.flush()

    state["runs"] = [*state.get("runs", []), {"run_id": config["run_id"], "start_epoch": state["epoch"]}]
    if not state["history"]:
        ft.seed_everything(tc.seed, 0, rank)
        t0 = time.perf_counter()
        va = validate()
        state["history"].append({"epoch": 0, **(va.metrics("val") if va else {}),
                                 "seconds": round(time.perf_counter() - t0, 3), "run_id": config["run_id"]})
        say(state["history"][0])
    for epoch in range(state["epoch"] + 1, tc.epochs + 1):
        shuffle_seed = ft.seed_everything(tc.seed, epoch, rank)
        t0 = time.perf_counter()
        batches = train_shard.iter_torch_batches(
            batch_size=tc.batch_size, collate_fn=train_collate,
            local_shuffle_buffer_size=max(tc.batch_size, tc.shuffle_buffer), local_shuffle_seed=shuffle_seed)
        sums, step = ft.train_epoch(model, batches, optimizer, loss_fn, device=device, step=state["step"],
                                   total_steps=total_steps, stat_modules=tm.stat_modules,
                                   autocast=rc.autocast, scaler=scaler)
        tr = ft.all_reduce(sums, k, device)
        t_train = time.perf_counter() - t0
        va = validate()
        entry = {"epoch": epoch, **tr.metrics("train"), **(va.metrics("val") if va else {}),
                 "seconds": round(time.perf_counter() - t0, 3), "train_seconds": round(t_train, 3),
                 "lr": max(g["lr"] for g in optimizer.param_groups), "steps": step - state["step"],
                 "run_id": config["run_id"]}
        state.update(epoch=epoch, step=step, history=[*state["history"], entry],
                     val_confusion=va.confusion.tolist() if va else None)
        say(entry)
        if train_rows.errors or val_rows.errors:  # unreadable images: this worker's error rows so far
            write_error_rows(cfg.output.uri, f"{ft.ERROR_PARTS}{rank}",
                             {**train_rows.errors, **val_rows.errors})
        _report_epoch(rank, epoch, model, optimizer, state, entry)


def _initial_state(tm: ft.TrainingModel, classes: list[str], fingerprint: dict[str, Any], freeze_until: str
                   ) -> dict[str, Any]:
    """The training state before the first epoch (a checkpoint's state replaces it on resume)."""
    return {"epoch": 0, "step": 0, "history": [], "classes": classes,
            "classifier": tm.classifier, "fingerprint": fingerprint,
            "weights_source": tm.weights_source, "weights_sha256": tm.weights_sha256,
            "frozen": {"until": freeze_until, "tensors": len(tm.frozen_keys),
                       "parameters": sum(p.numel() for p in tm.model.parameters() if not p.requires_grad)},
            "trainable_parameters": sum(p.numel() for p in tm.model.parameters() if p.requires_grad)}


def _report_epoch(rank: int, epoch: int, model: Any, optimizer: Any, state: dict[str, Any],
                  entry: dict[str, Any]) -> None:
    """Report the epoch's numeric metrics to Ray Train, with a checkpoint written by rank 0."""
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            ft.save_checkpoint(d, model, optimizer, state)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        metrics = {key: v for key, v in entry.items() if isinstance(v, (int, float)) and v is not None}
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=ft.checkpoint_name(epoch))


def fit(cfg: Any, shards: list[Any], split: Any, *, fingerprint: dict[str, Any], run_id: str,
        progress: bool) -> tuple[Any, int]:
    """Train with Ray Train; returns (the last checkpoint, steps per epoch)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rt = cfg.runtime
    init_ray(rt)
    data_context(rt, progress)
    rows = read_shards(ft.mixed_shards(shards, cfg.source.files_per_shard), cfg.source)
    datasets = {"train": rows.map_batches(ft.select_rows, fn_kwargs={"which": "train", "split": split},
                                          batch_format="pyarrow", num_cpus=READ_TASK_CPUS)}
    if split.val_rows:
        datasets["val"] = rows.map_batches(ft.select_rows, fn_kwargs={"which": "val", "split": split},
                                           batch_format="pyarrow", num_cpus=READ_TASK_CPUS)
    steps_per_epoch = max(1, math.ceil((split.train_rows // rt.workers) / cfg.train.batch_size))
    path, fs = train_storage(cfg.output.uri)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": json.loads(cfg.model_dump_json()), "classes": split.classes,
                           "fingerprint": fingerprint, "run_id": run_id, "has_val": bool(split.val_rows),
                           "steps_per_epoch": steps_per_epoch, "progress": progress and rt.progress},
        scaling_config=ScalingConfig(
            num_workers=rt.workers, use_gpu=rt.gpus_per_worker > 0,
            resources_per_worker={"CPU": rt.cpus_per_worker,
                                  **({"GPU": rt.gpus_per_worker} if rt.gpus_per_worker else {})}),
        run_config=RunConfig(
            name=ft.CHECKPOINTS_DIR, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=rt.max_failures),
            logging_config=LoggingConfig(log_level="INFO" if progress and rt.progress else "WARNING")),
        datasets=datasets,
        dataset_config=TrainValSplit(),
    )
    # Ray Train's controller polls its workers every 2 s by default: up to 2 s more at a run's start and at
    # its end, for nothing (a 24-image run: 40.7 -> 38.6 s, medians of 3). A value the user set stays.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return result.checkpoint, steps_per_epoch
