"""The rows fine-tuning reads: labels from class folders, loose files regrouped so that each read task mixes
classes, one side of the split (split.py) selected per batch, and ``TrainBatches``, which turns encoded
bytes into augmented tensors inside each training worker."""

from __future__ import annotations

import hashlib
import posixpath
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import MAX_BYTES, MAX_PIXELS
from pipeline.sources import Shard
from pipeline.split import Split

if TYPE_CHECKING:  # torch is imported where it is used: Ray Data tasks that only filter rows stay light
    import torch


def folder_labels(shards: list[Shard]) -> tuple[list[str], list[str | None]]:
    """(ids, labels) of loose image files with --labels folder, from the listing alone (no bytes read)."""
    ids = [rel for s in shards for rel in s.rels]
    return ids, [posixpath.dirname(rel).rsplit("/", 1)[-1] or None for rel in ids]


def mixed_shards(shards: list[Shard], files_per_shard: int) -> list[Shard]:
    """Loose files regrouped in hash order, so that each read task holds a mix of classes (folders)."""
    if not shards or shards[0].format != "files":
        return shards
    members = [(uri, rel, size) for s in shards
               for uri, rel, size in zip(s.uris, s.rels, s.sizes or (0,) * len(s.uris))]
    members.sort(key=lambda m: hashlib.sha1(m[1].encode("utf-8")).hexdigest())
    out = []
    for i in range(0, len(members), files_per_shard):
        part = members[i:i + files_per_shard]
        digest = hashlib.sha1("\n".join(m[1] for m in part).encode("utf-8")).hexdigest()[:10]
        out.append(Shard(key=f"train-{i // files_per_shard:05d}-{digest}", format="files",
                         uris=tuple(m[0] for m in part), rels=tuple(m[1] for m in part),
                         size=sum(m[2] for m in part), version=digest, sizes=tuple(m[2] for m in part)))
    return out


SELECTED = ["id", "source", "label", "bytes", "error_kind", "error_message"]


def select_rows(batch: pa.Table, *, which: str, split: Split) -> pa.Table:
    """Rows of one side of the split that are labelled with a known class, unreadable ones included (they
    become error rows in the training worker); the SELECTED columns the batch has."""
    ids = batch.column("id").to_pylist()
    ok = pc.is_in(batch.column("label"), value_set=pa.array(split.classes, pa.string()))
    ok = np.asarray(ok.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    is_val = split.is_val(ids)
    keep = ok & (is_val if which == "val" else ~is_val)
    return batch.filter(pa.array(keep)).select([c for c in SELECTED if c in batch.column_names])


class TrainBatches:
    """Callable: a batch of rows (id, source, label, bytes, error_kind, error_message) -> {"x": images,
    "y": class indices, "failed": count}, decoded in the training worker with the Embedder's Preprocessor
    (so only encoded bytes cross Ray's object store, and bad images fail the same way as in `extract`).

    Images that cannot be read or decoded are left out of the batch, counted, and kept in ``errors``
    (id -> (source, kind, message)) for the errors table.
    """

    def __init__(self, transform: Callable, classes: list[str], input_size: tuple[int, ...], *,
                 max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES,
                 threads: int | None = None) -> None:
        import torch

        from pipeline.preprocess import Preprocessor

        self.prep = Preprocessor(transform, torch.device("cpu"), decoder="pil", max_pixels=max_pixels,
                                 max_bytes=max_bytes, threads=threads)
        self.index = {c: i for i, c in enumerate(classes)}
        self.input_size = tuple(input_size)
        self.errors: dict[str, tuple[str | None, str, str | None]] = {}
        self._lock = threading.Lock()  # batches may be collated in several threads

    def __call__(self, batch: pa.Table | dict[str, Any]) -> dict[str, torch.Tensor]:
        import torch

        n = batch.num_rows if isinstance(batch, pa.Table) else len(batch["id"])
        cols = {k: _column(batch, k, n) for k in ("id", "source", "label", "bytes", "error_kind",
                                                  "error_message")}
        todo = [i for i in range(n) if cols["error_kind"][i] is None and cols["label"][i] in self.index]
        x, errors = self.prep([cols["bytes"][i] for i in todo])
        failed = {i: (cols["error_kind"][i], cols["error_message"][i]) for i in range(n)
                  if cols["error_kind"][i] is not None}
        failed.update({i: (e.kind, e.message) for i, e in zip(todo, errors) if e is not None})
        with self._lock:
            for i, (kind, message) in failed.items():
                self.errors[cols["id"][i]] = (cols["source"][i], kind, message)
        good = [i for i, e in zip(todo, errors) if e is None]
        if x is None:
            x = torch.zeros((0, *self.input_size))
        return {"x": x, "y": torch.tensor([self.index[cols["label"][i]] for i in good], dtype=torch.long),
                "failed": torch.tensor(len(failed), dtype=torch.long)}


def _column(batch: pa.Table | dict[str, Any], name: str, n: int) -> list[Any]:
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist() if name in batch.column_names else [None] * n
    col = batch.get(name)
    return [None] * n if col is None else list(col)
