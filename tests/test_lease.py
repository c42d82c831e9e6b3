"""One writer per output (pipeline/output/lease.py): the lease is exclusive locally and on S3, frees itself
when its holder dies (a real SIGKILL) or stops renewing, can be waited for or broken, survives
--overwrite, and a second run of every writing command stops at once naming the first."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from pipeline import storage
from pipeline.output import lease as lease_mod
from pipeline.output.lease import Lease, LeaseHeld, LockPolicy, hold, lease_uri
from pipeline.output.ledger import Ledger

MODEL = "tf_efficientnet_lite0"


def _foreign(output: str, expires_in: float) -> dict:
    """A lease as a run on another host writes it, expiring ``expires_in`` seconds from now."""
    holder = {"run_id": "20261201T000000Z-abcdef", "command": "extract", "host": "worker-7.example",
              "pid": 4242, "token": "t" * 32, "started_at": "2026-12-01T00:00:00+00:00",
              "expires_at": (datetime.now(timezone.utc) + timedelta(seconds=expires_in)).isoformat()}
    storage.write_bytes(lease_uri(output), json.dumps(holder).encode())
    return holder


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('bucket')}/out"


def test_a_held_lease_stops_a_second_writer_naming_the_first(output):
    with hold(output, "run-one", "extract") as first:
        assert first.read()["run_id"] == "run-one"
        with pytest.raises(LeaseHeld) as e:
            Lease(output, "run-two", "extract").acquire()
        msg = str(e.value)
        assert "run run-one (extract)" in msg and socket.gethostname() in msg
        assert first.holder["started_at"] in msg and "--wait-for-lock" in msg and "--break-lock" in msg
        assert first.read()["token"] == first.holder["token"]  # the holder's lease is untouched
    assert not storage.exists(lease_uri(output))  # released
    with hold(output, "run-two", "extract") as second:
        assert second.took_over is None
    if "://" not in output:  # a run that wrote nothing leaves no folder behind
        assert not os.path.exists(output)


def test_only_one_of_two_simultaneous_creates_wins(output):
    uri = lease_uri(output)
    wins = [storage.create_exclusive(uri, b"a"), storage.create_exclusive(uri, b"b")]
    assert wins == [True, False] and storage.read_bytes(uri) == b"a"


def test_a_lease_from_another_host_is_free_once_expired_and_waited_for_until_then(output, monkeypatch):
    _foreign(output, expires_in=-1)
    with hold(output, "mine", "extract") as lease:
        assert "worker-7.example" in lease.took_over and "expired" in lease.took_over
    _foreign(output, expires_in=60)
    monkeypatch.setattr(lease_mod, "POLL_S", 0.2)
    t = time.monotonic()
    with pytest.raises(LeaseHeld, match="worker-7.example"):
        Lease(output, "mine", "extract").acquire(LockPolicy(wait_s=1.0))
    assert 0.9 <= time.monotonic() - t < 10
    with hold(output, "mine", "extract", LockPolicy(break_lock=True)) as lease:
        assert "--break-lock" in lease.took_over
    # a run that waits gets the lease when its holder releases it
    holder = _foreign(output, expires_in=60)
    uri = lease_uri(output)

    def release_soon():
        time.sleep(0.5)
        storage.remove(uri)

    import threading

    threading.Thread(target=release_soon).start()
    with hold(output, "mine", "extract", LockPolicy(wait_s=30)) as lease:
        assert lease.took_over is None and lease.read()["run_id"] == "mine" != holder["run_id"]


_HOLDER = r"""
import sys, time
from pipeline.output.lease import Lease
Lease(sys.argv[1], "killed-run", "extract").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_sigkilled_holder_frees_the_lease_at_once(tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, out], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match="killed-run"):
            Lease(out, "next", "extract").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with hold(out, "next", "extract") as lease:  # no waiting for the expiry: its process is gone
        assert f"process {proc.pid} on this host has exited" in lease.took_over


def test_the_holder_renews_and_notices_when_its_lease_is_broken(output, monkeypatch):
    monkeypatch.setattr(lease_mod, "RENEW_S", 0.2)
    with pytest.raises(LeaseHeld, match="lost the lease"):
        with hold(output, "slow-run", "extract") as lease:
            first = lease.read()["expires_at"]
            time.sleep(1.0)
            assert lease.read()["expires_at"] > first  # renewed while the run lives
            other = Lease(output, "operator-run", "extract").acquire(LockPolicy(break_lock=True))
            time.sleep(0.6)
            assert lease.lost  # the renewal found the operator's lease (or the gap between its two steps)
            with pytest.raises(LeaseHeld):
                lease.check()
    assert other.read()["run_id"] == "operator-run"  # the loser did not remove the winner's lease
    other.release()
    assert not storage.exists(lease_uri(output))


def test_a_held_lease_passed_on_is_used_on_its_output_and_its_policy_elsewhere(tmp_path):
    out, other = str(tmp_path / "out"), str(tmp_path / "predictions")
    with hold(out, "night", "nightly", LockPolicy(wait_s=5)) as outer:
        with hold(out, "extract", "extract", outer) as inner:  # nightly's extract
            assert inner is outer
        assert storage.exists(lease_uri(out))  # still the night's
        with hold(other, "predict", "heads predict", outer) as separate:
            assert separate is not outer and separate.policy == LockPolicy(wait_s=5)
        with pytest.raises(LeaseHeld):  # a second run in the same process is another writer
            with hold(out, "another", "extract"):
                pass
    assert not storage.exists(lease_uri(out))


def test_an_overwrite_switches_generations_and_keeps_the_runs_lease(tmp_path):
    from pipeline.output import generations

    out = str(tmp_path / "out")
    ledger = Ledger(out)
    ledger.write_state({"source": "x", "tables": {}})
    ledger.fold()
    with hold(out, "overwriting", "extract") as lease:
        new = ledger.at(generations.new_generation(), pending=True)
        new.write_state({"source": "y", "tables": {}})
        new.finish([])
        assert lease.read()["run_id"] == "overwriting"
        assert sorted(os.listdir(tmp_path / "out" / "_ledger")) == [
            f"gen-{new.generation}", "lease.json", "output.json"]
        assert Ledger(out).state() == {"source": "y", "tables": {}, "generation": new.generation}


def test_every_writing_command_stops_at_once_while_another_run_holds_the_output(cli, textures_dir, tmp_path):
    out, index = tmp_path / "out", tmp_path / "index"
    commands = {
        "extract": ["extract", "--source", textures_dir, "--output", out, "--model", MODEL],
        "classify": ["classify", "--source", textures_dir, "--output", out, "--model", MODEL],
        "heads predict": ["heads", "predict", "--head", tmp_path / "head", "--embeddings", out, "--output",
                          out],
        "index build": ["index", "build", "--embeddings", out, "--output", index],
        "index add": ["index", "add", "--index", index],
    }
    cfg = tmp_path / "nightly.yaml"
    cfg.write_text(f"source: {{uri: {textures_dir}}}\noutput: {{uri: {out}}}\n"
                   "backbone: {model: tf_efficientnet_lite0}\n")
    commands["nightly"] = ["nightly", "--config", cfg]
    with hold(str(out), "other-run", "extract"), hold(str(index), "other-run", "index build"):
        for name, args in commands.items():
            t = time.monotonic()
            r = cli(*args)
            assert r.returncode == 1, (name, r.stdout, r.stderr)
            assert "is being written by run other-run" in r.stderr and "--break-lock" in r.stderr, name
            assert time.monotonic() - t < 10, name
        assert sorted(os.listdir(out)) == ["_ledger"] and os.listdir(out / "_ledger") == ["lease.json"]
    r = cli(*commands["extract"], "--wait-for-lock", "-1")
    assert r.returncode == 2 and "--wait-for-lock -1: give 0 or more seconds" in r.stderr


def test_an_s3_server_without_conditional_writes_falls_back_to_a_check_then_a_put(bucket, monkeypatch):
    import s3fs

    real = s3fs.S3FileSystem._pipe_file

    async def unconditional_only(self, path, data, mode="overwrite", **kw):
        if mode == "create":
            raise OSError("NotImplemented: a header you provided implies functionality not implemented")
        return await real(self, path, data, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", unconditional_only)
    uri = lease_uri(f"{bucket}/out")
    assert [storage.create_exclusive(uri, b"a"), storage.create_exclusive(uri, b"b")] == [True, False]
    assert storage.read_bytes(uri) == b"a"
