"""Fine-tuning a pretrained backbone (weight initialization): the Ray-free parts.

The runner wires these into Ray Train (``runner.finetune``): labelled rows stream from the same sources as
``extract``, each Train worker decodes and augments its batches (``BatchDecoder``), and ``train_epoch`` /
``evaluate`` run one pass over any iterable of ``{"x", "y", "failed"}`` tensor batches.

The model is the pretrained backbone with a new classifier sized to the labels. Layers can be frozen up to a
named module (``freeze_until``, names as ``pipeline layers`` prints them; the stem and that module included),
and the remaining ones trained with a learning rate that shrinks by ``lr_decay`` per stage going down from
the head (discriminative learning rates). AdamW, cosine schedule over all steps, bf16 autocast on GPU.

Artifacts (``write_artifacts``): ``backbone.safetensors`` (the whole fine-tuned model's state dict; `pipeline
extract --weights` leaves the differently sized classifier out), ``head/`` (the new classifier as a linear
head that `pipeline heads predict` applies to embeddings extracted with that backbone at ``--layer final``),
``finetune.json`` (per-epoch metrics, split, config) and ``report.png``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import posixpath
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from pipeline import storage
from pipeline.config import ConfigError, OutputConfig, SourceConfig, _Strict
from pipeline.decode import DecodeError, decode_image
from pipeline.sources import Shard

if TYPE_CHECKING:  # torch is imported where it is used: Ray Data tasks that only filter rows stay light
    import torch
    from torch import nn

BACKBONE_FILE = "backbone.safetensors"
HEAD_DIR = "head"
FINETUNE_JSON = "finetune.json"
REPORT_PNG = "report.png"
CHECKPOINTS_DIR = "checkpoints"
ARTIFACTS = (BACKBONE_FILE, HEAD_DIR, FINETUNE_JSON, REPORT_PNG)
# One checkpoint folder per epoch, OUTPUT/checkpoints/epoch-NNNN/ holding these files.
CKPT_MODEL, CKPT_OPTIMIZER, CKPT_STATE = "model.safetensors", "optimizer.pt", "state.json"
# Settings a resumed run must share with the checkpoints it continues (epochs may grow).
RESUME_KEYS = ("model", "weights", "freeze_until", "lr_decay", "classes", "val_fraction")


# --------------------------------------------------------------------------------------------------
# Configuration


class TrainConfig(_Strict):
    """The optimisation: epochs, learning rates, freezing, split."""

    epochs: int = Field(5, ge=1, description="total epochs; a rerun with more continues from the last "
                        "checkpoint")
    lr: float = Field(5e-4, gt=0, description="AdamW peak learning rate of the new head (and of every layer "
                      "when lr_decay is 1)")
    lr_decay: float = Field(1.0, gt=0, le=1, description="per stage below the head the learning rate is "
                            "multiplied by this (discriminative learning rates; 1 = the same everywhere)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (none for biases and norms)")
    freeze_until: str = Field("none", description="none | final (train the new head only) | a layer name "
                              "from `pipeline layers`: it, the stem and everything before it stay frozen")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    batch_size: int = Field(32, ge=1, description="images per worker per step")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="validation share, split by a hash of id")
    seed: int = 0
    shuffle_buffer: int = Field(1024, ge=1, description="rows in each worker's local shuffle buffer")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept under OUTPUT/checkpoints/")


class FinetuneRuntime(_Strict):
    """How Ray Train runs the work."""

    workers: int = Field(2, ge=1, description="Ray Train workers (DDP processes)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; > 0 trains on GPUs")
    autocast: Literal["none", "bf16", "fp16"] = Field("bf16", description="mixed precision on GPU")
    max_pixels: int = Field(50_000_000, ge=1, description="larger images are skipped (decompression bombs)")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1: "
                              "unlimited)")
    address: str | None = Field(None, description="Ray address; default: RAY_ADDRESS or a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray started by this run")
    progress: bool = True


class FinetuneConfig(_Strict):
    """Everything `pipeline finetune` needs."""

    source: SourceConfig
    output: OutputConfig
    model: str = Field(description="timm model name, or tv:<torchvision name>")
    weights: str = Field("packaged", description="none | hub | packaged | path or URI to start from")
    train: TrainConfig = TrainConfig()
    runtime: FinetuneRuntime = FinetuneRuntime()

    @field_validator("source", mode="before")
    @classmethod
    def _default_labels(cls, v: Any) -> Any:
        if isinstance(v, dict) and "labels" not in v:
            return {**v, "labels": "folder"}
        return v

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.source.labels == "none":
            raise ValueError("finetune needs labels: pass --labels folder (one folder per class) or a "
                             "Parquet column / WebDataset member name")
        if self.source.uri.rstrip("/") == self.output.uri.rstrip("/"):
            raise ValueError("output.uri must differ from source.uri: write the fine-tuned model elsewhere")
        return self


# --------------------------------------------------------------------------------------------------
# Labels and the train/validation split


def hash_unit(ids: list[str]) -> np.ndarray:
    """sha1(id)[:8] / 2**64: the split key (the same rule as `heads train`)."""
    raw = b"".join(hashlib.sha1(s.encode("utf-8")).digest()[:8] for s in ids)
    return np.frombuffer(raw, dtype=">u8").astype(np.float64) / 2.0**64


@dataclass
class Split:
    """Classes and the deterministic split: validation iff hash(id) < fraction, except the ids in ``flips``
    (at most one per class, so that every class with >= 2 rows is in both sides; see heads.split_ids)."""

    classes: list[str]
    fraction: float
    flips: dict[str, bool]  # id -> is validation, where it differs from the hash rule
    per_class: dict[str, dict[str, int]]

    @property
    def train_rows(self) -> int:
        return sum(c["train"] for c in self.per_class.values())

    @property
    def val_rows(self) -> int:
        return sum(c["validation"] for c in self.per_class.values())

    def is_val(self, ids: list[str]) -> np.ndarray:
        val = hash_unit(ids) < self.fraction if self.fraction > 0 else np.zeros(len(ids), dtype=bool)
        if self.flips:
            for i, s in enumerate(ids):
                if s in self.flips:
                    val[i] = self.flips[s]
        return val

    def to_json(self) -> dict[str, Any]:
        return {"rule": "validation iff sha1(id)[:8]/2**64 < val_fraction; per class at least one row in "
                        "each split when it has >= 2 rows",
                "val_fraction": self.fraction, "train": self.train_rows, "validation": self.val_rows,
                "per_class": self.per_class}


def make_split(ids: list[str], labels: list[str | None], val_fraction: float) -> Split:
    """The split of labelled rows (unlabelled ones are left out); ConfigError for fewer than 2 classes."""
    from pipeline.heads import split_ids

    keep = [i for i, lab in enumerate(labels) if lab is not None and lab != ""]
    ids = [ids[i] for i in keep]
    labels = [labels[i] for i in keep]
    if len(set(ids)) != len(ids):
        raise ConfigError("the source repeats some ids: each image needs a unique id (source.id_column)")
    classes = sorted(set(labels))  # type: ignore[arg-type]
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "no labelled images"
        raise ConfigError(
            f"fine-tuning needs at least 2 classes, found {found} among {len(ids)} labelled images: check "
            "the labels (with --labels folder each class is its own folder under --source)")
    mask = split_ids(ids, labels, val_fraction) if val_fraction > 0 else np.zeros(len(ids), dtype=bool)
    base = hash_unit(ids) < val_fraction if val_fraction > 0 else np.zeros(len(ids), dtype=bool)
    flips = {ids[i]: bool(mask[i]) for i in np.flatnonzero(mask != base)}
    per_class = {c: {"train": 0, "validation": 0} for c in classes}
    for lab, v in zip(labels, mask):
        per_class[lab]["validation" if v else "train"] += 1  # type: ignore[index]
    return Split(classes, val_fraction, flips, per_class)


def folder_labels(shards: list[Shard]) -> tuple[list[str], list[str | None]]:
    """(ids, labels) of loose image files with --labels folder, from the listing alone (no bytes read)."""
    ids = [rel for s in shards for rel in s.rels]
    return ids, [posixpath.dirname(rel).rsplit("/", 1)[-1] or None for rel in ids]


def mixed_shards(shards: list[Shard], files_per_shard: int) -> list[Shard]:
    """Loose files regrouped in hash order, so that each read task holds a mix of classes (folders)."""
    if not shards or shards[0].format != "files":
        return shards
    members = [(uri, rel, size) for s in shards
               for uri, rel, size in zip(s.uris, s.rels, s.sizes or (0,) * len(s.uris))]
    members.sort(key=lambda m: hashlib.sha1(m[1].encode("utf-8")).hexdigest())
    out = []
    for i in range(0, len(members), files_per_shard):
        part = members[i:i + files_per_shard]
        digest = hashlib.sha1("\n".join(m[1] for m in part).encode("utf-8")).hexdigest()[:10]
        out.append(Shard(key=f"train-{i // files_per_shard:05d}-{digest}", format="files",
                         uris=tuple(m[0] for m in part), rels=tuple(m[1] for m in part),
                         size=sum(m[2] for m in part), version=digest, sizes=tuple(m[2] for m in part)))
    return out


def select_rows(batch: pa.Table, *, which: str, split: Split) -> pa.Table:
    """Rows of one side of the split (readable, labelled with a known class): id, label, bytes."""
    ids = batch.column("id").to_pylist()
    ok = pc.and_(pc.is_null(batch.column("error_kind")),
                 pc.is_in(batch.column("label"), value_set=pa.array(split.classes, pa.string())))
    ok = np.asarray(ok.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    is_val = split.is_val(ids)
    keep = ok & (is_val if which == "val" else ~is_val)
    return batch.filter(pa.array(keep)).select(["id", "label", "bytes"])


# --------------------------------------------------------------------------------------------------
# The model: pretrained backbone + new head, freezing, parameter groups


def replace_classifier(model: nn.Module, name: str, num_classes: int) -> str:
    """Swap the classifier for a new linear layer with num_classes outputs; returns its module name."""
    from torch import nn

    from pipeline.backbones import is_torchvision, last_linear_name

    if not is_torchvision(name) and hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        cls = last_linear_name(model)
        if cls is not None and model.get_submodule(cls).out_features == num_classes:
            return cls
    cls = last_linear_name(model)
    if cls is None:
        raise ConfigError(f"model '{name}' has no linear classifier to replace: pick a classification model")
    old = model.get_submodule(cls)
    parent, _, child = cls.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child,
            nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return cls


def data_config(model: nn.Module, name: str, weights: str) -> dict[str, Any]:
    """Input size, interpolation, mean, std, crop of the model's own preprocessing (timm or torchvision)."""
    from pipeline.backbones import preprocessing_for

    _, desc = preprocessing_for(model, name, weights)
    if desc["library"] == "timm":
        keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
        return {k: tuple(desc[k]) if isinstance(desc[k], list) else desc[k] for k in keys if k in desc}
    crop = desc["crop"]
    interp = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(desc["interpolation"], "bilinear") \
        if isinstance(desc["interpolation"], int) else str(desc["interpolation"])
    return {"input_size": (3, crop[0], crop[-1]), "interpolation": interp, "mean": tuple(desc["mean"]),
            "std": tuple(desc["std"])}


def transforms(model: nn.Module, name: str, weights: str) -> tuple[Callable, Callable]:
    """(train, eval) transforms, PIL image -> tensor: timm's training augmentation for the model's own data
    config (random resized crop, flip, colour jitter), and the model's eval preprocessing (what `extract`
    uses). Torchvision models get the same augmentation with their weights' size, mean and std."""
    import timm.data

    from pipeline.backbones import is_torchvision, preprocessing_for

    if is_torchvision(name):
        cfg = data_config(model, name, weights)
    else:
        cfg = timm.data.resolve_model_data_config(model)
    train = timm.data.create_transform(**cfg, is_training=True)
    evaluate, _ = preprocessing_for(model, name, weights)
    return train, evaluate


def _execution_order(model: nn.Module, input_size: tuple[int, ...]) -> list[str]:
    """Module names in the order their forward finishes (first time), from one forward on zeros."""
    import torch

    order: list[str] = []
    handles = [m.register_forward_hook(lambda _m, _a, _o, n=n: order.append(n))
               for n, m in model.named_modules() if n]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return list(dict.fromkeys(order))


def freeze_choices(model: nn.Module, name: str) -> str:
    from pipeline.backbones import stage_names

    return f"none, final, {', '.join(stage_names(model, name))}"


def frozen_modules(model: nn.Module, name: str, freeze_until: str, input_size: tuple[int, ...],
                   classifier: str | None = None) -> list[str]:
    """Names of the modules whose own parameters and buffers stay frozen ("" is the root, e.g. ViT's
    cls_token and pos_embed, frozen with the stem). ConfigError naming the valid layers for a bad name."""
    from pipeline.backbones import last_linear_name

    if freeze_until == "none":
        return []
    classifier = classifier or last_linear_name(model)
    if freeze_until == "final":
        if classifier is None:
            raise ConfigError(f"model '{name}' has no classifier: --freeze-until final would train nothing")
        keep = {classifier, *(n for n, _ in model.named_modules() if classifier.startswith(n + ".") or not n)}
        return ["", *(n for n, _ in model.named_modules()
                      if n and n not in keep and not n.startswith(classifier + "."))]
    modules = dict(model.named_modules())
    if freeze_until in ("", "logits") or freeze_until not in modules or (
            classifier and (freeze_until == classifier or freeze_until.startswith(classifier + "."))):
        raise ConfigError(
            f"unknown --freeze-until layer '{freeze_until}' for model '{name}'. Valid: "
            f"{freeze_choices(model, name)} (or any module name: `pipeline layers --model {name} --all`)")
    order = _execution_order(model, input_size)
    if freeze_until not in order:
        raise ConfigError(f"--freeze-until '{freeze_until}' is never run in the forward pass of '{name}'; "
                          f"pick one of: {freeze_choices(model, name)}")
    return ["", *order[: order.index(freeze_until) + 1]]


def apply_freeze(model: nn.Module, frozen: list[str]) -> list[str]:
    """requires_grad=False on the frozen modules' own parameters; returns the frozen state_dict keys."""
    keys = []
    for n in frozen:
        m = model.get_submodule(n) if n else model
        for pn, p in m.named_parameters(recurse=False):
            p.requires_grad_(False)
            keys.append(f"{n}.{pn}" if n else pn)
        keys += [f"{n}.{bn}" if n else bn for bn, b in m.named_buffers(recurse=False) if b is not None]
    return sorted(set(keys))


def frozen_stat_modules(model: nn.Module, frozen: list[str]) -> list[nn.Module]:
    """The frozen modules that keep running statistics (BatchNorm...): kept in eval mode while training."""
    out = []
    for n in frozen:
        m = model.get_submodule(n) if n else model
        if n and any(True for _ in m.buffers(recurse=False)):
            out.append(m)
    return out


def stage_depths(model: nn.Module, name: str, classifier: str) -> dict[str, int]:
    """Parameter name -> stage depth below the head (0 = the new classifier). timm models use their own
    coarse group_matcher (stem, each stage, head); others the stages `pipeline layers` lists."""
    from pipeline.backbones import is_torchvision, stage_names

    names = [n for n, _ in model.named_parameters()]
    is_head = {n: n.startswith(classifier + ".") for n in names}
    if not is_torchvision(name) and hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        layer = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
        top = max(layer[n] for n in names if not is_head[n]) + 1
        return {n: 0 if is_head[n] else top - layer[n] for n in names}
    stages = stage_names(model, name)
    out = {}
    for n in names:
        if is_head[n]:
            out[n] = 0
            continue
        idx = next((i for i, s in enumerate(stages) if n.startswith(s + ".")), None)
        out[n] = len(stages) - idx if idx is not None else len(stages) + 1
    return out


def param_groups(model: nn.Module, name: str, classifier: str, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: per stage depth (lr scale lr_decay**depth), and with or
    without weight decay (none for biases and norm weights)."""
    depth = stage_depths(model, name, classifier)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1
        g = groups.setdefault((depth[n], decay), {
            "params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
            "lr_scale": cfg.lr_decay ** depth[n], "depth": depth[n]})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def seed_everything(seed: int, epoch: int, rank: int) -> int:
    """Seed python, numpy and torch for one worker's epoch (augmentation, dropout); returns a seed for the
    epoch's shuffle buffer. A resumed run draws the same numbers as an uninterrupted one."""
    import random

    import torch

    s = int.from_bytes(hashlib.sha1(f"{seed}/{epoch}/{rank}".encode()).digest()[:4], "big")
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over total steps."""
    if total <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


@dataclass
class TrainingModel:
    """The model to fine-tune and what the loop needs around it."""

    model: nn.Module
    classifier: str
    frozen: list[str]  # module names
    frozen_keys: list[str]  # state_dict keys that stay as loaded
    stat_modules: list[nn.Module]  # frozen modules kept in eval mode
    input_size: tuple[int, ...]
    train_transform: Callable
    eval_transform: Callable
    weights_source: str
    weights_sha256: str


def build_training_model(cfg: FinetuneConfig, classes: list[str] | None = None) -> TrainingModel:
    """Pretrained model (its weights loaded as `extract` would) with a new classifier for the classes (the
    original one when classes is None: validation only), frozen up to train.freeze_until."""
    import torch

    from pipeline.backbones import create_model, last_linear_name

    model, source, sha = create_model(cfg.model, cfg.weights)
    input_size = tuple(data_config(model, cfg.model, cfg.weights)["input_size"])
    classifier = last_linear_name(model)
    if classes is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            classifier = replace_classifier(model, cfg.model, len(classes))
    frozen = frozen_modules(model, cfg.model, cfg.train.freeze_until, input_size, classifier)
    keys = apply_freeze(model, frozen)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("every parameter is frozen: lower --freeze-until")
    train_t, eval_t = transforms(model, cfg.model, cfg.weights)
    return TrainingModel(model, classifier or "", frozen, keys, frozen_stat_modules(model, frozen),
                         input_size, train_t, eval_t, source, sha)


def make_optimizer(tm: TrainingModel, model_name: str, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one group per (stage depth, decay or not)."""
    import torch

    groups = param_groups(tm.model, model_name, tm.classifier, cfg)
    for g in groups:
        g["base_lr"] = g["lr"] = cfg.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr)


# --------------------------------------------------------------------------------------------------
# Batches: encoded bytes -> augmented tensors, inside each training worker


class BatchDecoder:
    """Callable: a batch of rows (id, label, bytes) -> {"x": images, "y": class indices, "failed": count}.

    Decoding happens here, in the training worker, so only encoded bytes cross Ray's object store. Images that
    cannot be decoded are counted and left out of the batch.
    """

    def __init__(self, transform: Callable, classes: list[str], input_size: tuple[int, ...], *,
                 max_pixels: int = 50_000_000, max_bytes: int = 64 * 1024 * 1024,
                 threads: int | None = None) -> None:
        import torch

        self.transform = transform
        self.index = {c: i for i, c in enumerate(classes)}
        self.input_size = tuple(input_size)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.threads = max(1, int(threads or torch.get_num_threads()))
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def _one(self, data: bytes | None) -> torch.Tensor | None:
        img = decode_image(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        if isinstance(img, DecodeError):
            return None
        try:
            return self.transform(img)
        except Exception:  # noqa: BLE001 - a bad image is skipped and counted, not a crash
            return None

    def __call__(self, batch: pa.Table | dict[str, Any]) -> dict[str, torch.Tensor]:
        import torch

        if isinstance(batch, dict):
            labels, data = list(batch["label"]), list(batch["bytes"])
        else:
            labels, data = batch.column("label").to_pylist(), batch.column("bytes").to_pylist()
        images = list(self._pool.map(self._one, data)) if self._pool else [self._one(d) for d in data]
        xs, ys = [], []
        for img, lab in zip(images, labels):
            if img is not None and lab in self.index:
                xs.append(img)
                ys.append(self.index[lab])
        x = torch.stack(xs) if xs else torch.zeros((0, *self.input_size))
        return {"x": x, "y": torch.tensor(ys, dtype=torch.long),
                "failed": torch.tensor(len(data) - len(xs), dtype=torch.long)}


# --------------------------------------------------------------------------------------------------
# One epoch


def _autocast(device: torch.device, autocast: str):
    import torch

    if device.type != "cuda" or autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if autocast == "bf16" else torch.float16)


def _unwrap(model: nn.Module) -> nn.Module:
    from torch import nn

    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@dataclass
class EpochSums:
    """Per-worker sums that are all-reduced into epoch metrics."""

    loss: float = 0.0
    correct: int = 0
    rows: int = 0
    failed: int = 0
    confusion: np.ndarray | None = None

    def vector(self, k: int) -> torch.Tensor:
        import torch

        cm = self.confusion if self.confusion is not None else np.zeros((k, k), np.int64)
        return torch.tensor([self.loss, self.correct, self.rows, self.failed, *cm.reshape(-1)],
                            dtype=torch.float64)

    @classmethod
    def from_vector(cls, v: torch.Tensor, k: int) -> EpochSums:
        v = v.cpu().numpy()
        return cls(float(v[0]), int(round(v[1])), int(round(v[2])), int(round(v[3])),
                   np.rint(v[4:]).astype(np.int64).reshape(k, k))

    def metrics(self, prefix: str) -> dict[str, Any]:
        return {f"{prefix}_loss": self.loss / self.rows if self.rows else None,
                f"{prefix}_acc": self.correct / self.rows if self.rows else None,
                f"{prefix}_rows": self.rows, f"{prefix}_failed": self.failed}


def all_reduce(sums: EpochSums, k: int, device: torch.device) -> EpochSums:
    """Sum the workers' EpochSums (torch.distributed; a no-op for one process)."""
    import torch.distributed as dist

    v = sums.vector(k)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        v = v.to(device)
        dist.all_reduce(v)
    return EpochSums.from_vector(v, k)


def train_epoch(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                optimizer: torch.optim.Optimizer, loss_fn: nn.Module, *, device: torch.device, step: int,
                total_steps: int, stat_modules: list[nn.Module] = (), autocast: str = "none",
                scaler: torch.amp.GradScaler | None = None) -> tuple[EpochSums, int]:
    """One pass over the training batches; returns the sums and the global step reached.

    A DDP model is run under ``join()``, so workers with fewer non-empty batches do not hang the others.
    """
    import torch

    model.train()
    for m in stat_modules:
        m.eval()
    sums = EpochSums()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    join = model.join() if hasattr(model, "join") else contextlib.nullcontext()
    with join:
        for batch in batches:
            sums.failed += int(batch["failed"])
            x, y = batch["x"].to(device, non_blocking=True), batch["y"].to(device, non_blocking=True)
            if len(y) == 0:
                continue
            factor = cosine_factor(step, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            with _autocast(device, autocast):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(dim=1) == y).sum()
            sums.rows += len(y)
    sums.loss, sums.correct = float(loss_sum), int(correct)
    return sums, step


def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], k: int, *, device: torch.device,
             autocast: str = "none") -> EpochSums:
    """Plain cross-entropy, accuracy and confusion matrix (rows = true class) over the batches."""
    import torch
    from torch import nn

    net = _unwrap(model)
    was_training = net.training
    net.eval()
    sums = EpochSums(confusion=np.zeros((k, k), np.int64))
    with torch.inference_mode():
        for batch in batches:
            sums.failed += int(batch["failed"])
            x, y = batch["x"].to(device, non_blocking=True), batch["y"].to(device, non_blocking=True)
            if len(y) == 0:
                continue
            with _autocast(device, autocast):
                logits = net(x).float()
            sums.loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            pred = logits.argmax(dim=1)
            sums.correct += int((pred == y).sum())
            sums.rows += len(y)
            sums.confusion += np.bincount((y * k + pred).cpu().numpy(), minlength=k * k).reshape(k, k)
    net.train(was_training)
    return sums


# --------------------------------------------------------------------------------------------------
# Checkpoints (one folder per epoch; Ray Train persists it to OUTPUT/checkpoints/)


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def save_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Model weights (safetensors), optimizer state (plain tensors) and the JSON training state."""
    import torch
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().clone().contiguous() for k, v in _unwrap(model).state_dict().items()}
    save_file(sd, os.path.join(directory, CKPT_MODEL))
    torch.save(optimizer.state_dict(), os.path.join(directory, CKPT_OPTIMIZER))
    with open(os.path.join(directory, CKPT_STATE), "w") as f:
        json.dump(state, f, indent=1)


def load_checkpoint_state(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, CKPT_STATE)) as f:
        return json.load(f)


def load_checkpoint_model(directory: str, model: nn.Module) -> None:
    from safetensors.torch import load_file

    _unwrap(model).load_state_dict(load_file(os.path.join(directory, CKPT_MODEL)))


def load_checkpoint_optimizer(directory: str, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state, loaded with weights_only=True (tensors and numbers only)."""
    import torch

    state = torch.load(os.path.join(directory, CKPT_OPTIMIZER), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state)


def latest_checkpoint(output_uri: str) -> tuple[str, dict[str, Any]] | None:
    """(URI, state.json) of the highest-epoch checkpoint folder with a readable state.json; None if none."""
    root = storage.join(output_uri, CHECKPOINTS_DIR)
    try:
        if not storage.exists(root):
            return None
        files = storage.list_files(root)
    except storage.StorageError:
        return None
    found = []
    for f in files:
        parts = f.rel.split("/")
        if len(parts) == 2 and parts[1] == CKPT_STATE and parts[0].startswith("epoch-"):
            try:
                state = json.loads(storage.read_bytes(f.uri))
                found.append((int(state["epoch"]), storage.join(root, parts[0]), state))
            except (ValueError, KeyError, storage.StorageError):
                continue
    if not found:
        return None
    _, uri, state = max(found, key=lambda t: t[0])
    return uri, state


def resume_fingerprint(cfg: FinetuneConfig, classes: list[str]) -> dict[str, Any]:
    """What a rerun must share with the checkpoints it continues."""
    return {"model": cfg.model, "weights": cfg.weights, "freeze_until": cfg.train.freeze_until,
            "lr_decay": cfg.train.lr_decay, "classes": list(classes), "val_fraction": cfg.train.val_fraction}


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{k}: checkpoints {saved.get(k)!r}, now {current.get(k)!r}" for k in RESUME_KEYS
            if saved.get(k) != current.get(k)]


# --------------------------------------------------------------------------------------------------
# Artifacts


def head_from_classifier(classifier: nn.Linear):
    """The fine-tuned classifier as a `heads` linear head (identity standardization)."""
    import torch

    from pipeline.heads import HeadModel

    head = HeadModel(classifier.in_features, classifier.out_features, "linear")
    with torch.no_grad():
        head.net[0].weight.copy_(classifier.weight)
        head.net[0].bias.copy_(classifier.bias if classifier.bias is not None else 0)
    return head.eval()


def backbone_bytes(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """The fine-tuned model's state dict as safetensors bytes (one metadata key: a stable sha256)."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return save(sd, metadata={"pipeline": json.dumps(meta, sort_keys=True)})


def report_png(history: list[dict[str, Any]], title: str) -> bytes:
    """Loss and accuracy per epoch (train and validation; epoch 0 = before training)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for ax, key, label in ((ax1, "loss", "cross-entropy (train: augmented, label-smoothed)"),
                           (ax2, "acc", "accuracy")):
        for side, style in (("train", "-o"), ("val", "-s")):
            pts = [(h["epoch"], h[f"{side}_{key}"]) for h in history
                   if h.get(f"{side}_{key}") is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                        label="train" if side == "train" else "validation")
        ax.set_xlabel("epoch (0 = before training)")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    ax2.set_ylim(0, 1.05)
    ax1.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def epoch_line(h: dict[str, Any], epochs: int) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    return (f"finetune: epoch {h['epoch']}/{epochs} train loss {f(h.get('train_loss'))} acc "
            f"{f(h.get('train_acc'))} | val loss {f(h.get('val_loss'))} acc {f(h.get('val_acc'))} "
            f"| {h.get('seconds', 0):.1f}s")


def write_artifacts(cfg: FinetuneConfig, model_state: dict[str, torch.Tensor], state: dict[str, Any],
                    split: Split, extra: dict[str, Any]) -> dict[str, Any]:
    """backbone.safetensors, head/ (head.safetensors + head.json), finetune.json, report.png under OUTPUT.

    The head's embedding spec is the one `extract --weights OUTPUT/backbone.safetensors --layer final`
    records: it is computed by building that backbone from the file just written.
    """
    import torch
    from safetensors.torch import save
    from torch import nn

    from pipeline.backbones import build_backbone
    from pipeline.config import BackboneConfig
    from pipeline.heads import FORMAT_VERSION, HEAD_META, HEAD_WEIGHTS, _head_spec, metrics_from_confusion

    out = cfg.output.uri
    uris = {"backbone": storage.join(out, BACKBONE_FILE), "head": storage.join(out, HEAD_DIR),
            "finetune_json": storage.join(out, FINETUNE_JSON), "report": storage.join(out, REPORT_PNG)}
    classes = split.classes
    storage.write_bytes(uris["backbone"], backbone_bytes(model_state, {
        "format": "pipeline-finetune", "model": cfg.model, "classes": classes, "epoch": state["epoch"]}))

    # what extract records for this file at --layer final (and a check that the file loads)
    spec = build_backbone(BackboneConfig(model=cfg.model, weights=uris["backbone"], layer="final"),
                          "cpu").spec()
    prefix = state["classifier"]
    lin = nn.Linear(spec["dim"], len(classes))
    with torch.no_grad():
        lin.weight.copy_(model_state[f"{prefix}.weight"])
        lin.bias.copy_(model_state.get(f"{prefix}.bias", torch.zeros(len(classes))))
    head = head_from_classifier(lin)

    history = state["history"]
    last = history[-1]
    val_cm = state.get("val_confusion")
    val_metrics = metrics_from_confusion(np.array(val_cm), classes) if val_cm is not None and \
        np.asarray(val_cm).sum() else None
    head_meta = {
        "format_version": FORMAT_VERSION,
        "classes": classes,
        "embedding_spec": _head_spec(spec),
        "embeddings": None,
        "head": {"type": "linear", "input_dim": spec["dim"], "num_classes": len(classes), "hidden": [],
                 "dropout": 0.0},
        "trained_by": "finetune",
        "finetune": uris["finetune_json"],
        "metrics": {"validation": {**val_metrics, "loss": last.get("val_loss")} if val_metrics else None},
        "split": split.to_json(),
    }
    head_sd = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    storage.write_bytes(storage.join(uris["head"], HEAD_WEIGHTS),
                        save(head_sd, metadata={"format": "pipeline-head"}))
    storage.write_bytes(storage.join(uris["head"], HEAD_META), json.dumps(head_meta, indent=2).encode())

    trained = [h for h in history if h["epoch"] > 0]
    best = max(trained, key=lambda h: (h.get("val_acc") or 0, -(h.get("val_loss") or 0))) if trained else None
    report = {
        "model": cfg.model,
        "weights": {"source": state.get("weights_source"), "sha256": state.get("weights_sha256")},
        "classes": classes,
        "split": split.to_json(),
        "epochs": history,
        "epochs_done": state["epoch"],
        "best_epoch": best["epoch"] if best else None,
        "validation": val_metrics,
        "backbone": {"uri": uris["backbone"], "sha256": spec["weights"]["sha256"]},
        "head": uris["head"],
        "embedding_spec": spec,
        **extra,
        "config": json.loads(cfg.model_dump_json()),
    }
    storage.write_bytes(uris["report"], report_png(history, f"{cfg.model} fine-tuned "
                                                             f"(freeze until {cfg.train.freeze_until})"))
    storage.write_bytes(uris["finetune_json"], json.dumps(report, indent=2, default=str).encode())
    return {**report, "output": uris}
