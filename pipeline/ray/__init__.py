"""The only package that imports Ray.

``data.py``: the shard Datasource and the Parquet Datasink (module-level classes with a typed write result)
and the Ray Data pipelines that map stages over them; ``train.py``: Ray Train's TorchTrainer for
fine-tuning and its worker loop. Everything else in ``pipeline`` is Ray-free and is called from here.
"""

from __future__ import annotations

import os
from typing import Any


def init_ray(runtime: Any) -> None:
    """Connect to ``runtime.address`` (or RAY_ADDRESS), else start a local Ray; no-op when connected."""
    import ray

    if ray.is_initialized():
        return
    address = runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=runtime.num_cpus, include_dashboard=False, log_to_driver=True)


def data_context(runtime: Any, progress: bool = True) -> None:
    """Ray Data's settings for a run: progress bars as asked, and the no-progress timeout after which a
    stalled run ends (runtime.stall_timeout_s)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = runtime.progress and progress
    timeout = getattr(runtime, "stall_timeout_s", None)
    if timeout:
        ctx.execution_no_progress_timeout_s = timeout
