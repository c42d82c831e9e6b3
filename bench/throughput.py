"""Throughput benchmark: how close the pipeline gets to the bare model forward, measured in one run.

    python -m bench.throughput --model tf_efficientnet_lite0 --images 256 [--batch-size 32] \
        [--source local|s3]

Rows (same model, batch size, dtype and machine):
  forward      pre-decoded, pre-sized tensors through the cut model: the ceiling
  embedder     the Embedder on encoded JPEG bytes (decode + preprocess + forward + pool), no Ray
  pipeline     the full run through Ray: shards -> read tasks -> Embedder actor -> Parquet; steady state from
               two sizes (N and 2N), so Ray start-up and model load are reported separately
  pipeline-1call  the same with one batch per actor at a time (no decode/model overlap in the actor)
  ray-pattern  the documented Ray Data pattern: read_images (decode in read tasks) -> actor pool, same model
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def make_jpegs(root: Path, n: int, size=(500, 375), seed: int = 0) -> list[Path]:
    """n JPEGs of ~500x375 cut from scikit-image's bundled photos and textures."""
    from PIL import Image

    from pipeline import samples

    rng = np.random.default_rng(seed)
    sources = [np.asarray(samples.photo(p)) for p in ("chelsea", "coffee", "astronaut", "rocket")]
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = min(h, size[1]), min(w, size[0])
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = Image.fromarray(src[y:y + ch, x:x + cw]).resize(size)
        p = root / f"img{i:06d}.jpg"
        img.save(p, quality=90)
        out.append(p)
    return out


def _median_rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_images / statistics.median(times)


def bench_forward(model: str, batch: int, repeats: int) -> float:
    import torch

    from pipeline.backbones import build_backbone, input_size
    from pipeline.config import BackboneConfig

    b = build_backbone(BackboneConfig(model=model, weights="packaged"))
    h, w = input_size(b.preprocessing)
    x = torch.randn(batch, 3, h, w)

    def run():
        with torch.inference_mode():
            b.embed(x)
    return _median_rate(run, batch, repeats)


def bench_embedder(model: str, files: list[Path], batch: int, repeats: int) -> float:
    import pyarrow as pa

    from pipeline.embed import Embedder

    e = Embedder({"model": model, "weights": "packaged"})
    datas = [f.read_bytes() for f in files[:batch]]
    table = pa.table({"id": [str(i) for i in range(batch)], "source": ["s"] * batch, "label": [None] * batch,
                      "bytes": pa.array(datas, pa.binary()),
                      "error_kind": pa.array([None] * batch, pa.string()),
                      "error_message": pa.array([None] * batch, pa.string()), "shard": ["x"] * batch,
                      "row": list(range(batch))})
    return _median_rate(lambda: e(table), batch, repeats)


def bench_pipeline(model: str, src: str, out: str, batch: int, cpus: int, calls: int = 2) -> float:
    from pipeline.config import ExtractConfig
    from pipeline.runner import extract

    cfg = ExtractConfig.model_validate({
        "source": {"uri": src, "files_per_shard": 64},
        "backbone": {"model": model, "weights": "packaged"},
        "output": {"uri": out},
        "runtime": {"batch_size": batch, "cpus_per_actor": cpus, "calls_per_actor": calls, "progress": False},
    })
    s = extract(cfg, overwrite=True)
    return s["timings"]["run_s"]


def bench_ray_pattern(model: str, src: str, batch: int, cpus: int) -> float:
    import ray

    from pipeline.backbones import build_backbone
    from pipeline.config import BackboneConfig

    class Model:
        def __init__(self):
            self.b = build_backbone(BackboneConfig(model=model, weights="packaged"))

        def __call__(self, batch):
            import torch
            from PIL import Image

            x = torch.stack([self.b.transform(Image.fromarray(a)) for a in batch["image"]])
            with torch.inference_mode():
                return {"embedding": self.b.embed(x).numpy()}

    from ray.data import ActorPoolStrategy

    t = time.perf_counter()
    ds = ray.data.read_images(src, mode="RGB").map_batches(
        Model, compute=ActorPoolStrategy(size=1), batch_size=batch, num_cpus=cpus)
    ds.materialize()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--images", type=int, default=256, help="N; the pipeline also runs 2N")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--source", choices=["local", "s3"], default="local")
    ap.add_argument("--runs", type=int, default=3, help="pipeline runs per size (medians are used)")
    args = ap.parse_args(argv)

    import ray
    import torch

    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    n1, n2 = args.images, 2 * args.images
    files = make_jpegs(work / "all", n2)
    small = work / "small"
    small.mkdir()
    for f in files[:n1]:
        os.link(f, small / f.name)

    # The machine is shared and noisy: the ceiling and the Embedder are measured before, between and after
    # the Ray runs, and their medians are used.
    forward, embedder = [], []

    def measure_local() -> None:
        forward.append(bench_forward(args.model, args.batch_size, args.repeats))
        embedder.append(bench_embedder(args.model, files, args.batch_size, args.repeats))

    rows: dict[str, float] = {}
    measure_local()

    from contextlib import nullcontext

    from pipeline.s3local import local_s3

    with (local_s3() if args.source == "s3" else nullcontext()) as s3:
        if s3 is not None:
            bucket = s3.make_bucket("bench")
            s3.upload_dir(str(work / "all"), f"{bucket}/all")
            s3.upload_dir(str(small), f"{bucket}/small")
            src1, src2, out = f"{bucket}/small", f"{bucket}/all", f"{bucket}/out"
        else:
            src1, src2, out = str(small), str(work / "all"), str(work / "out")
        # Logical CPUs: the actor takes every core, read tasks a fraction (they wait on I/O).
        ray.init(num_cpus=cpus + 1, include_dashboard=False, log_to_driver=False)
        # Medians over --runs runs at each size; the slope between the sizes is the steady-state rate.
        def steady(calls: int) -> tuple[float, float, float]:
            t1 = statistics.median(bench_pipeline(args.model, src1, out, args.batch_size, cpus, calls)
                                   for _ in range(args.runs))
            t2 = statistics.median(bench_pipeline(args.model, src2, out, args.batch_size, cpus, calls)
                                   for _ in range(args.runs))
            rate = (n2 - n1) / max(t2 - t1, 1e-9)
            return rate, t1 - n1 / rate, n2 / t2

        # A warm-up run first: Ray's first dataset pays for worker processes and imports, which would
        # otherwise land in the small size only and inflate the slope.
        bench_pipeline(args.model, src1, out, args.batch_size, cpus)
        rows["pipeline"], startup, whole = steady(2)
        measure_local()
        rows["pipeline-1call"] = steady(1)[0]  # no decode/model overlap inside the actor
        p_small = statistics.median(bench_ray_pattern(args.model, str(small), args.batch_size, cpus)
                                    for _ in range(args.runs))
        p_large = statistics.median(bench_ray_pattern(args.model, str(work / "all"), args.batch_size, cpus)
                                    for _ in range(args.runs))
        rows["ray-pattern"] = (n2 - n1) / max(p_large - p_small, 1e-9)
        ray.shutdown()
    measure_local()
    rows = {"forward": statistics.median(forward), "embedder": statistics.median(embedder), **rows}

    ceiling = rows["forward"]
    print(f"model {args.model}, batch {args.batch_size}, {cpus} CPU cores, torch {torch.__version__}, "
          f"ray {ray.__version__}, source {args.source}, images {n1}/{n2} (500x375 JPEG)")
    print(f"{'row':<15} {'images/s':>9} {'x ceiling':>10}")
    for name, rate in rows.items():
        print(f"{name:<15} {rate:>9.1f} {rate / ceiling:>10.2f}")
    print(f"forward samples {', '.join(f'{v:.1f}' for v in forward)}; "
          f"embedder samples {', '.join(f'{v:.1f}' for v in embedder)}")
    print(f"pipeline start-up (actor + model load), excluded above: {startup:.1f}s; whole {n2}-image run "
          f"with start-up: {whole:.1f} images/s; pipeline vs ray-pattern: "
          f"{rows['pipeline'] / rows['ray-pattern']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
