"""The resource planner on cluster shapes given as plain data: a 2-CPU laptop, a 16-CPU node, one node with
8 GPUs and 96 CPUs, a CPU head with GPU workers scaling from 0; extract and fine-tune on each."""

from __future__ import annotations

import pytest

from pipeline.cluster import Cluster, NodeType
from pipeline.config import ConfigError, FinetuneRuntime, RuntimeConfig
from pipeline.plan import plan_finetune, plan_images

LAPTOP = Cluster((NodeType(cpus=2, memory_gib=24),), cpu_bf16=True)
OLD_LAPTOP = Cluster((NodeType(cpus=2, memory_gib=24),), cpu_bf16=False)
CPU_NODE = Cluster((NodeType(cpus=16, memory_gib=64),), cpu_bf16=True)
GPU_BOX = Cluster((NodeType(cpus=96, gpus=8, memory_gib=1024, gpu_kind="H100"),))
AUTOSCALING = Cluster((NodeType(cpus=0, memory_gib=32),  # cluster.yaml's head: CPU 0
                       NodeType(cpus=8, gpus=1, gpu_kind="A10G", alive=0, max_count=4),
                       NodeType(cpus=16, alive=0, max_count=2)))
T4_NODE = Cluster((NodeType(cpus=4, gpus=1, gpu_kind="T4"),))


def _images(cluster: Cluster, images: int = 1000, flops: int = 0, **runtime):
    return plan_images(cluster, RuntimeConfig(**runtime), images=images, input_hw=(224, 224), flops=flops)


def test_laptop_uses_both_cores_in_bf16_and_keeps_room_for_reads():
    d = _images(LAPTOP)
    rt = d.runtime
    # two one-thread actors on the two cores, their logical shares leaving half a CPU to the read tasks
    assert rt.actor_range() == (2, 2) and rt.cpus_per_actor == 0.75 and rt.threads == 1
    assert rt.gpus_per_actor == 0 and rt.device == "cpu" and rt.calls_per_actor == 1
    assert rt.decoder == "tensor"
    assert rt.autocast == "bf16" and rt.channels_last and rt.batch_size == 32 and rt.compile is False
    assert d.waits_for is None
    assert any("AVX-512 BF16" in r for r in d.reasons) and any("kept for read tasks" in r for r in d.reasons)
    assert d.record()["precision"] == "bf16"
    old = _images(OLD_LAPTOP).runtime
    assert old.autocast == "none" and old.channels_last  # no native bf16: exact fp32, in channels-last
    pil = plan_images(LAPTOP, RuntimeConfig(), images=10, input_hw=(224, 224), tensor_decodable=False)
    assert pil.runtime.decoder == "pil" and any("cannot reproduce this transform" in r for r in pil.reasons)


def test_sixteen_cpu_node_runs_one_thread_actors_as_memory_allows():
    rt = _images(CPU_NODE).runtime
    lo, hi = rt.actor_range()
    assert lo == hi == 14 and rt.cpus_per_actor == 1 and rt.threads == 1
    assert lo * rt.cpus_per_actor <= 16 - 2  # two CPUs stay with the read tasks
    # a large model on a node with little memory: fewer actors, more threads each
    small = Cluster((NodeType(cpus=16, memory_gib=16),), cpu_bf16=True)
    d = plan_images(small, RuntimeConfig(), images=1000, input_hw=(224, 224), model_bytes=1_200_000_000)
    lo, hi = d.runtime.actor_range()
    assert lo == hi == 3 and d.runtime.cpus_per_actor == 4.67 and d.runtime.threads == 5
    assert any("holds 3 actors of ~3.4 GiB" in r for r in d.reasons)
    assert _images(Cluster((NodeType(cpus=16),))).runtime.actor_range() == (14, 14)  # memory not reported
    # on CPU the eager forward (ReLUs fused into the convolutions) is as fast as a compiled one
    long_run = _images(CPU_NODE, images=10_000_000)
    assert long_run.runtime.compile is False and _images(CPU_NODE, images=1000).runtime.compile is False
    assert any(r.startswith("compile off: the eager forward") for r in long_run.reasons)
    assert _images(GPU_BOX, images=50_000_000).runtime.compile is True  # a GPU's long run repays it


def test_eight_gpu_node_one_actor_per_gpu_with_its_share_of_cpus():
    d = _images(GPU_BOX, images=50_000)
    rt = d.runtime
    assert rt.actor_range() == (8, 8) and rt.gpus_per_actor == 1 and rt.cpus_per_actor == 6
    assert rt.device == "cuda" and rt.decoder == "tensor" and rt.channels_last and rt.calls_per_actor == 2
    assert rt.autocast == "bf16" and rt.batch_size == 256 and rt.threads == 6
    assert _images(T4_NODE).runtime.autocast == "fp16"  # no bf16 on a T4


def test_autoscaling_gpu_workers_from_zero_wait_for_the_first_node():
    d = _images(AUTOSCALING, images=100_000)
    rt = d.runtime
    assert rt.actor_range() == (1, 4) and rt.gpus_per_actor == 1 and rt.cpus_per_actor == 4
    assert d.waits_for == {"CPU": 4.0, "GPU": 1.0}  # no GPU node is alive yet: the autoscaler starts one
    assert rt.autocast == "bf16"


LITE0_FLOPS = 767_815_104  # tf_efficientnet_lite0 at 224 px, one image to `final` (Backbone.image_flops)


def test_a_small_run_starts_only_the_actors_its_images_repay():
    few = _images(LAPTOP, images=42, flops=LITE0_FLOPS)
    assert few.runtime.actor_range() == (1, 1) and few.runtime.cpus_per_actor == 0.75
    assert "1 actor, not 2: 42 images repay 1: an actor's start-up costs what one thread spends on ~182 " \
           "images of 0.77 GFLOPs" in few.reasons
    assert few.reasons[0].startswith("1 actor x 0.75 CPU")
    assert _images(LAPTOP, images=363, flops=LITE0_FLOPS).runtime.actor_range() == (1, 1)
    assert _images(LAPTOP, images=364, flops=LITE0_FLOPS).runtime.actor_range() == (2, 2)
    # four times the arithmetic per image: an actor pays for itself on a quarter of the images
    assert _images(CPU_NODE, images=400, flops=4 * LITE0_FLOPS).runtime.actor_range() == (8, 8)
    assert _images(CPU_NODE, images=400, flops=LITE0_FLOPS).runtime.actor_range() == (2, 2)
    # never more actors than batches (GPUs too), FLOPs measured or not; an autoscaling pool's max shrinks
    assert _images(LAPTOP, images=40).runtime.actor_range() == (2, 2)  # two batches of 32
    assert _images(LAPTOP, images=20).runtime.actor_range() == (1, 1)
    gpu = _images(GPU_BOX, images=300)
    assert gpu.runtime.actor_range() == (2, 2) and "2 actors, not 8: 300 images fill 2 batches of 256" in \
        gpu.reasons
    assert _images(AUTOSCALING, images=600).runtime.actor_range() == (1, 3)
    # an explicit count wins, and nothing is cut where the images keep every actor busy
    assert _images(LAPTOP, images=10, flops=LITE0_FLOPS, actors="2").runtime.actor_range() == (2, 2)
    assert not any("not 14" in r for r in _images(CPU_NODE, images=10_000, flops=LITE0_FLOPS).reasons)


def test_explicit_settings_win():
    rt = _images(GPU_BOX, actors="2", cpus_per_actor=3, autocast="none", compile=False, batch_size=64,
                 decoder="pil", channels_last=False, threads=2, calls_per_actor=1).runtime
    assert (rt.actor_range(), rt.cpus_per_actor, rt.autocast, rt.compile, rt.batch_size) == \
        ((2, 2), 3, "none", False, 64)
    assert (rt.decoder, rt.channels_last, rt.threads, rt.calls_per_actor) == ("pil", False, 2, 1)
    cpu = _images(GPU_BOX, device="cpu").runtime
    assert cpu.gpus_per_actor == 0 and cpu.device == "cpu"  # a CPU run on a GPU node, when asked


def test_requests_the_cluster_can_never_satisfy_name_the_flag():
    with pytest.raises(ConfigError, match="--gpus-per-actor"):
        _images(LAPTOP, gpus_per_actor=1)
    with pytest.raises(ConfigError, match="GPU: 2 but the largest node has 1.*--gpus-per-actor"):
        _images(T4_NODE, gpus_per_actor=2)
    with pytest.raises(ConfigError, match="nowhere: 1 but no node has any.*runtime.actor_resources"):
        _images(CPU_NODE, actor_resources={"nowhere": 1})
    with pytest.raises(ConfigError, match="CPU: 32 .*runtime.cpus_per_actor"):
        _images(CPU_NODE, cpus_per_actor=32)
    with pytest.raises(ConfigError, match="runtime.device is cuda"):
        _images(LAPTOP, device="cuda")
    marked = Cluster(CPU_NODE.nodes, autoscaling=True)  # marked autoscaling, node groups unknown: wait
    assert _images(marked, actor_resources={"nowhere": 1}).waits_for == {"CPU": 1, "nowhere": 1}


def test_finetune_leaves_cpus_for_the_data_tasks():
    lap = plan_finetune(LAPTOP, FinetuneRuntime(workers=2)).runtime  # the README's example
    assert lap.workers == 2 and lap.cpus_per_worker == 0.75 and lap.gpus_per_worker == 0
    assert lap.workers * lap.cpus_per_worker <= 2 - 0.5 and lap.autocast == "none"
    node = plan_finetune(CPU_NODE, FinetuneRuntime()).runtime
    assert node.workers == 3 and node.cpus_per_worker == 4 and node.workers * node.cpus_per_worker <= 12
    box = plan_finetune(GPU_BOX, FinetuneRuntime()).runtime
    assert (box.workers, box.gpus_per_worker, box.cpus_per_worker, box.autocast) == (8, 1, 6, "bf16")
    auto = plan_finetune(AUTOSCALING, FinetuneRuntime())
    assert (auto.runtime.workers, auto.runtime.gpus_per_worker) == (1, 1) and auto.waits_for == \
        {"CPU": 4.0, "GPU": 1.0}
    with pytest.raises(ConfigError, match="leave no CPU.*--workers or --cpus-per-worker"):
        plan_finetune(LAPTOP, FinetuneRuntime(workers=2, cpus_per_worker=1))
    with pytest.raises(ConfigError, match="--gpus-per-worker"):
        plan_finetune(LAPTOP, FinetuneRuntime(gpus_per_worker=1))


def test_bf16_only_for_models_whose_features_keep_cosine_0999():
    def plan(cluster, agreement):
        return plan_images(cluster, RuntimeConfig(), images=100, input_hw=(224, 224), agreement=agreement)

    resnet = plan(LAPTOP, {"bf16": 0.99999, "bf16-stem-fp32": 0.99999})
    assert resnet.runtime.autocast == "bf16" and resnet.runtime.channels_last
    assert resnet.record()["precision"] == "bf16"
    lite = plan(LAPTOP, {"bf16": 0.9983, "bf16-stem-fp32": 0.9996})  # lite0's measurements
    assert lite.runtime.autocast == "bf16-stem-fp32" and any("bf16 0.9983, bf16-stem-fp32 0.9996" in r
                                                              for r in lite.reasons)
    assert lite.record()["precision"] == "bf16-stem-fp32"
    lossy = plan(LAPTOP, {"bf16": 0.9975, "bf16-stem-fp32": 0.9985})
    assert lossy.runtime.autocast == "none" and any("stays in fp32" in r for r in lossy.reasons)
    gpu = plan(GPU_BOX, {"bf16": 0.9975, "bf16-stem-fp32": 0.9980})
    assert gpu.runtime.autocast == "none" and gpu.runtime.channels_last  # tensor cores still like it
    explicit = plan_images(LAPTOP, RuntimeConfig(autocast="bf16"), images=100, input_hw=(224, 224),
                           agreement={"bf16": 0.99, "bf16-stem-fp32": 0.99})
    assert explicit.runtime.autocast == "bf16"  # an explicit setting wins


def test_cpu_forwards_keep_their_largest_activation_under_32_mib():
    """lite0's measured activations (inference.activation_bytes): 4.6 MiB per image in fp32, 2.3 in bf16."""
    lite0 = {"none": 4_813_000, "bf16": 2_408_000, "bf16-stem-fp32": 2_408_000}

    def plan(cluster, **runtime):
        return plan_images(cluster, RuntimeConfig(**runtime), images=100, input_hw=(224, 224),
                           agreement={"bf16": 0.9981, "bf16-stem-fp32": 0.9996}, activations=lite0)

    d = plan(LAPTOP)
    assert d.runtime.batch_size == 32 and d.runtime.forward_batch == 8  # 8 x 2.3 MiB < 32 MiB < 16 x 2.3
    assert any("forward batch 8: one image's largest activation is 2.3 MiB in bf16-stem-fp32" in r
               for r in d.reasons) and d.record()["settings"]["forward_batch"] == 8
    assert plan(OLD_LAPTOP).runtime.forward_batch == 4  # fp32: twice the bytes
    assert plan(LAPTOP, batch_size=2).runtime.forward_batch == 2  # never more than the batch
    assert plan(LAPTOP, forward_batch=32).runtime.forward_batch == 32  # an explicit setting wins
    assert plan(GPU_BOX).runtime.forward_batch == 256  # GPUs: the whole batch in one forward
    assert _images(LAPTOP).runtime.forward_batch == 32  # not measured: the whole batch


def test_the_cpus_native_bf16_is_read_from_its_flags_and_can_be_switched(tmp_path, monkeypatch):
    from pipeline.cluster import CPU_BF16_ENV, cpu_has_bf16

    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    zen4, zen2 = tmp_path / "zen4", tmp_path / "zen2"
    zen4.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    zen2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_has_bf16(str(zen4)) and not cpu_has_bf16(str(zen2))
    assert not cpu_has_bf16(str(tmp_path / "missing"))
    monkeypatch.setenv(CPU_BF16_ENV, "0")  # plan (and test) as a CPU without native bf16 would
    assert not cpu_has_bf16(str(zen4))
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert cpu_has_bf16(str(zen2))
