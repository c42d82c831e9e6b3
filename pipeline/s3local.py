"""A loopback S3 server (moto's standalone server) for the demo and the tests: a real S3 HTTP API on
127.0.0.1, reached through the same s3fs code path as a real bucket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline import storage

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    """Start ``python -m moto.server`` on 127.0.0.1; ``env`` holds the variables that point clients at it."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> LocalS3:
        try:
            import moto  # noqa: F401
        except ImportError as e:  # pragma: no cover
            raise ImportError("the loopback S3 server needs moto: pip install 'moto[server]'") from e
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def apply_env(self) -> None:
        """Point this process (and the Ray workers it starts afterwards) at the server."""
        os.environ.update(self.env)

    def make_bucket(self, name: str) -> str:
        fs, _ = storage.get_fs(f"s3://{name}")
        fs.call_s3("create_bucket", Bucket=name)  # no LocationConstraint: us-east-1 refuses one
        fs.invalidate_cache()
        return f"s3://{name}"

    def upload_dir(self, local_dir: str, uri: str) -> int:
        """Copy a local tree under an s3:// prefix through the storage layer; returns files copied."""
        n = 0
        for dirpath, _, files in os.walk(local_dir):
            for f in files:
                full = os.path.join(dirpath, f)
                rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
                with open(full, "rb") as fh:
                    storage.write_bytes(storage.join(uri, rel), fh.read())
                n += 1
        return n


@contextmanager
def local_s3() -> Iterator[LocalS3]:
    """Run a loopback S3 server with its environment applied; restores the environment afterwards."""
    server = LocalS3().start()
    saved = {k: os.environ.get(k) for k in server.env}
    server.apply_env()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
