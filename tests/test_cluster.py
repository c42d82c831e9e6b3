"""The cluster side: cluster.yaml and k8s/rayjob.yaml, `ray job submit` against a token-authenticated head,
jobs/train_heads.py, and a multi-node run that loses a worker node.

Every Ray started here runs in its own processes (its own temp dir and ports) and is stopped by process
group, so the Ray that conftest.py starts for the other tests is never touched.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
EXCLUDES = [".git", ".venv", "venv", "demo-output", "**/__pycache__", ".pytest_cache", ".ruff_cache",
            "*.egg-info"]


def _cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pyproject_requirements() -> dict:
    from packaging.requirements import Requirement

    return {r.name: r for r in map(Requirement, _pyproject()["dependencies"])}


def _prepared(cfg: dict) -> dict:
    """What `ray up` does to a config before launching anything: defaults, merged setup, schema check."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


# --------------------------------------------------------------------------------------------------
# cluster.yaml and k8s/rayjob.yaml, checked without a cloud


def test_cluster_yaml_passes_the_launchers_validation():
    cfg = _cluster_yaml()
    prepared = _prepared(cfg)
    types = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws"
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6")]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    assert sum(t["max_workers"] for t in types.values()) <= prepared["max_workers"]
    assert (ROOT / cfg["file_mounts"]["~/pipeline/jobs/configs"]).resolve() == ROOT / "jobs" / "configs"

    # the same validation refuses a misspelt key, so the check above can fail
    import jsonschema

    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_g5"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _prepared(bad)


def test_cluster_yaml_pins_the_versions_of_pyproject():
    from packaging.version import Version

    cfg = _cluster_yaml()
    reqs = _pyproject_requirements()
    setup = " ".join(cfg["setup_commands"])
    pins = dict(re.findall(r'"(ray|torch|torchvision)(?:\[[^\]]*\])?==([0-9][\w.]*)"', setup))
    assert set(pins) == {"ray", "torch", "torchvision"}, setup
    for name, version in pins.items():
        assert reqs[name].specifier.contains(Version(version)), (name, version, str(reqs[name].specifier))
    image_ray = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", cfg["docker"]["image"])
    assert image_ray and image_ray.group(1) == pins["ray"]
    # the project itself is installed at a pinned tag whose version is pyproject's
    version = _pyproject()["version"]
    assert re.search(rf"pipeline @ git\+https://\S+@v{re.escape(version)}\"", setup), setup


def test_cluster_yaml_head_uses_token_auth_and_a_local_dashboard():
    cfg = _cluster_yaml()
    start = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in start
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in yaml.safe_dump(cfg)
    assert "RAY_AUTH_MODE=token ray start --address=" in " ".join(cfg["worker_start_ray_commands"])
    # the token reaches the nodes as a file, never inline
    assert "RAY_AUTH_TOKEN" not in yaml.safe_dump(cfg)
    assert cfg["file_mounts"]["~/.ray"] == "~/.ray"


def test_rayjob_manifest_runs_the_extract_job():
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = job["spec"]["entrypoint"].split()
    assert argv[:4] == ["python", "jobs/extract.py", "--config", "jobs/configs/s3-gpu.yaml"]
    assert (ROOT / argv[1]).is_file() and (ROOT / argv[3]).is_file()
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == _cluster_yaml()["docker"]["image"].split(":")[1].split("-")[0]
    assert spec["authOptions"] == {"mode": "token"}
    gpu = spec["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def test_s3_gpu_config_fits_the_gpu_node_type():
    """jobs/configs/s3-gpu.yaml sizes actors for cluster.yaml's GPU nodes: one GPU each, CPUs left over for
    the read and write tasks, no more actors than GPU nodes."""
    from pipeline.config import ExtractConfig
    from pipeline.config.files import merge_sources

    cfg = merge_sources(ExtractConfig, str(ROOT / "jobs" / "configs" / "s3-gpu.yaml"))
    gpu = _cluster_yaml()["available_node_types"]["gpu_g5"]
    vcpus = {"g5.xlarge": 4, "g5.2xlarge": 8, "g5.4xlarge": 16, "g6.xlarge": 4, "g6.2xlarge": 8}
    node_cpus = vcpus[gpu["node_config"]["InstanceType"]]
    assert cfg.runtime.gpus_per_actor == 1 and cfg.runtime.device == "cuda"
    assert cfg.runtime.cpus_per_actor <= node_cpus - 1
    assert cfg.runtime.actor_range()[1] <= gpu["max_workers"]


# --------------------------------------------------------------------------------------------------
# A real head with token authentication; jobs submitted with `ray job submit`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in a job is this interpreter
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    return env


def _generate_token(home: Path) -> str:
    """`ray get-auth-token --generate`, under a throwaway HOME so that ~/.ray/auth_token stays untouched."""
    home.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, text=True, timeout=60,
                       env={**_base_env(), "HOME": str(home)})
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token) and (home / ".ray" / "auth_token").read_text() == token
    return token


class TokenHead:
    """`ray start --head --block` in its own process group, with token authentication."""

    def __init__(self, token: str, log: Path) -> None:
        self.token = token
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        # unix socket paths live under the temp dir: keep it short
        self.temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
        self.env = {**_base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        # SIGTERM stops at once (no drain): nothing runs on this head by the time it is stopped
        head_env = {**self.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        cmd = [RAY, "start", "--head", "--block", "--port", str(self.port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--dashboard-agent-listen-port", str(_free_port()),
               "--ray-client-server-port", str(_free_port()),
               "--num-cpus", "2", "--object-store-memory", str(200 * 1024 * 1024),
               "--temp-dir", self.temp_dir, "--include-dashboard", "true", "--disable-usage-stats"]
        self.log = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=head_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def status(self, path: str, token: str | None) -> int:
        req = urllib.request.Request(self.url + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def wait_ready(self, timeout: float = 90) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log.read_text()[-3000:]
                raise AssertionError(f"ray start exited {self.proc.returncode}: {log}")
            try:
                if self.status("/api/jobs/", self.token) == 200:
                    self.ready_s = time.monotonic() - t0
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the head's job API did not come up: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to `ray start --block` stops this head's processes only; then the group, to be sure."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def token_head(tmp_path):
    head = TokenHead(_generate_token(tmp_path / "home"), tmp_path / "head.log")
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


def _submit(head: TokenHead, env: dict[str, str], *entrypoint: str, submission_id: str | None = None,
            timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", head.url, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
           *(["--submission-id", submission_id] if submission_id else []), "--", *entrypoint]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_ray_job_submit_with_token_auth(token_head, tmp_path):
    """The documented way to run on a cluster: `ray job submit --working-dir . -- python jobs/extract.py`
    against a head with token authentication; without the token (or with another one) it is refused."""
    from pipeline.samples import make_textures

    images = tmp_path / "images"
    make_textures(images, per_class=3, patch=64, seed=2)
    cfg = tmp_path / "job.yaml"
    out = tmp_path / "out"
    cfg.write_text(yaml.safe_dump({
        "source": {"uri": str(images), "labels": "folder"},
        "backbone": {"model": "tf_efficientnet_lite0", "weights": "packaged"},
        "output": {"uri": str(out)},
        "runtime": {"progress": False, "batch_size": 9},
    }))

    # refused: no token at all (empty HOME, so no ~/.ray/auth_token either), and a wrong token
    no_token = {**_base_env(), "HOME": str(tmp_path / "empty-home")}
    wrong_token = {**_base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex * 2}
    assert token_head.status("/api/jobs/", None) == 401
    assert token_head.status("/api/jobs/", wrong_token["RAY_AUTH_TOKEN"]) in (401, 403)
    t0 = time.perf_counter()
    for env in (no_token, wrong_token):
        r = _submit(token_head, env, "python", "-c", "print('should never run')", timeout=60)
        assert r.returncode != 0, r.stdout
        assert re.search(r"401|403|[Uu]nauthori[sz]ed|[Aa]uthenticat", r.stdout + r.stderr), r.stderr[-2000:]

    refused_s = time.perf_counter() - t0

    # accepted: the token from the environment (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN)
    job_id = f"extract-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    r = _submit(token_head, token_head.env, "python", "jobs/extract.py", "--config", str(cfg), "--json",
                submission_id=job_id)
    submit_s = time.perf_counter() - t0
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(token_head.url, headers={"Authorization": f"Bearer {token_head.token}"})
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    assert [j.submission_id for j in client.list_jobs()] == [job_id]  # the refused ones never existed
    summary = json.loads(r.stdout[r.stdout.index("{\n"):r.stdout.rindex("\n}") + 2])
    assert summary["counts"] == {"inputs": 9, "embedded": 9, "failed": 0, "skipped": 0}
    t = pads.dataset(out / "embeddings", format="parquet").to_table()
    assert t.num_rows == 9 and len(set(t.column("id").to_pylist())) == 9
    assert sorted(set(t.column("label").to_pylist())) == ["brick", "grass", "gravel"]
    assert t.schema.field("embedding").type.list_size == 1280
    print(f"head ready in {token_head.ready_s:.1f}s; two refused submissions {refused_s:.1f}s; "
          f"ray job submit "
          f"(extract, 9 images) {submit_s:.1f}s, of which the run {summary['timings']}")

    # the head-training entry point on those embeddings (torch only: it runs as the job's driver)
    heads_cfg = tmp_path / "heads.yaml"
    heads_cfg.write_text(yaml.safe_dump({"embeddings": str(out), "output": str(tmp_path / "head"),
                                         "epochs": 20, "val_fraction": 0.34}))
    t0 = time.perf_counter()
    h = subprocess.run([sys.executable, "jobs/train_heads.py", "--config", str(heads_cfg), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=180)
    print(f"jobs/train_heads.py: {time.perf_counter() - t0:.1f}s")
    assert h.returncode == 0, h.stderr[-3000:]
    meta = json.loads(h.stdout)
    assert meta["classes"] == ["brick", "grass", "gravel"]
    assert meta["split"]["train"] + meta["split"]["validation"] == 9
    assert (tmp_path / "head" / "head.safetensors").is_file() and (tmp_path / "head" / "head.json").is_file()


def test_train_heads_job_rejects_bad_config(tmp_path):
    cfg = tmp_path / "heads.yaml"
    cfg.write_text(yaml.safe_dump({"embeddings": str(tmp_path / "e"), "output": str(tmp_path / "h")}))
    r = subprocess.run([sys.executable, "jobs/train_heads.py", "--config", str(cfg), "--set", "hed=mlp"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "unknown key 'hed'" in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    shipped = subprocess.run([sys.executable, "-c", (
        "from pipeline.config.files import merge_sources; from pipeline.heads import HeadTrainConfig; "
        "print(merge_sources(HeadTrainConfig, 'jobs/configs/heads-local.yaml').output)")],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert shipped.returncode == 0, shipped.stderr
    nightly = yaml.safe_load((ROOT / "jobs" / "configs" / "nightly-local.yaml").read_text())
    assert shipped.stdout.strip() == nightly["head"]  # the nightly job applies the head this config trains


# --------------------------------------------------------------------------------------------------
# Several nodes on this machine; one is lost mid-run


@pytest.mark.slow
def test_two_worker_nodes_share_the_work_and_losing_one_loses_no_rows(tmp_path):
    """tests/cluster_multinode.py, in its own process: a head without CPUs and two worker nodes. Both
    workers host an Embedder actor and embed images; then the node of a busy actor is killed mid-run. The
    run (or the same extract run again, when the first one failed) ends with exactly one row per image,
    and one more rerun finds every shard committed."""
    env = _base_env()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster_multinode.py"), str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=420,
                       start_new_session=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.stdout[-3000:], r.stderr[-5000:])
    res = json.loads(lines[-1][len("RESULT "):])
    n = res["images"]
    workers = set(res["worker_node_ids"])

    spread = res["spread"]
    assert spread["embedded"] == spread["rows"] == spread["unique_ids"] == n
    assert set(spread["actor_nodes"]) == workers and all(v == 1 for v in spread["actor_nodes"].values())
    assert set(spread["batches_per_node"]) == workers  # both workers embedded, the head nothing
    assert all(b >= 1 for b in spread["batches_per_node"].values())

    loss = res["node_loss"]
    # killed mid-run, with an Embedder actor on the node
    assert loss["killed_node_id"] in workers and 1 <= loss["committed_shards_at_kill"] < res["shards"]
    assert loss["actors_alive_at_kill"].get(loss["killed_node_id"], 0) >= 1, loss
    assert loss["first_run"] in ("completed", "failed"), loss
    assert loss["rows"] == loss["unique_ids"] == n, loss
    rerun = loss["rerun"]
    assert rerun["output_rows"] == n
    if loss["first_run"] == "completed":
        assert rerun["shards_ran"] == 0 and rerun["embedded"] == 0
    print(f"multi-node: {wall:.0f}s wall; batches per worker node {spread['batches_per_node']}; node loss "
          f"{loss['first_run']}, {loss['rows']} rows of {n} images, "
          f"{loss['recovered_after_kill_s']}s from the kill to a complete output")
