"""`pipeline compare`: which way to reuse a pretrained model, measured on the user's labels with its cost.

One labelled sample, one hash-of-id train/validation split (pipeline/split.py) shared by every arm:

1. classifier as is: the model's ImageNet head, each user label standing for ImageNet classes (exact
   class-name matches, or --label-map); no training. Read from the logits the feature pass stores.
2. feature extractor: one extraction pass per model over every candidate cut (what `probe` does), a linear
   and an MLP head on each cut.
3. weight initialization: fine-tuning with Ray Train (what `finetune` does), frozen up to the feature arm's
   best cut of that model, and the whole network.

Writes OUTPUT/features/<model>/<layer>/, OUTPUT/finetune/<model>-<freeze>/, OUTPUT/compare.json and
OUTPUT/compare.png. A rerun reuses the feature pass of each model whose images and cuts are unchanged and
continues each fine-tuning from its checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.commands import compare_rules as rules
from pipeline.commands.probe import slug
from pipeline.config import ConfigError, FinetuneConfig, HeadTrainConfig, ProbeConfig, RayRuntime
from pipeline.config.compare import CompareConfig
from pipeline.sources import Shard, check_source, list_shards, sample_shards
from pipeline.split import Split, make_split

FEATURES, FINETUNED = "features", "finetune"
EXTRACTED = "extracted.json"  # a model's finished feature pass: its cuts, dims, costs and images
SAMPLE = "compare-sample.json"  # the images a fine-tuned arm's checkpoints were trained on
HEADS = ("linear", "mlp")


def _sampled(shards: list[Shard], n: int | None, files_per_shard: int) -> list[Shard]:
    """At most n loose files (by a hash of their path), or the first whole tar/Parquet shards that hold
    about n images by their size."""
    if not n:
        return shards
    chosen = sample_shards(shards, n, files_per_shard)
    if chosen is not None:
        return chosen
    from pipeline.commands.run import estimated_images

    out: list[Shard] = []
    for s in shards:
        if estimated_images(out) >= n:
            break
        out.append(s)
    return out


def _digest(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(ids)).encode("utf-8", "surrogatepass")).hexdigest()


def shared_split(ids: list[str], labels: list[str | None], cfg: CompareConfig) -> Split:
    """The split every arm uses; refused before any work when the sample cannot measure anything."""
    classes = sorted({lab for lab in labels if lab})
    if not classes:
        raise ConfigError(f"the {len(ids)} images under '{cfg.source.uri}' have no labels: compare needs "
                          "labelled images (--labels folder: one folder per class; or a column or member "
                          "name)")
    if len(classes) < 2:
        raise ConfigError(f"only one class ('{classes[0]}') under '{cfg.source.uri}': compare needs at least "
                          "2 classes (with --labels folder each class is its own folder)")
    split = make_split(ids, labels, cfg.val_fraction)
    few = {c: n["validation"] for c, n in split.per_class.items() if n["validation"] < cfg.min_val_per_class}
    if few:
        shown = ", ".join(f"{c}: {n}" for c, n in sorted(few.items(), key=lambda kv: kv[1])[:5])
        raise ConfigError(
            f"too few validation images to compare: {len(few)} of {len(classes)} classes have fewer than "
            f"{cfg.min_val_per_class} ({shown}) at --val-fraction {cfg.val_fraction}: add images to those "
            f"classes, raise --sample, or raise --val-fraction")
    return split


def _val_digest(split: Split, ids: list[str]) -> str:
    return _digest([i for i, v in zip(ids, split.is_val(ids)) if v])


def _layer_ids(uri: str) -> list[str]:
    """The labelled rows' ids of one stored cut."""
    from pipeline.output.reader import EmbeddingReader

    return [i for chunk in EmbeddingReader(uri).chunks()
            for i, lab in zip(chunk.ids, chunk.labels.to_pylist()) if lab]


def feature_pass(cfg: CompareConfig, model: str, shards: list[Shard], ids_digest: str,
                  progress: bool) -> dict[str, Any]:
    """One model's extraction over every candidate cut (reused when its images and cuts are unchanged);
    returns its cuts, their dims and forward costs."""
    from pipeline.commands.probe import extract_run

    root = storage.join(cfg.output.uri, FEATURES)
    layers = ["all"] if cfg.layers == ["all"] else [*cfg.layers, *(x for x in ("final", "logits")
                                                                    if x not in cfg.layers)]
    pcfg = ProbeConfig.model_validate({
        "source": cfg.source.model_dump(), "output": {"uri": root},
        "runtime": cfg.runtime.model_dump(), "backbone": cfg.backbone.model_dump(), "models": [model],
        "layers": layers, "val_fraction": cfg.val_fraction})
    marker = storage.join(root, slug(model), EXTRACTED)
    wanted = {"model": model, "layers": layers, "images": ids_digest,
              "backbone": cfg.backbone.model_dump(exclude={"model", "layer"}),
              "source": cfg.source.model_dump(exclude={"uri"}), "max_pixels": cfg.runtime.max_pixels}
    if storage.exists(marker):
        done = json.loads(storage.read_bytes(marker))
        if {k: done.get(k) for k in wanted} == wanted:
            if progress:
                print(f"compare: {model}: reusing its feature pass ({len(done['cuts'])} cuts)",
                      file=sys.stderr)
            return done
    if storage.exists(storage.join(root, slug(model))):
        storage.remove_tree(storage.join(root, slug(model)))
    run, _, cuts, dims, cost = extract_run(pcfg, model, shards, None)
    if progress:
        print(f"compare: {model}: extracting {len(cuts)} cuts ({', '.join(cuts)})", file=sys.stderr)
    t = time.perf_counter()
    run.run(shards, 0, t)
    done = {**wanted, "cuts": cuts, "dims": list(dims), "ms_per_image": cost,
            "extract_s": round(time.perf_counter() - t, 3)}
    storage.write_json(marker, done, indent=2)
    return done


def feature_arms(cfg: CompareConfig, model: str, done: dict[str, Any], split: Split,
                 progress: bool) -> list[dict[str, Any]]:
    """A linear and an MLP head on each cut of one model's feature pass."""
    from pipeline.heads import train_head

    arms = []
    itemsize = 4  # the feature pass stores float32
    for layer, dim in zip(done["cuts"], done["dims"]):
        layer_dir = storage.join(cfg.output.uri, FEATURES, slug(model), layer)
        ids = _layer_ids(layer_dir)
        for head in HEADS:
            t = time.perf_counter()
            meta = train_head(HeadTrainConfig(
                embeddings=layer_dir, output=storage.join(layer_dir, f"head-{head}"), head=head,
                val_fraction=cfg.val_fraction, epochs=cfg.head_epochs), progress=False)
            val = meta["metrics"]["validation"] or {}
            arms.append({
                "application": "features", "model": model, "layer": layer, "head": head, "dim": dim,
                "val_accuracy": val.get("accuracy"), "macro_f1": val.get("macro_f1"),
                **rules.cost_fields(done["ms_per_image"][layer], dim * itemsize, time.perf_counter() - t),
                "split": {"per_class": meta["split"]["per_class"], "validation_ids": _val_digest(split, ids)},
                "artifacts": {"embeddings": layer_dir, "head": storage.join(layer_dir, f"head-{head}")},
            })
            if progress:
                print(f"compare: features {model} @ {layer:<10} + {head:<6} val accuracy "
                      f"{val.get('accuracy') or 0:.3f}", file=sys.stderr)
    return arms


def classifier_arm(cfg: CompareConfig, model: str, done: dict[str, Any], split: Split,
                   label_map: dict[str, list[str | int]] | None) -> dict[str, Any]:
    """The model's own ImageNet head, no training: read from the stored logits."""
    from pipeline.embed import imagenet_class_names
    from pipeline.output.reader import EmbeddingReader

    dim = done["dims"][done["cuts"].index("logits")]
    arm: dict[str, Any] = {"application": "classifier", "model": model, "layer": "logits",
                           "val_accuracy": None, "macro_f1": None,
                           **rules.cost_fields(done["ms_per_image"]["logits"], 0, 0.0)}
    if dim != 1000:
        return {**arm, "reason": f"its head has {dim} classes, not ImageNet's 1000"}
    if cfg.backbone.normalize:
        return {**arm, "reason": "backbone.normalize is on, so the stored logits are L2-normalized and their "
                                 "softmax is not the classifier's: compare without --set backbone.normalize"}
    names = imagenet_class_names(model, dim)
    targets, unmapped = rules.label_targets(split.classes, names, label_map)
    arm["label_map"] = {c: [names[i] for i in targets[c]] for c in split.classes}
    if unmapped:
        shown = ", ".join(f"'{c}'" for c in unmapped[:5]) + (" ..." if len(unmapped) > 5 else "")
        return {**arm, "reason": f"{len(unmapped)} of {len(split.classes)} labels name no ImageNet class "
                                 f"({shown}): {rules.LABEL_MAP_HELP}"}
    index = {c: i for i, c in enumerate(split.classes)}
    ids, ys, preds = [], [], []
    for chunk in EmbeddingReader(storage.join(cfg.output.uri, FEATURES, slug(model), "logits")).chunks():
        val = split.is_val(chunk.ids)
        labels = chunk.labels.to_pylist()
        keep = [i for i in np.flatnonzero(val) if labels[i] in index]
        ids += [chunk.ids[i] for i in keep]
        ys += [index[labels[i]] for i in keep]
        preds.append(rules.classifier_predict(chunk.x[keep], targets, split.classes))
    acc, f1 = rules.accuracy_f1(np.array(ys), np.concatenate(preds), len(split.classes))
    per_class = {c: {"train": split.per_class[c]["train"], "validation": ys.count(index[c])}
                 for c in split.classes}
    return {**arm, "val_accuracy": round(acc, 4), "macro_f1": round(f1, 4),
            "split": {"per_class": per_class, "validation_ids": _digest(ids)}}


def finetune_arm(cfg: CompareConfig, model: str, freeze: str, done: dict[str, Any], split: Split,
                 listed: tuple[list[Shard], int], labelled: tuple[list[str], list[str | None]],
                 progress: bool) -> dict[str, Any]:
    """Fine-tune with Ray Train, resuming from the output's checkpoints when they were trained on these
    images (``SAMPLE`` beside them names the sample; another sample starts over)."""
    from pipeline.commands.finetune import finetune

    out = storage.join(cfg.output.uri, FINETUNED, f"{slug(model)}-{slug(freeze)}")
    sample = storage.join(out, SAMPLE)
    if storage.exists(out) and (not storage.exists(sample) or
                                json.loads(storage.read_bytes(sample)).get("images") != done["images"]):
        storage.remove_tree(out)
    storage.write_json(sample, {"images": done["images"]})
    fcfg = FinetuneConfig.model_validate({
        "source": cfg.source.model_dump(), "output": {"uri": out},
        "backbone": {**cfg.backbone.model_dump(), "model": model, "layer": "final"},
        "train": {"epochs": cfg.epochs, "val_fraction": cfg.val_fraction, "freeze_until": freeze},
        "runtime": {k: getattr(cfg.runtime, k) for k in RayRuntime.model_fields},
    })
    if progress:
        print(f"compare: finetune {model}, frozen to {freeze}, {cfg.epochs} epochs -> {out}", file=sys.stderr)
    report = finetune(fcfg, progress=progress, listed=listed, labelled=labelled)
    val = report.get("validation") or {}
    final_dim = done["dims"][done["cuts"].index("final")]
    train_s = sum(h.get("seconds") or 0 for h in report["epochs"] if h["epoch"] > 0)
    ids = [i for i, lab in zip(*labelled) if lab]
    return {"application": "finetune", "model": model, "layer": "final", "freeze_until": freeze,
            "val_accuracy": val.get("accuracy"), "macro_f1": val.get("macro_f1"),
            **rules.cost_fields(done["ms_per_image"]["final"], final_dim * 4, train_s),
            "epochs": report["epochs_done"],
            "split": {"per_class": report["split"]["per_class"], "validation_ids": _val_digest(split, ids)},
            "artifacts": {"finetune": out, "backbone": report["backbone"]["uri"], "head": report["head"]}}


def check_models(cfg: CompareConfig, classes: list[str], label_map: dict[str, list[str | int]] | None
                 ) -> None:
    """Each model, its candidate cuts and the label map's class names, checked before anything is written."""
    from pipeline.backbone.cuts import stage_names
    from pipeline.backbone.models import create_model
    from pipeline.embed import imagenet_class_names

    for model in cfg.model_names():
        net = create_model(model, "none")[0]
        modules = dict(net.named_modules())
        bad = [x for x in cfg.layers if x not in ("all", "final", "logits") and (not x or x not in modules)]
        if bad:
            raise ConfigError(f"unknown layer {', '.join(repr(x) for x in bad)} for model '{model}'. Valid "
                              f"layers: final, logits, {', '.join(stage_names(net, model))} (or any module "
                              f"name: `pipeline layers --model {model} --all`)")
        if label_map:
            rules.label_targets(classes, imagenet_class_names(model, 1000), label_map)


def _freeze_for(feature: list[dict[str, Any]], model: str) -> str:
    """Fine-tuning's frozen depth: up to the feature arm's best cut of this model (the head only when that
    cut is the final features or the logits)."""
    mine = [a for a in feature if a["model"] == model and a["val_accuracy"] is not None]
    best = max(mine, key=lambda a: (a["val_accuracy"], -a["ms_per_image"]))
    return "final" if best["layer"] in ("final", "logits") else best["layer"]


def commands_for(arm: dict[str, Any], cfg: CompareConfig) -> list[str]:
    """The commands that run an arm over the source at scale (with its trained head or fine-tuned weights)."""
    import shlex

    from pipeline.config import SourceConfig

    q = shlex.quote
    src = q(cfg.source.uri) + ("" if cfg.source.format == "auto" else f" --format {cfg.source.format}")
    default = SourceConfig(uri=cfg.source.uri).model_dump()
    src += "".join(f" --set {q(f'source.{k}={v}')}" for k, v in cfg.source.model_dump().items()
                   if k not in ("uri", "format", "labels") and v != default[k])
    weights = "" if cfg.backbone.weights == "packaged" else f" --weights {q(cfg.backbone.weights)}"
    scale = storage.join(cfg.output.uri, "scale")
    model = arm["model"]
    if arm["application"] == "classifier":
        dest = q(storage.join(scale, "classify-" + slug(model)))
        return [f"pipeline classify --source {src} --output {dest} --model {q(model)}{weights}"]
    if arm["application"] == "features":
        emb = q(storage.join(scale, f"{slug(model)}-{arm['layer']}"))
        extra = ("" if cfg.backbone.pool == "avg" else f" --pool {cfg.backbone.pool}") + weights
        extra += " --normalize" if cfg.backbone.normalize else ""
        extract = (f"pipeline extract --source {src} --output {emb} --model {q(model)} "
                   f"--layer {arm['layer']}{extra}")
    else:
        emb = q(storage.join(scale, f"{slug(model)}-finetuned"))
        extract = (f"pipeline extract --source {src} --output {emb} --model {q(model)} "
                   f"--weights {q(arm['artifacts']['backbone'])} --layer final")
    return [extract, f"pipeline heads predict --head {q(arm['artifacts']['head'])} --embeddings {emb} "
                     f"--output {emb}"]


def compare(cfg: CompareConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Measure the three applications of each model on one split; returns compare.json's content."""
    from pipeline.commands.finetune import collect_labels
    from pipeline.reports import compare_png

    t_start = time.perf_counter()
    listed, skipped = list_shards(cfg.source)
    check_source(cfg.source, listed)
    if not listed:
        raise ConfigError(f"no images under '{cfg.source.uri}': check --source")
    shards = _sampled(listed, cfg.sample, cfg.source.files_per_shard)
    label_map = rules.read_label_map(cfg.label_map) if cfg.label_map else None
    ids, labels = collect_labels(shards, cfg.source, cfg.runtime)
    split = shared_split(ids, labels, cfg)  # refusals come before anything is written
    check_models(cfg, split.classes, label_map)
    out = cfg.output.uri
    storage.check_writable(out)
    if overwrite:
        for name in (FEATURES, FINETUNED, "compare.json", "compare.png"):
            uri = storage.join(out, name)
            if name in (FEATURES, FINETUNED) and storage.exists(uri):
                storage.remove_tree(uri)
            elif storage.exists(uri):
                storage.remove(uri)
    labelled = [i for i, lab in zip(ids, labels) if lab]
    images = _digest([f"{s.key}\t{s.version}\t{s.count}" for s in shards] +
                     [f"{i}\t{lab}" for i, lab in zip(ids, labels)])
    wall: dict[str, float] = {"labels_s": round(time.perf_counter() - t_start, 3)}

    arms: list[dict[str, Any]] = []
    for model in cfg.model_names():
        t = time.perf_counter()
        done = feature_pass(cfg, model, shards, images, progress)
        wall[f"extract {model}"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        arms.extend(feature_arms(cfg, model, done, split, progress))
        wall[f"features {model}"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        arms.append(classifier_arm(cfg, model, done, split, label_map))
        wall[f"classifier {model}"] = round(time.perf_counter() - t, 3)
    features = [a for a in arms if a["application"] == "features"]
    for model in cfg.model_names():
        done = json.loads(storage.read_bytes(storage.join(out, FEATURES, slug(model), EXTRACTED)))
        for freeze in dict.fromkeys((_freeze_for(features, model), "none")):
            t = time.perf_counter()
            arms.append(finetune_arm(cfg, model, freeze, done, split, (shards, skipped),
                                     (ids, labels), progress))
            wall[f"finetune {model} frozen to {freeze}"] = round(time.perf_counter() - t, 3)

    best = rules.recommend(arms, cfg.tolerance)
    report = {
        "arms": arms,
        "recommended": best,
        "commands": commands_for(best, cfg) if best else [],
        "tolerance": cfg.tolerance,
        "rule": f"the most accurate arm; among arms within {cfg.tolerance} of it, the cheapest per image",
        "split": {**split.to_json(), "images": len(labelled), "validation_ids": _val_digest(split, labelled)},
        "sample": {"shards": len(shards), "of_shards": len(listed), "images": len(labelled)},
        "wall_s": {**wall, "total_s": round(time.perf_counter() - t_start, 3)},
        "config": json.loads(cfg.model_dump_json()),
    }
    if best and best["application"] == "classifier":
        report["note"] = ("`pipeline classify` writes ImageNet classes: map them to your labels with this "
                          "arm's label_map")
    uris = {"compare_json": storage.join(out, "compare.json"),
            "compare_png": storage.join(out, "compare.png")}
    storage.write_json(uris["compare_json"], report, indent=2)
    storage.write_bytes(uris["compare_png"], compare_png(arms, best))
    return {**report, **uris}
