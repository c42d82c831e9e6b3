"""Decode and preprocess a batch as tensor ops: the GPU fast path, and its CPU twin (same code, CPU device).

``runtime.decoder: tensor`` (the default for CUDA actors) replaces "PIL decode + PIL resize per image" with:

1. JPEGs go to ``torchvision.io.decode_jpeg``: on a CUDA device that is nvjpeg, the whole batch in one call;
   on CPU it is libjpeg-turbo per image, in the actor's thread pool (pixel-identical to PIL's decode).
2. Everything else goes through the PIL decoder of the PIL path (decode.py), per image: PNG, WebP, ...,
   CMYK or other unusual JPEGs, and anything the tensor decoder refuses. Error rows (truncated, too many
   pixels, not an image) therefore keep the kinds and messages of the PIL path.
3. Resize, center crop and normalize run on the device as batched tensor ops (images of one size are
   resized together), with the sizes, interpolation, antialiasing, mean and std read from the model's own
   eval transform. The values match the PIL transform to within resampling rounding: tests compare both
   on CPU, tensor by tensor and embedding by embedding.

Only encoded bytes cross the object store and the host-device link; the pixels are born on the device.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.preprocess.decode import DecodeError, aspect_error, decode_image

JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG modes decode_jpeg(mode=RGB) converts exactly like PIL's convert("RGB"); CMYK/YCCK go through PIL.
_TENSOR_JPEG_MODES = frozenset({"RGB", "L"})


# Decoded images above this many pixels are resized and cropped one by one as soon as they are decoded (on
# CPU), the rest in batches of one size: a batch holds at most this many full-size pixels per image.
BATCH_PIXELS = 1 << 20


class TensorPrepError(ValueError):
    """The model's eval transform has a step the tensor path does not reproduce; the message names the fix."""


class _Cropped:
    """A decoded image already resized and cropped (`TensorPrep._reduced`)."""

    __slots__ = ("image",)

    def __init__(self, image: torch.Tensor) -> None:
        self.image = image


@dataclass(frozen=True)
class TensorTransform:
    """Resize (shortest side or exact size), center crop, scale to [0, 1], normalize: as batched tensor ops.

    Built from the model's own eval transform with :meth:`from_transform`, so the numbers cannot drift from
    the PIL path's.
    """

    resize: tuple[int, ...]  # torchvision Resize ``size``: (side,) for the shortest side, or (h, w)
    max_size: int | None
    interpolation: Any  # torchvision InterpolationMode
    antialias: bool
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transform(cls, t: Any) -> TensorTransform:
        """Read the steps of a timm eval transform (a Compose) or a torchvision weights preset."""
        from torchvision import transforms as T
        from torchvision.transforms._presets import ImageClassification

        if isinstance(t, ImageClassification):
            return cls(tuple(t.resize_size), None, t.interpolation, bool(t.antialias), _pair(t.crop_size),
                       tuple(t.mean), tuple(t.std))
        steps = list(t.transforms) if isinstance(t, T.Compose) else [t]
        kinds = [type(s).__name__ for s in steps]
        if kinds != ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"] and \
                kinds != ["Resize", "CenterCrop", "ToTensor", "Normalize"]:
            raise TensorPrepError(
                f"the model's eval transform ({' -> '.join(kinds)}) is not resize -> center crop -> "
                "normalize; the tensor decoder cannot reproduce it: use --set runtime.decoder=pil")
        resize, crop, _, norm = steps
        size = (resize.size,) if isinstance(resize.size, int) else tuple(resize.size)
        mean = norm.mean.tolist() if isinstance(norm.mean, torch.Tensor) else list(norm.mean)
        std = norm.std.tolist() if isinstance(norm.std, torch.Tensor) else list(norm.std)
        antialias = True if resize.antialias is None else bool(resize.antialias)
        return cls(size, resize.max_size, resize.interpolation, antialias, _pair(crop.size),
                   tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def one(self, image: torch.Tensor) -> torch.Tensor:
        """One uint8 (3, H, W) image resized and cropped alone: the same values as in a batch of its size."""
        return self.resize_crop(image[None])[0]

    def resize_crop(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W), all of one size -> uint8 (N, C, crop_h, crop_w)."""
        import torchvision.transforms.v2.functional as F

        x = F.resize(images, list(self.resize), interpolation=self.interpolation, max_size=self.max_size,
                     antialias=self.antialias)
        return F.center_crop(x, list(self.crop))

    def __call__(self, images: list[torch.Tensor], channels_last: bool = False,
                 cropped: list[bool] | None = None) -> torch.Tensor:
        """uint8 (3, H, W) images of any sizes, on one device -> float32 (N, 3, crop_h, crop_w) there.

        ``channels_last``: the batch is built, resized and normalized in that memory format and returned in
        it (the values are the same). The decoders hand out (H, W, 3) buffers seen as (3, H, W) (EXIF-rotated
        JPEGs aside), so stacking them as (N, H, W, 3) is a plain copy, and the model needs no conversion of
        its input afterwards. ``cropped[i]``: image i went through `resize_crop` already (`one`).
        """
        if not images:
            raise ValueError("no images to preprocess")
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            groups[(bool(cropped and cropped[i]), *img.shape)].append(i)
        device = images[0].device
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def stack(idx: list[int]) -> torch.Tensor:
            if channels_last:
                return torch.stack([images[i].permute(1, 2, 0) for i in idx]).permute(0, 3, 1, 2)
            return torch.stack([images[i] for i in idx]) if len(idx) > 1 else images[idx[0]][None]

        def prepared(key: tuple[Any, ...], idx: list[int]) -> torch.Tensor:
            return stack(idx) if key[0] else self.resize_crop(stack(idx))

        if len(groups) == 1:
            key, idx = next(iter(groups.items()))
            out = prepared(key, idx)
        else:
            out = torch.empty((len(images), 3, *self.crop), dtype=torch.uint8, device=device,
                              memory_format=fmt)
            for key, idx in groups.items():
                out[torch.tensor(idx, device=device)] = prepared(key, idx)
        x = out.contiguous(memory_format=fmt).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=device)
        std = torch.tensor(self.std, dtype=x.dtype, device=device)
        if channels_last:
            # (N, H, W, 3) seen as rows of W pixels: a per-channel broadcast over a trailing axis of 3 runs
            # several times slower than over rows with the pattern repeated
            rows = x.permute(0, 2, 3, 1).view(-1, x.shape[3] * 3)
            rows.sub_(mean.repeat(x.shape[3])).div_(std.repeat(x.shape[3]))
            return x
        return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = list(v)
    return (int(v[0]), int(v[-1]))


def jpeg_route(data: bytes | None, *, max_pixels: int, max_bytes: int, draft_side: int | None,
               resize_side: int | None = None) -> bool:
    """True when the bytes are a plain RGB/grayscale JPEG within the limits that the tensor decoder takes.

    Reads the header only. False sends the image to the PIL decoder, which also reports every error kind.
    With ``draft_side`` (JPEG draft mode on a CPU actor), JPEGs at least twice that size go to PIL too:
    its reduced-scale decode is much cheaper than a full decode.
    """
    if not data or len(data) > max_bytes or not bytes(data[:3]) == JPEG_MAGIC:
        return False
    try:
        img = Image.open(io.BytesIO(data), formats=["JPEG"])
        w, h = img.size
        mode = img.mode
    except Exception:  # noqa: BLE001 - PIL will say what is wrong
        return False
    if mode not in _TENSOR_JPEG_MODES or w * h > max_pixels or w <= 0 or h <= 0 or \
            aspect_error(w, h, resize_side, max_pixels) is not None:
        return False
    return draft_side is None or min(w, h) < 2 * draft_side


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 (3, H, W) tensor over an (H, W, 3) buffer, as decode_jpeg returns them (a
    copy: PIL's buffer is read-only)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


class TensorPrep:
    """Encoded bytes of a batch -> one preprocessed float batch on the device, plus per-image errors.

    Args:
        transform: the model's eval transform (timm Compose or torchvision preset).
        device: where decoding (JPEG) and preprocessing run.
        max_pixels, max_bytes, draft_side: the limits and draft mode of the PIL decoder.
        channels_last: build the batch in channels-last memory format (the model's).
    """

    def __init__(self, transform: Any, device: torch.device, *, max_pixels: int, max_bytes: int,
                 draft_side: int | None = None, channels_last: bool = False) -> None:
        self.tt = TensorTransform.from_transform(transform)
        self.channels_last = channels_last  # the batch's memory format (the model's)
        self.device = device
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.draft_side = draft_side if device.type == "cpu" else None
        # a shortest-side resize (not a fixed size): thin slivers are refused before they are resized
        self.resize_side = self.tt.resize[0] if len(self.tt.resize) == 1 else None
        # Calls may overlap (runtime.calls_per_actor): nvjpeg calls are serialized, as torchvision's CUDA
        # codec state is shared per device. CPU decodes need no lock.
        self._decode_lock = threading.Lock() if device.type == "cuda" else contextlib.nullcontext()

    # -- decoding ---------------------------------------------------------------------------------
    def _pil(self, data: bytes | None) -> torch.Tensor | DecodeError:
        draft = (self.draft_side, self.draft_side) if self.draft_side else None
        img = decode_image(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes, draft_size=draft,
                           resize_side=self.resize_side)
        if isinstance(img, DecodeError):
            return img
        return pil_to_uint8(img)

    def _jpeg_one(self, data: bytes) -> torch.Tensor | DecodeError:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            with self._decode_lock:
                return decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        except Exception:  # noqa: BLE001 - let the PIL decoder decide (and name the error)
            return self._pil(data)

    def _jpeg_batch(self, datas: list[bytes]) -> list[torch.Tensor | DecodeError]:
        """On CUDA: one batched nvjpeg call; if the batch fails, image by image to isolate the bad one."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            ts = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
            with self._decode_lock:
                return list(decode_jpeg(ts, mode=ImageReadMode.RGB, device=self.device,
                                        apply_exif_orientation=True))
        except Exception:  # noqa: BLE001
            return [self._jpeg_one(d) for d in datas]

    def _reduced(self, t: torch.Tensor | DecodeError) -> torch.Tensor | DecodeError:
        """A decoded image of more than BATCH_PIXELS, resized and cropped alone (marked by its type)."""
        if isinstance(t, torch.Tensor) and t.shape[-1] * t.shape[-2] > BATCH_PIXELS:
            try:
                return _Cropped(self.tt.one(t))
            except Exception as e:  # noqa: BLE001 - one image's failure is its error row
                return DecodeError("preprocess_failed", f"{type(e).__name__}: {e}")
        return t

    def decode(self, raw: list[bytes | None], pmap: Callable[[Callable, Iterable], Iterable] = map,
               reduce: bool = False) -> list[Any]:
        """Each image -> uint8 (3, H, W) on the device, or a DecodeError. ``pmap``: a (thread-pool) map.
        ``reduce``: images decoded on CPU above BATCH_PIXELS come back resized and cropped (`_Cropped`)."""
        finish = self._reduced if reduce else (lambda t: t)
        route = [jpeg_route(d, max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                            draft_side=self.draft_side, resize_side=self.resize_side) for d in raw]
        out: list[torch.Tensor | DecodeError | None] = [None] * len(raw)
        jpeg_idx = [i for i, r in enumerate(route) if r]
        other_idx = [i for i, r in enumerate(route) if not r]
        if jpeg_idx and self.device.type == "cuda":
            for i, t in zip(jpeg_idx, self._jpeg_batch([raw[i] for i in jpeg_idx])):
                out[i] = t
            jpeg_idx = []
        # CPU JPEGs and every non-JPEG: per image, in the pool (both decoders release the GIL); a large
        # image is resized and cropped as soon as it is decoded, so that a batch never holds its photos at
        # full size (8 of 16 MP would be 770 MB)
        work = [(i, self._jpeg_one if route[i] else self._pil) for i in jpeg_idx + other_idx]
        for (i, _), t in zip(work, pmap(lambda w: finish(w[1](raw[w[0]])), work)):
            out[i] = t
        moved: list[torch.Tensor | DecodeError] = []
        for t in out:
            if isinstance(t, torch.Tensor) and t.device != self.device:
                t = t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" \
                    else t.to(self.device)
            moved.append(t)  # type: ignore[arg-type]
        return moved

    def __call__(self, raw: list[bytes | None], pmap: Callable[[Callable, Iterable], Iterable] = map
                 ) -> tuple[torch.Tensor | None, list[DecodeError | None]]:
        """The batch -> (float (n_ok, 3, h, w) on the device or None, per-image error or None)."""
        decoded = self.decode(raw, pmap, reduce=True)
        errors: list[DecodeError | None] = [d if isinstance(d, DecodeError) else None for d in decoded]
        good = [d for d in decoded if not isinstance(d, DecodeError)]
        if not good:
            return None, errors
        try:
            cropped = [isinstance(d, _Cropped) for d in good]
            return self.tt([d.image if isinstance(d, _Cropped) else d for d in good], self.channels_last,
                           cropped if any(cropped) else None), errors
        except Exception as e:  # noqa: BLE001 - a batch-wide failure marks its images, never the actor
            err = DecodeError("preprocess_failed", f"{type(e).__name__}: {e}")
            return None, [e_ if e_ is not None else err for e_ in errors]
