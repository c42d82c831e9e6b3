"""End-to-end demo on embedded defaults: a small real image set served from a loopback S3 server, embedded
with packaged ImageNet weights by a local Ray, read back from Parquet.

    python -m pipeline.demo [--workdir demo-output] [--per-class 24]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo-output")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    args = ap.parse_args(argv)

    from pipeline import samples, storage
    from pipeline.commands.extract import extract
    from pipeline.commands.probe import format_probe, probe
    from pipeline.commands.run import format_summary
    from pipeline.config import ExtractConfig, HeadTrainConfig, ProbeConfig
    from pipeline.heads import train_head
    from pipeline.s3local import local_s3

    t0 = time.perf_counter()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "textures"
    files = samples.make_textures(data, per_class=args.per_class, patch=96, seed=0)
    print(f"[1/5] built {len(files)} texture patches ({', '.join(samples.TEXTURES)}; random scale, rotation "
          f"and contrast) under {data}")

    with local_s3() as s3:
        src = s3.make_bucket("demo-images") + "/textures"
        features = s3.make_bucket("demo-features")
        n = s3.upload_dir(str(data), src)
        print(f"[2/5] loopback S3 at {s3.endpoint}: uploaded {n} files to {src}")

        accuracy = {}
        for weights in ("packaged", "none"):
            out = f"{features}/{args.model}-{weights}"
            cfg = ExtractConfig.model_validate({
                "source": {"uri": src, "labels": "folder"},
                "backbone": {"model": args.model, "weights": weights, "layer": "final"},
                "output": {"uri": out},
                "runtime": {"batch_size": 32, "num_cpus": 2},
            })
            print(f"[3/5] pipeline extract --source {src} --output {out} --model {args.model} "
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

        print("[4/5] standalone feature extractor + linear head (pipeline heads train):")
        print(f"      {'weights':<22} {'NN agreement':>12} {'val accuracy':>12} {'macro-F1':>9}")
        for w, (nn_a, acc, f1) in accuracy.items():
            name = "ImageNet (packaged)" if w == "packaged" else "random init (none)"
            print(f"      {name:<22} {nn_a:>12.3f} {acc:>12.3f} {f1:>9.3f}")

        probe_cfg = ProbeConfig.model_validate({
            "source": {"uri": src, "labels": "folder"}, "output": {"uri": f"{features}/probe"},
            "runtime": {"batch_size": 32, "progress": False}, "models": [args.model], "layers": ["all"],
        })
        print(f"[5/5] pipeline probe --source {src} --output {features}/probe --model {args.model} "
              "--layers all")
        report = probe(probe_cfg, progress=False)
        print(format_probe(report))
        local = work / "features"
        copied = storage.copy_tree(features, str(local))  # the loopback S3 server ends with the demo
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; its outputs ({copied} files) are mirrored "
          f"under {local}/")
    show_output(local / f"{args.model}-packaged")
    pretrained, random_init = accuracy["packaged"][1], accuracy["none"][1]
    return 0 if pretrained > random_init else 1


if __name__ == "__main__":
    raise SystemExit(main())
