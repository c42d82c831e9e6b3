"""Heads on stored embeddings: train a linear or MLP classifier, write it as an artifact, predict with it.

Ray-free. ``train_head(cfg)`` reads ``OUTPUT/embeddings/*.parquet`` (local or object storage, through
storage.py and ``sink.EmbeddingReader``), trains in memory or, above ``max_rows_in_memory`` rows, by
streaming record batches, and writes ``head.safetensors``, ``head.json`` and ``report.png``.
``HeadPredictor`` is the per-batch callable the runner maps over embeddings; ``predict_local`` runs it over a
folder without Ray. The train/validation split is split.py's.

Modules: ``model`` (the head module and its artifact), ``data`` (rows in memory or streamed),
``train`` (configuration, training loop, metrics), ``predict``.
"""

from pipeline.config import HeadTrainConfig
from pipeline.heads.model import (
    FORMAT_VERSION,
    HEAD_META,
    HEAD_REPORT,
    HEAD_WEIGHTS,
    HeadModel,
    Standardize,
    load_head,
)
from pipeline.heads.predict import HeadPredictor, predict_local
from pipeline.heads.train import MIN_STEPS, metrics_from_confusion, train_head
from pipeline.output.reader import EmbeddingReader

__all__ = [
    "FORMAT_VERSION", "HEAD_META", "HEAD_REPORT", "HEAD_WEIGHTS", "MIN_STEPS",
    "EmbeddingReader", "HeadModel", "HeadPredictor", "HeadTrainConfig", "Standardize",
    "load_head", "metrics_from_confusion", "predict_local", "train_head",
]
