"""``llvc run --session NAME``: several clients on one host against one inference server.

What the settings are (the environment ``llvc run`` gives its services, read back as the
services read it), then real runs: one server (``--services inference``) and two clients
(``--services capture,playback,monitor --session ...``) side by side on this host, each with its
own telemetry, ``/metrics`` and report, then two clients' file streams through the server one
after the other. Until the server serves several streams (issue 18), two clients' streams at
once would take each other's audio (one stream in, its output round-robined to every playback),
so the side-by-side run asserts only what the sessions guarantee, and the audio is checked
where the streams take turns.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from common.config import load_pipeline_config
from services.lab.endpoints import free_port
from services.run import add_arguments, load_environment
from services.run_session import SessionError, session_problem

REPO = Path(__file__).resolve().parent.parent
LLVC = Path(sys.executable).parent / "llvc"
DATA = Path(__file__).resolve().parent / "data"
CLIENT = ["capture", "playback", "monitor"]
SERVER_ENDPOINTS = ("audio_in", "audio_out", "control", "telemetry_inference")
OWN = ("telemetry_capture", "telemetry_playback", "telemetry_monitor")
#: Correctness runs: slack so that a busy moment on 2 cores cannot drop a chunk.
SERVER_SLACK = ["inference.max_backlog_ms=3000"]
CLIENT_SLACK = ["playback.target_ms=200", "playback.max_ms=5000"]


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def env_of(args: argparse.Namespace, run_dir: Path, services=CLIENT):
    return load_environment(args, list(services), run_dir)


# ------------------------------------------------------------------------------- the settings


@pytest.fixture(autouse=True)
def _no_caller_overrides(monkeypatch):
    """The settings checked are the default config's and these tests' own: none of the caller's."""
    for name in list(os.environ):
        if name.upper().startswith("LLVC__") or name == "LLVC_PIPELINE_CONFIG":
            monkeypatch.delenv(name)


def test_a_session_gets_its_own_telemetry_and_leaves_the_server_alone(tmp_path):
    base = load_pipeline_config(None, env=env_of(parse(), tmp_path / "plain")[0])
    sessions = {}
    for name in ("alice", "bob"):
        env, cfg, lines = env_of(parse("--session", name), tmp_path / name)
        assert load_pipeline_config(None, env=env) == cfg  # what the services will load
        assert cfg.services["capture"]["session"] == name
        for ep in OWN:
            address = f"ipc://{tmp_path / name / ep}.sock"
            assert (cfg.endpoints[ep].connect, cfg.endpoints[ep].bind) == (address, address)
            assert env[f"LLVC__ENDPOINTS__{ep.upper()}__CONNECT"] == address
        for ep in SERVER_ENDPOINTS:
            assert cfg.endpoints[ep] == base.endpoints[ep]
        port = cfg.services["monitor"]["metrics_port"]
        assert port not in (0, 9108)
        assert "bind" not in cfg.services["dashboard"]  # not started, not touched
        assert lines[0].startswith(f"llvc run: session {name}: endpoints.telemetry_capture.connect=ipc://")
        sessions[name] = cfg
    alice, bob = sessions["alice"], sessions["bob"]
    assert not {alice.endpoints[ep].connect for ep in OWN} & {bob.endpoints[ep].connect for ep in OWN}
    assert alice.services["monitor"]["metrics_port"] != bob.services["monitor"]["metrics_port"]
    # A name TOML would read as a number stays the string it is.
    assert env_of(parse("--session", "007"), tmp_path / "n")[1].services["capture"]["session"] == "007"


def test_a_session_moves_only_what_this_run_binds_and_keeps_what_set_gives(tmp_path, monkeypatch):
    keep = "ipc:///tmp/llvc-mine.sock"
    args = parse("--session", "a.b-c_1", "--sink", "virtual-mic",
                 "--set", f"endpoints.telemetry_playback.connect={keep}", "--set", "monitor.metrics_port=0")
    _, cfg, _ = env_of(args, tmp_path / "run", ["playback", "monitor", "dashboard"])
    assert cfg.endpoints["telemetry_capture"].connect == "tcp://127.0.0.1:5560"  # capture runs elsewhere
    assert cfg.endpoints["telemetry_playback"].connect == keep                  # given with --set
    assert cfg.endpoints["telemetry_monitor"].connect == f"ipc://{tmp_path / 'run' / 'telemetry_monitor'}.sock"
    assert cfg.services["monitor"]["metrics_port"] == 0
    host, port = cfg.services["dashboard"]["bind"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) != 8770
    assert cfg.services["playback"]["sink"] == "virtual-mic:llvc_voice_a_b_c_1"
    # A named microphone is the user's.
    _, cfg, _ = env_of(parse("--session", "x", "--sink", "virtual-mic:mine"), tmp_path / "run")
    assert cfg.services["playback"]["sink"] == "virtual-mic:mine"
    # A LAN endpoint (the caller's environment here) stays where other hosts look, with a note.
    monkeypatch.setenv("LLVC__ENDPOINTS__TELEMETRY_MONITOR__CONNECT", "tcp://10.0.0.1:5563")
    monkeypatch.setenv("LLVC__ENDPOINTS__TELEMETRY_MONITOR__BIND", "tcp://*:5563")
    _, cfg, lines = env_of(parse("--session", "x"), tmp_path / "run")
    assert cfg.endpoints["telemetry_monitor"].connect == "tcp://10.0.0.1:5563"
    assert cfg.endpoints["telemetry_capture"].connect.startswith("ipc://")
    assert lines[1].startswith("llvc run: note: session x: telemetry_monitor stays at tcp://*:5563 ")


def test_what_a_session_cannot_do_is_one_line(tmp_path):
    long_dir = tmp_path / ("d" * (100 - len(str(tmp_path))))
    with pytest.raises(SessionError, match=r"--session: .* bytes, at most 100 for a socket path: give a shorter"):
        env_of(parse("--session", "a"), long_dir)
    with pytest.raises(SessionError, match="security.curve is on and telemetry_inference stay tcp://"):
        env_of(parse("--session", "a", "--set", "security.curve=true"), tmp_path / "run")
    with pytest.raises(SessionError, match="over 64 characters: name one, virtual-mic:NAME"):
        env_of(parse("--session", "s" * 64, "--sink", "virtual-mic"), tmp_path / "run")


def test_session_names():
    for good in ("alice", "a", "x" * 64, "alice-laptop_2.home", "007"):
        assert session_problem(good) is None, good
    for bad in ("", "x" * 65, "a b", "al/ice", "é", "a\nb", "alice:1"):
        assert session_problem(bad) == f"--session: expected 1-64 letters, digits, '.', '-' or '_', got {bad!r}"


@pytest.mark.parametrize("name", ["a b", "a\nb"])
def test_a_bad_session_name_is_refused_before_anything_starts(tmp_path, name):
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(LLVC), "run", "--session", name, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 2
    assert proc.stderr == f"llvc run: error: {session_problem(name)}\n"
    assert not run_dir.exists()


# ------------------------------------------------------------------------------- real runs


def _env() -> dict[str, str]:
    """This checkout's code for the ``llvc`` script and every service it starts (the venv's
    script would otherwise import whichever checkout the package was installed from)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


class Run:
    """One ``llvc run`` in the background, its output in files."""

    def __init__(self, tmp: Path, name: str, argv: list[str]):
        self.run_dir = tmp / name
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([str(LLVC), "run", "--run-dir", str(self.run_dir), *argv], env=_env(),
                                         stdout=out, stderr=err)

    def text(self) -> str:
        return self.out.read_text()

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text() + self.err.read_text()
            time.sleep(0.1)

    def finish(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(self.text()[-3000:] + self.err.read_text()[-3000:]) from None

    def stop(self) -> None:
        """Ctrl-C, as a user would (``llvc run`` then stops everything it started)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def pid_of(self, service: str) -> int:
        return int(re.search(rf"llvc run: {service} running \(pid (\d+)\)", self.text())[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One inference server (passthrough) on private ports; yields the ``--set`` items that
    find it, which every client gives too."""
    tmp = tmp_path_factory.mktemp("server")
    sets = [f"endpoints.{ep}.connect=tcp://127.0.0.1:{free_port()}" for ep in SERVER_ENDPOINTS]
    run = Run(tmp, "s", ["--services", "inference", "--passthrough", "--duration", "300",
                         *_sets(*sets, *SERVER_SLACK)])
    try:
        run.wait_for("inference running", 60)
        yield sets
    finally:
        run.stop()


@pytest.fixture
def clients(server, tmp_path):
    """Starts client runs of ``server`` (``clients(name, *argv)``); stops any left at the end."""
    runs: list[Run] = []

    def start(name: str, *argv: str) -> Run:
        runs.append(Run(tmp_path, name, ["--services", ",".join(CLIENT), "--session", name, "--passthrough",
                                         "--report", str(tmp_path / f"{name}.json"), *argv,
                                         *_sets(*server, *CLIENT_SLACK)]))
        return runs[-1]

    yield start
    for run in runs:
        run.stop()


def test_two_clients_side_by_side_on_one_server(clients, tmp_path):
    runs = {name: clients(name, "--source", "tone", "--sink", f"file:{tmp_path / name}.wav", "--duration", "6")
            for name in ("alice", "bob")}
    status = {name: run.finish(90) for name, run in runs.items()}
    for name, run in runs.items():
        assert status[name] == 0, run.text()[-3000:] + run.err.read_text()[-3000:]
        assert f"llvc run: session {name}: endpoints.telemetry_capture.connect=ipc://{run.run_dir}" in run.text()
        report = json.loads((tmp_path / f"{name}.json").read_text())
        services = report["services"]
        # Its monitor heard its own capture and playback, and no other session's.
        for service in ("capture", "playback"):
            assert services[service]["pids"] == [run.pid_of(service)], (name, service, services)
            assert services[service]["restarts"] == 0
        assert report["chunks"] > 0  # its own playback's chunks (telemetry_playback is the session's)
        # Per session: its own e2e and underruns; the server's counters for every session it runs.
        own, other = report["sessions"][name], report["sessions"].get("bob" if name == "alice" else "alice", {})
        assert own["chunks"] == report["chunks"] and own["e2e_latency_ms"]["p50"] > 0 and "underruns" in own, own
        assert other.get("chunks", 0) == 0, other
        assert own["inference"]["chunks_in"] > 0, own
        assert report["batch_sizes"] and all(int(k) >= 1 for k in report["batch_sizes"]), report["batch_sizes"]
        assert report["model"]["kind"] == "passthrough"
        assert sf.info(tmp_path / f"{name}.wav").frames > 0
        metrics = re.search(r"monitor\.metrics_port=(\d+)", run.text())[1]
        assert f":{metrics}/metrics" in (run.run_dir / "monitor.log").read_text()
    reports = [json.loads((tmp_path / f"{n}.json").read_text()) for n in runs]
    assert reports[0]["services"]["inference"]["pids"] == reports[1]["services"]["inference"]["pids"]  # one server
