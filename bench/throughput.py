"""Throughput benchmark: how close the pipeline gets to the bare model forward, measured in one run.

    python -m bench.throughput --model tf_efficientnet_lite0 --images 256 [--batch-size 32] \
        [--source local|s3] [--device cpu|cuda] [--weights packaged|none] [--autocast none|bf16|fp16]

Rows (same model, batch size, dtype and machine):
  forward         pre-decoded, pre-sized tensors through the cut model: the ceiling
  embedder-pil    the Embedder on encoded JPEG bytes (decode + preprocess + forward + pool), no Ray, with
                  runtime.decoder=pil (PIL decode and transform per image, in the actor's threads)
  embedder-tensor the same with runtime.decoder=tensor (torchvision/nvjpeg decode, batched tensor resize)
  pipeline        the full run through Ray with the defaults for the device: shards -> read tasks ->
                  Embedder actor -> Parquet; steady state from two sizes (N and 2N), so Ray start-up and
                  model load are reported separately
  pipeline-<d>    the same with the other decoder
  pipeline-<k>call  the same with the other number of batches per actor (1 vs 2: decode/model overlap)
  ray-pattern     the documented Ray Data pattern: read_images (decode in read tasks) -> actor pool, same
                  model, device and autocast
and the peak RSS of the driver, the Embedder actor and all Ray workers during the default pipeline runs.

resnet50 and other models without packaged weights: pass --weights none (random init runs at the same
speed). On a GPU, time is taken after torch.cuda.synchronize(), after a warm-up.
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


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    _sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return n_images / statistics.median(times)


def _amp(device: str, autocast: str):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None and device == "cuda")


def bench_forward(model: str, weights: str, batch: int, repeats: int, device: str = "cpu",
                  autocast: str = "none") -> float:
    """The ceiling: pre-sized tensors already on the device, the Embedder's model settings."""
    import torch

    from pipeline.backbones import build_backbone, input_size
    from pipeline.config import BackboneConfig

    b = build_backbone(BackboneConfig(model=model, weights=weights), device)
    h, w = input_size(b.preprocessing)
    x = torch.randn(batch, 3, h, w, device=device)
    if device == "cuda":  # as the Embedder runs it there
        b.model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode(), _amp(device, autocast):
            b.embed(x).float().cpu()
    return _median_rate(run, batch, repeats)


def bench_embedder(model: str, weights: str, files: list[Path], batch: int, repeats: int,
                   device: str = "cpu", autocast: str = "none", decoder: str = "pil") -> float:
    from pipeline.embed import Embedder
    from pipeline.sources import rows_from_bytes

    e = Embedder({"model": model, "weights": weights},
                 {"device": device, "autocast": autocast, "decoder": decoder})
    table = rows_from_bytes([f.read_bytes() for f in files[:batch]])
    return _median_rate(lambda: e(table), batch, repeats)


def bench_pipeline(model: str, weights: str, src: str, out: str, batch: int, cpus: int,
                   runtime: dict | None = None) -> float:
    """One extract run; returns its run time (start-up included). ``runtime``: overrides."""
    from pipeline.commands.extract import extract
    from pipeline.config import ExtractConfig

    cfg = ExtractConfig.model_validate({
        "source": {"uri": src, "files_per_shard": 64},
        "backbone": {"model": model, "weights": weights},
        "output": {"uri": out},
        "runtime": {"batch_size": batch, "cpus_per_actor": cpus, "progress": False, **(runtime or {})},
    })
    s = extract(cfg, overwrite=True)
    return s["timings"]["run_s"]


def bench_ray_pattern(model: str, weights: str, src: str, batch: int, cpus: int, device: str = "cpu",
                      autocast: str = "none") -> float:
    """Ray Data's documented batch-inference pattern: decode in read tasks, transform + model in actors."""
    import ray

    from pipeline.backbones import build_backbone
    from pipeline.config import BackboneConfig

    class Model:
        def __init__(self):
            self.b = build_backbone(BackboneConfig(model=model, weights=weights), device)

        def __call__(self, batch):
            import torch
            from PIL import Image

            x = torch.stack([self.b.transform(Image.fromarray(a)) for a in batch["image"]]).to(device)
            with torch.inference_mode(), _amp(device, autocast):
                return {"embedding": self.b.embed(x).float().cpu().numpy()}

    from ray.data import ActorPoolStrategy

    t = time.perf_counter()
    ds = ray.data.read_images(src, mode="RGB").map_batches(
        Model, compute=ActorPoolStrategy(size=1), batch_size=batch, num_cpus=cpus,
        num_gpus=1 if device == "cuda" else None)
    ds.materialize()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default="packaged", help="packaged | none (random init, same speed) | hub")
    ap.add_argument("--images", type=int, default=256, help="N; the pipeline also runs 2N")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--source", choices=["local", "s3"], default="local")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--autocast", choices=["none", "bf16", "fp16"], default=None,
                    help="default: bf16 on cuda, none on cpu")
    ap.add_argument("--runs", type=int, default=3, help="pipeline runs per size (medians are used)")
    args = ap.parse_args(argv)

    import ray
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    autocast = args.autocast or ("bf16" if args.device == "cuda" else "none")
    cpus = os.cpu_count() or 1
    gpu = args.device == "cuda"
    # CPU: the actor takes every core (read tasks get the extra logical CPU and wait on I/O).
    # GPU: three quarters of the cores decode in the actor, the rest read and write.
    actor_cpus = max(1, cpus * 3 // 4) if gpu else cpus
    base = {"device": args.device, "autocast": autocast, "gpus_per_actor": 1 if gpu else 0}
    default_calls = 2 if gpu else 1
    default_decoder = "tensor" if gpu else "pil"
    other_decoder = "pil" if gpu else "tensor"
    model, weights, bs = args.model, args.weights, args.batch_size

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    n1, n2 = args.images, 2 * args.images
    files = make_jpegs(work / "all", n2)
    small = work / "small"
    small.mkdir()
    for f in files[:n1]:
        os.link(f, small / f.name)

    # The machine is shared and noisy: the ceiling and the Embedder are measured before, between and after
    # the Ray runs, and their medians are used.
    local: dict[str, list[float]] = {"forward": [], "embedder-pil": [], "embedder-tensor": []}

    def measure_local() -> None:
        local["forward"].append(bench_forward(model, weights, bs, args.repeats, args.device, autocast))
        for dec in ("pil", "tensor"):
            local[f"embedder-{dec}"].append(
                bench_embedder(model, weights, files, bs, args.repeats, args.device, autocast, dec))

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
        ray.init(num_cpus=cpus + 1, include_dashboard=False, log_to_driver=False)

        def run(src: str, overrides: dict) -> float:
            return bench_pipeline(model, weights, src, out, bs, actor_cpus, {**base, **overrides})

        # Medians over --runs runs at each size; the slope between the sizes is the steady-state rate.
        def steady(overrides: dict) -> tuple[float, float, float]:
            t1 = statistics.median(run(src1, overrides) for _ in range(args.runs))
            t2 = statistics.median(run(src2, overrides) for _ in range(args.runs))
            rate = (n2 - n1) / max(t2 - t1, 1e-9)
            return rate, t1 - n1 / rate, n2 / t2

        # A warm-up run first: Ray's first dataset pays for worker processes and imports, which would
        # otherwise land in the small size only and inflate the slope.
        run(src1, {})
        from bench.memory import MIB, RssSampler

        with RssSampler() as rss:  # peak memory while the default pipeline runs
            rows["pipeline"], startup, whole = steady({})
        measure_local()
        rows[f"pipeline-{other_decoder}"] = steady({"decoder": other_decoder})[0]
        other_calls = 3 - default_calls
        rows[f"pipeline-{other_calls}call"] = steady({"calls_per_actor": other_calls})[0]
        p_small = statistics.median(bench_ray_pattern(model, weights, str(small), bs, actor_cpus, args.device,
                                                      autocast) for _ in range(args.runs))
        p_large = statistics.median(bench_ray_pattern(model, weights, str(work / "all"), bs, actor_cpus,
                                                      args.device, autocast) for _ in range(args.runs))
        rows["ray-pattern"] = (n2 - n1) / max(p_large - p_small, 1e-9)
        ray.shutdown()
    measure_local()
    rows = {k: statistics.median(v) for k, v in local.items()} | rows

    ceiling = rows["forward"]
    card = torch.cuda.get_device_name() if gpu else f"{cpus} CPU cores"
    print(f"model {model} (weights {weights}), batch {bs}, {args.device} ({card}), autocast {autocast}, "
          f"torch {torch.__version__}, ray {ray.__version__}, source {args.source}, images {n1}/{n2} "
          f"(500x375 JPEG); pipeline defaults: decoder {default_decoder}, {default_calls} call(s) per actor, "
          f"{actor_cpus} CPUs per actor")
    print(f"{'row':<16} {'images/s':>9} {'x ceiling':>10}")
    for name, rate in rows.items():
        print(f"{name:<16} {rate:>9.1f} {rate / ceiling:>10.2f}")
    for name, vals in local.items():
        print(f"{name} samples: {', '.join(f'{v:.1f}' for v in vals)}")
    actor_mib = max((m.rss for role, m in rss.role_peak.items() if role.startswith("MapWorker")), default=0)
    print(f"peak RSS during the default pipeline runs: driver {rss.driver_peak / MIB:.0f} MiB, Embedder "
          f"actor {actor_mib / MIB:.0f} MiB, all of this Ray's workers {rss.workers_peak / MIB:.0f} MiB")
    print(f"pipeline start-up (actor + model load), excluded above: {startup:.1f}s; whole {n2}-image run "
          f"with start-up: {whole:.1f} images/s; pipeline vs ray-pattern: "
          f"{rows['pipeline'] / rows['ray-pattern']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
