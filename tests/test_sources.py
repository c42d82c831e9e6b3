"""Sources: listing shards (formats, keys, skipped files, config errors) and reading rows from each format."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import sources, storage
from pipeline.config import ConfigError, SourceConfig
from pipeline.preprocess.decode import decode_image
from pipeline.sources import ROW_SCHEMA, check_source, detect_format, list_shards, read_shard, shards
from pipeline.storage import StorageError

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _jpeg(seed: int = 0, size: tuple[int, int] = (16, 12)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png(color=(1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _rows(shards, cfg, rows_per_batch: int = 64) -> list[dict]:
    out = []
    for shard in shards:
        for table in read_shard(shard, cfg, rows_per_batch):
            assert table.schema.equals(ROW_SCHEMA)
            assert 0 < table.num_rows <= rows_per_batch
            out += table.to_pylist()
    return out


def _by_id(rows: list[dict]) -> dict[str, dict]:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "ids must be unique"
    return {r["id"]: r for r in rows}


# -- loose files ------------------------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path) -> Path:
    """cats/ and dogs/ with 3 images each, one image at the root, and a README that is not an input."""
    root = tmp_path / "src"
    for i in range(3):
        _write(root / "cats" / f"00{i}.jpg", _jpeg(i))
        _write(root / "dogs" / f"00{i}.png", _png((i, i, i)))
    _write(root / "top.JPG", _jpeg(9))
    _write(root / "README.txt", b"not an image")
    return root


def test_files_listing_chunks_keys_and_skipped(folders):
    cfg = SourceConfig(uri=str(folders), labels="folder", files_per_shard=3)
    shards, skipped = list_shards(cfg)
    assert skipped == 1  # README.txt
    assert {s.format for s in shards} == {"files"} and all(1 <= s.count <= 3 for s in shards)
    assert [r for s in shards for r in s.rels] == sorted(
        ["cats/000.jpg", "cats/001.jpg", "cats/002.jpg", "dogs/000.png", "dogs/001.png", "dogs/002.png",
         "top.JPG"])
    keys = [s.key for s in shards]
    assert len(set(keys)) == len(keys) and all(KEY_RE.match(k) for k in keys)
    assert keys[0].startswith("cats_000.jpg-") and shards[0].first == "cats/000.jpg"
    assert shards[0].size == sum((folders / r).stat().st_size for r in shards[0].rels)
    again, _ = list_shards(cfg)
    assert [s.key for s in again] == keys and [s.version for s in again] == [s.version for s in shards]
    # A changed file changes its shard's version, not its key.
    target = folders / "dogs" / "001.png"
    target.write_bytes(_png((200, 0, 0)) + b"\0" * 10)
    os.utime(target, (1, 1))
    changed, _ = list_shards(cfg)
    assert [s.key for s in changed] == keys
    assert [a.version != b.version for a, b in zip(shards, changed, strict=True)] == [
        "dogs/001.png" in s.rels for s in shards]


def _names(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return sorted({f"{rng.choice(list('abcd'))}/{rng.integers(10**6):06d}.jpg" for _ in range(n)})


def _chunks(rels: list[str], max_files: int, depth: int = 0) -> list[sources.Shard]:
    chunker = sources.Chunker(max_files, depth, lambda ms: sources.chunk_shard(ms, "/root"))
    out = [s for r in rels for s in chunker.add(sources.Member(r, 1, "v"))]
    return out + chunker.close()


def _redone(old: list[sources.Shard], new: list[sources.Shard]) -> int:
    """Files in shards that a rerun runs: shards of the new listing that the output does not hold."""
    held = {(s.key, s.version) for s in old}
    return sum(s.count for s in new if (s.key, s.version) not in held)


def test_chunks_are_cut_by_path_so_one_file_changes_at_most_two_shards():
    rng = np.random.default_rng(0)
    for max_files, n in ((256, 2000), (8, 400), (3, 120)):
        rels = _names(n, max_files)
        base = _chunks(rels, max_files)
        assert [r for s in base for r in s.rels] == rels  # every file once, in order
        assert all(1 <= s.count <= max_files for s in base)
        for _ in range(60 if max_files < 256 else 10):
            added = sorted({*rels, f"{rng.choice(list('abcd'))}/{rng.integers(10**6):06d}x.jpg"})
            assert _redone(base, _chunks(added, max_files)) <= 2 * max_files
            gone = list(rels)
            gone.pop(int(rng.integers(len(gone))))
            assert _redone(base, _chunks(gone, max_files)) <= 2 * max_files
    sizes = [s.count for s in _chunks(_names(20000, 1), 256)]
    assert 90 <= np.mean(sizes) <= 140 and max(sizes) <= 256  # about 0.44 x files_per_shard


def test_chunks_never_span_folders_at_the_split_depth():
    rels = [f"{d}/{c}/{i:03d}.jpg" for d in ("2026-11-28", "2026-11-29") for c in "ab" for i in range(40)]
    for depth, groups in ((1, 1), (2, 2)):
        for s in _chunks(rels, 1000, depth):
            assert len({tuple(r.split("/")[:groups]) for r in s.rels}) == 1
    assert len(_chunks(rels, 1000, 0)) < len(_chunks(rels, 1000, 1))


def test_shards_pickle_and_unpack(folders):
    import pickle

    shards, _ = list_shards(SourceConfig(uri=str(folders), files_per_shard=4))
    back = pickle.loads(pickle.dumps(shards))
    assert [(s.key, s.version, s.uris, s.rels, s.sizes, s.first) for s in back] == [
        (s.key, s.version, s.uris, s.rels, s.sizes, s.first) for s in shards]
    assert all(u == str(folders / r) for s in back for u, r in zip(s.uris, s.rels, strict=True))


def test_walk_files_streams_list_files_order(tmp_path):
    names = ["a.jpg", "a/x.jpg", "a-b/y.jpg", "a0.jpg", "a/b/c/z.jpg", "b/_hidden/q.jpg", "b/.dot.jpg",
             "b/k.jpg", "A/upper.jpg"]
    for n in names:
        _write(tmp_path / "w" / n, b"1")
    walked = [(f.uri, f.rel, f.size) for f in storage.walk_files(str(tmp_path / "w"), ahead=1)]
    assert walked == [(f.uri, f.rel, f.size) for f in storage.list_files(str(tmp_path / "w"))]
    assert [r for _, r, _ in walked] == sorted(r for r in names if "_" not in r and "/." not in r)
    shown = [f.rel for f in storage.walk_files(str(tmp_path / "w"), hidden=(".",))]
    assert shown == [f.rel for f in storage.list_files(str(tmp_path / "w"), hidden=(".",))]
    assert shown == sorted(r for r in names if "/." not in r)


def test_a_source_lists_names_starting_with_an_underscore(tmp_path):
    """'_MG_0002.jpg' (a camera's Adobe-RGB name) and '_archive/' are inputs; hidden '.' names and the
    markers and unfinished files of other writers (_SUCCESS, _temporary/) are not, and are not counted."""
    for n in ("_MG_0002.jpg", "_DSC0003.jpg", "_archive/old.jpg", "b/k.jpg", ".DS_Store", "b/._k.jpg",
              "_SUCCESS", "_temporary/0/part.jpg"):
        _write(tmp_path / "src" / n, _jpeg(1))
    shards_, skipped = list_shards(SourceConfig(uri=str(tmp_path / "src")))
    assert [r for s in shards_ for r in s.rels] == ["_DSC0003.jpg", "_MG_0002.jpg", "_archive/old.jpg",
                                                    "b/k.jpg"]
    assert skipped == 0
    rows = _rows(shards_, SourceConfig(uri=str(tmp_path / "src")))
    assert [r["error_kind"] for r in rows] == [None] * 4


def test_a_file_name_that_is_not_utf8_is_one_error_row(tmp_path):
    """Raw bytes in a name (a Latin-1 'é') cannot be an id: one `unsafe_name` row with the bytes shown as
    \\xNN, the other files of its shard read as usual."""
    src = tmp_path / "src"
    _write(src / "a" / "ok.jpg", _jpeg(1))
    try:
        _write(Path(os.fsdecode(bytes(src) + b"/a/caf\xe9.jpg")), _jpeg(2))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    cfg = SourceConfig(uri=str(src))
    rows = _rows(list_shards(cfg)[0], cfg)
    assert [(r["id"], r["error_kind"], r["bytes"]) for r in rows] == [
        ("a/caf\\xe9.jpg", "unsafe_name", None), ("a/ok.jpg", None, _jpeg(1))]
    assert "rename" in rows[0]["error_message"] and rows[0]["source"].endswith("a/caf\\xe9.jpg")
    pa.table({"id": [r["id"] for r in rows]}).column("id").to_pylist()  # valid UTF-8: Arrow takes it
    sample = sources.sample_shards(list_shards(cfg)[0], 1, 2)
    assert sample is not None and len(sample) == 1


def test_root_and_prefix_make_ids_relative_to_the_root(tmp_path):
    for day in ("2026-11-28", "2026-11-29"):
        for i in range(3):
            _write(tmp_path / "photos" / day / "cam" / f"{i}.jpg", _jpeg(i))
    root = str(tmp_path / "photos")
    cfg = SourceConfig(uri=f"{root}/2026-11-29/", root=root)
    layout = sources.layout_of(cfg)
    assert (layout.prefix, layout.depth) == ("2026-11-29/", 1)
    shards, _ = list_shards(cfg)
    assert [r for s in shards for r in s.rels] == [f"2026-11-29/cam/{i}.jpg" for i in range(3)]
    assert shards[0].uris[0] == str(tmp_path / "photos" / "2026-11-29" / "cam" / "0.jpg")
    whole, _ = list_shards(SourceConfig(uri=root), depth=1)  # the root, cut as the output records
    assert {s.key for s in shards} <= {s.key for s in whole}
    with pytest.raises(ConfigError, match="not under source.root"):
        sources.layout_of(SourceConfig(uri=str(tmp_path / "elsewhere"), root=root))
    with pytest.raises(ConfigError, match="split_depth"):
        sources.layout_of(SourceConfig(uri=f"{root}/2026-11-29/cam", root=root), recorded_depth=1)
    with pytest.raises(ConfigError, match="not a folder"):
        list_shards(SourceConfig(uri=f"{root}/2026-11-29/cam/0.jpg", root=root, split_depth=3))


def test_files_rows_ids_labels_bytes(folders):
    cfg = SourceConfig(uri=str(folders), labels="folder", files_per_shard=4)
    shards, _ = list_shards(cfg)
    check_source(cfg, shards)
    rows = _rows(shards, cfg, rows_per_batch=2)
    by_id = _by_id(rows)
    assert sorted(by_id) == ["cats/000.jpg", "cats/001.jpg", "cats/002.jpg", "dogs/000.png", "dogs/001.png",
                             "dogs/002.png", "top.JPG"]
    cat = by_id["cats/001.jpg"]
    assert cat["label"] == "cats" and cat["source"] == str(folders / "cats" / "001.jpg")
    assert cat["bytes"] == (folders / "cats" / "001.jpg").read_bytes()
    assert cat["error_kind"] is None and cat["error_message"] is None
    assert by_id["dogs/002.png"]["label"] == "dogs"
    assert by_id["top.JPG"]["label"] is None  # a file at the root has no folder label
    for shard in shards:  # rows are numbered 0.. within each shard, in listing order
        mine = [r for r in rows if r["shard"] == shard.key]
        assert [r["row"] for r in mine] == list(range(len(shard.uris)))
        assert [r["id"] for r in mine] == list(shard.rels)
    assert all(not isinstance(decode_image(r["bytes"], max_pixels=10**6, max_bytes=10**6), Exception)
               for r in rows)


def test_files_labels_none_and_named_label_rejected(folders):
    cfg = SourceConfig(uri=str(folders))
    shards, _ = list_shards(cfg)
    assert all(r["label"] is None for r in _rows(shards, cfg))
    bad = SourceConfig(uri=str(folders), labels="cls")
    with pytest.raises(ConfigError, match="--labels folder"):
        check_source(bad, list_shards(bad)[0])
    with pytest.raises(ConfigError, match="source.id_column"):
        check_source(SourceConfig(uri=str(folders), id_column="x"), shards)


def test_files_too_large_not_read(folders, monkeypatch):
    cfg = SourceConfig(uri=str(folders), max_bytes=200)
    shards, _ = list_shards(cfg)
    read = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: read.append(uri) or real(uri))
    rows = _rows(shards, cfg)
    big = [r for r in rows if r["error_kind"] == "too_large"]
    assert big and all(r["bytes"] is None and "max_bytes" in r["error_message"] for r in big)
    assert not {r["source"] for r in big} & set(read)  # never fetched
    assert all(len(r["bytes"]) <= 200 for r in rows if r["error_kind"] is None)


def test_files_vanished_and_unreadable_become_read_error_rows(folders, monkeypatch):
    cfg = SourceConfig(uri=str(folders), labels="folder")
    shards, _ = list_shards(cfg)
    (folders / "cats" / "001.jpg").unlink()  # vanished between listing and reading
    real = storage.read_bytes

    def flaky(uri: str) -> bytes:
        if uri.endswith("dogs/000.png"):
            raise storage.explain(uri, PermissionError(13, "Permission denied"))
        return real(uri)

    monkeypatch.setattr(storage, "read_bytes", flaky)
    by_id = _by_id(_rows(shards, cfg))
    assert len(by_id) == 7
    gone, denied = by_id["cats/001.jpg"], by_id["dogs/000.png"]
    assert gone["error_kind"] == "read_error" and gone["bytes"] is None
    assert "does not exist" in gone["error_message"]
    assert denied["error_kind"] == "read_error" and "access denied" in denied["error_message"]
    assert gone["label"] == "cats"
    assert by_id["cats/000.jpg"]["error_kind"] is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_files_chmod_000_is_read_error(folders):
    path = folders / "cats" / "000.jpg"
    path.chmod(0)
    try:
        cfg = SourceConfig(uri=str(folders))
        rows = _by_id(_rows(list_shards(cfg)[0], cfg))
        assert rows["cats/000.jpg"]["error_kind"] == "read_error"
    finally:
        path.chmod(0o644)


def test_single_file_source(folders):
    cfg = SourceConfig(uri=str(folders / "cats" / "002.jpg"), labels="folder")
    shards, skipped = list_shards(cfg)
    assert skipped == 0 and len(shards) == 1 and shards[0].rels == ("002.jpg",)
    (row,) = _rows(shards, cfg)
    assert row["id"] == "002.jpg" and row["label"] is None and row["bytes"]


# -- format detection and listing errors ------------------------------------------------------------------


def test_detect_format_and_mixed_sources(tmp_path, folders):
    files = storage.list_files(str(folders))
    assert detect_format(files) == "files"
    _write(folders / "extra" / "a.tar", b"")
    _write(folders / "extra" / "b.tar", b"")
    with pytest.raises(ConfigError) as e:
        list_shards(SourceConfig(uri=str(folders)))
    assert "7 image files" in str(e.value) and "2 WebDataset" in str(e.value) and "--format" in str(e.value)
    shards, skipped = list_shards(SourceConfig(uri=str(folders), format="files"))
    assert sum(len(s.uris) for s in shards) == 7 and skipped == 3
    shards, skipped = list_shards(SourceConfig(uri=str(folders), format="webdataset"))
    assert [s.rels for s in shards] == [("extra/a.tar",), ("extra/b.tar",)] and skipped == 8
    with pytest.raises(ConfigError, match="no images/shards found .* check --source / --format"):
        list_shards(SourceConfig(uri=str(folders), format="parquet"))


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images/shards found under .*empty.* check --source"):
        list_shards(SourceConfig(uri=str(tmp_path / "empty")))
    _write(tmp_path / "docs" / "notes.txt", b"x")
    with pytest.raises(ConfigError, match="check --source / --format"):
        list_shards(SourceConfig(uri=str(tmp_path / "docs")))
    with pytest.raises(ConfigError, match="does not exist"):
        list_shards(SourceConfig(uri=str(tmp_path / "nope")))


def test_modules_are_ray_free():
    code = ("import sys, pipeline.sources, pipeline.preprocess.decode; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- WebDataset -------------------------------------------------------------------------------------------


def _tar_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


WDS_MEMBERS = [
    ("000.jpg", _jpeg(0)), ("000.cls", b" 3\n"), ("000.json", b"{}"),
    ("001.png", _png()), ("001.jpg", _jpeg(1)), ("001.txt", b"a dog"),
    ("002.json", b"{}"),  # no image
    ("../evil.jpg", _jpeg(2)),
    ("sub/003.input.jpg", _jpeg(3)), ("sub/003.jpg", _jpeg(4)),
    ("._004.jpg", b"AppleDouble"),
    ("005.JPEG", _jpeg(5)), ("005.cls", b"7"),
]


@pytest.fixture
def wds(tmp_path) -> Path:
    root = tmp_path / "wds" / "root"
    _write(root / "train" / "shard-000.tar", _tar_bytes(WDS_MEMBERS))
    _write(root / "train" / "shard-001.tar", _tar_bytes([("100.jpg", _jpeg(6)), ("100.cls", b"1")]))
    return root


def test_webdataset_rows(wds, tmp_path, monkeypatch):
    monkeypatch.chdir(wds)
    cfg = SourceConfig(uri=str(wds), labels="folder")
    shards, skipped = list_shards(cfg)
    assert skipped == 0 and [s.format for s in shards] == ["webdataset"] * 2
    assert shards[0].rels == ("train/shard-000.tar",) and all(KEY_RE.match(s.key) for s in shards)
    check_source(cfg, shards)
    rows = _rows(shards, cfg, rows_per_batch=3)
    by_id = _by_id(rows)
    p = "train/shard-000.tar/"
    expected = ["000", "001", "002", "../evil.jpg", "sub/003", "005"]
    assert sorted(by_id) == sorted([p + k for k in expected] + ["train/shard-001.tar/100"])
    assert by_id[p + "000"]["label"] == "3" and by_id[p + "000"]["bytes"] == _jpeg(0)
    assert by_id[p + "001"]["label"] == "a dog"
    assert by_id[p + "001"]["bytes"] == _jpeg(1)  # jpg preferred over png
    assert by_id[p + "005"]["label"] == "7" and by_id[p + "005"]["bytes"] == _jpeg(5)
    assert by_id[p + "sub/003"]["bytes"] == _jpeg(4)  # '003.input.jpg' has extension 'input.jpg'
    no_image = by_id[p + "002"]
    assert no_image["error_kind"] == "no_image" and no_image["bytes"] is None
    assert "json" in no_image["error_message"]
    evil = by_id[p + "../evil.jpg"]
    assert evil["error_kind"] == "unsafe_name" and evil["bytes"] is None
    assert by_id["train/shard-001.tar/100"]["label"] == "1"
    assert all(r["source"] == str(wds / "train" / "shard-000.tar") for r in rows if r["id"].startswith(p))
    assert [r["row"] for r in rows if r["id"].startswith(p)] == list(range(6))
    # nothing was extracted anywhere
    assert not list(tmp_path.rglob("evil*")) and not (wds.parent / "evil.jpg").exists()
    assert sorted(p.name for p in wds.rglob("*")) == ["shard-000.tar", "shard-001.tar", "train"]


def test_webdataset_label_choices(wds):
    shards, _ = list_shards(SourceConfig(uri=str(wds)))
    assert all(r["label"] is None for r in _rows(shards, SourceConfig(uri=str(wds))))
    by_id = _by_id(_rows(shards, SourceConfig(uri=str(wds), labels="txt")))
    assert by_id["train/shard-000.tar/001"]["label"] == "a dog"
    assert by_id["train/shard-000.tar/000"]["label"] is None


def test_webdataset_too_large_member_and_gzip(tmp_path):
    root = tmp_path / "gz"
    members = [("a.jpg", _jpeg(0, (64, 64))), ("b.jpg", _jpeg(1, (4, 4)))]
    _write(root / "s.tar.gz", _tar_bytes(members, "w:gz"))
    cfg = SourceConfig(uri=str(root), max_bytes=1500)
    by_id = _by_id(_rows(list_shards(cfg)[0], cfg))
    assert by_id["s.tar.gz/a"]["error_kind"] == "too_large" and by_id["s.tar.gz/a"]["bytes"] is None
    assert by_id["s.tar.gz/b"]["error_kind"] is None and by_id["s.tar.gz/b"]["bytes"] == _jpeg(1, (4, 4))


def test_webdataset_duplicate_keys_keep_ids_unique(tmp_path):
    members = [("a.jpg", _jpeg(0)), ("b.jpg", _jpeg(1)), ("a.cls", b"1"), ("a.jpg", _jpeg(2))]
    root = tmp_path / "dup"
    _write(root / "d.tar", _tar_bytes(members))
    cfg = SourceConfig(uri=str(root), labels="folder")
    rows = _rows(list_shards(cfg)[0], cfg)
    assert [(r["id"], r["error_kind"]) for r in rows] == [
        ("d.tar/a", None), ("d.tar/b", None), ("d.tar/a#2", "duplicate_key")]
    assert rows[0]["bytes"] == _jpeg(0) and rows[0]["label"] is None


@pytest.mark.parametrize("where", ["inside_member", "at_member_boundary"])
def test_webdataset_truncated_tar(tmp_path, where):
    members = [(f"{i:03d}.jpg", _jpeg(i)) for i in range(6)]
    data = _tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        infos = tf.getmembers()
    if where == "inside_member":
        cut = infos[3].offset_data + infos[3].size // 2
    else:  # after member 2's padded data: no end-of-archive marker
        cut = infos[3].offset
    path = _write(tmp_path / "t" / "s.tar", data[:cut])
    cfg = SourceConfig(uri=str(path.parent))
    rows = _rows(list_shards(cfg)[0], cfg, rows_per_batch=2)
    assert [r["id"] for r in rows[:3]] == ["s.tar/000", "s.tar/001", "s.tar/002"]
    assert all(r["error_kind"] is None and r["bytes"] == _jpeg(i) for i, r in enumerate(rows[:3]))
    assert len(rows) == 4
    last = rows[-1]
    assert last["error_kind"] == "shard_corrupt" and last["bytes"] is None and last["id"].startswith("s.tar/")
    assert last["row"] == 3


def test_webdataset_unopenable_and_not_a_tar(tmp_path):
    root = tmp_path / "bad"
    _write(root / "a.tar", b"<html>not a tar</html>" * 40)
    gone = _write(root / "b.tar", _tar_bytes([("x.jpg", _jpeg())]))
    cfg = SourceConfig(uri=str(root))
    shards, _ = list_shards(cfg)
    gone.unlink()
    by_id = _by_id(_rows(shards, cfg))
    assert [r["error_kind"] for r in by_id.values()] == ["shard_corrupt", "read_error"]
    assert "does not exist" in by_id["b.tar/<unreadable>"]["error_message"]


# -- Parquet ----------------------------------------------------------------------------------------------


def _parquet(path: Path, table: pa.Table, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kw)
    return path


@pytest.fixture
def pq_dir(tmp_path) -> Path:
    root = tmp_path / "pq"
    images = [_jpeg(i) for i in range(5)]
    images[2] = None
    table = pa.table({
        "key": pa.array(["k0", "k1", "k2", "k3", "k4"]),
        "label": pa.array([0, 1, 0, 1, None], pa.int64()),
        "species": pa.array(["cat", "dog", "cat", "dog", "cat"]),
        "image": pa.array(images, pa.binary()),
        "caption": pa.array(["a", "b", "c", "d", "e"]),
    })
    _parquet(root / "part-0.parquet", table, row_group_size=2)
    _parquet(root / "part-1.parquet", table.slice(0, 2))
    _write(root / "_SUCCESS", b"")  # another writer's marker: not an input, not counted as skipped
    return root


def test_parquet_rows_with_id_and_label_columns(pq_dir):
    cfg = SourceConfig(uri=str(pq_dir), id_column="key", labels="species")
    shards, skipped = list_shards(cfg)
    assert skipped == 0 and [s.rels for s in shards] == [("part-0.parquet",), ("part-1.parquet",)]
    check_source(cfg, shards)
    rows = _rows(shards[:1], cfg, rows_per_batch=2)
    assert [r["id"] for r in rows] == ["k0", "k1", "k2", "k3", "k4"]
    assert [r["label"] for r in rows] == ["cat", "dog", "cat", "dog", "cat"]
    assert rows[0]["bytes"] == _jpeg(0) and rows[0]["source"] == str(pq_dir / "part-0.parquet")
    assert rows[2]["bytes"] is None and rows[2]["error_kind"] == "missing"
    assert [r["row"] for r in rows] == list(range(5)) and {r["shard"] for r in rows} == {shards[0].key}


def test_parquet_row_ids_and_folder_labels(pq_dir):
    cfg = SourceConfig(uri=str(pq_dir), labels="folder")  # 'folder' reads the 'label' column
    shards, _ = list_shards(cfg)
    check_source(cfg, shards)
    rows = _rows(shards, cfg, rows_per_batch=3)
    assert [r["id"] for r in rows] == [f"part-0.parquet#{i}" for i in range(5)] + ["part-1.parquet#0",
                                                                                     "part-1.parquet#1"]
    assert [r["label"] for r in rows[:5]] == ["0", "1", "0", "1", None]


def test_parquet_struct_image_column(tmp_path):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": _jpeg(0), "path": "a.jpg"}, None, {"bytes": None, "path": "c.jpg"}]
    path = _parquet(tmp_path / "hf" / "train.parquet",
                    pa.table({"img": pa.array(cells, struct), "text": ["x", "y", "z"]}))
    cfg = SourceConfig(uri=str(path))
    shards, _ = list_shards(cfg)
    check_source(cfg, shards)
    rows = _rows(shards, cfg)
    assert rows[0]["id"] == "train.parquet#0" and rows[0]["bytes"] == _jpeg(0)
    assert [r["error_kind"] for r in rows] == [None, "missing", "missing"]


def test_parquet_config_errors_list_columns(pq_dir, tmp_path):
    shards, _ = list_shards(SourceConfig(uri=str(pq_dir)))
    with pytest.raises(ConfigError) as e:
        check_source(SourceConfig(uri=str(pq_dir), image_column="photo"), shards)
    msg = str(e.value)
    assert "'photo'" in msg and "source.image_column" in msg
    assert "key (string)" in msg and "image (binary)" in msg and "caption (string)" in msg
    with pytest.raises(ConfigError, match="source.id_column.*available columns"):
        check_source(SourceConfig(uri=str(pq_dir), id_column="uuid"), shards)
    with pytest.raises(ConfigError, match="--labels"):
        check_source(SourceConfig(uri=str(pq_dir), labels="breed"), shards)
    with pytest.raises(ConfigError, match="not binary"):
        check_source(SourceConfig(uri=str(pq_dir), image_column="caption"), shards)
    two = _parquet(tmp_path / "two" / "x.parquet", pa.table({"a": [b"1"], "b": [b"2"]}))
    with pytest.raises(ConfigError, match="several possible image columns.*source.image_column"):
        check_source(SourceConfig(uri=str(two)), list_shards(SourceConfig(uri=str(two)))[0])
    one = _parquet(tmp_path / "one" / "x.parquet", pa.table({"blob": [_jpeg()], "n": [1]}))
    cfg = SourceConfig(uri=str(one), id_column="n")
    check_source(cfg, list_shards(cfg)[0])  # the only binary column; integer ids are fine
    assert _rows(list_shards(cfg)[0], cfg)[0]["id"] == "1"


def test_parquet_bad_files_become_error_rows(tmp_path):
    root = tmp_path / "badpq"
    _write(root / "a.parquet", b"PAR1 garbage, not parquet")
    _parquet(root / "b.parquet", pa.table({"other": [b"x"], "more": [b"y"]}))
    cfg = SourceConfig(uri=str(root), image_column="image")
    rows = _rows(list_shards(cfg)[0], cfg)
    assert [(r["id"], r["error_kind"]) for r in rows] == [("a.parquet#<unreadable>", "read_error"),
                                                          ("b.parquet#<schema>", "schema_mismatch")]


# -- object storage ---------------------------------------------------------------------------------------


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the loopback S3 server (no location constraint: us-east-1 refuses one)."""
    name = f"sources-{uuid.uuid4().hex[:10]}"
    fs, _ = storage.get_fs(f"s3://{name}")
    fs.call_s3("create_bucket", Bucket=name)
    return f"s3://{name}"


def test_s3_sources(s3_bucket, folders, wds, pq_dir, s3_server):
    bucket = s3_bucket
    for name, local in (("files", folders), ("wds", wds), ("pq", pq_dir)):
        s3_server.upload_dir(str(local), f"{bucket}/{name}")
    cfg = SourceConfig(uri=f"{bucket}/files", labels="folder", files_per_shard=4)
    shards, skipped = list_shards(cfg)
    assert skipped == 1 and all(u.startswith(bucket + "/files/") for s in shards for u in s.uris)
    local_keys = [s.key for s in list_shards(SourceConfig(uri=str(folders), files_per_shard=4))[0]]
    assert [s.key for s in shards] == local_keys  # keys depend on relative paths only
    by_id = _by_id(_rows(shards, cfg))
    assert by_id["cats/001.jpg"]["bytes"] == (folders / "cats" / "001.jpg").read_bytes()
    assert by_id["cats/001.jpg"]["source"] == f"{bucket}/files/cats/001.jpg"
    cfg = SourceConfig(uri=f"{bucket}/wds", labels="folder")
    assert _by_id(_rows(list_shards(cfg)[0], cfg))["train/shard-000.tar/000"]["label"] == "3"
    cfg = SourceConfig(uri=f"{bucket}/pq", id_column="key")
    shards, _ = list_shards(cfg)
    check_source(cfg, shards)
    assert [r["id"] for r in _rows(shards[:1], cfg)] == ["k0", "k1", "k2", "k3", "k4"]
    with pytest.raises((ConfigError, StorageError)):
        list_shards(SourceConfig(uri=f"{bucket}/nothing-here"))


def test_sanitized_keys_are_unique_and_not_hidden():
    assert shards.sanitize("_hidden/..x y.tar").startswith("hidden_")
    assert shards.sanitize("...") == "shard"
    a = shards.file_shard("webdataset", [storage.FileInfo("u1", "a/b.tar", 1, "v")])
    b = shards.file_shard("webdataset", [storage.FileInfo("u2", "a_b.tar", 1, "v")])
    assert a.key != b.key and a.key.startswith("a_b.tar-") and b.key.startswith("a_b.tar-")


def test_content_fingerprint_sees_an_edit_that_kept_the_size_and_the_mtime(tmp_path):
    """A BMP repainted in place at the same dimensions (same size) with its mtime put back, as `cp -p` or a
    restore leaves it: the quick check (size + mtime) misses it, `fingerprint: content` does not."""
    from pipeline.sources.fingerprint import content_version

    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    for i, color in enumerate(("red", "green", "blue")):
        Image.new("RGB", (16, 16), color).save(src / f"{i}.bmp")
    (src / "notes.txt").write_text("not an input: never hashed")

    def versions(fingerprint: str) -> dict[str, str]:
        listed, _ = list_shards(SourceConfig(uri=str(tmp_path / "src"), fingerprint=fingerprint))
        return {s.key: s.version for s in listed}

    before = {f: versions(f) for f in ("stat", "content")}
    assert before["stat"].keys() == before["content"].keys() and before["stat"] != before["content"]
    edited = src / "1.bmp"
    st = edited.stat()
    size = st.st_size
    Image.new("RGB", (16, 16), "yellow").save(edited)
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert edited.stat().st_size == size and edited.stat().st_mtime_ns == st.st_mtime_ns
    assert versions("stat") == before["stat"]  # the quick check cannot see it
    assert versions("content") != before["content"]

    gone = storage.FileInfo(str(src / "missing.bmp"), "a/missing.bmp", 10, "mtime")
    assert content_version(gone) == gone  # unreadable: listed as is, the read task reports it
    (tmp_path / "m.csv").write_text(f"uri\n{src / '0.bmp'}\n")
    with pytest.raises(ConfigError, match="a manifest's checksum column .* is its content fingerprint"):
        list_shards(SourceConfig(uri=str(tmp_path / "m.csv"), fingerprint="content"))
