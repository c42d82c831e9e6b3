"""`pipeline heads train` (in this process, torch) and `pipeline heads predict` (a Ray Data map over the
stored embeddings)."""

from __future__ import annotations

import time
from typing import Any

from pipeline import storage
from pipeline.commands.run import new_run_id
from pipeline.config import RuntimeConfig
from pipeline.output.layout import PREDICTIONS_DIR
from pipeline.output.lease import Lease, LockPolicy, hold
from pipeline.output.writer import write_run_record


def predict(head_uri: str, embeddings_uri: str, output_uri: str, *, top_k: int = 1,
            runtime: RuntimeConfig | None = None, partition: str | None = None,
            lock: LockPolicy | Lease | None = None) -> dict[str, Any]:
    """Apply a trained head to stored embeddings as a Ray Data map: ``OUTPUT/predictions/*.parquet``
    (id, label, score[, top_labels, top_scores]). Refuses embeddings whose spec differs from the head's.
    With ``partition`` (``run_date=YYYY-MM-DD``) only that folder under predictions/ is replaced. Holds
    the output's lease (pipeline/output/lease.py)."""
    with hold(output_uri, new_run_id(), "heads predict", lock):
        return _predict(head_uri, embeddings_uri, output_uri, top_k=top_k, runtime=runtime,
                        partition=partition)


def _predict(head_uri: str, embeddings_uri: str, output_uri: str, *, top_k: int,
             runtime: RuntimeConfig | None, partition: str | None) -> dict[str, Any]:
    from pipeline.heads import HeadPredictor
    from pipeline.output.reader import EmbeddingReader

    runtime = runtime or RuntimeConfig()
    # a head is a matrix product: one single-CPU actor unless asked for more
    runtime = runtime.model_copy(update={k: v for k, v in (("actors", "1"), ("cpus_per_actor", 1.0))
                                         if getattr(runtime, k) is None})
    t_start = time.perf_counter()
    predictor = HeadPredictor(head_uri, top_k=top_k)  # loads and validates the head on the driver
    reader = EmbeddingReader(embeddings_uri)
    predictor.check_spec(reader.spec)
    del predictor

    from pipeline.ray.data import predict as ray_predict

    out_uri = storage.join(output_uri, PREDICTIONS_DIR, *([partition] if partition else []))
    rows = ray_predict(HeadPredictor, {"head_uri": head_uri, "top_k": top_k}, reader.files, out_uri, runtime,
                       batch_size=max(runtime.batch_size or 0, 1024))
    summary = {"kind": "predict", "head": head_uri, "embeddings": reader.uri, "predictions": out_uri,
               "rows": rows, "total_s": round(time.perf_counter() - t_start, 3)}
    summary["run_record"] = write_run_record(output_uri, new_run_id(), summary)
    return summary


def format_predict(s: dict[str, Any]) -> str:
    return f"{s['rows']} predictions -> {s['predictions']} in {s['total_s']:.1f}s"


def format_train(meta: dict[str, Any]) -> str:
    """One line of validation metrics and where the artifacts went."""
    val = meta["metrics"]["validation"] or {}
    return (f"{meta['head']['type']} head on {meta['split']['train']} rows, {len(meta['classes'])} "
            f"classes: validation accuracy {val.get('accuracy', float('nan')):.4f}, macro-F1 "
            f"{val.get('macro_f1', float('nan')):.4f} ({meta['split']['validation']} rows)\n"
            f"  artifacts: {', '.join(meta['output'].values())}")
