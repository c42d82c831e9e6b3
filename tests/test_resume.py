"""Reruns are safe: a driver killed mid-run, an actor dying mid-run, nightly increments, changed shards.

Every check ends the same way: the output holds exactly one row per input image, and no file that the
ledger does not account for is visible to readers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.commands.extract import extract
from pipeline.commands.nightly import nightly
from pipeline.config import ExtractConfig, NightlyConfig
from pipeline.embed import Embedder
from pipeline.output.ledger import Ledger
from pipeline.output.reader import read_embeddings
from pipeline.samples import make_textures
from pipeline.sources import list_shards

ROOT = Path(__file__).resolve().parents[1]


def _cfg(source, output, **backbone):
    return ExtractConfig.model_validate({
        "source": {"uri": str(source), "labels": "folder", "files_per_shard": 3},
        "backbone": {"model": "tf_efficientnet_lite0", "weights": "packaged", **backbone},
        "output": {"uri": str(output), "rows_per_file": 3},
        "runtime": {"batch_size": 3, "progress": False},
    })


def _ids(out: Path | str) -> list[str]:
    """The ids of every visible embeddings file (what a glob reader sees), local or on S3."""
    files = [f.uri for f in storage.list_files(storage.join(str(out), "embeddings"))
             if f.rel.endswith(".parquet")]
    ids = []
    for uri in files:
        fs, path = storage.get_fs(uri)
        ids += pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist()
    return ids


def _assert_accounted_for(out: Path | str) -> None:
    """Every visible Parquet file belongs to a committed shard, and nothing is left staged."""
    committed = Ledger(str(out)).committed()
    listed = {f for e in committed.values() for f in e["files"]}
    visible = {f"{sub}/{f.rel}" for sub in ("embeddings", "errors")
               if storage.exists(storage.join(str(out), sub))
               for f in storage.list_files(storage.join(str(out), sub)) if f.rel.endswith(".parquet")}
    assert visible == listed


@pytest.fixture(scope="module")
def many_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    make_textures(root, per_class=12, patch=64, seed=3)  # 36 images -> shards of at most 3
    return root


def _n_shards(source) -> int:
    return len(list_shards(_cfg(source, "unused").source)[0])


# local: slow (45 s). A kill at each step of a local commit is in test_ledger; a real SIGKILL of a local
# driver in test_finetune, and many in test_soak (slow)
@pytest.mark.parametrize("where", [pytest.param("local", marks=pytest.mark.slow), "s3"])
def test_driver_killed_mid_run_then_rerun_has_each_image_once(ray_session, many_dir, tmp_path, where,
                                                              request):
    """A real SIGKILL of the driver while shards commit (every shard is 3 images in 1 file, so commits
    follow each other closely), on the loopback S3 server, and on a local folder (slow)."""
    out = tmp_path / "out" if where == "local" else request.getfixturevalue("bucket") + "/out"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "pipeline", "extract", "--source", str(many_dir), "--output", str(out),
           "--model", "tf_efficientnet_lite0", "--labels", "folder", "--batch-size", "3",
           "--set", "source.files_per_shard=3",
           "--set", "output.rows_per_file=3", "--set", "runtime.progress=false"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards_dir = storage.join(str(out), "_ledger", "shards")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if storage.exists(shards_dir) and len(storage.list_files(shards_dir)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # Ray reaps the dead driver's workers
    n = _n_shards(many_dir)
    committed = Ledger(str(out)).committed()
    at_kill = len(committed)
    assert 2 <= at_kill < n, f"the kill should land mid-run ({at_kill} of {n} shards committed)"
    # A snapshot reader sees the committed shards, whole; a glob may also see the files of the one shard
    # whose commit the kill cut between its moves and its entry, until the next run removes them.
    listed = {f for e in committed.values() for f in e["files"]}
    visible = {f"embeddings/{f.rel}" for f in storage.list_files(storage.join(str(out), "embeddings"))
               if f.rel.endswith(".parquet")}
    assert listed <= visible and len({p.rsplit("-", 1)[0] for p in visible - listed}) <= 1, visible - listed
    snapshot = read_embeddings(str(out), columns=["id"]).column("id").to_pylist()
    assert len(snapshot) == len(set(snapshot)) == sum(e["embedded"] for e in committed.values())

    s = extract(_cfg(many_dir, out))
    assert s["ledger"]["done_before"] >= at_kill
    assert s["ledger"]["ran"] + s["ledger"]["done_before"] == n
    assert s["ledger"]["output_rows"] == {"embedded": 36, "failed": 0}
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == 36
    _assert_accounted_for(out)
    staging = storage.join(str(out), "_staging")
    assert not storage.exists(staging) or not [f for f in storage.list_files(staging, hidden=())
                                               if f.rel.endswith(".parquet")]


class CrashingEmbedder(Embedder):
    """Kills its own process on its second batch, once per test (a marker file remembers); notes, batch by
    batch, how many shards the output has committed so far."""

    marker = ""
    output = ""

    def __call__(self, batch):
        self._calls = getattr(self, "_calls", 0) + 1
        with open(self.marker + ".committed", "a") as f:
            f.write(f"{len(Ledger(self.output).committed())}\n")
        if self._calls == 2 and not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed")
            os._exit(1)
        return super().__call__(batch)


def test_an_actor_dying_mid_run_loses_and_duplicates_nothing(ray_session, many_dir, tmp_path, monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "out"
    CrashingEmbedder.marker, CrashingEmbedder.output = str(tmp_path / "crashed"), str(out)
    monkeypatch.setattr("pipeline.commands.run.Embedder", CrashingEmbedder)
    s = extract(_cfg(many_dir, out))
    assert (tmp_path / "crashed").exists(), "the actor should have crashed once"
    assert s["counts"]["embedded"] == 36 and s["ledger"]["ran"] == _n_shards(many_dir)
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == 36
    _assert_accounted_for(out)
    # Shards commit while the actors embed (write tasks are not held back until the pool is done): the
    # batches after the restart of the crashed actor see the shards written before it.
    seen = [int(n) for n in (tmp_path / "crashed.committed").read_text().split()]
    assert len(seen) >= 12 and max(seen) >= 1, seen


def test_nightly_increments_and_changed_shards(ray_session, textures_dir, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for cls in ("brick", "grass"):
        shutil.copytree(textures_dir / cls, src / cls)
    cfg = _cfg(src, out).model_copy(deep=True)
    cfg.source.files_per_shard = 4
    s1 = extract(cfg, incremental=True, run_date="2026-11-27")
    first = list_shards(cfg.source)[0]
    assert s1["ledger"]["ran"] == len(first) and s1["counts"]["embedded"] == 16

    from pipeline.heads import HeadTrainConfig, train_head

    train_head(HeadTrainConfig(embeddings=str(out), output=str(tmp_path / "head"), epochs=5), progress=False)

    # the next night: a new folder arrives and one image of an old shard is replaced; `pipeline nightly`
    # embeds what is new and applies the head to that night's rows only
    shutil.copytree(textures_dir / "gravel", src / "gravel")
    shutil.copy(textures_dir / "grass" / "005.jpg", src / "brick" / "001.jpg")
    ncfg = NightlyConfig.model_validate({**cfg.model_dump(), "head": str(tmp_path / "head"),
                                         "predictions": str(tmp_path / "pred")})
    result = nightly(ncfg, "2026-11-28")
    s2 = result["extract"]
    pred = pads.dataset(tmp_path / "pred" / "predictions" / "run_date=2026-11-28").to_table()
    before = {f.key: f.version for f in first}
    second = list_shards(cfg.source)[0]
    after = {s.key: s.version for s in second}
    new = [s for s in second if before.get(s.key) != s.version]  # the changed shard and the new ones
    stale = [f for f in first if after.get(f.key) != f.version]
    assert any("brick/001.jpg" in f.rels for f in stale) and len(stale) <= 2
    assert result["predict"]["rows"] == pred.num_rows == sum(s.count for s in new)
    assert set(pred.column("label").to_pylist()) <= {"brick", "grass"}  # the head knows two classes
    assert s2["ledger"]["ran"] == len(new) and s2["ledger"]["done_before"] == len(first) - len(stale)
    assert s2["ledger"]["removed_stale"] == len(stale)
    assert s2["ledger"]["output_rows"] == {"embedded": 24, "failed": 0}
    # the night's actors are planned for the images it embeds, not for everything the source lists
    fewer = [r for r in s2["plan"]["reasons"] if " actor, not " in r]
    assert fewer and f": {sum(s.count for s in new)} images repay 1" in fewer[0], s2["plan"]["reasons"]

    t = pads.dataset(out / "embeddings", partitioning="hive").to_table()
    ids = t.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 24
    night2 = sorted(i for i, d in zip(ids, t.column("run_date").to_pylist()) if d == "2026-11-28")
    assert night2 == sorted(r for s in new for r in s.rels)
    assert {f"gravel/{i:03d}.jpg" for i in range(8)} <= set(night2) and len(night2) <= 8 + 2 * 4
    _assert_accounted_for(out)

    s3 = extract(cfg, incremental=True, run_date="2026-11-29")  # nothing new: no Ray work
    assert s3["ledger"]["ran"] == 0 and s3["counts"]["inputs"] == 0
    assert not (out / "embeddings" / "run_date=2026-11-29").exists()


@pytest.mark.slow  # a fault-injection soak: one request in ten fails in one of three ways
def test_flaky_s3_run_completes_with_identical_output(ray_session, s3_server, bucket, textures_dir):
    """Through a proxy that answers 503 SlowDown, resets connections, and drops responses of requests it
    did forward, for one request in ten: the run completes and its output equals a clean run's."""
    from pipeline import storage
    from pipeline.demo.s3local import FaultyProxy

    s3_server.upload_dir(str(textures_dir), f"{bucket}/in")
    extract(_cfg(f"{bucket}/in/", f"{bucket}/clean"))
    proxy = FaultyProxy(s3_server.endpoint, fail_rate=0.1, seed=7).start()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["AWS_ENDPOINT_URL"] = proxy.endpoint  # this driver and its own local Ray's workers see the proxy
    cmd = [sys.executable, "-m", "pipeline", "extract", "--source", f"{bucket}/in/",
           "--output", f"{bucket}/flaky",
           "--model", "tf_efficientnet_lite0", "--labels", "folder", "--batch-size", "3",
           "--set", "source.files_per_shard=3", "--set", "output.rows_per_file=3",
           "--set", "runtime.num_cpus=2", "--set", "runtime.progress=false"]
    try:
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    faults = {k: v for k, v in proxy.counts.items() if k != "forwarded"}
    assert sum(faults.values()) >= 5 and all(faults.values()), proxy.counts

    def table(name):
        fs, path = storage.get_fs(f"{bucket}/{name}/embeddings")
        return pads.dataset(path, filesystem=fs, format="parquet").to_table().sort_by("id")

    clean, flaky = table("clean"), table("flaky")
    assert flaky.column("id").to_pylist() == clean.column("id").to_pylist()
    assert len(set(flaky.column("id").to_pylist())) == 24
    assert flaky.column("label").to_pylist() == clean.column("label").to_pylist()
    a = np.stack(clean.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(flaky.column("embedding").to_numpy(zero_copy_only=False))
    assert np.allclose(a, b, atol=1e-4)


def test_nightly_dated_prefixes_accumulate_into_one_output(ray_session, textures_dir, tmp_path):
    """Two nights, each under its own dated prefix of one root, into one output: every image once, ids
    relative to the root, one run_date partition per night; the second night through `pipeline nightly`
    with a {run_date} source, which leaves the first night alone; a run over the whole root then finds
    nothing to do."""
    root, out = tmp_path / "photos", tmp_path / "out"
    nights = {"2026-11-29": "grass", "2026-11-30": "gravel"}
    for day, cls in nights.items():
        shutil.copytree(textures_dir / cls, root / day / cls)

    def cfg(uri):
        c = _cfg(uri, out).model_copy(deep=True)
        c.source.root = str(root)
        return c

    s1 = extract(cfg(root / "2026-11-29"), incremental=True, run_date="2026-11-29")
    assert s1["counts"]["embedded"] == 8 and s1["ledger"]["scope"] == "2026-11-29/"
    again = extract(cfg(root / "2026-11-29"), incremental=True, run_date="2026-11-29")
    assert again["counts"]["inputs"] == 0
    ncfg = NightlyConfig.model_validate({**cfg(f"{root}/{{run_date}}/").model_dump()})
    s2 = nightly(ncfg, "2026-11-30")["extract"]
    assert s2["counts"]["embedded"] == 8 and s2["source"].rstrip("/") == str(root / "2026-11-30")
    assert s2["ledger"]["done_before"] == 0 and s2["ledger"]["removed_stale"] == 0
    assert s2["ledger"]["scope"] == "2026-11-30/"

    t = pads.dataset(out / "embeddings", partitioning="hive").to_table()
    ids = t.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 16
    by_day = {}
    for i, d in zip(ids, t.column("run_date").to_pylist(), strict=True):
        by_day.setdefault(str(d), set()).add(i)
    assert by_day == {day: {f"{day}/{cls}/{k:03d}.jpg" for k in range(8)} for day, cls in nights.items()}
    _assert_accounted_for(out)
    whole = extract(cfg(root))  # the root itself: the same shards, all done
    assert whole["ledger"]["ran"] == 0 and whole["ledger"]["done_before"] == whole["ledger"]["listed"]


def test_a_manifest_runs_like_a_listing_and_another_source_is_refused(ray_session, textures_dir, many_dir,
                                                                      tmp_path):
    from pipeline.config import ConfigError

    out = tmp_path / "out"
    files = sorted(p for p in textures_dir.rglob("*.jpg"))
    missing = [textures_dir / "brick" / f"gone{i}.jpg" for i in range(3)]
    manifest = tmp_path / "list.csv"
    manifest.write_text("uri\n" + "".join(f"{p}\n" for p in sorted([*files, *missing])))
    cfg = _cfg(manifest, out).model_copy(deep=True)
    cfg.source.root = str(textures_dir)
    s = extract(cfg)
    assert s["counts"] == {"inputs": 27, "embedded": 24, "failed": 3, "skipped": 0}
    assert s["error_kinds"] == {"missing": 3}
    ids = _ids(out)
    assert sorted(ids) == sorted(str(p.relative_to(textures_dir)) for p in files)
    assert extract(cfg)["ledger"]["ran"] == 0
    cfg.source.uri = str(textures_dir / "{run_date}.csv")
    with pytest.raises(ConfigError, match="--incremental"):
        extract(cfg)
    # another source into the same output: refused, naming --overwrite, which replaces every row
    with pytest.raises(ConfigError, match=r"source: .* -> .*--overwrite"):
        extract(_cfg(many_dir, out))
    s = extract(_cfg(many_dir, out), overwrite=True)
    assert s["ledger"]["done_before"] == 0 and sorted(_ids(out)) == sorted(
        str(p.relative_to(many_dir)) for p in many_dir.rglob("*.jpg"))
    _assert_accounted_for(out)
