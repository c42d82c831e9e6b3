"""Cutting a model at named layers: capture their activations in one forward pass, and pool them.

Layer names: ``final`` (pre-logits features, the usual embedding), ``logits`` (class scores), or the name of a
module inside the model (`stage_names` gives the stage boundaries; any module name from
``model.named_modules()`` is accepted).

How a model is cut (``Backbone.cut`` says which way was taken):

- timm stage boundaries (the ``feature_info`` modules, `stage_names`): ``forward_intermediates``; without
  ``final``/``logits`` the model is pruned with ``prune_intermediate_layers`` (later stages and head dropped).
- timm ``final``/``logits``: ``forward_features`` + ``forward_head`` (with stages too: one
  ``forward_intermediates`` pass gives the stages and the features).
- torchvision: a ``create_feature_extractor`` graph returning the module outputs, the classifier's input
  (``final``) and output (``logits``); nodes past the deepest wanted one are dropped. ``logits`` alone: the
  model's forward.
- any other module: forward hooks on the whole model, the pass stopped at the deepest layer by an exception
  (`make_capture` on an uncut model, `hook_capture`).

A hook-free cut (`cut_model`) is taken only when it gives exactly the hook path's tensors on a test image, at
build time; it is kept on the model (``_CUT_ATTR``) and only such cuts can be compiled (`compile_backbone`).
`pool_output` turns an activation into one vector per image.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.backbone.models import (
    HEAD_LAYERS,
    MAP_POOLS,
    TOKEN_POOLS,
    BackboneError,
    create_model,
    is_torchvision,
    last_linear_name,
    num_prefix_tokens,
)

# --------------------------------------------------------------------------------------------------
# Stages and capturing activations (hooks, or the cut when there is one)


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


def first_tensor(out: Any) -> torch.Tensor:
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

    A model cut by `build_backbone` runs its hook-free cut (for some of its layers: only as far as the deepest
    of them); any other model runs through forward hooks, and when only intermediate layers are wanted the
    pass stops once the deepest is reached. ``final`` is timm's ``forward_head(pre_logits=True)``, or for
    other models the input of the classifier.
    """
    cut = getattr(model, _CUT_ATTR, None)
    if isinstance(cut, _Cut):
        if set(layers) <= set(cut.layers):
            return _cut_capture(model, cut, layers)
        if cut.pruned or cut.kind == "graph":
            raise BackboneError(
                f"model '{name}' was cut for layers {', '.join(cut.layers)} and no longer holds "
                f"{', '.join(x for x in layers if x not in cut.layers)}; build the backbone with those layers"
            )
    return hook_capture(model, name, layers)


def hook_capture(model: nn.Module, name: str, layers: list[str] | tuple[str, ...]
                  ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Images -> {layer: raw activation} through forward hooks on the whole model, from one forward pass.

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
            got.setdefault(layer, first_tensor(out))
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
                    got["logits"] = first_tensor(out)
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


# --------------------------------------------------------------------------------------------------
# Hook-free cuts


_CUT_ATTR = "_pipeline_cut"


@dataclass
class _Cut:
    """A hook-free way to get ``layers`` out of a model, checked against the hooks; kept on the model.

    kind: "timm" (forward_intermediates and/or forward_features + forward_head), "graph" (a torchvision
    feature-extractor GraphModule whose outputs are the layers), "forward" (the model's output: logits).
    """

    kind: str
    layers: tuple[str, ...]
    pruned: bool = False  # what comes after the deepest layer is gone from the model
    indices: dict[str, int] = field(default_factory=dict)  # timm: layer -> forward_intermediates index
    options: dict[str, Any] = field(default_factory=dict)  # timm: further forward_intermediates arguments
    stop_early: bool = False  # timm: forward_intermediates takes stop_early


def _plan_cut(model: nn.Module, name: str, layers: list[str], ref: dict[str, torch.Tensor]) -> _Cut | None:
    """The hook-free cut for these layers, or None where the library offers none (the hooks are used)."""
    inter = [layer for layer in layers if layer not in HEAD_LAYERS]
    head = len(inter) < len(layers)
    if is_torchvision(name):
        if layers == ["logits"]:
            return _Cut("forward", tuple(layers))
        linear = last_linear_name(model)
        if head and (linear is None or linear in inter):
            return None
        return _Cut("graph", tuple(layers), pruned="logits" not in layers)
    if not hasattr(model, "forward_head"):
        return None
    if not inter:
        return _Cut("timm", tuple(layers))
    forward = getattr(model, "forward_intermediates", None)
    info = getattr(model, "feature_info", None)
    if forward is None or not hasattr(model, "prune_intermediate_layers") or not isinstance(info, list):
        return None
    modules = [fi.get("module") if isinstance(fi, dict) else None for fi in info]
    if any(layer not in modules for layer in inter):
        return None
    params = inspect.signature(forward).parameters
    ndims = {ref[layer].ndim for layer in inter}
    options: dict[str, Any] = {}
    if ndims == {3} and "output_fmt" in params:
        options["output_fmt"] = "NLC"  # tokens as the blocks give them, (N, T, C)
        if num_prefix_tokens(model):
            if "return_prefix_tokens" not in params:
                return None
            options["return_prefix_tokens"] = True
    elif ndims != {4}:
        return None
    indices = {layer: modules.index(layer) for layer in inter}
    return _Cut("timm", tuple(layers), pruned=not head, indices=indices, options=options,
                stop_early="stop_early" in params)


def _apply_cut(model: nn.Module, cut: _Cut) -> nn.Module:
    """The model cut: timm pruned in place, torchvision as a feature-extractor graph, or the model itself."""
    if cut.kind == "graph":
        return _tv_graph(model, cut.layers)
    if cut.kind == "timm" and cut.pruned:
        prune = model.prune_intermediate_layers
        params = inspect.signature(prune).parameters
        kwargs = {k: True for k in ("prune_head", "prune_norm") if k in params}  # norm: unused (norm=False)
        prune(sorted(cut.indices.values()), **kwargs)
    return model


def _tv_graph(model: nn.Module, layers: tuple[str, ...]) -> nn.Module:
    """A torchvision model as a graph returning ``layers``: module outputs, and final/logits as the input and
    output of the classifier; the nodes no output needs are gone."""
    import torch.fx
    from torchvision.models.feature_extraction import create_feature_extractor

    nodes = {layer: layer for layer in layers if layer not in HEAD_LAYERS}
    linear = last_linear_name(model) if any(layer in HEAD_LAYERS for layer in layers) else None
    if linear is not None:
        nodes[linear] = "logits"
    extractor = create_feature_extractor(model, return_nodes=nodes)
    graph = getattr(extractor, "eval_graph", extractor.graph)
    out = next(n for n in graph.nodes if n.op == "output")
    outputs = dict(out.args[0])
    if linear is not None:
        if "final" in layers:
            classifier = next(n for n in graph.nodes if n.op == "call_module" and n.target == linear)
            outputs["final"] = classifier.args[0]
        if "logits" not in layers:
            del outputs["logits"]
    out.args = (outputs,)
    graph.eliminate_dead_code()
    graph.lint()
    return torch.fx.GraphModule(extractor, graph).eval()


def _graph_subset(graph_module: nn.Module, layers: tuple[str, ...]) -> nn.Module:
    """A cut graph returning only some of its outputs; it shares the modules and stops at the deepest."""
    import torch.fx

    subset = torch.fx.GraphModule(graph_module, copy.deepcopy(graph_module.graph))
    out = next(n for n in subset.graph.nodes if n.op == "output")
    out.args = ({k: v for k, v in out.args[0].items() if k in layers},)
    subset.graph.eliminate_dead_code()
    subset.recompile()
    return subset.eval()


def _with_prefix(out: Any) -> torch.Tensor:
    """A forward_intermediates output with the prefix (class) tokens put back in front: (N, T, C)."""
    if isinstance(out, (tuple, list)):
        spatial, prefix = out
        return torch.cat([prefix, spatial], dim=1)
    return out


def _cut_capture(model: nn.Module, cut: _Cut, layers: list[str] | tuple[str, ...]
                 ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Images -> {layer: raw activation} through the cut, for ``layers`` (some or all of ``cut.layers``).

    Methods are looked up at each call, so a compiled one (`compile_backbone`) is the one run.
    """
    layers = tuple(layers)
    if cut.kind == "forward":
        return lambda x: {"logits": first_tensor(model(x))}
    if cut.kind == "graph":
        graph = model if set(layers) == set(cut.layers) else _graph_subset(model, layers)
        return lambda x: {layer: out for layer, out in graph(x).items() if layer in layers}
    inter = [layer for layer in layers if layer not in HEAD_LAYERS]
    want_final, want_logits = "final" in layers, "logits" in layers
    order = sorted({cut.indices[layer] for layer in inter})
    kwargs = {"indices": order, **cut.options}
    stop = {"stop_early": True} if cut.stop_early else {}

    def capture(x: torch.Tensor) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        if inter and (want_final or want_logits):
            feats, outs = model.forward_intermediates(x, intermediates_only=False, **kwargs)
        elif inter:
            outs = model.forward_intermediates(x, intermediates_only=True, **stop, **kwargs)
        else:
            feats = model.forward_features(x)
        for layer in inter:
            got[layer] = _with_prefix(outs[order.index(cut.indices[layer])])
        if want_final:
            got["final"] = model.forward_head(feats, pre_logits=True)
        if want_logits:
            got["logits"] = model.forward_head(feats)
        return got

    return capture


def cut_model(model: nn.Module, name: str, weights: str, layers: list[str], ref: dict[str, torch.Tensor],
               x: torch.Tensor) -> tuple[nn.Module, _Cut | None]:
    """Cut the model without hooks where that gives exactly ``ref`` (the hooks' activations for ``x``);
    otherwise the whole model (built again if pruning had started) with no cut: the hooks are used."""
    cut = _plan_cut(model, name, layers, ref)
    if cut is None:
        return model, None
    try:
        cut_model = _apply_cut(model, cut)
        with torch.inference_mode():
            got = _cut_capture(cut_model, cut, layers)(x)
        same = all(torch.equal(got[layer], ref[layer]) for layer in layers)
    except Exception:  # noqa: BLE001 - a model the library's cut does not fit keeps the hooks
        same = False
    if same:
        setattr(cut_model, _CUT_ATTR, cut)
        return cut_model, cut
    if cut.pruned and cut.kind == "timm":
        model = create_model(name, weights)[0]
    return model.eval(), None


# --------------------------------------------------------------------------------------------------
# Compiling a cut, pooling an activation


def compile_target(model: nn.Module, name: str, layers: tuple[str, ...]) -> str:
    """The method of a cut model that torch.compile wraps (timm: forward_features or forward_intermediates;
    torchvision: the model's or cut graph's forward); BackboneError naming ``--set runtime.compile=false``
    when the layers are captured with hooks."""
    cut = getattr(model, _CUT_ATTR, None)
    if not isinstance(cut, _Cut):
        stages = ", ".join(stage_names(model, name))
        raise BackboneError(
            f"runtime.compile cannot compile layer {', '.join(layers)} of {name}: it is captured "
            "with forward hooks, which a compiled graph does not run. Compilable layers: final, logits and "
            f"the stage boundaries ({stages}) of timm models, any module of torchvision models; or use "
            "--set runtime.compile=false"
        )
    if cut.kind == "timm":
        return "forward_intermediates" if cut.indices else "forward_features"
    return "forward"


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
        if pool in ("grid2", "grid3"):  # an average per cell of a 2x2 / 3x3 grid: where things are, coarsely
            return nn.functional.adaptive_avg_pool2d(x, int(pool[-1])).flatten(1)
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
