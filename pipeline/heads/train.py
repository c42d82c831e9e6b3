"""Training a head on stored embeddings: the configuration, the AdamW loop with early stopping on the
validation loss, metrics from confusion matrices, and ``train_head``, which writes the head's artifacts.

One pass over the embeddings gathers the labels, the split (split.py) and the training split's feature
moments; the rows are kept in memory up to ``max_rows_in_memory`` and read again from storage above it.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from pipeline.config import HeadTrainConfig
from pipeline.heads.data import Encoder, InMemory, Moments, Streamed
from pipeline.heads.model import (
    FORMAT_VERSION,
    HeadModel,
    head_device,
    write_head,
)
from pipeline.output.reader import READ_ROWS, EmbeddingChunk, EmbeddingReader, LabelTable
from pipeline.output.spec import EmbeddingSpec
from pipeline.split import Split, SplitStats, hash_unit

log = logging.getLogger(__name__)

MIN_STEPS = 32  # optimizer steps per epoch at least (batch_size shrinks for small tables, down to 32)


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


def _fit(model: HeadModel, data: InMemory | Streamed, cfg: HeadTrainConfig, loss_fn: nn.Module,
         device: torch.device, k: int, has_val: bool, progress: bool) -> dict[str, Any]:
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


def _class_weights(cfg: HeadTrainConfig, split: Split, classes: list[str]) -> np.ndarray | None:
    if cfg.class_weight == "none":
        return None
    counts = np.array([split.per_class[c]["train"] for c in classes], dtype=np.float64)
    return (counts.sum() / (len(classes) * np.maximum(counts, 1))).astype(np.float32)


def _check_labels(stats: SplitStats, reader: EmbeddingReader, cfg: HeadTrainConfig,
                  warnings: list[str]) -> None:
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


def _first_pass(reader: EmbeddingReader, val_fraction: float, read_rows: int, streamed: bool
                ) -> tuple[SplitStats, Moments, list[tuple[EmbeddingChunk, np.ndarray]]]:
    """One pass over the embeddings: the split's statistics, the feature moments, and (unless streamed) the
    chunks with their ids' hashes."""
    stats = SplitStats(val_fraction)
    moments = Moments()  # of the labelled rows at or above the threshold, then corrected with the split
    kept: list[tuple[EmbeddingChunk, np.ndarray]] = []
    for chunk in reader.chunks(rows=read_rows):
        h = hash_unit(chunk.ids)
        moments.add(chunk.x[stats.update(chunk.ids, chunk.labels, h, chunk.x)])
        if not streamed:
            kept.append((chunk, h))
    return stats, moments, kept


def _training_data(reader: EmbeddingReader, kept: list[tuple[EmbeddingChunk, np.ndarray]], encode: Encoder,
                   streamed: bool, batch_size: int, seed: int, read_rows: int, device: torch.device
                   ) -> InMemory | Streamed:
    """The rows to train on: read again from storage when streamed, else the kept chunks encoded into
    arrays (``kept`` is emptied)."""
    if streamed:
        return Streamed(reader, encode, batch_size, seed, read_rows)
    parts = [encode(c, h) for c, h in kept]
    kept.clear()
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    is_val = np.concatenate([p[2] for p in parts])
    del parts
    return InMemory(x, y, is_val, batch_size, seed, device)


def train_head(cfg: HeadTrainConfig | dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Train a head on stored embeddings and write its artifacts; returns head.json's content + "output"."""
    cfg = cfg if isinstance(cfg, HeadTrainConfig) else HeadTrainConfig(**cfg)
    device = head_device(cfg.device)
    labels = LabelTable(cfg.labels_from) if cfg.labels_from else None
    reader = EmbeddingReader(cfg.embeddings, labels)
    streamed = reader.num_rows > cfg.max_rows_in_memory
    read_rows = max(1024, min(READ_ROWS, cfg.max_rows_in_memory))
    warnings: list[str] = []

    # pass one: labels, split, train-split moments (and the rows themselves when they fit)
    stats, moments, kept = _first_pass(reader, cfg.val_fraction, read_rows, streamed)
    _check_labels(stats, reader, cfg, warnings)
    for w in warnings:
        log.warning(w)
    split = stats.finish(moved=lambda x, sign: moments.add(x[None], sign))
    classes = split.classes
    k = len(classes)
    encode = Encoder(classes, split)
    mean, std = moments.mean_std()

    n_train, n_val = split.train_rows, split.val_rows
    # small tables: smaller minibatches, so an epoch still takes MIN_STEPS optimizer steps
    batch_size = min(cfg.batch_size, max(32, math.ceil(n_train / MIN_STEPS)))
    data = _training_data(reader, kept, encode, streamed, batch_size, cfg.seed, read_rows, device)

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
        "embedding_spec": reader.spec.features(),
        "embeddings": reader.uri,
        "head": {"type": cfg.head, "input_dim": reader.dim, "num_classes": k,
                 "hidden": list(cfg.hidden) if cfg.head == "mlp" else [],
                 "dropout": cfg.dropout if cfg.head == "mlp" else 0.0},
        "hyperparameters": cfg.model_dump(),
        "split": split.to_json(skipped_unlabeled=stats.unlabeled, rows=stats.rows),
        "batch_size": batch_size,
        "class_weights": dict(zip(classes, cw.tolist())) if cw is not None else None,
        "metrics": metrics,
        **fit,
        "streamed": streamed,
        "device": str(device),
        "warnings": warnings,
        "versions": {"torch": torch.__version__, "pyarrow": pa.__version__, "numpy": np.__version__},
    }
    out = write_head(cfg.output, model, meta)
    val = metrics.get("validation") or {}
    log.info("head trained: %s classes, validation accuracy %s, best epoch %s", k, val.get("accuracy"),
             fit["best_epoch"])
    return {**meta, "output": out}


def _evaluate_test(model: HeadModel, cfg: HeadTrainConfig, labels: LabelTable | None,
                   spec: EmbeddingSpec, classes: list[str], loss_fn: nn.Module, device: torch.device,
                   rows: int) -> dict[str, Any]:
    reader = EmbeddingReader(cfg.test, labels)
    diff = spec.feature_differences(reader.spec)
    if diff:
        raise ValueError(f"test embeddings '{reader.uri}' do not match the training embeddings: "
                         f"{'; '.join(diff)}. Extract the test set with the same model, weights, layer, pool")
    encode = Encoder(classes, Split(classes, 0.0, {}, {}))
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
