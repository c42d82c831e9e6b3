"""Throughput benchmark: what a user gets from `pipeline extract`, beside the fastest forward of the same
model on the same machine, measured in one run.

    python -m bench.throughput --model tf_efficientnet_lite0 [--images 512] [--device cpu|cuda] \
        [--weights packaged|none] [--compare runtime.autocast=none ...]

Rows (same model and machine):
  forward-eager-fp32        pre-sized tensors through the model, eager fp32 (the old reference); every
                            forward row is the better of one forward per batch and, on CPU, forwards of
                            the planner's size for that precision (runtime.forward_batch)
  forward-cl-fp32           the same in channels-last
  forward-cl-bf16           channels-last with bf16 autocast
  forward-cl-bf16-compiled  and torch.compile
  forward-folded-*          the same with BatchNorm folded into the convolutions and, eager on CPU, each
                            ReLU run inside its convolution, as the actors prepare it
                            (pipeline/backbone/inference.py)
  forward-planned           the model as the pipeline's actors run it: folded, the planner's precision
                            (e.g. bf16-stem-fp32 for tf_efficientnet_lite0), channels-last, not compiled
  forward-planned-compiled  and torch.compile: the fastest forward that keeps the planner's precision bound
                            (what a long run, where compile pays, can reach at most)
  forward-planned-per-core  forward-planned in one one-thread process per core at once (CPU): the layout
                            of the CPU actors, without decoding, Ray or writing
  The fastest forward row of all is the ceiling the ratios use.
  pipeline (defaults)       `pipeline extract --source DIR --output OUT --model M` run as a subprocess with
                            no runtime flags (Ray started by the command, the planner's choices); steady
                            state from the slope between N and 3N images, so start-up cancels
  pipeline <overrides>      the same with --set overrides (--compare), for comparison
  ray-pattern               Ray Data's documented pattern: read_images (decode in read tasks) -> actor pool

resnet50 and other models without packaged weights: pass --weights none (random init runs at the same
speed). On a GPU, time is taken after torch.cuda.synchronize(), after a warm-up.
"""

from __future__ import annotations

import argparse
import functools
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

    from pipeline.backbone.inference import AUTOCAST_MODES

    dtype = AUTOCAST_MODES[autocast][0]
    return torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)


def planned_forward_batch(b, autocast: str, batch: int, device: str) -> int:
    """The forward size the planner gives this model and precision (pipeline/plan.py: FORWARD_BYTES)."""
    from pipeline.backbone.inference import activation_bytes
    from pipeline.plan import cpu_forward_batch

    return cpu_forward_batch(activation_bytes(b)[autocast], batch) if device == "cpu" else batch


def _forward_runner(model: str, weights: str, batch: int, device: str, autocast: str, channels_last: bool,
                    compiled: bool, folded: bool):
    """The cut model (final layer, pooled) and pre-sized tensors already on the device: returns ``run(step)``,
    which puts ``batch`` images through in forwards of ``step``, and the forward sizes worth measuring (the
    whole batch, and on CPU the planner's size for this precision)."""
    import torch

    from pipeline.allocator import tune_allocator
    from pipeline.backbone import build_backbone, compile_backbone, input_size
    from pipeline.backbone.inference import prepare_for_inference
    from pipeline.config import BackboneConfig

    tune_allocator()  # the actors' allocator settings (pipeline/allocator.py), for every forward row
    b = build_backbone(BackboneConfig(model=model, weights=weights), device)
    sizes = sorted({batch, planned_forward_batch(b, autocast, batch, device)})
    if folded:  # as the Embedder prepares it: eager on CPU, each ReLU inside its convolution
        prepare_for_inference(b, autocast, fuse=device == "cpu" and not compiled)
    h, w = input_size(b.preprocessing)
    x = torch.randn(batch, 3, h, w, device=device)
    if channels_last:
        b.model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if compiled:
        compile_backbone(b)

    def run(step: int) -> None:
        with torch.inference_mode(), _amp(device, autocast):
            for i in range(0, batch, step):
                b.embed(x[i:i + step]).float().cpu()
    return run, sizes


def bench_forward(model: str, weights: str, batch: int, repeats: int, device: str = "cpu",
                  autocast: str = "none", channels_last: bool = False, compiled: bool = False,
                  folded: bool = False) -> dict[int, float]:
    """Pre-sized tensors through the cut model on every core: a ceiling. ``batch`` images per call, run in
    one forward and in forwards of the planner's size for this precision (on CPU); images/s for each
    forward size."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    run, sizes = _forward_runner(model, weights, batch, device, autocast, channels_last, compiled, folded)
    return {step: _median_rate(functools.partial(run, step), batch, repeats) for step in sizes}


def _per_core_worker(args: tuple, barrier, results) -> None:
    """One process of :func:`bench_forward_per_core`: one torch thread, the planner's forward size."""
    import torch

    model, weights, batch, autocast, seconds = args
    torch.set_num_threads(1)
    run, sizes = _forward_runner(model, weights, batch, "cpu", autocast, True, False, True)
    step = min(sizes)
    run(step)
    barrier.wait()  # all processes compute at once, as the actors do
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        run(step)
        n += batch
    results.put((n / (time.perf_counter() - t), step))


def bench_forward_per_core(model: str, weights: str, batch: int, autocast: str, procs: int,
                           seconds: float = 20.0) -> tuple[float, int]:
    """The forward as the CPU actors run it (folded, the planner's precision and forward size,
    channels-last, eager), in ``procs`` one-thread processes at once: images/s summed over them. What the
    actors' layout can compute at most, without decoding, Ray or writing. Returns (images/s, forward size)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_per_core_worker, args=((model, weights, batch, autocast, seconds), barrier,
                                                      results)) for _ in range(procs)]
    for p in ps:
        p.start()
    got = [results.get(timeout=1800) for _ in ps]
    for p in ps:
        p.join()
    return sum(r for r, _ in got), got[0][1]


FORWARDS = {  # name: (autocast, channels_last, compiled, folded); "planned": the planner's precision
    "forward-eager-fp32": ("none", False, False, False),
    "forward-cl-fp32": ("none", True, False, False),
    "forward-cl-bf16": ("bf16", True, False, False),
    "forward-cl-bf16-compiled": ("bf16", True, True, False),
    "forward-folded-cl-fp32": ("none", True, False, True),
    "forward-folded-cl-bf16": ("bf16", True, False, True),
    "forward-folded-cl-bf16-compiled": ("bf16", True, True, True),
    "forward-planned": ("planned", True, False, True),
    "forward-planned-compiled": ("planned", True, True, True),
}


PER_CORE = "forward-planned-per-core"


def planned_autocast(model: str, weights: str, device: str) -> str:
    """The precision `pipeline extract` plans for this model on this machine (pipeline/plan.py)."""
    from pipeline.backbone import build_backbone
    from pipeline.backbone.inference import precision_agreement
    from pipeline.cluster import Cluster, NodeType, cpu_has_bf16
    from pipeline.config import BackboneConfig, RuntimeConfig
    from pipeline.plan import plan_images

    gpu = device == "cuda"
    node = NodeType(cpus=os.cpu_count() or 1, gpus=1.0 if gpu else 0.0)
    cluster = Cluster((node,), cpu_bf16=cpu_has_bf16())
    agreement = precision_agreement(build_backbone(BackboneConfig(model=model, weights=weights)))
    return plan_images(cluster, RuntimeConfig(), images=100, input_hw=(224, 224),
                       agreement=agreement).runtime.autocast


def bench_cli(model: str, weights: str, src: str, out: str, sets: list[str]) -> dict:
    """`pipeline extract` as a user runs it (Ray started by the command, the planner's defaults; ``sets``:
    extra --set overrides for comparison rows); returns the run summary."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pipeline", "extract", "--source", src, "--output", out, "--model", model,
           "--overwrite", "--json", "--set", "runtime.progress=false"]
    if weights != "packaged":
        cmd += ["--weights", weights]
    for kv in sets:
        cmd += ["--set", kv]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"pipeline extract failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def bench_ray_pattern(model: str, weights: str, src: str, batch: int, cpus: int, device: str = "cpu",
                      autocast: str = "none") -> float:
    """Ray Data's documented batch-inference pattern: decode in read tasks, transform + model in actors."""
    import ray

    from pipeline.backbone import build_backbone
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
    ap.add_argument("--images", type=int, default=512, help="N; the pipeline also runs 3N")
    ap.add_argument("--batch-size", type=int, default=None, help="forward rows; default: the planner's")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--runs", type=int, default=2, help="pipeline runs per size (medians are used)")
    ap.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="an extra pipeline row with these --set overrides (repeatable)")
    ap.add_argument("--no-ray-pattern", action="store_true", help="skip Ray Data's read_images row")
    args = ap.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    gpu = args.device == "cuda"
    cpus = os.cpu_count() or 1
    bs = args.batch_size or (256 if gpu else 32)
    model, weights = args.model, args.weights

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    n1, n2 = args.images, 3 * args.images
    files = make_jpegs(work / "all", n2)
    small = work / "small"
    small.mkdir()
    for f in files[:n1]:
        os.link(f, small / f.name)

    # The machine is shared and noisy: forwards are measured before and after the pipeline runs (medians).
    # Each row: the best of one forward of the whole batch and forwards of the planner's size (on CPU).
    forwards: dict[str, list[float]] = {k: [] for k in FORWARDS}
    best_step: dict[str, list[int]] = {k: [] for k in FORWARDS}

    planned = planned_autocast(model, weights, args.device)

    if not gpu and cpus > 1:
        forwards[PER_CORE], best_step[PER_CORE] = [], []

    def measure_forwards() -> None:
        for name, (amp, cl, comp, fold) in FORWARDS.items():
            amp = planned if amp == "planned" else amp
            by_step = bench_forward(model, weights, bs, args.repeats, args.device, amp, cl, comp, fold)
            step = max(by_step, key=by_step.get)
            forwards[name].append(by_step[step])
            best_step[name].append(step)
        if PER_CORE in forwards:
            rate, step = bench_forward_per_core(model, weights, bs, planned, cpus)
            forwards[PER_CORE].append(rate)
            best_step[PER_CORE].append(step)

    measure_forwards()

    def steady(sets: list[str]) -> tuple[float, dict]:
        """Steady-state images/s of `pipeline extract`: the slope of the run seconds between N and 3N images
        (Ray and actor start-up, the same at both sizes, cancel), medians over --runs; and a run summary."""
        t, summary, actors = {}, {}, {}
        for n, src in ((n1, small), (n2, work / "all")):
            runs = [bench_cli(model, weights, str(src), str(work / "out"), sets) for _ in range(args.runs)]
            t[n] = statistics.median(r["timings"]["run_s"] for r in runs)
            summary = runs[-1]
            actors[n] = summary["plan"]["settings"]["actors"]
        if actors[n1] != actors[n2]:  # a small run starts fewer actors (pipeline/plan.py): no steady state
            raise SystemExit(f"{n1} images run on {actors[n1]} actors and {n2} on {actors[n2]}: raise "
                             "--images until both sizes plan the same actors")
        return (n2 - n1) / max(t[n2] - t[n1], 1e-9), summary

    rows: dict[str, float] = {}
    rows["pipeline (defaults)"], summary = steady([])
    for extra in args.compare:
        rows[f"pipeline {extra}"] = steady(extra.split(","))[0]
    if not args.no_ray_pattern:
        import ray

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        p = [statistics.median(bench_ray_pattern(model, weights, str(src), bs, max(1, cpus - 1), args.device,
                                                 "bf16" if gpu else "none") for _ in range(args.runs))
             for src in (small, work / "all")]
        rows["ray-pattern"] = (n2 - n1) / max(p[1] - p[0], 1e-9)
        ray.shutdown()
    measure_forwards()

    fwd = {k: statistics.median(v) for k, v in forwards.items()}
    fastest_name = max(fwd, key=fwd.get)
    fastest = fwd[fastest_name]
    card = torch.cuda.get_device_name() if gpu else f"{cpus} CPU cores"
    import ray

    print(f"model {model} (weights {weights}), {args.device} ({card}), torch {torch.__version__}, "
          f"ray {ray.__version__}, images {n1}/{n2} (500x375 JPEG), forward batch {bs}")
    print(f"forward-planned runs autocast {planned}")
    print(f"planned by `pipeline extract` with no runtime flags: {'; '.join(summary['plan']['reasons'])}")
    print(f"{'row':<34} {'images/s':>9} {'x fastest':>10}")
    for name, rate in {**fwd, **rows}.items():
        print(f"{name:<34} {rate:>9.1f} {rate / fastest:>10.2f}")
    print(f"fastest forward: {fastest_name}; samples (forward size): "
          + "; ".join(f"{k} {', '.join(f'{v:.1f} ({n})' for v, n in zip(vals, best_step[k]))}"
                      for k, vals in forwards.items()))
    at = summary["actor_time_s"]
    print(f"last default run: {summary['counts']['embedded']} images, actor time decode "
          f"{at['decode']:.1f}s + model {at['forward']:.1f}s, run {summary['timings']['run_s']:.1f}s, "
          f"total {summary['timings']['total_s']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
