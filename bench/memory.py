"""Memory benchmark: peak RSS of the driver and of the Ray workers at N and at 10xN images.

    python -m bench.memory --images 100 [--factor 10] [--model tf_efficientnet_lite0] [--trace FILE.csv]

A streaming run holds a bounded number of batches in flight, so its peak memory should not grow with the
number of images. A sampler thread reads the RSS of this process (the driver) and of every worker process of
the Ray it started (read tasks, Embedder actors, write tasks; not those of another Ray on the same machine)
every 0.1 s; the first table shows the peaks at both sizes and their ratio. Each size runs in a fresh Ray.

RSS counts every page a process has resident, including pages it shares with others: the Ray object store
(plasma, a shared-memory mapping that every worker touching a block maps) and the shared libraries (torch,
pyarrow). Summed over processes, those pages count once per process. So the sampler also takes from each
RSS (Linux, /proc/PID/status) the private part (RssAnon: heap, Python objects, tensors) and the shmem part
(RssShmem: object store pages); the rest is mapped files (libraries). The second table breaks the workers'
peak down by role, the process title after ``ray::`` (``MapWorker(...)`` for the actors, the read and write
task names, ``IDLE`` for pooled workers with nothing to run), at the instant the RSS sum peaked, and gives
the number of worker processes alive then and at most. ``--trace`` writes every sample to a CSV.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


@dataclass
class Mem:
    """Resident memory of one process or a sum of processes, in bytes."""

    rss: int = 0
    private: int = 0  # RssAnon
    shmem: int = 0  # RssShmem: on a Ray node, mostly object store pages
    procs: int = 0

    def __add__(self, other: Mem) -> Mem:
        return Mem(self.rss + other.rss, self.private + other.private, self.shmem + other.shmem,
                   self.procs + other.procs)

    def max(self, other: Mem) -> Mem:
        """Field by field: each peak at its own instant."""
        return Mem(max(self.rss, other.rss), max(self.private, other.private), max(self.shmem, other.shmem),
                   max(self.procs, other.procs))


def proc_mem(pid: int, rss: int, shared: int) -> Mem:
    """RSS split from /proc/PID/status; elsewhere private is RSS minus psutil's ``shared``, shmem unknown."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        kib = {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssShmem")}
        return Mem(kib["VmRSS"], kib["RssAnon"], kib["RssShmem"], 1)
    except (OSError, KeyError, ValueError):
        return Mem(rss, rss - shared, 0, 1)


def role_of(title: str) -> str:
    """The role of a Ray worker: its process title after ``ray::`` up to the first space, without the method
    an actor is running (``ray::MapWorker(MapBatches(E)).submit`` -> ``MapWorker(MapBatches(E))``)."""
    title = title.removeprefix("ray::").split(" ", 1)[0]
    return re.sub(r"\.[A-Za-z_]\w*$", "", title) or "?"


class RssSampler:
    """Peak RSS of this process and of its Ray worker processes (``ray::`` in their title), sampled."""

    def __init__(self, interval: float = 0.1, trace: bool = False) -> None:
        import importlib

        import ray  # noqa: F401 - puts Ray's bundled psutil on the path

        self._psutil = importlib.import_module("psutil")
        self.interval = interval
        self.driver_peak = 0
        self.workers_peak = 0  # the largest sum over all worker processes at one instant
        self.worker_max = 0  # the largest single worker process
        self.private_peak = 0  # the largest sum of private (anonymous) memory over the workers
        self.shmem_peak = 0  # the largest sum of shared-memory pages (object store) over the workers
        self.max_procs = 0  # the most worker processes alive at one instant
        self.at_peak: dict[str, Mem] = {}  # per role, at the instant workers_peak was sampled
        self.role_peak: dict[str, Mem] = {}  # per role, the peaks of its sums over the run
        self.peak_t = 0.0  # seconds from the start of sampling to workers_peak
        self.samples: list[tuple[float, str, Mem]] | None = [] if trace else None  # (t, role, sum)
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = self._psutil.Process()
        self.driver_peak = max(self.driver_peak, me.memory_info().rss)
        roles: dict[str, Mem] = {}
        # Only this process's descendants (its local Ray's raylet starts the workers): another Ray on the same
        # machine (a test run, a second benchmark) would otherwise be counted too.
        for p in me.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if not cmd.startswith("ray::"):
                    continue
                mi = p.memory_info()
            except self._psutil.Error:  # the process ended between listing and reading
                continue
            m = proc_mem(p.pid, mi.rss, mi.shared)
            role = role_of(cmd)
            roles[role] = roles.get(role, Mem()) + m
            self.worker_max = max(self.worker_max, m.rss)
        t = time.perf_counter() - self._t0
        for role, m in roles.items():
            self.role_peak[role] = self.role_peak.get(role, Mem()).max(m)
            if self.samples is not None:
                self.samples.append((t, role, m))
        total = sum(roles.values(), Mem())
        if total.rss > self.workers_peak:
            self.workers_peak, self.at_peak, self.peak_t = total.rss, roles, t
        self.private_peak = max(self.private_peak, total.private)
        self.shmem_peak = max(self.shmem_peak, total.shmem)
        self.max_procs = max(self.max_procs, total.procs)

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


def run_once(model: str, src: str, out: str, batch: int, trace: bool = False) -> dict[str, Any]:
    from pipeline.commands.extract import extract
    from pipeline.config import ExtractConfig

    cfg = ExtractConfig.model_validate({
        "source": {"uri": src, "files_per_shard": 64},
        "backbone": {"model": model, "weights": "packaged"},
        "output": {"uri": out},
        "runtime": {"batch_size": batch, "progress": False},
    })
    with RssSampler(trace=trace) as s:
        summary = extract(cfg, overwrite=True)
    return {"images": summary["counts"]["inputs"], "seconds": summary["timings"]["run_s"],
            "driver_mib": s.driver_peak / MIB, "workers_mib": s.workers_peak / MIB,
            "largest_worker_mib": s.worker_max / MIB, "private_mib": s.private_peak / MIB,
            "shmem_mib": s.shmem_peak / MIB, "max_procs": s.max_procs, "at_peak": s.at_peak,
            "role_peak": s.role_peak, "peak_t": s.peak_t, "samples": s.samples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--images", type=int, default=100, help="N; the second run has factor x N")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--trace", type=Path, help="write every sample (per size, time and role) to this CSV")
    args = ap.parse_args(argv)

    import ray

    from bench.throughput import make_jpegs

    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    n1, n2 = args.images, args.images * args.factor
    files = make_jpegs(work / "large", n2)
    (work / "small").mkdir()
    for f in files[:n1]:
        os.link(f, work / "small" / f.name)

    rows = []
    for name in ("small", "large"):
        # A fresh Ray per size: in a shared one the second run would start while the first run's actor is
        # still shutting down, and would inherit the worker processes the first run's tasks left in the pool.
        ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False)
        time.sleep(2)  # let Ray's own processes settle before sampling
        rows.append(run_once(args.model, str(work / name), str(work / f"out-{name}"), args.batch_size,
                             trace=args.trace is not None))
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
    print_breakdown(rows)
    if args.trace:
        write_trace(args.trace, rows)
    return 0


def write_trace(path: Path, rows: list[dict[str, Any]]) -> None:
    """One CSV line per sample and role: images, seconds after extract() was called, role, procs, MiB."""
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["images", "t_s", "role", "procs", "rss_mib", "private_mib", "shmem_mib"])
        for r in rows:
            for t, role, m in r["samples"]:
                w.writerow([r["images"], f"{t:.2f}", role, m.procs, f"{m.rss / MIB:.1f}",
                            f"{m.private / MIB:.1f}", f"{m.shmem / MIB:.1f}"])


def print_breakdown(rows: list[dict[str, Any]]) -> None:
    """Per size and role: the workers at the instant their RSS sum peaked, and the role's own peaks."""
    print("\nworkers by role, MiB: at the instant of the workers' peak RSS sum (procs, rss, private = "
          "RssAnon, shmem = RssShmem: object store pages), and each role's own peaks over the run "
          "(max procs, max rss)")
    print(f"{'images':>7} {'role':<40} {'procs':>5} {'rss':>7} {'private':>7} {'shmem':>7} "
          f"{'max procs':>9} {'max rss':>7}")
    for r in rows:
        at_peak: dict[str, Mem] = r["at_peak"]
        role_peak: dict[str, Mem] = r["role_peak"]
        for role in sorted(role_peak, key=lambda k: (-at_peak.get(k, Mem()).rss, -role_peak[k].rss)):
            m, top = at_peak.get(role, Mem()), role_peak[role]
            print(f"{r['images']:>7} {role[:40]:<40} {m.procs:>5} {m.rss / MIB:>7.0f} "
                  f"{m.private / MIB:>7.0f} {m.shmem / MIB:>7.0f} {top.procs:>9} {top.rss / MIB:>7.0f}")
        total = sum(at_peak.values(), Mem())
        print(f"{r['images']:>7} {'all workers':<40} {total.procs:>5} {total.rss / MIB:>7.0f} "
              f"{total.private / MIB:>7.0f} {total.shmem / MIB:>7.0f} {r['max_procs']:>9} "
              f"{r['workers_mib']:>7.0f}")
    a, b = rows
    for r in rows:
        print(f"{r['images']} images: RSS sum peaked {r['peak_t']:.1f} s after extract() was called; peak "
              f"sums over all workers, each at its own instant: private {r['private_mib']:.0f}, "
              f"shmem {r['shmem_mib']:.0f} MiB")
    print(f"ratio: private {b['private_mib'] / a['private_mib']:.2f}x, "
          f"worker processes at most {b['max_procs'] / a['max_procs']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
