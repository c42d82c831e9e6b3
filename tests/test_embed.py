"""The Embedder and Classifier stages called directly, without Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline import samples
from pipeline.embed import Embedder, EmbedderSpec
from pipeline.sources import rows_from_bytes


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    return {n: _jpeg(samples.photo(n)) for n in ("chelsea", "coffee")}


def test_good_and_bad_rows_in_one_batch(photos):
    e = Embedder(EmbedderSpec.of({"model": "tf_efficientnet_lite0", "weights": "packaged"}), threads=2)
    out = e(rows_from_bytes([photos["chelsea"], b"", b"not an image", None, photos["coffee"]],
                   kinds=[None, None, None, "read_error", None]))
    assert out.num_rows == 5
    assert out.column("error_kind").to_pylist() == [None, "empty", "not_an_image", "read_error", None]
    emb = out.column("embedding")
    assert emb.null_count == 3 and emb.type.list_size == 1280
    a, b = np.asarray(emb[0].as_py()), np.asarray(emb[4].as_py())
    assert np.isfinite(a).all() and not np.allclose(a, b)
    decode, forward = (np.asarray(out.column(c).to_pylist()) for c in ("decode_s", "forward_s"))
    assert (decode > 0).all() and (forward > 0).all()  # each row carries its share of the batch's time
    assert np.allclose(decode, decode[0]) and out.column("gpu_util").null_count == 5  # no GPU here


def test_concurrent_calls_give_the_same_rows_and_their_own_timings(photos):
    """runtime.calls_per_actor > 1: Ray calls one Embedder from several threads at once."""
    import threading

    e = Embedder(EmbedderSpec.of({"model": "tf_efficientnet_lite0", "weights": "packaged"}), threads=1)
    batches = [rows_from_bytes([photos["chelsea"]] * 3), rows_from_bytes([photos["coffee"], b""]),
               rows_from_bytes([photos["coffee"]] * 4), rows_from_bytes([b"junk"])]
    alone = [e(b) for b in batches]
    together: list = [None] * len(batches)
    start = threading.Barrier(len(batches))

    def run(i):
        start.wait()
        together[i] = e(batches[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert a.column("error_kind").to_pylist() == b.column("error_kind").to_pylist()
        for x, y in zip(a.column("embedding").to_pylist(), b.column("embedding").to_pylist()):
            assert (x is None) == (y is None) and (x is None or np.allclose(x, y, atol=1e-5))
    # a batch with no decodable image spent no time in the model, whatever the other threads did
    assert together[3].column("forward_s").to_pylist() == [0.0]
    assert together[2].column("forward_s").to_pylist()[0] > 0


def test_one_pass_multi_layer_equals_separate_runs(photos):
    cfg = {"model": "tf_efficientnet_lite0", "weights": "packaged", "pool": "avg"}
    multi = Embedder(EmbedderSpec.of(cfg, layers=["blocks.2", "blocks.4", "final"]))(
        rows_from_bytes([photos["chelsea"]]))
    assert [multi.schema.field(f"embedding_{i}").type.list_size for i in range(3)] == [40, 112, 1280]
    for i, layer in enumerate(["blocks.2", "blocks.4", "final"]):
        single = Embedder(EmbedderSpec.of({**cfg, "layer": layer}))(rows_from_bytes([photos["chelsea"]]))
        np.testing.assert_allclose(multi.column(f"embedding_{i}")[0].as_py(),
                                   single.column("embedding")[0].as_py(), rtol=1e-5, atol=1e-6)


def test_classifier_names_the_cat_and_the_coffee(photos):
    c = Embedder(EmbedderSpec.of({"model": "tf_efficientnet_lite0", "weights": "packaged"}, task="classify",
                                 top_k=5))
    out = c(rows_from_bytes([photos["chelsea"], photos["coffee"], b""]))
    classes = out.column("classes").to_pylist()
    assert 281 <= classes[0][0] <= 285  # a domestic cat class top-1
    assert {967, 968} & set(classes[1])  # espresso or cup in the top-5
    scores = out.column("scores").to_pylist()
    assert scores[0] == sorted(scores[0], reverse=True) and 0 < sum(scores[0]) <= 1.0001
    assert "cat" in out.column("labels").to_pylist()[0][0]
    assert out.column("classes")[2].as_py() is None and out.column("error_kind")[2].as_py() == "empty"


def test_jpeg_draft_decodes_large_photos_at_a_reduced_scale_with_nearly_equal_embeddings():
    from PIL import Image

    big = [_jpeg(samples.photo(n).resize((1600, 1200), Image.BICUBIC)) for n in ("chelsea", "coffee")]
    full = Embedder(EmbedderSpec.of({"model": "tf_efficientnet_lite0", "weights": "packaged"}), threads=1)
    draft = Embedder(EmbedderSpec.of({"model": "tf_efficientnet_lite0", "weights": "packaged"},
                                     {"jpeg_draft": True}), threads=1)
    assert draft.draft_size == (256, 256)  # 224 / crop_pct 0.875: the eval transform's resize
    a, b = (np.stack(e(rows_from_bytes(big)).column("embedding").to_numpy(zero_copy_only=False))
            for e in (full, draft))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.99 and not np.array_equal(a, b)


def test_compiled_model_pads_short_batches_and_gives_the_eager_rows(photos, monkeypatch):
    """runtime.compile: one graph for the run; the last, shorter batch is padded to the compiled size.
    torch.compile's "eager" backend traces the same graph without generating code (inductor takes about a
    minute per model on this CPU)."""
    cfg = {"model": "tf_efficientnet_lite0", "weights": "packaged"}
    plain = Embedder(EmbedderSpec.of(cfg), threads=1)
    compiled = Embedder(EmbedderSpec.of(cfg, {"compile": True}), threads=1, compile_backend="eager")
    shapes = []
    real = compiled.backbone.model.forward_features
    monkeypatch.setattr(compiled.backbone.model, "forward_features",
                        lambda x: shapes.append(x.shape[0]) or real(x))
    full = rows_from_bytes([photos["chelsea"], photos["coffee"], photos["chelsea"], photos["coffee"]])
    short = rows_from_bytes([photos["coffee"], b""])
    for batch in (full, short):
        a, b = plain(batch), compiled(batch)
        assert a.column("error_kind").to_pylist() == b.column("error_kind").to_pylist()
        ea = np.stack(a.column("embedding").drop_null().to_pylist())
        eb = np.stack(b.column("embedding").drop_null().to_pylist())
        np.testing.assert_allclose(ea, eb, atol=1e-4)
    assert shapes == [4, 4]  # the 1-image batch went through the graph padded to 4
    assert hasattr(real, "_torchdynamo_orig_callable")  # the model's forward_features is the compiled one


@pytest.mark.parametrize("compiled", [False, True])
def test_forward_batch_splits_a_batch_into_forwards_with_the_same_rows(photos, monkeypatch, compiled):
    """runtime.forward_batch (planned on CPU): a batch of 5 in forwards of 2, 2 and 1 (padded to 2 when
    compiled) gives the rows one forward of 5 gives, in order."""
    cfg = {"model": "tf_efficientnet_lite0", "weights": "packaged"}
    whole = Embedder(EmbedderSpec.of(cfg), threads=1)
    split = Embedder(EmbedderSpec.of(cfg, {"forward_batch": 2, "compile": compiled}), threads=1,
                     compile_backend="eager")
    shapes = []
    real = split.backbone.model.forward_features
    monkeypatch.setattr(split.backbone.model, "forward_features",
                        lambda x: shapes.append(x.shape[0]) or real(x))
    rows = rows_from_bytes([photos["chelsea"], photos["coffee"], b"", photos["coffee"], photos["chelsea"],
                            photos["chelsea"]])
    a, b = whole(rows), split(rows)
    assert a.column("error_kind").to_pylist() == b.column("error_kind").to_pylist()
    np.testing.assert_allclose(np.stack(a.column("embedding").drop_null().to_pylist()),
                               np.stack(b.column("embedding").drop_null().to_pylist()), atol=1e-4)
    assert shapes == ([2, 2, 2] if compiled else [2, 2, 1])


def test_compile_refuses_a_cut_it_cannot_compile_with_the_fix():
    cfg = {"model": "tf_efficientnet_lite0", "weights": "packaged", "layer": "blocks.3"}
    with pytest.raises(ValueError, match="runtime.compile=false"):
        Embedder(EmbedderSpec.of(cfg, {"compile": True}), threads=1, compile_backend="eager")
