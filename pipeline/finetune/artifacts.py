"""What fine-tuning writes: per-epoch checkpoints (``OUTPUT/checkpoints/epoch-NNNN/``), the fingerprint a
resumed run must share with them, and the artifacts: ``backbone.safetensors`` (the whole fine-tuned model's
state dict; `pipeline extract --weights` leaves the differently sized classifier out), ``head/`` (the new
classifier as a linear head that `pipeline heads predict` applies to embeddings extracted with that backbone
at ``--layer final``), ``finetune.json`` (per-epoch metrics, split, config) and ``report.png``."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import storage
from pipeline.config import FinetuneConfig
from pipeline.finetune.model import unwrap
from pipeline.reports import finetune_png
from pipeline.split import Split

if TYPE_CHECKING:  # torch is imported where it is used: Ray Data tasks that only filter rows stay light
    import torch
    from torch import nn

BACKBONE_FILE = "backbone.safetensors"
HEAD_DIR = "head"
FINETUNE_JSON = "finetune.json"
REPORT_PNG = "report.png"
CHECKPOINTS_DIR = "checkpoints"
ERRORS_DIR = "errors"  # unreadable images: errors/finetune.parquet (id, source, error, message)
ERRORS_NAME = "finetune"
ERROR_PARTS = "rank-"  # errors/rank-<n>.parquet: one worker's, folded into errors/finetune.parquet
ARTIFACTS = (BACKBONE_FILE, HEAD_DIR, FINETUNE_JSON, REPORT_PNG, ERRORS_DIR)
# One checkpoint folder per epoch, OUTPUT/checkpoints/epoch-NNNN/ holding these files.
CKPT_MODEL, CKPT_OPTIMIZER, CKPT_STATE = "model.safetensors", "optimizer.pt", "state.json"
# Settings a resumed run must share with the checkpoints it continues (epochs may grow).
RESUME_KEYS = ("model", "weights", "freeze_until", "lr_decay", "classes", "val_fraction")


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def save_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Model weights (safetensors), optimizer state (plain tensors) and the JSON training state."""
    import torch
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().clone().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(sd, os.path.join(directory, CKPT_MODEL))
    torch.save(optimizer.state_dict(), os.path.join(directory, CKPT_OPTIMIZER))
    with open(os.path.join(directory, CKPT_STATE), "w") as f:
        json.dump(state, f, indent=1)


def load_checkpoint_state(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, CKPT_STATE)) as f:
        return json.load(f)


def load_checkpoint_model(directory: str, model: nn.Module) -> None:
    from safetensors.torch import load_file

    unwrap(model).load_state_dict(load_file(os.path.join(directory, CKPT_MODEL)))


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
    return {"model": cfg.backbone.model, "weights": cfg.backbone.weights,
            "freeze_until": cfg.train.freeze_until, "lr_decay": cfg.train.lr_decay, "classes": list(classes),
            "val_fraction": cfg.train.val_fraction}


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{k}: checkpoints {saved.get(k)!r}, now {current.get(k)!r}" for k in RESUME_KEYS
            if saved.get(k) != current.get(k)]


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
    return save(sd, metadata={"pipeline": json.dumps(storage.redact(meta), sort_keys=True)})


def write_artifacts(cfg: FinetuneConfig, model_state: dict[str, torch.Tensor], state: dict[str, Any],
                    split: Split, extra: dict[str, Any]) -> dict[str, Any]:
    """backbone.safetensors, head/ (head.safetensors + head.json), finetune.json, report.png under OUTPUT.

    The head's embedding spec is the one `extract --weights OUTPUT/backbone.safetensors --layer final`
    records: it is computed by building that backbone from the file just written.
    """
    import torch
    from safetensors.torch import save
    from torch import nn

    from pipeline.backbone import build_backbone
    from pipeline.config import BackboneConfig
    from pipeline.heads import FORMAT_VERSION, HEAD_META, HEAD_WEIGHTS, metrics_from_confusion

    out = cfg.output.uri
    uris = {"backbone": storage.join(out, BACKBONE_FILE), "head": storage.join(out, HEAD_DIR),
            "finetune_json": storage.join(out, FINETUNE_JSON), "report": storage.join(out, REPORT_PNG)}
    classes = split.classes
    storage.write_bytes(uris["backbone"], backbone_bytes(model_state, {
        "format": "pipeline-finetune", "model": cfg.backbone.model, "classes": classes,
        "epoch": state["epoch"]}))

    # what extract records for this file at --layer final (and a check that the file loads)
    spec = build_backbone(BackboneConfig(model=cfg.backbone.model, weights=uris["backbone"], layer="final"),
                          "cpu").spec()
    prefix = state["classifier"]
    lin = nn.Linear(spec.dim, len(classes))
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
        "embedding_spec": spec.features(),
        "embeddings": None,
        "head": {"type": "linear", "input_dim": spec.dim, "num_classes": len(classes), "hidden": [],
                 "dropout": 0.0},
        "trained_by": "finetune",
        "finetune": uris["finetune_json"],
        "metrics": {"validation": {**val_metrics, "loss": last.get("val_loss")} if val_metrics else None},
        "split": split.to_json(),
    }
    head_sd = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    storage.write_bytes(storage.join(uris["head"], HEAD_WEIGHTS),
                        save(head_sd, metadata={"format": "pipeline-head"}))
    storage.write_json(storage.join(uris["head"], HEAD_META), head_meta, indent=2)

    trained = [h for h in history if h["epoch"] > 0]
    best = max(trained, key=lambda h: (h.get("val_acc") or 0, -(h.get("val_loss") or 0))) if trained else None
    report = {
        "model": cfg.backbone.model,
        "weights": {"source": state.get("weights_source"), "sha256": state.get("weights_sha256")},
        "classes": classes,
        "split": split.to_json(),
        "epochs": history,
        "epochs_done": state["epoch"],
        "best_epoch": best["epoch"] if best else None,
        "validation": val_metrics,
        "backbone": {"uri": uris["backbone"], "sha256": spec.weights.sha256},
        "head": uris["head"],
        "embedding_spec": spec.to_dict(),
        **extra,
        "config": json.loads(cfg.model_dump_json()),
    }
    storage.write_bytes(uris["report"], finetune_png(history, f"{cfg.backbone.model} fine-tuned "
                                                               f"(freeze until {cfg.train.freeze_until})"))
    storage.write_json(uris["finetune_json"], report, indent=2, default=str)
    return {**report, "output": uris}
