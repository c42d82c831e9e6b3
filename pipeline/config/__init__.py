"""Typed configuration: YAML files, CLI flags and ``--set a.b=c`` overrides all map onto these models
(`pipeline.config.files` reads and merges them).

Unknown keys are an error. The resolved config is written next to each run's output.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The decode limits' defaults, for every command (runtime.max_pixels, source.max_bytes).
MAX_PIXELS = 50_000_000
MAX_BYTES = 64 * 1024 * 1024
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ConfigError(ValueError):
    """Bad configuration; the message names the fix."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(StrictModel):
    """Where the images are and how to read them."""

    uri: str = Field(description="local path, file://, s3://... prefix or single shard file; or a manifest "
                     "(CSV/Parquet of object URIs, an S3 Inventory manifest.json)")
    format: Literal["auto", "files", "webdataset", "parquet", "manifest"] = "auto"
    root: str | None = Field(None, description="the root ids are relative to (default: uri); a run may read "
                             "any folder under it; runs over different folders accumulate into one output")
    split_depth: int | None = Field(None, ge=0, description="loose-file shards never span two folders this "
                                    "many levels below root (default: the output's, else the depth of uri "
                                    "below root)")
    on_removed: Literal["delete", "keep"] = Field(
        "delete", description="rows of images that left the source: delete (the output mirrors the source) "
        "or keep (marked in the ledger, never embedded again)")
    uri_column: str | None = Field(None, description="a manifest's column of object URIs (auto-detected)")
    labels: str = Field(
        "none",
        description="none | folder (parent folder of a file; .cls/.txt member of a WebDataset sample; the "
        "'label' column of Parquet) | <name> (a Parquet column or WebDataset member extension)",
    )
    image_column: str | None = Field(None, description="Parquet column with image bytes (auto-detected)")
    id_column: str | None = Field(None, description="Parquet or manifest column with ids (else <file>#<row>, "
                                  "or the object's path below root)")
    files_per_shard: int = Field(256, ge=1, description="at most this many loose image files in one read "
                                 "task (shards are cut by path: about 110 on average for 256)")
    max_bytes: int = Field(MAX_BYTES, ge=1, description="larger encoded images become error rows")
    fingerprint: Literal["stat", "content"] = Field("stat", description="what tells a changed file: stat "
                                                    "(size and mtime or ETag) or content (a hash of its "
                                                    "bytes, read at listing: an edit keeping both counts)")


class BackboneConfig(StrictModel):
    """The pretrained model, where it is cut, and how activations are pooled."""

    model: str = Field(description="timm model name, or tv:<torchvision name> (e.g. tv:resnet50)")
    weights: str = Field("packaged", description="none | hub | packaged | path or URI (.safetensors/.pth)")
    layer: str = Field("final", description="final | logits | a layer name from `pipeline layers`")
    pool: Literal["avg", "max", "gem", "flatten", "grid2", "grid3", "cls", "mean"] = "avg"
    normalize: bool = Field(False, description="L2-normalize each embedding")


class OutputConfig(StrictModel):
    uri: str = Field(description="output directory (local path or object-storage URI)")
    dtype: Literal["float32", "float16"] = "float32"
    rows_per_file: int = Field(1024, ge=1, description="rows gathered before a Parquet file is written")


class RayRuntime(StrictModel):
    """What every command that runs on Ray shares: where Ray is, the decode limit, progress output."""

    address: str | None = Field(None, description="Ray address; default: RAY_ADDRESS or a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray started by this run")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="larger images are refused (decompression bombs)")
    progress: bool = True
    autoscaling: bool | None = Field(None, description="whether the cluster can start nodes; default: read "
                                     "from the autoscaler's node groups")
    resource_wait_s: float = Field(600.0, gt=0, description="on an autoscaling cluster, how long to wait for "
                                   "a node that fits one actor (or worker) before giving up")
    stall_timeout_s: float = Field(600.0, gt=0, description="a run that makes no progress for this long ends "
                                   "with the operator that stalled and what it waits for")


class RuntimeConfig(RayRuntime):
    """How Ray runs the Embedder's actor pool (extract, classify, probe, heads predict)."""

    batch_size: int | None = Field(
        None, ge=1, description="images per actor call (the model runs them in forwards of forward_batch); "
        "default from the model's input size: 256 at 224 px on a GPU (64 at 448 px: the same pixels), 32 on "
        "CPU")
    forward_batch: int | None = Field(
        None, ge=1, description="images per model forward inside a batch; default: the whole batch on a GPU; "
        "on CPU planned from the model's largest activation, so that one forward's tensors stay under 32 MiB")
    actors: str | None = Field(None, description="N, or MIN,MAX for an autoscaling actor pool; default: "
                               "planned from the cluster (one per GPU; on CPUs, enough to fill the nodes)")
    gpus_per_actor: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs")
    cpus_per_actor: float | None = Field(None, gt=0, description="default: planned from the nodes' CPUs")
    threads: int | None = Field(None, ge=1, description="torch threads in each actor; default: its CPUs")
    calls_per_actor: int | None = Field(None, ge=1, description="batches an actor works on at once: one "
                                        "decodes while another is in the model; default 2 with a GPU, 1 "
                                        "without (on CPU both would compete for the same cores)")
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each actor needs, e.g. {embed: 1} to keep "
        "actors on the nodes that advertise them (ray start --resources)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    autocast: Literal["auto", "none", "bf16", "bf16-stem-fp32", "fp16"] = Field(
        "auto", description="mixed precision; auto: bf16 where the device computes it natively (GPUs since "
        "Ampere, CPUs with AVX-512 BF16 or AMX) and the model's embeddings keep cosine 0.999 to fp32 "
        "(bf16-stem-fp32: the stem and first stage in fp32, the rest in bf16, when only that keeps it), "
        "fp16 on older GPUs, else none (fp32)")
    jpeg_draft: bool = Field(False, description="decode large JPEGs at a reduced scale that still covers the "
                             "model's resize: faster on photos, not bit-equal to the full decode")
    decoder: Literal["auto", "pil", "tensor"] = Field(
        "auto", description="pil: PIL decode and transform per image; tensor: JPEGs decoded by torchvision "
        "(nvjpeg, batched, on a GPU) and resize/crop/normalize as batched tensor ops on the actor's device; "
        "auto: planned (tensor wherever it reproduces the model's transform, else pil)")
    channels_last: bool | None = Field(None, description="run the model in channels-last memory format; "
                                       "default: on for CUDA actors and bf16 on CPU")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the cut model in each actor; auto: on GPUs when the listed images "
        "repay the compile (seconds each actor); CPUs stay eager, where activations run fused into the "
        "convolutions")
    @field_validator("decoder", mode="before")
    @classmethod
    def _check_decoder(cls, v: Any) -> Any:
        if v not in ("auto", "pil", "tensor"):
            raise ValueError(f"decoder must be auto, pil or tensor, got '{v}' (--set runtime.decoder=...)")
        return v

    @field_validator("actors", mode="before")
    @classmethod
    def _check_actors(cls, v: Any) -> Any:
        if v is not None:
            parse_actors(v)
            return str(v)
        return v

    def actor_range(self) -> tuple[int, int]:
        """(min, max) actors; (1, 1) while the planner has not chosen."""
        return parse_actors(self.actors or "1")

    def batch_for(self, input_hw: tuple[int, int]) -> int:
        """The batch size: the setting, else sized from the model's input (h, w) for a GPU or CPU actor."""
        if self.batch_size is not None:
            return self.batch_size
        if (self.gpus_per_actor or 0) > 0 and self.device != "cpu":
            pixels = 256 * 224 * 224 / max(input_hw[0] * input_hw[1], 1)  # 256 images of 224 px
            return int(min(1024, max(8, 2 ** round(math.log2(pixels)))))
        return 32

    def actor_calls(self) -> int:
        """Concurrent batches per actor: the setting, else 2 for a GPU actor and 1 for a CPU one."""
        if self.calls_per_actor is not None:
            return self.calls_per_actor
        return 2 if (self.gpus_per_actor or 0) > 0 and self.device != "cpu" else 1


def check_distinct(source_uri: str, output_uri: str, what: str) -> None:
    """ValueError when a command would write into what it reads."""
    if source_uri.rstrip("/") == output_uri.rstrip("/"):
        raise ValueError(what)


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


class ExtractConfig(StrictModel):
    """Everything `pipeline extract` needs."""

    source: SourceConfig
    backbone: BackboneConfig
    output: OutputConfig
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _check(self) -> ExtractConfig:
        check_distinct(self.source.uri, self.output.uri,
                       "output.uri must differ from source.uri: write the embeddings somewhere else")
        return self


class NightlyConfig(ExtractConfig):
    """`jobs/nightly.py`: an incremental extract, then the current head over the night's new rows."""

    head: str | None = Field(None, description="a `heads train` output folder; omit to only extract")
    predictions: str | None = Field(None, description="predictions go to <this>/predictions/run_date=.../ "
                                    "(default: output.uri)")
    top_k: int = Field(1, ge=1)
    index: str | None = Field(None, description="an index folder (`pipeline index build`): the night's new "
                              "embedding files are added to it after the extract")


class ClassifyConfig(StrictModel):
    """`pipeline classify`: the pretrained classifier as is, top-k ImageNet classes per image."""

    source: SourceConfig
    backbone: BackboneConfig
    output: OutputConfig
    runtime: RuntimeConfig = RuntimeConfig()
    top_k: int = Field(5, ge=1)


class ProbeConfig(StrictModel):
    """`pipeline probe`: which backbone and layer give the best head on a labelled sample.

    ``backbone`` is the section every command shares (its weights, pool and normalize apply to each model
    compared; its layer is replaced by ``layers``); ``models`` lists the backbones to compare (default:
    backbone.model).
    """

    source: SourceConfig
    output: OutputConfig
    runtime: RuntimeConfig = RuntimeConfig()
    backbone: BackboneConfig
    models: list[str] = Field(default_factory=list, description="backbones to compare (default: "
                              "backbone.model)")
    layers: list[str] = Field(["final"], min_length=1, description="layer names, or ['all'] for every stage")
    sample: int | None = Field(None, ge=2, description="use at most this many images")
    head: Literal["linear", "mlp"] = "linear"
    val_fraction: float = Field(0.2, gt=0, lt=1)
    epochs: int = Field(200, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _first_model(cls, data: Any) -> Any:
        """backbone.model defaults to the first of ``models``."""
        if not isinstance(data, dict) or data.get("models") is None:
            return data
        models = cls._split(data["models"])
        backbone = dict(data.get("backbone") or {})
        if models and "model" not in backbone:
            data = {**data, "backbone": {**backbone, "model": models[0]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> ProbeConfig:
        if self.source.labels == "none":
            raise ValueError("probe needs labels: pass --labels folder (or a column/member name)")
        return self

    @field_validator("models", "layers", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    def model_names(self) -> list[str]:
        return list(self.models) or [self.backbone.model]


class HeadTrainConfig(StrictModel):
    """Everything `pipeline heads train` needs."""

    embeddings: str = Field(description="an extract OUTPUT folder, or its embeddings/ folder")
    output: str = Field(description="folder for head.safetensors, head.json, report.png")
    head: Literal["linear", "mlp"] = "linear"
    hidden: list[int] = Field(default_factory=lambda: [512], description="MLP hidden sizes")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1, description="minibatch rows; smaller for tables under "
                            "32 batches (an epoch takes at least 32 steps)")
    lr: float | None = Field(None, gt=0.0, description="AdamW learning rate; default 1e-2 for linear, "
                             "1e-3 for mlp; halved when the validation loss stalls")
    weight_decay: float = Field(1e-4, ge=0.0)
    patience: int = Field(10, ge=1, description="epochs without a better validation loss before stopping")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0
    class_weight: Literal["none", "balanced"] = "balanced"
    labels_from: str | None = Field(None, description="Parquet table (id, label) joined on id; replaces the "
                                    "label column")
    test: str | None = Field(None, description="held-out embeddings evaluated at the end")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_rows_in_memory: int = Field(2_000_000, ge=1, description="above this many rows, stream from storage")

    @model_validator(mode="after")
    def _check(self) -> HeadTrainConfig:
        if self.head == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise ValueError("hidden must list at least one positive size for an mlp head (e.g. [512])")
        check_distinct(self.embeddings, self.output,
                       "output must differ from embeddings: write the head somewhere else")
        return self


class TrainConfig(StrictModel):
    """Fine-tuning's optimisation: epochs, learning rates, freezing, split."""

    epochs: int = Field(5, ge=1, description="total epochs; a rerun with more continues from the last "
                        "checkpoint")
    lr: float = Field(5e-4, gt=0, description="AdamW peak learning rate of the new head (and of every layer "
                      "when lr_decay is 1)")
    lr_decay: float = Field(1.0, gt=0, le=1, description="per stage below the head the learning rate is "
                            "multiplied by this (discriminative learning rates; 1 = the same everywhere)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (none for biases and norms)")
    freeze_until: str = Field("none", description="none | final (train the new head only) | a layer name "
                              "from `pipeline layers`: it, the stem and everything before it stay frozen")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    batch_size: int = Field(32, ge=1, description="images per worker per step")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="validation share, split by a hash of id")
    seed: int = 0
    shuffle_buffer: int = Field(1024, ge=1, description="rows in each worker's local shuffle buffer")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept under OUTPUT/checkpoints/")


class FinetuneRuntime(RayRuntime):
    """How Ray Train runs fine-tuning."""

    workers: int | None = Field(None, ge=1, description="Ray Train workers (DDP processes); default: one per "
                                "GPU, on CPUs 1-4 by the CPUs")
    cpus_per_worker: float | None = Field(None, gt=0, description="default: planned so that CPUs stay free "
                                          "for the Ray Data tasks that feed the workers")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per worker; default: 1 when the "
                                          "cluster has GPUs")
    autocast: Literal["auto", "none", "bf16", "fp16"] = Field(
        "auto", description="mixed precision on GPU; auto: bf16 (fp16 on GPUs without bf16), none on CPU")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1: "
                              "unlimited)")


class FinetuneConfig(StrictModel):
    """Everything `pipeline finetune` needs. ``backbone`` is the section every command shares (its model and
    weights are the starting point)."""

    source: SourceConfig
    output: OutputConfig
    backbone: BackboneConfig
    train: TrainConfig = TrainConfig()
    runtime: FinetuneRuntime = FinetuneRuntime()

    @model_validator(mode="before")
    @classmethod
    def _folder_labels(cls, data: Any) -> Any:
        """source.labels defaults to folder: fine-tuning needs labels."""
        if not isinstance(data, dict):
            return data
        source = data.get("source")
        if isinstance(source, dict) and "labels" not in source:
            data["source"] = {**source, "labels": "folder"}
        return data

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.source.labels == "none":
            raise ValueError("finetune needs labels: pass --labels folder (one folder per class) or a "
                             "Parquet column / WebDataset member name")
        check_distinct(self.source.uri, self.output.uri,
                       "output.uri must differ from source.uri: write the fine-tuned model elsewhere")
        return self


class IndexBuildConfig(StrictModel):
    """`pipeline index build`: a nearest-neighbour index over an embeddings table."""

    embeddings: str = Field(description="an extract OUTPUT folder, or its embeddings/ folder")
    output: str = Field(description="the index folder: index.faiss, ids.parquet, index.json")
    metric: Literal["cosine", "l2"] = "cosine"
    kind: Literal["auto", "flat", "ivfpq", "hnsw"] = Field(
        "auto", description="auto: exact search up to 100k vectors, IVF-PQ above")
    max_memory: str = Field("4GB", description="memory budget of the index (sizes the IVF-PQ codes)")
    recall_queries: int = Field(1000, ge=0, description="held-out queries for recall@10 (0: not measured)")
    seed: int = 0
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _check(self) -> IndexBuildConfig:
        check_distinct(self.embeddings, self.output,
                       "output must differ from embeddings: write the index somewhere else")
        return self


class IndexAddConfig(StrictModel):
    """`pipeline index add`: the embedding files an index does not hold yet, without retraining."""

    index: str = Field(description="an index folder made by `pipeline index build`")
    embeddings: str | None = Field(None, description="the table to add from (default: the one it was built "
                                   "from)")
    recall_queries: int | None = Field(None, ge=0, description="held-out queries for recall@10 (default: "
                                       "as at build)")
    runtime: RuntimeConfig = RuntimeConfig()


class NeighborsConfig(StrictModel):
    """`pipeline neighbors`: the k nearest rows of an index for each query (images, ids or embeddings)."""

    index: str = Field(description="an index folder made by `pipeline index build`")
    output: str = Field(description="neighbours go to OUTPUT/neighbors/*.parquet")
    k: int = Field(10, ge=1, description="neighbours per query")
    images: SourceConfig | None = Field(None, description="query images (embedded with the index's spec)")
    ids: str | None = Field(None, description="Parquet file or folder with an id column: rows of the index's "
                            "table")
    embeddings: str | None = Field(None, description="an embeddings table of the index's spec")
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _check(self) -> NeighborsConfig:
        given = [n for n in ("images", "ids", "embeddings") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("pass exactly one of --images URI, --ids FILE or --embeddings URI"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


class DedupConfig(StrictModel):
    """`pipeline dedup`: semantic near-duplicates, clusters and outliers of an embeddings table."""

    embeddings: str = Field(description="an extract OUTPUT folder, or its embeddings/ folder")
    output: str = Field(description="duplicates.parquet, keep.parquet, clusters.parquet, dedup.json, "
                        "dedup.png")
    threshold: float = Field(0.8, gt=0, le=1, description="cosine similarity at or above which two rows "
                             "are near-duplicates (chosen for tf_efficientnet_lite0 --layer blocks.5 --pool "
                             "grid3; another model, layer or pooling has another scale: see dedup.json's "
                             "by_threshold)")
    clusters: int | None = Field(None, ge=1, description="k-means clusters (default: about sqrt(rows))")
    groups: int | None = Field(None, ge=1, description="clusters are spread over this many tasks "
                               "(default: 4 per CPU, at most the clusters)")
    sample: int = Field(100_000, ge=1, description="rows sampled to train k-means")
    keep: Literal["largest", "first", "centroid"] = Field(
        "largest", description="the row a group keeps: most pixels, lossless, bigger file, id | id | centre")
    outlier_k: int = Field(10, ge=1, le=1000, description="outlier_score: cosine distance to the k-th row")
    seed: int = 0
    report_pairs: int = Field(8, ge=0, description="duplicate pairs shown in dedup.png")
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _check(self) -> DedupConfig:
        check_distinct(self.embeddings, self.output,
                       "output must differ from embeddings: write the dedup results somewhere else")
        return self

# --------------------------------------------------------------------------------------------------
# Building configs from files, flags and --set overrides
