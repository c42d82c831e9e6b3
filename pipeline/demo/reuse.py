"""The demo's steps 5 and 6: which way to reuse the pretrained model, and where to cut it.

`pipeline compare` on the texture patches (a photo-like task) measures the three applications with their
cost; `pipeline probe` on scikit-learn's handwritten digits (a task unlike ImageNet) shows that there an
intermediate cut beats the final features. One line each says what that means for choosing a cut.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

POINT = 0.01  # "within a point": one percentage point of validation accuracy


def best_and_final(rows: list[dict[str, Any]], acc: str = "accuracy"
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The most accurate cut (the cheaper one on a tie) and the final features' row."""
    scored = [r for r in rows if r.get(acc) is not None]
    best = max(scored, key=lambda r: (r[acc], -r.get("forward_ms_per_image", r.get("ms_per_image", 0))))
    return best, next(r for r in scored if r["layer"] == "final")


def which_application(textures: Path, work: Path, model: str) -> bool:
    """`pipeline compare` on the textures; prints its table and the photo-like half of the claim. True when
    the final features are within a point of the best cut there."""
    from pipeline.commands.compare import compare
    from pipeline.commands.compare_rules import format_compare
    from pipeline.config.compare import CompareConfig

    out = work / "compare"
    cfg = CompareConfig.model_validate({
        "source": {"uri": str(textures)}, "output": {"uri": str(out)}, "backbone": {"model": model},
        "runtime": {"batch_size": 32, "progress": False}, "val_fraction": 0.5})
    print(f"[5/8] pipeline compare --source {textures} --output {out} --model {model} --val-fraction 0.5\n"
          "      (classifier as is, a linear and an MLP head on every cut, fine-tuning at two depths)")
    report = compare(cfg, progress=False)
    print(format_compare(report))
    linear = [a for a in report["arms"] if a["application"] == "features" and a["head"] == "linear"]
    best, final = best_and_final(linear, "val_accuracy")
    ok = final["val_accuracy"] >= best["val_accuracy"] - POINT
    print(f"      like ImageNet (textures): final features {final['val_accuracy']:.3f}, best cut "
          f"{best['layer']} {best['val_accuracy']:.3f}: the final features are "
          f"{'within' if ok else 'NOT within'} a point of the best; deep features suit tasks like ImageNet's")
    return ok


def which_cut(work: Path, model: str, images: int = 600) -> bool:
    """`pipeline probe` on upscaled handwritten digits; prints the unlike-ImageNet half of the claim. True
    when the best cut is an intermediate one and beats the final features by at least a point."""
    from pipeline import samples
    from pipeline.commands.probe import format_probe, probe
    from pipeline.config import ProbeConfig

    digits = work / "digits"
    samples.make_digits(digits, n=images)
    out = work / "digits-probe"
    cfg = ProbeConfig.model_validate({
        "source": {"uri": str(digits), "labels": "folder"}, "output": {"uri": str(out)},
        "runtime": {"batch_size": 32, "progress": False}, "models": [model], "layers": ["all"]})
    print(f"[6/8] {images} of scikit-learn's 8x8 handwritten digits, upscaled: a task unlike ImageNet\n"
          f"      pipeline probe --source {digits} --output {out} --model {model} --layers all")
    report = probe(cfg, progress=False)
    print(format_probe(report))
    best, final = best_and_final(report["results"])
    margin = best["accuracy"] - final["accuracy"]
    ok = best["layer"] not in ("final", "logits") and margin >= POINT
    print(f"      unlike ImageNet (digits): best cut {best['layer']} {best['accuracy']:.3f}, final features "
          f"{final['accuracy']:.3f} ({margin:+.3f}): an intermediate cut {'wins' if ok else 'does NOT win'}; "
          "for tasks unlike ImageNet, probe the cuts instead of taking the final features")
    return ok
