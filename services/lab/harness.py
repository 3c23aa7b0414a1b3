"""A whole pipeline under ``llvc run`` in the background, watched through its telemetry bus.

Used by the fault tests (``tests/test_faults.py``, ``tests/test_lan.py``) and by
``scripts/bench_reliability.py`` and ``scripts/bench_acoustic.py``. Nothing here is a fake: ``llvc run`` starts the real
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
import re
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
from common.tap import topics_for
from common.telemetry import Event, Heartbeat, PlaybackChunk, Record

REPO = Path(__file__).resolve().parents[2]
LLVC = Path(sys.executable).parent / "llvc"
SUPERVISORCTL = Path(sys.executable).parent / "supervisorctl"
DRAIN_WAIT_MS = 200  # at the observer's stop: how long to wait for one more queued record

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
    """Collects every telemetry record of a pipeline config (but audio headers), with its
    arrival time, in a thread."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.messages: list[tuple[int, Record]] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()

    def start(self) -> Observer:
        self.thread.start()
        self.ready.wait(10)
        return self

    def _run(self) -> None:
        with Bus(self.cfg, "tap") as bus:
            # Not the per-chunk audio headers: nothing here reads them, and decoding them too
            # would slow this thread enough, on 2 busy cores, to lose telemetry it does read.
            sub = bus.subscriber(topics_for([], audio=False))
            self.ready.set()
            while not self.stopping:
                self._keep(sub.recv(timeout_ms=50))
            # What was sent before the stop counts too (the services' final heartbeats, sent as
            # ``llvc run`` ends, are among it): with no wait, a final heartbeat still in ZeroMQ's
            # I/O thread was missed in a CI run, so wait a little for each straggler.
            while self._keep(sub.recv(timeout_ms=DRAIN_WAIT_MS)):
                pass

    def _keep(self, msg: Record | None) -> bool:
        if msg is None:
            return False
        with self.lock:
            self.messages.append((time.monotonic_ns(), msg))
        return True

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)

    def select(self, kind: type[Record] = Record, service: str | None = None,
               since_ns: int = 0) -> list[tuple[int, Record]]:
        """``(t_ns, record)`` received at or after ``since_ns``: records of ``kind`` (a
        :mod:`common.telemetry` class), from ``service`` if given."""
        with self.lock:
            msgs = list(self.messages)
        return [(t, m) for t, m in msgs if t >= since_ns and isinstance(m, kind)
                and (service is None or m.service == service)]

    def played(self, since_ns: int = 0) -> list[Played]:
        """Every ``chunk.playback`` received since ``since_ns``, in order."""
        return [Played(t, m.stream_id, m.offset, m.e2e_ms, m.pid)
                for t, m in self.select(PlaybackChunk, "playback", since_ns)]

    def events(self, name: str, service: str | None = None, since_ns: int = 0) -> list[tuple[int, Event]]:
        """``(t_ns, event)`` for every event called ``name`` (an ``EventName``)."""
        return [(t, m) for t, m in self.select(Event, service, since_ns) if m.name == name]

    def last_heartbeat(self, service: str) -> Heartbeat | None:
        """The newest heartbeat of ``service``."""
        beats = self.select(Heartbeat, service)
        return beats[-1][1] if beats else None

    def counters(self, service: str) -> dict:
        """The latest heartbeat counters of ``service`` (its current process)."""
        beat = self.last_heartbeat(service)
        return dict(beat.counters) if beat else {}


def e2e_stats(played: list[Played]) -> dict[str, float | None]:
    """Median, p99 and count of e2e latency over ``played``."""
    if not played:
        return {"n": 0, "p50": None, "p99": None}
    e = np.array([p.e2e_ms for p in played])
    return {"n": len(e), "p50": float(np.median(e)), "p99": float(np.percentile(e, 99))}


def final_counters(log: Path) -> dict[int, dict[str, int]]:
    """pid → the counters each process of a service logged as it stopped (its ``final
    counters`` line, :func:`services.base.run_service`), read from the service's log file."""
    out: dict[int, dict[str, int]] = {}
    for m in re.finditer(r" final counters pid=(\d+) counters=(\S*)", log.read_text(errors="replace")):
        out[int(m[1])] = {k: int(v) for k, v in (kv.split(":") for kv in m[2].split(",") if kv)}
    return out


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
    def start(self) -> RunningPipeline:
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

    def __enter__(self) -> RunningPipeline:
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

    def supervisorctl_popen(self, *args: str) -> subprocess.Popen:
        """Start the real ``supervisorctl`` against this run's supervisord (output on its stdout)."""
        env = {**self.env, "LLVC_RUN_DIR": str(self.run_dir)}
        return subprocess.Popen([*self.wrapper, str(SUPERVISORCTL), "-c", str(REPO / "supervisord.conf"), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def supervisorctl(self, *args: str) -> tuple[int, str]:
        """Run the real ``supervisorctl``; its exit status and output."""
        ctl = self.supervisorctl_popen(*args)
        out, _ = ctl.communicate(timeout=60)
        return ctl.returncode, out

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


# --------------------------------------------------------------------------- restart faults
def _window(played: list[Played], start_ns: int, end_ns: int) -> list[Played]:
    return [p for p in played if start_ns <= p.t_ns < end_ns]


def longest_silence_ms(played: list[Played], start_ns: int, end_ns: int, chunk_ms: float) -> float:
    """The longest stretch in ``[start_ns, end_ns)`` with no chunk starting to play, beyond one chunk."""
    times = [start_ns] + [p.t_ns for p in _window(played, start_ns, end_ns)] + [end_ns]
    return max(0.0, max(b - a for a, b in zip(times, times[1:])) / 1e6 - chunk_ms)


def missing_chunks(played: list[Played], start_ns: int, end_ns: int, chunk_len: int) -> int:
    """Chunks of a stream that were never played between two that were, in ``[start_ns, end_ns)``."""
    last: dict[str, int] = {}
    missing = 0
    for x in _window(played, start_ns, end_ns):
        if x.stream_id in last:
            missing += max(0, (x.offset - last[x.stream_id]) // chunk_len - 1)
        last[x.stream_id] = x.offset
    return missing


def _restart_and_time_the_stop(p: RunningPipeline, service: str, pid: int) -> tuple[int, int]:
    """``supervisorctl restart`` (stop, then start and wait ``startsecs``); returns when it was
    asked for and when the old process was gone, which is when the service stopped working (a
    graceful stop finishes what it was doing first)."""
    asked = time.monotonic_ns()
    ctl = p.supervisorctl_popen("restart", service)
    gone = None
    while gone is None and ctl.poll() is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            gone = time.monotonic_ns()
        time.sleep(0.002)
    out, _ = ctl.communicate(timeout=60)
    assert ctl.returncode == 0 and gone is not None, out
    return asked, gone


def restart_fault(p: RunningPipeline, service: str, how: str, chunk_ms: float, settle_s: float = 2.0,
                  timeout: float = 30) -> dict:
    """Kill (``how="kill"``: SIGKILL) or ``supervisorctl restart`` one service of a streaming pipeline.

    Returns what a reliability table needs: recovery time (from the fault, i.e. the kill or
    the moment the old process was gone, to the first chunk
    played whose audio was captured after it; for the monitor, to its new process's first
    heartbeat), the longest pause between chunks starting to play around the fault (as seen
    on the bus, so it includes telemetry delays), chunks of a stream never played, e2e before and after recovery,
    whether audio from before the fault was played after recovery (a stale backlog), when
    the "after" window began (the first from 1 s after recovery in which audio flows), and the
    PIDs of every service before and after, and when the fault was asked for (a restart's
    stop begins then: a graceful stop takes a while, a loaded machine's longer).
    """
    obs = p.observer
    pids_before = p.pids()
    t = time.monotonic_ns()
    before = e2e_stats(_window(obs.played(), t - int(settle_s * 1e9), t))
    if how == "kill":
        t = asked = p.kill(service)
    else:
        asked, t = _restart_and_time_the_stop(p, service, pids_before[service])
    deadline = time.monotonic() + timeout
    if service == "monitor":
        back = None
        while back is None and time.monotonic() < deadline:
            beats = [tb for tb, m in obs.select(Heartbeat, "monitor", t) if m.pid != pids_before["monitor"]]
            back = beats[0] if beats else None
            time.sleep(0.02)
        assert back is not None, f"monitor did not come back within {timeout} s"
    else:
        back = p.first_good_chunk(t, timeout).t_ns
    # "after" is the first settle_s window, from 1 s after recovery, in which audio flows again
    # (half its chunks or more): a service restarted on a loaded machine runs slow for its
    # first seconds (one CI run: 31 chunks of 154 in the first window after inference's
    # 3 s restart). Whether it flows at all, and how soon, is the caller's to judge.
    window_ns, start = int(settle_s * 1e9), back + 1_000_000_000
    flowing = 0.5 * settle_s * 1000 / chunk_ms
    while True:
        time.sleep(max(0.0, (start + window_ns - time.monotonic_ns()) / 1e9))
        played = obs.played(t - 1_000_000_000)
        after = e2e_stats(_window(played, start, start + window_ns))
        if after["n"] >= flowing or time.monotonic() > deadline:
            break
        start += window_ns // 4
    return {
        "service": service, "fault": "kill -9" if how == "kill" else "supervisorctl restart",
        "recovery_ms": (back - t) / 1e6,
        "silence_ms": longest_silence_ms(played, t - 500_000_000, back + 500_000_000, chunk_ms),
        "missing_chunks": missing_chunks(played, t - 500_000_000, back + 500_000_000, round(chunk_ms * 16)),
        "before": before, "after": after,
        "stale_replayed": sum(1 for x in played if x.t_ns > back and x.t_capture_ns < t),
        "pids_before": pids_before, "pids_after": p.pids(), "t_fault_ns": t, "t_back_ns": back,
        "t_asked_ns": asked, "after_from_ms": (start - back) / 1e6,
    }
