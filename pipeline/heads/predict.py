"""Predicting with a trained head: ``HeadPredictor``, the per-batch callable the runner maps over
embeddings, and ``predict_local``, which runs it over an extract output without Ray."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import storage
from pipeline.heads.model import load_head
from pipeline.output.layout import PREDICTIONS_DIR, write_parquet
from pipeline.output.reader import EmbeddingReader
from pipeline.output.spec import EmbeddingSpec


class HeadPredictor:
    """Callable stage: embeddings rows -> id, label, score (and top-k lists). Loads the head once."""

    def __init__(self, head_uri: str, top_k: int = 1, device: str = "cpu") -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.head_uri = head_uri
        self.model, self.meta = load_head(head_uri, device)
        self.device = next(self.model.parameters()).device
        self.classes = pa.array(self.meta["classes"], pa.string())
        self.spec = EmbeddingSpec.parse(self.meta["embedding_spec"])
        self.dim = int(self.meta["head"]["input_dim"])
        self.top_k = min(top_k, len(self.classes))
        fields: list[pa.Field] = [pa.field("id", pa.string()), pa.field("label", pa.string()),
                                  pa.field("score", pa.float32())]
        if top_k > 1:
            fields += [pa.field("top_labels", pa.list_(pa.string())),
                       pa.field("top_scores", pa.list_(pa.float32()))]
        self.schema = pa.schema(fields)
        self._checked: set[bytes] = set()

    def check_spec(self, spec: EmbeddingSpec | dict[str, Any]) -> None:
        """ValueError naming each field where these embeddings differ from the head's."""
        diff = self.spec.feature_differences(spec)
        if diff:
            s = self.spec
            raise ValueError(
                f"embeddings do not match head '{self.head_uri}': {'; '.join(diff)}. Extract with the head's "
                f"settings (--model {s.model} --layer {s.layer} --pool {s.pool}, same weights) or train a "
                "head on these embeddings")

    def __call__(self, batch: pa.Table | pa.RecordBatch | dict[str, Any]) -> pa.Table:
        if isinstance(batch, dict):
            ids = pa.array(list(batch["id"]), pa.string())
            x = np.asarray(np.stack(list(batch["embedding"])) if len(batch["id"]) else
                           np.zeros((0, self.dim)), dtype=np.float32)
        else:
            meta = batch.schema.metadata or {}
            raw = meta.get(b"pipeline")
            if raw is not None and raw not in self._checked:
                self.check_spec(EmbeddingSpec.parse(raw))
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
        "head": head_uri, "classes": predictor.meta["classes"],
        "embedding_spec": predictor.spec.to_dict()}).encode()})
    files, rows = [], 0
    for i, f in enumerate(reader.files):
        parts = [predictor(pa.Table.from_batches([rb])) for rb in reader.batches(i, ["id", "embedding"])
                 if rb.num_rows]
        table = pa.concat_tables(parts).replace_schema_metadata(schema.metadata) if parts \
            else schema.empty_table()
        files.append(write_parquet(storage.join(output_uri, PREDICTIONS_DIR, f.rel), table))
        rows += table.num_rows
    return {"files": files, "rows": rows, "head": head_uri, "embeddings": reader.uri}
