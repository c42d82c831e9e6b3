"""A hostile corpus through the whole pipeline: every good image embedded, every bad one an error row of a
specific kind, the run completes, counts reconcile, and nothing is written outside the output."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage
from pipeline.commands.extract import extract
from pipeline.config import ExtractConfig


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _good_images() -> dict[str, bytes]:
    rotated = _photo(1, (60, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    palette = _photo(2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [_photo(3 + i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    gray16 = Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)
    return {
        "good/plain.jpg": _enc(_photo(0), "JPEG"),
        "good/cmyk.jpg": _enc(_photo(4).convert("CMYK"), "JPEG"),
        "good/gray16.png": _enc(gray16, "PNG"),
        "good/palette_transparent.png": _enc(palette, "PNG", transparency=0),
        "good/grayscale.jpg": _enc(_photo(5).convert("L"), "JPEG"),
        "good/exif_rotated.jpg": _enc(rotated, "JPEG", exif=exif),
        "good/animated.gif": gif.getvalue(),
        "good/one_pixel.png": _enc(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "good/rgba.webp": _enc(_photo(6).convert("RGBA"), "WEBP"),
        "_MG_0002.jpg": _enc(_photo(8), "JPEG"),  # what cameras name Adobe RGB photos
        "_archive/old.jpg": _enc(_photo(9), "JPEG"),
    }


def _bad_images() -> dict[str, tuple[bytes, str]]:
    jpeg = _enc(_photo(7), "JPEG")
    return {
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 3], "truncated"),
        "bad/zero.jpg": (b"", "empty"),
        "bad/text.jpg": (b"just some text, not an image\n" * 10, "not_an_image"),
        "bad/error_page.png": (b"<html><body><h1>503 Service Unavailable</h1></body></html>", "not_an_image"),
        "bad/bomb.png": (_bomb(30000, 30000), "too_many_pixels"),
        "bad/sliver.png": (_enc(Image.new("RGB", (20000, 1)), "PNG"), "extreme_aspect_ratio"),
        "bad/caf\udce9.jpg": (jpeg, "unsafe_name"),  # a Latin-1 name: raw bytes that are not UTF-8
    }


def _cfg(src: Path, out: Path, fmt: str = "auto") -> ExtractConfig:
    return ExtractConfig.model_validate({
        "source": {"uri": str(src), "format": fmt},
        "backbone": {"model": "tf_efficientnet_lite0", "weights": "packaged"},
        "output": {"uri": str(out)},
        "runtime": {"batch_size": 8, "progress": False},
    })


def _tables(out: Path) -> tuple[pa.Table, pa.Table]:
    emb = pads.dataset(out / "embeddings").to_table()
    err = pads.dataset(out / "errors").to_table() if (out / "errors").exists() else None
    return emb, err


def test_loose_files_corpus(ray_session, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    good, bad = _good_images(), _bad_images()
    for rel, data in [*good.items(), *((r, d) for r, (d, _) in bad.items())]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    s = extract(_cfg(src, out))
    assert s["counts"] == {"inputs": len(good) + len(bad), "embedded": len(good), "failed": len(bad),
                           "skipped": 0}
    emb, err = _tables(out)
    assert sorted(emb.column("id").to_pylist()) == sorted(good)
    vectors = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    assert np.isfinite(vectors).all()
    kinds = dict(zip(err.column("id").to_pylist(), err.column("error").to_pylist()))
    assert kinds == {storage.printable_name(rel): kind for rel, (_, kind) in bad.items()}
    assert "bad/caf\\xe9.jpg" in kinds
    assert all(m for m in err.column("message").to_pylist())


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_webdataset_corpus(ray_session, tmp_path):
    src, out = tmp_path / "wds", tmp_path / "out"
    src.mkdir()
    ok = [(f"{i:03d}.jpg", _enc(_photo(10 + i), "JPEG")) for i in range(4)]
    (src / "a.tar").write_bytes(_tar([
        *ok[:2],
        ("002.jpg", b"\xff\xd8garbage that claims to be a jpeg"),  # a corrupt member
        ("../escape.jpg", ok[2][1]),  # path traversal: never written or followed
        ("/etc/absolute.jpg", ok[3][1]),
    ]))
    full = _tar(ok)
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        last = tf.getmembers()[-1]
    (src / "b.tar").write_bytes(full[: last.offset_data + last.size // 2])  # cut inside the last member
    s = extract(_cfg(src, out, "webdataset"))
    emb, err = _tables(out)
    kinds = dict(zip(err.column("id").to_pylist(), err.column("error").to_pylist()))
    assert sorted(emb.column("id").to_pylist()) == ["a.tar/000", "a.tar/001", "b.tar/000", "b.tar/001",
                                                    "b.tar/002"]
    assert kinds["a.tar/002"] == "not_an_image"
    assert sorted(k for i, k in kinds.items() if i.startswith("a.tar/") and i != "a.tar/002") == \
        ["unsafe_name", "unsafe_name"]
    assert [k for i, k in kinds.items() if i.startswith("b.tar/")] == ["shard_corrupt"]
    assert s["counts"]["inputs"] == s["counts"]["embedded"] + s["counts"]["failed"] == len(emb) + len(err)
    assert not (tmp_path / "escape.jpg").exists() and not Path("/etc/absolute.jpg").exists()


def test_parquet_corpus(ray_session, tmp_path):
    src, out = tmp_path / "pq", tmp_path / "out"
    src.mkdir()
    images = [_enc(_photo(20), "JPEG"), None, b"\x00\x01garbage bytes", _enc(_photo(21), "PNG")]
    # the first file's image cells are all null: stored as type null, they are missing rows, not a refusal
    pq.write_table(pa.table({"key": ["n0", "n1"], "image": pa.nulls(2)}), src / "part-0.parquet")
    pq.write_table(pa.table({"key": ["k0", "k1", "k2", "k3"], "image": pa.array(images, pa.binary())}),
                   src / "part-1.parquet")
    cfg = _cfg(src, out, "parquet").model_copy(deep=True)
    cfg.source.id_column = "key"
    s = extract(cfg)
    emb, err = _tables(out)
    assert sorted(emb.column("id").to_pylist()) == ["k0", "k3"]
    assert dict(zip(err.column("id").to_pylist(), err.column("error").to_pylist())) == {
        "n0": "missing", "n1": "missing", "k1": "missing", "k2": "not_an_image"}
    assert s["counts"] == {"inputs": 6, "embedded": 2, "failed": 4, "skipped": 0}
