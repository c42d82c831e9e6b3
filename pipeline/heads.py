"""Heads on stored embeddings: train a linear or MLP classifier, write it as an artifact, predict with it.

Ray-free. ``train_head(cfg)`` reads ``OUTPUT/embeddings/*.parquet`` (local or object storage, through
storage.py), trains in memory or, above ``max_rows_in_memory`` rows, by streaming record batches, and writes
``head.safetensors``, ``head.json`` and ``report.png``. ``HeadPredictor`` is the per-batch callable the
runner maps over embeddings; ``predict_local`` runs it over a folder without Ray.

Train/validation split (deterministic, stable, stratified). Each row gets ``u = sha1(id)[:8] / 2**64``,
uniform in [0, 1) and independent of the seed, the file layout and the other rows. A row is in validation
when ``u < val_fraction``, so a rerun gives the same split and adding rows never moves an existing row.
Within each class this takes, in expectation, ``val_fraction`` of the rows, the lowest-hash ones. Two
corrections keep every class in both splits: a class with >= 2 rows and no row under the threshold sends
its lowest-hash row to validation; a class whose rows all fall under it keeps its highest-hash row in
training (a one-row class trains only). These touch at most one row per class, only in classes too small
to be split by the threshold, and are the only way a row's side can depend on other rows.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import posixpath
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator
from torch import nn

from pipeline import storage
from pipeline.config import _Strict
from pipeline.sink import EMBEDDINGS_DIR, PREDICTIONS_DIR, read_spec

log = logging.getLogger(__name__)

HEAD_WEIGHTS = "head.safetensors"
HEAD_META = "head.json"
HEAD_REPORT = "report.png"
FORMAT_VERSION = 1
# What a head depends on: embeddings differing in any of these are different features.
CHECKED_FIELDS = ("model", "weights.sha256", "layer", "pool", "dim", "normalize")
_IGNORED_ACROSS_FILES = ("versions", "dtype")  # may change between nightly runs without changing features
_READ_ROWS = 65536
MIN_STEPS = 32  # optimizer steps per epoch at least (batch_size shrinks for small tables, down to 32)


class HeadTrainConfig(_Strict):
    """Everything `pipeline heads train` needs."""

    embeddings: str = Field(description="an extract OUTPUT folder, or its embeddings/ folder")
    output: str = Field(description="folder for head.safetensors, head.json, report.png")
    head: Literal["linear", "mlp"] = "linear"
    hidden: list[int] = Field(default_factory=lambda: [512], description="MLP hidden sizes")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1, description="minibatch rows; smaller for tables under "
                            "32 batches (an epoch takes at least 32 steps)")
    lr: float | None = Field(None, gt=0.0, description="AdamW learning rate; default 1e-2 for linear, "
                             "1e-3 for mlp; halved when the validation loss stalls")
    weight_decay: float = Field(1e-4, ge=0.0)
    patience: int = Field(10, ge=1, description="epochs without a better validation loss before stopping")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0
    class_weight: Literal["none", "balanced"] = "balanced"
    labels_from: str | None = Field(None, description="Parquet table (id, label) joined on id; replaces the "
                                    "label column")
    test: str | None = Field(None, description="held-out embeddings evaluated at the end")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_rows_in_memory: int = Field(2_000_000, ge=1, description="above this many rows, stream from storage")

    @model_validator(mode="after")
    def _check(self) -> HeadTrainConfig:
        if self.head == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise ValueError("hidden must list at least one positive size for an mlp head (e.g. [512])")
        if self.embeddings.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("output must differ from embeddings: write the head somewhere else")
        return self


# --------------------------------------------------------------------------------------------------
# The model


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


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but no CUDA device is visible: use device cpu (or auto)")
    return torch.device(device)


# --------------------------------------------------------------------------------------------------
# Specs


def _get(spec: dict[str, Any], dotted: str) -> Any:
    node: Any = spec
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    if dotted == "normalize" and node is None:
        return False  # older specs omit it; the extractor's default is off
    return node


def spec_differences(head_spec: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """'field: head X, embeddings Y' for each checked field that differs."""
    out = []
    for f in CHECKED_FIELDS:
        a, b = _get(head_spec, f), _get(spec, f)
        if a != b:
            out.append(f"{f}: head {a!r}, embeddings {b!r}")
    return out


def _head_spec(spec: dict[str, Any]) -> dict[str, Any]:
    weights = spec.get("weights") or {}
    return {
        "model": spec.get("model"),
        "weights": {"source": weights.get("source"), "sha256": weights.get("sha256")},
        "layer": spec.get("layer"),
        "pool": spec.get("pool"),
        "dim": spec.get("dim"),
        "normalize": bool(spec.get("normalize", False)),
        "preprocessing": spec.get("preprocessing"),
    }


# --------------------------------------------------------------------------------------------------
# Reading embeddings


def _is_dir(uri: str) -> bool:
    try:
        return storage.isdir(uri)
    except storage.StorageError:
        return False


def _resolve_embeddings(uri: str) -> str:
    """OUTPUT -> OUTPUT/embeddings when that folder exists; else the URI itself."""
    sub = storage.join(uri, EMBEDDINGS_DIR)
    return sub if _is_dir(sub) else uri


def _parquet_files(uri: str, what: str, fix: str) -> list[storage.FileInfo]:
    try:
        files = [f for f in storage.list_files(uri) if f.rel.endswith(".parquet")]
    except storage.StorageError as e:
        raise ValueError(f"no {what} found at '{uri}' ({e}): {fix}") from e
    if not files:
        raise ValueError(f"no {what} found at '{uri}' (no .parquet files): {fix}")
    return files


def _hash_unit(ids: list[str]) -> np.ndarray:
    """sha1(id) -> uniform float in [0, 1); the split key."""
    raw = b"".join(hashlib.sha1(s.encode("utf-8")).digest()[:8] for s in ids)
    return np.frombuffer(raw, dtype=">u8").astype(np.float64) / 2.0**64


class _LabelTable:
    """labels_from: an (id, label) Parquet table held in memory and joined on id."""

    def __init__(self, uri: str) -> None:
        files = _parquet_files(uri, "labels table", "pass a Parquet file or folder with columns id, label")
        fs, _ = storage.get_fs(files[0].uri)
        ds = pads.dataset([storage.get_fs(f.uri)[1] for f in files], filesystem=fs, format="parquet")
        missing = {"id", "label"} - set(ds.schema.names)
        if missing:
            raise ValueError(f"labels table '{uri}' lacks column(s) {sorted(missing)}: it needs columns id "
                             f"and label (has {ds.schema.names})")
        table = ds.to_table(columns=["id", "label"])
        self.ids = table.column("id").cast(pa.string()).combine_chunks()
        self.labels = table.column("label").cast(pa.string()).combine_chunks()
        if pc.count_distinct(self.ids).as_py() != len(self.ids):
            raise ValueError(f"labels table '{uri}' repeats some ids: give each id one label")

    def lookup(self, ids: pa.Array) -> pa.Array:
        return pc.take(self.labels, pc.index_in(ids, value_set=self.ids))


@dataclass
class _Chunk:
    ids: list[str]
    labels: pa.Array  # string, nulls for unlabelled rows
    x: np.ndarray  # (n, dim) float32


class EmbeddingReader:
    """The Parquet files of one extract output, checked to share one spec; streamed as chunks.

    Files are read with ``ParquetFile.iter_batches``, which decodes page by page: memory is bounded by the
    read batch, not by the row group (pyarrow.dataset decodes whole row groups).
    """

    def __init__(self, uri: str, labels: _LabelTable | None = None) -> None:
        self.uri = _resolve_embeddings(uri)
        self.files = _parquet_files(
            self.uri, "embeddings",
            "pass the OUTPUT folder of `pipeline extract` (it holds embeddings/*.parquet) or that "
            "embeddings/ folder")
        self.fs, _ = storage.get_fs(self.files[0].uri)
        self.paths = [storage.get_fs(f.uri)[1] for f in self.files]
        self.schemas: list[pa.Schema] = []
        self.rows: list[int] = []
        specs = []
        for f, path in zip(self.files, self.paths):
            try:
                pf = pq.ParquetFile(path, filesystem=self.fs)
                self.schemas.append(pf.schema_arrow)
                self.rows.append(pf.metadata.num_rows)
                specs.append(read_spec(pf.schema_arrow))
            except ValueError as e:
                raise ValueError(f"'{f.uri}': {e}") from None
            except OSError as e:
                raise ValueError(f"'{f.uri}' is not a readable Parquet file ({e})") from None
        self.spec = specs[0]
        key0 = {k: v for k, v in self.spec.items() if k not in _IGNORED_ACROSS_FILES}
        for f, s in zip(self.files[1:], specs[1:]):
            key = {k: v for k, v in s.items() if k not in _IGNORED_ACROSS_FILES}
            if key != key0:
                diff = sorted(k for k in set(key) | set(key0) if key.get(k) != key0.get(k))
                raise ValueError(
                    f"embeddings files were made with different specs ({', '.join(diff)} differ): "
                    f"'{self.files[0].uri}' vs '{f.uri}'. Train one head per extract output, or move "
                    "the odd files out")
        self.dim = int(self.spec["dim"])
        for f, schema in zip(self.files, self.schemas):
            t = schema.field("embedding").type if "embedding" in schema.names else None
            if t is None or not pa.types.is_fixed_size_list(t) or t.list_size != self.dim:
                raise ValueError(f"'{f.uri}' has no embedding column of fixed_size_list[{self.dim}] (got {t})"
                                 ": it was not written by `pipeline extract`")
        self.labels = labels
        self.num_rows = sum(self.rows)

    def batches(self, index: int, columns: list[str], rows: int = _READ_ROWS) -> Iterator[pa.RecordBatch]:
        """Record batches of one file."""
        cols = [c for c in columns if c in self.schemas[index].names]
        try:
            pf = pq.ParquetFile(self.paths[index], filesystem=self.fs, buffer_size=1 << 20)
            yield from pf.iter_batches(batch_size=rows, columns=cols, use_threads=False)
        except OSError as e:
            raise storage.explain(self.files[index].uri, e) from e

    def chunks(self, order: list[int] | None = None, rows: int = _READ_ROWS) -> Iterator[_Chunk]:
        """Labelled-or-not rows with embeddings as float32 arrays, file by file."""
        for i in order if order is not None else range(len(self.files)):
            for rb in self.batches(i, ["id", "label", "embedding"], rows):
                if rb.num_rows == 0:
                    continue
                emb = rb.column("embedding")
                if emb.null_count:
                    rb = rb.filter(pc.is_valid(emb))
                    emb = rb.column("embedding")
                ids = rb.column("id").cast(pa.string())
                if self.labels is not None:
                    labels = self.labels.lookup(ids)
                elif "label" in rb.schema.names:
                    labels = rb.column("label").cast(pa.string())
                else:
                    labels = pa.nulls(rb.num_rows, pa.string())
                x = np.array(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)  # writable
                yield _Chunk(ids.to_pylist(), labels, x.reshape(-1, self.dim))


# --------------------------------------------------------------------------------------------------
# Split and per-class statistics (one pass; constant memory in the number of rows)


@dataclass
class _ClassStats:
    n: int = 0
    below: int = 0  # rows with hash < val_fraction
    lo: tuple[float, str, np.ndarray | None] = (math.inf, "", None)  # lowest-hash row
    hi: tuple[float, str, np.ndarray | None] = (-math.inf, "", None)  # highest-hash row


class _Moments:
    """Shifted float64 sums for mean/std without holding the rows."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None

    def add(self, x: np.ndarray, sign: int = 1) -> None:
        if len(x) == 0:
            return
        x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.s1 = np.zeros_like(self.shift)
            self.s2 = np.zeros_like(self.shift)
        d = x - self.shift
        self.n += sign * len(x)
        self.s1 += sign * d.sum(axis=0)
        self.s2 += sign * (d * d).sum(axis=0)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.s1 / self.n
        var = np.maximum(self.s2 / self.n - m * m, 0.0)
        std = np.sqrt(var)
        std[std < 1e-8] = 1.0  # constant features: leave them centred, unscaled
        return (m + self.shift).astype(np.float32), std.astype(np.float32)


class _Stats:
    """Labels, classes, split and train-split moments, gathered in one pass over the chunks."""

    def __init__(self, val_fraction: float) -> None:
        self.frac = val_fraction
        self.classes: dict[str, _ClassStats] = {}
        self.unlabeled = 0
        self.rows = 0
        self.above = _Moments()  # labelled rows with hash >= val_fraction (train before corrections)

    def update(self, chunk: _Chunk, h: np.ndarray) -> None:
        self.rows += len(chunk.ids)
        valid = chunk.labels.is_valid().to_numpy(zero_copy_only=False)
        self.unlabeled += int((~valid).sum())
        if not valid.any():
            return
        where = np.flatnonzero(valid)
        enc = pc.dictionary_encode(chunk.labels.filter(pa.array(valid)))
        names = enc.dictionary.to_pylist()
        codes = enc.indices.to_numpy(zero_copy_only=False)
        hv = h[where]
        self.above.add(chunk.x[where[hv >= self.frac]])
        order = np.lexsort((hv, codes))
        sc = codes[order]
        starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
        ends = np.r_[starts[1:], len(sc)]
        for s, e in zip(starts, ends):
            st = self.classes.setdefault(names[sc[s]], _ClassStats())
            st.n += int(e - s)
            st.below += int((hv[order[s:e]] < self.frac).sum())
            lo, hi = where[order[s]], where[order[e - 1]]
            if h[lo] < st.lo[0]:
                st.lo = (float(h[lo]), chunk.ids[lo], chunk.x[lo].copy())
            if h[hi] > st.hi[0]:
                st.hi = (float(h[hi]), chunk.ids[hi], chunk.x[hi].copy())

    def finish(self) -> _Split:
        split = _Split(self.frac)
        train = self.above
        for name, st in self.classes.items():
            if self.frac <= 0:
                n_val = 0
            elif st.n == 1:
                n_val = 0
                if st.below:
                    split.force_train.add(st.lo[1])
                    train.add(st.lo[2][None])
            elif st.below == 0:
                n_val = 1
                split.force_val.add(st.lo[1])
                train.add(st.lo[2][None], sign=-1)
            elif st.below == st.n:
                n_val = st.n - 1
                split.force_train.add(st.hi[1])
                train.add(st.hi[2][None])
            else:
                n_val = st.below
            split.per_class[name] = {"train": st.n - n_val, "validation": n_val}
        split.moments = train
        return split


@dataclass
class _Split:
    fraction: float
    force_val: set[str] = field(default_factory=set)
    force_train: set[str] = field(default_factory=set)
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)
    moments: _Moments | None = None

    def is_val(self, ids: list[str], h: np.ndarray) -> np.ndarray:
        val = h < self.fraction
        if self.force_val or self.force_train:
            for i, s in enumerate(ids):
                if s in self.force_val:
                    val[i] = True
                elif s in self.force_train:
                    val[i] = False
        return val


def split_ids(ids: list[str], labels: list[str | None], val_fraction: float = 0.2) -> np.ndarray:
    """The validation mask train_head uses for these rows (True = validation; unlabelled rows False)."""
    chunk = _Chunk(list(ids), pa.array(labels, pa.string()), np.zeros((len(ids), 1), np.float32))
    stats = _Stats(val_fraction)
    h = _hash_unit(chunk.ids)
    stats.update(chunk, h)
    valid = chunk.labels.is_valid().to_numpy(zero_copy_only=False)
    return stats.finish().is_val(chunk.ids, h) & valid


# --------------------------------------------------------------------------------------------------
# Data for the training loop: in memory, or streamed from storage


class _Encoded:
    """Turns chunks into (x, y, is_val) for known classes."""

    def __init__(self, classes: list[str], split: _Split) -> None:
        self.classes = pa.array(classes, pa.string())
        self.split = split

    def __call__(self, chunk: _Chunk, h: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """x, y, is_val of the rows whose label is a known class; and the count of the other rows."""
        codes = pc.index_in(chunk.labels, value_set=self.classes)
        keep = codes.is_valid().to_numpy(zero_copy_only=False)
        y = codes.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        if self.split.fraction > 0:
            is_val = self.split.is_val(chunk.ids, _hash_unit(chunk.ids) if h is None else h)
        else:
            is_val = np.zeros(len(chunk.ids), dtype=bool)
        if keep.all():
            return chunk.x, y, is_val, 0
        return chunk.x[keep], y[keep], is_val[keep], int((~keep).sum())


class _InMemory:
    """All labelled rows as tensors; minibatches by random permutation."""

    streamed = False

    def __init__(self, x: np.ndarray, y: np.ndarray, is_val: np.ndarray, batch_size: int, seed: int,
                 device: torch.device) -> None:
        on = device if device.type == "cuda" and x.nbytes <= 4 * 2**30 else torch.device("cpu")
        self.train = (torch.from_numpy(x[~is_val]).to(on), torch.from_numpy(y[~is_val]).to(on))
        self.val = (torch.from_numpy(x[is_val]).to(on), torch.from_numpy(y[is_val]).to(on))
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.train
        perm = torch.randperm(len(y), generator=self.gen).to(y.device)
        for i in range(0, len(y), self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield x[idx], y[idx]

    def chunks(self, which: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(x, y, 0 for train / 1 for validation) for which = "val" or "both"."""
        for split, (x, y) in ((0, self.train), (1, self.val)):
            if which == "both" or split == 1:
                for i in range(0, len(y), _READ_ROWS):
                    yield x[i:i + _READ_ROWS], y[i:i + _READ_ROWS], split


class _Streamed:
    """Rows read from storage on every pass: file order shuffled per epoch, rows shuffled in a buffer."""

    streamed = True

    def __init__(self, reader: EmbeddingReader, encode: _Encoded, batch_size: int, seed: int,
                 rows: int) -> None:
        self.reader = reader
        self.encode = encode
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.rows = rows
        self.buffer_rows = max(batch_size, rows)

    def _train_rows(self, order: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for chunk in self.reader.chunks(order, self.rows):
            x, y, is_val, _ = self.encode(chunk)
            if not is_val.all():
                yield x[~is_val], y[~is_val]

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = [int(i) for i in self.rng.permutation(len(self.reader.files))]
        bx: list[np.ndarray] = []
        by: list[np.ndarray] = []
        held = 0

        def drain(final: bool):
            x, y = np.concatenate(bx), np.concatenate(by)
            perm = self.rng.permutation(len(y))
            x, y = x[perm], y[perm]
            full = len(y) if final else len(y) - len(y) % self.batch_size
            for i in range(0, full, self.batch_size):
                yield torch.from_numpy(x[i:i + self.batch_size]), torch.from_numpy(y[i:i + self.batch_size])
            return x[full:], y[full:]

        for x, y in self._train_rows(order):
            bx.append(x)
            by.append(y)
            held += len(y)
            if held >= self.buffer_rows:
                rest_x, rest_y = yield from drain(False)
                bx, by, held = [rest_x], [rest_y], len(rest_y)
        if held:
            yield from drain(True)

    def chunks(self, which: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(x, y, 0 for train / 1 for validation) for which = "val" or "both", in one pass."""
        for chunk in self.reader.chunks(None, self.rows):
            x, y, is_val, _ = self.encode(chunk)
            for split, sel in ((0, ~is_val), (1, is_val)):
                if (which == "both" or split == 1) and sel.any():
                    yield torch.from_numpy(x[sel]), torch.from_numpy(y[sel]), split


# --------------------------------------------------------------------------------------------------
# Metrics (numpy; no sklearn)


def metrics_from_confusion(cm: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/f1/support from a confusion matrix (rows = true)."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (support > 0) | (predicted > 0)  # as sklearn: labels seen in truth or predictions
    total = int(cm.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else None,
        "macro_f1": float(f1[present].mean()) if present.any() else None,
        "rows": total,
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion": cm.tolist(),
    }


def _evaluate(model: nn.Module, chunks, k: int, loss_fn: nn.Module, device: torch.device, splits: int = 1
              ) -> list[tuple[np.ndarray, float]]:
    """Per split: confusion matrix and weighted mean cross-entropy, over chunks of (x, y, split)."""
    cm = np.zeros((splits, k, k), dtype=np.int64)
    loss_sum, weight_sum = np.zeros(splits), np.zeros(splits)
    w = loss_fn.weight
    model.eval()
    with torch.inference_mode():
        for x, y, s in chunks:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum[s] += float(nn.functional.cross_entropy(logits, y, weight=w, reduction="sum"))
            weight_sum[s] += float(w[y].sum()) if w is not None else len(y)
            pred = logits.argmax(dim=1)
            cm[s] += np.bincount((y * k + pred).cpu().numpy(), minlength=k * k).reshape(k, k)
    return [(cm[i], float(loss_sum[i] / weight_sum[i]) if weight_sum[i] else float("nan"))
            for i in range(splits)]


# --------------------------------------------------------------------------------------------------
# Training


def _fit(model: HeadModel, data, cfg: HeadTrainConfig, loss_fn: nn.Module, device: torch.device, k: int,
         has_val: bool, progress: bool) -> dict[str, Any]:
    """AdamW with early stopping on validation loss; the best weights are loaded back into the model."""
    from tqdm.auto import tqdm

    lr = cfg.lr or (1e-2 if cfg.head == "linear" else 1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, cfg.patience // 3))
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"{cfg.head} head", unit="epoch", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        model.train()
        loss_sum = torch.zeros((), device=device)
        weight_sum = torch.zeros((), device=device)
        for x, y in data.train_batches(epoch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            w = loss_fn.weight[y].sum() if loss_fn.weight is not None else torch.tensor(len(y), device=device)
            loss_sum += loss.detach() * w
            weight_sum += w
        train_loss = float(loss_sum / weight_sum) if float(weight_sum) else float("nan")
        history["train_loss"].append(train_loss)
        if has_val:
            val_loss = _evaluate(model, data.chunks("val"), k, loss_fn, device, splits=2)[1][1]
        else:
            val_loss = train_loss  # no validation rows: keep the last epoch
        history["val_loss"].append(val_loss if has_val else None)
        if has_val:
            sched.step(val_loss)
        if val_loss < best[0] or not has_val:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}" if has_val else "-", best=best[1])
        if has_val and epoch - best[1] >= cfg.patience:
            break
    bar.close()
    model.load_state_dict(best[2])
    return {"lr": lr, "best_epoch": best[1], "epochs_run": len(history["train_loss"]), "history": history}


def _class_weights(cfg: HeadTrainConfig, split: _Split, classes: list[str]) -> np.ndarray | None:
    if cfg.class_weight == "none":
        return None
    counts = np.array([split.per_class[c]["train"] for c in classes], dtype=np.float64)
    return (counts.sum() / (len(classes) * np.maximum(counts, 1))).astype(np.float32)


def _check_labels(stats: _Stats, reader: EmbeddingReader, cfg: HeadTrainConfig, warnings: list[str]) -> None:
    if not stats.classes:
        src = f"labels table '{cfg.labels_from}'" if cfg.labels_from else "the label column"
        raise ValueError(
            f"no labelled rows among {stats.rows} embeddings in '{reader.uri}' ({src} is empty for every "
            "row): extract with `--labels folder` (one folder per class) or another label source, or pass "
            "labels_from=<Parquet table with columns id, label> (`--labels-from` on the CLI)")
    if len(stats.classes) < 2:
        (only,) = stats.classes
        raise ValueError(
            f"only one class ('{only}', {stats.classes[only].n} rows) among the labelled embeddings in "
            f"'{reader.uri}': a head needs at least 2 classes. Check the labels (with `--labels folder` "
            "each class is its own folder) or labels_from")
    if stats.unlabeled:
        warnings.append(f"{stats.unlabeled} rows without a label were skipped")
    for name, st in sorted(stats.classes.items()):
        if st.n < 2:
            warnings.append(f"class '{name}' has only {st.n} labelled row: it is in training only and has no "
                            "validation metrics; add examples")


def train_head(cfg: HeadTrainConfig | dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Train a head on stored embeddings and write its artifacts; returns head.json's content + "output"."""
    cfg = cfg if isinstance(cfg, HeadTrainConfig) else HeadTrainConfig(**cfg)
    device = _resolve_device(cfg.device)
    labels = _LabelTable(cfg.labels_from) if cfg.labels_from else None
    reader = EmbeddingReader(cfg.embeddings, labels)
    streamed = reader.num_rows > cfg.max_rows_in_memory
    read_rows = max(1024, min(_READ_ROWS, cfg.max_rows_in_memory))
    warnings: list[str] = []

    # pass one: labels, split, train-split moments (and the rows themselves when they fit)
    stats = _Stats(cfg.val_fraction)
    kept: list[tuple[_Chunk, np.ndarray]] = []
    for chunk in reader.chunks(rows=read_rows):
        h = _hash_unit(chunk.ids)
        stats.update(chunk, h)
        if not streamed:
            kept.append((chunk, h))
    _check_labels(stats, reader, cfg, warnings)
    for w in warnings:
        log.warning(w)
    split = stats.finish()
    classes = sorted(stats.classes)
    k = len(classes)
    encode = _Encoded(classes, split)
    mean, std = split.moments.mean_std()

    n_train = sum(v["train"] for v in split.per_class.values())
    n_val = sum(v["validation"] for v in split.per_class.values())
    # small tables: smaller minibatches, so an epoch still takes MIN_STEPS optimizer steps
    batch_size = min(cfg.batch_size, max(32, math.ceil(n_train / MIN_STEPS)))
    if streamed:
        data: _InMemory | _Streamed = _Streamed(reader, encode, batch_size, cfg.seed, read_rows)
    else:
        parts = [encode(c, h) for c, h in kept]
        kept.clear()
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        is_val = np.concatenate([p[2] for p in parts])
        del parts
        data = _InMemory(x, y, is_val, batch_size, cfg.seed, device)
        del x, y, is_val

    cw = _class_weights(cfg, split, classes)
    loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(cw).to(device) if cw is not None else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = HeadModel(reader.dim, k, cfg.head, cfg.hidden, cfg.dropout)
        model.norm.mean.copy_(torch.from_numpy(mean))
        model.norm.std.copy_(torch.from_numpy(std))
        model.to(device)
        fit = _fit(model, data, cfg, loss_fn, device, k, n_val > 0, progress)

    metrics: dict[str, Any] = {}
    evaluated = _evaluate(model, data.chunks("both"), k, loss_fn, device, splits=2)
    for which, n, (cm, loss) in zip(("train", "validation"), (n_train, n_val), evaluated):
        metrics[which] = {**metrics_from_confusion(cm, classes), "loss": loss} if n else None
    if cfg.test:
        metrics["test"] = _evaluate_test(model, cfg, labels, reader.spec, classes, loss_fn, device, read_rows)

    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "classes": classes,
        "embedding_spec": _head_spec(reader.spec),
        "embeddings": reader.uri,
        "head": {"type": cfg.head, "input_dim": reader.dim, "num_classes": k,
                 "hidden": list(cfg.hidden) if cfg.head == "mlp" else [],
                 "dropout": cfg.dropout if cfg.head == "mlp" else 0.0},
        "hyperparameters": cfg.model_dump(),
        "split": {
            "rule": "validation iff sha1(id)[:8]/2**64 < val_fraction; per class at least one row in each "
                    "split when it has >= 2 rows",
            "val_fraction": cfg.val_fraction,
            "train": n_train, "validation": n_val, "skipped_unlabeled": stats.unlabeled,
            "rows": stats.rows, "per_class": split.per_class,
        },
        "batch_size": batch_size,
        "class_weights": dict(zip(classes, cw.tolist())) if cw is not None else None,
        "metrics": metrics,
        **fit,
        "streamed": streamed,
        "device": str(device),
        "warnings": warnings,
        "versions": {"torch": torch.__version__, "pyarrow": pa.__version__, "numpy": np.__version__},
    }
    out = _write_artifacts(cfg.output, model, meta)
    val = metrics.get("validation") or {}
    log.info("head trained: %s classes, validation accuracy %s, best epoch %s", k, val.get("accuracy"),
             fit["best_epoch"])
    return {**meta, "output": out}


def _evaluate_test(model: HeadModel, cfg: HeadTrainConfig, labels: _LabelTable | None,
                   spec: dict[str, Any], classes: list[str], loss_fn: nn.Module, device: torch.device,
                   rows: int) -> dict[str, Any]:
    reader = EmbeddingReader(cfg.test, labels)
    diff = spec_differences(spec, reader.spec)
    if diff:
        raise ValueError(f"test embeddings '{reader.uri}' do not match the training embeddings: "
                         f"{'; '.join(diff)}. Extract the test set with the same model, weights, layer, pool")
    encode = _Encoded(classes, _Split(0.0))
    skipped = {"unlabeled": 0, "unknown_label": 0}

    def chunks():
        for chunk in reader.chunks(rows=rows):
            nulls = chunk.labels.null_count
            x, y, _, dropped = encode(chunk)
            skipped["unlabeled"] += nulls
            skipped["unknown_label"] += dropped - nulls
            yield torch.from_numpy(x), torch.from_numpy(y), 0

    ((cm, loss),) = _evaluate(model, chunks(), len(classes), loss_fn, device)
    return {**metrics_from_confusion(cm, classes), "loss": loss, "uri": reader.uri, "skipped": skipped}


# --------------------------------------------------------------------------------------------------
# Artifacts


def _report_png(meta: dict[str, Any]) -> bytes:
    """Loss curves and the validation (else training) confusion matrix."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    classes = meta["classes"]
    k = len(classes)
    fig = Figure(figsize=(12, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.1]})
    hist = meta["history"]
    epochs = np.arange(1, len(hist["train_loss"]) + 1)
    ax1.plot(epochs, hist["train_loss"], label="train")
    if any(v is not None for v in hist["val_loss"]):
        ax1.plot(epochs, [np.nan if v is None else v for v in hist["val_loss"]], label="validation")
    ax1.axvline(meta["best_epoch"], color="gray", ls="--", lw=1, label=f"best epoch {meta['best_epoch']}")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy" + (" (class-weighted)" if meta["class_weights"] else ""))
    ax1.set_title(f"{meta['head']['type']} head on {meta['embedding_spec']['model']} "
                  f"[{meta['embedding_spec']['layer']}]")
    ax1.legend()
    which = "validation" if meta["metrics"].get("validation") else "train"
    m = meta["metrics"][which]
    cm = np.array(m["confusion"])
    ax2.imshow(cm, cmap="Blues")
    ax2.set_title(f"{which} confusion (accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f})")
    if k <= 40:
        ax2.set_xticks(range(k), classes, rotation=90 if k > 6 else 0, fontsize=8 if k > 15 else 10)
        ax2.set_yticks(range(k), classes, fontsize=8 if k > 15 else 10)
    if k <= 15:
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax2.text(j, i, str(cm[i, j]), ha="center", va="center",
                         color="white" if cm[i, j] > thresh else "black", fontsize=9)
    ax2.set_xlabel("predicted")
    ax2.set_ylabel("true")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _write_artifacts(output: str, model: HeadModel, meta: dict[str, Any]) -> dict[str, str]:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out = {"weights": storage.join(output, HEAD_WEIGHTS), "meta": storage.join(output, HEAD_META),
           "report": storage.join(output, HEAD_REPORT)}
    storage.write_bytes(out["weights"], save(state, metadata={"format": "pipeline-head"}))
    storage.write_bytes(out["report"], _report_png(meta))
    storage.write_bytes(out["meta"], json.dumps(meta, indent=2, default=str).encode())  # last: marks done
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
    return model.to(_resolve_device(device)), meta


# --------------------------------------------------------------------------------------------------
# Predict


class HeadPredictor:
    """Callable stage: embeddings rows -> id, label, score (and top-k lists). Loads the head once."""

    def __init__(self, head_uri: str, top_k: int = 1, device: str = "cpu") -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.head_uri = head_uri
        self.model, self.meta = load_head(head_uri, device)
        self.device = next(self.model.parameters()).device
        self.classes = pa.array(self.meta["classes"], pa.string())
        self.spec = self.meta["embedding_spec"]
        self.dim = int(self.meta["head"]["input_dim"])
        self.top_k = min(top_k, len(self.classes))
        fields: list[pa.Field] = [pa.field("id", pa.string()), pa.field("label", pa.string()),
                                  pa.field("score", pa.float32())]
        if top_k > 1:
            fields += [pa.field("top_labels", pa.list_(pa.string())),
                       pa.field("top_scores", pa.list_(pa.float32()))]
        self.schema = pa.schema(fields)
        self._checked: set[bytes] = set()

    def check_spec(self, spec: dict[str, Any]) -> None:
        """ValueError naming each field where these embeddings differ from the head's."""
        diff = spec_differences(self.spec, spec)
        if diff:
            s = self.spec
            raise ValueError(
                f"embeddings do not match head '{self.head_uri}': {'; '.join(diff)}. Extract with the head's "
                f"settings (--model {s.get('model')} --layer {s.get('layer')} --pool {s.get('pool')}, same "
                "weights) or train a head on these embeddings")

    def __call__(self, batch: pa.Table | pa.RecordBatch | dict[str, Any]) -> pa.Table:
        if isinstance(batch, dict):
            ids = pa.array(list(batch["id"]), pa.string())
            x = np.asarray(np.stack(list(batch["embedding"])) if len(batch["id"]) else
                           np.zeros((0, self.dim)), dtype=np.float32)
        else:
            meta = batch.schema.metadata or {}
            raw = meta.get(b"pipeline")
            if raw is not None and raw not in self._checked:
                self.check_spec(json.loads(raw))
                self._checked.add(raw)
            emb = batch.column("embedding")
            if isinstance(emb, pa.ChunkedArray):
                emb = emb.combine_chunks()
            ids = batch.column("id")
            ids = (ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids).cast(pa.string())
            x = np.array(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
            x = x.reshape(len(ids), -1) if len(ids) else x.reshape(0, self.dim)
        if x.shape[1] != self.dim:
            raise ValueError(f"embeddings do not match head '{self.head_uri}': dim: head {self.dim}, "
                             f"embeddings {x.shape[1]}. Use the head trained on these embeddings")
        with torch.inference_mode():
            probs = torch.softmax(self.model(torch.from_numpy(x).to(self.device)), dim=1)
            scores, idx = probs.topk(self.top_k, dim=1)
        scores = scores.float().cpu().numpy()
        idx = idx.cpu().numpy()
        cols = [ids, pc.take(self.classes, pa.array(idx[:, 0])), pa.array(scores[:, 0], pa.float32())]
        if self.schema.get_field_index("top_labels") >= 0:
            n, k = idx.shape
            offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
            cols += [pa.ListArray.from_arrays(offsets, pc.take(self.classes, pa.array(idx.reshape(-1)))),
                     pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1), pa.float32()))]
        return pa.Table.from_arrays(cols, schema=self.schema)


def predict_local(head_uri: str, embeddings_uri: str, output_uri: str, top_k: int = 1,
                  device: str = "cpu") -> dict[str, Any]:
    """Predict every embeddings file without Ray: one ``OUTPUT/predictions/<same name>.parquet`` each."""
    predictor = HeadPredictor(head_uri, top_k=top_k, device=device)
    reader = EmbeddingReader(embeddings_uri)
    predictor.check_spec(reader.spec)
    schema = predictor.schema.with_metadata({b"pipeline_head": json.dumps({
        "head": head_uri, "classes": predictor.meta["classes"], "embedding_spec": predictor.spec}).encode()})
    files, rows = [], 0
    for i, f in enumerate(reader.files):
        parts = [predictor(pa.Table.from_batches([rb])) for rb in reader.batches(i, ["id", "embedding"])
                 if rb.num_rows]
        table = pa.concat_tables(parts).replace_schema_metadata(schema.metadata) if parts \
            else schema.empty_table()
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        uri = storage.join(output_uri, PREDICTIONS_DIR, f.rel)
        storage.write_bytes(uri, buf.getvalue().to_pybytes())
        files.append(uri)
        rows += table.num_rows
    return {"files": files, "rows": rows, "head": head_uri, "embeddings": reader.uri}
