"""The CLI's `serve` command: the read-only web page over an output."""

from __future__ import annotations

import os

import typer

from pipeline.cli.common import SET_HELP, app, fail, invoke
from pipeline.config.files import merge_sources
from pipeline.config.serve import TOKEN_ENV, ServeConfig


def parse_source_map(items: list[str]) -> dict[str, str]:
    """OLD=NEW pairs (repeatable --source-map) as a dict."""
    out = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            fail(f"--source-map {item!r}: write it as OLD_PREFIX=NEW_PREFIX, e.g. "
                 "s3://bucket/photos=/data/photos")
        out[old] = new
    return out


@app.command()
def serve(
    output: str | None = typer.Argument(None, help="an extract OUTPUT (local or s3://...)"),
    index: str | None = typer.Option(None, help="an index folder (default: OUTPUT-index or OUTPUT/index "
                                     "when there; else exact search)"),
    dedup: str | None = typer.Option(None, help="a dedup output (default: OUTPUT-dedup or OUTPUT/dedup)"),
    probe: str | None = typer.Option(None, help="a probe output (default: OUTPUT-probe)"),
    head: str | None = typer.Option(None, help="a head folder (default: OUTPUT/head or OUTPUT-head)"),
    host: str | None = typer.Option(None, help="address to bind (default 127.0.0.1; others need --token)"),
    port: int | None = typer.Option(None, help="port (default 8000)"),
    token: str | None = typer.Option(None, help="needed by every request (default: $PIPELINE_SERVE_TOKEN)"),
    source_map: list[str] = typer.Option([], "--source-map", help="OLD=NEW: read images recorded under OLD "
                                         "from NEW (they moved since extraction); repeatable"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """A web page over an output: search by image or id, duplicates, clusters and outliers, probe, runs."""

    flags = {"output": output, "index": index, "dedup": dedup, "probe": probe, "head": head, "host": host,
             "port": port, "token": token or os.environ.get(TOKEN_ENV) or None,
             "source_map": parse_source_map(source_map) or None}

    if output is None and config is None:
        fail("give the output to serve: pipeline serve OUTPUT (an extract OUTPUT folder, local or s3://)")

    def go():
        from pipeline.commands.serve import serve as run_serve

        run_serve(merge_sources(ServeConfig, config, flags, set_))

    invoke(go)
