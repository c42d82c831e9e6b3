"""Fine-tuning (weight initialization) with Ray Train: freezing, discriminative learning rates, checkpoints
and resume after a killed driver (to more epochs than the killed run had), and the fine-tuned backbone and
head going back through `extract` and `heads predict`.

The Ray tests share runs (module fixtures) to stay small: 24 texture patches (16 train, 8 validation), two
CPU workers with the CPUs the planner gives them, batch 4 (two steps per worker per epoch).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
import yaml

from pipeline import finetune as ft
from pipeline.commands.extract import extract
from pipeline.commands.finetune import collect_labels, finetune
from pipeline.config import ConfigError, FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
FROZEN_PREFIXES = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.")


def _cfg(source, output, **train) -> FinetuneConfig:
    return FinetuneConfig.model_validate({
        "source": {"uri": str(source)},
        "output": {"uri": str(output)},
        "backbone": {"model": "tf_efficientnet_lite0", "weights": "packaged"},
        "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "freeze_until": "blocks.3", **train},
        "runtime": {"workers": 2, "progress": False},
    })


def _no_ray(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("Ray was started before the configuration was validated")

    import pipeline.ray.data
    import pipeline.ray.train

    monkeypatch.setattr(pipeline.ray.data, "init_ray", refuse)
    monkeypatch.setattr(pipeline.ray.train, "init_ray", refuse)


# -- bad input fails before Ray --------------------------------------------------------------------------


def test_unknown_freeze_layer_names_valid_layers(textures_dir, tmp_path, monkeypatch):
    _no_ray(monkeypatch)
    with pytest.raises(ConfigError) as e:
        finetune(_cfg(textures_dir, tmp_path / "out", freeze_until="blocks.9"))
    msg = str(e.value)
    assert "blocks.9" in msg and "Valid: none, final, blocks.0" in msg and "blocks.6" in msg
    assert "pipeline layers --model tf_efficientnet_lite0 --all" in msg
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_cli_reports_bad_freeze_layer_in_one_line(textures_dir, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    r = CliRunner().invoke(app, ["finetune", "--source", str(textures_dir), "--output", str(tmp_path / "o"),
                                 "--model", "tf_efficientnet_lite0", "--freeze-until", "logits"])
    assert r.exit_code == 2
    assert "unknown --freeze-until layer 'logits'" in r.output and "Valid:" in r.output


def test_fewer_than_two_classes(textures_dir, tmp_path, monkeypatch):
    import shutil

    _no_ray(monkeypatch)
    one = tmp_path / "one"
    shutil.copytree(textures_dir / "brick", one / "brick")
    with pytest.raises(ConfigError, match="at least 2 classes, found only 'brick'"):
        finetune(_cfg(one, tmp_path / "out"))


def test_labels_are_required(tmp_path):
    with pytest.raises(ValueError, match="finetune needs labels"):
        FinetuneConfig.model_validate({"source": {"uri": str(tmp_path), "labels": "none"},
                                       "output": {"uri": str(tmp_path / "o")},
                                       "backbone": {"model": "resnet18"}})


# -- the model: freezing and parameter groups (no Ray) ---------------------------------------------------


def test_freeze_until_covers_the_stem_and_the_named_layer(tmp_path):
    tm = ft.build_training_model(_cfg(tmp_path, tmp_path / "o", freeze_until="blocks.3"), ["a", "b", "c"])
    grads = {n: p.requires_grad for n, p in tm.model.named_parameters()}
    assert all(not g for n, g in grads.items() if n.startswith(FROZEN_PREFIXES))
    assert all(g for n, g in grads.items() if not n.startswith(FROZEN_PREFIXES))
    assert tm.model.get_submodule(tm.classifier).out_features == 3
    assert "blocks.3.2.bn3.running_mean" in tm.frozen_keys and "blocks.4.0.bn1.weight" not in tm.frozen_keys
    # frozen BatchNorm statistics stay in eval mode while the rest trains
    bn = tm.model.get_submodule("blocks.3.0.bn1")
    assert bn in tm.stat_modules and tm.model.get_submodule("blocks.4.0.bn1") not in tm.stat_modules

    head_only = ft.build_training_model(_cfg(tmp_path, tmp_path / "o", freeze_until="final"), ["a", "b"])
    assert [n for n, p in head_only.model.named_parameters() if p.requires_grad] == \
        ["classifier.weight", "classifier.bias"]


def test_lr_decay_per_stage(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "o", freeze_until="none", lr_decay=0.5, lr=1e-3)
    tm = ft.build_training_model(cfg, ["a", "b"])
    opt = ft.make_optimizer(tm, cfg.backbone.model, cfg.train)
    lr_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lr_of[p] = g["lr"]
        assert g["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in g["params"]) else 0.05)
    named = dict(tm.model.named_parameters())
    assert lr_of[named["classifier.weight"]] == pytest.approx(1e-3)
    assert lr_of[named["blocks.6.0.conv_pw.weight"]] == pytest.approx(5e-4)  # blocks.6 (+ conv_head)
    assert lr_of[named["conv_head.weight"]] == pytest.approx(5e-4)
    assert lr_of[named["blocks.5.0.conv_pw.weight"]] == pytest.approx(2.5e-4)
    assert lr_of[named["conv_stem.weight"]] == pytest.approx(1e-3 * 0.5 ** 8)  # stem, 8 stages down
    assert len(lr_of) == len(named)  # nothing frozen: every parameter is optimized


def test_split_is_deterministic_and_matches_heads():
    from pipeline.split import split_ids

    ids = [f"{c}/{i:03d}.jpg" for c in ("a", "b", "c") for i in range(30)] + ["lonely/0.jpg"]
    labels = [i.split("/")[0] for i in ids]
    s = ft.make_split(ids, labels, 0.2)
    assert s.classes == ["a", "b", "c", "lonely"]
    np.testing.assert_array_equal(s.is_val(ids), split_ids(ids, labels, 0.2))
    assert s.per_class["lonely"] == {"train": 1, "validation": 0}
    t = pa.table({"id": ids + ["x.jpg"], "label": labels + [None], "bytes": [b"x"] * 92,
                  "error_kind": [None] * 91 + ["missing"]})
    train = ft.select_rows(t, which="train", split=s)
    val = ft.select_rows(t, which="val", split=s)
    assert train.num_rows == s.train_rows and val.num_rows == s.val_rows
    assert set(train.column("id").to_pylist()).isdisjoint(val.column("id").to_pylist())


def test_training_batches_decode_like_extract_and_keep_the_bad_images_as_error_rows(textures_dir):
    """TrainBatches uses the Embedder's Preprocessor: unreadable and undecodable images leave the batch,
    are counted, and are kept with their kind for errors/ (the same kinds `extract` writes)."""
    from pipeline.backbone import create_model, preprocessing_for

    model, _, _ = create_model("tf_efficientnet_lite0", "none")
    transform, _ = preprocessing_for(model, "tf_efficientnet_lite0", "none")
    tb = ft.TrainBatches(transform, ["brick", "grass"], (3, 224, 224), threads=1)
    good = (textures_dir / "brick" / "000.jpg").read_bytes()
    batch = pa.table({"id": ["a", "b", "c", "d"], "source": ["s/a", "s/b", "s/c", "s/d"],
                      "label": ["brick", "grass", "brick", "brick"],
                      "bytes": [good, b"not an image", None, good],
                      "error_kind": [None, None, "missing", None],
                      "error_message": [None, None, "gone", None]})
    out = tb(batch)
    assert tuple(out["x"].shape) == (2, 3, 224, 224) and out["y"].tolist() == [0, 0]
    assert int(out["failed"]) == 2
    assert tb.errors == {"b": ("s/b", "not_an_image", tb.errors["b"][2]), "c": ("s/c", "missing", "gone")}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_labels_of_shard_formats_come_from_one_ray_data_pass(ray_session, textures_dir, tmp_path, fmt):
    from pipeline import samples
    from pipeline.config import SourceConfig
    from pipeline.sources import list_shards

    if fmt == "webdataset":
        samples.pack_webdataset(textures_dir, tmp_path / "src", per_shard=10)
    else:
        samples.pack_parquet(textures_dir, tmp_path / "src" / "images.parquet", rows_per_group=10)
    source = SourceConfig(uri=str(tmp_path / "src"), labels="folder")
    shards, _ = list_shards(source)
    ids, labels = collect_labels(shards, source, _cfg(textures_dir, tmp_path).runtime)
    assert len(ids) == len(set(ids)) == 24
    assert sorted(labels) == sorted(["brick", "grass", "gravel"] * 8)
    split = ft.make_split(ids, labels, 0.2)
    assert split.train_rows + split.val_rows == 24 and split.classes == ["brick", "grass", "gravel"]


def test_loose_files_are_regrouped_across_class_folders(textures_dir):
    from pipeline.config import SourceConfig
    from pipeline.sources import list_shards

    shards, _ = list_shards(SourceConfig(uri=str(textures_dir), files_per_shard=6))
    assert [{r.split("/")[0] for r in s.rels} for s in shards][0] == {"brick"}  # listing order: by folder
    mixed = ft.mixed_shards(shards, 6)
    assert sorted(r for s in mixed for r in s.rels) == sorted(r for s in shards for r in s.rels)
    assert all(len({r.split("/")[0] for r in s.rels}) >= 2 for s in mixed)
    ids, labels = ft.folder_labels(shards)
    assert dict(zip(ids, labels))["grass/003.jpg"] == "grass"


# -- Ray Train runs: killed at epoch 1 of 2, then resumed with epochs=3 ------------------------------------


@pytest.fixture(scope="module")
def killed_run(ray_session, textures_dir, tmp_path_factory):
    """`jobs/finetune.py` (epochs=2) on the session's Ray, its driver SIGKILLed once the epoch-1 checkpoint is
    recorded in Ray Train's run snapshot."""
    tmp = tmp_path_factory.mktemp("ft")
    out = tmp / "out"
    data = json.loads(_cfg(textures_dir, out, epochs=2).model_dump_json())
    data["runtime"]["address"] = ray_session.get_runtime_context().gcs_address
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(data))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "finetune.py"), "--config",
                             str(tmp / "cfg.yaml")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if snapshot.is_file() and "epoch-0001" in snapshot.read_text(errors="replace"):
            break
        time.sleep(0.2)
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    assert alive, f"the job ended before it could be killed (rc {proc.returncode}): {err[-3000:]}"
    state = json.loads((out / "checkpoints" / "epoch-0001" / "state.json").read_text())
    return out, state, time.perf_counter() - t


@pytest.fixture(scope="module")
def continued(killed_run, textures_dir):
    """The killed output rerun with more epochs (3) than the killed run was given: it resumes from the
    epoch-1 checkpoint and runs epochs 2 and 3."""
    out, killed_state, _ = killed_run
    t = time.perf_counter()
    report = finetune(_cfg(textures_dir, out, epochs=3), progress=False)
    return out, killed_state, report, time.perf_counter() - t


def test_killed_driver_resumes_from_last_checkpoint_and_continues_to_more_epochs(killed_run, continued):
    out, killed_state, report, seconds = continued
    assert [h["epoch"] for h in report["epochs"]] == [0, 1, 2, 3]
    assert report["resumed_from_epoch"] == 1 and report["epochs_this_run"] == [2, 3]
    assert report["epochs"][:2] == killed_state["history"]  # metrics carried over, not recomputed
    killed = killed_state["history"][1]["run_id"]
    assert report["epochs"][0]["run_id"] == killed != report["run_id"] == report["epochs"][3]["run_id"]
    assert [r["start_epoch"] for r in report["runs"]] == [0, 1]
    saved = json.loads((out / "finetune.json").read_text())
    assert saved["epochs_done"] == 3 and saved["epochs"] == report["epochs"]
    # checkpoints: the last two are kept
    assert sorted(p.name for p in (out / "checkpoints").glob("epoch-*")) == ["epoch-0002", "epoch-0003"]
    print(f"killed run until its epoch-1 checkpoint: {killed_run[2]:.1f}s; resumed run (2 epochs): "
          f"{seconds:.1f}s")


def test_finetune_artifacts(continued):
    out, _, report, _ = continued
    e0, _, e2, e3 = report["epochs"]
    assert "train_loss" not in e0  # epoch 0: evaluation only, before any step
    assert e0["val_rows"] == e3["val_rows"] == report["split"]["validation"] == 8
    assert e2["train_rows"] == 16 and e2["steps"] == 2 and e2["seconds"] > 0
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "seconds"} <= set(e3)
    assert report["classes"] == ["brick", "grass", "gravel"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head = json.loads((out / "head" / "head.json").read_text())
    assert head["classes"] == report["classes"] and head["head"] == {
        "type": "linear", "input_dim": 1280, "num_classes": 3, "hidden": [], "dropout": 0.0}
    assert head["embedding_spec"]["layer"] == "final" and head["embedding_spec"]["dim"] == 1280
    assert list((out / "_runs").glob("*.json"))


def test_finetuning_improves_on_epoch_zero(continued):
    """Packaged weights + a new head: validation loss and accuracy after training beat the untrained head
    (epoch 0), and the training loss falls. Seen on this data: val loss 1.13 -> ~0.8, val accuracy
    0.375 -> 0.75-0.875."""
    _, _, report, _ = continued
    e = {h["epoch"]: h for h in report["epochs"]}
    assert e[3]["val_loss"] < e[0]["val_loss"] - 0.05, report["epochs"]
    assert e[3]["val_acc"] > e[0]["val_acc"], report["epochs"]
    assert e[3]["train_loss"] < e[1]["train_loss"], report["epochs"]


def test_frozen_layers_stay_bit_identical(continued):
    from safetensors.torch import load_file

    from pipeline.backbone.weights import load_packaged

    out, _, report, _ = continued
    tuned = load_file(str(out / "backbone.safetensors"))
    packaged = load_packaged("tf_efficientnet_lite0")[0]
    assert set(tuned) == set(packaged) and tuned["classifier.weight"].shape == (3, 1280)
    frozen = [k for k in packaged if k.startswith(FROZEN_PREFIXES)]
    trained = [k for k in packaged if not k.startswith(FROZEN_PREFIXES + ("classifier.",))]
    assert len(frozen) == report["frozen"]["tensors"] == 144
    assert all(torch.equal(tuned[k], packaged[k]) for k in frozen)  # BatchNorm statistics included
    changed = [k for k in trained if not torch.equal(tuned[k], packaged[k])]
    assert "blocks.6.0.conv_pwl.weight" in changed and "conv_head.weight" in changed
    assert len(changed) == len(trained), sorted(set(trained) - set(changed))[:5]


def test_finetuned_backbone_extracts_and_head_predicts(continued, textures_dir, tmp_path):
    import timm
    from PIL import Image
    from safetensors.torch import load_file

    from pipeline.config import ExtractConfig
    from pipeline.heads import HeadPredictor, predict_local
    from pipeline.output.spec import read_spec

    out, _, report, _ = continued
    weights = str(out / "backbone.safetensors")
    cfg = ExtractConfig.model_validate({
        "source": {"uri": str(textures_dir), "labels": "folder"},
        "backbone": {"model": "tf_efficientnet_lite0", "weights": weights, "layer": "final"},
        "output": {"uri": str(tmp_path / "emb")}, "runtime": {"batch_size": 8, "progress": False},
    })
    assert extract(cfg)["counts"]["embedded"] == 24
    table = pads.dataset(tmp_path / "emb" / "embeddings").to_table().sort_by("id")
    spec = read_spec(table.schema)
    sha = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    head_spec = json.loads((out / "head" / "head.json").read_text())["embedding_spec"]
    assert spec["weights"]["sha256"] == sha == head_spec["weights"]["sha256"] == report["backbone"]["sha256"]

    # `heads predict` (its spec check and per-batch predictor, without the Ray map) accepts them
    p = predict_local(str(out / "head"), str(tmp_path / "emb"), str(tmp_path / "pred"))
    pred = pads.dataset(tmp_path / "pred" / "predictions").to_table(columns=["id", "label"]).to_pydict()
    pred = dict(zip(pred["id"], pred["label"]))
    assert p["rows"] == 24 == len(pred)
    # the head on extracted embeddings == the fine-tuned model's own classifier on the images
    m = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    m.load_state_dict(load_file(weights))
    m.eval()
    t = timm.data.create_transform(**timm.data.resolve_model_data_config(m), is_training=False)
    ids = table.column("id").to_pylist()
    with torch.inference_mode():
        logits = m(torch.stack([t(Image.open(textures_dir / i).convert("RGB")) for i in ids]))
    assert [pred[i] for i in ids] == [report["classes"][j] for j in logits.argmax(1).tolist()]
    # embeddings of other weights (e.g. the packaged, not fine-tuned, backbone) are refused
    with pytest.raises(ValueError, match="weights.sha256"):
        HeadPredictor(str(out / "head")).check_spec({**spec, "weights": {"sha256": "0" * 64}})
