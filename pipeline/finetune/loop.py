"""One epoch of fine-tuning over any iterable of ``{"x", "y", "failed"}`` tensor batches: ``train_epoch``
(cosine learning-rate schedule over all steps, bf16/fp16 autocast on GPU) and ``evaluate``, per-worker
``EpochSums`` all-reduced across Ray Train workers, per-epoch seeding and the progress line."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.finetune.model import unwrap

if TYPE_CHECKING:  # torch is imported where it is used: Ray Data tasks that only filter rows stay light
    import torch
    from torch import nn


def seed_everything(seed: int, epoch: int, rank: int) -> int:
    """Seed python, numpy and torch for one worker's epoch (augmentation, dropout); returns a seed for the
    epoch's shuffle buffer. A resumed run draws the same numbers as an uninterrupted one."""
    import random

    import torch

    s = int.from_bytes(hashlib.sha1(f"{seed}/{epoch}/{rank}".encode()).digest()[:4], "big")
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over total steps."""
    if total <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _autocast(device: torch.device, autocast: str):
    import torch

    if device.type != "cuda" or autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if autocast == "bf16" else torch.float16)


@dataclass
class EpochSums:
    """Per-worker sums that are all-reduced into epoch metrics."""

    loss: float = 0.0
    correct: int = 0
    rows: int = 0
    failed: int = 0
    confusion: np.ndarray | None = None

    def vector(self, k: int) -> torch.Tensor:
        import torch

        cm = self.confusion if self.confusion is not None else np.zeros((k, k), np.int64)
        return torch.tensor([self.loss, self.correct, self.rows, self.failed, *cm.reshape(-1)],
                            dtype=torch.float64)

    @classmethod
    def from_vector(cls, v: torch.Tensor, k: int) -> EpochSums:
        v = v.cpu().numpy()
        return cls(float(v[0]), int(round(v[1])), int(round(v[2])), int(round(v[3])),
                   np.rint(v[4:]).astype(np.int64).reshape(k, k))

    def metrics(self, prefix: str) -> dict[str, Any]:
        return {f"{prefix}_loss": self.loss / self.rows if self.rows else None,
                f"{prefix}_acc": self.correct / self.rows if self.rows else None,
                f"{prefix}_rows": self.rows, f"{prefix}_failed": self.failed}


def all_reduce(sums: EpochSums, k: int, device: torch.device) -> EpochSums:
    """Sum the workers' EpochSums (torch.distributed; a no-op for one process)."""
    import torch.distributed as dist

    v = sums.vector(k)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        v = v.to(device)
        dist.all_reduce(v)
    return EpochSums.from_vector(v, k)


def train_epoch(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                optimizer: torch.optim.Optimizer, loss_fn: nn.Module, *, device: torch.device, step: int,
                total_steps: int, stat_modules: list[nn.Module] = (), autocast: str = "none",
                scaler: torch.amp.GradScaler | None = None) -> tuple[EpochSums, int]:
    """One pass over the training batches; returns the sums and the global step reached.

    A DDP model is run under ``join()``, so workers with fewer non-empty batches do not hang the others.
    """
    import torch

    model.train()
    for m in stat_modules:
        m.eval()
    sums = EpochSums()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    join = model.join() if hasattr(model, "join") else contextlib.nullcontext()
    with join:
        for batch in batches:
            sums.failed += int(batch["failed"])
            x, y = batch["x"].to(device, non_blocking=True), batch["y"].to(device, non_blocking=True)
            if len(y) == 0:
                continue
            factor = cosine_factor(step, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            with _autocast(device, autocast):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(dim=1) == y).sum()
            sums.rows += len(y)
    sums.loss, sums.correct = float(loss_sum), int(correct)
    return sums, step


def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], k: int, *, device: torch.device,
             autocast: str = "none") -> EpochSums:
    """Plain cross-entropy, accuracy and confusion matrix (rows = true class) over the batches."""
    import torch
    from torch import nn

    net = unwrap(model)
    was_training = net.training
    net.eval()
    sums = EpochSums(confusion=np.zeros((k, k), np.int64))
    with torch.inference_mode():
        for batch in batches:
            sums.failed += int(batch["failed"])
            x, y = batch["x"].to(device, non_blocking=True), batch["y"].to(device, non_blocking=True)
            if len(y) == 0:
                continue
            with _autocast(device, autocast):
                logits = net(x).float()
            sums.loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            pred = logits.argmax(dim=1)
            sums.correct += int((pred == y).sum())
            sums.rows += len(y)
            sums.confusion += np.bincount((y * k + pred).cpu().numpy(), minlength=k * k).reshape(k, k)
    net.train(was_training)
    return sums


def epoch_line(h: dict[str, Any], epochs: int) -> str:
    """The progress line of one epoch's history entry."""
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    return (f"finetune: epoch {h['epoch']}/{epochs} train loss {f(h.get('train_loss'))} acc "
            f"{f(h.get('train_acc'))} | val loss {f(h.get('val_loss'))} acc {f(h.get('val_acc'))} "
            f"| {h.get('seconds', 0):.1f}s")
