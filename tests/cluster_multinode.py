"""A head and two worker nodes on this machine: both workers embed, then one dies mid-run.

Run by tests/test_cluster.py in its own process, so that this cluster never touches the Ray that
conftest.py starts for the other tests. Prints one JSON line (prefixed ``RESULT ``) with what the
test asserts on:

    python tests/cluster_multinode.py WORKDIR

1. Spread: the head advertises no CPUs (as cluster.yaml's head does), each worker 2 CPUs and one
   custom resource ``embed``, and each Embedder actor asks for ``embed: 1`` (runtime.actor_resources):
   the two actors can only run one per worker node. The actors' nodes
   (state API) and the batches each node ran are reported.
2. Node loss: a second extract; once some shards are committed, one worker node is killed (no drain, like
   a reclaimed spot instance). The run either completes, or fails and the same extract run again
   completes; either way the output must hold exactly one row per image, and running the same extract
   once more must find every shard committed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

PER_CLASS = 8            # 3 classes -> 24 images
FILES_PER_SHARD = 2      # -> at least 12 shards (read tasks), one ledger entry each
WORKER_CPUS = 2
ACTOR_CPUS = 1           # the other CPU of each worker reads and writes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(images: Path, out: Path, actors: str):
    from pipeline.config import ExtractConfig

    return ExtractConfig.model_validate({
        "source": {"uri": str(images), "labels": "folder", "files_per_shard": FILES_PER_SHARD},
        "backbone": {"model": "tf_efficientnet_lite0", "weights": "packaged"},
        "output": {"uri": str(out), "rows_per_file": FILES_PER_SHARD},
        "runtime": {"batch_size": FILES_PER_SHARD, "actors": actors, "cpus_per_actor": ACTOR_CPUS,
                    "actor_resources": {"embed": 1}, "calls_per_actor": 1, "progress": False},
    })


def _embedder_actors(alive_only: bool = False) -> dict[str, str]:
    """Embedder actor id -> node id, for the pool actors this cluster has had (or has now)."""
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id
            for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False)
            if "MapBatches(Embedder)" in (a.class_name or "") and (a.state == "ALIVE" or not alive_only)}


def _batches_per_node(actors: dict[str, str], expect_nodes: set[str], wait_s: float = 20.0) -> dict[str, int]:
    """node id -> batches (finished `submit` calls) that these Embedder actors ran there.

    Task events reach Ray's state API asynchronously (about once a second per worker), so the count is read
    again for up to ``wait_s`` until every expected node shows up."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + wait_s
    while True:
        tasks = list_tasks(filters=[("type", "=", "ACTOR_TASK")], detail=True, limit=10_000,
                           raise_on_missing_output=False)
        counts = dict(Counter(t.node_id for t in tasks
                              if t.actor_id in actors and (t.func_or_class_name or "").endswith(".submit")
                              and t.state == "FINISHED" and t.node_id))
        if expect_nodes <= set(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(1.0)


def _rows(out: Path) -> list[str]:
    import pyarrow.dataset as pads

    table = pads.dataset(out / "embeddings", format="parquet").to_table(columns=["id"])
    return table.column("id").to_pylist()


def main(workdir: str) -> int:
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = os.urandom(32).hex()
    os.environ.pop("RAY_ADDRESS", None)

    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext

    from pipeline.commands.extract import extract
    from pipeline.samples import make_textures

    work = Path(workdir)
    images = work / "images"
    make_textures(images, per_class=PER_CLASS, patch=64, seed=11)
    n_images = len(list(images.rglob("*.jpg")))
    # Unix socket paths under the temp dir must stay short (~107 characters).
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    from pipeline.sources import list_shards

    shards = len(list_shards(_config(images, work / "unused", "1").source)[0])
    result: dict = {"images": n_images, "shards": shards}
    t0 = time.perf_counter()
    node_args = {"temp_dir": temp_dir, "object_store_memory": 100 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node_args, "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": _free_port()})
    workers = [cluster.add_node(**node_args, num_cpus=WORKER_CPUS, resources={"embed": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    result["cluster_start_s"] = round(time.perf_counter() - t0, 1)
    worker_ids = [w.node_id for w in workers]
    result["worker_node_ids"] = worker_ids
    result["head_node_id"] = cluster.head_node.node_id
    try:
        # 1. both workers embed. Both actors are started before the first batch is handed out: otherwise
        # the actor whose model loads first can take all 12 small batches before the other is ready.
        ctx = DataContext.get_current()
        ctx.wait_for_min_actors_s = 120
        summary = extract(_config(images, work / "spread", "2"))
        ctx.wait_for_min_actors_s = -1  # Ray's default again, for the node-loss run
        actors = _embedder_actors()
        result["spread"] = {
            "embedded": summary["counts"]["embedded"], "run_s": summary["timings"]["run_s"],
            "rows": len(_rows(work / "spread")), "unique_ids": len(set(_rows(work / "spread"))),
            "actor_nodes": dict(Counter(actors.values())),
            "batches_per_node": _batches_per_node(actors, expect_nodes=set(worker_ids)),
            "timings": summary["timings"],
        }

        # 2. a worker node dies mid-run: the node of a busy Embedder actor
        out = work / "node-loss"
        cfg = _config(images, out, "1,2")
        outcome: dict = {}

        def run() -> None:
            try:
                s = extract(cfg)
                outcome["summary"] = {"embedded": s["counts"]["embedded"], "run_s": s["timings"]["run_s"]}
            except Exception as e:  # noqa: BLE001 - reported: a failed run is then rerun
                outcome["error"] = f"{type(e).__name__}: {str(e)[:300]}"

        t_b = time.perf_counter()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        shards = out / "_ledger" / "shards"
        while thread.is_alive() and not (shards.exists() and len(list(shards.glob("*.json"))) >= 2):
            time.sleep(0.05)
        committed_at_kill = len(list(shards.glob("*.json"))) if shards.exists() else 0
        alive = {a: n for a, n in _embedder_actors(alive_only=True).items() if a not in actors}
        victim = next((w for w in workers if w.node_id in alive.values()), workers[1])
        cluster.remove_node(victim, allow_graceful=False)
        t_kill = time.perf_counter()
        thread.join(timeout=240)
        loss = {"committed_shards_at_kill": committed_at_kill, "kill_after_s": round(t_kill - t_b, 1),
                "killed_node_id": victim.node_id, "actors_alive_at_kill": Counter(alive.values()),
                "first_run": ("hung" if thread.is_alive() else
                              "failed" if "error" in outcome else "completed"),
                "first_run_error": outcome.get("error"),
                "first_run_done_after_kill_s": round(time.perf_counter() - t_kill, 1)}
        if not thread.is_alive():
            # The same extract again: after a failed run it finishes the job; after a completed one it
            # must find every shard committed and run nothing.
            t_r = time.perf_counter()
            s = extract(cfg)
            loss["rerun"] = {"embedded": s["counts"]["embedded"], "shards_ran": s["ledger"]["ran"],
                             "shards_done_before": s["ledger"]["done_before"],
                             "recovered": s["ledger"]["recovered"],
                             "output_rows": s["ledger"]["output_rows"]["embedded"],
                             "total_s": round(time.perf_counter() - t_r, 1)}
        ids = _rows(out) if (out / "embeddings").exists() else []
        loss["rows"] = len(ids)
        loss["unique_ids"] = len(set(ids))
        loss["recovered_after_kill_s"] = round(time.perf_counter() - t_kill, 1)
        result["node_loss"] = loss
    finally:
        result["total_s"] = round(time.perf_counter() - t0, 1)
        print("RESULT " + json.dumps(result), flush=True)
        ray.shutdown()
        cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)  # kept after a failure: the nodes' logs are in it
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
