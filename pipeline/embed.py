"""The Embedder: a Ray-free callable class. ``__init__`` loads the backbone once; ``__call__`` maps a batch of
rows ``{id, source, label, bytes, error_kind, error_message, shard, row}`` to embedding rows, or, in the
classify task, to the top-k classes of the model's own head.

`pipeline.preprocess.Preprocessor` turns encoded images into a model-ready batch (the PIL decoder with the
model's transform, or the batched tensor decoder). Bad bytes become error rows (kind + message), never an
exception that kills the batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.allocator import tune_allocator
from pipeline.backbone import Backbone, build_backbone, compile_backbone
from pipeline.backbone.inference import AUTOCAST_MODES, prepare_for_inference
from pipeline.backbone.models import resize_side
from pipeline.config import MAX_BYTES, BackboneConfig, RuntimeConfig
from pipeline.preprocess import Preprocessor, resolve_autocast, resolve_device
from pipeline.preprocess.tensorprep import TensorPrep

PASS_THROUGH = ("id", "source", "label", "shard", "row")


def embedding_column(i: int, n_layers: int) -> str:
    """Column of layer i: ``embedding`` for a single layer, ``embedding_<i>`` when several are captured."""
    return "embedding" if n_layers == 1 else f"embedding_{i}"


CLASSIFY_COLUMNS = [("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
                    ("classes", pa.list_(pa.int32()))]


def output_schema(dims: int | list[int], dtype: str = "float32", task: str = "embed") -> pa.Schema:
    """Rows leaving the Embedder: the embeddings contract (or the classify columns) plus error columns and
    shard bookkeeping."""
    dims = [dims] if isinstance(dims, int) else list(dims)
    value = pa.float16() if dtype == "float16" else pa.float32()
    payload = CLASSIFY_COLUMNS if task == "classify" else \
        [(embedding_column(i, len(dims)), pa.list_(value, d)) for i, d in enumerate(dims)]
    return pa.schema([("id", pa.string()), ("source", pa.string()), ("label", pa.string()), *payload,
                      *BOOKKEEPING])


BOOKKEEPING = [("error_kind", pa.string()), ("error_message", pa.string()), ("shard", pa.string()),
               ("row", pa.int64()),
               # where the actor's time went, as each row's share of its batch (summed into the run summary)
               ("decode_s", pa.float32()), ("forward_s", pa.float32()), ("gpu_util", pa.float32())]


def gpu_utilization(device: torch.device) -> float | None:
    """The GPU's utilization (percent, over the last sample period) via NVML; None on CPU or without it."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - pynvml missing or unsupported: report nothing rather than fail
        return None


def _column(batch: dict[str, Any] | pa.Table, name: str, n: int) -> list[Any]:
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist() if name in batch.column_names else [None] * n
    col = batch.get(name)
    if col is None:
        return [None] * n
    return list(col.tolist() if isinstance(col, np.ndarray) and col.dtype != object else col)


@dataclass(frozen=True)
class EmbedderSpec:
    """What an Embedder is built from, typed and frozen; a command builds it once on the driver with the
    runtime the planner resolved, and each actor builds its Embedder from it.

    ``layers``: capture several layers in one pass (columns embedding_0..; default: backbone.layer);
    ``dtype``: float32 | float16 output values; ``task``: embed | classify (the backbone cut at ``logits``,
    softmax top-``top_k`` with ImageNet class names); ``max_bytes``: larger encoded images are error rows
    (source.max_bytes). Runtime settings left ``auto`` (a spec made by hand) are resolved for the actor's
    device: bf16 on a CUDA device that computes it, the tensor decoder on CUDA, else fp32 and PIL.
    """

    backbone: BackboneConfig
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    layers: tuple[str, ...] | None = None
    dtype: str = "float32"
    task: str = "embed"
    top_k: int = 5
    max_bytes: int = MAX_BYTES

    def __post_init__(self) -> None:
        if self.task not in ("embed", "classify"):
            raise ValueError(f"task must be embed or classify, got '{self.task}'")
        if self.task == "classify":  # the model's own head, as is
            object.__setattr__(self, "backbone",
                               self.backbone.model_copy(update={"layer": "logits", "normalize": False}))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    @classmethod
    def of(cls, backbone: BackboneConfig | dict[str, Any],
           runtime: RuntimeConfig | dict[str, Any] | None = None, **fields: Any) -> EmbedderSpec:
        """A spec from a backbone section and runtime settings, either as configs or as their dicts."""
        cfg = backbone if isinstance(backbone, BackboneConfig) else BackboneConfig(**backbone)
        rt = runtime if isinstance(runtime, RuntimeConfig) else RuntimeConfig(**(runtime or {}))
        return cls(cfg, rt, **fields)


class Embedder:
    """Decode, preprocess, forward to the cut layer(s), pool; or, with ``task="classify"``, the top-k
    classes of the model's own head. Built from an `EmbedderSpec`; ``threads``: decode/preprocess threads
    (default: the runtime's, else torch's intra-op thread count); ``compile_backend``: torch.compile's
    backend (inductor; eager only traces, for tests).

    With ``runtime.compile`` the first batch pays for compilation (seconds on a GPU, about a minute on CPU);
    shorter forwards are padded to the compiled size so that one graph serves the whole run.
    ``runtime.forward_batch`` splits each batch into forwards of that many images (planned on CPU).
    """

    def __init__(self, spec: EmbedderSpec, *, threads: int | None = None,
                 compile_backend: str = "inductor") -> None:
        if not isinstance(spec, EmbedderSpec):
            raise TypeError(f"Embedder takes an EmbedderSpec, got {type(spec).__name__}: "
                            "use Embedder(EmbedderSpec.of(backbone, runtime))")
        cfg, rt, task, dtype = spec.backbone, spec.runtime, spec.task, spec.dtype
        layers = list(spec.layers) if spec.layers else None
        self.spec = spec
        self.task = task
        self.device = resolve_device(rt.device)
        # every batch allocates the same large buffers: keep them mapped instead of faulting them in again
        self.allocator_tuned = tune_allocator()
        if rt.threads:  # the actor's CPU share, set explicitly (Ray's OMP_NUM_THREADS rounds it down)
            torch.set_num_threads(rt.threads)
            threads = threads or rt.threads
        self.backbone: Backbone = build_backbone(cfg, self.device, layers)
        self.autocast = resolve_autocast(rt.autocast, self.device)
        # BatchNorm folded into the convolutions, each ReLU run inside its convolution on CPU unless compiled
        # (both checked on a test image); the stem in fp32 when asked
        self.prepared = prepare_for_inference(self.backbone, self.autocast,
                                              fuse=self.device.type == "cpu" and rt.compile is not True)
        self.dtype = dtype
        self.schema = output_schema(list(self.backbone.dims), dtype, task)
        if task == "classify":
            self.names = imagenet_class_names(cfg.model, self.backbone.dim)
            self.top_k = min(spec.top_k, self.backbone.dim)
        if rt.channels_last is None:  # unplanned: on for CUDA and for bf16
            self.channels_last = self.device.type == "cuda" or self.autocast.startswith("bf16")
        else:
            self.channels_last = rt.channels_last
        if self.channels_last:
            self.backbone.model.to(memory_format=torch.channels_last)
        side = resize_side(self.backbone.preprocessing)
        self.prep = Preprocessor(self.backbone.transform, self.device, decoder=rt.decoder,
                                 max_pixels=rt.max_pixels, max_bytes=spec.max_bytes, resize_side=side,
                                 jpeg_draft=rt.jpeg_draft, threads=threads, channels_last=self.channels_last)
        self.forward_batch = rt.forward_batch  # images per model forward; None: the whole batch
        self.compiled_batch = 0  # the batch size the compiled graph was built for; 0: not compiled
        if rt.compile is True:
            compile_backbone(self.backbone, compile_backend)
            self.compiled_batch = -1  # set by the first batch
        # Calls may run concurrently (one decoding while another is in the model): per-call state is
        # thread-local and the model is entered by one call at a time.
        self._model_lock = threading.Lock()
        self._local = threading.local()

    @property
    def decoder(self) -> str:
        return self.prep.decoder

    @property
    def tensor_prep(self) -> TensorPrep | None:
        return self.prep.tensor_prep

    @property
    def draft_size(self) -> tuple[int, int] | None:
        return self.prep.draft_size

    @property
    def threads(self) -> int:
        return self.prep.threads

    def _forward(self, x: torch.Tensor) -> list[np.ndarray]:
        """The batch through the model in forwards of ``forward_batch`` images (runtime.forward_batch: on
        CPU, small enough that the allocator reuses the activations' memory), outputs joined in order."""
        x = x.to(self.device, non_blocking=True)
        n = x.shape[0]
        step = self.forward_batch or n
        amp_dtype = AUTOCAST_MODES[self.autocast][0]
        parts: list[list[torch.Tensor]] = []
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=amp_dtype or torch.float32,
                                                    enabled=amp_dtype is not None):
            for i in range(0, n, step):
                part = x[i:i + step]
                m = part.shape[0]
                if self.compiled_batch:
                    # One graph for the run: a short forward is padded with zeros to the compiled size.
                    self.compiled_batch = max(self.compiled_batch, m)
                    if m < self.compiled_batch:
                        part = torch.cat([part, part.new_zeros((self.compiled_batch - m, *part.shape[1:]))])
                if self.channels_last:
                    part = part.contiguous(memory_format=torch.channels_last)
                parts.append([o[:m].float() for o in self.backbone.embed_all(part)])
        return [torch.cat([p[j] for p in parts]).cpu().numpy() for j in range(len(parts[0]))]

    # -- a batch ----------------------------------------------------------------------------------
    def _rows(self, batch: dict[str, Any] | pa.Table):
        """Decode and forward a batch: (columns, error kinds, messages, per-layer values, valid mask)."""
        n = batch.num_rows if isinstance(batch, pa.Table) else len(next(iter(batch.values())))
        cols = {k: _column(batch, k, n) for k in (*PASS_THROUGH, "bytes", "error_kind", "error_message")}
        kinds: list[str | None] = list(cols["error_kind"])
        messages: list[str | None] = list(cols["error_message"])

        todo = [i for i in range(n) if kinds[i] is None]
        raw = [cols["bytes"][i] for i in todo]
        t0 = time.perf_counter()
        x, errors = self.prep(raw)
        t1 = time.perf_counter()
        good: list[int] = []
        for i, err in zip(todo, errors):
            if err is None:
                good.append(i)
            else:
                kinds[i], messages[i] = err.kind, err.message

        values = [np.zeros((n, d), dtype=np.float32) for d in self.backbone.dims]
        forward_s = 0.0
        if x is not None:
            try:
                # One batch in the model at a time; other calls decode meanwhile (runtime.calls_per_actor).
                with self._model_lock:
                    t2 = time.perf_counter()
                    outs = self._forward(x)
                    forward_s = time.perf_counter() - t2
                for v, out in zip(values, outs):
                    v[good] = out
            except Exception as e:  # noqa: BLE001 - keep the rows, mark them failed
                for i in good:
                    kinds[i], messages[i] = "model_failed", f"{type(e).__name__}: {e}"
                good = []
        valid = np.zeros(n, dtype=bool)
        valid[good] = True
        self._local.timing = (t1 - t0, forward_s, gpu_utilization(self.device))
        return cols, kinds, messages, values, valid

    def _timing_columns(self, n: int) -> list[pa.Array]:
        decode_s, forward_s, util = getattr(self._local, "timing", (0.0, 0.0, None))
        share = 1.0 / max(n, 1)
        return [pa.array(np.full(n, decode_s * share, np.float32)),
                pa.array(np.full(n, forward_s * share, np.float32)),
                pa.array([util] * n, pa.float32())]

    def _embeddings(self, values: list[np.ndarray], valid: np.ndarray) -> list[pa.Array]:
        np_dtype = np.float16 if self.dtype == "float16" else np.float32
        mask = pa.array(~valid)
        return [pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np_dtype).reshape(-1)), v.shape[1],
                                                  mask=mask) for v in values]

    def _classes(self, values: list[np.ndarray], valid: np.ndarray) -> list[pa.Array]:
        probs, idx = torch.from_numpy(values[0]).softmax(dim=1).topk(self.top_k, dim=1)
        labels, scores, classes = [], [], []
        for i in range(len(valid)):
            ok = bool(valid[i])
            classes.append(idx[i].tolist() if ok else None)
            scores.append(probs[i].tolist() if ok else None)
            labels.append([self.names[c] for c in idx[i].tolist()] if ok else None)
        return [pa.array(col, t) for col, (_, t) in zip((labels, scores, classes), CLASSIFY_COLUMNS)]

    def __call__(self, batch: dict[str, Any] | pa.Table) -> pa.Table:
        cols, kinds, messages, values, valid = self._rows(batch)
        payload = self._classes(values, valid) if self.task == "classify" else self._embeddings(values, valid)
        return pa.Table.from_arrays(
            [
                pa.array(cols["id"], pa.string()),
                pa.array(cols["source"], pa.string()),
                pa.array(cols["label"], pa.string()),
                *payload,
                pa.array(kinds, pa.string()),
                pa.array(messages, pa.string()),
                pa.array(cols["shard"], pa.string()),
                pa.array(cols["row"], pa.int64()),
                *self._timing_columns(len(kinds)),
            ],
            schema=self.schema,
        )


def imagenet_class_names(model_name: str, n: int) -> list[str]:
    """Class names for a 1000-class ImageNet model (offline: timm's ImageNetInfo / torchvision's meta)."""
    if n != 1000:
        return [str(i) for i in range(n)]
    if model_name.startswith("tv:"):
        import torchvision

        return list(torchvision.models.get_model_weights(model_name[3:]).DEFAULT.meta["categories"])
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(n)]
