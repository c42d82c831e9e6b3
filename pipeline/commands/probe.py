"""`pipeline probe`: which backbone and layer are best for these labels. Each model's candidate layers are
extracted in one pass over the images, the same head is trained on each, and the cuts are ranked."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from pipeline import storage
from pipeline.backbone import build_backbone
from pipeline.backbone.cuts import make_capture, stage_names
from pipeline.backbone.models import create_model, input_size
from pipeline.commands.run import ImageRun, estimated_images, plan_for, versions
from pipeline.config import ConfigError, HeadTrainConfig, ProbeConfig
from pipeline.embed import EmbedderSpec, embedding_column
from pipeline.output.layout import EMBEDDINGS_DIR, ERRORS_DIR
from pipeline.output.ledger import clear_or_refuse
from pipeline.output.writer import EMBEDDING_COLUMNS, Output
from pipeline.plan import precision_of
from pipeline.sources import Shard, check_source, list_shards, sample_shards


def slug(text: str) -> str:
    """A model name as a folder name (the feature passes of probe and compare are stored under it)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def forward_cost_ms(backbone, layers: list[str], order: list[str] | None = None, batch: int = 8,
                    repeats: int = 3) -> dict[str, float]:
    """Milliseconds per image of a forward pass cut at each layer (CPU, batch of 8): the extraction cost.

    Each cut is warmed up once and timed ``repeats`` times; the fastest run counts (the least disturbed by
    other work on the machine). ``order``: layers in execution order (stages, then final, then logits); a
    cut in it costs at least what every earlier one costs, since its forward pass runs through them.
    """
    import torch

    h, w = input_size(backbone.preprocessing)
    x = torch.randn(batch, 3, h, w)
    out = {}
    for layer in layers:
        capture = make_capture(backbone.model, backbone.model_name, [layer])
        times = []
        with torch.inference_mode():
            capture(x)
            for _ in range(repeats):
                t = time.perf_counter()
                capture(x)
                times.append(time.perf_counter() - t)
        out[layer] = 1000 * min(times) / batch
    floor = 0.0
    for layer in sorted((x for x in layers if x in (order or [])), key=(order or []).index):
        floor = out[layer] = max(out[layer], floor)
    return {layer: round(out[layer], 3) for layer in layers}


def extract_run(cfg: ProbeConfig, model: str, shards: list[Shard], limit: int | None
                 ) -> tuple[ImageRun, str, list[str], tuple[int, ...], dict[str, float]]:
    """One model's extraction run over all its candidate layers (the backbone built on CPU checks every
    layer and pooling up front), with the layers, their dims and forward costs."""
    bcfg = cfg.backbone.model_copy(update={"model": model})
    order = [*stage_names(create_model(model, "none")[0], model), "final", "logits"]
    layers = order if cfg.layers == ["all"] else list(cfg.layers)
    backbone = build_backbone(bcfg, "cpu", layers)  # validates every layer and pooling up front
    decision = plan_for(cfg.runtime, backbone, estimated_images(shards) if limit is None else limit)
    runtime = decision.runtime
    outputs = [
        Output(f"{slug(model)}/{layer}/{EMBEDDINGS_DIR}",
               {**EMBEDDING_COLUMNS, "embedding": embedding_column(i, len(layers))},
               backbone.spec(i, dtype="float32", versions=versions(),
                             precision=precision_of(runtime.autocast)))
        for i, layer in enumerate(layers)
    ]
    stage = EmbedderSpec(bcfg, runtime, layers=tuple(layers), max_bytes=cfg.source.max_bytes)
    run = ImageRun(kind="probe-extract", source=cfg.source, runtime=runtime, output_uri=cfg.output.uri,
                   stage=stage,
                   outputs=outputs, config=json.loads(cfg.model_dump_json()),
                   extra={"model": model, "layers": layers}, limit=limit, decision=decision)
    return run, model, layers, backbone.dims, forward_cost_ms(backbone, layers, order)


def probe(cfg: ProbeConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Rank cuts by the validation accuracy of a head trained on each.

    Writes ``OUTPUT/<model>/<layer>/embeddings/`` and ``.../head/`` per candidate, ``OUTPUT/probe.json`` and
    ``OUTPUT/probe.png``.
    """
    from pipeline.heads import train_head
    from pipeline.reports import probe_png

    t_start = time.perf_counter()
    shards, skipped = list_shards(cfg.source)
    check_source(cfg.source, shards)
    limit = None
    if cfg.sample:
        sampled = sample_shards(shards, cfg.sample, cfg.source.files_per_shard)
        if sampled is None:
            limit = cfg.sample
        else:
            shards = sampled

    runs_to_do = [extract_run(cfg, model, shards, limit) for model in cfg.model_names()]
    storage.check_writable(cfg.output.uri)
    clear_or_refuse(cfg.output.uri, [o.subdir for r in runs_to_do for o in r[0].outputs] + [ERRORS_DIR],
                    overwrite)

    results, runs = [], []
    for run, model, layers, dims, cost in runs_to_do:
        runs.append(run.run(shards, skipped, time.perf_counter())["run_id"])
        for layer, dim in zip(layers, dims):
            layer_dir = storage.join(cfg.output.uri, slug(model), layer)
            head = train_head(HeadTrainConfig(
                embeddings=layer_dir, output=storage.join(layer_dir, "head"), head=cfg.head,
                val_fraction=cfg.val_fraction, epochs=cfg.epochs), progress=False)
            val = head["metrics"]["validation"] or {}
            results.append({
                "model": model, "layer": layer, "dim": dim,
                "accuracy": val.get("accuracy"), "macro_f1": val.get("macro_f1"),
                "train_accuracy": (head["metrics"]["train"] or {}).get("accuracy"),
                "forward_ms_per_image": cost[layer],
                "train_rows": head["split"]["train"], "val_rows": head["split"]["validation"],
                "head": storage.join(layer_dir, "head"),
            })
            if progress:
                print(f"probe: {model} @ {layer:<10} dim {dim:<5} val accuracy {val.get('accuracy', 0):.3f} "
                      f"macro-F1 {val.get('macro_f1', 0):.3f}", file=sys.stderr)

    ranked = [r for r in results if r["accuracy"] is not None]
    if not ranked:
        raise ConfigError("no layer could be evaluated: the sample has no validation rows; raise --sample")
    best = max(ranked, key=lambda r: (r["accuracy"], r["macro_f1"] or 0, -r["forward_ms_per_image"]))
    report = {
        "best": {k: best[k] for k in ("model", "layer", "dim", "accuracy", "macro_f1")},
        "results": results,
        "head": cfg.head,
        "runs": runs,
        "total_s": round(time.perf_counter() - t_start, 3),
        "config": json.loads(cfg.model_dump_json()),
    }
    storage.write_json(storage.join(cfg.output.uri, "probe.json"), report, indent=2)
    storage.write_bytes(storage.join(cfg.output.uri, "probe.png"), probe_png(results, best))
    report["probe_json"] = storage.join(cfg.output.uri, "probe.json")
    return report


def format_probe(report: dict) -> str:
    """The probe table, best first."""
    rows = sorted(report["results"], key=lambda r: -(r["accuracy"] or 0))
    width = max(len(f"{r['model']} @ {r['layer']}") for r in rows)
    lines = [f"{'cut':<{width}}  {'dim':>5}  {'val acc':>7}  {'macro-F1':>8}  {'ms/img':>6}"]
    for r in rows:
        lines.append(f"{r['model'] + ' @ ' + r['layer']:<{width}}  {r['dim']:>5}  {r['accuracy']:>7.3f}  "
                     f"{r['macro_f1']:>8.3f}  {r['forward_ms_per_image']:>6.1f}")
    b = report["best"]
    lines.append(f"best: {b['model']} @ {b['layer']} (validation accuracy {b['accuracy']:.3f}); "
                 f"report: {report['probe_json']}")
    return "\n".join(lines)
