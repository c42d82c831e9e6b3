"""`pipeline serve OUTPUT`: a read-only web page over an extract output and what was made from it (search by
image or id, duplicates, clusters and outliers, probe and heads, runs). See pipeline/serve/."""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.config import ConfigError, RuntimeConfig
from pipeline.config.serve import ServeConfig
from pipeline.output.spec import EmbeddingSpec

# what `serve` looks for beside OUTPUT when not told: the candidates in order, the file that marks one
BESIDE = {
    "index": (("{o}-index", "{o}/index"), "index.json"),
    "dedup": (("{o}-dedup", "{o}/dedup"), "dedup.json"),
    "probe": (("{o}-probe", "{o}/probe", "{o}"), "probe.json"),
    "head": (("{o}/head", "{o}-head"), "head.json"),
}


def found_beside(cfg: ServeConfig) -> dict[str, str | None]:
    """index/dedup/probe/head: the URI given, else the first folder beside OUTPUT that holds its file."""
    out = cfg.output.rstrip("/")
    found: dict[str, str | None] = {}
    for what, (candidates, marker) in BESIDE.items():
        given = getattr(cfg, what)
        if given is not None:
            if not storage.exists(storage.join(given, marker)):
                raise ConfigError(f"--{what} {given} holds no {marker}: pass the folder `pipeline {what}` "
                                  f"wrote" if what != "head" else f"--head {given} holds no head.json: pass "
                                  "the folder `pipeline heads train` wrote")
            found[what] = given
            continue
        found[what] = next((c.format(o=out) for c in candidates
                            if storage.exists(storage.join(c.format(o=out), marker))), None)
    return found


def index_problem(uri: str, spec: EmbeddingSpec) -> str | None:
    """Why the index at ``uri`` cannot serve this table's searches (None: it can): unreadable, another metric
    than cosine (the page ranks and labels scores by cosine), or built from other embeddings."""
    from pipeline.analytics import store

    try:
        meta = store.read_meta(uri)
    except (ValueError, OSError) as e:
        return f"its index.json cannot be read ({e})"
    if not isinstance(meta, dict) or "params" not in meta:
        return "its index.json is not what `pipeline index build` writes"
    if meta.get("metric", "cosine") != "cosine":
        return (f"it ranks by {meta.get('metric')} distance and the page by cosine: build one with "
                "`pipeline index build --metric cosine`")
    diff = EmbeddingSpec.parse(meta.get("spec")).feature_differences(spec, mine="index", theirs="table")
    if diff:
        return f"it was built from other embeddings ({'; '.join(diff)}): rebuild it from this output"
    return None


def upload_spec(spec: EmbeddingSpec, cfg: ServeConfig) -> tuple[Any | None, str | None]:
    """The EmbedderSpec that embeds an uploaded image as the table's rows were (its model, weights, cut,
    pooling, preprocessing and precision), or None and why search by image is not available. Called in the
    app's model-loading thread: torch is imported there, not before the page answers."""
    from pipeline.commands.neighbors import backbone_for

    try:
        backbone = backbone_for(spec)
    except ValueError:
        return None, ("the table's embeddings name no model that made them (they were not written by "
                      "`pipeline extract`): search by row id")
    from pipeline.embed import EmbedderSpec

    precision = getattr(spec, "precision", None) or "fp32"
    autocast = "none" if precision in ("fp32", "fp16") else precision
    runtime = RuntimeConfig(device="cpu", autocast=autocast, decoder="pil", batch_size=1, forward_batch=1,
                            compile=False, max_pixels=cfg.max_pixels, progress=False)
    return EmbedderSpec(backbone, runtime, max_bytes=cfg.max_bytes), None


def make_app(cfg: ServeConfig, *, start_loading: bool = True):
    """The FastAPI app for ``cfg`` (what `serve` runs; tests call it with TestClient)."""
    from pipeline.serve import Catalog, Uploads, create_app

    beside = found_beside(cfg)
    catalog = Catalog(cfg.output, **{**beside, "index": None})
    if beside["index"]:
        problem = index_problem(beside["index"], catalog.spec)
        if problem and cfg.index:
            raise ConfigError(f"--index {cfg.index}: {problem}")
        if problem:
            catalog.index_note = f"'{beside['index']}' beside the output is not used: {problem}; exact search"
        else:
            catalog.index_uri = beside["index"]
    uploads = Uploads(lambda: upload_spec(catalog.spec, cfg))
    return create_app(catalog, uploads, token=cfg.token, source_map=cfg.source_map, k=cfg.k,
                      thumbnail_px=cfg.thumbnail_px, cache_thumbnails=cfg.cache_thumbnails,
                      max_bytes=cfg.max_bytes, max_pixels=cfg.max_pixels, start_loading=start_loading)


def serve(cfg: ServeConfig) -> None:
    """Run the app with uvicorn until interrupted."""
    import socket

    import uvicorn

    try:  # a port in use is a clear line and exit 2, before the page is announced
        with socket.create_server((cfg.host, cfg.port)) as s:
            port = s.getsockname()[1] if cfg.port == 0 else cfg.port
    except OSError as e:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}): choose another "
                          "--port, or stop what uses it") from None
    app = make_app(cfg)
    beside = {k: v for k, v in found_beside(cfg).items() if v}
    print(f"serving {storage.redact(cfg.output)}"
          + "".join(f"\n  {k:<6} {storage.redact(v)}" for k, v in beside.items())
          + f"\n  open   http://{cfg.host}:{port}/" + ("?token=<your token>" if cfg.token else ""),
          flush=True)
    uvicorn.run(app, host=cfg.host, port=port, log_level="warning")
