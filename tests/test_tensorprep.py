"""The tensor decoder (runtime.decoder=tensor): the GPU fast path's code, run on CPU against the PIL path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import samples
from pipeline.embed import Embedder, EmbedderSpec
from pipeline.preprocess.decode import DecodeError, decode_image
from pipeline.preprocess.tensorprep import TensorPrep, TensorPrepError, TensorTransform, jpeg_route
from pipeline.sources import rows_from_bytes

CPU = torch.device("cpu")
LIMITS = {"max_pixels": 50_000_000, "max_bytes": 64 * 1024 * 1024}


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}) | kw)
    return buf.getvalue()


def _photo(name: str, size: tuple[int, int] | None = None, mode: str = "RGB") -> Image.Image:
    img = samples.photo(name)
    img = img.resize(size, Image.BICUBIC) if size else img
    return img.convert(mode)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _encode(_photo("coffee", (90, 60)), exif=exif.tobytes())


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """Every route: plain JPEGs of several sizes (two of one size: resized together), grayscale and
    EXIF-rotated JPEGs (tensor decoder), and PNG, CMYK JPEG, palette PNG (PIL decoder)."""
    return {
        "chelsea": _encode(_photo("chelsea")),
        "coffee": _encode(_photo("coffee")),
        "wide": _encode(_photo("astronaut", (640, 240))),
        "tall": _encode(_photo("astronaut", (200, 500))),
        "small": _encode(_photo("chelsea", (64, 48))),
        "small2": _encode(_photo("coffee", (64, 48))),
        "gray": _encode(_photo("chelsea", mode="L")),
        "rotated": _exif_rotated(),
        "png": _encode(_photo("coffee", (300, 200)), "PNG"),
        "cmyk": _encode(_photo("chelsea", (240, 180), mode="CMYK")),
        "palette": _encode(_photo("astronaut", (128, 128)).convert("P"), "PNG"),
    }


def _timm_transform(model: str):
    import timm
    import timm.data

    m = timm.create_model(model, pretrained=False)
    return timm.data.create_transform(**timm.data.resolve_model_data_config(m), is_training=False)


def _tv_transform():
    import torchvision

    return torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()  # bilinear, resize 232, crop 224


@pytest.mark.parametrize("make", [lambda: _timm_transform("tf_efficientnet_lite0"),
                                  lambda: _timm_transform("resnet50"), _tv_transform],
                         ids=["lite0-bicubic-256", "resnet50-bicubic-235", "tv-resnet50-bilinear-232"])
def test_tensor_path_matches_the_models_pil_eval_transform(images, make):
    t = make()
    prep = TensorPrep(t, CPU, **LIMITS)
    x, errors = prep(list(images.values()))
    assert errors == [None] * len(images)
    ref = torch.stack([t(decode_image(d, **LIMITS)) for d in images.values()])
    assert x.shape == ref.shape and x.dtype == torch.float32
    # in uint8 steps: both paths resample in uint8 and round, in slightly different arithmetic
    steps = ((x - ref) * torch.tensor(prep.tt.std).view(1, 3, 1, 1) * 255).abs().round()
    assert steps.max().item() <= 2
    assert (steps > 0).float().mean().item() < 0.01  # measured: 0.2-0.4 % of values differ, by one step


@pytest.mark.parametrize("make", [lambda: _timm_transform("tf_efficientnet_lite0"), _tv_transform],
                         ids=["lite0-one-mean", "tv-per-channel-mean"])
def test_channels_last_batch_has_the_same_values(images, make):
    """The model's memory format from the start: value for value the contiguous batch, for images of one
    size (one resize) and of several, decoded by libjpeg-turbo or PIL (HWC buffers), rotated by EXIF (a
    strided view), or laid out CHW."""
    prep = TensorPrep(make(), CPU, **LIMITS)
    decoded = [d for d in prep.decode(list(images.values())) if isinstance(d, torch.Tensor)]
    assert len(decoded) == len(images)
    same = [d for d in decoded if tuple(d.shape) == (3, 48, 64)]
    assert len(same) == 2
    # both decoders hand out (H, W, 3) buffers; decode_jpeg's EXIF rotation returns a rotated view of one
    hwc = [d.permute(1, 2, 0).is_contiguous() for d in decoded]
    assert hwc == [name != "rotated" for name in images]
    for batch in (decoded, same, decoded[:1], [d.contiguous() for d in decoded]):
        ref = prep.tt(batch)
        cl = prep.tt(batch, channels_last=True)
        assert ref.is_contiguous() and cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(cl, ref)
    cl_prep = TensorPrep(make(), CPU, **LIMITS, channels_last=True)
    x, errors = cl_prep(list(images.values()))
    assert errors == [None] * len(images) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, prep(list(images.values()))[0])


def test_transform_steps_are_read_from_the_model(images):
    lite = TensorTransform.from_transform(_timm_transform("tf_efficientnet_lite0"))
    assert lite.resize == (256,) and lite.crop == (224, 224) and lite.interpolation.value == "bicubic"
    assert lite.mean == (0.5, 0.5, 0.5) and lite.antialias
    tv = TensorTransform.from_transform(_tv_transform())
    assert tv.resize == (232,) and tv.interpolation.value == "bilinear" and tv.std[0] == pytest.approx(0.229)


def test_an_unsupported_eval_transform_names_the_fix():
    from torchvision import transforms as T

    t = T.Compose([T.Resize(256), T.Grayscale(3), T.CenterCrop(224), T.ToTensor()])
    with pytest.raises(TensorPrepError, match="runtime.decoder=pil"):
        TensorTransform.from_transform(t)


def test_routing_jpegs_to_the_tensor_decoder_and_the_rest_to_pil(images, monkeypatch):
    route = {k: jpeg_route(v, draft_side=None, **LIMITS) for k, v in images.items()}
    assert [k for k, r in route.items() if r] == ["chelsea", "coffee", "wide", "tall", "small", "small2",
                                                   "gray", "rotated"]
    # limits are checked on the header, so an oversized JPEG goes to PIL, which names the error
    assert not jpeg_route(images["chelsea"], draft_side=None, max_pixels=100, max_bytes=10**8)
    assert not jpeg_route(images["chelsea"], draft_side=None, max_pixels=10**8, max_bytes=100)
    # draft mode (CPU): a JPEG at least twice the resize goes to PIL's reduced-scale decode
    assert not jpeg_route(images["chelsea"], draft_side=128, **LIMITS)  # 451x300
    assert jpeg_route(images["small"], draft_side=128, **LIMITS)
    assert not jpeg_route(b"\xff\xd8\xff\xe0garbage", draft_side=None, **LIMITS)

    prep = TensorPrep(_timm_transform("tf_efficientnet_lite0"), CPU, **LIMITS)
    used = []
    for name in ("_jpeg_one", "_pil"):
        real = getattr(prep, name)
        monkeypatch.setattr(prep, name, lambda d, real=real, name=name: used.append(name) or real(d))
    prep.decode(list(images.values()))
    assert used.count("_jpeg_one") == 8 and used.count("_pil") == 3


def test_bad_images_get_the_error_kinds_of_the_pil_path(images):
    jpeg = images["chelsea"]
    bad = [None, b"", b"not an image", jpeg[: len(jpeg) // 2], b"\xff\xd8\xff\xe0garbage", jpeg]
    prep = TensorPrep(_timm_transform("tf_efficientnet_lite0"), CPU, **LIMITS)
    x, errors = prep(bad)
    expected = [decode_image(d, **LIMITS) for d in bad]
    assert [e.kind if e else None for e in errors] == \
        [e.kind if isinstance(e, DecodeError) else None for e in expected]
    assert [e.kind if e else None for e in errors] == ["missing", "empty", "not_an_image", "truncated",
                                                      "decode_failed", None]
    assert x.shape == (1, 3, 224, 224)
    x, errors = prep([b"", None])
    assert x is None and len(errors) == 2


def test_batched_jpeg_decode_isolates_a_bad_image(images, monkeypatch):
    """The CUDA path decodes all JPEGs in one call; when that call fails, it retries image by image."""
    prep = TensorPrep(_timm_transform("tf_efficientnet_lite0"), CPU, **LIMITS)
    good = [images["chelsea"], images["gray"], images["small"]]
    one_by_one = prep.decode(good)
    batched = prep._jpeg_batch(good)  # the nvjpeg call on CUDA; torchvision loops over the list on CPU
    assert all(torch.equal(a, b) for a, b in zip(one_by_one, batched))
    # a JPEG whose header passes but whose data does not: the batch call raises, each image is retried
    broken = images["coffee"][: len(images["coffee"]) // 2]
    out = prep._jpeg_batch([images["chelsea"], broken, images["small"]])
    assert torch.equal(out[0], one_by_one[0]) and torch.equal(out[2], one_by_one[2])
    assert jpeg_route(broken, draft_side=None, **LIMITS)
    assert isinstance(out[1], DecodeError) and out[1].kind == "truncated"


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_embedder_tensor_decoder_gives_the_pil_embeddings_and_errors(images):
    cfg = {"model": "tf_efficientnet_lite0", "weights": "packaged"}
    slivers = [_encode(Image.new("RGB", (20000, 1))), _encode(Image.new("RGB", (1, 20000)), "PNG")]
    datas = [*images.values(), b"junk", None, *slivers]
    pil = Embedder(EmbedderSpec.of(cfg, {"decoder": "pil"}), threads=2)(rows_from_bytes(datas))
    assert pil.column("error_kind").to_pylist()[-2:] == ["extreme_aspect_ratio"] * 2
    tensor_emb = Embedder(EmbedderSpec.of(cfg, {"decoder": "tensor", "channels_last": True}), threads=2)
    assert tensor_emb.decoder == "tensor" and tensor_emb.channels_last
    assert tensor_emb.tensor_prep.channels_last  # the batch is built in the model's memory format
    ten = tensor_emb(rows_from_bytes(datas))
    assert ten.column("error_kind").to_pylist() == pil.column("error_kind").to_pylist()
    ok = ten.column("embedding").drop_null()
    a, b = np.stack(ok.to_pylist()), np.stack(pil.column("embedding").drop_null().to_pylist())
    assert len(a) == len(images)
    assert _cosine(a, b).min() > 0.999


def test_decoder_auto_is_pil_on_cpu_and_falls_back_for_a_transform_it_cannot_reproduce(monkeypatch):
    cfg = {"model": "tf_efficientnet_lite0", "weights": "packaged"}
    auto = Embedder(EmbedderSpec.of(cfg), threads=1)
    assert auto.decoder == "pil" and auto.tensor_prep is None and not auto.channels_last
    with pytest.raises(ValueError, match="auto, pil or tensor"):
        Embedder(EmbedderSpec.of(cfg, {"decoder": "nvjpeg"}), threads=1)

    def refuse(t):
        raise TensorPrepError("not reproducible: use --set runtime.decoder=pil")

    monkeypatch.setattr(TensorTransform, "from_transform", staticmethod(refuse))
    with pytest.raises(TensorPrepError, match="runtime.decoder=pil"):
        Embedder(EmbedderSpec.of(cfg, {"decoder": "tensor"}), threads=1)
    monkeypatch.setattr("pipeline.preprocess.resolve_decoder", lambda d, dev: "tensor")
    assert Embedder(EmbedderSpec.of(cfg, {"decoder": "auto"}), threads=1).decoder == "pil"


def test_a_batch_of_large_photos_never_holds_them_all_at_full_size(images, monkeypatch):
    """Decoded images above BATCH_PIXELS are resized and cropped as soon as they are decoded: what reaches
    the batch step is at most BATCH_PIXELS per image, with the values a batch of one size gets."""
    import pipeline.preprocess.tensorprep as tp

    big = [_encode(_photo(n, (1600, 1200))) for n in ("chelsea", "coffee", "astronaut")]
    batch = [*big, images["small"], images["gray"], b"junk"]
    prep = TensorPrep(_timm_transform("tf_efficientnet_lite0"), CPU, **LIMITS)
    full = prep.decode(batch)  # every image at its decoded size
    assert sum(t.shape[-1] * t.shape[-2] > tp.BATCH_PIXELS for t in full if isinstance(t, torch.Tensor)) == 3
    seen: list[int] = []
    real = TensorTransform.__call__

    def spy(self, imgs, channels_last=False, cropped=None):
        seen.extend(int(t.shape[-1] * t.shape[-2]) for t in imgs)
        return real(self, imgs, channels_last, cropped)

    monkeypatch.setattr(TensorTransform, "__call__", spy)
    x, errors = prep(batch)
    assert len(seen) == 5 and max(seen) <= tp.BATCH_PIXELS
    assert [e.kind if e else None for e in errors] == [None] * 5 + ["not_an_image"]
    monkeypatch.undo()
    # the same values as resizing every decoded image in batches of one size
    good = [t for t in full if isinstance(t, torch.Tensor)]
    assert torch.equal(x, prep.tt(good))
    monkeypatch.setattr(tp, "BATCH_PIXELS", 1 << 40)
    assert torch.equal(prep(batch)[0], x)
