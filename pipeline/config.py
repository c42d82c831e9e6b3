"""Typed configuration: YAML files, CLI flags and ``--set a.b=c`` overrides all map onto these models.

Unknown keys are an error. The resolved config is written next to each run's output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ConfigError(ValueError):
    """Bad configuration; the message names the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Strict):
    """Where the images are and how to read them."""

    uri: str = Field(description="local path, file://, s3://... prefix or single shard file")
    format: Literal["auto", "files", "webdataset", "parquet"] = "auto"
    labels: str = Field(
        "none",
        description="none | folder (parent folder of a file; .cls/.txt member of a WebDataset sample; the "
        "'label' column of Parquet) | <name> (a Parquet column or WebDataset member extension)",
    )
    image_column: str | None = Field(None, description="Parquet column with image bytes (auto-detected)")
    id_column: str | None = Field(None, description="Parquet column with ids (else <file>#<row>)")
    files_per_shard: int = Field(256, ge=1, description="loose image files grouped into one read task")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1, description="larger encoded images become error rows")


class BackboneConfig(_Strict):
    """The pretrained model, where it is cut, and how activations are pooled."""

    model: str = Field(description="timm model name, or tv:<torchvision name> (e.g. tv:resnet50)")
    weights: str = Field("packaged", description="none | hub | packaged | path or URI (.safetensors/.pth)")
    layer: str = Field("final", description="final | logits | a layer name from `pipeline layers`")
    pool: Literal["avg", "max", "gem", "flatten", "cls", "mean"] = "avg"
    normalize: bool = Field(False, description="L2-normalize each embedding")


class OutputConfig(_Strict):
    uri: str = Field(description="output directory (local path or object-storage URI)")
    dtype: Literal["float32", "float16"] = "float32"
    rows_per_file: int = Field(1024, ge=1, description="rows gathered before a Parquet file is written")


class RuntimeConfig(_Strict):
    """How Ray runs the work."""

    batch_size: int | None = Field(
        None, ge=1, description="images per model forward; default from the model's input size: 256 at 224 "
        "px on a GPU (64 at 448 px: the same pixels), 32 on CPU")
    actors: str = Field("1", description="N, or MIN,MAX for an autoscaling actor pool")
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    calls_per_actor: int | None = Field(None, ge=1, description="batches an actor works on at once: one "
                                        "decodes while another is in the model; default 2 with a GPU, 1 "
                                        "without (on CPU both would compete for the same cores)")
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each actor needs, e.g. {embed: 1} to keep "
        "actors on the nodes that advertise them (ray start --resources)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    autocast: Literal["none", "bf16", "fp16"] = Field("none", description="mixed precision on GPU")
    max_pixels: int = Field(50_000_000, ge=1, description="larger images are refused (decompression bombs)")
    jpeg_draft: bool = Field(False, description="decode large JPEGs at a reduced scale that still covers the "
                             "model's resize: faster on photos, not bit-equal to the full decode")
    decoder: Literal["auto", "pil", "tensor"] = Field(
        "auto", description="pil: PIL decode and transform per image; tensor: JPEGs decoded by torchvision "
        "(nvjpeg, batched, on a GPU) and resize/crop/normalize as batched tensor ops on the actor's device; "
        "auto: tensor on CUDA, pil on CPU")
    channels_last: bool | None = Field(None, description="run the model in channels-last memory format; "
                                       "default: on for CUDA actors")
    compile: bool = Field(False, description="torch.compile the model (final/logits layers): faster on GPUs "
                          "after a compile of seconds (about a minute on CPU) in each actor")
    address: str | None = Field(None, description="Ray address; default: RAY_ADDRESS or a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray started by this run")
    progress: bool = True

    @field_validator("actors")
    @classmethod
    def _check_actors(cls, v: str) -> str:
        parse_actors(v)
        return v

    def actor_range(self) -> tuple[int, int]:
        return parse_actors(self.actors)

    def batch_for(self, input_hw: tuple[int, int]) -> int:
        """The batch size: the setting, else sized from the model's input (h, w) for a GPU or CPU actor."""
        if self.batch_size is not None:
            return self.batch_size
        if self.gpus_per_actor > 0 and self.device != "cpu":
            pixels = 256 * 224 * 224 / max(input_hw[0] * input_hw[1], 1)  # 256 images of 224 px
            return int(min(1024, max(8, 2 ** round(math.log2(pixels)))))
        return 32

    def actor_calls(self) -> int:
        """Concurrent batches per actor: the setting, else 2 for a GPU actor and 1 for a CPU one."""
        if self.calls_per_actor is not None:
            return self.calls_per_actor
        return 2 if self.gpus_per_actor > 0 and self.device != "cpu" else 1


def parse_actors(v: str | int) -> tuple[int, int]:
    """'4' -> (4, 4); '1,8' -> (1, 8)."""
    parts = [p.strip() for p in str(v).split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or nums[0] < 1 or nums[1] < nums[0]:
        raise ValueError(
            f"actors must be N or MIN,MAX with 1 <= MIN <= MAX, got '{v}' (e.g. --actors 2 or 1,8)"
        )
    return nums[0], nums[1]


class ExtractConfig(_Strict):
    """Everything `pipeline extract` needs."""

    source: SourceConfig
    backbone: BackboneConfig
    output: OutputConfig
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _check(self) -> ExtractConfig:
        if self.source.uri.rstrip("/") == self.output.uri.rstrip("/"):
            raise ValueError("output.uri must differ from source.uri: write the embeddings somewhere else")
        return self


class NightlyConfig(ExtractConfig):
    """`jobs/nightly.py`: an incremental extract, then the current head over the night's new rows."""

    head: str | None = Field(None, description="a `heads train` output folder; omit to only extract")
    predictions: str | None = Field(None, description="predictions go to <this>/predictions/run_date=.../ "
                                    "(default: output.uri)")
    top_k: int = Field(1, ge=1)


class ClassifyConfig(_Strict):
    """`pipeline classify`: the pretrained classifier as is, top-k ImageNet classes per image."""

    source: SourceConfig
    backbone: BackboneConfig
    output: OutputConfig
    runtime: RuntimeConfig = RuntimeConfig()
    top_k: int = Field(5, ge=1)


class ProbeConfig(_Strict):
    """`pipeline probe`: which backbone and layer give the best head on a labelled sample."""

    source: SourceConfig
    output: OutputConfig
    runtime: RuntimeConfig = RuntimeConfig()
    models: list[str] = Field(min_length=1, description="backbones to compare")
    weights: str = "packaged"
    layers: list[str] = Field(["final"], min_length=1, description="layer names, or ['all'] for every stage")
    pool: Literal["avg", "max", "gem", "flatten", "cls", "mean"] = "avg"
    sample: int | None = Field(None, ge=2, description="use at most this many images")
    head: Literal["linear", "mlp"] = "linear"
    val_fraction: float = Field(0.2, gt=0, lt=1)
    epochs: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ProbeConfig:
        if self.source.labels == "none":
            raise ValueError("probe needs labels: pass --labels folder (or a column/member name)")
        return self

    @field_validator("models", "layers", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v


# --------------------------------------------------------------------------------------------------
# Building configs from files, flags and --set overrides


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (source:, backbone: ...)")
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for dotted='a.b'."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set '{dotted}': '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``a.b=c`` strings; values are parsed as YAML (numbers, true/false, null, [lists], {maps})."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set takes KEY=VALUE (e.g. --set runtime.batch_size=64), got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        set_path(data, key.strip(), value)


_REQUIRED_FLAGS = {
    "source": "--source", "source.uri": "--source", "output": "--output", "output.uri": "--output",
    "backbone": "--model", "backbone.model": "--model",
}


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}' (check the spelling; see `pipeline extract --help`)")
        elif e["type"] == "missing":
            flag = _REQUIRED_FLAGS.get(loc)
            lines.append(f"missing '{loc}'" + (f" (pass {flag})" if flag else ""))
        else:
            lines.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(lines)


def build(model: type[BaseModel], data: dict[str, Any]):
    """Validate a nested dict into a config model, with one readable error line."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid configuration: {_format_errors(e)}") from None


def merge_sources(
    model: type[BaseModel],
    config_file: str | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
):
    """Config file < flags < --set overrides. Flags are dotted keys; None values are ignored."""
    data: dict[str, Any] = load_yaml(config_file) if config_file else {}
    for key, value in (flags or {}).items():
        if value is not None:
            set_path(data, key, value)
    apply_overrides(data, overrides or [])
    return build(model, data)


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
