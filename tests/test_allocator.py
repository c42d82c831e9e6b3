"""glibc's allocator set for batch work (pipeline/allocator.py): the Embedder's batches stop faulting in
fresh pages, and a process whose environment sets the allocator itself is left alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.allocator import user_set

# One Embedder as the planner builds a CPU actor on this machine (one thread, the tensor decoder, the
# precision this CPU computes natively and the forward size planned for it) over batches of 500x375 JPEGs;
# prints the minor page faults per image of the median batch.
_WORKLOAD = r"""
import io, json, resource, sys
import numpy as np, torch
from PIL import Image
import pipeline.allocator as allocator
if sys.argv[1] == "glibc-default":
    allocator._tuned = False  # as if already decided: the Embedder leaves glibc's defaults
from pipeline.backbone import build_backbone
from pipeline.config import BackboneConfig
from pipeline.embed import Embedder, EmbedderSpec
from pipeline.backbone.inference import activation_bytes
from pipeline.cluster import cpu_has_bf16
from pipeline.plan import cpu_forward_batch
from pipeline.sources import rows_from_bytes
rng = np.random.default_rng(0)
def jpeg():
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()
datas = [jpeg() for _ in range(32)]
cfg = BackboneConfig(model="tf_efficientnet_lite0")
autocast = "bf16-stem-fp32" if cpu_has_bf16() else "none"  # lite0's planned precision on this CPU
activation = activation_bytes(build_backbone(cfg))[autocast]
forward = cpu_forward_batch(activation, 32)
rt = dict(device="cpu", autocast=autocast, channels_last=True, decoder="tensor", forward_batch=forward,
          compile=False, threads=1)
e = Embedder(EmbedderSpec.of(cfg, rt))
per_batch = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    e(rows_from_bytes(datas))
    per_batch.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# the median batch after two warm-ups (the heap reaches its size; Python's collector faults in now and then)
print(json.dumps({"tuned": e.allocator_tuned, "faults_per_image": sorted(per_batch[2:])[2] / 32,
                  "per_batch": per_batch, "autocast": autocast, "forward_batch": forward,
                  "activation_pages": activation / resource.getpagesize()}))
"""


def _faults(*modes: str) -> list[dict]:
    """Runs the workload once per mode, side by side (one process each: the faults are per process)."""
    procs = [subprocess.Popen([sys.executable, "-c", _WORKLOAD, m], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for m in modes]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_embedders_batches_stop_faulting_in_fresh_pages():
    default, tuned = _faults("glibc-default", "tuned")
    assert tuned["tuned"] and not default["tuned"]
    # Set, a batch reuses the memory of the one before: the pages it faults in per image are a small
    # fraction (under 5%) of one image's largest activation, whatever this CPU's precision and speed.
    budget = 0.05 * tuned["activation_pages"]
    assert tuned["faults_per_image"] < budget, (tuned, budget)
    # glibc's own thresholds move with the order of frees: on most runs each batch faults in hundreds of
    # pages per image, on some the heap happens to settle. Where it faults, set is at least 20x fewer.
    if default["faults_per_image"] >= budget:
        assert tuned["faults_per_image"] * 20 <= default["faults_per_image"], (default, tuned)
    print(f"faults per image: glibc's defaults {default['faults_per_image']:.1f}, "
          f"set {tuned['faults_per_image']:.1f} (largest activation {tuned['activation_pages']:.0f} pages)")


def test_an_environment_that_sets_the_allocator_is_left_alone():
    assert not user_set({})
    assert not user_set({"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert user_set({"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert user_set({"GLIBC_TUNABLES": "glibc.cpu.x86_shstk=off:glibc.malloc.mmap_threshold=65536"})
    code = "from pipeline.allocator import tune_allocator; print(tune_allocator(), tune_allocator())"
    env = {"PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "65536"}
    left = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert left.stdout.split() == ["False", "False"]
    if sys.platform.startswith("linux"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert done.stdout.split() == ["True", "True"]
