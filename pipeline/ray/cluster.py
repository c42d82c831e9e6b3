"""The cluster's shape for the planner (pipeline/plan.py), read from Ray, and waiting for capacity.

``cluster_shape`` turns Ray's node table (alive nodes) and the autoscaler's node groups (node types it may
start, with their maximum counts) into a plain ``pipeline.cluster.Cluster``. ``wait_for`` waits, on an
autoscaling cluster, until a node that fits one actor (or worker) is alive, saying what it waits for.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

import ray

from pipeline.cluster import Cluster, NodeType, cpu_has_bf16
from pipeline.config import ConfigError
from pipeline.ray import init_ray

_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


def _node_type(resources: dict[str, float], alive: int, max_count: int | None = None) -> NodeType:
    kind = next((k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), None)
    custom = {k: float(v) for k, v in resources.items()
              if k not in _BUILTIN and not k.startswith(("node:", "accelerator_type:"))}
    return NodeType(cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)),
                    memory_gib=float(resources.get("memory", 0)) / 2**30, resources=custom, gpu_kind=kind,
                    alive=alive, max_count=max_count)


def _signature(resources: dict[str, float]) -> tuple:
    return tuple(sorted((k, round(float(v), 3)) for k, v in resources.items()
                        if not k.startswith("node:") and k not in ("memory", "object_store_memory")))


def cluster_shape(runtime: Any) -> Cluster:
    """Alive nodes grouped by their resources, plus the autoscaler's node groups (none alive yet)."""
    init_ray(runtime)
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    groups = Counter(_signature(r) for r in alive)
    first = {_signature(r): r for r in alive}
    nodes = [_node_type(first[sig], count) for sig, count in groups.items()]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state: a fixed cluster
        config = None
    for group in getattr(config, "node_group_configs", None) or []:
        resources = dict(group.resources)
        if group.max_count != 0 and resources:
            nodes.append(_node_type(resources, alive=0, max_count=group.max_count))
    return Cluster(tuple(nodes), cpu_bf16=cpu_has_bf16(), autoscaling=runtime.autoscaling)


def _fits_now(need: dict[str, float]) -> bool:
    for n in ray.nodes():
        if n.get("Alive") and all(n["Resources"].get(k, 0) >= v for k, v in need.items() if v > 0):
            return True
    return False


def wait_for(need: dict[str, float], runtime: Any, what: str, flag: str) -> None:
    """Wait until a node that fits ``need`` is alive; ConfigError after ``runtime.resource_wait_s``."""
    text = ", ".join(f"{k}: {v:g}" for k, v in need.items() if v)
    deadline = time.monotonic() + runtime.resource_wait_s
    said = 0.0
    while not _fits_now(need):
        now = time.monotonic()
        if now >= deadline:
            raise ConfigError(
                f"no node with {{{text}}} for one {what} came up within runtime.resource_wait_s="
                f"{runtime.resource_wait_s:g}s: check the autoscaler (ray status), raise "
                f"runtime.resource_wait_s, or change {flag}")
        if runtime.progress and now - said >= 30:
            print(f"waiting for the autoscaler to start a node with {{{text}}} for one {what} "
                  f"({deadline - now:.0f}s left)", file=sys.stderr)
            said = now
        time.sleep(1.0)
