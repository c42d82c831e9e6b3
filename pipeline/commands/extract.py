"""`pipeline extract` and `pipeline classify`: images -> the Embedder's actor pool -> Parquet, through the
shard ledger (reruns resume; ``--incremental`` writes run_date partitions)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from pipeline.backbone import build_backbone
from pipeline.commands.run import (
    ImageRun,
    Planner,
    estimated_images,
    new_run_id,
    partition_for,
    versions,
)
from pipeline.config import ClassifyConfig, ConfigError, ExtractConfig
from pipeline.embed import CLASSIFY_COLUMNS, EmbedderSpec
from pipeline.output.layout import EMBEDDINGS_DIR, PREDICTIONS_DIR
from pipeline.output.lease import Lease, LockPolicy, hold
from pipeline.output.ledger import Ledger
from pipeline.output.writer import EMBEDDING_COLUMNS, Output
from pipeline.plan import precision_of
from pipeline.sources import SHARDING, Layout, Shard, check_source, layout_of, list_shards

PREDICTION_COLUMNS = ("id", "source", *(name for name, _ in CLASSIFY_COLUMNS))  # OUTPUT/predictions/
RUN_DATE = "{run_date}"


def _inputs(cfg: Any, partition: str | None, overwrite: bool) -> tuple[Any, Layout, list[Shard], int]:
    """(cfg with source.uri's {run_date} filled in, the run's layout under the source root, its shards,
    skipped files): listed as the output records its shards to be cut, checked before any work."""
    if RUN_DATE in cfg.source.uri:
        if partition is None:
            raise ConfigError(f"source.uri '{cfg.source.uri}' holds {RUN_DATE}: run it with --incremental "
                              "(or `pipeline nightly`), whose run date fills it in")
        day = partition.split("=", 1)[1]
        source = cfg.source.model_copy(update={"uri": cfg.source.uri.replace(RUN_DATE, day)})
        cfg = cfg.model_copy(update={"source": source})
    # a damaged ledger is named before anything is built
    state = None if overwrite else Ledger(cfg.output.uri).check_readable()
    depth = ((state or {}).get("sharding") or {}).get("depth")
    layout = layout_of(cfg.source, depth)
    shards, skipped = list_shards(cfg.source, depth)
    check_source(cfg.source, shards)
    return cfg, layout, shards, skipped


def _map_images(kind: str, cfg: ExtractConfig | ClassifyConfig, stage: EmbedderSpec, table: str,
                columns: dict[str, str], spec_extra: dict[str, Any], *, overwrite: bool, incremental: bool,
                run_date: str | None, lock: LockPolicy | Lease | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    # Validate everything on the driver, before Ray does any work.
    partition = partition_for(incremental, run_date)
    run_id = new_run_id()
    with hold(cfg.output.uri, run_id, kind, lock) as lease:  # one writer per output, from planning on
        return _leased(kind, cfg, stage, table, columns, spec_extra, overwrite=overwrite, partition=partition,
                       run_id=run_id, lease=lease, t_start=t_start)


def _leased(kind: str, cfg: ExtractConfig | ClassifyConfig, stage: EmbedderSpec, table: str,
            columns: dict[str, str], spec_extra: dict[str, Any], *, overwrite: bool, partition: str | None,
            run_id: str, lease: Lease, t_start: float) -> dict[str, Any]:
    cfg, layout, shards, skipped = _inputs(cfg, partition, overwrite)
    backbone = build_backbone(stage.backbone, "cpu")
    planner = Planner(cfg.runtime, backbone)
    # the precision (which the output's spec records) is planned before the ledger says what is left to do
    listed = planner.plan(estimated_images(shards), wait=False)
    spec = backbone.spec(versions=versions(), precision=precision_of(listed.runtime.autocast), **spec_extra)
    del backbone
    outputs = [Output(table, columns, spec)]
    sharding = {"scheme": SHARDING, "depth": layout.depth} if shards[0].loose else None
    work = Ledger(cfg.output.uri).plan(layout.root or cfg.source.uri, {table: spec.table_key()}, shards,
                                       overwrite=overwrite, scope=layout.prefix,
                                       on_removed=cfg.source.on_removed, sharding=sharding)
    # the actors and compile for the shards this run embeds: a night of a few new images starts one actor
    todo = estimated_images(work.todo)
    decision = planner.plan(todo, wait=todo > 0)
    assert decision.runtime.autocast == listed.runtime.autocast  # the precision does not depend on the count
    stage = replace(stage, runtime=decision.runtime)  # what each actor is built from: every setting planned
    run = ImageRun(
        kind=kind, source=cfg.source, runtime=stage.runtime, output_uri=cfg.output.uri, stage=stage,
        outputs=outputs, config=json.loads(cfg.model_dump_json()), extra={"spec": spec.to_dict()},
        rows_per_file=cfg.output.rows_per_file, work=work, partition=partition, decision=decision,
        run_id=run_id, lease=lease)
    return run.run(work.todo, skipped, t_start)


def extract(cfg: ExtractConfig, *, overwrite: bool = False, incremental: bool = False,
            run_date: str | None = None, lock: LockPolicy | Lease | None = None) -> dict[str, Any]:
    """Run an extraction; returns the run summary (also written to OUTPUT/_runs/<run_id>.json).

    Reruns resume: shards the output already holds are skipped. ``incremental`` (the nightly mode) puts
    this run's rows under ``embeddings/run_date=YYYY-MM-DD/``. The run holds the output's lease
    (pipeline/output/lease.py); ``lock`` says whether to wait for another run's or break it.
    """
    stage = EmbedderSpec(cfg.backbone, cfg.runtime, dtype=cfg.output.dtype, max_bytes=cfg.source.max_bytes)
    return _map_images("extract", cfg, stage, EMBEDDINGS_DIR, EMBEDDING_COLUMNS, {"dtype": cfg.output.dtype},
                       overwrite=overwrite, incremental=incremental, run_date=run_date, lock=lock)


def classify(cfg: ClassifyConfig, *, overwrite: bool = False, incremental: bool = False,
             run_date: str | None = None, lock: LockPolicy | Lease | None = None) -> dict[str, Any]:
    """The pretrained model as a classifier: ``OUTPUT/predictions/`` with top-k ImageNet classes per image."""
    stage = EmbedderSpec(cfg.backbone, cfg.runtime, task="classify", top_k=cfg.top_k,
                         max_bytes=cfg.source.max_bytes)
    return _map_images("classify", cfg, stage, PREDICTIONS_DIR, {c: c for c in PREDICTION_COLUMNS},
                       {"dtype": "float32", "top_k": cfg.top_k},
                       overwrite=overwrite, incremental=incremental, run_date=run_date, lock=lock)
