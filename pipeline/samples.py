"""Small real labelled image sets built from what Python packages ship (no downloads), for the demo and tests.

- textures: scikit-image's brick, grass and gravel photos cut into random patches, one folder per class
  (ImageFolder layout). Pretrained features separate them clearly; random features do much worse.
- photos: scikit-image's bundled photos (chelsea the cat, coffee, astronaut...); near-copies: distinct photos
  with planted re-encoded, resized and cropped copies (similarity search and dedup checks).
- ImageNet-named: crops of the cat and the coffee photo under folders named by their ImageNet classes (the
  pretrained classifier applies as is); digits: scikit-learn's 8x8 digits upscaled (a task unlike ImageNet).
Also writers that repack a folder of images as WebDataset tars or a Parquet file with image bytes.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

TEXTURES = ("brick", "grass", "gravel")
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def _skimage_data():
    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover
        raise ImportError("sample images need scikit-image: pip install 'pipeline[demo]'") from e
    return data


def _rgb(a: np.ndarray) -> Image.Image:
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
    return Image.fromarray(a[..., :3])


def make_textures(root: str | os.PathLike, per_class: int = 20, patch: int = 96, seed: int = 0,
                  quality: int = 90, jitter: bool = True) -> list[Path]:
    """Write ``root/<class>/<nnn>.jpg`` patches of each texture; returns the files written.

    With ``jitter`` (default) each patch is cut at a random scale (48-200 px), rotated by a multiple of 90
    degrees and given a random contrast and brightness before being resized to ``patch`` pixels, so that
    simple intensity statistics do not separate the classes: pretrained features still do (a linear probe
    on tf_efficientnet_lite0 ImageNet features scores ~0.99), random-init features do not (~0.5).
    """
    data = _skimage_data()
    rng = np.random.default_rng(seed)
    out = []
    for cls in TEXTURES:
        img = np.asarray(_rgb(getattr(data, cls)())).astype(np.float32)
        h, w = img.shape[:2]
        d = Path(root) / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = int(rng.integers(48, min(200, h, w) + 1)) if jitter else patch
            y = int(rng.integers(0, h - size + 1))
            x = int(rng.integers(0, w - size + 1))
            p = img[y:y + size, x:x + size]
            if jitter:
                p = np.rot90(p, int(rng.integers(4)))
                p = (p - p.mean()) * rng.uniform(0.5, 1.5) + rng.uniform(60, 190)
            im = Image.fromarray(np.clip(p, 0, 255).astype(np.uint8))
            path = d / f"{i:03d}.jpg"
            im.resize((patch, patch), Image.BICUBIC).save(path, quality=quality)
            out.append(path)
    return out


def photo(name: str) -> Image.Image:
    """One of scikit-image's bundled photos as an RGB PIL image."""
    return _rgb(getattr(_skimage_data(), name)())


def make_photos(root: str | os.PathLike, names: tuple[str, ...] = PHOTOS) -> list[Path]:
    """Write ``root/<name>.jpg`` for each bundled photo."""
    Path(root).mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        p = Path(root) / f"{n}.jpg"
        photo(n).save(p, quality=92)
        out.append(p)
    return out


def _image_files(root: Path) -> list[Path]:
    exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def pack_webdataset(root: str | os.PathLike, out_dir: str | os.PathLike, per_shard: int = 32) -> list[Path]:
    """Repack an ImageFolder tree as WebDataset shards: ``<key>.jpg`` + ``<key>.cls`` (the folder name)."""
    root, out_dir = Path(root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = _image_files(root)
    shards = []
    for s in range(0, len(files), per_shard):
        path = out_dir / f"shard-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for f in files[s:s + per_shard]:
                rel = f.relative_to(root)
                key = str(rel.with_suffix("")).replace(os.sep, "_")
                for ext, payload in ((f.suffix.lower().lstrip("."), f.read_bytes()),
                                     ("cls", rel.parent.name.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append(path)
    return shards


def pack_parquet(root: str | os.PathLike, out_file: str | os.PathLike, rows_per_group: int = 64) -> Path:
    """Repack an ImageFolder tree as one Parquet file: ``key, image (bytes), label``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    files = _image_files(root)
    table = pa.table({
        "key": [str(f.relative_to(root)).replace(os.sep, "/") for f in files],
        "image": [f.read_bytes() for f in files],
        "label": [f.parent.name if f.parent != root else None for f in files],
    })
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_file, row_group_size=rows_per_group)
    return Path(out_file)


# scikit-image's bundled photos that need no download, each a distinct scene
DISTINCT_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field",
                   "immunohistochemistry", "moon", "page", "rocket", "retina", "clock", "text", "cell",
                   "colorwheel", "logo")
TILED_PHOTOS = ("astronaut", "camera", "chelsea", "coffee")  # scenes whose quadrants differ (not sky)
COPY_VARIANTS = ("jpeg40", "resize60", "crop90")  # re-encoded at quality 40, resized to 60 %, 90 % crop


def altered_copy(img: Image.Image, variant: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """(the altered image, JPEG quality to save it at)."""
    w, h = img.size
    if variant == "jpeg40":
        return img, 40
    if variant == "resize60":
        return img.resize((max(1, w * 3 // 5), max(1, h * 3 // 5)), Image.BICUBIC), 90
    if variant == "crop90":
        cw, ch = int(w * 0.9), int(h * 0.9)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x, y, x + cw, y + ch)), 90
    raise ValueError(f"unknown copy variant '{variant}': use one of {', '.join(COPY_VARIANTS)}")


def make_near_copies(root: str | os.PathLike, copies_of: int = 24, tiles: bool = True, seed: int = 0,
                     variants: tuple[str, ...] = COPY_VARIANTS, originals_as: str = "jpg") -> dict[str, str]:
    """Distinct real photos plus planted near-copies, for similarity search and dedup checks.

    ``root/originals/``: each of DISTINCT_PHOTOS, and with ``tiles`` the four quadrants of each of
    TILED_PHOTOS (other parts of one scene: related, but not copies). ``root/copies/``: for ``copies_of``
    originals (drawn with ``seed``), one file per variant (re-encoded at JPEG quality 40, resized to 60 %,
    cropped to 90 % a side). ``originals_as``: "jpg" (quality 92) or "png" (lossless originals, the copies
    stay JPEG). Returns {copy path relative to root: its original's path relative to root}.
    """
    if originals_as not in ("jpg", "png"):
        raise ValueError(f"originals_as must be 'jpg' or 'png', got '{originals_as}'")
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "originals").mkdir(parents=True, exist_ok=True)
    (root / "copies").mkdir(parents=True, exist_ok=True)
    originals: dict[str, Image.Image] = {}
    for name in DISTINCT_PHOTOS:
        img = photo(name)
        originals[name] = img
        w, h = img.size
        if tiles and name in TILED_PHOTOS:
            for q, (x, y) in enumerate(((0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2))):
                originals[f"{name}_q{q}"] = img.crop((x, y, x + w // 2, y + h // 2))
    for name, img in originals.items():
        img.save(root / "originals" / f"{name}.{originals_as}", **({"quality": 92} if originals_as == "jpg"
                                                                  else {}))
    names = sorted(originals)
    picked = sorted(rng.choice(len(names), min(copies_of, len(names)), replace=False))
    manifest = {}
    for i in picked:
        name = names[i]
        for v in variants:
            img, quality = altered_copy(originals[name], v, rng)
            rel = f"copies/{name}__{v}.jpg"
            img.save(root / rel, quality=quality)
            manifest[rel] = f"originals/{name}.{originals_as}"
    return manifest


# ImageNet class name (a folder name: '_' for spaces) -> the bundled photo its images are cut from
IMAGENET_NAMED = {"tabby": "chelsea", "coffee_mug": "coffee"}


def make_imagenet_named(root: str | os.PathLike, per_class: int = 24, patch: int = 128, seed: int = 0
                        ) -> list[Path]:
    """``root/<ImageNet class name>/<nnn>.jpg``: random crops (55-100 % of the short side), mirror images and
    brightness changes of a bundled photo of that class (chelsea the cat: ``tabby``; coffee: ``coffee_mug``).
    A labelled set whose labels are ImageNet class names: the pretrained classifier applies as is."""
    rng = np.random.default_rng(seed)
    out = []
    for cls, name in IMAGENET_NAMED.items():
        img = photo(name)
        w, h = img.size
        d = Path(root) / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(min(w, h) * rng.uniform(0.55, 1.0))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = img.crop((x, y, x + side, y + side)).resize((patch, patch), Image.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            a = np.asarray(crop).astype(np.float32) * rng.uniform(0.7, 1.3)
            path = d / f"{i:03d}.jpg"
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, quality=90)
            out.append(path)
    return out


def make_digits(root: str | os.PathLike, n: int = 600, size: int = 64) -> list[Path]:
    """``root/<digit>/<nnnn>.png``: the first ``n`` of scikit-learn's 8x8 handwritten digits, upscaled to
    ``size`` pixels, as RGB. A task unlike ImageNet: an intermediate cut of an ImageNet backbone separates
    them better than its final features."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise ImportError("the digits set needs scikit-learn: pip install 'pipeline[demo]'") from e
    d = load_digits()
    out = []
    for i in range(min(n, len(d.target))):
        a = (d.images[i] * (255.0 / 16.0)).astype(np.uint8)
        folder = Path(root) / str(int(d.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:04d}.png"
        _rgb(a).resize((size, size), Image.BICUBIC).save(path)
        out.append(path)
    return out
