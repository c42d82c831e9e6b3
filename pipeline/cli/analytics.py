"""The analytics commands of the CLI: `index build`, `index add`, `neighbors`, `dedup`."""

from __future__ import annotations

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
from pipeline.config import DedupConfig, IndexAddConfig, IndexBuildConfig, NeighborsConfig
from pipeline.config.files import merge_sources

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
    wait_for_lock: WaitForLock = 0.0,
    break_lock: BreakLock = False,
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Build a faiss index over stored embeddings; writes index.faiss, ids.parquet, index.json."""

    flags = {"embeddings": embeddings, "output": output, "metric": metric, "kind": kind,
             "max_memory": max_memory}

    def go():
        from pipeline.commands.index import build
        from pipeline.commands.index_text import format_build

        cfg = merge_sources(IndexBuildConfig, config, flags, set_)
        echo(build(cfg, lock=lock_policy(wait_for_lock, break_lock)), format_build, as_json)

    invoke(go)


@index_app.command("add")
def index_add(
    index: str | None = typer.Option(None, help="the index folder `index build` wrote"),
    embeddings: str | None = typer.Option(None, help="the table to add from (default: the one it was built "
                                          "from)"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the run summary as JSON"),
    wait_for_lock: WaitForLock = 0.0,
    break_lock: BreakLock = False,
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Add the embedding files the index does not hold yet (no retraining); replaced files' rows leave it."""

    def go():
        from pipeline.commands.index import add
        from pipeline.commands.index_text import format_add

        echo(add(merge_sources(IndexAddConfig, config, {"index": index, "embeddings": embeddings}, set_),
                  lock=lock_policy(wait_for_lock, break_lock)),
              format_add, as_json)

    invoke(go)


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

        echo(run_neighbors(merge_sources(NeighborsConfig, config, flags, set_)), format_neighbors, as_json)

    invoke(go)


@app.command()
def dedup(
    embeddings: str | None = typer.Option(None, help="an extract OUTPUT (or its embeddings/) URI"),
    output: str | None = typer.Option(None, help="folder for duplicates, keep, clusters (.parquet), "
                                      "dedup.json, dedup.png"),
    threshold: float | None = typer.Option(None, help="cosine similarity of near-duplicates (default 0.8)"),
    clusters: int | None = typer.Option(None, help="k-means clusters (default: about sqrt(rows))"),
    keep: str | None = typer.Option(None, help="the row each group keeps: largest (most pixels, then "
                                    "lossless, then the bigger file, then id; default), first (smallest "
                                    "id) or centroid"),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML config file"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="print dedup.json"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Semantic near-duplicates, clusters and outliers of stored embeddings (k-means, pairwise cosine)."""

    flags = {"embeddings": embeddings, "output": output, "threshold": threshold, "clusters": clusters,
             "keep": keep}

    def go():
        from pipeline.commands.dedup import dedup as run_dedup
        from pipeline.commands.dedup import format_dedup

        echo(run_dedup(merge_sources(DedupConfig, config, flags, set_)), format_dedup, as_json)

    invoke(go)
