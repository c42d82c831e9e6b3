"""`pipeline compare`: the classifier as is, features + heads and fine-tuning on one split, with costs."""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pytest

from pipeline.commands import compare_rules as rules
from pipeline.config import ConfigError

MODEL = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def imagenet_names():
    from pipeline.embed import imagenet_class_names

    return imagenet_class_names(MODEL, 1000)


def test_user_labels_map_to_imagenet_classes_by_name_or_by_a_label_map(imagenet_names, tmp_path):
    names = imagenet_names
    targets, unmapped = rules.label_targets(["tabby", "Coffee-Mug", "cat"], names)
    assert (targets["tabby"], targets["Coffee-Mug"], unmapped) == ([281], [504], ["cat"])
    assert names[281] == "tabby, tabby cat"  # each comma-separated synonym counts

    (tmp_path / "map.yaml").write_text("cat: [tabby, tiger_cat, 285]\nmug: coffee mug\n")
    (tmp_path / "map.csv").write_text("label,class\ncat,tabby\ncat,Persian cat\nmug,504\n")
    yaml_map = rules.read_label_map(str(tmp_path / "map.yaml"))
    targets, unmapped = rules.label_targets(["cat", "mug"], names, yaml_map)
    assert (targets, unmapped) == ({"cat": [281, 282, 285], "mug": [504]}, [])
    targets, _ = rules.label_targets(["cat", "mug"], names, rules.read_label_map(str(tmp_path / "map.csv")))
    assert targets == {"cat": [281, 283], "mug": [504]}

    with pytest.raises(ConfigError, match="'tabbby' .* not an ImageNet class name .*did you mean 'tabby'"):
        rules.label_targets(["cat"], names, {"cat": ["tabbby"]})
    with pytest.raises(ConfigError, match="class index 1000 .* outside 0..999"):
        rules.label_targets(["cat"], names, {"cat": [1000]})
    (tmp_path / "bad.yaml").write_text("- just a list\n")
    with pytest.raises(ConfigError, match="must be a mapping label -> classes"):
        rules.read_label_map(str(tmp_path / "bad.yaml"))


def test_the_classifier_arm_predicts_the_label_whose_classes_hold_the_most_probability():
    # row 0: class 3 alone is the most likely, but classes 0 and 1 together hold more: label "a"
    logits = np.array([[2.0, 2.0, -5.0, 2.5, 0.0], [0.0, 0.0, -5.0, 4.0, 0.0]], dtype=np.float32)
    pred = rules.classifier_predict(logits, {"a": [0, 1], "b": [3]}, ["a", "b"])
    assert pred.tolist() == [0, 1]
    acc, f1 = rules.accuracy_f1(np.array([0, 0]), pred, 2)
    assert (acc, round(f1, 4)) == (0.5, 0.3333)  # class a: F1 2/3; class b: no true rows, one false: F1 0


def test_the_recommendation_is_the_cheapest_arm_within_the_tolerance_of_the_best():
    from pipeline.reports import pareto_front

    arms = [{"val_accuracy": 0.95, "macro_f1": 0.95, "ms_per_image": 10.0, "train_s": 5.0},
            {"val_accuracy": 0.945, "macro_f1": 0.94, "ms_per_image": 2.0, "train_s": 50.0},
            {"val_accuracy": 0.90, "macro_f1": 0.90, "ms_per_image": 1.0, "train_s": 0.0},
            {"val_accuracy": None, "macro_f1": None, "ms_per_image": 0.5, "train_s": 0.0}]  # not applicable
    assert rules.recommend(arms, 0.01) is arms[1]
    assert rules.recommend(arms, 0.0) is arms[0]
    assert rules.recommend(arms, 0.06) is arms[2]
    assert rules.recommend(arms[3:], 0.01) is None
    assert pareto_front([(10, 0.95), (2, 0.945), (1, 0.90), (5, 0.93)]) == [2, 1, 0]


def test_a_sample_that_cannot_be_compared_is_refused_before_anything_is_written(tmp_path, cli):
    from pipeline.samples import make_imagenet_named

    src, out = tmp_path / "src", tmp_path / "out"
    make_imagenet_named(src, per_class=12, patch=48)
    r = cli("compare", "--source", src, "--output", out, "--model", MODEL)
    assert r.returncode == 2
    assert "too few validation images to compare: 2 of 2 classes have fewer than 10" in r.stderr
    assert "raise --val-fraction" in r.stderr
    enough = ("--val-fraction", "0.6", "--set", "min_val_per_class=1")
    r = cli("compare", "--source", src, "--output", out, "--model", MODEL, "--layers", "blocks.3,blocks.99",
            *enough)
    assert r.returncode == 2 and "unknown layer 'blocks.99' for model 'tf_efficientnet_lite0'" in r.stderr
    (tmp_path / "map.yaml").write_text("tabby: [tabbby]\n")
    r = cli("compare", "--source", src, "--output", out, "--model", MODEL,
            "--label-map", tmp_path / "map.yaml", *enough)
    assert r.returncode == 2 and "did you mean 'tabby'" in r.stderr, r.stderr
    r = cli("compare", "--source", src / "tabby", "--output", out, "--model", MODEL)  # files, no folders
    assert r.returncode == 2 and "have no labels: compare needs labelled images" in r.stderr, r.stderr
    shutil.rmtree(src / "coffee_mug")
    r = cli("compare", "--source", src, "--output", out, "--model", MODEL)
    assert r.returncode == 2 and "only one class ('tabby')" in r.stderr, r.stderr
    r = cli("compare", "--source", src, "--output", out, "--model", MODEL, "--labels", "none")
    assert r.returncode == 2 and "compare needs labels" in r.stderr, r.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def compared(ray_session, tmp_path_factory):
    """One compare over 40 crops of the bundled cat and coffee photos, in folders named by their ImageNet
    classes (tabby, coffee_mug), at --val-fraction 0.5: 16 validation images (7 and 9), hence
    min_val_per_class 5; heads stop after 20 epochs."""
    from pipeline.commands.compare import compare
    from pipeline.config.compare import CompareConfig
    from pipeline.samples import make_imagenet_named

    root = tmp_path_factory.mktemp("compare")
    src, out = root / "src", root / "out"
    make_imagenet_named(src, per_class=20, patch=96)
    cfg = CompareConfig.model_validate({
        "source": {"uri": str(src)}, "output": {"uri": str(out)}, "backbone": {"model": MODEL},
        "runtime": {"progress": False, "batch_size": 16}, "layers": "blocks.3", "val_fraction": 0.5,
        "min_val_per_class": 5, "head_epochs": 20, "epochs": 1})
    return cfg, compare(cfg, progress=False)


def test_compare_measures_the_three_applications_on_one_split(compared):
    cfg, report = compared
    arms = report["arms"]
    assert {a["application"] for a in arms} == {"classifier", "features", "finetune"}
    features = [a for a in arms if a["application"] == "features"]
    assert sorted((a["layer"], a["head"]) for a in features) == sorted(
        (layer, head) for layer in ("blocks.3", "final", "logits") for head in ("linear", "mlp"))
    assert all(a["bytes_per_image"] == 4 * a["dim"] for a in features)

    (classifier,) = [a for a in arms if a["application"] == "classifier"]
    assert classifier["label_map"] == {"coffee_mug": ["coffee mug"], "tabby": ["tabby, tabby cat"]}
    assert classifier["val_accuracy"] > 0.5, classifier  # above chance for 2 classes, with no training
    assert classifier["train_s"] == 0

    finetuned = [a for a in arms if a["application"] == "finetune"]
    best_cut = max((a for a in features), key=lambda a: (a["val_accuracy"], -a["ms_per_image"]))["layer"]
    assert {a["freeze_until"] for a in finetuned} == {
        "final" if best_cut in ("final", "logits") else best_cut, "none"}
    assert all(a["epochs"] == 1 and a["train_s"] > 0 for a in finetuned)

    # one split: every arm evaluated the same validation images, with the same per-class counts
    split = report["split"]
    assert (split["validation"], split["train"]) == (16, 24)
    for a in arms:
        assert a["split"]["validation_ids"] == split["validation_ids"], a
        assert a["split"]["per_class"] == split["per_class"], a

    # the rule: within the tolerance of the most accurate arm, the cheapest per image
    top = max(a["val_accuracy"] for a in arms)
    near = [a for a in arms if a["val_accuracy"] >= top - cfg.tolerance]
    rec = report["recommended"]
    assert rec in near and rec["ms_per_image"] == min(a["ms_per_image"] for a in near)
    assert report["commands"] and all(c.startswith("pipeline ") for c in report["commands"])

    out = cfg.output.uri
    saved = json.loads(open(f"{out}/compare.json").read())
    assert saved["recommended"] == rec and len(saved["arms"]) == len(arms) == 6 + 1 + 2
    assert open(f"{out}/compare.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = rules.format_compare(report)
    assert "recommended:" in table and all(c in table for c in report["commands"])


def test_the_printed_commands_run_as_printed(compared, cli):
    _, report = compared
    for command in report["commands"]:
        r = cli(*shlex.split(command)[1:])
        assert r.returncode == 0, (command, r.stderr)


def test_a_rerun_reuses_the_feature_pass(compared):
    from pipeline.commands import compare as cmp
    from pipeline.sources import list_shards

    cfg, _ = compared
    marker = f"{cfg.output.uri}/features/{MODEL}/{cmp.EXTRACTED}"
    before = open(marker).read()
    shards, _ = list_shards(cfg.source)
    images = json.loads(before)["images"]
    assert cmp.feature_pass(cfg, MODEL, shards, images, progress=False) == json.loads(before)
    assert open(marker).read() == before
