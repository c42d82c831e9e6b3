import pytest
import torch
from torch import nn

from pipeline.backbone import (
    BackboneError,
    build_backbone,
    check_compilable,
    compile_backbone,
    create_model,
    list_layers,
    make_capture,
    pool_output,
)
from pipeline.config import BackboneConfig


def _cfg(**kw):
    base = {"model": "tf_efficientnet_lite0", "weights": "none"}
    base.update(kw)
    return BackboneConfig(**base)


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 224, 224, generator=g)


def test_layers_list_stages_with_shapes():
    infos = {i.name: i for i in list_layers("tf_efficientnet_lite0")}
    assert infos["blocks.2"].shape == (40, 28, 28)
    assert infos["blocks.6"].shape == (320, 7, 7)
    assert infos["final"].shape == (1280,)
    assert infos["logits"].shape == (1000,)
    tv = {i.name: i.shape for i in list_layers("tv:resnet18")}
    assert tv["layer3"] == (256, 14, 14) and tv["final"] == (512,)


def test_final_equals_timm_pre_logits(x):
    b = build_backbone(_cfg())
    m = b.model
    with torch.inference_mode():
        ref = m.forward_head(m.forward_features(x), pre_logits=True)
        got = b.embed(x)
    assert b.dim == 1280 and b.pool == "none"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_intermediate_equals_timm_forward_intermediates(x):
    b = build_backbone(_cfg(layer="blocks.2", pool="avg"))
    with torch.inference_mode():
        ref = b.model.forward_intermediates(x, indices=[2], intermediates_only=True)[0].mean(dim=(2, 3))
        got = b.embed(x)
    assert b.dim == 40
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_torchvision_final_is_the_classifier_input(x):
    b = build_backbone(_cfg(model="tv:resnet18"))
    m = create_model("tv:resnet18")[0]  # the same seeded init; b.model is cut before the classifier
    with torch.inference_mode():
        fc = m.fc
        m.fc = torch.nn.Identity()
        ref = m(x)
        m.fc = fc
        got = b.embed(x)
    assert b.dim == 512
    torch.testing.assert_close(got, ref)


def test_token_layer_cls_and_mean(x):
    b = build_backbone(_cfg(model="vit_tiny_patch16_224", layer="blocks.3", pool="cls"))
    with torch.inference_mode():
        tokens = b.model.forward_intermediates(x, indices=[3], intermediates_only=True, output_fmt="NLC")
        got = b.embed(x)
    # forward_intermediates drops the prefix (class) token; our cut keeps it, so compare the patch mean
    assert got.shape == (2, 192)
    bm = build_backbone(_cfg(model="vit_tiny_patch16_224", layer="blocks.3", pool="mean"))
    with torch.inference_mode():
        mean = bm.embed(x)
    torch.testing.assert_close(mean, tokens[0].mean(dim=1), rtol=1e-4, atol=1e-5)


def test_logits_and_normalize(x):
    b = build_backbone(_cfg(layer="logits", normalize=True))
    with torch.inference_mode():
        out = b.embed(x)
    assert out.shape == (2, 1000)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_random_init_is_the_same_in_every_process():
    a = build_backbone(_cfg())
    b = build_backbone(_cfg())
    assert a.weights_sha256 == b.weights_sha256 and len(a.weights_sha256) == 64


def test_pool_output_values():
    t = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    torch.testing.assert_close(pool_output(t, "avg"), t.mean(dim=(2, 3)))
    torch.testing.assert_close(pool_output(t, "max"), t.amax(dim=(2, 3)))
    assert pool_output(t, "flatten").shape == (2, 12)
    gem = pool_output(torch.full((1, 2, 3, 3), 2.0), "gem")
    torch.testing.assert_close(gem, torch.full((1, 2), 2.0))
    tok = torch.randn(2, 5, 4)
    torch.testing.assert_close(pool_output(tok, "cls", 1), tok[:, 0])
    torch.testing.assert_close(pool_output(tok, "mean", 1), tok[:, 1:].mean(dim=1))


def test_bad_model_layer_pool_name_the_fix():
    with pytest.raises(BackboneError, match="Did you mean: .*tf_efficientnet_lite0"):
        build_backbone(_cfg(model="tf_efficientnet_lite"))
    with pytest.raises(BackboneError, match=r"Valid layers: final, logits, blocks\.0"):
        build_backbone(_cfg(layer="blocks.99"))
    with pytest.raises(BackboneError, match="use one of: avg, max, gem, flatten"):
        build_backbone(_cfg(layer="blocks.2", pool="cls"))
    with pytest.raises(BackboneError, match="tv:resnet50"):
        build_backbone(_cfg(model="tv:resnet5"))


# --------------------------------------------------------------------------------------------------
# Cuts: truncated where timm/torchvision offer it, equal to plain forward hooks on the whole model

POOLS = {
    "avg": lambda t: t.mean(dim=(2, 3)),
    "max": lambda t: t.amax(dim=(2, 3)),
    "flatten": lambda t: t.flatten(1),
    "cls": lambda t: t[:, 0],
    "mean": lambda t: t[:, 1:].mean(dim=1),  # ViT: one class token
}
# timm's pre-logits head; for torchvision the input of the last linear (its classifier)
TV_CLASSIFIER = {"tv:mobilenet_v2": "classifier.1"}
_REFS: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _hooked(name: str, weights: str, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """Raw activations of ``layers`` from plain forward hooks on a fresh whole model (cached per model)."""
    key = (name, weights)
    cached = _REFS.setdefault(key, {})
    if all(layer in cached for layer in layers):
        return cached
    model = create_model(name, weights)[0]
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = [modules[layer].register_forward_hook(lambda _m, _a, out, k=layer: got.setdefault(k, out))
               for layer in layers if layer not in ("final", "logits")]
    if name in TV_CLASSIFIER:
        handles.append(modules[TV_CLASSIFIER[name]].register_forward_pre_hook(
            lambda _m, args: got.setdefault("final", args[0])))
    with torch.inference_mode():
        got["logits"] = model(x)
        if name not in TV_CLASSIFIER:
            got["final"] = model.forward_head(model.forward_features(x), pre_logits=True)
    for h in handles:
        h.remove()
    cached.update(got)
    return cached


GOLDEN = [
    *[("tf_efficientnet_lite0", "packaged", layer, pool, "truncated")
      for layer in ("blocks.2", "blocks.4", "blocks.6") for pool in ("avg", "max", "flatten")],
    ("tv:mobilenet_v2", "packaged", "features.6", "avg", "truncated"),
    ("tv:mobilenet_v2", "packaged", "final", "avg", "truncated"),
    ("tv:mobilenet_v2", "packaged", "logits", "avg", "whole"),
    ("resnet50", "none", "layer2", "avg", "truncated"),
    ("resnet50", "none", "layer3", "max", "truncated"),
    ("vit_small_patch16_224", "none", "blocks.8", "cls", "truncated"),
    ("vit_small_patch16_224", "none", "blocks.8", "mean", "truncated"),
    # not stage boundaries: the whole model with hooks
    ("tf_efficientnet_lite0", "packaged", "blocks.3", "avg", "hooks"),
    ("tf_efficientnet_lite0", "packaged", "blocks.2.0.conv_pw", "max", "hooks"),
]


@pytest.mark.parametrize("name,weights,layer,pool,cut", GOLDEN, ids=[f"{g[0]}@{g[2]}/{g[3]}" for g in GOLDEN])
def test_cut_embeddings_equal_plain_hooks_on_the_whole_model(x, name, weights, layer, pool, cut):
    b = build_backbone(_cfg(model=name, weights=weights, layer=layer, pool=pool))
    assert b.cut == cut
    with torch.inference_mode():
        got = b.embed(x)
    act = _hooked(name, weights, x, [layer])[layer]
    ref = act if act.ndim == 2 else POOLS[pool](act)
    assert got.shape == ref.shape == (2, b.dim)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


MULTI = [
    ("tf_efficientnet_lite0", "packaged", ["blocks.0", "blocks.4", "final", "logits"], "avg", "whole"),
    ("tf_efficientnet_lite0", "packaged", ["blocks.4", "blocks.1"], "avg", "truncated"),
    ("tf_efficientnet_lite0", "packaged", ["blocks.0", "blocks.3", "final"], "avg", "hooks"),
    ("tv:mobilenet_v2", "packaged", ["features.3", "features.6", "final", "logits"], "avg", "whole"),
    ("tv:mobilenet_v2", "packaged", ["final", "features.6", "features.3"], "max", "truncated"),
    ("vit_tiny_patch16_224", "none", ["blocks.1", "blocks.3", "final"], "cls", "whole"),
]


@pytest.mark.parametrize("name,weights,layers,pool,cut", MULTI, ids=["+".join(m[2]) for m in MULTI])
def test_several_layers_come_from_one_pass_equal_single_layer_backbones(x, name, weights, layers, pool, cut):
    multi = build_backbone(_cfg(model=name, weights=weights, pool=pool), layers=layers)
    assert multi.cut == cut and multi.layers == tuple(layers)
    stem = next(m for m in multi.model.modules() if isinstance(m, nn.Conv2d))
    calls = []
    handle = stem.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        outs = multi.embed_all(x)
    handle.remove()
    assert len(calls) == 1 and len(outs) == len(layers)
    for layer, out, dim in zip(layers, outs, multi.dims):
        single = build_backbone(_cfg(model=name, weights=weights, pool=pool, layer=layer))
        with torch.inference_mode():
            ref = single.embed(x)
        assert out.shape == (2, dim) and single.dim == dim
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), layer


def test_truncated_cut_drops_the_later_layers():
    full = _params(create_model("tf_efficientnet_lite0", "packaged")[0])
    b = build_backbone(_cfg(weights="packaged", layer="blocks.2"))
    names = {n for n, _ in b.model.named_modules()}
    assert b.cut == "truncated" and "blocks.2" in names and "blocks.3" not in names
    assert not any(isinstance(m, nn.Linear) for m in b.model.modules())  # the classifier is gone too
    assert _params(b.model) < full / 50  # 55,504 of 4,652,008
    hooks = build_backbone(_cfg(weights="packaged", layer="blocks.3"))
    assert hooks.cut == "hooks" and _params(hooks.model) == full

    full_tv = _params(create_model("tv:mobilenet_v2", "packaged")[0])
    tv = build_backbone(_cfg(model="tv:mobilenet_v2", weights="packaged", layer="features.6"))
    names = {n for n, _ in tv.model.named_modules()}
    assert tv.cut == "truncated" and "features.6" in names
    assert not any(n.startswith(("features.7", "classifier")) for n in names)
    assert _params(tv.model) < full_tv / 50  # 55,488 of 3,504,872
    final = build_backbone(_cfg(model="tv:mobilenet_v2", weights="packaged", layer="final"))
    assert full_tv - _params(final.model) == 1280 * 1000 + 1000  # only the classifier is dropped


def test_make_capture_on_a_cut_model_runs_each_layer_on_its_own(x):
    """The probe times each layer with make_capture(backbone.model, ...): a cut model stops at that layer."""
    for name, layers, past in [("tf_efficientnet_lite0", ["blocks.1", "blocks.4"], "blocks.3.0.conv_pw"),
                               ("tv:mobilenet_v2", ["features.3", "features.6"], "features.5.conv.0.0")]:
        b = build_backbone(_cfg(model=name, weights="packaged"), layers=layers)
        assert b.cut == "truncated"
        ref = _hooked(name, "packaged", x, layers)
        calls: list[int] = []
        handle = b.model.get_submodule(past).register_forward_hook(lambda *_, c=calls: c.append(1))
        with torch.inference_mode():
            shallow = make_capture(b.model, name, [layers[0]])(x)
            assert not calls  # the pass stopped before the deeper layer
            both = make_capture(b.model, name, layers)(x)
        handle.remove()
        assert calls and set(shallow) == {layers[0]} and set(both) == set(layers)
        assert torch.allclose(shallow[layers[0]], ref[layers[0]], rtol=1e-5, atol=1e-5)
        for layer in layers:
            assert torch.allclose(both[layer], ref[layer], rtol=1e-5, atol=1e-5)
        with pytest.raises(BackboneError, match="build the backbone with those layers"):
            make_capture(b.model, name, ["final"])


@pytest.mark.parametrize("name,layer,target", [("tf_efficientnet_lite0", "blocks.4", "forward_intermediates"),
                                               ("tv:mobilenet_v2", "features.6", "forward")])
def test_compile_backbone_on_a_truncated_cut_gives_the_same_embeddings(x, name, layer, target):
    from torch._dynamo.utils import counters

    b = build_backbone(_cfg(model=name, weights="packaged", layer=layer, pool="max"))
    assert b.cut == "truncated"
    check_compilable(b)
    with torch.inference_mode():
        plain = b.embed(x)
    graphs = counters["stats"]["unique_graphs"]
    compile_backbone(b, backend="eager")
    with torch.inference_mode():
        compiled = b.embed(x)
    assert hasattr(getattr(b.model, target), "_torchdynamo_orig_callable")
    assert counters["stats"]["unique_graphs"] > graphs  # the cut's forward was traced into a graph
    assert torch.allclose(compiled, plain, rtol=1e-5, atol=1e-5)


def test_compile_refuses_a_hook_cut_and_names_the_fix():
    check_compilable(build_backbone(_cfg(layer="final")))
    check_compilable(build_backbone(_cfg(model="tv:mobilenet_v2", layer="logits")))
    b = build_backbone(_cfg(layer="blocks.3"))
    for call in (check_compilable, compile_backbone):
        with pytest.raises(BackboneError, match=r"blocks\.4.*--set runtime\.compile=false"):
            call(b)
    assert not hasattr(b.model.forward, "_torchdynamo_orig_callable")


def test_a_cut_that_disagrees_with_the_hooks_is_not_taken(x, monkeypatch):
    import pipeline.backbone.cuts as C  # where the cut code looks up _with_prefix and _tv_graph

    full = _params(create_model("vit_tiny_patch16_224")[0])
    cut = build_backbone(_cfg(model="vit_tiny_patch16_224", layer="blocks.3", pool="cls"))
    assert cut.cut == "truncated" and len(cut.model.blocks) == 4 and _params(cut.model) < full / 2
    # a cut that loses the class token gives other tensors than the hooks: the whole model with hooks instead
    monkeypatch.setattr(C, "_with_prefix", lambda out: out[0] if isinstance(out, tuple) else out)
    b = build_backbone(_cfg(model="vit_tiny_patch16_224", layer="blocks.3", pool="cls"))
    assert b.cut == "hooks" and len(b.model.blocks) == 12 and _params(b.model) == full
    with torch.inference_mode():
        got = b.embed(x)
    ref = _hooked("vit_tiny_patch16_224", "none", x, ["blocks.3"])["blocks.3"][:, 0]
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)

    def untraceable(model, layers):
        model.train()
        raise RuntimeError("not traceable")

    monkeypatch.setattr(C, "_tv_graph", untraceable)
    tv = build_backbone(_cfg(model="tv:mobilenet_v2", weights="packaged", layer="features.6"))
    assert tv.cut == "hooks" and not any(m.training for m in tv.model.modules())


def test_grid_pools_average_each_cell_of_a_coarse_grid():
    from pipeline.backbone.cuts import pool_output

    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    g2 = pool_output(x, "grid2")
    assert g2.shape == (2, 3 * 4)
    # channel 0 of image 0, cells in row-major order: the mean of each 3x3 quarter
    assert g2[0, :4].tolist() == [x[0, 0, :3, :3].mean().item(), x[0, 0, :3, 3:].mean().item(),
                                  x[0, 0, 3:, :3].mean().item(), x[0, 0, 3:, 3:].mean().item()]
    assert pool_output(x, "grid3").shape == (2, 3 * 9)
    assert torch.allclose(pool_output(x, "grid2").reshape(2, 3, 4).mean(2), pool_output(x, "avg"))
    with pytest.raises(BackboneError, match="grid3"):
        pool_output(torch.zeros(2, 5, 8), "grid3")  # tokens: the error lists what applies
