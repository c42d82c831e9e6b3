"""The rows a head trains on: labelled embeddings encoded as (x, class index, is validation), held in
memory as tensors or read again from storage on every pass, and the training split's feature moments."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.output.reader import READ_ROWS, EmbeddingChunk, EmbeddingReader
from pipeline.split import Split


class Moments:
    """Shifted float64 sums for mean/std without holding the rows."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None

    def add(self, x: np.ndarray, sign: int = 1) -> None:
        """Add the rows of x (sign -1: take them out again)."""
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


class Encoder:
    """Turns chunks into (x, y, is_val) for known classes."""

    def __init__(self, classes: list[str], split: Split) -> None:
        self.classes = pa.array(classes, pa.string())
        self.split = split

    def __call__(self, chunk: EmbeddingChunk, h: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """x, y, is_val of the rows whose label is a known class; and the count of the other rows."""
        codes = pc.index_in(chunk.labels, value_set=self.classes)
        keep = codes.is_valid().to_numpy(zero_copy_only=False)
        y = codes.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        is_val = self.split.is_val(chunk.ids, h)
        if keep.all():
            return chunk.x, y, is_val, 0
        return chunk.x[keep], y[keep], is_val[keep], int((~keep).sum())


class InMemory:
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
                for i in range(0, len(y), READ_ROWS):
                    yield x[i:i + READ_ROWS], y[i:i + READ_ROWS], split


class Streamed:
    """Rows read from storage on every pass: file order shuffled per epoch, rows shuffled in a buffer."""

    streamed = True

    def __init__(self, reader: EmbeddingReader, encode: Encoder, batch_size: int, seed: int,
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
