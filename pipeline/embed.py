"""The Embedder: a Ray-free callable class. ``__init__`` loads the backbone once; ``__call__`` maps a batch of
rows ``{id, source, label, bytes, error_kind, error_message, shard, row}`` to embedding rows.

Bad bytes become error rows (kind + message), never an exception that kills the batch.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.backbones import Backbone, build_backbone, is_torchvision, resize_side
from pipeline.config import BackboneConfig
from pipeline.decode import DecodeError, decode_image
from pipeline.tensorprep import TensorPrep, TensorPrepError

PASS_THROUGH = ("id", "source", "label", "shard", "row")


def embedding_column(i: int, n_layers: int) -> str:
    """Column of layer i: ``embedding`` for a single layer, ``embedding_<i>`` when several are captured."""
    return "embedding" if n_layers == 1 else f"embedding_{i}"


def output_schema(dims: int | list[int], dtype: str = "float32") -> pa.Schema:
    """Rows leaving the Embedder: the embeddings contract plus error columns and shard bookkeeping."""
    dims = [dims] if isinstance(dims, int) else list(dims)
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([
        ("id", pa.string()),
        ("source", pa.string()),
        ("label", pa.string()),
        *[(embedding_column(i, len(dims)), pa.list_(value, d)) for i, d in enumerate(dims)],
        *BOOKKEEPING,
    ])


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but no CUDA device is visible: use "
                         "--set runtime.device=cpu "
                         "or give the actors GPUs (--gpus-per-actor 1)")
    return torch.device(device)


def compile_target(bb: Backbone) -> str:
    """The model method runtime.compile wraps for this cut: timm's forward_features (final/logits), or a
    torchvision model's forward (logits). Other cuts stop the forward with hooks, which a compiled graph
    cannot do: a ValueError names the fix."""
    if not is_torchvision(bb.model_name) and hasattr(bb.model, "forward_head") and \
            set(bb.layers) <= {"final", "logits"}:
        return "forward_features"
    if is_torchvision(bb.model_name) and bb.layers == ("logits",):
        return "forward"
    raise ValueError(
        f"runtime.compile applies to layer final or logits of timm models and to logits of torchvision "
        f"models, not to {', '.join(bb.layers)} of {bb.model_name}: use --set runtime.compile=false")


def resolve_decoder(decoder: str, device: torch.device) -> str:
    """auto -> tensor on a CUDA device (nvjpeg + batched GPU preprocessing), pil on CPU."""
    if decoder not in ("auto", "pil", "tensor"):
        raise ValueError(f"decoder must be auto, pil or tensor, got '{decoder}' (--set runtime.decoder=...)")
    if decoder == "auto":
        return "tensor" if device.type == "cuda" else "pil"
    return decoder


def _column(batch: dict[str, Any] | pa.Table, name: str, n: int) -> list[Any]:
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist() if name in batch.column_names else [None] * n
    col = batch.get(name)
    if col is None:
        return [None] * n
    return list(col.tolist() if isinstance(col, np.ndarray) and col.dtype != object else col)


class Embedder:
    """Decode, preprocess, forward to the cut layer(s), pool.

    Args:
        backbone: a BackboneConfig (or its dict).
        layers: capture several layers in one pass (columns embedding_0..); default: backbone.layer.
        device: auto | cpu | cuda.
        autocast: none | bf16 | fp16 (applies on CUDA).
        dtype: float32 | float16 output values.
        max_pixels, max_bytes: decode limits; larger images are error rows.
        jpeg_draft: let libjpeg decode large JPEGs at a reduced scale (1/2, 1/4, 1/8) that still covers the
            model's resize; much faster for photos several times the input size, close to but not
            bit-equal with the full decode.
        threads: decode/preprocess threads (default: torch's intra-op thread count).
        decoder: pil (PIL decode and transform per image) | tensor (JPEGs decoded by torchvision, nvjpeg on a
            GPU, and batched tensor preprocessing on the device; tensorprep.py) | auto (tensor on CUDA).
        channels_last: run the model in channels-last memory format (faster convolutions on GPUs with
            tensor cores); default: on for CUDA.
        compile: run the model through ``torch.compile`` (for the final/logits layers). The first batch pays
            for compilation (seconds on a GPU, about a minute on CPU); shorter batches are padded to the
            compiled batch size so that one graph serves the whole run.
        compile_backend: torch.compile's backend (inductor; eager only traces, for tests).
    """

    def __init__(
        self,
        backbone: BackboneConfig | dict[str, Any],
        *,
        layers: list[str] | None = None,
        device: str = "auto",
        autocast: str = "none",
        dtype: str = "float32",
        max_pixels: int = 50_000_000,
        max_bytes: int = 64 * 1024 * 1024,
        threads: int | None = None,
        jpeg_draft: bool = False,
        decoder: str = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        cfg = backbone if isinstance(backbone, BackboneConfig) else BackboneConfig(**backbone)
        self.device = resolve_device(device)
        self.backbone: Backbone = build_backbone(cfg, self.device, layers)
        self.autocast = autocast
        self.dtype = dtype
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.schema = output_schema(list(self.backbone.dims), dtype)
        side = resize_side(self.backbone.preprocessing)
        self.resize_side = side
        self.draft_size = (side, side) if jpeg_draft else None
        self.decoder = resolve_decoder(decoder, self.device)
        self.tensor_prep: TensorPrep | None = None
        if self.decoder == "tensor":
            try:
                self.tensor_prep = TensorPrep(self.backbone.transform, self.device, max_pixels=max_pixels,
                                              max_bytes=max_bytes, draft_side=side if jpeg_draft else None)
            except TensorPrepError:
                if decoder == "tensor":
                    raise
                self.decoder = "pil"  # auto: this model's transform needs the PIL path
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        if self.channels_last:
            self.backbone.model.to(memory_format=torch.channels_last)
        self.compiled_batch = 0  # the batch size the compiled graph was built for; 0: not compiled
        if compile:
            self._compile(compile_backend)
        # Ray sets OMP_NUM_THREADS (and so torch's thread count) to the actor's CPUs.
        self.threads = max(1, int(threads or torch.get_num_threads()))
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        # Calls may run concurrently (one decoding while another is in the model): per-call state is
        # thread-local and the model is entered by one call at a time.
        self._model_lock = threading.Lock()
        self._local = threading.local()

    # -- one image --------------------------------------------------------------------------------
    def _prepare(self, data: bytes | None) -> torch.Tensor | DecodeError:
        img = decode_image(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                           draft_size=self.draft_size, resize_side=self.resize_side)
        if isinstance(img, DecodeError):
            return img
        try:
            return self.backbone.transform(img)
        except Exception as e:  # noqa: BLE001 - a bad image is data, not a crash
            return DecodeError("preprocess_failed", f"{type(e).__name__}: {e}")

    def _compile(self, backend: str) -> None:
        model = self.backbone.model
        name = compile_target(self.backbone)
        setattr(model, name, torch.compile(getattr(model, name), backend=backend, dynamic=False))
        self.compiled_batch = -1  # set by the first batch

    def _forward(self, x: torch.Tensor) -> list[np.ndarray]:
        x = x.to(self.device, non_blocking=True)
        n = x.shape[0]
        if self.compiled_batch:
            # One graph for the run: a short (last) batch is padded with zeros to the compiled size.
            self.compiled_batch = max(self.compiled_batch, n)
            if n < self.compiled_batch:
                x = torch.cat([x, x.new_zeros((self.compiled_batch - n, *x.shape[1:]))])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        use_amp = self.autocast != "none" and self.device.type == "cuda"
        amp_dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
            outs = self.backbone.embed_all(x)
        return [o[:n].float().cpu().numpy() for o in outs]

    # -- a batch ----------------------------------------------------------------------------------
    def _map(self, fn, items):
        return list(self._pool.map(fn, items)) if self._pool else [fn(i) for i in items]

    def _prepare_batch(self, raw: list[bytes | None]) -> tuple[torch.Tensor | None, list[DecodeError | None]]:
        """Encoded images -> (the preprocessed batch of the good ones or None, an error or None per image)."""
        if self.tensor_prep is not None:
            return self.tensor_prep(raw, self._map)
        prepared = self._map(self._prepare, raw)
        errors = [p if isinstance(p, DecodeError) else None for p in prepared]
        tensors = [p for p in prepared if not isinstance(p, DecodeError)]
        if not tensors:
            return None, errors
        x = torch.stack(tensors)
        return (x.pin_memory() if self.device.type == "cuda" else x), errors

    def _rows(self, batch: dict[str, Any] | pa.Table):
        """Decode and forward a batch: (columns, error kinds, messages, per-layer values, valid mask)."""
        n = batch.num_rows if isinstance(batch, pa.Table) else len(next(iter(batch.values())))
        cols = {k: _column(batch, k, n) for k in (*PASS_THROUGH, "bytes", "error_kind", "error_message")}
        kinds: list[str | None] = list(cols["error_kind"])
        messages: list[str | None] = list(cols["error_message"])

        todo = [i for i in range(n) if kinds[i] is None]
        raw = [cols["bytes"][i] for i in todo]
        t0 = time.perf_counter()
        x, errors = self._prepare_batch(raw)
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

    def _table(self, cols, kinds, messages, payload: list[pa.Array], schema: pa.Schema) -> pa.Table:
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
            schema=schema,
        )

    def _timing_columns(self, n: int) -> list[pa.Array]:
        decode_s, forward_s, util = getattr(self._local, "timing", (0.0, 0.0, None))
        share = 1.0 / max(n, 1)
        return [pa.array(np.full(n, decode_s * share, np.float32)),
                pa.array(np.full(n, forward_s * share, np.float32)),
                pa.array([util] * n, pa.float32())]

    def __call__(self, batch: dict[str, Any] | pa.Table) -> pa.Table:
        cols, kinds, messages, values, valid = self._rows(batch)
        np_dtype = np.float16 if self.dtype == "float16" else np.float32
        mask = pa.array(~valid)
        payload = [
            pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np_dtype).reshape(-1)), v.shape[1], mask=mask)
            for v in values
        ]
        return self._table(cols, kinds, messages, payload, self.schema)


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


CLASSIFY_COLUMNS = [("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
                    ("classes", pa.list_(pa.int32()))]


class Classifier(Embedder):
    """The pretrained model used as is: softmax over its logits, the top-k classes with names."""

    def __init__(self, backbone: BackboneConfig | dict[str, Any], *, top_k: int = 5, **kwargs: Any) -> None:
        cfg = backbone if isinstance(backbone, BackboneConfig) else BackboneConfig(**backbone)
        cfg = cfg.model_copy(update={"layer": "logits", "normalize": False})
        super().__init__(cfg, **kwargs)
        self.names = imagenet_class_names(cfg.model, self.backbone.dim)
        self.top_k = min(top_k, self.backbone.dim)
        self.schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("label", pa.string()),
                                 *CLASSIFY_COLUMNS, *BOOKKEEPING])

    def __call__(self, batch: dict[str, Any] | pa.Table) -> pa.Table:
        cols, kinds, messages, values, valid = self._rows(batch)
        logits = torch.from_numpy(values[0])
        probs, idx = logits.softmax(dim=1).topk(self.top_k, dim=1)
        labels, scores, classes = [], [], []
        for i in range(len(valid)):
            ok = bool(valid[i])
            classes.append(idx[i].tolist() if ok else None)
            scores.append(probs[i].tolist() if ok else None)
            labels.append([self.names[c] for c in idx[i].tolist()] if ok else None)
        payload = [pa.array(labels, CLASSIFY_COLUMNS[0][1]), pa.array(scores, CLASSIFY_COLUMNS[1][1]),
                   pa.array(classes, CLASSIFY_COLUMNS[2][1])]
        return self._table(cols, kinds, messages, payload, self.schema)
