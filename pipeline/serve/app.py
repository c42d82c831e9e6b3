"""The web app of `pipeline serve` (FastAPI): one static page (plain HTML, JS and CSS served by the app, no
CDN) and the JSON API under /api/ that the page uses; /healthz and /metrics (Prometheus text).

Read-only: no route writes anything. Every request carries the token when one is set (``Authorization:
Bearer T``, or ``?token=T`` once, which sets a cookie for the page's own requests); without one, only
requests addressed to a loopback name are answered (a DNS-rebinding page cannot read it)."""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import anyio.to_thread
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from pipeline import storage
from pipeline.config.serve import is_loopback
from pipeline.serve.data import Catalog, DamagedFile
from pipeline.serve.thumbs import Thumbnails, remap

TOKEN_COOKIE = "pipeline_serve_token"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
READY_WAIT_S = 120.0  # a request that needs the table waits this long for it to load, then gets 503
UPLOAD_LIMITS = {"too_large": 413, "too_many_pixels": 413, "extreme_aspect_ratio": 413}
PLACEHOLDER = (b'<svg xmlns="http://www.w3.org/2000/svg" width="192" height="192" viewBox="0 0 192 192">'
               b'<rect width="192" height="192" fill="#e5e7eb"/><path d="M60 128l28-36 20 24 14-16 22 28z" '
               b'fill="#9ca3af"/><text x="96" y="168" font-family="sans-serif" font-size="14" fill="#6b7280" '
               b'text-anchor="middle">image not found</text></svg>')


class Metrics:
    """Counters and a latency histogram, written as Prometheus text."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queries: dict[str, int] = {"id": 0, "image": 0}
        self.rejected = 0
        self.thumbnails = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def observe(self, by: str, seconds: float) -> None:
        with self.lock:
            self.queries[by] += 1
            self.latency_sum += seconds
            self.buckets[next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b),
                              len(LATENCY_BUCKETS))] += 1

    def text(self, catalog: Catalog, thumbs: Thumbnails) -> str:
        lines = ["# HELP pipeline_serve_queries_total Searches answered, by query kind.",
                 "# TYPE pipeline_serve_queries_total counter"]
        lines += [f'pipeline_serve_queries_total{{by="{k}"}} {v}' for k, v in self.queries.items()]
        lines += ["# HELP pipeline_serve_rejected_uploads_total Uploads refused (4xx).",
                  "# TYPE pipeline_serve_rejected_uploads_total counter",
                  f"pipeline_serve_rejected_uploads_total {self.rejected}",
                  "# HELP pipeline_serve_query_seconds Search latency (embedding an upload included).",
                  "# TYPE pipeline_serve_query_seconds histogram"]
        total = 0
        for b, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], self.buckets):
            total += n
            lines.append(f'pipeline_serve_query_seconds_bucket{{le="{b}"}} {total}')
        lines += [f"pipeline_serve_query_seconds_sum {self.latency_sum:.6f}",
                  f"pipeline_serve_query_seconds_count {total}",
                  "# HELP pipeline_serve_thumbnails_total Thumbnails served; cache hits among them.",
                  "# TYPE pipeline_serve_thumbnails_total counter",
                  f"pipeline_serve_thumbnails_total {self.thumbnails}",
                  f"pipeline_serve_thumbnail_cache_hits_total {thumbs.hits}",
                  "# HELP pipeline_serve_rows Rows of the table served; vectors of its index.",
                  "# TYPE pipeline_serve_rows gauge",
                  f"pipeline_serve_rows {len(catalog.rows.ids) if catalog.rows else 0}",
                  f"pipeline_serve_index_vectors {catalog.index.size if catalog.index else 0}"]
        return "\n".join(lines) + "\n"


MODEL_BUILD_LOCK = threading.Lock()  # models are built one at a time: concurrent first imports of timm race


class Uploads:
    """Embeds uploaded images with the table's own backbone spec; the model loads in the background."""

    def __init__(self, make_spec: Callable[[], tuple[Any | None, str | None]]) -> None:
        self.make_spec = make_spec  # -> (an EmbedderSpec, or None and why search by image is not available)
        self.reason: str | None = None
        self.embedder = None
        self.ready = threading.Event()
        self.lock = threading.Lock()

    def load(self) -> None:
        try:
            spec, self.reason = self.make_spec()
            if spec is not None:
                with MODEL_BUILD_LOCK:
                    from pipeline.embed import Embedder

                    self.embedder = Embedder(spec, threads=1)
        except Exception as e:  # noqa: BLE001 - shown by /api/status
            self.reason = f"the model did not load: {type(e).__name__}: {e}"
        self.ready.set()

    def embed(self, data: bytes) -> np.ndarray:
        from pipeline.sources.shards import rows_from_bytes

        if not self.ready.wait(READY_WAIT_S):
            raise HTTPException(503, "the model is still loading: try again in a few seconds")
        if self.embedder is None:
            raise HTTPException(409, f"search by image is not available: {self.reason}")
        with self.lock:
            out = self.embedder(rows_from_bytes([data], shard="upload"))
        kind = out.column("error_kind")[0].as_py()
        if kind is not None:
            msg = out.column("error_message")[0].as_py()
            raise HTTPException(UPLOAD_LIMITS.get(kind, 400), f"{kind}: {msg}")
        return np.asarray(out.column("embedding")[0].as_py(), dtype=np.float32)


def _authorized(request: Request, token: str | None) -> bool:
    if not token:
        return True
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    offered = [value.strip()] if scheme.lower() == "bearer" else []
    offered += [request.query_params.get("token") or "", request.cookies.get(TOKEN_COOKIE) or ""]
    return any(hmac.compare_digest(given.encode(), token.encode()) for given in offered if given)


def _loopback_host(request: Request) -> bool:
    """Whether the request's Host header names this machine's loopback (checked when there is no token)."""
    host = request.headers.get("host", "")
    name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    return is_loopback(name)


def _static_dir() -> str:
    return str(resources.files("pipeline.serve") / "static")


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload is {declared} bytes, above the limit of {limit} "
                                 "(--set max_bytes=N)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"upload is over {limit} bytes, the limit (--set max_bytes=N)")
    if not body:
        raise HTTPException(400, "empty upload: send the image file's bytes as the request body")
    return bytes(body)


@dataclass
class Served:
    """What the routes share: the catalog, the upload embedder, the counters, the thumbnails, the settings."""

    catalog: Catalog
    uploads: Uploads
    thumbs: Thumbnails
    token: str | None
    source_map: dict[str, str]
    k: int
    max_bytes: int
    max_pixels: int
    metrics: Metrics = field(default_factory=Metrics)
    cached: dict[str, Any] = field(default_factory=dict)

    def table(self, wait: float = READY_WAIT_S) -> Catalog:
        """The loaded catalog, waiting for it up to ``wait`` s (then 503)."""
        if not self.catalog.ready.wait(wait):
            raise HTTPException(503, "the table is still loading: try again in a few seconds")
        if self.catalog.error:
            raise HTTPException(500, f"the output could not be read: {self.catalog.error}")
        return self.catalog

    def answer(self, by: str, t0: float, query: dict[str, Any], results: list[dict[str, Any]]
               ) -> dict[str, Any]:
        took = time.perf_counter() - t0
        self.metrics.observe(by, took)
        return {"query": query, "results": results, "took_ms": round(1000 * took, 2)}

    def clamp(self, n: int | None) -> int:
        return max(1, min(int(n or self.k), 200))

    def status(self) -> dict[str, Any]:
        c, up = self.table(wait=1.0), self.uploads  # the page polls it: answers at once, 503 while loading
        spec = c.spec
        return {
            "output": storage.redact(c.output), "rows": len(c.rows.ids), "dim": int(c.rows.x.shape[1]),
            "model": spec.model, "layer": spec.layer, "pool": spec.pool, "k": self.k, "loaded_s": c.loaded_s,
            "index": None if c.index is None else {
                "uri": storage.redact(c.index.uri), "kind": c.index.meta.get("kind"), "vectors": c.index.size,
                "recall": (c.index.meta.get("recall") or {})},
            "search": "index" if c.index is not None else "exact", "index_note": c.index_note,
            "upload": {"available": up.embedder is not None or not up.ready.is_set(),
                       "ready": up.embedder is not None, "reason": up.reason,
                       "max_bytes": self.max_bytes, "max_pixels": self.max_pixels},
            "dedup": c.dedup_uri is not None, "probe": c.probe_uri is not None,
            "head": c.head_uri is not None,
        }


def _guard(app: FastAPI, s: Served) -> None:
    """Damaged files as 422s; the Host check (no token) or the token on every request."""

    @app.exception_handler(DamagedFile)
    async def damaged(request: Request, exc: DamagedFile) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if not s.token and not _loopback_host(request):
            return JSONResponse({"detail": "this page answers to localhost and 127.0.0.1 only (another name "
                                           "can be a web page reaching it through DNS rebinding): open it as "
                                           "http://127.0.0.1:PORT/, or serve with --token"}, status_code=403)
        if not _authorized(request, s.token):
            return JSONResponse({"detail": "a token is required: add ?token=T to the page's address, or "
                                           "send Authorization: Bearer T"}, status_code=401)
        response = await call_next(request)
        if s.token and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, s.token, httponly=True, samesite="strict")
        response.headers.setdefault("Cache-Control", "no-store")
        return response


def _system_routes(app: FastAPI, s: Served) -> None:
    """The page and its assets, /healthz, /metrics, /api/status."""

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse((resources.files("pipeline.serve") / "static" / "index.html").read_text())

    app.mount("/static", StaticFiles(directory=_static_dir()), name="static")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        c = s.catalog
        return {"ok": c.error is None, "ready": c.ready.is_set(), "error": c.error}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        return s.metrics.text(s.catalog, s.thumbs)

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        return s.status()


def _search_routes(app: FastAPI, s: Served) -> None:
    """Search by id and by upload, the rows, the thumbnails."""

    @app.get("/api/search")
    def search_by_id(id: str, k: int | None = None) -> dict[str, Any]:  # noqa: A002 - the API's name
        t0 = time.perf_counter()
        c = s.table()
        q = c.vector(id)
        if q is None:
            raise HTTPException(404, f"no row with id '{id}' in this table")
        return s.answer("id", t0, c.rows.describe(c.rows.where[id]), c.search(q, s.clamp(k), exclude=id))

    @app.post("/api/search")
    async def search_by_image(request: Request, k: int | None = None, name: str | None = None
                              ) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            data = await _read_limited(request, s.max_bytes)
            c = await anyio.to_thread.run_sync(s.table)  # waiting for the table must not hold the event loop
            q = await anyio.to_thread.run_sync(s.uploads.embed, data)
        except HTTPException as e:
            if 400 <= e.status_code < 500:
                s.metrics.count("rejected")
            raise
        results = await anyio.to_thread.run_sync(c.search, q, s.clamp(k))
        return s.answer("image", t0, {"upload": name or "image", "bytes": len(data)}, results)

    @app.get("/api/rows")
    def rows(offset: int = 0, limit: int = 24) -> dict[str, Any]:
        c = s.table()
        offset, limit = max(0, offset), max(1, min(limit, 500))
        n = len(c.rows.ids)
        return {"total": n, "offset": offset,
                "rows": [c.rows.describe(i) for i in range(offset, min(n, offset + limit))]}

    @app.get("/api/thumb")
    def thumb(id: str) -> Response:  # noqa: A002
        c = s.table()
        if id not in c.rows.where:
            raise HTTPException(404, f"no row with id '{id}' in this table")
        s.metrics.count("thumbnails")
        data = s.thumbs.get(id, remap(c.source_of(id), s.source_map))
        if data is None:
            return Response(PLACEHOLDER, media_type="image/svg+xml", headers={"X-Placeholder": "1"})
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _tab_routes(app: FastAPI, s: Served) -> None:
    """What the other tabs show: duplicates, clusters, probe and head, runs and error rows."""

    @app.get("/api/duplicates")
    def duplicates() -> dict[str, Any]:
        out = s.table().duplicates()
        if out is None:
            raise HTTPException(404, "no dedup output: run `pipeline dedup --embeddings OUTPUT --output "
                                     "OUTPUT-dedup`, or pass --dedup URI")
        return out

    @app.get("/api/clusters")
    def clusters() -> dict[str, Any]:
        c = s.table()
        if "clusters" not in s.cached:
            s.cached["clusters"] = c.clusters()
        return s.cached["clusters"]

    @app.get("/api/probe")
    def probe() -> dict[str, Any]:
        c = s.table()
        return {"probe": c.probe(), "head": c.head()}

    @app.get("/api/probe.png")
    def probe_png() -> Response:
        c = s.table()
        uri = storage.join(c.probe_uri, "probe.png") if c.probe_uri else None
        if uri is None or not storage.exists(uri):
            raise HTTPException(404, "no probe chart: pass --probe URI (a `pipeline probe` output)")
        return Response(storage.read_bytes(uri), media_type="image/png")

    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        return {"runs": s.table().runs()}

    @app.get("/api/errors")
    def errors(run_date: str | None = None) -> dict[str, Any]:
        return s.table().errors(run_date)


def create_app(catalog: Catalog, uploads: Uploads, *, token: str | None = None,
               source_map: dict[str, str] | None = None, k: int = 12, thumbnail_px: int = 192,
               cache_thumbnails: int = 4096, max_bytes: int = 64 << 20, max_pixels: int = 50_000_000,
               start_loading: bool = True) -> FastAPI:
    """The app over a Catalog; ``start_loading`` loads the table and the model in background threads."""
    # no /docs page: FastAPI's loads its script from a CDN, and the app serves everything itself
    app = FastAPI(title="pipeline serve", docs_url=None, openapi_url="/api/openapi.json", redoc_url=None)
    s = Served(catalog, uploads, Thumbnails(thumbnail_px, cache_thumbnails, max_pixels=max_pixels,
                                            max_bytes=max_bytes),
               token, dict(source_map or {}), k, max_bytes, max_pixels)
    if start_loading:
        catalog.start()
        threading.Thread(target=uploads.load, name="model-load", daemon=True).start()
    _guard(app, s)
    _system_routes(app, s)
    _search_routes(app, s)
    _tab_routes(app, s)
    return app
