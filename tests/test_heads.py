"""Heads: training against scikit-learn, the split, artifacts, streaming, predict, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from pipeline.heads import (
    HeadPredictor,
    HeadTrainConfig,
    load_head,
    metrics_from_confusion,
    predict_local,
    train_head,
)
from pipeline.split import split_ids

SPEC = {"model": "tf_efficientnet_lite0", "weights": {"source": "packaged", "sha256": "ab" * 32},
        "layer": "final", "pool": "avg", "normalize": False, "preprocessing": {"mean": [0.5] * 3},
        "dtype": "float32", "versions": {"pipeline": "0.1.0"}}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster and steady on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_embeddings(root: Path, x: np.ndarray, labels, ids=None, files: int = 2, dtype: str = "float32",
                     **spec) -> list[str]:
    """OUTPUT/embeddings/part-N.parquet with the extract contract (schema + 'pipeline' metadata)."""
    n, dim = x.shape
    ids = ids if ids is not None else [f"class/{i:06d}.jpg" for i in range(n)]
    meta = {**SPEC, "dim": dim, "dtype": dtype, **spec}
    value = pa.float16() if dtype == "float16" else pa.float32()
    schema = pa.schema([
        pa.field("id", pa.string(), nullable=False), ("source", pa.string()), ("label", pa.string()),
        pa.field("embedding", pa.list_(value, dim), nullable=False),
    ]).with_metadata({b"pipeline": json.dumps(meta).encode()})
    (root / "embeddings").mkdir(parents=True, exist_ok=True)
    names = []
    for f, part in enumerate(np.array_split(np.arange(n), files)):
        table = pa.Table.from_arrays([
            pa.array([ids[i] for i in part], pa.string()),
            pa.array([f"s3://bucket/{ids[i]}" for i in part], pa.string()),
            pa.array([None if labels[i] is None else str(labels[i]) for i in part], pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(x[part].astype(dtype).ravel(), value), dim),
        ], schema=schema)
        name = f"part-{f}.parquet"
        pq.write_table(table, root / "embeddings" / name)
        names.append(name)
    return names


def _train(tmp_path: Path, name: str, x, y, ids=None, files=2, **kw) -> tuple[dict, list[str]]:
    ids = ids if ids is not None else [f"{name}/{i:06d}.jpg" for i in range(len(y))]
    write_embeddings(tmp_path / name, x, y, ids, files=files)
    cfg = {"embeddings": str(tmp_path / name), "output": str(tmp_path / f"{name}-head"), "device": "cpu",
           **kw}
    return train_head(HeadTrainConfig(**cfg), progress=False), ids


def _sklearn_on_same_split(x, y, ids, result):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    labels = np.array([str(v) for v in y])
    val = split_ids(ids, list(labels), 0.2)
    # the trainer used exactly this split
    assert {c: v["validation"] for c, v in result["split"]["per_class"].items()} == {
        c: int((labels[val] == c).sum()) for c in np.unique(labels)}
    mu, sd = x[~val].mean(0), x[~val].std(0)
    sd[sd < 1e-8] = 1.0
    model, _ = load_head(result["output"]["meta"])
    assert np.allclose(model.norm.mean.numpy(), mu, atol=1e-4)  # standardized on the train split only
    sk = LogisticRegression(max_iter=5000).fit((x[~val] - mu) / sd, labels[~val])
    sk_pred = sk.predict((x[val] - mu) / sd)
    with torch.no_grad():
        ours = np.array(result["classes"])[model(torch.tensor(x[val], dtype=torch.float32)).argmax(1).numpy()]
    ours_acc = float((ours == labels[val]).mean())
    m = result["metrics"]["validation"]
    assert m["accuracy"] == pytest.approx(ours_acc)
    assert m["macro_f1"] == pytest.approx(f1_score(labels[val], ours, average="macro"))
    return ours_acc, float((sk_pred == labels[val]).mean())


def test_linear_head_matches_sklearn_logistic_regression(tmp_path):
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=3000, n_features=64, n_informative=12, n_redundant=8, n_classes=5,
                               n_clusters_per_class=2, class_sep=1.8, flip_y=0.05, random_state=0)
    result, ids = _train(tmp_path, "synthetic", x, y)
    ours, sk = _sklearn_on_same_split(x, y, ids, result)
    print(f"make_classification: linear head {ours:.4f}, sklearn LogisticRegression {sk:.4f}")
    assert 0.65 < sk < 0.9  # not trivially separable
    assert ours >= sk - 0.01


def test_linear_head_matches_sklearn_on_digits(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    result, ids = _train(tmp_path, "digits", d.data, d.target)
    ours, sk = _sklearn_on_same_split(d.data, d.target, ids, result)
    print(f"digits: linear head {ours:.4f}, sklearn LogisticRegression {sk:.4f}")
    assert ours >= sk - 0.01
    assert result["metrics"]["validation"]["accuracy"] > 0.9


def _rings(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric rings in 2 of 8 dims (the rest noise): linearly inseparable."""
    from sklearn.datasets import make_circles

    xy, y = make_circles(n_samples=n, noise=0.08, factor=0.5, random_state=seed)
    rng = np.random.default_rng(seed)
    x = np.concatenate([xy, 0.5 * rng.standard_normal((n, 6))], axis=1)
    return x @ np.linalg.qr(rng.standard_normal((8, 8)))[0], np.where(y == 1, "inner", "outer")


def test_mlp_head_learns_what_linear_cannot(tmp_path):
    x, y = _rings(1500)
    linear, _ = _train(tmp_path, "rings", x, y)
    mlp, _ = _train(tmp_path, "rings2", x, y, head="mlp", hidden=[32, 32], dropout=0.1)
    acc_linear = linear["metrics"]["validation"]["accuracy"]
    acc_mlp = mlp["metrics"]["validation"]["accuracy"]
    print(f"rings: mlp {acc_mlp:.4f}, linear {acc_linear:.4f}")
    assert acc_linear < 0.7
    assert acc_mlp > acc_linear + 0.2
    assert mlp["head"] == {"type": "mlp", "input_dim": 8, "num_classes": 2, "hidden": [32, 32],
                           "dropout": 0.1}


def test_split_is_deterministic_stable_and_stratified():
    rng = np.random.default_rng(0)
    ids = [f"img/{i:05d}.jpg" for i in range(2000)]
    labels = [str(c) for c in rng.integers(0, 5, 2000)]
    ids += ["pair/a.jpg", "pair/b.jpg", "single/a.jpg"]
    labels += ["pair", "pair", "single"]
    val = split_ids(ids, labels, 0.2)
    assert np.array_equal(val, split_ids(ids, labels, 0.2))  # rerun
    order = rng.permutation(len(ids))
    shuffled = split_ids([ids[i] for i in order], [labels[i] for i in order], 0.2)
    assert np.array_equal(shuffled, val[order])  # row order and file layout do not matter
    lab = np.array(labels)
    for c in set(labels) - {"single"}:  # stratified: every class with >= 2 rows on both sides
        assert 0 < val[lab == c].sum() < (lab == c).sum()
    assert not val[lab == "single"].any()
    for c in "01234":
        assert abs(val[lab == c].mean() - 0.2) < 0.05
    # new rows in existing classes and a new class: no existing row changes side
    more_ids = ids + [f"new/{i:05d}.jpg" for i in range(1000)]
    more_labels = labels + [str(c) for c in rng.integers(0, 6, 1000)]
    assert np.array_equal(split_ids(more_ids, more_labels, 0.2)[: len(ids)], val)


def test_artifacts_null_labels_and_test_set(tmp_path):
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((3, 16)) * 2
    y = rng.integers(0, 3, 400)
    x = centers[y] + rng.standard_normal((400, 16))
    names = np.array(["cat", "dog", "fox"])
    labels = [None if i % 10 == 0 else names[c] for i, c in enumerate(y)]  # 40 unlabelled rows
    write_embeddings(tmp_path / "test-set", x[:100], names[y[:100]], ids=[f"t/{i}" for i in range(100)])
    result, _ = _train(tmp_path, "pets", x, labels, epochs=30, test=str(tmp_path / "test-set"))
    out = tmp_path / "pets-head"
    assert sorted(p.name for p in out.iterdir()) == ["head.json", "head.safetensors", "report.png"]
    meta = json.loads((out / "head.json").read_text())
    assert result["output"]["meta"] == str(out / "head.json")
    assert {k: v for k, v in result.items() if k != "output"} == meta
    for key in ("classes", "embedding_spec", "hyperparameters", "split", "metrics", "best_epoch", "history",
                "head", "class_weights", "streamed"):
        assert key in meta
    assert meta["classes"] == ["cat", "dog", "fox"]
    assert meta["embedding_spec"] == {k: SPEC[k] for k in ("model", "weights", "layer", "pool", "normalize",
                                                           "preprocessing")} | {"dim": 16}
    assert meta["split"]["skipped_unlabeled"] == 40
    assert meta["split"]["train"] + meta["split"]["validation"] == 360
    assert any("40 rows without a label" in w for w in meta["warnings"])
    assert meta["hyperparameters"]["epochs"] == 30 and meta["streamed"] is False
    assert len(meta["history"]["train_loss"]) == meta["epochs_run"] == len(meta["history"]["val_loss"])
    assert 1 <= meta["best_epoch"] <= meta["epochs_run"]
    val = meta["metrics"]["validation"]
    assert set(val) >= {"accuracy", "macro_f1", "per_class", "confusion", "loss"}
    assert set(val["per_class"]["dog"]) == {"precision", "recall", "f1", "support"}
    assert np.array(val["confusion"]).sum() == meta["split"]["validation"]
    assert sum(v["support"] for v in val["per_class"].values()) == meta["split"]["validation"]
    test = meta["metrics"]["test"]
    assert test["rows"] == 100 and test["accuracy"] > 0.8
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load_file

    state = load_file(out / "head.safetensors")
    assert {"norm.mean", "norm.std", "net.0.weight", "net.0.bias"} == set(state)
    assert state["net.0.weight"].shape == (3, 16) and state["norm.std"].shape == (16,)


def test_metrics_match_sklearn():
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    p[p == 3] = 2  # a class never predicted
    m = metrics_from_confusion(confusion_matrix(t, p, labels=range(4)), ["a", "b", "c", "d"])
    pr, rc, f1, sup = precision_recall_fscore_support(t, p, labels=range(4), zero_division=0)
    assert m["macro_f1"] == pytest.approx(f1_score(t, p, average="macro", zero_division=0))
    assert [m["per_class"][c]["recall"] for c in "abcd"] == pytest.approx(rc)
    assert [m["per_class"][c]["precision"] for c in "abcd"] == pytest.approx(pr)
    assert [m["per_class"][c]["support"] for c in "abcd"] == list(sup)


def test_labels_from_table(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    x = rng.standard_normal((300, 8)) + 3 * y[:, None]
    ids = [f"u/{i}.jpg" for i in range(300)]
    write_embeddings(tmp_path / "out", x, [None] * 300, ids)
    pq.write_table(pa.table({"id": ids[:250], "label": [["no", "yes"][c] for c in y[:250]]}),
                   tmp_path / "labels.parquet")
    result = train_head({"embeddings": str(tmp_path / "out" / "embeddings"), "output": str(tmp_path / "h"),
                         "labels_from": str(tmp_path / "labels.parquet"), "epochs": 20, "device": "cpu"},
                        progress=False)
    assert result["classes"] == ["no", "yes"]
    assert result["split"]["skipped_unlabeled"] == 50
    assert result["metrics"]["validation"]["accuracy"] > 0.9


def test_predict(tmp_path):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 600)
    x = rng.standard_normal((600, 12)) + 1.5 * np.eye(4, 12)[y] * 2
    result, ids = _train(tmp_path, "four", x, y, files=3, epochs=20)
    head = str(tmp_path / "four-head")
    pred = HeadPredictor(head, top_k=3)
    table = pq.read_table(tmp_path / "four" / "embeddings" / "part-0.parquet")
    out = pred(table)
    assert out.column_names == ["id", "label", "score", "top_labels", "top_scores"]
    assert out.num_rows == table.num_rows and out.column("id").equals(table.column("id"))
    assert out.schema.field("score").type == pa.float32()
    scores = np.array(out.column("top_scores").to_pylist())
    assert scores.shape == (table.num_rows, 3)
    assert ((scores >= 0) & (scores <= 1)).all() and (np.diff(scores, axis=1) <= 0).all()
    assert [t[0] for t in out.column("top_labels").to_pylist()] == out.column("label").to_pylist()
    model, meta = load_head(head)
    emb = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(emb)), 1).numpy()
    assert out.column("label").to_pylist() == [meta["classes"][i] for i in probs.argmax(1)]
    assert np.allclose(out.column("score").to_numpy(), probs.max(1), atol=1e-6)
    assert HeadPredictor(head)(table).column_names == ["id", "label", "score"]

    summary = predict_local(head, str(tmp_path / "four"), str(tmp_path / "pred"), top_k=2)
    assert summary["rows"] == 600
    assert sorted(p.name for p in (tmp_path / "pred" / "predictions").iterdir()) == \
        ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    first = pq.read_table(tmp_path / "pred" / "predictions" / "part-0.parquet")
    assert first.column("id").equals(table.column("id"))
    assert first.column("label").equals(out.column("label"))


def test_predict_refuses_other_embeddings(tmp_path):
    x = np.random.default_rng(4).standard_normal((60, 6))
    _train(tmp_path, "a", x, ["p", "q"] * 30, epochs=2)
    pred = HeadPredictor(str(tmp_path / "a-head"))
    other = {**SPEC, "layer": "blocks.3", "dim": 40}
    with pytest.raises(ValueError) as e:
        pred.check_spec(other)
    msg = str(e.value)
    assert "layer: head 'final', embeddings 'blocks.3'" in msg and "dim: head 6, embeddings 40" in msg
    assert "model" not in msg.split(":")[1]  # only the differing fields are named
    pred.check_spec({**SPEC, "dim": 6, "versions": {"torch": "other"}, "dtype": "float16"})  # same features
    write_embeddings(tmp_path / "b", np.zeros((4, 6)), ["p"] * 4,
                     weights={"source": "x", "sha256": "cd" * 32})
    with pytest.raises(ValueError, match="weights.sha256"):
        predict_local(str(tmp_path / "a-head"), str(tmp_path / "b"), str(tmp_path / "c"))
    with pytest.raises(ValueError, match="dim: head 6, embeddings 40"):
        pred(pa.table({"id": ["x"], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(
            np.zeros(40, np.float32)), 40)}))


def test_streaming_matches_in_memory(tmp_path):
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=3000, n_features=16, n_informative=8, n_classes=3, class_sep=1.5,
                               random_state=1)
    ids = [f"s/{i}" for i in range(3000)]
    write_embeddings(tmp_path / "e", x, y, ids, files=4, dtype="float16")
    base = {"embeddings": str(tmp_path / "e"), "epochs": 15, "device": "cpu"}
    mem = train_head({**base, "output": str(tmp_path / "m")}, progress=False)
    streamed = train_head({**base, "output": str(tmp_path / "s"), "max_rows_in_memory": 500}, progress=False)
    assert mem["streamed"] is False and streamed["streamed"] is True
    assert mem["split"] == streamed["split"]
    m_mem, _ = load_head(str(tmp_path / "m"))
    m_str, _ = load_head(str(tmp_path / "s"))
    assert torch.allclose(m_mem.norm.mean, m_str.norm.mean, atol=1e-4)
    assert torch.allclose(m_mem.norm.std, m_str.norm.std, atol=1e-4)
    a, b = mem["metrics"]["validation"], streamed["metrics"]["validation"]
    assert a["rows"] == b["rows"]
    assert abs(a["accuracy"] - b["accuracy"]) < 0.03 and b["accuracy"] > 0.7


_GROWTH = """
import json, sys
from pathlib import Path
from pipeline.heads import train_head

def status(key):
    text = Path("/proc/self/status").read_text()
    return int(text.split(key + ":")[1].split()[0]) * 1024

Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
base = status("VmRSS")
result = train_head(json.loads(sys.argv[1]), progress=False)
growth = status("VmHWM") - base
print(json.dumps({"growth": growth, "streamed": result["streamed"], "split": result["split"]}))
"""


def _peak_rss_growth(cfg: dict) -> tuple[int, dict]:
    """How far peak RSS rises above RSS at the start of train_head (Linux), in a fresh process each time:
    in one process, memory an earlier run freed but the allocator kept would hide a later run's growth."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _GROWTH, json.dumps(cfg)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["growth"], out


def test_streaming_memory_does_not_grow_with_rows(tmp_path):
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    rng = np.random.default_rng(5)
    growth = {}
    for n in (20_000, 200_000):
        y = rng.integers(0, 4, n)
        x = (rng.standard_normal((n, 16)) + np.eye(4, 16)[y]).astype(np.float32)
        root = tmp_path / str(n)
        write_embeddings(root, x, [str(v) for v in y], [f"r/{i:07d}" for i in range(n)], files=n // 20_000)
        del x, y
        cfg = {"embeddings": str(root), "output": str(tmp_path / f"h{n}"), "epochs": 1, "batch_size": 1024,
               "max_rows_in_memory": 5000, "device": "cpu"}
        growth[n], result = _peak_rss_growth(cfg)
        assert result["streamed"] is True and result["split"]["rows"] == n
    growth["in_memory"], result = _peak_rss_growth({**cfg, "output": str(tmp_path / "m"),
                                                    "max_rows_in_memory": 10**7})
    assert result["streamed"] is False
    print({k: f"{v / 2**20:.1f} MiB" for k, v in growth.items()})
    assert growth[200_000] < growth[20_000] + 8 * 2**20  # 10x the rows, about the same peak
    assert growth["in_memory"] > growth[200_000] + 12 * 2**20  # the measure does see a table in memory


def test_bad_inputs_name_the_fix(tmp_path):
    x = np.zeros((10, 4))
    write_embeddings(tmp_path / "nolabels", x, [None] * 10)
    with pytest.raises(ValueError) as e:
        train_head({"embeddings": str(tmp_path / "nolabels"), "output": str(tmp_path / "h")}, progress=False)
    assert "labels_from" in str(e.value) and "--labels folder" in str(e.value)
    write_embeddings(tmp_path / "one", x, ["cat"] * 10)
    with pytest.raises(ValueError, match="only one class .'cat'.*at least 2 classes"):
        train_head({"embeddings": str(tmp_path / "one"), "output": str(tmp_path / "h")}, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no embeddings found.*OUTPUT folder of `pipeline extract`"):
        train_head({"embeddings": str(tmp_path / "empty"), "output": str(tmp_path / "h")}, progress=False)
    write_embeddings(tmp_path / "mixed", x, ["a", "b"] * 5)
    write_embeddings(tmp_path / "other", np.zeros((4, 4)), ["a", "b"] * 2, layer="blocks.2")
    (tmp_path / "other" / "embeddings" / "part-1.parquet").rename(
        tmp_path / "mixed" / "embeddings" / "z.parquet")
    with pytest.raises(ValueError, match=r"different specs \(layer differ\).*part-0.parquet.*z.parquet"):
        train_head({"embeddings": str(tmp_path / "mixed"), "output": str(tmp_path / "h")}, progress=False)
    with pytest.raises(ValidationError, match="extra"):
        HeadTrainConfig(embeddings="a", output="b", epoch=3)


def test_tiny_class_is_warned_not_fatal(tmp_path, caplog):
    rng = np.random.default_rng(6)
    y = ["a"] * 40 + ["b"] * 40 + ["rare"]
    x = rng.standard_normal((81, 4))
    result, _ = _train(tmp_path, "rare", x, y, epochs=3)
    assert any("class 'rare' has only 1 labelled row" in w for w in result["warnings"])
    assert result["split"]["per_class"]["rare"] == {"train": 1, "validation": 0}
    assert "class 'rare'" in caplog.text


def test_train_and_predict_on_s3(tmp_path, bucket, s3_server):
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 200)
    x = rng.standard_normal((200, 8)) + 2 * y[:, None]
    write_embeddings(tmp_path / "out", x, [["a", "b"][c] for c in y])
    s3_server.upload_dir(str(tmp_path / "out"), f"{bucket}/run1")
    result = train_head({"embeddings": f"{bucket}/run1", "output": f"{bucket}/heads/h1", "epochs": 10,
                         "device": "cpu", "max_rows_in_memory": 100}, progress=False)  # streamed from S3
    assert result["streamed"] is True and result["output"]["meta"] == f"{bucket}/heads/h1/head.json"
    assert result["metrics"]["validation"]["accuracy"] > 0.9
    summary = predict_local(f"{bucket}/heads/h1", f"{bucket}/run1/embeddings", f"{bucket}/pred")
    assert summary["rows"] == 200
    assert summary["files"] == [f"{bucket}/pred/predictions/part-0.parquet",
                                f"{bucket}/pred/predictions/part-1.parquet"]
