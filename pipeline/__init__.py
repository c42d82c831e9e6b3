"""Batch transfer learning on Ray: pretrained vision backbones turned into embeddings in Parquet.

    from pipeline import extract, ExtractConfig, read_embeddings

    table = read_embeddings("out/")  # the committed rows of an output, one consistent snapshot
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ExtractConfig", "extract", "read_embeddings", "snapshot_files", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `pipeline --help` should not import torch
    if name == "ExtractConfig":
        from pipeline.config import ExtractConfig

        return ExtractConfig
    if name == "extract":
        from pipeline.commands.extract import extract

        return extract
    if name in ("read_embeddings", "snapshot_files"):
        from pipeline.output import reader

        return getattr(reader, name)
    raise AttributeError(name)
