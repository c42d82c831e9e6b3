"""End-to-end demo on embedded defaults: a small real image set served from a loopback S3 server, embedded
with packaged ImageNet weights by a local Ray, read back from Parquet; which way to reuse the model
(`compare`) and where to cut it (a probe on a task unlike ImageNet); then real photos with planted copies:
an index over their embeddings queried with new altered photos, and a dedup of the photos.

    python -m pipeline.demo [--workdir demo-output] [--per-class 30]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np


def nearest_neighbour_agreement(emb: np.ndarray, labels: list[str]) -> float:
    """Share of images whose nearest other image (cosine) has the same label."""
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nn = sim.argmax(axis=1)
    lab = np.asarray(labels)
    return float((lab[nn] == lab).mean())


def read_embeddings(uri: str):
    """Embeddings table (id, label, embedding) from OUTPUT/embeddings through the storage layer."""
    import pyarrow.dataset as pads

    from pipeline import storage

    fs, path = storage.get_fs(storage.join(uri, "embeddings"))
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def show_output(out: Path) -> None:
    """How to read an extract output without Ray: a DuckDB one-liner, run once here."""
    glob = f"{out}/embeddings/*.parquet"
    query = f"SELECT label, count(*) AS images, len(any_value(embedding)) AS dim FROM '{glob}' GROUP BY label"
    print(f"read it with DuckDB (or pandas, Polars, Spark):\n  python -c \"import duckdb; "
          f"duckdb.sql(\\\"{query}\\\").show()\"")
    try:
        import duckdb
    except ImportError:
        return
    duckdb.sql(query).show()


# near-copies are told from look-alikes far better by an intermediate stage pooled on a coarse grid than by
# the classifier's features (README, "Analytics"); the dedup threshold's default is measured there
SIMILARITY_FEATURES = {"tf_efficientnet_lite0": ("blocks.5", "grid3")}


def similar_images(s3, work: Path, model: str) -> bool:
    """Steps 7 and 8 on real photos (scikit-image's, with planted re-encoded, resized and cropped copies):
    an index over their embeddings, queried with fresh altered copies of photos that have none stored, and a
    dedup of the photos. True when every query finds its original first and dedup reports no false pair."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline import samples, storage
    from pipeline.commands.dedup import dedup, format_dedup
    from pipeline.commands.extract import extract
    from pipeline.commands.index import build
    from pipeline.commands.index_text import format_build
    from pipeline.commands.neighbors import format_neighbors, neighbors
    from pipeline.config import DedupConfig, ExtractConfig, IndexBuildConfig, NeighborsConfig

    rt = {"batch_size": 32, "progress": False}
    local = work / "photos"
    planted = samples.make_near_copies(local, copies_of=8, seed=0)
    src = s3.make_bucket("demo-photos") + "/photos"
    n = s3.upload_dir(str(local), src)
    features = f"{s3.make_bucket('demo-analytics')}/{model}"
    layer, pool = SIMILARITY_FEATURES.get(model, ("final", "avg"))
    print(f"[7/8] {n} photos ({n - len(planted)} distinct, {len(planted)} planted copies) uploaded to {src}; "
          f"pipeline extract --source {src} --output {features} --model {model} --layer {layer} "
          f"--pool {pool}")
    extract(ExtractConfig.model_validate({"source": {"uri": src},
                                          "backbone": {"model": model, "layer": layer, "pool": pool},
                                          "output": {"uri": features}, "runtime": rt}))
    index = f"{features}-index"
    print(f"      pipeline index build --embeddings {features} --output {index}")
    print(format_build(build(IndexBuildConfig.model_validate(
        {"embeddings": features, "output": index, "runtime": rt}))))
    queries = work / "query"
    queries.mkdir(parents=True, exist_ok=True)
    stored = {f"originals/{p.name}" for p in (local / "originals").iterdir()}
    fresh = sorted(stored - set(planted.values()))  # photos with no planted copy: only the original is right
    originals = {}
    rng = np.random.default_rng(1)
    for rel, variant in zip(fresh[::7], samples.COPY_VARIANTS):
        img, quality = samples.altered_copy(Image.open(local / rel).convert("RGB"), variant, rng)
        name = f"{Path(rel).stem}-{variant}.jpg"
        img.save(queries / name, quality=quality)
        originals[name] = rel
    qsrc = s3.make_bucket("demo-query") + "/new"
    s3.upload_dir(str(queries), qsrc)
    out = f"{features}-neighbors"
    print(f"      pipeline neighbors --index {index} --images {qsrc} -k 3 --output {out}")
    print(format_neighbors(neighbors(NeighborsConfig.model_validate(
        {"index": index, "images": {"uri": qsrc}, "k": 3, "output": out, "runtime": rt}))))
    fs, path = storage.get_fs(f"{out}/neighbors")
    rows = pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()
    ok = True
    for q in sorted(originals):
        top = sorted((r for r in rows if r["query_id"] == q), key=lambda r: r["rank"])
        ok &= top[0]["id"] == originals[q]
        print(f"      {q:<34} -> {top[0]['id']:<30} cosine {top[0]['score']:.3f}"
              + ("  (its original)" if top[0]["id"] == originals[q] else f"  (not {originals[q]})"))
    out = f"{features}-dedup"
    print(f"[8/8] pipeline dedup --embeddings {features} --output {out}")
    print(format_dedup(dedup(DedupConfig.model_validate({"embeddings": features, "output": out,
                                                         "runtime": rt}))))
    with storage.open_input(f"{out}/duplicates.parquet") as f:
        rep = {r["id"]: r["duplicate_of"] for r in pq.read_table(f).to_pylist()}
    found = sum(rep.get(c, c) == rep.get(o, o) for c, o in planted.items())
    false = sum(planted.get(a, a) != planted.get(b, b) for a, b in rep.items())
    print(f"      planted copies grouped with their original: {found} of {len(planted)}; "
          f"pairs that are not copies: {false} of {len(rep)}")
    return ok and false == 0


def serve_command(work: Path, model: str) -> str:
    """How to look at the photos' output in a browser: its index and dedup are found beside it; the photos,
    uploaded to the loopback S3 server that ended with the demo, are read from their local copy."""
    probe = work / "digits-probe"
    return ("look at the photos, their neighbours, duplicate groups and clusters in a browser:\n"
            f"  .venv/bin/pipeline serve {work / 'analytics' / model} --source-map "
            f"s3://demo-photos/photos={work / 'photos'}" + (f" --probe {probe}" if probe.exists() else "")
            + "\n  then open http://127.0.0.1:8000/")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo-output")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    args = ap.parse_args(argv)

    from pipeline import samples, storage
    from pipeline.commands.extract import extract
    from pipeline.commands.run import format_summary
    from pipeline.config import ExtractConfig, HeadTrainConfig
    from pipeline.demo.reuse import which_application, which_cut
    from pipeline.demo.s3local import local_s3
    from pipeline.heads import train_head

    t0 = time.perf_counter()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "textures"
    files = samples.make_textures(data, per_class=args.per_class, patch=96, seed=0)
    print(f"[1/8] built {len(files)} texture patches ({', '.join(samples.TEXTURES)}; random scale, rotation "
          f"and contrast) under {data}")

    with local_s3() as s3:
        src = s3.make_bucket("demo-images") + "/textures"
        features = s3.make_bucket("demo-features")
        n = s3.upload_dir(str(data), src)
        print(f"[2/8] loopback S3 at {s3.endpoint}: uploaded {n} files to {src}")

        accuracy = {}
        for weights in ("packaged", "none"):
            out = f"{features}/{args.model}-{weights}"
            cfg = ExtractConfig.model_validate({
                "source": {"uri": src, "labels": "folder"},
                "backbone": {"model": args.model, "weights": weights, "layer": "final"},
                "output": {"uri": out},
                "runtime": {"batch_size": 32, "num_cpus": 2},
            })
            print(f"[3/8] pipeline extract --source {src} --output {out} --model {args.model} "
                  f"--weights {weights} --layer final --labels folder")
            summary = extract(cfg)
            print(format_summary(summary))
            table = read_embeddings(out)
            emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
            labels = table.column("label").to_pylist()
            nn_agree = nearest_neighbour_agreement(emb, labels)
            head = train_head(HeadTrainConfig(embeddings=out, output=f"{out}/head"), progress=False)
            val = head["metrics"]["validation"]
            accuracy[weights] = (nn_agree, val["accuracy"], val["macro_f1"])

        print("[4/8] standalone feature extractor + linear head (pipeline heads train):")
        print(f"      {'weights':<22} {'NN agreement':>12} {'val accuracy':>12} {'macro-F1':>9}")
        for w, (nn_a, acc, f1) in accuracy.items():
            name = "ImageNet (packaged)" if w == "packaged" else "random init (none)"
            print(f"      {name:<22} {nn_a:>12.3f} {acc:>12.3f} {f1:>9.3f}")

        reuse_ok = which_application(data, work, args.model)
        cut_ok = which_cut(work, args.model)
        query_ok = similar_images(s3, work, args.model)
        local = work / "features"
        copied = storage.copy_tree(features, str(local))  # the loopback S3 server ends with the demo
        copied += storage.copy_tree("s3://demo-analytics", str(work / "analytics"))
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; its outputs ({copied} files) are mirrored "
          f"under {local}/ and {work / 'analytics'}/")
    show_output(local / f"{args.model}-packaged")
    print(serve_command(work, args.model))
    pretrained, random_init = accuracy["packaged"][1], accuracy["none"][1]
    return 0 if pretrained > random_init and query_ok and reuse_ok and cut_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
