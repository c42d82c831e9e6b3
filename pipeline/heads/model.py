"""A head and its artifact: the module (standardization + linear layer or MLP) and the files
``head.safetensors`` + ``head.json`` (which records the EmbeddingSpec features it was trained on)."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import torch
from torch import nn

from pipeline import storage
from pipeline.reports import head_png

HEAD_WEIGHTS = "head.safetensors"
HEAD_META = "head.json"
HEAD_REPORT = "report.png"
FORMAT_VERSION = 1


class Standardize(nn.Module):
    """(x - mean) / std with the training split's statistics, stored with the head."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class HeadModel(nn.Module):
    """Standardization followed by a linear layer (multinomial logistic regression) or an MLP."""

    def __init__(self, dim: int, num_classes: int, head: str = "linear", hidden: list[int] | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = Standardize(dim)
        layers: list[nn.Module] = []
        width = dim
        if head == "mlp":
            for h in hidden or []:
                layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
                width = h
        elif head != "linear":
            raise ValueError(f"unknown head '{head}': use linear or mlp")
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


def head_device(device: str) -> torch.device:
    """The head's device setting as a torch device; ValueError naming the head's own setting."""
    from pipeline.preprocess import resolve_device

    return resolve_device(device, fix="device cpu (or auto)")


# --------------------------------------------------------------------------------------------------
# Artifacts


def write_head(output: str, model: HeadModel, meta: dict[str, Any]) -> dict[str, str]:
    """head.safetensors, report.png, then head.json (written last: it marks the head complete)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out = {"weights": storage.join(output, HEAD_WEIGHTS), "meta": storage.join(output, HEAD_META),
           "report": storage.join(output, HEAD_REPORT)}
    storage.write_bytes(out["weights"], save(state, metadata={"format": "pipeline-head"}))
    storage.write_bytes(out["report"], head_png(meta))
    storage.write_json(out["meta"], meta, indent=2, default=str)  # last: marks done
    return out


def _head_dir(uri: str) -> str:
    base = uri.rstrip("/")
    if posixpath.basename(base) in (HEAD_WEIGHTS, HEAD_META):
        return base[: -len(posixpath.basename(base))].rstrip("/") or "."
    return base


def load_head(uri: str, device: str = "cpu") -> tuple[HeadModel, dict[str, Any]]:
    """The trained module (eval mode; input: raw embeddings, output: logits) and its head.json."""
    from safetensors.torch import load

    root = _head_dir(uri)
    try:
        meta = json.loads(storage.read_bytes(storage.join(root, HEAD_META)))
        state = load(storage.read_bytes(storage.join(root, HEAD_WEIGHTS)))
    except storage.StorageError as e:
        raise ValueError(f"no head at '{uri}' ({e}): pass the output folder of `pipeline heads train`") from e
    h = meta["head"]
    model = HeadModel(h["input_dim"], h["num_classes"], h["type"], h["hidden"], h["dropout"])
    model.load_state_dict(state)
    model.eval()
    return model.to(head_device(device)), meta
