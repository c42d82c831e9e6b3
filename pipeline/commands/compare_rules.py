"""`pipeline compare`'s rules, free of Ray and of the models: which ImageNet classes each user label stands
for (the classifier arm), its predictions from stored logits, the cost of an arm, the recommendation and the
printed table."""

from __future__ import annotations

import csv
import difflib
import io
import math
import re
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import ConfigError

LABEL_MAP_HELP = ("write a label map (YAML `label: [class names or indices]`, or CSV rows `label,class`) and "
                  "pass it with --label-map; class names are those of `pipeline classify`'s output")
MILLION = 1_000_000


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", str(text))).strip().lower()


def class_synonyms(names: list[str]) -> dict[str, list[int]]:
    """Normalized name -> class indices, from ImageNet descriptions like 'tabby, tabby cat' (each
    comma-separated synonym counts; case, '_' and '-' do not)."""
    out: dict[str, list[int]] = {}
    for i, desc in enumerate(names):
        for syn in {_norm(s) for s in str(desc).split(",") if s.strip()}:
            out.setdefault(syn, []).append(i)
    return out


def read_label_map(uri: str) -> dict[str, list[str | int]]:
    """A label map file: YAML (``label: [name or index, ...]`` or ``label: name``) or CSV (``label,class``
    rows, one class per row, an optional header ``label,class``)."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the label map '{uri}' ({e}): {LABEL_MAP_HELP}") from e
    out: dict[str, list[str | int]] = {}
    if uri.lower().endswith(".csv"):
        for row in csv.reader(io.StringIO(text)):
            if not row or not "".join(row).strip() or row[0].strip().lower() == "label":
                continue
            if len(row) < 2:
                raise ConfigError(f"label map '{uri}': row {row} needs two columns, label,class")
            value: str | int = int(row[1]) if row[1].strip().isdigit() else row[1].strip()
            out.setdefault(row[0].strip(), []).append(value)
        return out
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"label map '{uri}' is not valid YAML ({e}): {LABEL_MAP_HELP}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"label map '{uri}' must be a mapping label -> classes: {LABEL_MAP_HELP}")
    for label, classes in data.items():
        out[str(label)] = list(classes) if isinstance(classes, (list, tuple)) else [classes]
    return out


def label_targets(labels: list[str], names: list[str], label_map: dict[str, list[str | int]] | None = None
                  ) -> tuple[dict[str, list[int]], list[str]]:
    """Each user label's ImageNet class indices: from the label map where it names the label, else the
    classes whose name (or a synonym) is the label. Returns (targets, labels that map to nothing)."""
    synonyms = class_synonyms(names)
    targets: dict[str, list[int]] = {}
    for label in labels:
        if label_map and label in label_map:
            idx: list[int] = []
            for c in label_map[label]:
                if isinstance(c, int) and not isinstance(c, bool):
                    if not 0 <= c < len(names):
                        raise ConfigError(f"label map: class index {c} for '{label}' is outside "
                                          f"0..{len(names) - 1}")
                    idx.append(c)
                    continue
                found = synonyms.get(_norm(c))
                if not found:
                    close = difflib.get_close_matches(_norm(c), list(synonyms), n=3)
                    hint = f" (did you mean {', '.join(repr(x) for x in close)}?)" if close else ""
                    raise ConfigError(f"label map: '{c}' (for '{label}') is not an ImageNet class name{hint}")
                idx.extend(found)
            targets[label] = sorted(set(idx))
        else:
            targets[label] = sorted(set(synonyms.get(_norm(label), [])))
    return targets, [label for label in labels if not targets[label]]


def classifier_predict(logits: np.ndarray, targets: dict[str, list[int]], classes: list[str]) -> np.ndarray:
    """Index into ``classes`` per row: the user label whose ImageNet classes get the most softmax mass."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    mass = np.stack([p[:, targets[c]].sum(axis=1) for c in classes], axis=1)
    return mass.argmax(axis=1)


def accuracy_f1(y: np.ndarray, pred: np.ndarray, k: int) -> tuple[float, float]:
    """Accuracy and macro-F1 (classes with no rows and no predictions left out of the mean)."""
    f1s = []
    for c in range(k):
        tp = int(((pred == c) & (y == c)).sum())
        fp, fn = int(((pred == c) & (y != c)).sum()), int(((pred != c) & (y == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float((pred == y).mean()) if len(y) else 0.0, float(np.mean(f1s)) if f1s else 0.0


def cost_fields(ms_per_image: float, bytes_per_image: int, train_s: float) -> dict[str, Any]:
    """What an arm costs: training once, then per image, and over a million images at the measured rate
    (one process on the machine that measured it)."""
    return {"train_s": round(train_s, 3), "ms_per_image": round(ms_per_image, 3),
            "bytes_per_image": int(bytes_per_image),
            "hours_per_million": round(ms_per_image * MILLION / 3.6e6, 3),
            "gb_per_million": round(bytes_per_image * MILLION / 1e9, 3)}


def recommend(arms: list[dict[str, Any]], tolerance: float) -> dict[str, Any] | None:
    """The most accurate arm; among the arms within ``tolerance`` of it, the cheapest per image (then the
    least training time, then the most accurate)."""
    scored = [a for a in arms if a.get("val_accuracy") is not None]
    if not scored:
        return None
    top = max(a["val_accuracy"] for a in scored)
    near = [a for a in scored if a["val_accuracy"] >= top - tolerance - 1e-12]
    return min(near, key=lambda a: (a["ms_per_image"], a["train_s"], -a["val_accuracy"],
                                    -(a["macro_f1"] or 0)))


def arm_name(arm: dict[str, Any]) -> str:
    if arm["application"] == "classifier":
        return f"classifier  {arm['model']}"
    if arm["application"] == "features":
        return f"features    {arm['model']} @ {arm['layer']} + {arm['head']}"
    return f"finetune    {arm['model']} frozen to {arm['freeze_until']}"


def _num(v: Any, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{width}{fmt}}"


def format_compare(report: dict[str, Any]) -> str:
    """The arms, best first, with the recommendation and the commands that run it at scale."""
    arms = sorted(report["arms"], key=lambda a: -(a["val_accuracy"] if a["val_accuracy"] is not None else -1))
    width = max(len(arm_name(a)) for a in arms)
    s = report["split"]
    lines = [f"split: {s['train']} train / {s['validation']} validation images ({s['rule']})",
             f"{'arm':<{width}}  {'val acc':>7}  {'macro-F1':>8}  {'train s':>7}  {'ms/img':>6}  "
             f"{'B/img':>6}  {'h/1M img':>8}"]
    for a in arms:
        if a["val_accuracy"] is None:
            lines.append(f"{arm_name(a):<{width}}  not applicable: {a['reason']}")
            continue
        lines.append(f"{arm_name(a):<{width}}  {_num(a['val_accuracy'], '.3f', 7)}  "
                     f"{_num(a['macro_f1'], '.3f', 8)}  {_num(a['train_s'], '.1f', 7)}  "
                     f"{_num(a['ms_per_image'], '.1f', 6)}  {a['bytes_per_image']:>6}  "
                     f"{_num(a['hours_per_million'], '.2f', 8)}")
    rec = report.get("recommended")
    if rec:
        lines.append(f"recommended: {arm_name(rec).split()[0]} ({' '.join(arm_name(rec).split()[1:])}): "
                     f"validation accuracy {rec['val_accuracy']:.3f}, {rec['ms_per_image']:.1f} ms per image "
                     f"(within {report['tolerance']:.3f} of the best, the cheapest per image)")
        lines.append("run it at scale:")
        lines.extend(f"  {c}" for c in report["commands"])
    lines.append(f"report: {report['compare_json']}, {report['compare_png']}")
    return "\n".join(lines)
