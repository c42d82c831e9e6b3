"""`pipeline serve` over real photos with planted copies (the session's `photos` output, its index and dedup
beside it): the JSON API through FastAPI's TestClient (search by id and by upload, bad uploads as 4xx,
thumbnails and placeholders, tokens, read-only), thumbnails of WebDataset members and Parquet cells, the
command itself, and the page driven in headless Chromium (upload, pivot, every tab without console errors)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipeline.commands.dedup import dedup
from pipeline.commands.index import build
from pipeline.commands.serve import make_app
from pipeline.config import ConfigError, DedupConfig, HeadTrainConfig, IndexBuildConfig
from pipeline.config.files import merge_sources
from pipeline.config.serve import ServeConfig
from pipeline.heads import train_head
from pipeline.reports import probe_png
from pipeline.samples import altered_copy
from pipeline.serve.thumbs import read_image_bytes, remap
from pipeline.storage import copy_tree

RT = {"progress": False, "batch_size": 32}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "a-token-of-24-characters"


def _client(app_or_cfg) -> TestClient:
    """A TestClient addressing the app as a browser on this machine does (Host: 127.0.0.1)."""
    app = make_app(app_or_cfg) if isinstance(app_or_cfg, ServeConfig) else app_or_cfg
    return TestClient(app, base_url="http://127.0.0.1:8000")


def _labelled_head(root: Path) -> str:
    """A linear head trained on a small labelled table of three separable classes."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)).astype(np.float32) * 3
    y = np.repeat(np.arange(3), 40)
    x = centres[y] + rng.normal(size=(len(y), 16)).astype(np.float32)
    names = np.array(["cat", "dog", "fox"])
    table = pa.table({"id": [f"{names[c]}/{i:04d}.jpg" for i, c in enumerate(y)],
                      "source": pa.nulls(len(y), pa.string()), "label": names[y].tolist(),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16)})
    meta = {"model": "synthetic", "weights": {"source": "synthetic", "sha256": "0" * 64}, "layer": "final",
            "pool": "avg", "dim": 16, "dtype": "float32"}
    (root / "labelled" / "embeddings").mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata({"pipeline": json.dumps(meta)}),
                   root / "labelled" / "embeddings" / "part-0.parquet")
    train_head(HeadTrainConfig(embeddings=str(root / "labelled"), output=str(root / "head"), device="cpu"),
               progress=False)
    return str(root / "head")


def _probe(root: Path) -> str:
    results = [{"model": "m", "layer": layer, "dim": 8 * (i + 1), "accuracy": acc, "macro_f1": acc,
                "forward_ms_per_image": 2.0 * (i + 1)} for i, (layer, acc) in
               enumerate([("blocks.2", 0.7), ("blocks.4", 0.9), ("final", 0.8)])]
    best = results[1]
    (root / "probe").mkdir()
    (root / "probe" / "probe.json").write_text(json.dumps({"best": best, "results": results}))
    (root / "probe" / "probe.png").write_bytes(probe_png(results, best))
    return str(root / "probe")


@pytest.fixture(scope="module")
def served(photos, tmp_path_factory):
    """The photos' output with an index and a dedup beside it (found by `serve`), a probe and a head given
    explicitly; fresh altered copies of photos that have no stored copy, as queries."""
    root, planted = photos
    feat = root / "feat" / "img"
    if not (root / "feat" / "img-index").exists():
        build(IndexBuildConfig(embeddings=str(feat), output=f"{feat}-index", runtime=RT))
        dedup(DedupConfig(embeddings=str(feat), output=f"{feat}-dedup", runtime=RT))
    extra = tmp_path_factory.mktemp("serve")
    queries = {}
    stored = sorted(f"originals/{p.name}" for p in (root / "img" / "originals").iterdir())
    fresh = [rel for rel in stored if rel not in set(planted.values())]
    rng = np.random.default_rng(3)
    for rel, variant in zip(fresh[::5], ("jpeg40", "resize60", "crop90")):
        img, quality = altered_copy(Image.open(root / "img" / rel).convert("RGB"), variant, rng)
        path = extra / f"{Path(rel).stem}-{variant}.jpg"
        img.save(path, quality=quality)
        queries[path] = rel
    cfg = ServeConfig(output=str(feat), probe=_probe(extra), head=_labelled_head(extra))
    return {"root": root, "feat": feat, "planted": planted, "queries": queries, "cfg": cfg, "tmp": extra}


@pytest.fixture(scope="module")
def client(served):
    with _client(served["cfg"]) as c:
        yield c


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def test_search_by_id_returns_its_copies_first_and_never_itself(served, client):
    planted = served["planted"]
    original = sorted(set(planted.values()))[0]
    copies = {c for c, o in planted.items() if o == original}
    body = client.get("/api/search", params={"id": original, "k": 5}).json()
    ids = [r["id"] for r in body["results"]]
    assert original not in ids and len(ids) == 5
    assert set(ids[:3]) == copies, ids
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and scores[2] > 0.8 > scores[3]
    status = client.get("/api/status").json()
    assert status["rows"] == 32 + len(planted) and status["search"] == "index"
    assert status["dedup"] and status["probe"] and status["head"]


def test_an_uploaded_altered_copy_finds_its_original_first(served, client):
    for path, original in served["queries"].items():
        r = client.post("/api/search", params={"k": 3, "name": path.name}, content=path.read_bytes())
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["id"] == original, (path.name, r.json()["results"])


def test_bad_uploads_are_4xx_with_a_message(served, client):
    assert client.post("/api/search", content=b"").status_code == 400
    r = client.post("/api/search", content=b"GIF89a not really")
    assert r.status_code == 400 and "not_an_image" in r.json()["detail"]
    png = io.BytesIO()
    Image.new("RGB", (400, 300), "white").save(png, format="PNG")
    with _client(ServeConfig(output=str(served["feat"]), max_bytes=500)) as small:
        r = small.post("/api/search", content=png.getvalue())
        assert r.status_code == 413 and "limit" in r.json()["detail"]
    with _client(ServeConfig(output=str(served["feat"]), max_pixels=100_000)) as small:
        r = small.post("/api/search", content=png.getvalue())
        assert r.status_code == 413 and "too_many_pixels" in r.json()["detail"], r.json()
        assert "pipeline_serve_rejected_uploads_total 1" in small.get("/metrics").text
    assert client.get("/api/search", params={"id": "no/such.png"}).status_code == 404


def test_thumbnails_and_a_placeholder_for_an_image_that_is_gone(served, client):
    r = client.get("/api/thumb", params={"id": "originals/astronaut.png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) == 192
    moved = ServeConfig(output=str(served["feat"]), source_map={str(served["root"] / "img"): "/nowhere"})
    with _client(moved) as c:
        r = c.get("/api/thumb", params={"id": "originals/astronaut.png"})
        assert r.status_code == 200 and r.headers["x-placeholder"] == "1"
    assert client.get("/api/thumb", params={"id": "no/such.png"}).status_code == 404
    assert remap("s3://b/photos/a.jpg", {"s3://b": "/x", "s3://b/photos": "/data"}) == "/data/a.jpg"


def test_an_output_its_index_dedup_and_images_on_s3(served, bucket):
    """The output, its index and dedup copied to the loopback S3 server, the images too (read from there
    through --source-map): search, duplicates and thumbnails all come from s3://."""
    root = served["root"]
    for name in ("img", "img-index", "img-dedup"):
        copy_tree(str(root / "feat" / name), f"{bucket}/feat/{name}")
    copy_tree(str(root / "img"), f"{bucket}/images")
    cfg = ServeConfig(output=f"{bucket}/feat/img", source_map={str(root / "img"): f"{bucket}/images"})
    with _client(cfg) as c:
        status = c.get("/api/status").json()
        assert status["search"] == "index" and status["dedup"]
        assert status["rows"] == 32 + len(served["planted"])
        path, original = next(iter(served["queries"].items()))
        assert c.post("/api/search", content=path.read_bytes()).json()["results"][0]["id"] == original
        assert len(c.get("/api/duplicates").json()["groups"]) == len(set(served["planted"].values()))
        r = c.get("/api/thumb", params={"id": original})
        assert r.headers["content-type"] == "image/jpeg" and "x-placeholder" not in r.headers


def test_a_mismatched_index_and_damaged_files_are_named_never_a_500(served, tmp_path):
    """An L2 index beside the output is not used (the page ranks by cosine): exact search, and why; given as
    --index it is refused at start. A truncated dedup.json and a malformed probe.json are 422s naming them."""
    out = tmp_path / "img"
    copy_tree(str(served["feat"]), str(out))
    build(IndexBuildConfig(embeddings=str(out), output=f"{out}-index", metric="l2", runtime=RT))
    copy_tree(f"{served['feat']}-dedup", f"{out}-dedup")
    Path(f"{out}-dedup/dedup.json").write_text('{"threshold": 0.8, "by_thr')
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "probe.json").write_text("[1, 2]")
    original = sorted(set(served["planted"].values()))[0]
    with _client(ServeConfig(output=str(out), probe=str(tmp_path / "probe"))) as c:
        status = c.get("/api/status").json()
        assert status["search"] == "exact" and "cosine" in status["index_note"]
        found = [r["id"] for r in c.get("/api/search", params={"id": original, "k": 3}).json()["results"]]
        assert sorted(found) == sorted(p for p, o in served["planted"].items() if o == original)
        r = c.get("/api/duplicates")
        assert r.status_code == 422 and "dedup.json" in r.json()["detail"]
        r = c.get("/api/probe")
        assert r.status_code == 422 and "probe.json" in r.json()["detail"]
    with pytest.raises(ConfigError, match="--index .* ranks by l2 distance"):
        make_app(ServeConfig(output=str(out), index=f"{out}-index"), start_loading=False)


def test_thumbnails_of_webdataset_members_and_parquet_cells(tmp_path):
    img = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(img, format="JPEG")
    data = img.getvalue()
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tf:
        for name, payload in (("a/k1.jpg", b"junk"), ("x/a/k2.jpg", b"junk"), ("./a/k2.jpg", data),
                              ("a/k2.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    assert read_image_bytes(str(tmp_path / "shard-0.tar"), "shard-0.tar/a/k2") == data
    pq.write_table(pa.table({"label": ["x", "y"], "image": pa.array([b"other", data], pa.binary())}),
                   tmp_path / "p.parquet", row_group_size=1)
    assert read_image_bytes(str(tmp_path / "p.parquet"), "p.parquet#1") == data


def test_duplicates_clusters_probe_head_and_runs(served, client):
    planted = served["planted"]
    dups = client.get("/api/duplicates").json()
    kept = {g["kept"] for g in dups["groups"]}
    assert kept == set(planted.values())  # the lossless originals are kept
    assert all(len(g["removed"]) == 3 for g in dups["groups"]) and dups["by_threshold"]
    cl = client.get("/api/clusters").json()
    assert cl["method"] in ("pca", "umap") and len(cl["points"]) == 32 + len(planted)
    for key, column in (("outliers", "outlier_score"), ("far_from_centre", "distance_to_centroid")):
        scores = [o[column] for o in cl[key]]
        assert scores == sorted(scores, reverse=True) and scores
    pr = client.get("/api/probe").json()
    assert pr["probe"]["best"]["layer"] == "blocks.4"
    assert np.array(pr["head"]["metrics"]["validation"]["confusion"]).shape == (3, 3)
    assert client.get("/api/probe.png").content[:4] == b"\x89PNG"
    runs = client.get("/api/runs").json()["runs"]
    assert runs[0]["kind"] == "extract" and runs[0]["counts"]["embedded"] == 32 + len(planted)
    assert client.get("/api/errors").json() == {"rows": 0, "shown": []}
    metrics = client.get("/metrics").text
    assert 'pipeline_serve_query_seconds_bucket{le="+Inf"}' in metrics
    assert f"pipeline_serve_index_vectors {32 + len(planted)}" in metrics


def test_nothing_writes_to_the_outputs(served, client):
    root = served["root"] / "feat"
    before = _files(root)
    for path in ("/", "/healthz", "/metrics", "/api/status", "/api/rows", "/api/duplicates", "/api/clusters",
                 "/api/probe", "/api/runs", "/api/errors", "/api/search?id=originals/astronaut.png"):
        assert client.get(path).status_code == 200, path
    client.post("/api/search", content=next(iter(served["queries"])).read_bytes())
    for method in ("put", "delete", "patch"):
        assert getattr(client, method)("/api/search").status_code == 405
    assert _files(root) == before


def test_a_token_guards_every_request(served):
    with pytest.raises(ConfigError, match="--host 0.0.0.0 exposes the page beyond this machine: give --tok"):
        merge_sources(ServeConfig, None, {"output": str(served["feat"]), "host": "0.0.0.0"})
    cfg = ServeConfig(output=str(served["feat"]), host="0.0.0.0", token=TOKEN)
    with _client(cfg) as c:
        assert c.get("/healthz").status_code == 401
        wrong = {"Authorization": "Bearer wrong-token-123456789"}
        assert c.get("/api/status", headers=wrong).status_code == 401
        assert c.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get(f"/?token={TOKEN}").status_code == 200  # sets the page's cookie
        assert c.get("/api/status").status_code == 200


def test_without_a_token_only_loopback_names_are_answered(client):
    assert client.get("/healthz", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/healthz", headers={"Host": "[::1]:8000"}).status_code == 200
    r = client.get("/api/status", headers={"Host": "attacker.example:8000"})
    assert r.status_code == 403 and "DNS rebinding" in r.json()["detail"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 90) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            body = json.loads(urllib.request.urlopen(url + "/healthz", timeout=2).read())
            if body["ready"]:
                return body
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("not ready")


def test_the_command_serves_the_page_and_finds_what_is_beside_the_output(served, cli):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pipeline", "serve", str(served["feat"]), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        assert _wait_ready(url, proc)["ok"]
        page = urllib.request.urlopen(url + "/").read().decode()
        assert '<input type="file" id="upload"' in page
        status = json.loads(urllib.request.urlopen(url + "/api/status").read())
        assert status["search"] == "index" and status["dedup"]
        second = cli("serve", str(served["feat"]), "--port", str(port))
        assert second.returncode == 2 and "cannot listen on" in second.stderr
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "index" in out and "dedup" in out and f"http://127.0.0.1:{port}/" in out


@pytest.fixture
def live_server(served):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(make_app(served["cfg"]), host="127.0.0.1", port=_free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    _wait_ready(url)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_in_chromium_finds_originals_pivots_and_renders_every_tab(served, live_server):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    path, original = next(iter(served["queries"].items()))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(live_server + "/#search")
        page.set_input_files("input[type=file]", str(path))
        page.wait_for_selector("#results .tile[data-score]")
        first = page.locator("#results .tile").first
        assert first.get_attribute("data-id") == original
        assert float(first.get_attribute("data-score")) > 0.8
        pivot = page.locator("#results .tile").nth(1).get_attribute("data-id")
        page.locator("#results .tile").nth(1).click()
        page.wait_for_function("id => location.hash.includes(encodeURIComponent(id))", arg=pivot)
        page.wait_for_selector(f"#query img[src*='{pivot.split('/')[-1]}']")
        after = page.locator("#results .tile").evaluate_all("ts => ts.map(t => t.dataset.id)")
        assert pivot not in after and after
        page.reload()  # the URL holds the query
        page.wait_for_selector("#results .tile[data-score]")
        assert page.locator("#results .tile").evaluate_all("ts => ts.map(t => t.dataset.id)") == after
        page.goto(f"{live_server}/#search?id={original}&k=7")  # a shared link with a k the menu lacks
        page.wait_for_function("() => document.querySelectorAll('#results .tile').length === 7")
        page.goto(live_server + "/#duplicates")
        page.wait_for_selector("#groups .group")
        assert page.locator("#groups .group").count() == len(set(served["planted"].values()))
        assert page.locator("#groups .tile.kept").first.get_attribute("data-id").startswith("originals/")
        page.goto(live_server + "/#clusters")
        page.wait_for_selector("#outliers .tile")
        page.goto(live_server + "/#probe")
        page.wait_for_selector("#head table.confusion")
        assert page.locator("#probe tr.best").count() == 1
        page.goto(live_server + "/#runs")
        page.wait_for_selector("#runs tr[data-run]")
        page.wait_for_selector("#errors p")
        browser.close()
    assert errors == []
