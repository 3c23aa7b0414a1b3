"""A whole pipeline under ``llvc run`` in the background, watched through its telemetry bus.

Used by the fault tests (``tests/test_faults.py``, ``tests/test_lan.py``) and by
``scripts/bench_reliability.py``. Nothing here is a fake: ``llvc run`` starts the real
supervisord and the real services; faults are real signals, real ``supervisorctl`` commands and
real network conditions; what happened is read from the same telemetry a dashboard would tap.

Timing conventions: every time is ``time.monotonic_ns()`` of this process (the same clock the
services stamp with, since they run on this host). A played chunk's capture time is its play
time minus its ``e2e_ms``, so "the first good chunk after a fault" is the first chunk played
whose audio was captured after the fault began: audio already in flight does not count.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.bus import Bus
from common.config import load_pipeline_config

REPO = Path(__file__).resolve().parent.parent
LLVC = Path(sys.executable).parent / "llvc"
SUPERVISORCTL = Path(sys.executable).parent / "supervisorctl"
SERVICES = ("monitor", "inference", "playback", "capture")


@dataclass(frozen=True)
class Played:
    """One ``chunk.playback`` message: a chunk's first sample reached the output."""

    t_ns: int          # when this process received the message (≈ play time; pub/sub adds < 1 ms)
    stream_id: str
    offset: int
    e2e_ms: float
    pid: int

    @property
    def t_capture_ns(self) -> int:
        return self.t_ns - int(self.e2e_ms * 1e6)


class Observer:
    """Collects every telemetry message of a pipeline config, with its arrival time, in a thread."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.messages: list[tuple[int, object]] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()

    def start(self) -> "Observer":
        self.thread.start()
        self.ready.wait(10)
        return self

    def _run(self) -> None:
        with Bus(self.cfg, "tap") as bus:
            sub = bus.subscriber(("",))
            self.ready.set()
            while not self.stopping:
                msg = sub.recv(timeout_ms=50)
                if msg is not None:
                    with self.lock:
                        self.messages.append((time.monotonic_ns(), msg))

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)

    def select(self, type_: str | None = None, service: str | None = None, since_ns: int = 0):
        """``(t_ns, msg)`` received at or after ``since_ns``, filtered by type and service."""
        with self.lock:
            msgs = list(self.messages)
        return [(t, m) for t, m in msgs if t >= since_ns and (type_ is None or m.type == type_)
                and (service is None or m.service == service)]

    def played(self, since_ns: int = 0) -> list[Played]:
        """Every ``chunk.playback`` received since ``since_ns``, in order."""
        return [Played(t, m.data["stream_id"], m.data["offset"], m.data["e2e_ms"], m.pid)
                for t, m in self.select("chunk", "playback", since_ns)]

    def events(self, name: str, service: str | None = None, since_ns: int = 0) -> list[tuple[int, dict]]:
        return [(t, m.data) for t, m in self.select("event", service, since_ns) if m.data.get("event") == name]

    def last_heartbeat(self, service: str) -> dict | None:
        beats = self.select("heartbeat", service)
        return beats[-1][1].data if beats else None

    def counters(self, service: str) -> dict:
        """The latest heartbeat counters of ``service`` (its current process)."""
        beat = self.last_heartbeat(service)
        return dict(beat.get("counters", {})) if beat else {}


def e2e_stats(played: list[Played]) -> dict[str, float | None]:
    """Median, p99 and count of e2e latency over ``played``."""
    if not played:
        return {"n": 0, "p50": None, "p99": None}
    e = np.array([p.e2e_ms for p in played])
    return {"n": len(e), "p50": float(np.median(e)), "p99": float(np.percentile(e, 99))}


class RunningPipeline:
    """``llvc run`` in the background (optionally inside a network namespace), with an observer.

    ``sets`` are ``key=value`` overrides given both to ``llvc run`` and to the observer's config,
    so the observer taps exactly the endpoints the services use.
    """

    def __init__(self, run_dir: Path, args: list[str], sets: list[str], *, wrapper: list[str] | None = None,
                 observe: bool = True, env: dict[str, str] | None = None, observer_sets: list[str] | None = None):
        self.run_dir = Path(run_dir)
        self.args = args
        self.sets = sets
        self.wrapper = wrapper or []
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.observer = None
        if observe:
            self.observer = Observer(load_pipeline_config(self.env.get("LLVC_PIPELINE_CONFIG"), env={},
                                                          overrides=observer_sets or sets))
        self.output: list[str] = []

    # ------------------------------------------------------------------ lifetime
    def start(self) -> "RunningPipeline":
        if self.observer is not None:
            self.observer.start()
        cmd = [*self.wrapper, str(LLVC), "run", "--run-dir", str(self.run_dir), *self.args,
               *[a for s in self.sets for a in ("--set", s)]]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, cwd=REPO)
        threading.Thread(target=self._read_output, daemon=True).start()
        return self

    def _read_output(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def text(self) -> str:
        return "".join(self.output)

    def stop(self, timeout: float = 60) -> dict | None:
        """Ctrl-C ``llvc run``, wait for it, and return the monitor's report (if one was written)."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(timeout)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            if self.observer is not None:
                self.observer.stop()
        report = self.run_dir / "report.json"
        return json.loads(report.read_text()) if report.exists() else None

    def __enter__(self) -> "RunningPipeline":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ supervisor
    def rpc(self):
        from supervisor.xmlrpc import SupervisorTransport

        sock = self.run_dir / "supervisor.sock"
        return xmlrpc.client.ServerProxy("http://127.0.0.1",
                                         transport=SupervisorTransport(None, None, f"unix://{sock}"))

    def pids(self) -> dict[str, int]:
        """Program name → pid of its running process (0 if not running)."""
        return {p["name"]: p["pid"] for p in self.rpc().supervisor.getAllProcessInfo()}

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess:
        """Run the real ``supervisorctl`` against this run's supervisord."""
        env = {**self.env, "LLVC_RUN_DIR": str(self.run_dir)}
        return subprocess.run([*self.wrapper, str(SUPERVISORCTL), "-c", str(REPO / "supervisord.conf"), *args],
                              capture_output=True, text=True, env=env, timeout=60)

    def kill(self, service: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the service's process; returns the time it was sent."""
        pid = self.pids()[service]
        assert pid, f"{service} is not running"
        t = time.monotonic_ns()
        os.kill(pid, sig)
        return t

    # ------------------------------------------------------------------ waiting
    def wait_streaming(self, seconds: float, timeout: float = 90) -> None:
        """Wait until audio has been playing for ``seconds`` (raises with the run's output if not)."""
        deadline = time.monotonic() + timeout
        first = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"llvc run exited {self.proc.returncode}:\n{self.text()[-3000:]}")
            played = self.observer.played()
            if played and first is None:
                first = played[0].t_ns
            if first is not None and time.monotonic_ns() - first >= seconds * 1e9:
                return
            time.sleep(0.05)
        raise AssertionError(f"no steady audio within {timeout} s:\n{self.text()[-3000:]}")

    def first_good_chunk(self, after_ns: int, timeout: float = 30, stream_id: str | None = None) -> Played:
        """The first chunk played whose audio was captured after ``after_ns`` (and of ``stream_id``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.observer.played(after_ns):
                if p.t_capture_ns > after_ns and (stream_id is None or p.stream_id == stream_id):
                    return p
            time.sleep(0.02)
        raise AssertionError(f"no audio captured after the fault was played within {timeout} s:\n"
                             f"{self.text()[-3000:]}")
