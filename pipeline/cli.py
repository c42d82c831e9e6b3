"""Command line: thin; parses flags into a config and calls the API.

Exit status: 0 when the run completed (bad images are data, in errors/); 2 with one line on stderr for bad
configuration (unknown model or layer, unreachable source...); 1 for a failure during the run.
"""

from __future__ import annotations

import json
import sys

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Batch transfer learning: pretrained vision backbones -> embeddings in Parquet, on Ray.",
)

SET_HELP = "override any config key, e.g. --set runtime.batch_size=64 (repeatable)"


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _run(fn):
    """Call fn; turn input errors into one line and exit 2, run failures into one line and exit 1."""
    try:
        return fn()
    except typer.Exit:
        raise
    except ValueError as e:  # ConfigError, BackboneError, StorageError, WeightsError are ValueErrors
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback only on request
        if "--debug" in sys.argv:
            raise
        _fail(f"run failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(rerun with --debug for the traceback)", 1)


@app.command()
def extract(
    source: str | None = typer.Option(None, help="images: local path, file://, s3://... prefix or shard"),
    output: str | None = typer.Option(None, help="output directory (local or s3://...)"),
    model: str | None = typer.Option(None, help="timm model name, or tv:<torchvision name>"),
    weights: str | None = typer.Option(None, help="none | hub | packaged | PATH_OR_URI (.safetensors/.pth)"),
    layer: str | None = typer.Option(None, help="final | logits | a name from `pipeline layers`"),
    pool: str | None = typer.Option(None, help="avg | max | gem | flatten (maps); cls | mean (tokens)"),
    format: str | None = typer.Option(None, "--format", help="auto | files | webdataset | parquet"),
    labels: str | None = typer.Option(None, help="none | folder | <column or member name>"),
    batch_size: int | None = typer.Option(None, help="images per model forward"),
    actors: str | None = typer.Option(None, help="N, or MIN,MAX for an autoscaling pool"),
    gpus_per_actor: float | None = typer.Option(None, help="GPUs per Embedder actor (fractions allowed)"),
    dtype: str | None = typer.Option(None, help="float32 | float16 embedding values"),
    normalize: bool | None = typer.Option(None, "--normalize/--no-normalize", help="L2-normalize"),
    overwrite: bool = typer.Option(False, help="replace existing embeddings/errors at the output"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Embed every image under --source with a pretrained backbone cut at --layer; write Parquet."""
    from pipeline.config import ExtractConfig, merge_sources

    flags = {
        "source.uri": source, "output.uri": output, "backbone.model": model, "backbone.weights": weights,
        "backbone.layer": layer, "backbone.pool": pool, "source.format": format, "source.labels": labels,
        "runtime.batch_size": batch_size, "runtime.actors": actors, "runtime.gpus_per_actor": gpus_per_actor,
        "output.dtype": dtype, "backbone.normalize": normalize,
    }

    def go():
        from pipeline.runner import extract as run_extract
        from pipeline.runner import format_summary

        cfg = merge_sources(ExtractConfig, config, flags, set_)
        summary = run_extract(cfg, overwrite=overwrite)
        typer.echo(json.dumps(summary, indent=2, default=str) if as_json else format_summary(summary))

    _run(go)


@app.command()
def classify(
    source: str | None = typer.Option(None, help="images: local path, file://, s3://... prefix or shard"),
    output: str | None = typer.Option(None, help="output directory (local or s3://...)"),
    model: str | None = typer.Option(None, help="timm model name, or tv:<torchvision name>"),
    weights: str | None = typer.Option(None, help="none | hub | packaged | PATH_OR_URI"),
    top_k: int | None = typer.Option(None, help="classes kept per image (default 5)"),
    format: str | None = typer.Option(None, "--format", help="auto | files | webdataset | parquet"),
    batch_size: int | None = typer.Option(None, help="images per model forward"),
    actors: str | None = typer.Option(None, help="N, or MIN,MAX for an autoscaling pool"),
    gpus_per_actor: float | None = typer.Option(None, help="GPUs per actor (fractions allowed)"),
    overwrite: bool = typer.Option(False, help="replace existing predictions at the output"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Use the pretrained model as is: top-k ImageNet classes per image -> OUTPUT/predictions/ Parquet."""
    from pipeline.config import ClassifyConfig, merge_sources

    flags = {
        "source.uri": source, "output.uri": output, "backbone.model": model, "backbone.weights": weights,
        "top_k": top_k, "source.format": format, "runtime.batch_size": batch_size,
        "runtime.actors": actors, "runtime.gpus_per_actor": gpus_per_actor,
    }

    def go():
        from pipeline.runner import classify as run_classify
        from pipeline.runner import format_summary

        cfg = merge_sources(ClassifyConfig, config, flags, set_)
        summary = run_classify(cfg, overwrite=overwrite)
        typer.echo(json.dumps(summary, indent=2, default=str) if as_json else format_summary(summary))

    _run(go)


@app.command()
def layers(
    model: str = typer.Option(..., help="timm model name, or tv:<torchvision name>"),
    all_modules: bool = typer.Option(False, "--all", help="every module, not only the stage boundaries"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the valid --layer names of a model with the output shape of each (for a 224-ish input)."""

    def go():
        from pipeline.backbones import list_layers

        infos = list_layers(model, all_modules=all_modules)
        if as_json:
            typer.echo(json.dumps([{"name": i.name, "shape": list(i.shape), "kind": i.kind} for i in infos]))
            return
        width = max(len(i.name) for i in infos)
        for i in infos:
            shape = "x".join(str(d) for d in i.shape)
            typer.echo(f"{i.name:<{width}}  {shape:<14} {i.kind}")

    _run(go)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
