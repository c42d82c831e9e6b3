"""The resource planner: from the cluster's shape and the command, the runtime settings the user did not set.

Ray-free and deterministic: the cluster is plain data (``Cluster``, built from Ray's node table by
``pipeline.ray.cluster``), so every decision is unit-tested on shapes given by hand. Explicit settings
always win: only the fields a user left unset (``None`` or ``"auto"``) are chosen here, and each choice
comes with its reason, which the run record keeps.

Rules, in short (docs/operations.md explains them; bench/RESULTS.md, "Where the planner's constants were
measured", has the numbers behind each):
- GPUs anywhere in the cluster (alive, or in a node group the autoscaler may start): one actor per GPU,
  half of the node's CPUs per GPU for the actor (the rest for read and write tasks), the tensor decoder,
  channels-last, two batches in flight, bf16 autocast where the GPU computes it (fp16 on older cards).
- CPUs only: one-thread actors, one per CPU of each node but the ones kept for read tasks (fewer, with
  more threads each, where the node's memory cannot hold that many copies of the model); torch's threads
  set to the actor's CPUs; bf16 autocast and channels-last where the CPU computes bf16
  natively (AVX-512 BF16 or AMX), else fp32; the tensor decoder (faster than PIL's path on CPUs too)
  wherever it reproduces the model's transform; the model runs each batch in forwards of a size whose
  largest activation stays under 32 MiB (FORWARD_BYTES).
- A small run starts fewer actors: never more than the batches its images fill, and on CPUs one per
  CPU_ACTOR_START_FLOPS of the images' arithmetic (an actor's start-up costs about what one thread computes
  in that), counting the images the run embeds (a night's new ones), not the whole listing.
- bf16 (on GPUs and CPUs) only for a model whose bf16 embeddings of sample photos stay within cosine 0.999
  of fp32, measured when the run is planned. ResNets do; depthwise-separable networks (EfficientNet-Lite,
  MobileNet) lose more in their high-resolution early stages, so the next choice keeps the stem and first
  stage in fp32 and the rest in bf16 (``bf16-stem-fp32``); a model that loses too much even so stays fp32.
- ``compile: auto`` compiles when the images listed repay the compile cost (GPU costs and speed-ups
  measured on this project's machines, see COMPILE); on CPUs the eager forward, with each ReLU run inside
  its convolution, is as fast as the compiled one, so it stays eager.
- Fine-tuning: one worker per GPU; on CPUs, workers that leave CPUs for the Ray Data tasks feeding them.
- A request no node (or node group) can ever satisfy is a ConfigError that names the flag to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.cluster import Cluster, NodeType, amount, gpu_bf16
from pipeline.config import ConfigError, FinetuneRuntime, RuntimeConfig, parse_actors

READ_TASK_CPUS = 0.25  # read tasks wait on storage: a quarter CPU each lets several run beside the actors
MAX_THREADS_PER_CPU_ACTOR = 4  # past ~4 threads a CNN forward at batch 32 gains little per extra thread
# A CPU actor's memory: the process with torch, timm and Ray imported, decode buffers and a batch of 32 in
# the model, plus the model twice (its weights, and a copy while the BatchNorm fold is checked).
CPU_ACTOR_BASE_GIB = 1.2
ACTOR_MEMORY_SHARE = 0.8  # of a node's Ray `memory` resource, for the actors' copies of the model
# torch.compile: (seconds to compile in each actor, forward speed-up once compiled, images/s of an eager
# forward to price the saving). On CPU the eager forward runs each ReLU inside its convolution, which a
# compiled one does not; a speed-up of 1 keeps compile: auto off there.
COMPILE = {"cpu": (60.0, 1.0, 120.0), "cuda": (40.0, 1.6, 10_000.0)}
# A CPU forward's largest tensor stays under this: glibc serves larger blocks with mmap (its dynamic
# threshold stops at 32 MiB) and unmaps them when freed, so each forward page-faults them afresh.
FORWARD_BYTES = 32 * 2**20
# What one CPU thread computes while a CPU actor starts (imports torch and timm, builds the model and its
# rewrites: ~7 s on the 2-core machine, where one thread runs tf_efficientnet_lite0's 0.77 GFLOPs at ~25
# images/s): an actor is started only for images enough to repay that (~180 at 0.77 GFLOPs, ~17 of
# resnet50's 8.2; on 2 cores 2 actors overtake 1 between 210 and 510 images, bench/RESULTS.md "Actors").
CPU_ACTOR_START_FLOPS = 140e9
BF16_MIN_COSINE = 0.999  # bf16 autocast only for models whose embeddings keep this much of fp32's
# fastest first: all bf16, then bf16 with the stem and first stage in fp32
BF16_MODES = ("bf16", "bf16-stem-fp32")


@dataclass
class Decision:
    """The resolved runtime and why each unset setting got its value."""

    runtime: Any  # RuntimeConfig | FinetuneRuntime, every setting concrete
    reasons: list[str]
    waits_for: dict[str, float] | None = None  # one bundle the cluster must start before the run

    def record(self) -> dict[str, Any]:
        rt = self.runtime
        keys = ("actors", "cpus_per_actor", "gpus_per_actor", "threads", "calls_per_actor", "batch_size",
                "forward_batch", "decoder", "channels_last", "autocast", "compile", "workers",
                "cpus_per_worker", "gpus_per_worker")
        return {"settings": {k: getattr(rt, k) for k in keys if hasattr(rt, k)},
                "precision": precision_of(rt.autocast), "reasons": self.reasons}


def precision_of(autocast: str) -> str:
    return {"none": "fp32"}.get(autocast, autocast)


def _unset(rt: Any, name: str) -> bool:
    value = getattr(rt, name)
    return value is None or value == "auto"


def _check_bundle(cluster: Cluster, need: dict[str, float], flags: dict[str, str], what: str = "actor"
                  ) -> dict[str, float] | None:
    """ConfigError when no node type can ever hold one bundle; the bundle when none can right now (the
    autoscaler must start a node); None when an alive node can."""
    fits = cluster.fits(need)
    if not fits and cluster.autoscaling and not any(n.alive == 0 for n in cluster.nodes):
        # marked autoscaling, its node groups unknown: wait and see (resource_wait_s)
        return {k: v for k, v in need.items() if v > 0}
    if not fits:
        biggest = {k: max((amount(n, k) for n in cluster.nodes), default=0) for k in need}
        missing = [k for k, v in need.items() if v > biggest[k]]
        k = missing[0]
        scope = "node or node group" if cluster.scales else "node"
        have = f"the largest {scope} has {biggest[k]:g}" if biggest[k] else f"no {scope} has any"
        hint = "" if k in ("CPU", "GPU") else " (or start nodes that advertise it: ray start --resources)"
        flag = flags.get(k, flags["*"])
        raise ConfigError(f"each {what} asks for {k}: {need[k]:g} but {have}: change {flag}{hint}")
    if any(n.alive > 0 for n in fits):
        return None
    return {k: v for k, v in need.items() if v > 0}


def plan_images(cluster: Cluster, runtime: RuntimeConfig, *, images: int, input_hw: tuple[int, int],
                compilable: bool = True, agreement: dict[str, float] | None = None,
                device_kind: str | None = None, tensor_decodable: bool = True, model_bytes: int = 0,
                activations: dict[str, int] | None = None, flops: int = 0) -> Decision:
    """Settings for a command that maps images through the Embedder (extract, classify, probe).

    ``images``: how many the run lists (for compile: auto); ``compilable``: whether the cut can compile;
    ``tensor_decodable``: whether the tensor decoder reproduces the model's transform (tensorprep.py);
    ``model_bytes``: the model's parameter bytes (the memory each CPU actor holds, see cpu_actor_gib);
    ``activations``: per autocast mode, one image's largest activation in bytes (inference.activation_bytes;
    None: not measured), for the CPU forward batch (FORWARD_BYTES);
    ``flops``: one image's forward to the cut (Backbone.image_flops; 0: not measured), for the actor count;
    ``agreement``: per bf16 mode, the lowest cosine of this model's embeddings to its fp32 ones on sample
    photos (inference.precision_agreement; None: not measured) — the first of BF16_MODES that keeps
    BF16_MIN_COSINE, else fp32.
    """
    rt = runtime
    up: dict[str, Any] = {}
    why: list[str] = []
    gpu_nodes = cluster.gpu_nodes()
    use_gpu = (rt.gpus_per_actor or 0) > 0 if not _unset(rt, "gpus_per_actor") else \
        bool(gpu_nodes) and rt.device != "cpu"
    if rt.device == "cuda" and not gpu_nodes:
        raise ConfigError("runtime.device is cuda but no node (or node group) of this cluster has a GPU: "
                          "use --set runtime.device=auto, or run on a cluster with GPU nodes")
    if use_gpu and not gpu_nodes:
        raise ConfigError(f"--gpus-per-actor {rt.gpus_per_actor:g} asks for GPUs but no node (or node group) "
                          "of this cluster has one: drop --gpus-per-actor (the planner then runs on CPUs)")
    if use_gpu:
        device = "cuda"
        amp, amp_why = _plan_gpu_actors(cluster, rt, gpu_nodes, device_kind, up, why)
    else:
        device = "cpu"
        amp, amp_why = _plan_cpu_actors(cluster, rt, model_bytes, up, why)
    cpa = up.get("cpus_per_actor", rt.cpus_per_actor)
    if _unset(rt, "threads"):
        # a fractional CPU share still runs on whole cores: the read tasks beside it mostly wait on storage
        up["threads"] = max(1, math.ceil(cpa - 1e-9))
        why.append(f"{up['threads']} torch thread{'s' if up['threads'] > 1 else ''} per actor (its CPUs, set "
                   "explicitly)")
    if _unset(rt, "autocast"):
        if amp == "bf16" and agreement:
            amp, amp_why = _bf16_mode(agreement, amp_why)
        up["autocast"] = amp
        why.append(f"autocast {amp}: {amp_why}")
    _plan_layout(rt, device, tensor_decodable, up, why)
    _plan_batches(rt, device, input_hw, activations, up, why)
    if _unset(rt, "actors"):
        _repaid_actors(rt, device, images, flops, up, why)
    if _unset(rt, "compile"):
        _plan_compile(rt, device, images, compilable, up, why)
    if rt.device == "auto":
        up["device"] = device
    resolved = rt.model_copy(update=up)
    need = {"CPU": resolved.cpus_per_actor, "GPU": resolved.gpus_per_actor or 0.0,
            **resolved.actor_resources}
    waits = _check_bundle(cluster, need, {"CPU": "--set runtime.cpus_per_actor", "GPU": "--gpus-per-actor",
                                          "*": "--set runtime.actor_resources"})
    lo, hi = resolved.actor_range()
    why.insert(0, f"{lo if lo == hi else f'{lo}-{hi}'} actor{'s' if hi > 1 else ''} x "
                  f"{resolved.cpus_per_actor:g} CPU" + (f" + {resolved.gpus_per_actor:g} GPU"
                                                        if resolved.gpus_per_actor else ""))
    return Decision(resolved, why, waits)


def _plan_gpu_actors(cluster: Cluster, rt: RuntimeConfig, gpu_nodes: list[NodeType], device_kind: str | None,
                     up: dict[str, Any], why: list[str]) -> tuple[str, str]:
    """GPUs and CPUs per actor and the actor count for GPU actors, into ``up`` and ``why``; returns the
    autocast mode the GPU computes and why."""
    node = max(gpu_nodes, key=lambda n: (n.gpus, n.cpus))
    kind = node.gpu_kind or device_kind
    if _unset(rt, "gpus_per_actor"):
        up["gpus_per_actor"] = 1.0
        most = _count(cluster.total("GPU", True))
        more = f", up to {most} with the autoscaler" if cluster.scales else ""
        why.append(f"1 GPU per actor: {_count(cluster.total('GPU'))} GPUs alive{more}")
    gpa = up.get("gpus_per_actor", rt.gpus_per_actor)
    per_gpu_cpus = node.cpus / node.gpus
    if _unset(rt, "cpus_per_actor"):
        up["cpus_per_actor"] = max(1.0, math.floor(per_gpu_cpus * gpa / 2))
        why.append(f"{up['cpus_per_actor']:g} CPUs per actor: half of the {per_gpu_cpus:g} CPUs per GPU "
                   f"of a {kind or 'GPU'} node, the rest for read and write tasks")
    if _unset(rt, "actors"):
        lo = max(1, int(cluster.total("GPU") // gpa))
        hi = max(lo, int(min(cluster.total("GPU", True), 10**4) // gpa))
        up["actors"] = f"{lo},{hi}" if hi > lo else str(lo)
    bf16 = gpu_bf16(kind)
    return ("bf16", f"{kind or 'the GPU'} computes bf16") if bf16 else \
        ("fp16", f"{kind} has no bf16: fp16 autocast")


def _plan_cpu_actors(cluster: Cluster, rt: RuntimeConfig, model_bytes: int, up: dict[str, Any],
                     why: list[str]) -> tuple[str, str]:
    """CPUs per actor and the actor count for CPU-only actors, into ``up`` and ``why``; returns the
    autocast mode the CPU computes natively and why."""
    cpu_nodes = [n for n in cluster.nodes if n.cpus > 0]
    node = max(cpu_nodes, key=lambda n: n.cpus) if cpu_nodes else NodeType(cpus=1)
    if _unset(rt, "gpus_per_actor"):
        up["gpus_per_actor"] = 0.0
    usable = max(node.cpus - _read_reserve(node.cpus), 0.5)
    if _unset(rt, "cpus_per_actor"):
        per_node, mem_why = _cpu_actors_per_node(node, usable, model_bytes)
        up["cpus_per_actor"] = round(usable / per_node, 2)
        why.append(f"{up['cpus_per_actor']:g} CPUs per actor, {per_node} per {node.cpus:g}-CPU node: "
                   f"{_read_reserve(node.cpus):g} CPU kept for read tasks; " + mem_why)
    cpa = up.get("cpus_per_actor", rt.cpus_per_actor)
    if _unset(rt, "actors"):
        # (cpus_per_actor is rounded to 0.01: 14 CPUs / 4.67 still hold 3 actors)
        lo = max(1, int(sum(math.floor((n.cpus - _read_reserve(n.cpus)) / cpa + 0.01) * n.alive
                            for n in cpu_nodes)))
        hi = max(lo, int(sum(math.floor((n.cpus - _read_reserve(n.cpus)) / cpa + 0.01) * n.most
                             for n in cpu_nodes)))
        up["actors"] = f"{lo},{min(hi, 10**4)}" if hi > lo else str(lo)
    return ("bf16", "the CPU has AVX-512 BF16/AMX") if cluster.cpu_bf16 else \
        ("none", "the CPU has no native bf16: fp32")


def _bf16_mode(agreement: dict[str, float], amp_why: str) -> tuple[str, str]:
    """The first of BF16_MODES whose measured ``agreement`` keeps BF16_MIN_COSINE (else fp32), and why."""
    kept = [m for m in BF16_MODES if agreement.get(m, 0.0) >= BF16_MIN_COSINE]
    measured = ", ".join(f"{m} {agreement[m]:.4f}" for m in BF16_MODES if m in agreement)
    if kept:
        return kept[0], amp_why + f"; the sample photos' embeddings keep cosine to fp32 ({measured}; bound " \
                                  f"{BF16_MIN_COSINE})"
    return "none", (f"the sample photos' bf16 embeddings lose too much of fp32 "
                    f"({measured}; bound {BF16_MIN_COSINE}): this model stays in fp32")


def _plan_layout(rt: RuntimeConfig, device: str, tensor_decodable: bool, up: dict[str, Any],
                 why: list[str]) -> None:
    """Channels-last and the decoder, where unset, into ``up`` and ``why``."""
    if _unset(rt, "channels_last"):
        up["channels_last"] = True
        why.append("channels-last: " + ("faster convolutions with tensor cores" if device == "cuda" else
                                        "oneDNN's CPU convolutions prefer it"))
    if _unset(rt, "decoder"):
        up["decoder"] = "tensor" if tensor_decodable else "pil"
        why.append("decoder tensor: " + ("nvjpeg and batched resize on the GPU" if device == "cuda" else
                                         "libjpeg-turbo and batched resize, faster than PIL's per-image path")
                   if tensor_decodable else "decoder pil: the tensor decoder cannot reproduce this transform")


def _plan_batches(rt: RuntimeConfig, device: str, input_hw: tuple[int, int],
                  activations: dict[str, int] | None, up: dict[str, Any], why: list[str]) -> None:
    """Calls in flight per actor, the batch size and the forward batch, where unset, into ``up`` and
    ``why``."""
    if rt.calls_per_actor is None:
        up["calls_per_actor"] = 2 if device == "cuda" else 1
    if rt.batch_size is None:
        probe = rt.model_copy(update={"gpus_per_actor": up.get("gpus_per_actor", rt.gpus_per_actor)})
        up["batch_size"] = probe.batch_for(input_hw)
    if rt.forward_batch is None:
        batch = up.get("batch_size", rt.batch_size)
        amp_mode = up.get("autocast", rt.autocast)
        act = (activations or {}).get(amp_mode, 0)
        if device == "cpu" and act > 0:
            up["forward_batch"] = cpu_forward_batch(act, batch)
            why.append(f"forward batch {up['forward_batch']}: one image's largest activation is "
                       f"{act / 2**20:.1f} MiB in {precision_of(amp_mode)}, and a forward's tensors under "
                       f"{FORWARD_BYTES // 2**20} MiB are reused by the allocator instead of mapped afresh")
        else:
            up["forward_batch"] = batch


def _repaid_actors(rt: RuntimeConfig, device: str, images: int, flops: int, up: dict[str, Any],
                   why: list[str]) -> None:
    """Fewer actors than the cluster holds where the images listed cannot keep them busy, into ``up`` and
    ``why``: never more actors than batches, and on CPUs one actor per the images one thread embeds while
    an actor starts (CPU_ACTOR_START_FLOPS), so a small run (a night of a few changed images) starts one."""
    lo, hi = parse_actors(up["actors"])
    batch = up.get("batch_size", rt.batch_size)
    most = max(1, math.ceil(images / batch))
    reason = f"{images} images fill {most} batch{'es' if most > 1 else ''} of {batch}"
    if device == "cpu" and flops > 0:
        per_actor = max(1, int(CPU_ACTOR_START_FLOPS // flops))
        repaid = max(1, images // per_actor)
        if repaid < most:
            most = repaid
            reason = (f"{images} images repay {most}: an actor's start-up costs what one thread spends on "
                      f"~{per_actor} images of {flops / 1e9:.2f} GFLOPs")
    if most < hi:
        up["actors"] = str(most) if most <= lo else f"{lo},{most}"
        why.append(f"{most} actor{'s' if most > 1 else ''}, not {hi}: {reason}")


def _plan_compile(rt: RuntimeConfig, device: str, images: int, compilable: bool, up: dict[str, Any],
                  why: list[str]) -> None:
    """``compile: auto``: on when the images listed repay the compile cost (COMPILE), into ``up`` and
    ``why``."""
    cost, speedup, rate = COMPILE[device]
    actors_hi = int(str(up.get("actors", rt.actors)).split(",")[-1])
    saved = images / (rate * max(1, actors_hi)) * (1 - 1 / speedup)  # wall seconds, actors in parallel
    up["compile"] = bool(compilable and saved > cost)
    why.append(f"compile {'on' if up['compile'] else 'off'}: " + (
        "this cut cannot compile" if not compilable else
        "the eager forward (activations fused into the convolutions) is as fast" if speedup <= 1 else
        f"{images} images {'repay' if up['compile'] else 'do not repay'} ~{cost:.0f} s of compiling"))


def cpu_forward_batch(activation: int, batch: int) -> int:
    """Images per CPU forward: the largest power of two whose largest activation (``activation`` bytes per
    image) stays under FORWARD_BYTES, at most ``batch``, at least 1."""
    fits = 2 ** math.floor(math.log2(max(FORWARD_BYTES / max(activation, 1), 1)))
    return max(1, min(batch, fits))


def cpu_actor_gib(model_bytes: int) -> float:
    """The memory one CPU actor of a model with ``model_bytes`` of parameters holds, in GiB."""
    return CPU_ACTOR_BASE_GIB + 2 * model_bytes / 2**30


def _cpu_actors_per_node(node: NodeType, usable: float, model_bytes: int) -> tuple[int, str]:
    """CPU actors per node, and why: one per usable CPU (rounded up: the read tasks beside them mostly wait
    on storage), each with one torch thread. Side by side, one-thread actors run more images per core than
    one actor's threads: no synchronisation between threads, and one actor's gaps between batches are
    another's work. Fewer actors, with more threads each, where the node's memory cannot hold one copy of
    the model per CPU."""
    want = max(1, math.ceil(usable - 1e-9))
    side_by_side = "one-thread actors side by side run more images per core than one actor's threads"
    if not node.memory_gib:
        return want, f"one actor per CPU: {side_by_side}"
    gib = cpu_actor_gib(model_bytes)
    fit = max(1, int(node.memory_gib * ACTOR_MEMORY_SHARE // gib))
    if fit >= want:
        return want, f"one actor per CPU (~{gib:.1f} GiB each): {side_by_side}"
    return fit, (f"{node.memory_gib:.0f} GiB of memory holds {fit} actors of ~{gib:.1f} GiB, not one per "
                 "CPU: fewer actors with more threads each")


def _read_reserve(cpus: float) -> float:
    """CPUs a node keeps for read tasks (and write tasks) beside the actors: 0.5 on small nodes, 1/8 on
    large ones."""
    return max(0.5, math.floor(cpus / 8))


def _count(x: float) -> str:
    return f"{x:g}" if x < 10**5 else "unlimited"


def plan_finetune(cluster: Cluster, runtime: FinetuneRuntime) -> Decision:
    """Workers and their CPUs and GPUs for Ray Train, leaving CPUs for the Ray Data tasks that feed them."""
    rt = runtime
    up: dict[str, Any] = {}
    why: list[str] = []
    gpu_nodes = cluster.gpu_nodes()
    use_gpu = (rt.gpus_per_worker or 0) > 0 if rt.gpus_per_worker is not None else bool(gpu_nodes)
    if use_gpu and not gpu_nodes:
        raise ConfigError(f"--gpus-per-worker {rt.gpus_per_worker:g} asks for GPUs but no node (or node "
                          "group) of this cluster has one: drop --gpus-per-worker")
    if use_gpu:
        node = max(gpu_nodes, key=lambda n: (n.gpus, n.cpus))
        if rt.gpus_per_worker is None:
            up["gpus_per_worker"] = 1.0
        gpw = up.get("gpus_per_worker", rt.gpus_per_worker)
        if rt.workers is None:
            up["workers"] = max(1, int(max(cluster.total("GPU"), node.gpus) // gpw))
            why.append(f"{up['workers']} workers: one per GPU")
        if rt.cpus_per_worker is None:
            up["cpus_per_worker"] = max(1.0, math.floor(node.cpus / node.gpus * gpw / 2))
            why.append(f"{up['cpus_per_worker']:g} CPUs per worker: half of each GPU's CPUs, the rest for "
                       "the Ray Data tasks that read and select rows")
        if rt.autocast == "auto":
            up["autocast"] = "bf16" if gpu_bf16(node.gpu_kind) else "fp16"
    else:
        if rt.gpus_per_worker is None:
            up["gpus_per_worker"] = 0.0
        total = cluster.total("CPU")
        usable = max(total - max(0.5, total / 4), 0.5)
        if rt.workers is None:
            up["workers"] = max(1, min(4, int(usable // MAX_THREADS_PER_CPU_ACTOR)))
            why.append(f"{up['workers']} worker{'s' if up['workers'] > 1 else ''}: {total:g} CPUs")
        workers = up.get("workers", rt.workers)
        if rt.cpus_per_worker is None:
            up["cpus_per_worker"] = round(usable / workers, 2)
            why.append(f"{up['cpus_per_worker']:g} CPUs per worker: {total - usable:g} of {total:g} kept "
                       "for the Ray Data tasks that read and select rows (with none left, training waits "
                       "forever)")
        if rt.autocast == "auto":
            up["autocast"] = "none"  # CPU training stays fp32: bf16 gradients are not worth the drift here
    resolved = rt.model_copy(update=up)
    need = {"CPU": resolved.cpus_per_worker, "GPU": resolved.gpus_per_worker or 0.0}
    waits = _check_bundle(cluster, need, {"CPU": "--cpus-per-worker", "GPU": "--gpus-per-worker",
                                          "*": "--cpus-per-worker"}, what="worker")
    total_cpu = cluster.total("CPU", at_most=True)
    if resolved.workers * resolved.cpus_per_worker > total_cpu - READ_TASK_CPUS + 1e-9:
        raise ConfigError(
            f"{resolved.workers} workers x {resolved.cpus_per_worker:g} CPUs leave no CPU of the cluster's "
            f"{total_cpu:g} for the tasks that read the images (training would wait forever): lower "
            "--workers or --cpus-per-worker")
    why.insert(0, f"{resolved.workers} worker{'s' if resolved.workers > 1 else ''} x "
                  f"{resolved.cpus_per_worker:g} CPU" + (f" + {resolved.gpus_per_worker:g} GPU"
                                                         if resolved.gpus_per_worker else ""))
    return Decision(resolved, why, waits)
