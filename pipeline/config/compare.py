"""`pipeline compare`'s configuration: the three ways to reuse a pretrained model, measured on one split."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from pipeline.config import (
    BackboneConfig,
    OutputConfig,
    RuntimeConfig,
    SourceConfig,
    StrictModel,
    check_distinct,
)


class CompareConfig(StrictModel):
    """`pipeline compare`: the pretrained classifier as is, a head on features cut at each candidate layer,
    and fine-tuning at two depths, on one labelled sample and one hash-of-id split, with their costs.

    ``backbone`` is the section every command shares (its weights and pool apply to every model compared);
    ``models`` lists the backbones (default: backbone.model).
    """

    source: SourceConfig
    output: OutputConfig
    backbone: BackboneConfig
    runtime: RuntimeConfig = RuntimeConfig()
    models: list[str] = Field(default_factory=list, description="backbones to compare (default: "
                              "backbone.model)")
    layers: list[str] = Field(["all"], min_length=1, description="candidate cuts of the feature arm, or "
                              "['all'] for every stage plus final; logits are always extracted (the "
                              "classifier arm reads them)")
    sample: int | None = Field(None, ge=2, description="use at most this many images (loose files by a hash "
                               "of their path; whole shards of tar and Parquet sources)")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="validation share, split by a hash of id, the "
                                "same rows for every arm")
    min_val_per_class: int = Field(10, ge=1, description="refuse before any work when a class has fewer "
                                   "validation images than this")
    epochs: int = Field(2, ge=1, description="fine-tuning epochs of each fine-tuned arm")
    head_epochs: int = Field(200, ge=1, description="most epochs of each head of the feature arm (early "
                             "stopping on the validation loss)")
    label_map: str | None = Field(None, description="YAML or CSV file: user label -> ImageNet class names or "
                                  "indices, for the classifier arm (default: exact class-name matches)")
    tolerance: float = Field(0.01, ge=0, lt=1, description="arms within this much validation accuracy of the "
                             "best compete on cost per image")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """backbone.model defaults to the first of ``models``; source.labels to folder."""
        if not isinstance(data, dict):
            return data
        source = data.get("source")
        if isinstance(source, dict) and source.get("labels") is None:
            data = {**data, "source": {**source, "labels": "folder"}}
        if data.get("models") is not None:
            models = cls._split(data["models"])
            backbone = dict(data.get("backbone") or {})
            if models and "model" not in backbone:
                data = {**data, "backbone": {**backbone, "model": models[0]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        if self.source.labels == "none":
            raise ValueError("compare needs labels: pass --labels folder (one folder per class) or a Parquet "
                             "column / WebDataset member name")
        check_distinct(self.source.uri, self.output.uri,
                       "output.uri must differ from source.uri: write the comparison elsewhere")
        return self

    @field_validator("models", "layers", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    def model_names(self) -> list[str]:
        return list(self.models) or [self.backbone.model]
