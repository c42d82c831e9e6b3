"""Shared fixtures: one loopback S3 server and one small local Ray per test session, small real datasets."""

from __future__ import annotations

import os

import pytest

# Never let botocore look for instance credentials on the network.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the whole session; its env is applied before Ray starts."""
    from pipeline.demo.s3local import local_s3

    with local_s3() as server:
        yield server


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the session (small CPU and object-store limits); workers inherit the S3 env."""
    import ray

    if not ray.is_initialized():
        # address="local": a Ray of its own, even where another one runs on this machine
        ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def textures_dir(tmp_path_factory):
    """brick/grass/gravel patches in class folders (ImageFolder layout), 8 per class."""
    from pipeline.samples import make_textures

    root = tmp_path_factory.mktemp("textures")
    make_textures(root, per_class=8, patch=112, seed=1)
    return root


@pytest.fixture(scope="session")
def photos(ray_session, tmp_path_factory):
    """The photos (lossless PNG originals) and their planted JPEG copies embedded once; the originals' rows
    alone as a table of their own (its files keep the embedding spec in their metadata, as an extract of the
    originals would). Shared by test_dedup and test_serve."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.commands.extract import extract
    from pipeline.config import ExtractConfig
    from pipeline.samples import make_near_copies

    root = tmp_path_factory.mktemp("photos")
    planted = make_near_copies(root / "img", copies_of=16, seed=1, originals_as="png")
    extract(ExtractConfig.model_validate({
        "source": {"uri": str(root / "img")},
        "backbone": {"model": "tf_efficientnet_lite0", "layer": "blocks.5", "pool": "grid3"},
        "output": {"uri": str(root / "feat" / "img")}, "runtime": {"progress": False, "batch_size": 32}}))
    for f in (root / "feat" / "img" / "embeddings").glob("*.parquet"):
        t = pq.read_table(f)
        t = t.filter(pc.starts_with(t.column("id"), "originals/"))
        if t.num_rows:
            (root / "feat" / "originals" / "embeddings").mkdir(parents=True, exist_ok=True)
            pq.write_table(t, root / "feat" / "originals" / "embeddings" / f.name)
    return root, planted


@pytest.fixture
def bucket(s3_server, request):
    """A fresh, empty bucket for one test."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    return s3_server.make_bucket(name)


class CliResult:
    """What a `pipeline` run leaves: its exit status and its two streams."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli():
    """Run `pipeline ARGS...` in this process (the same typer app `python -m pipeline` runs, without the
    seconds of imports a subprocess pays); an exception the CLI did not turn into an exit status fails."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    def run(*args: str, env: dict | None = None) -> CliResult:
        r = CliRunner().invoke(app, [str(a) for a in args], env=env)
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        return CliResult(r.exit_code, r.stdout, r.stderr)

    return run
