"""GPU paths against their CPU twins. Skipped where no CUDA device is visible (the CPU twins of every path
here are exercised in test_tensorprep.py, test_embed.py and test_runner.py).

    python -m pytest tests/test_gpu.py -q
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline import samples
from pipeline.embed import Embedder, EmbedderSpec
from pipeline.sources import rows_from_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")

CFG = {"model": "tf_efficientnet_lite0", "weights": "packaged"}


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def datas() -> list[bytes | None]:
    """JPEGs of several sizes (some sharing one), grayscale and CMYK JPEGs, a PNG, and bad rows."""
    chelsea, coffee, astronaut = (samples.photo(n) for n in ("chelsea", "coffee", "astronaut"))
    good = [_jpeg(chelsea), _jpeg(coffee), _jpeg(astronaut.resize((640, 240))),
            _jpeg(chelsea.resize((64, 48))), _jpeg(coffee.resize((64, 48))),
            _jpeg(chelsea.convert("L")), _jpeg(coffee.convert("CMYK")),
            _png(astronaut.resize((300, 200)))]
    truncated = good[0][: len(good[0]) // 2]
    return [*good * 8, truncated, b"not an image", b"", None]  # 68 rows: a batch the size of a real one


def _emb(t: pa.Table) -> np.ndarray:
    return np.stack(t.column("embedding").drop_null().to_pylist())


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def cpu_reference(datas) -> pa.Table:
    return Embedder(EmbedderSpec.of(CFG, {"device": "cpu", "decoder": "pil"}))(rows_from_bytes(datas))


def test_gpu_defaults_are_the_fast_path():
    e = Embedder(EmbedderSpec.of(CFG, {"device": "cuda"}))
    assert e.decoder == "tensor" and e.channels_last and e.device.type == "cuda"


@pytest.mark.parametrize("decoder", ["tensor", "pil"])
@pytest.mark.parametrize("autocast", ["none", "bf16"])
def test_gpu_rows_match_the_cpu_reference(datas, cpu_reference, decoder, autocast):
    """nvjpeg + GPU resize (or PIL + pinned copy), fp32 or bf16: the same rows, errors and features."""
    spec = EmbedderSpec.of(CFG, {"device": "cuda", "decoder": decoder, "autocast": autocast})
    out = Embedder(spec)(rows_from_bytes(datas))
    assert out.column("error_kind").to_pylist() == cpu_reference.column("error_kind").to_pylist()
    cos = _cos(_emb(out), _emb(cpu_reference))
    # nvjpeg's IDCT and upsampling differ slightly from libjpeg-turbo's; bf16 rounds the activations
    assert cos.min() > (0.995 if autocast == "none" else 0.99), cos.min()


def test_tensor_preprocessing_on_gpu_matches_the_cpu_twin(datas):
    """Same uint8 images on both devices (decoded on CPU): the batched GPU resize matches the CPU one."""
    from pipeline.preprocess.tensorprep import TensorPrep

    e = Embedder(EmbedderSpec.of(CFG, {"device": "cpu", "decoder": "tensor"}))
    cpu = TensorPrep(e.backbone.transform, torch.device("cpu"), max_pixels=10**8, max_bytes=10**8)
    images = [d for d in cpu.decode(datas[:8]) if isinstance(d, torch.Tensor)]
    x_cpu = cpu.tt(images)
    x_gpu = cpu.tt([im.cuda() for im in images]).cpu()
    steps = ((x_gpu - x_cpu) * torch.tensor(cpu.tt.std).view(1, 3, 1, 1) * 255).abs().round()
    assert steps.max().item() <= 2 and (steps > 0).float().mean().item() < 0.05


def test_compiled_gpu_model_gives_the_eager_rows(datas):
    eager = Embedder(EmbedderSpec.of(CFG, {"device": "cuda", "autocast": "bf16"}))
    compiled = Embedder(EmbedderSpec.of(CFG, {"device": "cuda", "autocast": "bf16", "compile": True}))
    full, short = rows_from_bytes(datas[:32]), rows_from_bytes(datas[32:40])
    for batch in (full, short):
        a, b = eager(batch), compiled(batch)
        assert _cos(_emb(a), _emb(b)).min() > 0.99
    assert compiled.compiled_batch == 32
