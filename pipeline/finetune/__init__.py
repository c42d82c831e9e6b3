"""Fine-tuning a pretrained backbone (weight initialization): the Ray-free parts.

``pipeline.ray.train`` wires these into Ray Train: labelled rows stream from the same sources as ``extract``,
each Train worker decodes and augments its batches (``TrainBatches``, with the Embedder's Preprocessor),
and ``train_epoch`` / ``evaluate`` run one pass over any iterable of ``{"x", "y", "failed"}`` tensor batches.

The model is the pretrained backbone with a new classifier sized to the labels. Layers can be frozen up to a
named module (``freeze_until``, names as ``pipeline layers`` prints them; the stem and that module included),
and the remaining ones trained with a learning rate that shrinks by ``lr_decay`` per stage going down from
the head (discriminative learning rates). AdamW, cosine schedule over all steps, bf16 autocast on GPU.

The settings are config.py's ``FinetuneConfig``. Modules: ``data`` (labels, shards, rows of one split
side, batch decoding), ``model`` (classifier, freezing, parameter groups), ``loop`` (one epoch, metrics
sums, seeding) and ``artifacts`` (checkpoints, resume, the written model and head). The split is
split.py's. Nothing here imports torch at import time: Ray Data tasks that only select rows stay light.
"""

from pipeline.config import FinetuneConfig, FinetuneRuntime, TrainConfig
from pipeline.finetune.artifacts import (
    ARTIFACTS,
    BACKBONE_FILE,
    CHECKPOINTS_DIR,
    CKPT_MODEL,
    CKPT_OPTIMIZER,
    CKPT_STATE,
    ERROR_PARTS,
    ERRORS_DIR,
    ERRORS_NAME,
    FINETUNE_JSON,
    HEAD_DIR,
    REPORT_PNG,
    RESUME_KEYS,
    backbone_bytes,
    checkpoint_name,
    head_from_classifier,
    latest_checkpoint,
    load_checkpoint_model,
    load_checkpoint_optimizer,
    load_checkpoint_state,
    resume_differences,
    resume_fingerprint,
    save_checkpoint,
    write_artifacts,
)
from pipeline.finetune.data import TrainBatches, folder_labels, mixed_shards, select_rows
from pipeline.finetune.loop import (
    EpochSums,
    all_reduce,
    cosine_factor,
    epoch_line,
    evaluate,
    seed_everything,
    train_epoch,
)
from pipeline.finetune.model import (
    TrainingModel,
    apply_freeze,
    build_training_model,
    data_config,
    freeze_choices,
    frozen_modules,
    frozen_stat_modules,
    make_optimizer,
    param_groups,
    replace_classifier,
    stage_depths,
    transforms,
    unwrap,
)
from pipeline.split import Split, make_split

__all__ = [
    "ARTIFACTS", "BACKBONE_FILE", "CHECKPOINTS_DIR", "CKPT_MODEL", "CKPT_OPTIMIZER", "CKPT_STATE",
    "ERROR_PARTS", "ERRORS_DIR", "ERRORS_NAME",
    "FINETUNE_JSON", "HEAD_DIR", "REPORT_PNG", "RESUME_KEYS",
    "EpochSums", "FinetuneConfig", "FinetuneRuntime", "Split", "TrainBatches", "TrainConfig", "TrainingModel",
    "all_reduce", "apply_freeze", "backbone_bytes", "build_training_model", "checkpoint_name",
    "cosine_factor", "data_config", "epoch_line", "evaluate", "folder_labels", "freeze_choices",
    "frozen_modules", "frozen_stat_modules", "head_from_classifier", "latest_checkpoint",
    "load_checkpoint_model", "load_checkpoint_optimizer", "load_checkpoint_state", "make_optimizer",
    "make_split", "mixed_shards", "param_groups", "replace_classifier", "resume_differences",
    "resume_fingerprint", "save_checkpoint", "seed_everything", "select_rows", "stage_depths",
    "train_epoch", "transforms", "unwrap", "write_artifacts",
]
