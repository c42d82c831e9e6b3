"""Batch transfer learning on Ray: pretrained vision backbones turned into embeddings in Parquet.

    from pipeline import extract, ExtractConfig
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ExtractConfig", "extract", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `pipeline --help` should not import torch
    if name == "ExtractConfig":
        from pipeline.config import ExtractConfig

        return ExtractConfig
    if name == "extract":
        from pipeline.commands.extract import extract

        return extract
    raise AttributeError(name)
