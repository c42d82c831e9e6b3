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


class FaultyProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that fails a fraction of requests, the ways
    object storage does under load: ``slowdown`` (503 SlowDown, not forwarded), ``reset`` (the connection
    is reset before the request is forwarded) and ``lost_response`` (forwarded and applied, then the
    connection is reset before the client sees the answer). ``counts`` tallies what happened.
    """

    KINDS = ("slowdown", "reset", "lost_response")

    def __init__(self, upstream: str, fail_rate: float = 0.1, seed: int = 0,
                 kinds: tuple[str, ...] = KINDS) -> None:
        import random
        import threading

        self.upstream = upstream
        self.fail_rate = fail_rate
        self.kinds = kinds
        self.counts = {"forwarded": 0, **{k: 0 for k in kinds}}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = None
        self.endpoint = ""

    def _draw(self) -> str | None:
        with self._lock:
            kind = self._rng.choice(self.kinds) if self._rng.random() < self.fail_rate else None
            self.counts[kind or "forwarded"] += 1
            return kind

    def start(self) -> FaultyProxy:
        import http.client
        import struct
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        proxy = self
        up = urlsplit(self.upstream)
        hop = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else None

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._draw()
                if fault == "reset":
                    return self._reset()
                if fault == "slowdown":
                    msg = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                           b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fault == "lost_response":
                    return self._reset()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in hop and k.lower() != "content-length":
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return None

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
