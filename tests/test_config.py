import pytest

from pipeline.config import ConfigError, ExtractConfig, parse_actors
from pipeline.config.files import build, merge_sources, to_yaml


def _flags(**kw):
    base = {"source.uri": "/data/in", "output.uri": "/data/out", "backbone.model": "tf_efficientnet_lite0"}
    base.update(kw)
    return base


def test_flags_build_a_config_with_defaults():
    cfg = merge_sources(ExtractConfig, flags=_flags())
    assert cfg.backbone.layer == "final"
    assert cfg.backbone.weights == "packaged"
    assert cfg.runtime.actor_range() == (1, 1)


def test_file_then_flags_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("source: {uri: /a}\noutput: {uri: /b}\nbackbone: {model: m, layer: blocks.2}\n"
                 "runtime: {batch_size: 8}\n")
    cfg = merge_sources(ExtractConfig, str(f), {"runtime.batch_size": 16, "backbone.layer": None},
                        ["runtime.actors=1,4", "backbone.normalize=true"])
    assert cfg.source.uri == "/a"
    assert cfg.backbone.layer == "blocks.2"  # a None flag does not override the file
    assert cfg.runtime.batch_size == 16
    assert cfg.runtime.actor_range() == (1, 4)
    assert cfg.backbone.normalize is True


def test_unknown_key_is_an_error_that_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'backbone.layr'"):
        merge_sources(ExtractConfig, flags=_flags(), overrides=["backbone.layr=final"])
    f = tmp_path / "c.yaml"
    f.write_text("source: {uri: /a}\noutput: {uri: /b}\nbackbone: {model: m}\nextra: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'extra'"):
        merge_sources(ExtractConfig, str(f))


def test_bad_values_name_the_fix():
    with pytest.raises(ConfigError, match="MIN,MAX"):
        merge_sources(ExtractConfig, flags=_flags(**{"runtime.actors": "4,2"}))
    with pytest.raises(ConfigError, match=r"missing 'backbone' \(pass --model\)"):
        merge_sources(ExtractConfig, flags=_flags(**{"backbone.model": None}))
    with pytest.raises(ConfigError, match="pool"):
        merge_sources(ExtractConfig, flags=_flags(**{"backbone.pool": "median"}))
    with pytest.raises(ConfigError, match="must differ"):
        merge_sources(ExtractConfig, flags=_flags(**{"output.uri": "/data/in/"}))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        merge_sources(ExtractConfig, flags=_flags(), overrides=["runtime.batch_size"])
    with pytest.raises(ConfigError, match="not found"):
        merge_sources(ExtractConfig, "/no/such/file.yaml")


def test_parse_actors():
    assert parse_actors("3") == (3, 3)
    assert parse_actors("1, 8") == (1, 8)
    for bad in ("0", "a", "2,1", "1,2,3"):
        with pytest.raises(ValueError):
            parse_actors(bad)


def test_yaml_round_trip(tmp_path):
    cfg = merge_sources(ExtractConfig, flags=_flags(**{"output.dtype": "float16"}))
    f = tmp_path / "r.yaml"
    f.write_text(to_yaml(cfg))
    assert merge_sources(ExtractConfig, str(f)) == cfg


def test_set_takes_lists_and_maps():
    from pipeline.heads import HeadTrainConfig

    cfg = merge_sources(HeadTrainConfig, flags={"embeddings": "/e", "output": "/o", "head": "mlp"},
                        overrides=["hidden=[512,256]", "dropout=0.2"])
    assert cfg.hidden == [512, 256] and cfg.dropout == 0.2
    cfg = merge_sources(ExtractConfig, flags=_flags(), overrides=["runtime.actor_resources={embed: 1}"])
    assert cfg.runtime.actor_resources == {"embed": 1.0}
    with pytest.raises(ConfigError, match="hidden"):
        merge_sources(HeadTrainConfig, flags={"embeddings": "/e", "output": "/o"}, overrides=["hidden=[a]"])


def test_calls_per_actor_defaults_to_overlap_only_with_a_gpu():
    cpu = merge_sources(ExtractConfig, flags=_flags())
    assert cpu.runtime.actor_calls() == 1
    gpu = merge_sources(ExtractConfig, flags=_flags(), overrides=["runtime.gpus_per_actor=1"])
    assert gpu.runtime.actor_calls() == 2
    set_ = merge_sources(ExtractConfig, flags=_flags(), overrides=["runtime.calls_per_actor=3"])
    assert set_.runtime.actor_calls() == 3


def test_batch_size_defaults_from_the_models_input_size():
    cpu = merge_sources(ExtractConfig, flags=_flags())
    assert cpu.runtime.batch_size is None and cpu.runtime.batch_for((224, 224)) == 32
    gpu = merge_sources(ExtractConfig, flags=_flags(), overrides=["runtime.gpus_per_actor=1"]).runtime
    assert gpu.batch_for((224, 224)) == 256  # about the same pixels per batch at every input size:
    assert gpu.batch_for((448, 448)) == 64 and gpu.batch_for((384, 384)) == 64
    assert gpu.batch_for((160, 160)) == 512 and gpu.batch_for((64, 64)) == 1024  # capped
    assert gpu.batch_for((2048, 2048)) == 8
    forced_cpu = gpu.model_copy(update={"device": "cpu"})
    assert forced_cpu.batch_for((224, 224)) == 32
    set_ = merge_sources(ExtractConfig, flags=_flags(),
                         overrides=["runtime.gpus_per_actor=1", "runtime.batch_size=48"]).runtime
    assert set_.batch_for((448, 448)) == 48


def test_every_command_takes_the_one_backbone_section_and_names_it_for_a_misplaced_key():
    from pipeline.config import FinetuneConfig, ProbeConfig

    base = {"source": {"uri": "/in", "labels": "folder"}, "output": {"uri": "/out"}}
    bb = {"model": "tf_efficientnet_lite0", "weights": "none"}
    new = FinetuneConfig.model_validate({**base, "backbone": bb})
    assert new.backbone.model == "tf_efficientnet_lite0" and new.backbone.weights == "none"
    with pytest.raises(ConfigError, match=r"unknown key 'weights': it belongs in the backbone section "
                                          r"\(backbone.weights, or --weights\)"):
        build(FinetuneConfig, {**base, "backbone": {"model": "tf_efficientnet_lite0"}, "weights": "none"})
    probe = ProbeConfig.model_validate({**base, "models": "tf_efficientnet_lite0,tv:mobilenet_v2",
                                        "backbone": {"weights": "none", "pool": "max"}})
    assert probe.backbone.weights == "none" and probe.backbone.pool == "max"
    assert probe.model_names() == ["tf_efficientnet_lite0", "tv:mobilenet_v2"]
    one = ProbeConfig.model_validate({**base, "backbone": bb})
    assert one.model_names() == ["tf_efficientnet_lite0"]
    with pytest.raises(ConfigError, match=r"missing 'backbone' \(pass --model\)"):
        merge_sources(FinetuneConfig, flags={"source.uri": "/in", "output.uri": "/out"})


def test_runtime_sections_share_one_base_and_one_set_of_decode_limits():
    from pipeline.config import MAX_BYTES, MAX_PIXELS, FinetuneRuntime, RayRuntime, RuntimeConfig

    assert issubclass(RuntimeConfig, RayRuntime) and issubclass(FinetuneRuntime, RayRuntime)
    assert RuntimeConfig().max_pixels == FinetuneRuntime().max_pixels == MAX_PIXELS
    assert merge_sources(ExtractConfig, flags=_flags()).source.max_bytes == MAX_BYTES
    with pytest.raises(ConfigError, match="decoder must be auto, pil or tensor"):
        merge_sources(ExtractConfig, flags=_flags(), overrides=["runtime.decoder=nvjpeg"])
