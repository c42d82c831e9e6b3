"""Inference-time rewrites of a cut backbone, and how much of fp32 each precision keeps.

- ``fold_batchnorm``: each eval-mode BatchNorm that directly follows a convolution is folded into that
  convolution's weights and bias (timm's BatchNormAct2d keeps its activation). The same arithmetic in fp32
  up to rounding, one pass over the activations fewer.
- ``fuse_conv_activations``: each convolution whose output goes only to a ReLU or ReLU6 (found in the traced
  graph of the model: what runs, not the order modules were registered in) runs as one oneDNN convolution
  with the activation as a post-op, on CPU. The same values (bit for bit, tested); one pass over the
  activations fewer, and a TensorFlow-"same" depthwise convolution reads its input without a padded copy.
- ``keep_stem_fp32``: under bf16 autocast, the stem and the first stage (the modules up to the first stage
  boundary) run in fp32. bf16 rounding of the high-resolution early activations is what costs
  depthwise-separable networks their agreement with fp32; the early stages are a small share of the work.
- ``activation_bytes``: the largest module output of one image, per precision, for the planner's CPU
  forward batch (plan.FORWARD_BYTES).
- ``precision_agreement``: the lowest cosine of each candidate precision's embeddings to fp32 ones, on the
  sample photos encoded as JPEGs, through the model as the Embedder runs it (folded, channels-last). The
  planner picks the fastest precision that keeps ``plan.BF16_MIN_COSINE``.

The rewrites keep module names (the cut's captured layers are never rewritten) and are checked against the
unrewritten model on a test image when they are applied. What each gains, measured: bench/RESULTS.md
("BatchNorm folded", "activations fused", "precision").
"""

from __future__ import annotations

import copy
import functools
import io
from typing import Any

import torch
import torch.fx
from timm.layers import Conv2dSame, get_same_padding
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.backbone import Backbone
from pipeline.backbone.cuts import stage_names
from pipeline.backbone.models import test_image

# autocast modes -> (torch autocast dtype or None, stem kept in fp32)
AUTOCAST_MODES = {"none": (None, False), "bf16": (torch.bfloat16, False),
                  "bf16-stem-fp32": (torch.bfloat16, True), "fp16": (torch.float16, False)}
FOLD_TOLERANCE = 1e-3  # relative: a fold that changes the test image's embedding more than this is undone


class _ActOnly(nn.Module):
    """What is left of timm's BatchNormAct2d once its normalization is folded into the convolution before it
    (the same attribute names: ``drop``, ``act``)."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _holds(name: str, keep: set[str]) -> bool:
    """Whether module ``name`` is one of ``keep`` or contains one (folding it would change that output)."""
    return any(name == k or k.startswith(name + ".") for k in keep)


def fold_batchnorm(model: nn.Module, keep: set[str] = frozenset()) -> int:
    """Fold each BatchNorm2d that follows a Conv2d among the same parent's children into it, in place; a
    convolution or BatchNorm that is (or holds) a module named in ``keep`` (the captured layers) is left as
    it is. Returns the number of folds. Registration order stands in for the order of execution: callers
    check the result (``prepare_for_inference``). Modules in training mode are not folded."""
    folded = 0
    for parent_name, parent in list(model.named_modules()):
        kids = list(parent.named_children())
        for (na, a), (nb, b) in zip(kids, kids[1:]):
            full_a = f"{parent_name}.{na}" if parent_name else na
            full_b = f"{parent_name}.{nb}" if parent_name else nb
            if not (isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)):
                continue
            if a.training or b.training or not b.track_running_stats or b.running_mean is None:
                continue
            if a.out_channels != b.num_features or _holds(full_a, keep) or _holds(full_b, keep):
                continue
            setattr(parent, na, fuse_conv_bn_eval(a, b))
            rest = _ActOnly(b.drop, b.act) if hasattr(b, "act") and hasattr(b, "drop") else nn.Identity()
            setattr(parent, nb, rest)
            folded += 1
    return folded


# -- a convolution and its activation as one oneDNN call ----------------------------------------------

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)


def _fusable_conv(m: nn.Module) -> bool:
    """A plain 2-D convolution (not a subclass that changes its weights in forward, like a
    weight-standardized one), zero-padded by numbers, or timm's TensorFlow-"same" one."""
    if type(m) is Conv2dSame:
        return True
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _same_padding(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """timm's pad_same for one side: (before, after)."""
    total = get_same_padding(size, k, s, d)
    return total // 2, total - total // 2


class ConvAct2d(nn.Module):
    """A convolution and the ReLU / ReLU6 that takes its output (``conv``, ``act``), on CPU run as one oneDNN
    convolution with the activation as a post-op (``torch.ops.mkldnn._convolution_pointwise``), in the
    autocast precision the convolution would run in. A TensorFlow-"same" convolution padded one more after
    than before is run with symmetric padding and its kernel shifted by one zero tap (depthwise: no padded
    copy of the input; a dense one pads the input first). Anywhere else (another device, fp16, autograd)
    the two modules run one after the other."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.act = act
        if isinstance(act, nn.Hardtanh):  # ReLU6 is one
            self._attr, self._scalars = "hardtanh", [float(act.min_val), float(act.max_val)]
        else:
            self._attr, self._scalars = "relu", []
        self._same = type(conv) is Conv2dSame
        self._cast: dict[tuple, tuple] = {}
        self.train(conv.training)

    def _weights(self, dtype: torch.dtype, shift: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias in ``dtype`` (with the kernel shifted by ``shift`` zero taps), cached until the
        parameters change (a new memory format, a load)."""
        w, b = self.conv.weight, self.conv.bias
        key = (dtype, shift)
        stamp = (w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
        hit = self._cast.get(key)
        if hit is None or hit[0] != stamp:
            cw = w.to(dtype)
            if shift != (0, 0):
                cw = nn.functional.pad(cw, (shift[1], 0, shift[0], 0))
            cl = w.is_contiguous(memory_format=torch.channels_last)
            cw = cw.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            hit = self._cast[key] = (stamp, cw, None if b is None else b.to(dtype))
        return hit[1], hit[2]

    def _dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The precision to run in, or None where the fused op does not apply."""
        if x.device.type != "cpu" or x.dim() != 4 or self.training:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or self.conv.weight.requires_grad):
            return None
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            if not (x.is_floating_point() and x.dtype in (torch.float32, torch.bfloat16)):
                return None
        else:
            dtype = x.dtype
            if dtype != self.conv.weight.dtype:
                return None
        if dtype == torch.float32 or (dtype == torch.bfloat16 and _mkldnn_bf16()):
            return dtype
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._dtype(x)
        if dtype is None:
            return self.act(self.conv(x))
        c = self.conv
        k, s, d = c.weight.shape[-2:], c.stride, c.dilation
        shift = (0, 0)
        if self._same:
            (t, bo), (le, r) = (_same_padding(x.shape[-2], k[0], s[0], d[0]),
                                _same_padding(x.shape[-1], k[1], s[1], d[1]))
            depthwise = c.groups > 1 and c.weight.shape[1] == 1
            if t == bo and le == r:
                padding = [t, le]
            elif depthwise and d == (1, 1):  # after - before is 0 or 1 on each side
                shift, padding = (bo - t, r - le), [bo, r]  # one zero tap first: the window starts one later
            else:
                x = nn.functional.pad(x, (le, r, t, bo))
                padding = [0, 0]
        else:
            padding = list(c.padding)
        w, b = self._weights(dtype, shift)
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), w, b, padding, list(s), list(d), c.groups, self._attr, self._scalars, "")


@functools.cache
def _mkldnn_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fusion_available() -> bool:
    """Whether this torch build runs a convolution with a fused activation on CPU (oneDNN)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class _LeafTracer(torch.fx.Tracer):
    """Traces down to modules without children (and convolutions, whose padding timm computes from sizes)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Conv2d) or not any(True for _ in m.children())


def _traced(module: nn.Module, prefix: str = "") -> list[tuple[str, torch.fx.Graph]]:
    """The graphs of ``module``'s forward, or where it cannot be traced (control flow on values), of its
    children's, recursively: (name prefix of the graph's module targets, graph)."""
    try:
        return [(prefix, _LeafTracer().trace(module))]
    except Exception:  # noqa: BLE001 - any tracing failure: look one level down
        out = []
        for name, child in module.named_children():
            if any(True for _ in child.children()):
                out += _traced(child, f"{prefix}{name}.")
        return out


def conv_activation_pairs(model: nn.Module) -> list[tuple[str, list[str], str]]:
    """(convolution, modules between, activation) whose dataflow is conv -> Identity ... -> ReLU/ReLU6 with
    each output read only by the next, each module called once: where the activation can run inside the
    convolution."""
    modules = dict(model.named_modules())
    pairs = []
    for prefix, graph in _traced(model):
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules[prefix + node.target], _ACTIVATIONS):
                continue
            chain, src = [], node
            while True:
                if len(src.args) != 1 or src.kwargs or not isinstance(src.args[0], torch.fx.Node):
                    break
                prev = src.args[0]
                if prev.op != "call_module" or len(prev.users) != 1 or calls[prev.target] != 1:
                    break
                m = modules[prefix + prev.target]
                if type(m) is nn.Identity:
                    chain.append(prefix + prev.target)
                    src = prev
                    continue
                if _fusable_conv(m) and calls[node.target] == 1 and len(prev.args) == 1 and not prev.kwargs:
                    pairs.append((prefix + prev.target, chain[::-1], prefix + node.target))
                break
    return pairs


def fuse_conv_activations(model: nn.Module, keep: set[str] = frozenset()
                          ) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace each (convolution, activation) of ``conv_activation_pairs`` with a ``ConvAct2d`` at the
    convolution's name and an Identity at the activation's, in place, unless what a kept layer outputs would
    change (a kept layer is or holds one of the pair or the modules between, or holds the convolution but not
    the activation). Returns what was replaced, (parent, name, module), for undoing."""
    if not fusion_available():
        return []
    replaced = []
    for conv, between, act in conv_activation_pairs(model):
        if any(_holds(n, keep) for n in (conv, *between, act)):
            continue
        if any(conv.startswith(k + ".") and not act.startswith(k + ".") for k in keep):
            continue
        for name, new in ((conv, ConvAct2d(model.get_submodule(conv), model.get_submodule(act))),
                          (act, nn.Identity())):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            replaced.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)
    return replaced


def stem_modules(model: nn.Module, model_name: str) -> list[str]:
    """The modules that run before the first stage boundary ends, and that stage: e.g. conv_stem, bn1,
    blocks.0 of an EfficientNet; conv1, bn1, act1 of a timm ResNet; features.0 of a torchvision MobileNet.
    Children are taken in the order they were registered (the order timm and torchvision models run them).
    A "stage" holding most of the model (a cut torchvision model's ``features``) is split into its
    children."""
    stages = stage_names(model, model_name)
    if not stages:
        return []
    modules = dict(model.named_modules())
    total = sum(p.numel() for p in model.parameters()) or 1
    first = stages[0]
    while True:
        kids = list(modules[first].named_children()) if first in modules else []
        if len(kids) < 2 or sum(p.numel() for p in modules[first].parameters()) <= total / 2:
            break
        first = f"{first}.{kids[0][0]}"
    names: list[str] = []
    prefix = ""
    module = model
    for part in first.split("."):
        children = dict(module.named_children())
        if part not in children:
            return []
        for child in children:
            if child == part:
                break
            names.append(prefix + child)
        module = children[part]
        prefix = prefix + part + "."
    names.append(first)
    return names


def _fp32_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    with torch.autocast(tensors[0].device.type if tensors else "cpu", enabled=False):
        return forward(*args, **kwargs)


def keep_stem_fp32(model: nn.Module, model_name: str) -> list[str]:
    """Run the stem modules (``stem_modules``) in fp32 under autocast, in place; their names are unchanged.
    Returns the names."""
    names = stem_modules(model, model_name)
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        if getattr(m, "_fp32_stem", False):
            continue
        m.forward = functools.partial(_fp32_forward, m.forward)
        m._fp32_stem = True
    return names


def _max_relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12))
               for x, y in zip(a, b))


def _keeps_embeddings(backbone: Backbone, x: torch.Tensor, ref: list[torch.Tensor]) -> bool:
    """Whether the rewritten model (captured afresh) embeds the test image as before (FOLD_TOLERANCE)."""
    backbone.recapture()
    with torch.inference_mode():
        return _max_relative(backbone.embed_all(x), ref) <= FOLD_TOLERANCE


def prepare_for_inference(backbone: Backbone, autocast: str = "none", fuse: bool = False) -> dict[str, Any]:
    """Fold BatchNorm into convolutions, with ``fuse`` run each convolution and its ReLU as one (CPU, not
    compiled: compiling fuses by itself), and keep the stem in fp32 for ``bf16-stem-fp32``, in place; the
    fold and the fusion are each checked on a test image and undone if they change the embeddings. Returns
    what was done."""
    if autocast not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got '{autocast}'")
    model = backbone.model
    model.eval()
    x = test_image(backbone.preprocessing).to(next(model.parameters()).device)
    with torch.inference_mode():
        ref = backbone.embed_all(x)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    original = copy.deepcopy(model) if has_bn else model
    folds = fold_batchnorm(model, set(backbone.layers))
    if folds and not _keeps_embeddings(backbone, x, ref):
        backbone.model = model = original
        folds = 0
    fused = fuse_conv_activations(model, set(backbone.layers)) if fuse else []
    if fused and not _keeps_embeddings(backbone, x, ref):
        for parent, child, module in reversed(fused):
            setattr(parent, child, module)
        fused = []
    backbone.recapture()
    stem = keep_stem_fp32(model, backbone.model_name) if AUTOCAST_MODES[autocast][1] else []
    return {"batchnorm_folded": folds, "activations_fused": len(fused) // 2, "fp32_stem": stem}


def _sample_batch(backbone: Backbone) -> torch.Tensor:
    """The sample photos, JPEG-encoded and decoded as stored images are, through the model's transform (a
    seeded noise image where scikit-image, which ships the photos, is not installed)."""
    try:
        from PIL import Image

        from pipeline import samples

        images = []
        for n in samples.PHOTOS:
            buf = io.BytesIO()
            samples.photo(n).convert("RGB").save(buf, format="JPEG", quality=92)
            images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        return torch.stack([backbone.transform(im) for im in images])
    except ImportError:
        return test_image(backbone.preprocessing).repeat(4, 1, 1, 1)


def precision_agreement(backbone: Backbone, modes: tuple[str, ...] = ("bf16", "bf16-stem-fp32")
                        ) -> dict[str, float]:
    """For each autocast mode, the lowest cosine between its embeddings and fp32 ones of the sample photos,
    through a copy of the model as the Embedder runs it on CPU (BatchNorm folded, channels-last; the fused
    activations change no value, so they are left out)."""
    bb = copy.copy(backbone)
    bb.model = copy.deepcopy(backbone.model).cpu()
    bb.recapture()
    prepare_for_inference(bb, "none")
    bb.model.to(memory_format=torch.channels_last)
    x = _sample_batch(bb).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = bb.embed_all(x)
    out: dict[str, float] = {}
    for mode in modes:
        dtype, stem = AUTOCAST_MODES[mode]
        run = bb
        if stem:
            run = copy.copy(bb)
            run.model = copy.deepcopy(bb.model)
            keep_stem_fp32(run.model, run.model_name)
            run.recapture()
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
            low = run.embed_all(x)
        out[mode] = float(min(nn.functional.cosine_similarity(a.double(), b.double(), dim=1).min().item()
                              for a, b in zip(low, ref)))
    return out


def activation_bytes(backbone: Backbone, modes: tuple[str, ...] = ("none", "bf16", "bf16-stem-fp32")
                     ) -> dict[str, int]:
    """Per autocast mode, the bytes of the largest output of any module for one image: one fp32 forward of
    the test image with hooks, each output counted at 4 bytes per value where the mode runs that module in
    fp32 (all of ``none``; the stem of ``bf16-stem-fp32``) and 2 where it runs in bf16."""
    model = backbone.model
    numel: dict[str, int] = {}
    hooks = [m.register_forward_hook(functools.partial(_record_numel, numel, name))
             for name, m in model.named_modules() if not any(True for _ in m.children())]
    try:
        x = test_image(backbone.preprocessing).to(next(model.parameters()).device)
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    stem = stem_modules(model, backbone.model_name)
    out: dict[str, int] = {}
    for mode in modes:
        dtype, keep_stem = AUTOCAST_MODES[mode]
        out[mode] = max((n * (4 if dtype is None or (keep_stem and _within(name, stem)) else 2)
                         for name, n in numel.items()), default=0)
    return out


def _record_numel(numel: dict[str, int], name: str, module: nn.Module, args: Any, output: Any) -> None:
    if isinstance(output, torch.Tensor):
        numel[name] = output[0].numel() if output.dim() > 0 else 1


def _within(name: str, roots: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)
