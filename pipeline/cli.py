"""Command line: thin; parses flags into a config and calls the API.

Exit status: 0 when the run completed (bad images are data, in errors/); 2 with one line on stderr for bad
configuration (unknown model or layer, unreachable source...); 1 for a failure during the run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import typer

from pipeline.config import (
    ClassifyConfig,
    DedupConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadTrainConfig,
    IndexAddConfig,
    IndexBuildConfig,
    NeighborsConfig,
    NightlyConfig,
    ProbeConfig,
    RuntimeConfig,
)
from pipeline.config.files import merge_sources
from pipeline.output.lease import LeaseHeld
from pipeline.storage import redact

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Batch transfer learning: pretrained vision backbones -> embeddings in Parquet, on Ray.",
)

SET_HELP = "override any config key, e.g. --set runtime.batch_size=64 (repeatable)"
LOCK_WAIT_HELP = "when another run is writing the output, wait up to this long for it (default: stop at once)"
BREAK_LOCK_HELP = "take the output's lease from another run (only when you know that run is dead)"


def _lock(wait_for_lock: float, break_lock: bool):
    from pipeline.output.lease import LockPolicy

    if wait_for_lock < 0:
        _fail(f"--wait-for-lock {wait_for_lock:g}: give 0 or more seconds")
    return LockPolicy(wait_s=wait_for_lock, break_lock=break_lock)


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {redact(msg)}", err=True)
    raise typer.Exit(code)


def _echo(result: Any, fmt: Callable[[Any], str], as_json: bool) -> None:
    """A command's result as its formatted text, or with --json as JSON."""
    result = redact(result)
    typer.echo(json.dumps(result, indent=2, default=str) if as_json else fmt(result))


def _invoke(fn, rerun_hint: bool = False):
    """Call fn; turn input errors into one line and exit 2, run failures into one line and exit 1."""
    try:
        return fn()
    except typer.Exit:
        raise
    except LeaseHeld as e:  # another run writes the output: nothing was done
        _fail(str(e), 1)
    except ValueError as e:  # ConfigError, BackboneError, StorageError, WeightsError are ValueErrors
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback only on request
        if "--debug" in sys.argv:
            raise
        again = "; rerun the same command to resume" if rerun_hint else ""
        _fail(f"run failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(rerun with --debug for the traceback{again})", 1)


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
    overwrite: bool = typer.Option(False, help="clear the output and redo every shard (a rerun otherwise "
                                   "resumes: shards already done are skipped)"),
    incremental: bool = typer.Option(False, help="nightly mode: new or changed shards only, written under "
                                     "embeddings/run_date=YYYY-MM-DD/"),
    run_date: str | None = typer.Option(None, help="the run_date partition of an --incremental run "
                                        "(default: today, UTC)"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
    wait_for_lock: float = typer.Option(0.0, "--wait-for-lock", metavar="SECONDS", help=LOCK_WAIT_HELP),
    break_lock: bool = typer.Option(False, "--break-lock", help=BREAK_LOCK_HELP),
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
        _echo(run_extract(cfg, overwrite=overwrite, incremental=incremental, run_date=run_date,
                          lock=_lock(wait_for_lock, break_lock)),
              format_summary, as_json)

    _invoke(go)


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
    wait_for_lock: float = typer.Option(0.0, "--wait-for-lock", metavar="SECONDS", help=LOCK_WAIT_HELP),
    break_lock: bool = typer.Option(False, "--break-lock", help=BREAK_LOCK_HELP),
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
        _echo(run_classify(cfg, overwrite=overwrite, incremental=incremental, run_date=run_date,
                           lock=_lock(wait_for_lock, break_lock)),
              format_summary, as_json)

    _invoke(go)


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

    _invoke(go)


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
        _echo(train_head(cfg), format_train, as_json)

    _invoke(go)


@heads_app.command("predict")
def heads_predict(
    head: str = typer.Option(..., help="the folder `heads train` wrote (or its head.json)"),
    embeddings: str = typer.Option(..., help="an extract OUTPUT (or its embeddings/) URI"),
    output: str = typer.Option(..., help="predictions go to OUTPUT/predictions/"),
    top_k: int = typer.Option(1, help="also write the top-k labels and scores"),
    actors: str = typer.Option("1", help="N, or MIN,MAX"),
    as_json: bool = typer.Option(False, "--json"),
    wait_for_lock: float = typer.Option(0.0, "--wait-for-lock", metavar="SECONDS", help=LOCK_WAIT_HELP),
    break_lock: bool = typer.Option(False, "--break-lock", help=BREAK_LOCK_HELP),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Apply a head to embeddings (a Ray Data map): id, label, score per row."""

    def go():
        from pipeline.commands.heads import format_predict, predict

        _echo(predict(head, embeddings, output, top_k=top_k, runtime=RuntimeConfig(actors=actors),
                      lock=_lock(wait_for_lock, break_lock)),
              format_predict, as_json)

    _invoke(go)


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
        _echo(run_probe(cfg, overwrite=overwrite), format_probe, as_json)

    _invoke(go)


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
        _echo(run_finetune(cfg, overwrite=overwrite), format_finetune, as_json)

    _invoke(go)


@app.command()
def nightly(
    config: str = typer.Option(..., "--config", "-c", help="YAML config: an extract config plus head:, "
                               "predictions:, top_k: (see jobs/configs/nightly-local.yaml)"),
    run_date: str | None = typer.Option(None, help="YYYY-MM-DD partition of this run (default: today, UTC)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the summaries as JSON"),
    wait_for_lock: float = typer.Option(0.0, "--wait-for-lock", metavar="SECONDS", help=LOCK_WAIT_HELP),
    break_lock: bool = typer.Option(False, "--break-lock", help=BREAK_LOCK_HELP),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Nightly: extract the new or changed shards under embeddings/run_date=.../, then apply the head."""

    def go():
        from pipeline.commands.nightly import format_nightly
        from pipeline.commands.nightly import nightly as run_nightly

        cfg = merge_sources(NightlyConfig, config, None, set_)
        _echo(run_nightly(cfg, run_date, lock=_lock(wait_for_lock, break_lock)), format_nightly, as_json)

    _invoke(go, rerun_hint=True)


index_app = typer.Typer(no_args_is_help=True,
                        help="Nearest-neighbour indexes (faiss) over stored embeddings.")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    embeddings: str | None = typer.Option(None, help="an extract OUTPUT (or its embeddings/) URI"),
    output: str | None = typer.Option(None, help="the index folder (local or s3://...)"),
    metric: str | None = typer.Option(None, help="cosine (default) | l2"),
    kind: str | None = typer.Option(None, help="auto (exact up to 100k vectors, IVF-PQ above) | flat | ivfpq "
                                    "| hnsw"),
    max_memory: str | None = typer.Option(None, help="memory budget of the index, e.g. 4GB"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
    wait_for_lock: float = typer.Option(0.0, "--wait-for-lock", metavar="SECONDS", help=LOCK_WAIT_HELP),
    break_lock: bool = typer.Option(False, "--break-lock", help=BREAK_LOCK_HELP),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Build a faiss index over stored embeddings; writes index.faiss, ids.parquet, index.json."""

    flags = {"embeddings": embeddings, "output": output, "metric": metric, "kind": kind,
             "max_memory": max_memory}

    def go():
        from pipeline.commands.index import build, format_build

        cfg = merge_sources(IndexBuildConfig, config, flags, set_)
        _echo(build(cfg, lock=_lock(wait_for_lock, break_lock)), format_build, as_json)

    _invoke(go)


@index_app.command("add")
def index_add(
    index: str | None = typer.Option(None, help="the index folder `index build` wrote"),
    embeddings: str | None = typer.Option(None, help="the table to add from (default: the one it was built "
                                          "from)"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
    wait_for_lock: float = typer.Option(0.0, "--wait-for-lock", metavar="SECONDS", help=LOCK_WAIT_HELP),
    break_lock: bool = typer.Option(False, "--break-lock", help=BREAK_LOCK_HELP),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Add the embedding files the index does not hold yet (no retraining); replaced files' rows leave it."""

    def go():
        from pipeline.commands.index import add, format_add

        _echo(add(merge_sources(IndexAddConfig, config, {"index": index, "embeddings": embeddings}, set_),
                  lock=_lock(wait_for_lock, break_lock)),
              format_add, as_json)

    _invoke(go)


@app.command()
def neighbors(
    index: str | None = typer.Option(None, help="the index folder `index build` wrote"),
    output: str | None = typer.Option(None, help="neighbours go to OUTPUT/neighbors/"),
    images: str | None = typer.Option(None, help="query images (embedded with the index's model and layer)"),
    ids: str | None = typer.Option(None, help="Parquet file or folder with an id column: rows of the index's "
                                   "table"),
    embeddings: str | None = typer.Option(None, help="an embeddings table of the index's spec"),
    k: int | None = typer.Option(None, "-k", "--k", help="neighbours per query (default 10)"),
    actors: str | None = typer.Option(None, help="N, or MIN,MAX searcher actors"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """The k nearest rows of an index for each query image, id or embedding: query_id, rank, id, score."""

    flags = {"index": index, "output": output, "images.uri": images, "ids": ids, "embeddings": embeddings,
             "k": k, "runtime.actors": actors}

    def go():
        from pipeline.commands.neighbors import format_neighbors
        from pipeline.commands.neighbors import neighbors as run_neighbors

        _echo(run_neighbors(merge_sources(NeighborsConfig, config, flags, set_)), format_neighbors, as_json)

    _invoke(go)


@app.command()
def dedup(
    embeddings: str | None = typer.Option(None, help="an extract OUTPUT (or its embeddings/) URI"),
    output: str | None = typer.Option(None, help="folder for duplicates, keep, clusters (.parquet), "
                                      "dedup.json, dedup.png"),
    threshold: float | None = typer.Option(None, help="cosine similarity of near-duplicates (default 0.8)"),
    clusters: int | None = typer.Option(None, help="k-means clusters (default: about sqrt(rows))"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print dedup.json"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Semantic near-duplicates, clusters and outliers of stored embeddings (k-means, pairwise cosine)."""

    flags = {"embeddings": embeddings, "output": output, "threshold": threshold, "clusters": clusters}

    def go():
        from pipeline.commands.dedup import dedup as run_dedup
        from pipeline.commands.dedup import format_dedup

        _echo(run_dedup(merge_sources(DedupConfig, config, flags, set_)), format_dedup, as_json)

    _invoke(go)


def main(argv: list[str] | None = None) -> None:
    """The console script; ``argv`` (default: sys.argv[1:]) lets a job file run one command."""
    app(args=argv)


if __name__ == "__main__":
    main()
