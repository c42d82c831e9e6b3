"""`pipeline extract` and `pipeline classify`: images -> the Embedder's actor pool -> Parquet, through the
shard ledger (reruns resume; ``--incremental`` writes run_date partitions)."""

from __future__ import annotations

import json
import time
from typing import Any

from pipeline.backbones import build_backbone
from pipeline.commands.run import ImageRun, partition_for, runtime_for, versions
from pipeline.config import ClassifyConfig, ExtractConfig
from pipeline.embed import Embedder
from pipeline.ledger import Ledger
from pipeline.sink import EMBEDDING_COLUMNS, EMBEDDINGS_DIR, PREDICTIONS_DIR, Output
from pipeline.sources import check_source, list_shards

CLASSIFY_COLUMNS = ("id", "source", "labels", "scores", "classes")


def _run(kind: str, cfg: ExtractConfig | ClassifyConfig, backbone_cfg: Any, table: str,
         columns: dict[str, str], spec_extra: dict[str, Any], stage_extra: dict[str, Any], *,
         overwrite: bool, incremental: bool, run_date: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    # Validate everything on the driver, before Ray does any work.
    partition = partition_for(incremental, run_date)
    shards, skipped = list_shards(cfg.source)
    check_source(cfg.source, shards)
    backbone = build_backbone(backbone_cfg, "cpu")
    runtime = runtime_for(cfg.runtime, backbone)
    spec = backbone.spec(versions=versions(), **spec_extra)
    del backbone
    outputs = [Output(table, columns, spec)]
    plan = Ledger(cfg.output.uri).plan(cfg.source.uri, {table: spec.table_key()}, shards, overwrite=overwrite)
    run = ImageRun(
        kind=kind, source=cfg.source, runtime=runtime, output_uri=cfg.output.uri, stage=Embedder,
        stage_kwargs={"backbone": backbone_cfg.model_dump(), "runtime": runtime.model_dump(),
                      "max_bytes": cfg.source.max_bytes, **stage_extra},
        outputs=outputs, config=json.loads(cfg.model_dump_json()), extra={"spec": spec.to_dict()},
        rows_per_file=cfg.output.rows_per_file, plan=plan, partition=partition)
    return run.run(plan.todo, skipped, t_start)


def extract(cfg: ExtractConfig, *, overwrite: bool = False, incremental: bool = False,
            run_date: str | None = None) -> dict[str, Any]:
    """Run an extraction; returns the run summary (also written to OUTPUT/_runs/<run_id>.json).

    Reruns resume: shards the output already holds are skipped. ``incremental`` (the nightly mode) puts
    this run's rows under ``embeddings/run_date=YYYY-MM-DD/``.
    """
    return _run("extract", cfg, cfg.backbone, EMBEDDINGS_DIR, EMBEDDING_COLUMNS,
                {"dtype": cfg.output.dtype}, {"dtype": cfg.output.dtype},
                overwrite=overwrite, incremental=incremental, run_date=run_date)


def classify(cfg: ClassifyConfig, *, overwrite: bool = False, incremental: bool = False,
             run_date: str | None = None) -> dict[str, Any]:
    """The pretrained model as a classifier: ``OUTPUT/predictions/`` with top-k ImageNet classes per image."""
    backbone_cfg = cfg.backbone.model_copy(update={"layer": "logits", "normalize": False})
    return _run("classify", cfg, backbone_cfg, PREDICTIONS_DIR, {c: c for c in CLASSIFY_COLUMNS},
                {"dtype": "float32", "top_k": cfg.top_k}, {"task": "classify", "top_k": cfg.top_k},
                overwrite=overwrite, incremental=incremental, run_date=run_date)
