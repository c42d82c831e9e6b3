"""End to end through Ray: golden checks against plain timm/torchvision forwards, S3 for every source format,
counts that reconcile, output that analytics tools read without Ray."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from pipeline import samples, storage
from pipeline.commands.extract import extract
from pipeline.config import ExtractConfig
from pipeline.output.spec import read_spec


def _cfg(source, output, **backbone):
    return ExtractConfig.model_validate({
        "source": {"uri": str(source), "labels": "folder", "files_per_shard": 10},
        "backbone": {"model": "tf_efficientnet_lite0", "weights": "packaged", **backbone},
        "output": {"uri": str(output)},
        # the exact fp32 path: the golden checks against plain timm below compare to 1e-4
        "runtime": {"batch_size": 8, "progress": False, "autocast": "none"},
    })


def _read(uri: str):
    fs, path = storage.get_fs(storage.join(uri, "embeddings"))
    t = pads.dataset(path, filesystem=fs, format="parquet").to_table().sort_by("id")
    return t, np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _timm_reference(files: list[Path], layer: str = "final") -> np.ndarray:
    import timm

    from pipeline.backbone.weights import load_packaged

    m = timm.create_model("tf_efficientnet_lite0")
    m.load_state_dict(load_packaged("tf_efficientnet_lite0")[0])
    m.eval()
    t = timm.data.create_transform(**timm.data.resolve_model_data_config(m), is_training=False)
    x = torch.stack([t(Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        if layer == "final":
            return m.forward_head(m.forward_features(x), pre_logits=True).numpy()
        idx = [fi["module"] for fi in m.feature_info].index(layer)
        return m.forward_intermediates(x, indices=[idx], intermediates_only=True)[0].mean(dim=(2, 3)).numpy()


@pytest.fixture(scope="module")
def dirty_dir(textures_dir, tmp_path_factory):
    """The texture set plus a truncated JPEG, a zero-byte file and a non-image file."""
    root = tmp_path_factory.mktemp("dirty")
    shutil.copytree(textures_dir, root, dirs_exist_ok=True)
    good = (root / "brick" / "000.jpg").read_bytes()
    (root / "brick" / "zz_truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "grass" / "zz_empty.jpg").write_bytes(b"")
    (root / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def local_run(ray_session, dirty_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out-local")
    summary = extract(_cfg(dirty_dir, out))
    return dirty_dir, out, summary


def test_golden_final_layer_matches_plain_timm(local_run):
    root, out, _ = local_run
    table, emb = _read(str(out))
    files = [root / i for i in table.column("id").to_pylist()]
    ref = _timm_reference(files)
    assert emb.shape == (24, 1280)
    assert _cos(emb, ref).min() >= 0.9999


def test_tensor_decoder_through_ray_matches_plain_timm(local_run, tmp_path):
    """runtime.decoder=tensor (the GPU default) on CPU actors: same rows and errors, the same features."""
    root, out, s = local_run
    cfg = _cfg(root, tmp_path / "out")
    cfg.runtime.decoder, cfg.runtime.channels_last = "tensor", True
    cfg.runtime.batch_size = None  # sized from the model's input: 32 for a CPU actor
    t = extract(cfg)
    assert t["counts"] == s["counts"] and t["error_kinds"] == s["error_kinds"]
    assert t["actors"]["batch_size"] == 32 and s["actors"]["batch_size"] == 8
    table, emb = _read(str(tmp_path / "out"))
    assert table.column("id").to_pylist() == _read(str(out))[0].column("id").to_pylist()
    ref = _timm_reference([root / i for i in table.column("id").to_pylist()])
    assert _cos(emb, ref).min() >= 0.999


def test_compile_of_a_cut_it_cannot_compile_fails_on_the_driver(textures_dir, tmp_path):
    cfg = _cfg(textures_dir, tmp_path / "out", layer="blocks.3")
    cfg.runtime.compile = True
    with pytest.raises(ValueError, match="runtime.compile=false"):
        extract(cfg)
    assert not (tmp_path / "out").exists()


def test_counts_ids_labels_and_errors(local_run):
    root, out, s = local_run
    assert s["counts"] == {"inputs": 26, "embedded": 24, "failed": 2, "skipped": 1}
    assert s["error_kinds"] == {"truncated": 1, "empty": 1}
    table, _ = _read(str(out))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 24
    assert "brick/000.jpg" in ids
    assert set(table.column("label").to_pylist()) == {"brick", "grass", "gravel"}
    assert all(lab == i.split("/")[0] for lab, i in zip(table.column("label").to_pylist(), ids))
    errors = pads.dataset(out / "errors").to_table().sort_by("id")
    assert errors.column("id").to_pylist() == ["brick/zz_truncated.jpg", "grass/zz_empty.jpg"]
    assert errors.column("error").to_pylist() == ["truncated", "empty"]


def test_metadata_and_run_record(local_run):
    _, out, s = local_run
    spec = read_spec(pads.dataset(out / "embeddings").schema)
    assert spec["model"] == "tf_efficientnet_lite0" and spec["layer"] == "final" and spec["dim"] == 1280
    assert spec["weights"]["source"].startswith("packaged:") and len(spec["weights"]["sha256"]) == 64
    assert spec["preprocessing"]["interpolation"] == "bicubic" and spec["preprocessing"]["crop_pct"] == 0.875
    assert {"torch", "timm", "ray", "pipeline"} <= set(spec["versions"])
    runs = list((out / "_runs").glob("*.json"))
    assert len(runs) == 1
    rec = json.loads(runs[0].read_text())
    assert rec["counts"]["embedded"] == 24 and rec["config"]["backbone"]["model"] == "tf_efficientnet_lite0"
    assert rec["images_per_s"] > 0
    assert rec["actor_time_s"]["decode"] > 0 and rec["actor_time_s"]["forward"] > 0
    assert rec["gpu_utilization"] is None


def test_run_record_holds_the_plan_and_the_precision(local_run, tmp_path):
    """The planner fills what the config left unset and says why; the precision is in the spec, and an
    output made in fp32 refuses bf16 rows instead of mixing them."""
    from pipeline.config import ConfigError

    root, out, s = local_run
    plan = s["plan"]
    assert plan["settings"]["autocast"] == "none" and plan["precision"] == "fp32"  # set by the config
    assert plan["settings"]["threads"] >= 1 and plan["settings"]["cpus_per_actor"] > 0
    assert any("torch thread" in r for r in plan["reasons"])
    # fp32 as the config says: lite0's forwards are sized for its fp32 activations (4.6 MiB per image)
    assert plan["settings"]["forward_batch"] == 4 and any("forward batch 4" in r for r in plan["reasons"])
    assert read_spec(pads.dataset(out / "embeddings").schema)["precision"] == "fp32"
    bf16 = _cfg(root, out)
    bf16.runtime.autocast = "bf16"
    with pytest.raises(ConfigError, match=r"precision: fp32 -> bf16.*--overwrite"):
        extract(bf16)


def test_rerun_resumes_and_a_changed_spec_needs_overwrite(local_run):
    from pipeline.config import ConfigError

    root, out, _ = local_run
    s = extract(_cfg(root, out))  # everything is done already: no Ray work, nothing written twice
    assert s["ledger"]["ran"] == 0 and s["ledger"]["done_before"] == s["ledger"]["listed"] >= 3
    assert s["counts"]["inputs"] == 0 and s["ledger"]["output_rows"] == {"embedded": 24, "failed": 2}
    assert len(_read(str(out))[0]) == 24
    with pytest.raises(ConfigError, match=r"layer: final -> blocks.4.*--overwrite"):
        extract(_cfg(root, out, layer="blocks.4"))


def test_output_is_read_without_ray(local_run):
    """DuckDB, Polars, pandas and pyarrow read the embeddings in a process where Ray cannot be imported."""
    _, out, _ = local_run
    code = f"""
import sys
sys.modules["ray"] = None  # any import of ray now fails
import duckdb, polars as pl, pandas as pd, pyarrow.dataset as ds
p = {str(out / "embeddings")!r}
n, d = duckdb.sql(f"SELECT count(*), max(len(embedding)) FROM read_parquet('{{p}}/*.parquet')").fetchall()[0]
df = pl.read_parquet(p + "/*.parquet")
pdf = pd.read_parquet(p)
t = ds.dataset(p).to_table()
assert n == len(df) == len(pdf) == t.num_rows == 24, (n, len(df), len(pdf), t.num_rows)
assert d == 1280 and df["embedding"].to_numpy().shape == (24, 1280)
assert len(pdf["embedding"].iloc[0]) == 1280
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_golden_torchvision_model(ray_session, textures_dir, tmp_path):
    import torchvision

    from pipeline.backbone.weights import load_packaged

    extract(_cfg(textures_dir, tmp_path / "out", model="tv:mobilenet_v2"))
    table, emb = _read(str(tmp_path / "out"))
    m = torchvision.models.mobilenet_v2()
    m.load_state_dict(load_packaged("tv:mobilenet_v2")[0])
    m.classifier = torch.nn.Identity()
    m.eval()
    t = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    x = torch.stack([t(Image.open(textures_dir / i).convert("RGB")) for i in table.column("id").to_pylist()])
    with torch.inference_mode():
        ref = m(x).numpy()
    assert emb.shape == (24, 1280)
    assert _cos(emb, ref).min() >= 0.9999


# Over S3, loose files in every run; WebDataset and Parquet shards with `-m slow` (their readers over S3 are
# tested in test_sources.py, and through Ray in test_hostile.py)
@pytest.mark.parametrize("fmt", ["files", pytest.param("webdataset", marks=pytest.mark.slow),
                                 pytest.param("parquet", marks=pytest.mark.slow)])
def test_s3_end_to_end_equals_local(ray_session, s3_server, bucket, textures_dir, tmp_path, fmt):
    """Shards read from a bucket, Parquet written to a bucket, over HTTP to the loopback S3 server."""
    if fmt == "files":
        local = textures_dir
    elif fmt == "webdataset":
        local = tmp_path / "wds"
        samples.pack_webdataset(textures_dir, local, per_shard=10)
    else:
        local = tmp_path / "pq"
        samples.pack_parquet(textures_dir, local / "images.parquet", rows_per_group=10)
    s3_server.upload_dir(str(local), f"{bucket}/in")

    s3_cfg = _cfg(f"{bucket}/in", f"{bucket}/out")
    s3_cfg.source.format = fmt
    s3_cfg.runtime.calls_per_actor = 2  # the GPU default: two batches per actor at once, same output
    s3 = extract(s3_cfg)
    assert s3["counts"] == {"inputs": 24, "embedded": 24, "failed": 0, "skipped": 0}
    t_s3, e_s3 = _read(f"{bucket}/out")
    ids = t_s3.column("id").to_pylist()
    if fmt == "files":  # the ids and labels a local run gives, and the embeddings of plain timm
        files = sorted(textures_dir.rglob("*.jpg"))
        assert ids == sorted(str(f.relative_to(textures_dir)) for f in files)
        assert t_s3.column("label").to_pylist() == [i.split("/")[0] for i in ids]
        assert _cos(e_s3, _timm_reference([textures_dir / i for i in ids])).min() >= 0.9999
    else:  # packed shards: the same rows as the same shards read locally
        local_cfg = _cfg(local, tmp_path / "local-out")
        local_cfg.source.format = fmt
        assert extract(local_cfg)["counts"] == s3["counts"]
        t_loc, e_loc = _read(str(tmp_path / "local-out"))
        assert ids == t_loc.column("id").to_pylist()
        np.testing.assert_allclose(e_s3, e_loc, rtol=1e-5, atol=1e-5)
    assert set(t_s3.column("label").to_pylist()) == {"brick", "grass", "gravel"}
    assert storage.list_files(f"{bucket}/out/_runs")


def test_classify_through_ray(ray_session, tmp_path):
    """`classify`: the pretrained model as is, top-k ImageNet classes with names, through the actor pool."""
    from pipeline.commands.extract import classify
    from pipeline.config import ClassifyConfig

    photos = tmp_path / "photos"
    samples.make_photos(photos, ("chelsea", "coffee", "astronaut"))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    cfg = ClassifyConfig.model_validate({
        "source": {"uri": str(photos)}, "backbone": {"model": "tv:mobilenet_v2"},
        "output": {"uri": str(tmp_path / "out")}, "runtime": {"progress": False}, "top_k": 5,
    })
    s = classify(cfg)
    assert s["counts"] == {"inputs": 4, "embedded": 3, "failed": 1, "skipped": 0}
    t = pads.dataset(tmp_path / "out" / "predictions").to_table().sort_by("id")
    assert t.column_names == ["id", "source", "labels", "scores", "classes"]
    rows = {r["id"]: r for r in t.to_pylist()}
    assert 281 <= rows["chelsea.jpg"]["classes"][0] <= 285
    assert {967, 968} & set(rows["coffee.jpg"]["classes"])
    assert rows["coffee.jpg"]["labels"][0] == "espresso"  # torchvision's category names
    assert read_spec(t.schema)["top_k"] == 5


# -- transfer learning: heads on stored embeddings, predict, probe ----------------------------------------


@pytest.fixture(scope="module")
def texture_features(ray_session, tmp_path_factory):
    """90 jittered texture patches embedded twice: packaged ImageNet weights and random init."""
    root = tmp_path_factory.mktemp("tex90")
    samples.make_textures(root / "images", per_class=30, patch=96, seed=0)
    outs = {}
    for w in ("packaged", "none"):
        cfg = _cfg(root / "images", root / f"emb-{w}")
        cfg.backbone.weights = w
        extract(cfg)
        outs[w] = root / f"emb-{w}"
    return root, outs


def test_pretrained_features_beat_random_ones(texture_features):
    from pipeline.heads import HeadTrainConfig, train_head

    root, outs = texture_features
    acc = {}
    for w, emb in outs.items():
        cfg = HeadTrainConfig(embeddings=str(emb), output=str(root / f"head-{w}"))
        meta = train_head(cfg, progress=False)
        acc[w] = meta["metrics"]["validation"]["accuracy"]
    assert acc["packaged"] >= 0.95, acc
    assert acc["packaged"] - acc["none"] >= 0.15, acc


def test_heads_predict_through_ray(texture_features, tmp_path):
    from pipeline.commands.heads import predict
    from pipeline.heads import HeadTrainConfig, train_head

    root, outs = texture_features
    head = tmp_path / "head"
    train_head(HeadTrainConfig(embeddings=str(outs["packaged"]), output=str(head)), progress=False)
    s = predict(str(head), str(outs["packaged"]), str(tmp_path / "pred"), top_k=2,
                runtime=_cfg(root, tmp_path).runtime)
    pred = pads.dataset(tmp_path / "pred" / "predictions").to_table()
    emb, _ = _read(str(outs["packaged"]))
    assert s["rows"] == pred.num_rows == emb.num_rows == 90
    assert sorted(pred.column("id").to_pylist()) == sorted(emb.column("id").to_pylist())
    truth = dict(zip(emb.column("id").to_pylist(), emb.column("label").to_pylist()))
    agree = np.mean([truth[i] == lab for i, lab in zip(pred.column("id").to_pylist(),
                                                       pred.column("label").to_pylist())])
    assert agree >= 0.95
    assert all(len(t) == 2 for t in pred.column("top_labels").to_pylist())
    with pytest.raises(ValueError, match="weights.sha256"):  # a head trained on other features
        predict(str(head), str(outs["none"]), str(tmp_path / "pred2"))


def test_probe_ranks_layers_and_its_intermediate_embeddings_are_timms(ray_session, textures_dir, tmp_path):
    """One pass through the actor pool embeds three cuts; each cut's embeddings (here blocks.2, averaged)
    equal plain timm's forward_intermediates on the same images."""
    from pipeline.commands.probe import probe
    from pipeline.config import ProbeConfig

    cfg = ProbeConfig.model_validate({
        "source": {"uri": str(textures_dir), "labels": "folder"}, "output": {"uri": str(tmp_path)},
        "runtime": {"progress": False, "batch_size": 8, "autocast": "none"},
        "models": "tf_efficientnet_lite0", "layers": "blocks.2,blocks.4,final", "sample": 21,
    })
    report = probe(cfg, progress=False)
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert [r["layer"] for r in saved["results"]] == ["blocks.2", "blocks.4", "final"]
    assert [r["dim"] for r in saved["results"]] == [40, 112, 1280]
    table, emb = _read(str(tmp_path / "tf_efficientnet_lite0" / "blocks.2"))
    ref = _timm_reference([textures_dir / i for i in table.column("id").to_pylist()], layer="blocks.2")
    assert emb.shape == (21, 40) and _cos(emb, ref).min() >= 0.9999
    assert all(0 <= r["accuracy"] <= 1 and r["forward_ms_per_image"] > 0 for r in saved["results"])
    assert all(r["train_rows"] + r["val_rows"] == 21 for r in saved["results"])  # --sample 21 of 24
    best = max(saved["results"], key=lambda r: (r["accuracy"], r["macro_f1"], -r["forward_ms_per_image"]))
    assert (saved["best"]["layer"], report["best"]["layer"]) == (best["layer"], best["layer"])
    assert (tmp_path / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "tf_efficientnet_lite0" / "final" / "head" / "head.json").exists()


def test_versions_are_plain_strings():
    """The spec travels to every write task: a torch TorchVersion in it would make each of those Ray
    workers import torch to unpickle it (about 450 MiB more per process, bench/memory.py)."""
    from pipeline.commands.run import versions

    v = versions()
    assert {"torch", "torchvision", "timm", "pyarrow", "pipeline"} <= set(v)
    assert all(type(x) is str for x in v.values()), {k: type(x) for k, x in v.items()}
