"""The planned default precision against the fp32 path: bf16 (or bf16 with the stem in fp32) only for models
whose embeddings stay within cosine 0.999 of fp32 on real photos (measured when a run is planned), and then
the same linear-probe accuracy on the demo's data within a point."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

from pipeline import samples
from pipeline.cluster import cpu_has_bf16
from pipeline.embed import Embedder, EmbedderSpec
from pipeline.output.spec import EmbeddingSpec
from pipeline.output.writer import ParquetSink
from pipeline.sources import rows_from_bytes

RESNET = {"model": "resnet50", "weights": "none"}  # random init: the same arithmetic as trained weights
LITE0 = {"model": "tf_efficientnet_lite0", "weights": "packaged"}
FAST = {"autocast": "bf16", "channels_last": True}  # what the planner picks on a CPU with AVX-512 BF16
EXACT = {"autocast": "none"}


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _emb(t: pa.Table) -> np.ndarray:
    return np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float64)


def _plan(backbone_cfg: dict) -> str:
    from pipeline.backbone import build_backbone
    from pipeline.backbone.inference import precision_agreement
    from pipeline.cluster import Cluster, NodeType
    from pipeline.config import BackboneConfig, RuntimeConfig
    from pipeline.plan import plan_images

    bb = build_backbone(BackboneConfig(**backbone_cfg), "cpu")
    agreement = precision_agreement(bb)
    laptop = Cluster((NodeType(cpus=2),), cpu_bf16=True)
    decision = plan_images(laptop, RuntimeConfig(), images=100, input_hw=(224, 224), agreement=agreement)
    return decision, agreement


@pytest.mark.parametrize("backbone, planned", [(RESNET, "bf16"), (LITE0, "bf16-stem-fp32")])
def test_the_planned_precision_keeps_cosine_0999_on_real_photos(backbone, planned):
    decision, agreement = _plan(backbone)
    assert decision.runtime.autocast == planned, (agreement, decision.reasons)
    # the measurements are in the plan's reasons
    assert any(f"{planned} {agreement[planned]:.4f}" in r for r in decision.reasons)
    photos = [_jpeg(samples.photo(n)) for n in samples.PHOTOS]
    rows = rows_from_bytes(photos)
    runtime = {"autocast": decision.runtime.autocast, "channels_last": decision.runtime.channels_last}
    fast, exact = (_emb(Embedder(EmbedderSpec.of(backbone, rt), threads=2)(rows)) for rt in (runtime, EXACT))
    cos = (fast * exact).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(exact, axis=1)
    assert cos.min() >= 0.999, cos
    assert not np.array_equal(fast, exact)  # the fast path really ran in bf16
    if planned != "bf16":  # lite0 all in bf16 would lose more than that: why its stem stays in fp32
        bf16 = _emb(Embedder(EmbedderSpec.of(backbone, FAST), threads=2)(rows))
        assert ((bf16 * exact).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(exact, axis=1)).min() \
            < 0.999


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return samples.make_textures(root, per_class=30, patch=96, seed=0)  # the demo's data set


@pytest.mark.skipif(not cpu_has_bf16(), reason="no native bf16 on this CPU: its runs are planned in fp32 "
                    "(emulated bf16 takes a minute here; PIPELINE_CPU_BF16=1 runs it anyway)")
def test_the_planned_precision_trains_heads_of_the_fp32_accuracy(demo_images, tmp_path):
    from pipeline.config import HeadTrainConfig
    from pipeline.heads import train_head

    datas = [p.read_bytes() for p in demo_images]
    ids = [f"{p.parent.name}/{p.name}" for p in demo_images]
    decision, _ = _plan(LITE0)  # the demo's model, as a run on this CPU would be planned
    planned = {"autocast": decision.runtime.autocast, "channels_last": decision.runtime.channels_last}
    acc = {}
    for name, rt in (("planned", planned), ("fp32", EXACT)):
        rows = rows_from_bytes(datas)
        rows = rows.set_column(rows.schema.get_field_index("id"), "id", pa.array(ids))
        rows = rows.set_column(rows.schema.get_field_index("label"), "label",
                               pa.array([i.split("/")[0] for i in ids]))
        out = Embedder(EmbedderSpec.of(LITE0, rt), threads=2)(rows)
        spec = EmbeddingSpec(model="tf_efficientnet_lite0", layer="final", pool="none", dim=1280,
                             dtype="float32", precision=rt["autocast"])
        ParquetSink(str(tmp_path / name), spec).write(out)
        head = train_head(HeadTrainConfig(embeddings=str(tmp_path / name), output=str(tmp_path / f"h-{name}"),
                                          epochs=60), progress=False)
        acc[name] = head["metrics"]["validation"]["accuracy"]
    # (all-bf16 features: 0.97 vs 1.00, one image of 33)
    assert abs(acc["planned"] - acc["fp32"]) <= 0.01, acc
    assert acc["fp32"] >= 0.9, acc
