"""The PNG charts written next to results: a head's ``report.png``, fine-tuning's ``report.png``, the
probe's ``probe.png``, dedup's ``dedup.png`` and compare's ``compare.png``.

matplotlib's object-oriented API on an Agg canvas (no pyplot, no global backend switch); matplotlib is
imported when a chart is drawn.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    """A 100 dpi figure on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    """The figure, laid out tight, as PNG bytes."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def head_png(meta: dict[str, Any]) -> bytes:
    """A head's loss curves and its validation (else training) confusion matrix, from its head.json."""
    from matplotlib.ticker import MaxNLocator

    classes = meta["classes"]
    k = len(classes)
    fig = _figure(12, 5)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.1]})
    hist = meta["history"]
    epochs = np.arange(1, len(hist["train_loss"]) + 1)
    ax1.plot(epochs, hist["train_loss"], label="train")
    if any(v is not None for v in hist["val_loss"]):
        ax1.plot(epochs, [np.nan if v is None else v for v in hist["val_loss"]], label="validation")
    ax1.axvline(meta["best_epoch"], color="gray", ls="--", lw=1, label=f"best epoch {meta['best_epoch']}")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy" + (" (class-weighted)" if meta["class_weights"] else ""))
    ax1.set_title(f"{meta['head']['type']} head on {meta['embedding_spec']['model']} "
                  f"[{meta['embedding_spec']['layer']}]")
    ax1.legend()
    which = "validation" if meta["metrics"].get("validation") else "train"
    m = meta["metrics"][which]
    cm = np.array(m["confusion"])
    ax2.imshow(cm, cmap="Blues")
    ax2.set_title(f"{which} confusion (accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f})")
    if k <= 40:
        ax2.set_xticks(range(k), classes, rotation=90 if k > 6 else 0, fontsize=8 if k > 15 else 10)
        ax2.set_yticks(range(k), classes, fontsize=8 if k > 15 else 10)
    if k <= 15:
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax2.text(j, i, str(cm[i, j]), ha="center", va="center",
                         color="white" if cm[i, j] > thresh else "black", fontsize=9)
    ax2.set_xlabel("predicted")
    ax2.set_ylabel("true")
    return _png(fig)


def finetune_png(history: list[dict[str, Any]], title: str) -> bytes:
    """Fine-tuning's loss and accuracy per epoch (train and validation; epoch 0 = before training)."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11, 4.5)
    ax1, ax2 = fig.subplots(1, 2)
    for ax, key, label in ((ax1, "loss", "cross-entropy (train: augmented, label-smoothed)"),
                           (ax2, "acc", "accuracy")):
        for side, style in (("train", "-o"), ("val", "-s")):
            pts = [(h["epoch"], h[f"{side}_{key}"]) for h in history
                   if h.get(f"{side}_{key}") is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                        label="train" if side == "train" else "validation")
        ax.set_xlabel("epoch (0 = before training)")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    ax2.set_ylim(0, 1.05)
    ax1.set_title(title, fontsize=10)
    return _png(fig)


def probe_png(results: list[dict[str, Any]], best: dict[str, Any]) -> bytes:
    """The probe's head quality per (model, layer) cut, and accuracy against the forward cost to the cut."""
    labels = [f"{r['model']}\n{r['layer']} ({r['dim']})" for r in results]
    acc = [r["accuracy"] or 0 for r in results]
    f1 = [r["macro_f1"] or 0 for r in results]
    cost = [r["forward_ms_per_image"] for r in results]
    fig = _figure(max(8, 1.3 * len(results) + 4), 4.5)
    ax1, ax2 = fig.subplots(1, 2)
    xs = range(len(results))
    ax1.bar([x - 0.2 for x in xs], acc, 0.4, label="validation accuracy")
    ax1.bar([x + 0.2 for x in xs], f1, 0.4, label="macro-F1")
    bi = results.index(best)
    ax1.annotate("best", (bi, acc[bi]), ha="center", va="bottom", fontweight="bold")
    ax1.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=8)
    ax1.set_ylim(0, 1.2)
    ax1.set_title("head quality per cut")
    ax1.legend(loc="upper right", ncol=2, fontsize=8)
    ax2.scatter(cost, acc)
    for r, c, a in zip(results, cost, acc):
        ax2.annotate(r["layer"], (c, a), fontsize=8)
    ax2.set_xlabel("forward cost to the cut (ms/image, CPU)")
    ax2.set_ylabel("validation accuracy")
    ax2.set_title("accuracy vs extraction cost")
    return _png(fig)


def dedup_png(pairs: list[tuple[Any, Any, str, str, float]], summary: dict[str, Any]) -> bytes:
    """Sample near-duplicate pairs side by side (kept | removed, with their similarity) and the share of rows
    removed per threshold. ``pairs``: (kept image or None, removed image or None, kept id, removed id,
    similarity); images are PIL thumbnails, None where the source could not be read."""
    rows = max(1, len(pairs))
    fig = _figure(11, 2.2 * rows + 1)
    grid = fig.add_gridspec(rows, 3, width_ratios=[1, 1, 2.2])
    for r, (a, b, id_a, id_b, sim) in enumerate(pairs):
        for c, (img, name, role) in enumerate(((a, id_a, "kept"), (b, id_b, "removed"))):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if img is not None:
                ax.imshow(np.asarray(img))
            else:
                ax.text(0.5, 0.5, "no thumbnail\n(not an image file)", ha="center", va="center", fontsize=8)
            short = name if len(name) <= 34 else "..." + name[-31:]
            ax.set_title(f"{role}: {short}" + (f"\ncosine {sim:.3f}" if c == 1 else ""), fontsize=8)
    if not pairs:
        ax = fig.add_subplot(grid[0, :2])
        ax.axis("off")
        ax.text(0.5, 0.5, f"no near-duplicates at cosine >= {summary['threshold']}", ha="center", va="center")
    ax = fig.add_subplot(grid[:, 2])
    by = summary["by_threshold"]
    ts = [float(t) for t in by]
    frac = [100 * v["removed_fraction"] for v in by.values()]
    ax.plot(ts, frac, "-o")
    ax.axvline(summary["threshold"], color="gray", ls="--", lw=1, label=f"threshold {summary['threshold']}")
    ax.set_xlabel("cosine similarity threshold")
    ax.set_ylabel("rows removed (%)")
    ax.set_title(f"{summary['rows']} rows, {summary['clusters']} clusters: "
                 f"{summary['removed_fraction']:.1%} removed at {summary['threshold']}")
    ax.legend()
    return _png(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and accuracy (higher), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def compare_png(arms: list[dict[str, Any]], recommended: dict[str, Any] | None) -> bytes:
    """`pipeline compare`: validation accuracy against the cost per image of each arm, the Pareto front
    joined, the recommended arm ringed. Labelled: the front, the classifier and the fine-tuned arms (every
    arm is in compare.json and the printed table)."""
    scored = [a for a in arms if a.get("val_accuracy") is not None]
    pts = [(a["ms_per_image"], a["val_accuracy"]) for a in scored]
    front = pareto_front(pts)
    fig = _figure(8, 5)
    ax = fig.subplots()
    markers = {"classifier": ("*", "tab:red"), "features": ("o", "tab:blue"), "finetune": ("s", "tab:green")}
    for app, (marker, color) in markers.items():
        mine = [a for a in scored if a["application"] == app]
        ax.scatter([a["ms_per_image"] for a in mine], [a["val_accuracy"] for a in mine], marker=marker,
                   color=color, s=90 if marker == "*" else 40, label=app, zorder=3)
    for i, a in enumerate(scored):
        if a["application"] == "features" and i not in front:
            continue
        tag = {"classifier": f"classifier {a['model']}", "features": f"{a['layer']}+{a.get('head')}",
               "finetune": f"fine-tuned, frozen to {a.get('freeze_until')}"}[a["application"]]
        ax.annotate(tag, pts[i], fontsize=7, xytext=(4, -10 if a["application"] == "features" else 3),
                    textcoords="offset points")
    if front:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
    if recommended is not None and recommended.get("val_accuracy") is not None:
        ax.scatter([recommended["ms_per_image"]], [recommended["val_accuracy"]], s=320, facecolors="none",
                   edgecolors="black", linewidths=1.5, label="recommended", zorder=4)
    ax.margins(x=0.2)
    ax.set_xlabel("cost per image: forward pass to the cut (ms/image, measured here)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("three ways to reuse a pretrained model: accuracy vs cost")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)
