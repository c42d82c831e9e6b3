"""A soak of the system-of-record guarantees (`pytest -m slow tests/test_soak.py`; CI skips it): real
`pipeline extract` drivers (plain and `--overwrite`) SIGKILLed at random points, second runs started while
one writes, and the source changing between runs. After every kill the committed snapshot holds each image
at most once and, once it held rows, never none (an overwrite is built beside it); at the end, after one
run to completion, every image exactly once, the visible files are the ledger's, and `pipeline verify`
finds nothing to repair.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.commands.verify import verify
from pipeline.output.reader import read_embeddings
from pipeline.samples import make_textures

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_killed_and_overlapping_runs_leave_every_image_exactly_once(ray_session, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_textures(src, per_class=16, patch=64, seed=11)
    spare = tmp_path / "spare"
    make_textures(spare, per_class=2, patch=64, seed=12)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "pipeline", "extract", "--source", str(src), "--output", str(out),
           "--model", "tf_efficientnet_lite0", "--labels", "folder", "--batch-size", "3",
           "--set", "source.files_per_shard=3", "--set", "output.rows_per_file=3",
           "--set", "runtime.progress=false"]
    rng = random.Random(7)
    refused = kills = overwrites = 0
    had_rows = False
    for i in range(14):  # and a second writer in each even round: up to 21 runs
        overwrite = i % 3 == 2
        overwrites += overwrite
        first = subprocess.Popen([*cmd, *(["--overwrite"] if overwrite else [])], env=env, cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(6, 30))
        if i % 2 == 0 and first.poll() is None:  # a second writer while the first runs
            second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            if first.poll() is None:
                assert second.returncode == 1 and "is being written by run" in second.stderr, second.stderr
                refused += 1
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            kills += 1
        first.wait()
        first.stderr.close()
        time.sleep(3)  # Ray reaps the dead driver's workers
        if (out / "_ledger" / "output.json").exists():
            ids = read_embeddings(str(out), columns=["id"]).column("id").to_pylist()
            assert len(ids) == len(set(ids)), f"round {i}: a committed image twice"
            assert ids or not had_rows, f"round {i}: the snapshot lost every row"
            had_rows = had_rows or bool(ids)
        # the source changes between runs: an image added, another removed
        cls = rng.choice(["brick", "grass", "gravel"])
        new = spare / cls / f"{i % 2:03d}.jpg"
        shutil.copy(new, src / cls / f"new-{i}.jpg")
        victims = sorted((src / cls).glob("0*.jpg"))
        victims[rng.randrange(len(victims))].unlink()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = verify(str(out))
    assert report["ok"] and report["staged_leftovers"] == 0, report
    ids = read_embeddings(str(out), columns=["id"]).column("id").to_pylist()
    expected = sorted(str(p.relative_to(src)) for p in src.rglob("*.jpg"))
    assert sorted(ids) == expected and len(ids) == len(set(ids))
    print(f"{kills} drivers killed ({overwrites} runs with --overwrite), {refused} overlapping runs "
          f"refused; {len(ids)} images, each once")
