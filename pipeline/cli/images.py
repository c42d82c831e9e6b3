"""The CLI's image commands: extract, classify, layers, heads, probe, finetune, nightly."""

from __future__ import annotations

import json

import typer

from pipeline.cli.common import (
    SET_HELP,
    BreakLock,
    WaitForLock,
    app,
    echo,
    invoke,
    lock_policy,
)
from pipeline.config import (
    ClassifyConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadTrainConfig,
    NightlyConfig,
    ProbeConfig,
    RuntimeConfig,
)
from pipeline.config.files import merge_sources


@app.command()
def extract(
    source: str | None = typer.Option(None, help="images: local path, file://, s3://... prefix or shard"),
    output: str | None = typer.Option(None, help="output directory (local or s3://...)"),
    model: str | None = typer.Option(None, help="timm model name, or tv:<torchvision name>"),
    weights: str | None = typer.Option(None, help="none | hub | packaged | PATH_OR_URI (.safetensors/.pth)"),
    layer: str | None = typer.Option(None, help="final | logits | a name from `pipeline layers`"),
    pool: str | None = typer.Option(None, help="avg | max | gem | flatten | grid2 | grid3 (maps); "
                                    "cls | mean (tokens)"),
    format: str | None = typer.Option(None, "--format", help="auto|files|webdataset|parquet|manifest"),
    labels: str | None = typer.Option(None, help="none | folder | <column or member name>"),
    root: str | None = typer.Option(None, help="source root the ids are relative to (default: --source); "
                                    "runs over different folders under it write one output"),
    on_removed: str | None = typer.Option(None, help="delete | keep: rows of images that left the source "
                                          "(default delete: the output mirrors the source)"),
    batch_size: int | None = typer.Option(None, help="images per model forward"),
    actors: str | None = typer.Option(None, help="N, or MIN,MAX for an autoscaling pool"),
    gpus_per_actor: float | None = typer.Option(None, help="GPUs per Embedder actor (fractions allowed)"),
    dtype: str | None = typer.Option(None, help="float32 | float16 embedding values"),
    normalize: bool | None = typer.Option(None, "--normalize/--no-normalize", help="L2-normalize"),
    overwrite: bool = typer.Option(False, help="redo every shard, beside the old rows, which readers see "
                                   "until the new ones are whole (a rerun otherwise resumes: shards already "
                                   "done are skipped)"),
    incremental: bool = typer.Option(False, help="nightly mode: new or changed shards only, written under "
                                     "embeddings/run_date=YYYY-MM-DD/"),
    run_date: str | None = typer.Option(None, help="the run_date partition of an --incremental run "
                                        "(default: today, UTC)"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
    wait_for_lock: WaitForLock = 0.0,
    break_lock: BreakLock = False,
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Embed every image under --source with a pretrained backbone cut at --layer; write Parquet."""

    flags = {"source.uri": source, "output.uri": output, "backbone.model": model, "backbone.weights": weights,
             "backbone.layer": layer, "backbone.pool": pool, "source.format": format, "source.labels": labels,
             "source.root": root, "source.on_removed": on_removed, "runtime.batch_size": batch_size,
             "runtime.actors": actors, "runtime.gpus_per_actor": gpus_per_actor, "output.dtype": dtype,
             "backbone.normalize": normalize}

    def go():
        from pipeline.commands.extract import extract as run_extract
        from pipeline.commands.run import format_summary

        cfg = merge_sources(ExtractConfig, config, flags, set_)
        echo(run_extract(cfg, overwrite=overwrite, incremental=incremental, run_date=run_date,
                          lock=lock_policy(wait_for_lock, break_lock)),
              format_summary, as_json)

    invoke(go)


@app.command()
def classify(
    source: str | None = typer.Option(None, help="images: local path, file://, s3://... prefix or shard"),
    output: str | None = typer.Option(None, help="output directory (local or s3://...)"),
    model: str | None = typer.Option(None, help="timm model name, or tv:<torchvision name>"),
    weights: str | None = typer.Option(None, help="none | hub | packaged | PATH_OR_URI"),
    top_k: int | None = typer.Option(None, help="classes kept per image (default 5)"),
    format: str | None = typer.Option(None, "--format", help="auto|files|webdataset|parquet|manifest"),
    root: str | None = typer.Option(None, help="source root the ids are relative to (default: --source)"),
    on_removed: str | None = typer.Option(None, help="delete | keep: rows of images that left the source"),
    batch_size: int | None = typer.Option(None, help="images per model forward"),
    actors: str | None = typer.Option(None, help="N, or MIN,MAX for an autoscaling pool"),
    gpus_per_actor: float | None = typer.Option(None, help="GPUs per actor (fractions allowed)"),
    overwrite: bool = typer.Option(False, help="clear the output and redo every shard (a rerun otherwise "
                                   "resumes)"),
    incremental: bool = typer.Option(False, help="new or changed shards only, under "
                                     "predictions/run_date=YYYY-MM-DD/"),
    run_date: str | None = typer.Option(None, help="the run_date of an --incremental run (default: today)"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
    wait_for_lock: WaitForLock = 0.0,
    break_lock: BreakLock = False,
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Use the pretrained model as is: top-k ImageNet classes per image -> OUTPUT/predictions/ Parquet."""

    flags = {"source.uri": source, "output.uri": output, "backbone.model": model, "backbone.weights": weights,
             "top_k": top_k, "source.format": format, "runtime.batch_size": batch_size, "source.root": root,
             "source.on_removed": on_removed, "runtime.actors": actors,
             "runtime.gpus_per_actor": gpus_per_actor}

    def go():
        from pipeline.commands.extract import classify as run_classify
        from pipeline.commands.run import format_summary

        cfg = merge_sources(ClassifyConfig, config, flags, set_)
        echo(run_classify(cfg, overwrite=overwrite, incremental=incremental, run_date=run_date,
                           lock=lock_policy(wait_for_lock, break_lock)),
              format_summary, as_json)

    invoke(go)


@app.command()
def layers(
    model: str = typer.Option(..., help="timm model name, or tv:<torchvision name>"),
    all_modules: bool = typer.Option(False, "--all", help="every module, not only the stage boundaries"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the valid --layer names of a model with the output shape of each (for a 224-ish input)."""

    def go():
        from pipeline.backbone import list_layers

        infos = list_layers(model, all_modules=all_modules)
        if as_json:
            typer.echo(json.dumps([{"name": i.name, "shape": list(i.shape), "kind": i.kind} for i in infos]))
            return
        width = max(len(i.name) for i in infos)
        for i in infos:
            shape = "x".join(str(d) for d in i.shape)
            typer.echo(f"{i.name:<{width}}  {shape:<14} {i.kind}")

    invoke(go)


heads_app = typer.Typer(no_args_is_help=True, help="Lightweight heads (linear, MLP) on stored embeddings.")
app.add_typer(heads_app, name="heads")


@heads_app.command("train")
def heads_train(
    embeddings: str | None = typer.Option(None, help="an extract OUTPUT (or its embeddings/) URI"),
    output: str | None = typer.Option(None, help="where head.safetensors, head.json, report.png go"),
    head: str | None = typer.Option(None, help="linear | mlp"),
    labels_from: str | None = typer.Option(None, help="Parquet table (id, label) joined on id"),
    test: str | None = typer.Option(None, help="held-out embeddings to evaluate at the end"),
    epochs: int | None = typer.Option(None, help="maximum epochs (early stopping on validation loss)"),
    val_fraction: float | None = typer.Option(None, help="validation share, split by a hash of id"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set hidden=[256]"),
    as_json: bool = typer.Option(False, "--json", help="print head.json"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Train a linear or MLP head on stored embeddings; writes head.safetensors, head.json, report.png."""

    flags = {"embeddings": embeddings, "output": output, "head": head, "labels_from": labels_from,
             "test": test, "epochs": epochs, "val_fraction": val_fraction}

    def go():
        from pipeline.commands.heads import format_train
        from pipeline.heads import train_head

        cfg = merge_sources(HeadTrainConfig, config, flags, set_)
        echo(train_head(cfg), format_train, as_json)

    invoke(go)


@heads_app.command("predict")
def heads_predict(
    head: str = typer.Option(..., help="the folder `heads train` wrote (or its head.json)"),
    embeddings: str = typer.Option(..., help="an extract OUTPUT (or its embeddings/) URI"),
    output: str = typer.Option(..., help="predictions go to OUTPUT/predictions/"),
    top_k: int = typer.Option(1, help="also write the top-k labels and scores"),
    actors: str = typer.Option("1", help="N, or MIN,MAX"),
    as_json: bool = typer.Option(False, "--json"),
    wait_for_lock: WaitForLock = 0.0,
    break_lock: BreakLock = False,
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Apply a head to embeddings (a Ray Data map): id, label, score per row."""

    def go():
        from pipeline.commands.heads import format_predict, predict

        echo(predict(head, embeddings, output, top_k=top_k, runtime=RuntimeConfig(actors=actors),
                      lock=lock_policy(wait_for_lock, break_lock)),
              format_predict, as_json)

    invoke(go)


@app.command()
def probe(
    source: str | None = typer.Option(None, help="labelled images (local or s3://...)"),
    output: str | None = typer.Option(None, help="output directory"),
    model: str | None = typer.Option(None, help="backbone (or use --models a,b)"),
    models: str | None = typer.Option(None, help="comma-separated backbones to compare"),
    layers: str | None = typer.Option(None, help="comma-separated layers, or 'all' for every stage"),
    weights: str | None = typer.Option(None, help="none | hub | packaged | PATH_OR_URI"),
    labels: str | None = typer.Option(None, help="folder (default) | <column or member name>"),
    sample: int | None = typer.Option(None, help="use at most N images"),
    head: str | None = typer.Option(None, help="linear | mlp"),
    pool: str | None = typer.Option(None, help="pooling for feature maps / tokens"),
    overwrite: bool = typer.Option(False, help="replace an earlier probe at the output"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print probe.json"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Which cut is best: a head per candidate layer (and backbone), ranked by validation accuracy."""

    flags = {"source.uri": source, "output.uri": output, "backbone.model": model, "models": models,
             "layers": layers, "backbone.weights": weights, "source.labels": labels or "folder",
             "sample": sample, "head": head, "backbone.pool": pool}

    def go():
        from pipeline.commands.probe import format_probe
        from pipeline.commands.probe import probe as run_probe

        cfg = merge_sources(ProbeConfig, config, flags, set_)
        echo(run_probe(cfg, overwrite=overwrite), format_probe, as_json)

    invoke(go)


@app.command()
def compare(
    source: str | None = typer.Option(None, help="labelled images (local or s3://...)"),
    output: str | None = typer.Option(None, help="output directory: features/, finetune/, compare.json, "
                                      "compare.png"),
    model: str | None = typer.Option(None, help="backbone (or use --models a,b)"),
    models: str | None = typer.Option(None, help="comma-separated backbones to compare"),
    layers: str | None = typer.Option(None, help="candidate cuts of the feature arm (default: all stages)"),
    weights: str | None = typer.Option(None, help="none | hub | packaged | PATH_OR_URI"),
    labels: str | None = typer.Option(None, help="folder (default) | <column or member name>"),
    format: str | None = typer.Option(None, "--format", help="auto | files | webdataset | parquet"),
    sample: int | None = typer.Option(None, help="use at most N images"),
    epochs: int | None = typer.Option(None, help="fine-tuning epochs of each fine-tuned arm (default 2)"),
    label_map: str | None = typer.Option(None, help="YAML or CSV: your label -> ImageNet class names or "
                                         "indices, for the classifier arm"),
    val_fraction: float | None = typer.Option(None, help="validation share, split by a hash of id"),
    tolerance: float | None = typer.Option(None, help="arms this close to the best accuracy compete on cost "
                                           "(default 0.01)"),
    overwrite: bool = typer.Option(False, help="start over (a rerun otherwise reuses the feature passes "
                                   "and fine-tuning checkpoints)"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print compare.json"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Which way to reuse a pretrained model: classifier as is, features + head, or fine-tuning, measured on
    one split with their cost; recommends one and prints the commands that run it at scale."""

    flags = {"source.uri": source, "output.uri": output, "backbone.model": model, "models": models,
             "layers": layers, "backbone.weights": weights, "source.labels": labels, "source.format": format,
             "sample": sample, "epochs": epochs, "label_map": label_map, "val_fraction": val_fraction,
             "tolerance": tolerance}

    def go():
        from pipeline.commands.compare import compare as run_compare
        from pipeline.commands.compare_rules import format_compare
        from pipeline.config.compare import CompareConfig

        cfg = merge_sources(CompareConfig, config, flags, set_)
        echo(run_compare(cfg, overwrite=overwrite), format_compare, as_json)

    invoke(go)


@app.command()
def finetune(
    source: str | None = typer.Option(None, help="labelled images (local or s3://...)"),
    output: str | None = typer.Option(None, help="output directory: checkpoints, backbone, head, report"),
    model: str | None = typer.Option(None, help="timm model name, or tv:<torchvision name>"),
    weights: str | None = typer.Option(None, help="none | hub | packaged | PATH_OR_URI to start from"),
    freeze_until: str | None = typer.Option(None, help="none | final | a layer from `pipeline layers`: "
                                            "it, the stem and everything before it stay frozen"),
    lr_decay: float | None = typer.Option(None, help="learning-rate factor per stage below the head "
                                          "(e.g. 0.5)"),
    lr: float | None = typer.Option(None, help="AdamW peak learning rate (cosine schedule)"),
    epochs: int | None = typer.Option(None, help="total epochs; rerun with more to continue"),
    batch_size: int | None = typer.Option(None, help="images per worker per step"),
    workers: int | None = typer.Option(None, help="Ray Train workers (DDP)"),
    gpus_per_worker: float | None = typer.Option(None, help="GPUs per worker (bf16 autocast on GPU)"),
    cpus_per_worker: float | None = typer.Option(None, help="CPUs per worker"),
    labels: str | None = typer.Option(None, help="folder (default) | <column or member name>"),
    format: str | None = typer.Option(None, "--format", help="auto | files | webdataset | parquet"),
    val_fraction: float | None = typer.Option(None, help="validation share, split by a hash of id"),
    overwrite: bool = typer.Option(False, help="start over: delete the output's checkpoints and artifacts"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print finetune.json"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Fine-tune a pretrained backbone with Ray Train; writes backbone.safetensors for `extract --weights`."""

    flags = {"source.uri": source, "output.uri": output, "backbone.model": model, "backbone.weights": weights,
             "train.freeze_until": freeze_until, "train.lr_decay": lr_decay, "train.lr": lr,
             "train.epochs": epochs, "train.batch_size": batch_size, "runtime.workers": workers,
             "runtime.gpus_per_worker": gpus_per_worker, "runtime.cpus_per_worker": cpus_per_worker,
             "source.labels": labels, "source.format": format, "train.val_fraction": val_fraction}

    def go():
        from pipeline.commands.finetune import finetune as run_finetune
        from pipeline.commands.finetune import format_finetune

        cfg = merge_sources(FinetuneConfig, config, flags, set_)
        echo(run_finetune(cfg, overwrite=overwrite), format_finetune, as_json)

    invoke(go)


@app.command()
def nightly(
    config: str = typer.Option(..., "--config", "-c", help="YAML config: an extract config plus head:, "
                               "predictions:, top_k: (see jobs/configs/nightly-local.yaml)"),
    run_date: str | None = typer.Option(None, help="YYYY-MM-DD partition of this run (default: today, UTC)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the summaries as JSON"),
    wait_for_lock: WaitForLock = 0.0,
    break_lock: BreakLock = False,
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Nightly: extract the new or changed shards under embeddings/run_date=.../, then apply the head."""

    def go():
        from pipeline.commands.nightly import format_nightly
        from pipeline.commands.nightly import nightly as run_nightly

        cfg = merge_sources(NightlyConfig, config, None, set_)
        echo(run_nightly(cfg, run_date, lock=lock_policy(wait_for_lock, break_lock)), format_nightly, as_json)

    invoke(go, rerun_hint=True)


@app.command()
def verify(
    output: str = typer.Argument(..., help="an extract or classify OUTPUT (local or s3://...)"),
    repair: bool = typer.Option(False, "--repair", help="remove files of no committed shard and forget "
                                "shards with missing or damaged files (the next run embeds them again)"),
    wait_for_lock: WaitForLock = 0.0,
    break_lock: BreakLock = False,
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Check that an output's visible files are exactly its committed shards' (exit 1 when not); --repair."""

    def go():
        from pipeline.commands.verify import format_verify
        from pipeline.commands.verify import verify as run_verify

        report = run_verify(output, repair=repair, lock=lock_policy(wait_for_lock, break_lock))
        echo(report, format_verify, as_json)
        if not report["ok"] and "repaired" not in report:
            raise typer.Exit(1)

    invoke(go)
