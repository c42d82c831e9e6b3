"""The train/validation split of labelled rows, shared by `heads train` and `finetune`.

Deterministic, stable and stratified. Each row gets ``u = sha1(id)[:8] / 2**64`` (``hash_unit``), uniform in
[0, 1) and independent of the seed, the file layout and the other rows. A row is in validation when
``u < val_fraction``, so a rerun gives the same split and adding rows never moves an existing row. Within
each class this takes, in expectation, ``val_fraction`` of the rows, the lowest-hash ones. Two corrections
keep every class in both splits: a class with >= 2 rows and no row under the threshold sends its
lowest-hash row to validation; a class whose rows all fall under it keeps its highest-hash row in training
(a one-row class trains only). These touch at most one row per class, only in classes too small to be split
by the threshold, and are the only way a row's side can depend on other rows.

``SplitStats`` gathers what the corrections need in one pass over chunks of rows (memory constant in the
number of rows); ``Split`` applies the result to any rows by id.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError

RULE = ("validation iff sha1(id)[:8]/2**64 < val_fraction; per class at least one row in each split when it "
        "has >= 2 rows")


def hash_unit(ids: list[str]) -> np.ndarray:
    """sha1(id)[:8] / 2**64: a uniform float in [0, 1) per id, the split key."""
    raw = b"".join(hashlib.sha1(s.encode("utf-8")).digest()[:8] for s in ids)
    return np.frombuffer(raw, dtype=">u8").astype(np.float64) / 2.0**64


@dataclass
class Split:
    """Classes and the split: validation iff hash(id) < fraction, except the ids in ``flips`` (at most one
    per class, so that every class with >= 2 rows is on both sides)."""

    classes: list[str]
    fraction: float
    flips: dict[str, bool]  # id -> is validation, where it differs from the hash rule
    per_class: dict[str, dict[str, int]]

    @property
    def train_rows(self) -> int:
        return sum(c["train"] for c in self.per_class.values())

    @property
    def val_rows(self) -> int:
        return sum(c["validation"] for c in self.per_class.values())

    def is_val(self, ids: list[str], h: np.ndarray | None = None) -> np.ndarray:
        """The validation mask of these rows; h: their hash_unit when already computed."""
        if self.fraction <= 0:
            return np.zeros(len(ids), dtype=bool)
        val = (hash_unit(ids) if h is None else h) < self.fraction
        if self.flips:
            for i, s in enumerate(ids):
                if s in self.flips:
                    val[i] = self.flips[s]
        return val

    def to_json(self, **counts: int) -> dict[str, Any]:
        """The rule, the fraction and the row counts (plus ``counts``) for a report."""
        return {"rule": RULE, "val_fraction": self.fraction, "train": self.train_rows,
                "validation": self.val_rows, **counts, "per_class": self.per_class}


@dataclass
class ClassStats:
    """One class's rows: how many, how many under the threshold, and its lowest- and highest-hash rows as
    (hash, id, payload)."""

    n: int = 0
    below: int = 0
    lo: tuple[float, str, Any] = (math.inf, "", None)
    hi: tuple[float, str, Any] = (-math.inf, "", None)


class SplitStats:
    """Labels, classes and each class's extreme rows, gathered chunk by chunk; ``finish()`` is the Split."""

    def __init__(self, val_fraction: float) -> None:
        self.fraction = val_fraction
        self.classes: dict[str, ClassStats] = {}
        self.unlabeled = 0
        self.rows = 0

    def update(self, ids: list[str], labels: pa.Array, h: np.ndarray, rows: np.ndarray | None = None
               ) -> np.ndarray:
        """Count one chunk (labels: string, null when unlabelled; h: hash_unit(ids)). ``rows[i]`` is kept as
        the payload of a class's extreme row. Returns the mask of the labelled rows at or above the
        threshold: the training side before the corrections."""
        self.rows += len(ids)
        valid = labels.is_valid().to_numpy(zero_copy_only=False)
        self.unlabeled += int((~valid).sum())
        train = np.zeros(len(ids), dtype=bool)
        if not valid.any():
            return train
        where = np.flatnonzero(valid)
        enc = pc.dictionary_encode(labels.filter(pa.array(valid)))
        names = enc.dictionary.to_pylist()
        codes = enc.indices.to_numpy(zero_copy_only=False)
        hv = h[where]
        train[where[hv >= self.fraction]] = True
        order = np.lexsort((hv, codes))
        sc = codes[order]
        starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
        ends = np.r_[starts[1:], len(sc)]
        for s, e in zip(starts, ends):
            st = self.classes.setdefault(names[sc[s]], ClassStats())
            st.n += int(e - s)
            st.below += int((hv[order[s:e]] < self.fraction).sum())
            lo, hi = where[order[s]], where[order[e - 1]]
            if h[lo] < st.lo[0]:
                st.lo = (float(h[lo]), ids[lo], None if rows is None else rows[lo].copy())
            if h[hi] > st.hi[0]:
                st.hi = (float(h[hi]), ids[hi], None if rows is None else rows[hi].copy())
        return train

    def finish(self, moved: Callable[[Any, int], None] | None = None) -> Split:
        """The split. ``moved(payload, sign)`` is called for each row a correction moves into training
        (sign +1) or out of it (sign -1), in class order."""
        flips: dict[str, bool] = {}
        per_class: dict[str, dict[str, int]] = {}

        def move(row: tuple[float, str, Any], to_val: bool) -> None:
            if to_val:
                flips[row[1]] = True
            else:
                flips.setdefault(row[1], False)  # an id forced to validation elsewhere stays there
            if moved is not None:
                moved(row[2], -1 if to_val else 1)

        for name, st in self.classes.items():
            if self.fraction <= 0:
                n_val = 0
            elif st.n == 1:
                n_val = 0
                if st.below:
                    move(st.lo, to_val=False)
            elif st.below == 0:
                n_val = 1
                move(st.lo, to_val=True)
            elif st.below == st.n:
                n_val = st.n - 1
                move(st.hi, to_val=False)
            else:
                n_val = st.below
            per_class[name] = {"train": st.n - n_val, "validation": n_val}
        return Split(sorted(self.classes), self.fraction, flips, per_class)


def split_ids(ids: list[str], labels: list[str | None], val_fraction: float = 0.2) -> np.ndarray:
    """The validation mask of these rows (True = validation; unlabelled rows False)."""
    ids = list(ids)
    arr = pa.array(labels, pa.string())
    stats = SplitStats(val_fraction)
    h = hash_unit(ids)
    stats.update(ids, arr, h)
    return stats.finish().is_val(ids, h) & arr.is_valid().to_numpy(zero_copy_only=False)


def make_split(ids: list[str], labels: list[str | None], val_fraction: float) -> Split:
    """Fine-tuning's split of a source's labelled rows (unlabelled ones are left out); ConfigError for
    repeated ids or fewer than 2 classes."""
    keep = [i for i, lab in enumerate(labels) if lab is not None and lab != ""]
    ids = [ids[i] for i in keep]
    labels = [labels[i] for i in keep]
    if len(set(ids)) != len(ids):
        raise ConfigError("the source repeats some ids: each image needs a unique id (source.id_column)")
    classes = sorted(set(labels))  # type: ignore[arg-type]
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "no labelled images"
        raise ConfigError(
            f"fine-tuning needs at least 2 classes, found {found} among {len(ids)} labelled images: check "
            "the labels (with --labels folder each class is its own folder under --source)")
    stats = SplitStats(val_fraction)
    stats.update(ids, pa.array(labels, pa.string()), hash_unit(ids))
    split = stats.finish()
    return replace(split, per_class={c: split.per_class[c] for c in split.classes})
