"""Memory benchmark: peak RSS of the driver and of the Ray workers at N and at 10xN images.

    python -m bench.memory --images 100 [--factor 10] [--model tf_efficientnet_lite0]

A streaming run holds a bounded number of batches in flight, so its peak memory should not grow with the
number of images. A sampler thread reads the RSS of this process (the driver) and of every Ray worker
process (read tasks, Embedder actors, write tasks) every 0.1 s; the table shows the peaks at both sizes and
their ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path


class RssSampler:
    """Peak RSS of this process and of Ray worker processes (``ray::`` in their title), sampled."""

    def __init__(self, interval: float = 0.1) -> None:
        import importlib

        import ray  # noqa: F401 - puts Ray's bundled psutil on the path

        self._psutil = importlib.import_module("psutil")
        self.interval = interval
        self.driver_peak = 0
        self.workers_peak = 0  # the largest sum over all worker processes at one instant
        self.worker_max = 0  # the largest single worker process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = self._psutil.Process()
        self.driver_peak = max(self.driver_peak, me.memory_info().rss)
        total = 0
        for p in self._psutil.process_iter(["name", "cmdline", "memory_info"]):
            cmd = " ".join(p.info.get("cmdline") or [])
            if p.pid == me.pid or not cmd.startswith("ray::") or p.info.get("memory_info") is None:
                continue
            rss = p.info["memory_info"].rss
            total += rss
            self.worker_max = max(self.worker_max, rss)
        self.workers_peak = max(self.workers_peak, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a process vanished between listing and reading
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_once(model: str, src: str, out: str, batch: int) -> dict[str, float]:
    from pipeline.config import ExtractConfig
    from pipeline.runner import extract

    cfg = ExtractConfig.model_validate({
        "source": {"uri": src, "files_per_shard": 64},
        "backbone": {"model": model, "weights": "packaged"},
        "output": {"uri": out},
        "runtime": {"batch_size": batch, "progress": False},
    })
    with RssSampler() as s:
        summary = extract(cfg, overwrite=True)
    mib = 1024 * 1024
    return {"images": summary["counts"]["inputs"], "seconds": summary["timings"]["run_s"],
            "driver_mib": s.driver_peak / mib, "workers_mib": s.workers_peak / mib,
            "largest_worker_mib": s.worker_max / mib}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--images", type=int, default=100, help="N; the second run has factor x N")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    import ray

    from bench.throughput import make_jpegs

    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    n1, n2 = args.images, args.images * args.factor
    files = make_jpegs(work / "large", n2)
    (work / "small").mkdir()
    for f in files[:n1]:
        os.link(f, work / "small" / f.name)

    ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False)
    time.sleep(2)  # let Ray's own processes settle before sampling
    rows = [run_once(args.model, str(work / name), str(work / f"out-{name}"), args.batch_size)
            for name in ("small", "large")]
    ray.shutdown()

    print(f"model {args.model}, batch {args.batch_size}, {os.cpu_count()} CPU cores; peak RSS in MiB")
    print(f"{'images':>7} {'seconds':>8} {'driver':>8} {'workers':>8} {'largest':>8}")
    for r in rows:
        print(f"{r['images']:>7} {r['seconds']:>8.1f} {r['driver_mib']:>8.0f} {r['workers_mib']:>8.0f} "
              f"{r['largest_worker_mib']:>8.0f}")
    a, b = rows
    print(f"ratio {b['images'] / a['images']:.0f}x images: driver {b['driver_mib'] / a['driver_mib']:.2f}x, "
          f"workers {b['workers_mib'] / a['workers_mib']:.2f}x, "
          f"largest worker {b['largest_worker_mib'] / a['largest_worker_mib']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
