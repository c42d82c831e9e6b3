"""The model to fine-tune: the pretrained backbone with a new classifier sized to the labels, frozen up to a
named module (``freeze_until``: the stem and that module included), and AdamW parameter groups whose
learning rate shrinks by ``lr_decay`` per stage going down from the head (discriminative learning rates)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, FinetuneConfig, TrainConfig

if TYPE_CHECKING:  # torch is imported where it is used: Ray Data tasks that only filter rows stay light
    import torch
    from torch import nn


def replace_classifier(model: nn.Module, name: str, num_classes: int) -> str:
    """Swap the classifier for a new linear layer with num_classes outputs; returns its module name."""
    from torch import nn

    from pipeline.backbone.models import is_torchvision, last_linear_name

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
    from pipeline.backbone.models import preprocessing_for

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

    from pipeline.backbone.models import is_torchvision, preprocessing_for

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
    from pipeline.backbone.cuts import stage_names

    return f"none, final, {', '.join(stage_names(model, name))}"


def frozen_modules(model: nn.Module, name: str, freeze_until: str, input_size: tuple[int, ...],
                   classifier: str | None = None) -> list[str]:
    """Names of the modules whose own parameters and buffers stay frozen ("" is the root, e.g. ViT's
    cls_token and pos_embed, frozen with the stem). ConfigError naming the valid layers for a bad name."""
    from pipeline.backbone.models import last_linear_name

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
    from pipeline.backbone.cuts import stage_names
    from pipeline.backbone.models import is_torchvision

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

    from pipeline.backbone.models import create_model, last_linear_name

    model, source, sha = create_model(cfg.backbone.model, cfg.backbone.weights)
    input_size = tuple(data_config(model, cfg.backbone.model, cfg.backbone.weights)["input_size"])
    classifier = last_linear_name(model)
    if classes is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            classifier = replace_classifier(model, cfg.backbone.model, len(classes))
    frozen = frozen_modules(model, cfg.backbone.model, cfg.train.freeze_until, input_size, classifier)
    keys = apply_freeze(model, frozen)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("every parameter is frozen: lower --freeze-until")
    train_t, eval_t = transforms(model, cfg.backbone.model, cfg.backbone.weights)
    return TrainingModel(model, classifier or "", frozen, keys, frozen_stat_modules(model, frozen),
                         input_size, train_t, eval_t, source, sha)


def make_optimizer(tm: TrainingModel, model_name: str, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one group per (stage depth, decay or not)."""
    import torch

    groups = param_groups(tm.model, model_name, tm.classifier, cfg)
    for g in groups:
        g["base_lr"] = g["lr"] = cfg.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or other) wrapper; the model itself when unwrapped."""
    from torch import nn

    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
