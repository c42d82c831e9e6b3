"""The public CLI: exit codes, one clear error line before any Ray work, and a real run through `pipeline`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pipeline(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=timeout, cwd=ROOT)


def _assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Ray" not in r.stderr and "ray" not in r.stdout  # failed before starting Ray


def test_layers_lists_names_and_shapes():
    r = _pipeline("layers", "--model", "tf_efficientnet_lite0")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()}
    assert rows["blocks.2"] == "40x28x28" and rows["final"] == "1280" and rows["logits"] == "1000"


@pytest.fixture(scope="module")
def images(textures_dir):
    return str(textures_dir)


def test_unknown_model(cli, images, tmp_path):
    r = cli("extract", "--source", images, "--output", str(tmp_path), "--model", "tf_efficientnet_lite")
    _assert_one_line_error(r, "unknown timm model", "tf_efficientnet_lite0")


def test_unknown_layer(cli, images, tmp_path):
    r = cli("extract", "--source", images, "--output", str(tmp_path),
                  "--model", "tf_efficientnet_lite0", "--layer", "blocks.42")
    _assert_one_line_error(r, "unknown layer 'blocks.42'", "blocks.2", "pipeline layers")


def test_missing_source(cli, tmp_path):
    r = cli("extract", "--source", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
                  "--model", "tf_efficientnet_lite0")
    _assert_one_line_error(r, "nope")


def test_missing_required_flag(cli, tmp_path):
    r = cli("extract", "--source", str(tmp_path), "--output", str(tmp_path / "o"))
    _assert_one_line_error(r, "--model")


def test_no_credentials(s3_server, bucket, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3_server.endpoint, AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    r = _pipeline("extract", "--source", f"{bucket}/in/", "--output", str(tmp_path / "o"),
                  "--model", "tf_efficientnet_lite0", env=env)
    _assert_one_line_error(r, "no AWS credentials", "AWS_ACCESS_KEY_ID")


def test_ray_job_entry_point_takes_a_config_file_and_its_commands_flags(ray_session, images, tmp_path):
    """jobs/extract.py, the `ray job submit` entry point, runs the CLI: a config file, the flags of
    `pipeline extract` over it and --set; a bad key exits 2; each job's --help is its command's."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"source: {{uri: {images}, labels: folder}}\nbackbone: {{model: tf_efficientnet_lite0}}\n"
                   f"output: {{uri: {tmp_path / 'out'}}}\nruntime: {{progress: false}}\n")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "jobs/extract.py", "--config", str(cfg), "--layer", "blocks.2",
           "--batch-size", "12", "--set", "backbone.pool=max", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["counts"]["embedded"] == 24 and summary["spec"]["dim"] == 40
    assert summary["config"]["runtime"]["batch_size"] == 12 and summary["config"]["backbone"]["pool"] == "max"
    bad = subprocess.run([sys.executable, "jobs/extract.py", "--config", str(cfg), "--set", "backbone.lyr=x"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "unknown key 'backbone.lyr'" in bad.stderr
    for job, flag in (("finetune", "--freeze-until"), ("train_heads", "--labels-from"),
                      ("nightly", "--run-date"), ("extract", "--incremental"),
                      ("compare", "--label-map")):
        h = subprocess.run([sys.executable, f"jobs/{job}.py", "--help"], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
        assert h.returncode == 0 and flag in h.stdout, (job, h.stdout, h.stderr)


def _last_error(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), r.stderr[-3000:]
    return lines[-1]


def test_a_gpu_request_without_gpus_exits_2_in_seconds_naming_the_flag(ray_session, images, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    t = time.monotonic()
    r = _pipeline("extract", "--source", images, "--output", str(tmp_path / "o"), "--model",
                  "tf_efficientnet_lite0", "--gpus-per-actor", "1", env=env)
    assert r.returncode == 2 and time.monotonic() - t < 90
    assert "--gpus-per-actor" in _last_error(r) and not (tmp_path / "o" / "embeddings").exists()


def test_a_resource_no_node_has_on_an_autoscaling_cluster_is_waited_for_then_refused(ray_session, images,
                                                                                     tmp_path):
    """The forced stall of a cluster marked autoscaling: the run says what it waits for and gives up after
    runtime.resource_wait_s with the settings to change, instead of waiting forever."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    r = _pipeline("extract", "--source", images, "--output", str(tmp_path / "o"), "--model",
                  "tf_efficientnet_lite0", "--set", "runtime.autoscaling=true",
                  "--set", "runtime.actor_resources={nowhere: 1}", "--set", "runtime.resource_wait_s=3",
                  env=env)
    assert r.returncode == 2
    line = _last_error(r)
    assert "nowhere: 1" in line and "runtime.resource_wait_s=3" in line and "runtime.actor_resources" in line
    assert "waiting for the autoscaler" in r.stderr


def test_a_run_that_stops_making_progress_ends_with_what_it_waits_for(ray_session, images, tmp_path):
    """An actor that takes every CPU leaves none for the read tasks: Ray Data would wait forever; the run
    ends after runtime.stall_timeout_s naming the stalled operator and the request, and exits 1."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    r = _pipeline("extract", "--source", images, "--output", str(tmp_path / "o"), "--model",
                  "tf_efficientnet_lite0", "--set", "runtime.cpus_per_actor=2",
                  "--set", "runtime.stall_timeout_s=10", env=env)
    assert r.returncode == 1
    line = _last_error(r)
    assert "no progress for 10s" in line and "CPU: 2" in line and "rerunning resumes" in line


def test_nightly_command_errors_before_ray(cli, tmp_path):
    r = cli("nightly", "--config", str(tmp_path / "missing.yaml"))
    _assert_one_line_error(r, "missing.yaml", "--config")


def test_secrets_never_reach_output_logs_or_errors(ray_session, s3_server, bucket, images, tmp_path, cli):
    """A full `pipeline extract` run (S3 in, S3 out; flags, --set, --json) under recognisable fake
    credentials, its weights named by a URI with a signature in its query string (a presigned URL), and
    failing runs: the run writes what its flags asked for, and neither the key id, the secret, the
    signature nor a user:password@ appears on stdout/stderr, in the run record, the ledger, the Parquet
    files, or an index and a head made from them."""
    from safetensors.torch import save_file

    from pipeline import storage
    from pipeline.backbone.weights import load_packaged

    key_id, secret = "AKIAFAKEKEY7X2Q9ZZ01", "fAkE/sEcReT+k3y0123456789abcdefghijklmn"
    signature = "X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    weights = tmp_path / f"lite0.safetensors?{signature}"  # a file of that name: the URI reads it as it is
    save_file(load_packaged("tf_efficientnet_lite0")[0], str(weights))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    s3_server.upload_dir(images, f"{bucket}/in")
    ok = _pipeline("extract", "--source", f"{bucket}/in/", "--output", f"{bucket}/out",
                   "--model", "tf_efficientnet_lite0", "--weights", f"file://{weights}", "--labels", "folder",
                   "--dtype", "float16", "--set", "runtime.batch_size=12", "--set", "runtime.progress=false",
                   "--json", env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    summary = json.loads(ok.stdout)
    assert summary["counts"]["embedded"] == 24 and summary["config"]["runtime"]["batch_size"] == 12
    assert "file://" in ok.stdout and "?<redacted>" in ok.stdout
    bad = _pipeline("extract", "--source", f"{bucket}-missing/in/", "--output", f"{bucket}/out2",
                    "--model", "tf_efficientnet_lite0", env=env)
    assert bad.returncode == 2
    out = f"{bucket}/out"
    assert cli("index", "build", "--embeddings", out, "--output", tmp_path / "idx").returncode == 0
    assert cli("heads", "train", "--embeddings", out, "--output", tmp_path / "head", "--epochs", "2"
               ).returncode == 0
    userinfo = cli("extract", "--source", images, "--output", tmp_path / "o2", "--model",
                   "tf_efficientnet_lite0", "--weights", f"https://user:pw@example.invalid/w.pth?{signature}")
    assert userinfo.returncode == 2 and "example.invalid" in userinfo.stderr

    fs, path = storage.get_fs(f"{bucket}/out")
    assert any(b"_runs" in p.encode() for p in fs.find(path))
    t = pads.dataset(f"{path}/embeddings", filesystem=fs, partitioning="hive").to_table()
    emb_type = t.schema.field("embedding").type
    assert t.num_rows == 24 and emb_type.list_size == 1280 and str(emb_type.value_type) == "halffloat"
    assert sorted(set(t.column("label").to_pylist())) == ["brick", "grass", "gravel"]
    local = [p for p in tmp_path.rglob("*") if p.is_file() and p != weights and "?" not in p.name]
    assert any(p.name == "index.json" for p in local) and any(p.name == "head.json" for p in local)
    written = [fs.cat_file(p) for p in fs.find(path)] + [p.read_bytes() for p in local]  # _runs, _ledger too
    printed = [r.stdout.encode() + r.stderr.encode() for r in (ok, bad, userinfo)]
    for blob in [*printed, *written]:
        for leak in (key_id, secret, "X-Amz-Signature", "user:pw"):
            assert leak.encode() not in blob, leak
