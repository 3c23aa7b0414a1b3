"""One inference server, several clients (issue 18): each session's audio is its own, exactly.

Real parts only: ``llvc run --services inference`` as the server and, per client, ``llvc run
--services capture,playback --session NAME`` with its own file source and file sink, all on
this host (``--session`` gives each client its own telemetry endpoints), every run under its own supervisord;
real ZeroMQ over loopback TCP, CURVE with real keys.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bus_helpers import free_port, listen_before_sending, stop_process, wait_until
from common.bus import Bus
from common.config import load_pipeline_config
from common.protocol import AudioChunk
from common.telemetry import Heartbeat
from services.lab.harness import LLVC, RunningPipeline

DATA = Path(__file__).resolve().parent / "data"
REF = DATA / "llvc-reference"
# Chunk factor 4 (52 ms chunks): three eager streams on a 2-core machine beside their clients leave room to
# spare (exactness holds at every chunk factor; speed is benchmarked apart).
MODEL = ["-p", str(REF / "ref_default.pth"), "-c", str(REF / "config.json"), "-n", "4"]
INPUTS = {"alice": REF / "ref_default_input.wav", "bob": DATA / "1919-142785-0000.wav",
          "carol": DATA / "174-50561-0000.wav",  # the longest (4 s): the one that outlives the faults
          "dave": REF / "ref_nc_input.wav"}      # one more than max_streams
# Correctness runs: slack, so a busy 2-core machine cannot drop a chunk (latency is benchmarked apart).
SLACK = ["inference.max_backlog_ms=8000", "playback.target_ms=1000", "playback.max_ms=8000"]
SERVER_ENDPOINTS = ("audio_in", "audio_out", "control", "telemetry_inference")
CLIENT_ENDPOINTS = ("telemetry_capture", "telemetry_playback", "telemetry_monitor")
C = 4 * 208


def _ports(names) -> list[str]:
    return [f"endpoints.{n}.connect=tcp://127.0.0.1:{free_port()}" for n in names]


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> dict[str, np.ndarray]:
    """``llvc convert``'s offline output of each client's input."""
    folder, out = tmp_path_factory.mktemp("inputs"), tmp_path_factory.mktemp("converted")
    for name, path in INPUTS.items():
        shutil.copy(path, folder / f"{name}.wav")
    done = subprocess.run([str(LLVC), "convert", *MODEL, "-f", str(folder), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = {p.stem: p for p in out.rglob("*.wav")}
    return {name: sf.read(next(p for stem, p in found.items() if stem.startswith(name)), dtype="float32")[0]
            for name in INPUTS}


class Pool:
    """A server and its clients, each an ``llvc run`` of its own."""

    def __init__(self, tmp_path: Path, *server_sets: str):
        self.tmp = tmp_path
        self.shared = [*_ports(SERVER_ENDPOINTS), *SLACK]
        self.server = RunningPipeline(tmp_path / "server", ["--services", "inference", "--no-dashboard", *MODEL],
                                      [*self.shared, "inference.backend=eager", *server_sets], observe=False)
        self.clients: dict[str, RunningPipeline] = {}

    def start_server(self) -> None:
        self.server.start()
        cfg = load_pipeline_config(env={}, overrides=self.shared)
        with Bus(cfg, "tap") as tap:
            sub = tap.subscriber(("heartbeat.",), endpoints=["telemetry_inference"])
            assert wait_until(lambda: isinstance(hb := sub.recv(100), Heartbeat) and hb.ready, timeout=90), \
                self.server.text()

    def start_client(self, name: str, *sets: str) -> RunningPipeline:
        client = RunningPipeline(
            self.tmp / name, ["--services", "capture,playback", "--session", name, "--no-dashboard", *MODEL,
                              "--source", f"file:{INPUTS[name]}", "--sink", f"file:{self.out(name)}", "--until-eof"],
            [*self.shared, *sets], observe=False)
        self.clients[name] = client.start()
        return client

    def out(self, name: str) -> Path:
        return self.tmp / f"{name}_out.wav"

    def finish(self, name: str, timeout: float = 120) -> None:
        """Wait for a client's ``--until-eof`` run to end by itself, successfully."""
        client = self.clients[name]
        client.proc.wait(timeout)
        assert client.proc.returncode == 0, client.text()[-3000:]

    def server_log(self) -> str:
        return (self.tmp / "server" / "inference.log").read_text(errors="replace")

    def close(self) -> None:
        for client in self.clients.values():
            client.stop()
        self.server.stop()


def assert_exact(pool: Pool, name: str, offline: dict[str, np.ndarray]) -> None:
    """The client's sink holds the offline conversion of its own input, on the source's timeline."""
    y, sr = sf.read(pool.out(name), dtype="float32")
    ref = offline[name]
    assert sr == 16000 and len(y) == len(ref), (name, len(y), len(ref))
    diff = float(np.abs(y - ref)[48:-C].max())
    print(f"{name}: max|diff| {diff:.2e} over {len(ref)} samples")
    assert diff < 1e-4, (name, diff)


def test_three_clients_each_get_exactly_their_own_conversion_and_a_fourth_is_refused(tmp_path, offline):
    pool = Pool(tmp_path, "inference.max_streams=3")
    try:
        pool.start_server()
        admitted = ("alice", "bob", "carol")
        for name in admitted:
            pool.start_client(name)
        assert wait_until(lambda: pool.server_log().count("session opened") == 3, timeout=60), pool.server_log()
        dave = pool.start_client("dave")
        capture_log = tmp_path / "dave" / "capture.log"
        assert wait_until(lambda: capture_log.exists() and "inference refused session 'dave'" in
                          capture_log.read_text(errors="replace"), timeout=60), dave.text()[-2000:]
        print(next(ln for ln in capture_log.read_text().splitlines() if "refused session" in ln))
        assert "all 3 stream slots are in use (inference.max_streams)" in capture_log.read_text()
        for name in admitted:
            pool.finish(name)
            assert_exact(pool, name, offline)
        log = pool.server_log()
        assert [f"session opened session={n}" in log for n in (*admitted, "dave")] == [True, True, True, False], log
    finally:
        pool.close()


def test_killing_one_clients_capture_and_anothers_playback_leaves_the_third_exact(tmp_path, offline):
    pool = Pool(tmp_path)
    try:
        pool.start_server()
        clients = {name: pool.start_client(name) for name in ("alice", "bob", "carol")}
        assert wait_until(lambda: pool.server_log().count("session opened") == 3, timeout=60), pool.server_log()
        time.sleep(0.5)  # mid-run: every stream under way
        killed = {"alice": "capture", "bob": "playback"}
        for name, service in killed.items():
            clients[name].kill(service)
        pool.finish("carol")
        assert_exact(pool, "carol", offline)
        # Carol's processes are the ones it started with (each spawned once: none restarted) ...
        spawned = (tmp_path / "carol" / "supervisord.log").read_text()
        for service in ("capture", "playback"):
            assert spawned.count(f"spawned: '{service}'") == 1, spawned
        # ... while the faults were real: the killed ones were started again.
        for name, service in killed.items():
            log = (tmp_path / name / "supervisord.log").read_text()
            assert "terminated by SIGKILL" in log and log.count(f"spawned: '{service}'") == 2, log
    finally:
        pool.close()


def test_with_curve_a_session_is_bound_to_the_key_that_opened_it(tmp_path):
    keys = tmp_path / "keys"
    for cmd in (["init", str(keys)], ["add-client", str(keys), "alice"], ["add-client", str(keys), "mallory"]):
        made = subprocess.run([str(LLVC), "keys", *cmd], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    base = [*_ports(SERVER_ENDPOINTS), *_ports(CLIENT_ENDPOINTS), "security.curve=true", f"security.keys_dir={keys}"]
    server = subprocess.Popen([str(LLVC), "inference", "--model-kind", "passthrough",
                               *[a for s in base for a in ("--set", s)]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    alice_cfg = load_pipeline_config(env={}, overrides=[*base, "security.client_key=alice"])
    mallory_cfg = load_pipeline_config(env={}, overrides=[*base, "security.client_key=mallory"])
    try:
        with Bus(alice_cfg, "capture") as alice, Bus(alice_cfg, "playback") as alice_ear, \
                Bus(mallory_cfg, "capture") as mallory, Bus(mallory_cfg, "playback") as mallory_ear, \
                Bus(alice_cfg, "tap") as tap:
            sub = tap.subscriber(("heartbeat.",), endpoints=["telemetry_inference"])
            assert wait_until(lambda: isinstance(hb := sub.recv(100), Heartbeat) and hb.ready, timeout=60)
            tx, rx = alice.audio_sender("audio_in"), alice_ear.audio_listener("audio_out", "alice")
            evil_tx, evil_rx = mallory.audio_sender("audio_in"), mallory_ear.audio_listener("audio_out", "alice")
            listen_before_sending(rx)
            listen_before_sending(evil_rx)

            def chunk(sid: str, k: int, value: float) -> AudioChunk:
                n = 16 if k == 0 else 208  # the head, then whole chunks (the default model's, cf 1)
                return AudioChunk(sid, k, time.monotonic_ns(), time.time_ns(), np.full(n, value, np.float32),
                                  offset=0 if k == 0 else 16 + (k - 1) * 208, session="alice")

            got, stolen = [], []
            for k in range(30):
                assert wait_until(lambda k=k: tx.send(chunk("alice-1", k, 0.25)), timeout=5)
                if k == 1:  # Alice's key opened the session once its first output is back
                    assert wait_until(lambda: (got.extend(iter(lambda: rx.recv(0), None)), got)[1], timeout=10)
                if k >= 1:  # Mallory's key: its own stream of Alice's session, from its start (would take over)
                    assert wait_until(lambda k=k: evil_tx.send(chunk("mallory-1", k - 1, -0.5)), timeout=5)
                time.sleep(0.005)
                got += iter(lambda: rx.recv(0), None)
                stolen += iter(lambda: evil_rx.recv(0), None)
            assert wait_until(lambda: (got.extend(iter(lambda: rx.recv(0), None)), len(got) >= 29)[1], timeout=10)
            stolen += iter(lambda: evil_rx.recv(50), None)
            print(f"alice got {len(got)} chunks, mallory {len(stolen)}")
            assert stolen == []
            assert {c.stream_id for c in got} == {"alice-1"} and len(got) == 29
            assert all(np.all(c.samples[16:] == 0.25) for c in got[1:])  # passthrough: only Alice's audio
            counters = {}

            def foreign_counted() -> bool:
                hb = sub.recv(100)
                if isinstance(hb, Heartbeat) and hb.service == "inference":
                    counters.update(hb.counters)
                return counters.get("dropped_foreign_session", 0) >= 29
            assert wait_until(foreign_counted, timeout=10), counters
    finally:
        err, _ = stop_process(server)
    assert "Traceback" not in err, err[-3000:]
