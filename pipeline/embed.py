"""The Embedder: a Ray-free callable class. ``__init__`` loads the backbone once; ``__call__`` maps a batch of
rows ``{id, source, label, bytes, error_kind, error_message, shard, row}`` to embedding rows.

Bad bytes become error rows (kind + message), never an exception that kills the batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.backbones import Backbone, build_backbone
from pipeline.config import BackboneConfig
from pipeline.decode import DecodeError, decode_image

PASS_THROUGH = ("id", "source", "label", "shard", "row")


def output_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """Rows leaving the Embedder: the embeddings contract plus error columns and shard bookkeeping."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([
        ("id", pa.string()),
        ("source", pa.string()),
        ("label", pa.string()),
        ("embedding", pa.list_(value, dim)),
        ("error_kind", pa.string()),
        ("error_message", pa.string()),
        ("shard", pa.string()),
        ("row", pa.int64()),
    ])


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but no CUDA device is visible: use "
                         "--set runtime.device=cpu "
                         "or give the actors GPUs (--gpus-per-actor 1)")
    return torch.device(device)


def _column(batch: dict[str, Any] | pa.Table, name: str, n: int) -> list[Any]:
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist() if name in batch.column_names else [None] * n
    col = batch.get(name)
    if col is None:
        return [None] * n
    return list(col.tolist() if isinstance(col, np.ndarray) and col.dtype != object else col)


class Embedder:
    """Decode, preprocess, forward to the cut layer, pool.

    Args:
        backbone: a BackboneConfig (or its dict).
        device: auto | cpu | cuda.
        autocast: none | bf16 | fp16 (applies on CUDA).
        dtype: float32 | float16 output values.
        max_pixels, max_bytes: decode limits; larger images are error rows.
        threads: decode/preprocess threads (default: torch's intra-op thread count).
    """

    def __init__(
        self,
        backbone: BackboneConfig | dict[str, Any],
        *,
        device: str = "auto",
        autocast: str = "none",
        dtype: str = "float32",
        max_pixels: int = 50_000_000,
        max_bytes: int = 64 * 1024 * 1024,
        threads: int | None = None,
    ) -> None:
        cfg = backbone if isinstance(backbone, BackboneConfig) else BackboneConfig(**backbone)
        self.device = resolve_device(device)
        self.backbone: Backbone = build_backbone(cfg, self.device)
        self.autocast = autocast
        self.dtype = dtype
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.schema = output_schema(self.backbone.dim, dtype)
        # Ray sets OMP_NUM_THREADS (and so torch's thread count) to the actor's CPUs.
        self.threads = max(1, int(threads or torch.get_num_threads()))
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    # -- one image --------------------------------------------------------------------------------
    def _prepare(self, data: bytes | None) -> torch.Tensor | DecodeError:
        img = decode_image(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        if isinstance(img, DecodeError):
            return img
        try:
            return self.backbone.transform(img)
        except Exception as e:  # noqa: BLE001 - a bad image is data, not a crash
            return DecodeError("preprocess_failed", f"{type(e).__name__}: {e}")

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, non_blocking=True)
        use_amp = self.autocast != "none" and self.device.type == "cuda"
        amp_dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
            out = self.backbone.embed(x)
        return out.float().cpu().numpy()

    # -- a batch ----------------------------------------------------------------------------------
    def __call__(self, batch: dict[str, Any] | pa.Table) -> pa.Table:
        n = batch.num_rows if isinstance(batch, pa.Table) else len(next(iter(batch.values())))
        cols = {k: _column(batch, k, n) for k in (*PASS_THROUGH, "bytes", "error_kind", "error_message")}
        kinds: list[str | None] = list(cols["error_kind"])
        messages: list[str | None] = list(cols["error_message"])

        todo = [i for i in range(n) if kinds[i] is None]
        raw = [cols["bytes"][i] for i in todo]
        prepared = list(self._pool.map(self._prepare, raw)) if self._pool else [self._prepare(b) for b in raw]

        good: list[int] = []
        tensors: list[torch.Tensor] = []
        for i, p in zip(todo, prepared):
            if isinstance(p, DecodeError):
                kinds[i], messages[i] = p.kind, p.message
            else:
                good.append(i)
                tensors.append(p)

        dim = self.backbone.dim
        values = np.zeros((n, dim), dtype=np.float32)
        if tensors:
            try:
                values[good] = self._forward(torch.stack(tensors))
            except Exception as e:  # noqa: BLE001 - keep the rows, mark them failed
                for i in good:
                    kinds[i], messages[i] = "model_failed", f"{type(e).__name__}: {e}"
                good = []
        valid = np.zeros(n, dtype=bool)
        valid[good] = True

        np_dtype = np.float16 if self.dtype == "float16" else np.float32
        flat = pa.array(values.astype(np_dtype).reshape(-1))
        emb = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))
        for i in good:
            kinds[i] = messages[i] = None
        return pa.Table.from_arrays(
            [
                pa.array(cols["id"], pa.string()),
                pa.array(cols["source"], pa.string()),
                pa.array(cols["label"], pa.string()),
                emb,
                pa.array(kinds, pa.string()),
                pa.array(messages, pa.string()),
                pa.array(cols["shard"], pa.string()),
                pa.array(cols["row"], pa.int64()),
            ],
            schema=self.schema,
        )
