"""Encoded images to a model-ready batch: decode with limits (`decode`), the batched tensor decoder
(`tensorprep`), and the `Preprocessor` that chooses between them; the device and decoder an actor or a
training worker runs with. Bad bytes become a `DecodeError` (kind + message), never an exception that kills
the batch. Used by the Embedder, by fine-tuning (with the training transform) and by the index's queries.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pipeline.config import MAX_BYTES, MAX_PIXELS
from pipeline.preprocess.decode import DecodeError, decode_image
from pipeline.preprocess.tensorprep import TensorPrep, TensorPrepError

ACTOR_DEVICE_FIX = "--set runtime.device=cpu or give the actors GPUs (--gpus-per-actor 1)"


def resolve_device(device: str, fix: str = ACTOR_DEVICE_FIX) -> torch.device:
    """auto | cpu | cuda as a torch device (auto: CUDA when one is visible); ValueError for cuda without one,
    naming ``fix`` (the setting of the command at hand)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device 'cuda' asked for but no CUDA device is visible: use {fix}")
    return torch.device(device)


def resolve_autocast(autocast: str, device: torch.device) -> str:
    """auto (unplanned) -> bf16 on a CUDA device that computes it, none elsewhere; the rest as given."""
    if autocast != "auto":
        return autocast
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "none"


def resolve_decoder(decoder: str, device: torch.device) -> str:
    """auto -> tensor on a CUDA device (nvjpeg + batched GPU preprocessing), pil on CPU; ValueError for any
    other name (a Preprocessor built by hand takes no config that would have refused it)."""
    if decoder not in ("auto", "pil", "tensor"):
        raise ValueError(f"decoder must be auto, pil or tensor, got '{decoder}' (--set runtime.decoder=...)")
    if decoder == "auto":
        return "tensor" if device.type == "cuda" else "pil"
    return decoder


class Preprocessor:
    """Encoded images -> (a float batch of the good ones on the device, or None; an error or None per image).

    ``decoder``: pil (PIL decode, then ``transform`` image by image in a thread pool) | tensor (JPEGs decoded
    by torchvision, nvjpeg on a GPU, and batched resize/crop/normalize read from ``transform``; everything
    else through PIL) | auto (tensor on CUDA, pil on CPU; pil when the transform cannot be reproduced).
    ``resize_side``: the shortest side the transform resizes to, for the aspect-ratio check and draft decode
    (None for random-resized-crop training transforms). ``channels_last``: the tensor decoder builds the
    batch in the model's channels-last memory format.
    """

    def __init__(self, transform: Any, device: torch.device, *, decoder: str = "pil",
                 max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES, resize_side: int | None = None,
                 jpeg_draft: bool = False, threads: int | None = None, channels_last: bool = False) -> None:
        self.transform = transform
        self.device = device
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.resize_side = resize_side
        self.draft_size = (resize_side, resize_side) if jpeg_draft and resize_side else None
        self.decoder = resolve_decoder(decoder, device)
        self.tensor_prep: TensorPrep | None = None
        if self.decoder == "tensor":
            try:
                self.tensor_prep = TensorPrep(transform, device, max_pixels=max_pixels, max_bytes=max_bytes,
                                              draft_side=resize_side if jpeg_draft else None,
                                              channels_last=channels_last)
            except TensorPrepError:
                if decoder == "tensor":
                    raise
                self.decoder = "pil"  # auto: this model's transform needs the PIL path
        # Ray sets OMP_NUM_THREADS (and so torch's thread count) to the actor's CPUs.
        self.threads = max(1, int(threads or torch.get_num_threads()))
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def map(self, fn, items):
        return list(self._pool.map(fn, items)) if self._pool else [fn(i) for i in items]

    def one(self, data: bytes | None) -> torch.Tensor | DecodeError:
        img = decode_image(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                           draft_size=self.draft_size, resize_side=self.resize_side)
        if isinstance(img, DecodeError):
            return img
        try:
            return self.transform(img)
        except Exception as e:  # noqa: BLE001 - a bad image is data, not a crash
            return DecodeError("preprocess_failed", f"{type(e).__name__}: {e}")

    def __call__(self, raw: list[bytes | None]) -> tuple[torch.Tensor | None, list[DecodeError | None]]:
        if self.tensor_prep is not None:
            return self.tensor_prep(raw, self.map)
        prepared = self.map(self.one, raw)
        errors = [p if isinstance(p, DecodeError) else None for p in prepared]
        tensors = [p for p in prepared if not isinstance(p, DecodeError)]
        if not tensors:
            return None, errors
        x = torch.stack(tensors)
        return (x.pin_memory() if self.device.type == "cuda" else x), errors

