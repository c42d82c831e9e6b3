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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo-output")
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    args = ap.parse_args(argv)

    from pipeline import samples
    from pipeline.config import ExtractConfig
    from pipeline.runner import extract, format_summary
    from pipeline.s3local import local_s3

    t0 = time.perf_counter()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "textures"
    files = samples.make_textures(data, per_class=args.per_class, patch=128, seed=0)
    print(f"[1/4] built {len(files)} texture patches ({', '.join(samples.TEXTURES)}) under {data}")

    with local_s3() as s3:
        src = s3.make_bucket("demo-images") + "/textures"
        out = s3.make_bucket("demo-features") + f"/{args.model}"
        n = s3.upload_dir(str(data), src)
        print(f"[2/4] loopback S3 at {s3.endpoint}: uploaded {n} files to {src}")

        cfg = ExtractConfig.model_validate({
            "source": {"uri": src, "labels": "folder"},
            "backbone": {"model": args.model, "weights": "packaged", "layer": "final"},
            "output": {"uri": out},
            "runtime": {"batch_size": 32, "num_cpus": 2},
        })
        print(f"[3/4] pipeline extract --source {src} --output {out} --model {args.model} "
              "--weights packaged --layer final --labels folder")
        summary = extract(cfg)
        print(format_summary(summary))

        table = read_embeddings(out)
        emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        labels = table.column("label").to_pylist()
        agree = nearest_neighbour_agreement(emb, labels)
        chance = 1.0 / len(set(labels))
        print(f"[4/4] read back {table.num_rows} embeddings of dim {emb.shape[1]} from Parquet; "
              f"nearest-neighbour label agreement {agree:.2f} (chance {chance:.2f})")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0 if agree > chance else 1


if __name__ == "__main__":
    raise SystemExit(main())
