"""Broken config under ``llvc run``: one clear line, a non-zero exit, nothing left running.

Each case starts the real pipeline (real supervisord, real services) with one thing wrong. What
``llvc run`` can check itself is refused before anything starts; what only a service can find
out (its own table, its sockets, its model file) ends that service with its one-line
``cannot start:`` error in its supervisord log, and ``llvc run`` reports that line and stops
everything instead of waiting for a pipeline that will never run.
"""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from services.lab.endpoints import private_sets
from services.lab.harness import LLVC
from test_pipeline_run import processes_of

LIMIT_S = 60  # generous: a failed start is reported in a few seconds


def llvc_run(run_dir: Path, sets: list[str], *args: str) -> subprocess.CompletedProcess:
    cmd = [str(LLVC), "run", "--source", "tone", "--sink", "null", "--duration", "120", "--run-dir", str(run_dir),
           *args, *[a for s in sets for a in ("--set", s)]]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S + 60)
    assert time.monotonic() - t0 < LIMIT_S, "llvc run took too long to give up"
    return proc


def assert_clean_exit(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    """No traceback anywhere; nothing of this run still running."""
    logs = [p.read_text(errors="replace") for p in run_dir.glob("*.log")] if run_dir.exists() else []
    for text in (proc.stdout, proc.stderr, *logs):
        assert "Traceback" not in text, text[-3000:]
    time.sleep(0.5)
    assert processes_of(run_dir) == []


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def endpoint(sets: list[str], name: str) -> str:
    return next(s.split("=", 1)[1] for s in sets if s.startswith(f"endpoints.{name}.connect="))


@pytest.mark.parametrize("case", ["unknown_key", "bad_endpoint", "port_in_use", "missing_checkpoint"])
def test_a_service_with_broken_config_is_reported_in_one_line(tmp_path, case):
    run_dir = tmp_path / "run"
    sets = private_sets()
    busy = None
    args = ["--passthrough"]
    if case == "unknown_key":
        sets.append("inference.bogus=1")
        service, fragment = "inference", "inference.bogus: unknown key"
    elif case == "bad_endpoint":
        # An address not on this host: binding fails at once, and nothing is ever sent to it
        # (everyone else connects to the loopback connect address).
        port = port_of(endpoint(sets, "audio_in"))
        sets.append(f"endpoints.audio_in.bind=tcp://192.0.2.1:{port}")
        service, fragment = "inference", f"cannot bind audio_in at tcp://192.0.2.1:{port}"
    elif case == "port_in_use":
        address = endpoint(sets, "telemetry_playback")
        busy = socket.socket()
        busy.bind(("127.0.0.1", port_of(address)))
        busy.listen()
        service, fragment = "playback", f"cannot bind telemetry_playback at {address} (Address already in use"
    else:  # a checkpoint the service itself must refuse (llvc run checks only -p up front)
        missing = tmp_path / "nope" / "G_404.pth"
        sets.append(f"model.checkpoint={missing}")
        args = []
        service, fragment = "inference", f"{missing}: no such checkpoint file"
    try:
        proc = llvc_run(run_dir, sets, *args)
    finally:
        if busy is not None:
            busy.close()
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"llvc run: error: {service} cannot start: ") and fragment in errors[0], errors
    log_errors = [line for line in (run_dir / f"{service}.log").read_text().splitlines() if " ERROR " in line]
    assert log_errors and all(f" {service} ERROR cannot start: " in line and fragment in line
                              for line in log_errors), log_errors
    assert_clean_exit(proc, run_dir)


@pytest.mark.parametrize("case", ["missing_checkpoint_flag", "missing_keys"])
def test_what_llvc_run_can_check_is_refused_before_anything_starts(tmp_path, case):
    run_dir = tmp_path / "run"
    sets = private_sets()
    if case == "missing_checkpoint_flag":
        args, fragment = ["-p", str(tmp_path / "G_404.pth")], f"{tmp_path / 'G_404.pth'}: no such checkpoint file"
    else:
        (tmp_path / "keys").mkdir()  # there, but empty
        sets += ["security.curve=true", f"security.keys_dir={tmp_path / 'keys'}"]
        args, fragment = ["--passthrough"], f"{tmp_path / 'keys' / 'server.key_secret'}: missing"
    proc = llvc_run(run_dir, sets, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and fragment in proc.stderr, proc.stderr
    assert proc.stderr.startswith("llvc run: error: ")
    assert not (run_dir / "supervisord.log").exists()  # nothing was started
    assert_clean_exit(proc, run_dir)


def test_a_service_without_its_key_files_exits_2_in_one_line(tmp_path):
    """The same keys a service needs, checked by the service itself (as on a host of a LAN
    pipeline where only some services run and the keys were not copied)."""
    (tmp_path / "keys").mkdir()
    sets = [*private_sets(), "security.curve=true", f"security.keys_dir={tmp_path / 'keys'}"]
    proc = subprocess.run([str(LLVC), "monitor", *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "monitor ERROR cannot start: " in errors[0] and "server.key_secret: missing" in errors[0]
    assert "llvc keys init" in errors[0] and "Traceback" not in proc.stderr
