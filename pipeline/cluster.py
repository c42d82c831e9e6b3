"""The cluster as plain data for the planner (pipeline/plan.py): its node types, what each has, how many are
alive and how many the autoscaler may start, and what the CPUs and GPUs compute natively.
``pipeline.ray.cluster`` builds a ``Cluster`` from Ray's node table; tests give shapes by hand."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# GPUs without native bf16 (compute capability < 8.0); Ray's accelerator_type names.
NO_BF16_GPUS = ("V100", "T4", "P100", "P4", "K80", "M60", "P40", "K40")


@dataclass(frozen=True)
class NodeType:
    """One kind of node: its resources, how many are alive, and how many the autoscaler may run."""

    cpus: float
    gpus: float = 0.0
    memory_gib: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom resources
    gpu_kind: str | None = None  # Ray's accelerator_type, e.g. "H100"
    alive: int = 1
    max_count: int | None = None  # None: fixed at ``alive``; -1: unlimited

    @property
    def most(self) -> int:
        if self.max_count is None:
            return self.alive
        return 10**6 if self.max_count < 0 else max(self.alive, self.max_count)


@dataclass(frozen=True)
class Cluster:
    """The node types of a Ray cluster, and what the driver's CPU computes natively."""

    nodes: tuple[NodeType, ...]
    cpu_bf16: bool = False  # AVX-512 BF16 or AMX on the CPUs (read on the driver)
    autoscaling: bool | None = None  # None: the node types say it (a type may grow past its alive count)

    @property
    def scales(self) -> bool:
        if self.autoscaling is not None:
            return self.autoscaling
        return any(n.most > n.alive for n in self.nodes)

    def gpu_nodes(self) -> list[NodeType]:
        return [n for n in self.nodes if n.gpus > 0]

    def total(self, key: str, at_most: bool = False) -> float:
        return sum(amount(n, key) * (n.most if at_most else n.alive) for n in self.nodes)

    def fits(self, need: dict[str, float]) -> list[NodeType]:
        """The node types one bundle of ``need`` fits on."""
        return [n for n in self.nodes if all(amount(n, k) >= v for k, v in need.items() if v > 0)]


def amount(node: NodeType, key: str) -> float:
    """How much of resource ``key`` (CPU, GPU or a custom one) one node of this type has."""
    if key == "CPU":
        return node.cpus
    if key == "GPU":
        return node.gpus
    return node.resources.get(key, 0.0)


CPU_BF16_ENV = "PIPELINE_CPU_BF16"  # "0": plan as on a CPU without native bf16; "1": as on one with it


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU computes bf16 natively (AVX-512 BF16 or AMX), from /proc/cpuinfo;
    $PIPELINE_CPU_BF16 (0 or 1) overrides the flags, to plan (and test) as the other kind of CPU would."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def gpu_bf16(kind: str | None) -> bool:
    return not (kind and any(old in kind for old in NO_BF16_GPUS))
