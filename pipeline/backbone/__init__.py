"""One factory for pretrained backbones (timm and torchvision), cut at a named layer and pooled.

`build_backbone` builds the model with its weights (`models`), checks the layers and pooling with a test
forward, cuts the model at the layers (`cuts`, whose docstring says how) and returns a `Backbone`: the
model, its preprocessing, and ``embed``/``embed_all`` giving one vector per image and layer.
`list_layers` lists the layers a model can be cut at, with their output shapes.

Layer names: ``final`` (pre-logits features, the usual embedding), ``logits`` (class scores), or the name of a
module inside the model (`pipeline layers --model NAME` lists the stage boundaries; any module name from
``model.named_modules()`` is accepted). The model's own pretrained config decides preprocessing.

Building a model and its weights is `models` and `weights`; cutting it at a layer is `cuts`; the rewrites
the actors run it with (BatchNorm folded, activations fused, an fp32 stem) are `inference`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.backbone.cuts import (
    compile_target,
    cut_model,
    first_tensor,
    hook_capture,
    make_capture,
    pool_output,
    stage_names,
)
from pipeline.backbone.models import (
    BackboneError,
    check_model_name,
    create_model,
    input_size,
    num_prefix_tokens,
    preprocessing_for,
    test_image,
)
from pipeline.config import BackboneConfig
from pipeline.output.spec import EmbeddingSpec, WeightsRef


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
    Several layers come out of one forward pass (the probe sweep uses this). ``cut``: "truncated" (``model``
    holds only what the layers need), "whole" (one hook-free pass over the whole model) or "hooks".
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
    cut: str = "hooks"
    _capture: Callable[[torch.Tensor], dict[str, torch.Tensor]] = field(repr=False, default=None)  # type: ignore
    _prefix_tokens: int = field(repr=False, default=0)

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
        outs = []
        for layer, pool in zip(self.layers, self.pools):
            out = pool_output(acts[layer], pool, self._prefix_tokens).float()
            outs.append(nn.functional.normalize(out, dim=1) if self.normalize else out)
        return outs

    def recapture(self) -> None:
        """Capture the layers anew from ``model`` (after a rewrite replaced its modules)."""
        self._capture = make_capture(self.model, self.model_name, self.layers)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N,3,H,W), already preprocessed -> embeddings (N, dim) of the first layer."""
        return self.embed_all(x)[0]

    def image_flops(self) -> int:
        """Floating-point operations of one image's forward to the cut (torch's FlopCounterMode over the test
        image: convolutions and matrix products, the arithmetic that dominates): what the planner weighs an
        actor's start-up against."""
        from torch.utils.flop_counter import FlopCounterMode

        x = test_image(self.preprocessing).to(next(self.model.parameters()).device)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            self._capture(x)
        return int(counter.get_total_flops())

    def spec(self, i: int = 0, **fields: Any) -> EmbeddingSpec:
        """What the embeddings of layer i are (stored in Parquet metadata, checked by heads); ``fields`` adds
        the rest of the spec: dtype, versions, top_k."""
        return EmbeddingSpec(
            model=self.model_name, weights=WeightsRef(source=self.weights_source, sha256=self.weights_sha256),
            layer=self.layers[i], pool=self.pools[i], normalize=self.normalize, dim=self.dims[i],
            preprocessing=self.preprocessing, **fields)


# --------------------------------------------------------------------------------------------------
# Layers, building


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
                shapes.setdefault(n, tuple(first_tensor(out).shape[1:]))
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
    out.append(LayerInfo("logits", tuple(first_tensor(logits).shape[1:]), "logits"))
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
    """Build the model with its weights, validate layers and pooling with a test forward, cut, move to device.

    ``layers`` (default ``[cfg.layer]``) are all captured in one forward pass. The model is truncated after
    the deepest layer where the library offers that (see the module docstring); ``Backbone.cut`` tells.
    """
    check_model_name(cfg.model)
    layers = list(layers or [cfg.layer])
    if len(set(layers)) != len(layers):
        raise BackboneError(f"layers repeat: {layers}")
    model, source, sha = create_model(cfg.model, cfg.weights)
    for layer in layers:
        _validate_layer(model, cfg.model, layer)
    transform, prep = preprocessing_for(model, cfg.model, cfg.weights)
    prefix = num_prefix_tokens(model)
    x = test_image(prep)
    with torch.inference_mode():
        acts = hook_capture(model, cfg.model, layers)(x)
    pools, dims = [], []
    for layer in layers:
        act = acts[layer]
        pool = "none" if act.ndim == 2 else cfg.pool
        pooled = pool_output(act[:1], pool, prefix)  # raises with the valid choices
        pools.append(pool)
        dims.append(int(pooled.shape[1]))
    model, cut = cut_model(model, cfg.model, cfg.weights, layers, acts, x)
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
        cut="hooks" if cut is None else "truncated" if cut.pruned else "whole",
        _capture=make_capture(model, cfg.model, layers),
        _prefix_tokens=prefix,
    )


def check_compilable(bb: Backbone) -> None:
    """Raise BackboneError (naming ``--set runtime.compile=false``) when the cut goes through hooks."""
    compile_target(bb.model, bb.model_name, bb.layers)


def compile_backbone(bb: Backbone, backend: str = "inductor") -> None:
    """Wrap the cut's forward in ``torch.compile(dynamic=False)``, in place. Raises as `check_compilable`."""
    name = compile_target(bb.model, bb.model_name, bb.layers)
    setattr(bb.model, name, torch.compile(getattr(bb.model, name), backend=backend, dynamic=False))
