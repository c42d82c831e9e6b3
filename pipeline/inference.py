"""Inference-time rewrites of a cut backbone, and how much of fp32 each precision keeps.

- ``fold_batchnorm``: each eval-mode BatchNorm that directly follows a convolution is folded into that
  convolution's weights and bias (timm's BatchNormAct2d keeps its activation). The same arithmetic in fp32
  up to rounding, one pass over the activations fewer: tf_efficientnet_lite0 runs 1.5x faster on the 2-core
  CPU (fp32 50 -> 75 images/s, bf16 120 -> 169).
- ``keep_stem_fp32``: under bf16 autocast, the stem and the first stage (the modules up to the first stage
  boundary) run in fp32. bf16 rounding of the high-resolution early activations is what costs
  depthwise-separable networks their agreement with fp32; the early stages are a small share of the work.
  tf_efficientnet_lite0 on the sample photos: bf16 cosine 0.9983 to fp32, bf16 with an fp32 stem 0.9996,
  at 146 images/s against 169 all-bf16 and 75 fp32.
- ``activation_bytes``: the largest module output of one image, per precision, for the planner's CPU
  forward batch (plan.FORWARD_BYTES).
- ``precision_agreement``: the lowest cosine of each candidate precision's embeddings to fp32 ones, on the
  sample photos encoded as JPEGs, through the model as the Embedder runs it (folded, channels-last). The
  planner picks the fastest precision that keeps ``plan.BF16_MIN_COSINE``.

Both rewrites keep module names (the cut's captured layers are never rewritten) and are checked against the
unrewritten model on a test image when they are applied.
"""

from __future__ import annotations

import copy
import functools
import io
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.backbones import Backbone, _test_image
from pipeline.cuts import make_capture, stage_names

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


def prepare_for_inference(backbone: Backbone, autocast: str = "none") -> dict[str, Any]:
    """Fold BatchNorm into convolutions, and keep the stem in fp32 for ``bf16-stem-fp32``, in place; the
    fold is checked on a test image and undone if it changes the embeddings. Returns what was done."""
    if autocast not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got '{autocast}'")
    model = backbone.model
    model.eval()
    x = _test_image(backbone.preprocessing).to(next(model.parameters()).device)
    with torch.inference_mode():
        ref = backbone.embed_all(x)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    original = copy.deepcopy(model) if has_bn else model
    folds = fold_batchnorm(model, set(backbone.layers))
    if folds:
        backbone._capture = make_capture(model, backbone.model_name, backbone.layers)
        with torch.inference_mode():
            got = backbone.embed_all(x)
        if _max_relative(got, ref) > FOLD_TOLERANCE:
            backbone.model = model = original
            backbone._capture = make_capture(model, backbone.model_name, backbone.layers)
            folds = 0
    stem = keep_stem_fp32(model, backbone.model_name) if AUTOCAST_MODES[autocast][1] else []
    return {"batchnorm_folded": folds, "fp32_stem": stem}


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
        return _test_image(backbone.preprocessing).repeat(4, 1, 1, 1)


def precision_agreement(backbone: Backbone, modes: tuple[str, ...] = ("bf16", "bf16-stem-fp32")
                        ) -> dict[str, float]:
    """For each autocast mode, the lowest cosine between its embeddings and fp32 ones of the sample photos,
    through a copy of the model as the Embedder runs it on CPU (BatchNorm folded, channels-last)."""
    bb = copy.copy(backbone)
    bb.model = copy.deepcopy(backbone.model).cpu()
    bb._capture = make_capture(bb.model, bb.model_name, bb.layers)
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
            run._capture = make_capture(run.model, run.model_name, run.layers)
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
        x = _test_image(backbone.preprocessing).to(next(model.parameters()).device)
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
