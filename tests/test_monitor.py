"""The monitor against real telemetry PUB sockets: figures, counters across restarts, liveness,
status lines, /metrics, the report, malformed input, and the CLI's failure modes."""
from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from bus_helpers import endpoint_overrides, free_port, make_config, stop_process, wait_until
from common.bus import Bus
from common.protocol import Telemetry, encode, make_telemetry
from common.telemetry import (
    SCHEMA_VERSION,
    Heartbeat,
    InferenceChunk,
    InferenceStatus,
    Origin,
    OtherEvent,
    PlaybackChunk,
    PlaybackStatus,
    Record,
    make_message,
)
from services.monitor import MonitorService
from services.monitor.ingest import MAX_EVENT_KINDS, MAX_SESSIONS, Stats
from services.monitor.report import STATUS_SESSIONS, sessions_part
from services.stats import CounterLedger, LogHistogram, OverloadWatch

LLVC = Path(sys.executable).parent / "llvc"
REPORT_KEYS = {"chunks", "e2e_latency_ms", "underruns", "dropped", "resets", "inference_ms", "rtf",
               "algorithmic_latency_ms", "latency_ms", "model", "queue", "services", "rejected",
               "duration_s", "started_wall"}


class Monitor:
    """A MonitorService in a thread (setup; loop_once and flush_reports until stopped; teardown),
    like run_service."""

    def __init__(self, cfg):
        self.svc = MonitorService(cfg)
        self.error: BaseException | None = None
        self._up = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.svc.setup()
            self._up.set()
            while not self.svc.stop_requested:
                self.svc.loop_once()
                self.svc.flush_reports()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc
        finally:
            self._up.set()
            self.svc.teardown()

    def report(self) -> dict:
        if self.error:
            raise self.error
        assert "handle_errors" not in self.svc.counters, self.svc.last_handle_error
        return self.svc.report()  # from the test thread while the loop runs: the latest snapshot

    def __enter__(self) -> Monitor:
        self.thread.start()
        assert self._up.wait(10)
        if self.error:
            raise self.error
        assert self.svc.ready
        return self

    def __exit__(self, *exc):
        self.svc.request_stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.error and not exc[0]:
            raise self.error


class Fake:
    """A fake service: its real telemetry PUB, publishing typed records under chosen pids."""

    def __init__(self, cfg, service: str):
        self.service = service
        self.bus = Bus(cfg, service)
        self.pub = self.bus.publisher()

    def publish(self, record: Record, pid: int = 4242) -> None:
        assert self.pub.publish_message(replace(make_message(self.service, record), pid=pid))

    def heartbeat(self, pid: int, counters: dict | None = None, uptime_s: float = 1.0, status=None) -> None:
        self.publish(Heartbeat(True, uptime_s, counters or {}, status), pid)

    def connect(self, mon: Monitor) -> None:
        """Publish an event until the monitor counts it: past ZeroMQ's slow-joiner window. The
        event is one this version does not know (an OtherEvent): those are counted by name too."""
        def seen():
            self.publish(OtherEvent("hello", {"n": 1}))
            return mon.report()["events"].get(f"{self.service}.hello", 0) > 0
        assert wait_until(seen, timeout=10, interval=0.05), f"monitor never heard {self.service}"

    def close(self):
        self.bus.close()


def inference_status(**geometry) -> InferenceStatus:
    """Inference's heartbeat status for a fake model (``geometry``: chunk_len, chunk_ms, ...)."""
    return InferenceStatus("onnx", "llvc-test", True, "llvc", "cpu", 1, "s", **geometry)


def wire(record: Record) -> dict:
    """A record's ``data`` as it goes on the wire, without the schema version."""
    data = record.to_data()
    del data["schema"]
    return data


@pytest.fixture
def fakes():
    made = []

    def make(cfg, *services):
        out = [Fake(cfg, s) for s in services]
        made.extend(out)
        return out

    yield make
    for f in made:
        f.close()


def listener(cfg, topic: str = "event.monitor"):
    """A SUB on the monitor's own telemetry (what a dashboard would see)."""
    bus = Bus(cfg, "tap")
    return bus, bus.subscriber([topic], endpoints=["telemetry_monitor"])


def wait_event(sub, pred, timeout: float = 10.0):
    """The first record from ``sub`` for which ``pred(record)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = sub.recv(timeout_ms=100)
        if record is not None and pred(record):
            return record
    raise AssertionError("event not seen")


E2E = list(range(1, 101))   # 1..100 ms: numpy's linear p50 50.5, p95 95.05, p99 99.01
PROC = list(range(1, 11))   # 1..10 ms: mean 5.5, so rtf = 13 ms / 5.5 ms


def publish_run(mon: Monitor, inference: Fake, playback: Fake) -> None:
    """A known little run: model heartbeat, 10 inference chunks, 100 played chunks, some counters."""
    inference.connect(mon)
    playback.connect(mon)
    inference.heartbeat(500, {"resets": 1}, status=inference_status(
        chunk_len=208, chunk_ms=13.0, algorithmic_latency_ms=14.0, latency_ms=17.5))
    for i, ms in enumerate(PROC):
        inference.publish(InferenceChunk("s", i, 16 + 208 * i, float(ms), 13.0 / ms, float(i), i == 0), 500)
    shuffled = E2E[:]
    random.Random(1).shuffle(shuffled)
    for i, ms in enumerate(shuffled):
        playback.publish(PlaybackChunk("s", i, 16 + 208 * i, float(ms), 4.0), 600)
    playback.heartbeat(600, {"underruns": 2, "dropped_late": 3, "rejected": 0})
    assert wait_until(lambda: mon.report()["chunks"] == 100 and mon.report()["underruns"] == 2, timeout=10)


# ------------------------------------------------------------------------------ pure stats
def test_log_histogram_matches_numpy_within_its_resolution():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(3.0, 0.3, 20_000), [0.0, 0.0005, 250.0]])
    h = LogHistogram()
    for v in values:
        h.add(float(v))
    qs = [0.0, 0.01, 0.5, 0.95, 0.99, 0.999, 1.0]
    for q, got, want in zip(qs, h.quantiles(qs), np.quantile(values, qs)):
        assert got == pytest.approx(want, rel=6e-4, abs=1e-3), q
    assert h.max == 250.0 and h.min == 0.0 and h.mean == pytest.approx(values.mean())
    assert LogHistogram().quantiles([0.5]) == [None]


def test_ledger_sums_processes_and_notices_a_reused_pid():
    ledger = CounterLedger()
    assert ledger.update("playback", "h", 7, {"underruns": 1}, uptime_s=1.0)
    assert not ledger.update("playback", "h", 7, {"underruns": 4}, uptime_s=2.0)
    assert ledger.update("playback", "h", 7, {"underruns": 1}, uptime_s=0.2)   # same pid, new process
    assert ledger.update("playback", "other-host", 7, {"underruns": 10})
    assert ledger.total("underruns") == 4 + 1 + 10


def test_overload_is_judged_per_interval_and_clears_when_steps_keep_up_again():
    w = OverloadWatch(interval_s=1.0)
    assert w.judge(0.0, 13.0, 0) is None                        # first call only sets the baseline
    for _ in range(50):
        w.add_step(9.0)
    assert w.judge(1.0, 13.0, 0) is None and not w.overloaded  # 9 ms steps for 13 ms chunks: fine
    for _ in range(50):
        w.add_step(20.0)
    assert w.judge(1.5, 13.0, 0) is None                        # not yet due
    assert w.judge(2.0, 13.0, 0) == "overloaded" and "20.0 ms > chunk 13.0" in w.last_reason
    assert w.judge(3.0, 13.0, 0) is None and w.overloaded       # no steps at all: not cleared
    w.add_step(8.0)
    assert w.judge(4.0, 13.0, 7) is None and "7 chunks of backlog" in w.last_reason  # keeps up, barely
    w.add_step(5.0)
    assert w.judge(5.0, 13.0, 7) == "cleared" and w.last_duration == pytest.approx(3.0)
    w.add_step(0.1)
    assert w.judge(6.0, 13.0, 60) is None    # fast steps, a burst dropped: the network's doing
    assert w.judge(7.0, None, 69) == "overloaded"               # drops alone, chunk size unknown
    assert w.episodes == 2 and w.total_seconds(8.5) == pytest.approx(3.0 + 1.5)


# ------------------------------------------------------------------------------ service
def test_percentiles_and_report_written_on_teardown(tmp_path, fakes):
    path = tmp_path / "report.json"
    cfg = make_config("tcp", "monitor.metrics_port=0", f"monitor.report={path}")
    inference, playback = fakes(cfg, "inference", "playback")
    with Monitor(cfg) as mon:
        publish_run(mon, inference, playback)
        live = mon.report()
        # The rolling window keeps exact samples: numpy's figures to the digit.
        assert live["window"]["e2e_latency_ms"] == {"p50": 50.5, "p95": 95.05, "p99": 99.01, "max": 100.0}
    assert sorted(os.listdir(tmp_path)) == ["report.json"]  # atomic: no temp file left behind
    report = json.loads(path.read_text())
    assert REPORT_KEYS <= set(report)
    e2e = report["e2e_latency_ms"]  # whole run: log histogram, within 0.05 %
    assert e2e["p50"] == pytest.approx(50.5, abs=0.03)
    assert e2e["p95"] == pytest.approx(95.05, abs=0.05)
    assert e2e["p99"] == pytest.approx(99.01, abs=0.05)
    assert e2e["max"] == 100.0
    assert report["chunks"] == 100
    assert report["inference_ms"]["p50"] == pytest.approx(5.5, abs=0.01)
    assert report["inference_ms"]["p95"] == pytest.approx(9.55, abs=0.01)
    assert report["rtf"] == pytest.approx(13.0 / 5.5, abs=1e-3)
    assert report["queue"]["inference_chunks_p95"] == pytest.approx(8.55, abs=0.01)
    assert report["queue"]["playback_fill_ms_p50"] == 4.0
    assert report["underruns"] == 2 and report["dropped"] == {"late": 3} and report["resets"] == 1
    assert report["algorithmic_latency_ms"] == 14.0 and report["latency_ms"] == 17.5
    assert report["model"] == {"id": "llvc-test", "untrained": True, "kind": "llvc", "device": "cpu",
                               "backend": "onnx", "chunk_len": 208, "chunk_ms": 13.0}
    assert report["services"]["inference"]["up"] and report["services"]["inference"]["pids"] == [500]
    assert report["services"]["capture"] == {"up": False, "ready": False, "state": "unseen", "restarts": 0,
                                             "last_seen_s_ago": None, "pids": []}
    assert report["rejected"] == {"inference": 0, "playback": 0, "monitor": 0}
    assert report["duration_s"] > 0 and re.match(r"\d{4}-\d\d-\d\dT", report["started_wall"])


def test_counters_summed_across_restarts_without_double_counting(fakes):
    cfg = make_config("tcp", "monitor.metrics_port=0")
    capture, inference, playback = fakes(cfg, "capture", "inference", "playback")
    with Monitor(cfg) as mon:
        for f in (capture, inference, playback):
            f.connect(mon)
        # One process sends growing cumulative counters: only its latest figures count.
        for uptime, (backlog, resets, rejected) in enumerate([(1, 1, 0), (3, 2, 1), (5, 2, 2)], 1):
            inference.heartbeat(1001, {"dropped_inference_backlog": backlog, "resets": resets,
                                       "rejected": rejected}, uptime_s=float(uptime))
        # Restarted (new pid): counts from zero again; the old process's counts are kept.
        for _ in range(3):
            inference.heartbeat(1002, {"dropped_inference_backlog": 2, "resets": 1, "rejected": 1}, uptime_s=0.5)
        capture.heartbeat(2001, {"dropped_capture_send": 4})
        playback.heartbeat(3001, {"underruns": 3, "dropped_late": 2, "dropped_overflow": 1})
        want = {"capture_send": 4, "inference_backlog": 7, "late": 2, "overflow": 1}
        assert wait_until(lambda: mon.report()["dropped"] == want and mon.report()["underruns"] == 3, timeout=10), \
            mon.report()["dropped"]
        report = mon.report()
    assert report["resets"] == 3
    assert report["rejected"]["inference"] == 3
    assert report["services"]["inference"]["restarts"] == 1
    assert report["services"]["inference"]["pids"] == [1001, 1002]
    assert report["services"]["capture"]["restarts"] == 0


def test_device_overflows_and_underflows_become_events_and_report_totals(fakes):
    cfg = make_config("tcp", "monitor.metrics_port=0", "monitor.status_interval_s=0.2")
    capture, playback = fakes(cfg, "capture", "playback")
    lbus, events = listener(cfg)
    try:
        with Monitor(cfg) as mon:
            wait_event(events, lambda r: r.name == "status")  # the listener is connected
            capture.connect(mon)
            playback.connect(mon)
            capture.heartbeat(71, {"input_overflows": 0}, uptime_s=1.0)
            playback.heartbeat(72, {"device_underflows": 0}, uptime_s=1.0)
            capture.heartbeat(71, {"input_overflows": 2}, uptime_s=2.0)
            over = wire(wait_event(events, lambda r: r.name == "input_overflow"))
            assert over == {"event": "input_overflow", "service": "capture", "new": 2, "total": 2}
            playback.heartbeat(72, {"device_underflows": 1}, uptime_s=2.0)
            under = wire(wait_event(events, lambda r: r.name == "output_underflow"))
            assert under == {"event": "output_underflow", "service": "playback", "new": 1, "total": 1}
            # Repeated heartbeats with the same counts are no new event; a rise is; a restarted
            # capture (new pid, counting from 0) adds to the total.
            capture.heartbeat(71, {"input_overflows": 2}, uptime_s=3.0)
            capture.heartbeat(73, {"input_overflows": 1}, uptime_s=0.5)
            over = wire(wait_event(events, lambda r: r.name == "input_overflow"))
            assert (over["new"], over["total"]) == (1, 3)
            report = mon.report()
    finally:
        lbus.close()
    assert report["device_flags"] == {"input_overflow": {"total": 3, "events": 2},
                                      "output_underflow": {"total": 1, "events": 1}}


def test_stale_after_missed_heartbeats_then_back(fakes):
    cfg = make_config("tcp", "monitor.metrics_port=0", "bus.heartbeat_interval_s=0.2")
    (capture,) = fakes(cfg, "capture")
    lbus, events = listener(cfg)
    try:
        with Monitor(cfg) as mon:
            capture.connect(mon)
            for _ in range(5):
                capture.heartbeat(4001)
                time.sleep(0.1)
            last = time.monotonic()
            assert mon.report()["services"]["capture"]["up"]
            stale = wire(wait_event(events, lambda r: r.name == "service_stale"))
            waited = time.monotonic() - last
            assert stale["service"] == "capture" and stale["pid"] == 4001 and stale["last_seen_s_ago"] >= 0.7
            assert 0.5 <= waited <= 4.0  # 3 missed 0.2 s heartbeats (+ half a period of slack)
            assert mon.report()["services"]["capture"]["state"] == "stale"
            assert mon.report()["services"]["capture"]["up"] is False

            capture.heartbeat(4002, uptime_s=0.1)  # supervisord restarted it
            back = wire(wait_event(events, lambda r: r.name == "service_back"))
            assert back == {"event": "service_back", "service": "capture", "pid": 4002, "restarted": True}
            # Stale again and back with the same process: not a restart.
            wait_event(events, lambda r: r.name == "service_stale")
            capture.heartbeat(4002, uptime_s=3.0)
            back = wire(wait_event(events, lambda r: r.name == "service_back"))
            assert back == {"event": "service_back", "service": "capture", "pid": 4002, "restarted": False}
            svc = mon.report()["services"]["capture"]
            assert svc["up"] and svc["restarts"] == 1 and svc["pids"] == [4001, 4002]
    finally:
        lbus.close()


def test_status_line_published_as_event(fakes):
    cfg = make_config("tcp", "monitor.metrics_port=0", "monitor.status_interval_s=0.2")
    inference, playback = fakes(cfg, "inference", "playback")
    lbus, events = listener(cfg)
    try:
        with Monitor(cfg) as mon:
            first = wait_event(events, lambda r: r.name == "status").line
            assert first.startswith("e2e p50 — p99 — ms | inf — ms rtf — | underruns 0 drops 0 resets 0 |")
            assert first.endswith("capture — inference — playback —")
            inference.connect(mon)
            playback.connect(mon)
            inference.heartbeat(11, {"resets": 1}, status=inference_status(chunk_len=208, chunk_ms=13.0))
            inference.publish(InferenceChunk("s", 0, 16, 4.0, 3.25, 0.0, False), 11)
            for i, ms in enumerate((10.0, 20.0, 30.0)):
                playback.publish(PlaybackChunk("s", i, 16 + 208 * i, ms, 4.0), 12)
            playback.heartbeat(12, {"underruns": 1, "dropped_late": 2})
            line = wait_event(events, lambda r: r.name == "status" and "p50 20.0" in r.line
                              and "underruns 1" in r.line).line
    finally:
        lbus.close()
    assert line == ("e2e p50 20.0 p99 29.8 ms | inf 4.0 ms rtf 3.2 | underruns 1 drops 2 resets 1 | "
                    "capture — inference ok playback ok")


def test_metrics_served_from_a_private_registry(fakes):
    port = free_port()
    cfg = make_config("tcp", f"monitor.metrics_port={port}")
    inference, playback = fakes(cfg, "inference", "playback")
    with Monitor(cfg) as mon:
        publish_run(mon, inference, playback)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("llvc_e2e_latency_ms", (("quantile", "0.5"),))] == 50.5
    assert samples[("llvc_e2e_latency_ms", (("quantile", "0.99"),))] == pytest.approx(99.01)
    assert samples[("llvc_e2e_latency_ms", (("quantile", "1"),))] == 100.0
    assert samples[("llvc_chunks_total", ())] == 100
    assert samples[("llvc_underruns_total", ())] == 2
    assert samples[("llvc_resets_total", ())] == 1
    assert samples[("llvc_dropped_total", (("cause", "late"),))] == 3
    assert samples[("llvc_service_up", (("service", "playback"),))] == 1
    assert samples[("llvc_service_up", (("service", "capture"),))] == 0
    assert samples[("llvc_inference_rtf", ())] == pytest.approx(13.0 / 5.5)
    assert samples[("llvc_model_algorithmic_latency_ms", ())] == 14.0
    assert samples[("llvc_device_flags_total", (("flag", "output_underflow"),))] == 0
    assert not any(name.startswith(("python_", "process_")) for name, _ in samples)  # not the global registry


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The monitor's /metrics over HTTP, parsed: ``{(sample name, sorted labels): value}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_each_session_has_its_own_metrics_and_status_line_part(fakes):
    port = free_port()
    cfg = make_config("tcp", f"monitor.metrics_port={port}", "monitor.status_interval_s=0.2")
    inference, playback = fakes(cfg, "inference", "playback")
    lbus, events = listener(cfg)
    try:
        with Monitor(cfg) as mon:
            inference.connect(mon)
            playback.connect(mon)
            # One session (alice's playback, pid 601): the status line is as it always was.
            for i, ms in enumerate((10.0, 20.0, 30.0)):
                playback.publish(PlaybackChunk("a", i, 16 + 208 * i, ms, 4.0, session="alice"), 601)
            playback.heartbeat(601, {"underruns": 1, "dropped_late": 2},
                               status=PlaybackStatus("null", 6.0, 4.0, "a", session="alice"))
            one = wait_event(events, lambda r: r.name == "status" and "underruns 1" in r.line).line
            assert one.endswith("| capture — inference — playback ok"), one
            # Bob's playback (pid 602), with other latencies and underruns; inference reports
            # its counters for alice, bob and carol, who has no playback here.
            for i, ms in enumerate((40.0, 50.0, 60.0)):
                playback.publish(PlaybackChunk("b", i, 16 + 208 * i, ms, 4.0, session="bob"), 602)
            playback.heartbeat(602, {"underruns": 5, "dropped_overflow": 3},
                               status=PlaybackStatus("null", 6.0, 4.0, "b", session="bob"))
            inference.heartbeat(500, {"resets": 3, "dropped_stale_stream": 1, "dropped_duplicate": 4},
                                status=inference_status(chunk_len=208, chunk_ms=13.0, max_streams=4,
                                                        batch_sizes={"1": 5, "2": 7}, sessions=[
                {"name": "alice", "stream_id": "a", "slot": 0, "counters": {"resets": 2, "dropped_stale_stream": 1}},
                {"name": "bob", "stream_id": "b", "slot": 1, "counters": {"resets": 0, "dropped_duplicate": 4}},
                {"name": "carol", "stream_id": "c", "slot": 2, "counters": {"resets": 1, "odd": "x"}}]))
            line = wait_event(events, lambda r: r.name == "status" and "sessions 3" in r.line
                              and "u5" in r.line).line
            samples = scrape(port)
    finally:
        lbus.close()
    # Whole run per session (a log histogram, within 0.05 %): alice p50 20, p99 29.8; bob 50, 59.8.
    # Worst first: bob has the most underruns; carol, with nothing measured here, last.
    assert line == ("e2e p50 35.0 p99 59.5 ms | inf — ms rtf — | underruns 6 drops 10 resets 3 | "
                    "capture — inference ok playback ok | "
                    "sessions 3: bob 50.0/59.8 ms u5, alice 20.0/29.8 ms u1, carol —/— ms u—")

    def family(name: str) -> dict[tuple, float]:
        return {labels: v for (n, labels), v in samples.items() if n == name}

    assert family("llvc_session_chunks_total") == {(("session", "alice"),): 3, (("session", "bob"),): 3,
                                                   (("session", "carol"),): 0}
    assert family("llvc_session_underruns_total") == {(("session", "alice"),): 1, (("session", "bob"),): 5}
    assert family("llvc_session_resets_total") == {(("session", "alice"),): 2, (("session", "bob"),): 0,
                                                   (("session", "carol"),): 1}
    assert family("llvc_session_dropped_total") == {
        (("cause", "late"), ("session", "alice")): 2, (("cause", "stale_stream"), ("session", "alice")): 1,
        (("cause", "overflow"), ("session", "bob")): 3, (("cause", "duplicate"), ("session", "bob")): 4}
    e2e = {(dict(k)["session"], dict(k)["quantile"]): v for k, v in family("llvc_session_e2e_latency_ms").items()}
    assert set(e2e) == {(s, q) for s in ("alice", "bob") for q in ("0.5", "0.95", "0.99")}  # carol: no data
    for (session, q), want in {("alice", "0.5"): 20.0, ("alice", "0.99"): 29.8, ("bob", "0.5"): 50.0,
                               ("bob", "0.95"): 59.0, ("bob", "0.99"): 59.8}.items():
        assert e2e[session, q] == pytest.approx(want, rel=6e-4), (session, q)
    assert family("llvc_inference_batches_total") == {(("size", "1"),): 5, (("size", "2"),): 7}
    assert samples[("llvc_underruns_total", ())] == 6  # the totals are still all sessions'


def test_sessions_part_names_the_worst_few_then_counts_the_rest():
    sessions = {f"s{i}": {"chunks": 1, "e2e_latency_ms": {"p50": 20.0 + i, "p99": 25.0 + i}, "underruns": 0}
                for i in range(STATUS_SESSIONS + 2)}
    sessions["s0"]["underruns"] = 2
    assert sessions_part(sessions) == ("sessions 6: s0 20.0/25.0 ms u2, s5 25.0/30.0 ms u0, "
                                       "s4 24.0/29.0 ms u0, s3 23.0/28.0 ms u0, +2 more")


def test_sessions_are_bounded_whatever_names_arrive():
    stats = Stats(window_s=10.0)
    for i in range(MAX_SESSIONS):
        stats.add(PlaybackChunk("s", 0, 16, 20.0, 4.0, session=f"p{i}", origin=Origin("playback", "h", 1, 0, 0)), 0.0)
    # One more name from each source: playback's chunks, its heartbeat, inference's list.
    stats.add(PlaybackChunk("s", 1, 16, 20.0, 4.0, session="late", origin=Origin("playback", "h", 1, 0, 0)), 0.0)
    stats.add(Heartbeat(True, 1.0, {"underruns": 1}, PlaybackStatus("null", 6.0, 4.0, "s", session="beat"),
                        origin=Origin("playback", "h", 2, 0, 0)), 0.0)
    stats.add(Heartbeat(True, 1.0, {}, inference_status(sessions=[{"name": "inf", "counters": {}}]),
                        origin=Origin("inference", "h", 3, 0, 0)), 0.0)
    sessions = stats.sessions()
    assert len(sessions) == MAX_SESSIONS and not {"late", "beat", "inf"} & set(sessions)


def test_unknown_event_names_are_counted_but_bounded():
    stats = Stats(window_s=10.0)
    capture = Origin("capture", "h", 1, 0, 0)
    for i in range(MAX_EVENT_KINDS + 10):
        stats.add(OtherEvent(f"e{i}", {}, origin=capture), now=0.0)
    stats.add(OtherEvent("e0", {}, origin=capture), now=0.0)
    assert len(stats.events) == MAX_EVENT_KINDS  # a flood of new names cannot grow it
    assert stats.events["capture.e0"] == 2 and f"capture.e{MAX_EVENT_KINDS}" not in stats.events


#: Messages that are valid on the wire but whose records do not fit their schema, each rejected by
#: typed decoding for the one reason its comment gives: ``(service, type, data)``.
_OK_BEAT = {"ready": True, "uptime_s": 1.0, "counters": {}}
_OK_CHUNK = {"stream_id": "s", "seq": 0, "offset": 16, "e2e_ms": 5.0, "fill_ms": 1.0}
NONSENSE = [
    ("capture", "heartbeat", {**_OK_BEAT, "ready": 1}),                              # ready not a bool
    ("capture", "heartbeat", {**_OK_BEAT, "uptime_s": "x"}),                         # uptime not a number
    ("capture", "heartbeat", {**_OK_BEAT, "counters": "lots"}),                      # counters not a map
    ("capture", "heartbeat", {**_OK_BEAT, "counters": {"dropped_x": -1}}),           # a negative counter
    ("capture", "heartbeat", {**_OK_BEAT, "counters": {"dropped_y": True}}),         # a bool counter
    ("capture", "heartbeat", {**_OK_BEAT, "counters": {"dropped_z": 1.5}}),          # a float counter
    ("inference", "heartbeat", {**_OK_BEAT, "status": {"chunk_len": "208", "model": 3}}),  # status misfit
    *[("playback", "chunk", {**_OK_CHUNK, "e2e_ms": bad}) for bad in ("abc", True, None, [1])],
    ("playback", "chunk", {**_OK_CHUNK, "fill_ms": {}}),                              # fill not a number
    ("capture", "chunk", _OK_CHUNK),                                                  # capture times no chunks
    ("capture", "event", {"event": 5}),                                               # name not a str
    ("capture", "event", {}),                                                         # no name
    ("capture", "event", {"event": "eof", "stream_id": "s"}),                         # eof without source_end
]


def test_malformed_telemetry_is_counted_not_fatal(capfd):
    cfg = make_config("tcp", "monitor.metrics_port=0", "monitor.status_interval_s=0.2")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUB)  # a raw PUB where capture's telemetry should be
    raw.setsockopt(zmq.LINGER, 0)
    raw.bind(cfg.endpoint("telemetry_capture").bind)

    def send(msg: Telemetry) -> None:
        raw.send_multipart([msg.topic.encode(), encode(msg)])

    def send_data(service: str, type_: str, data: dict, schema=SCHEMA_VERSION) -> None:
        send(replace(make_telemetry(service, type_, {"schema": list(schema), **data}), pid=77))

    try:
        with Monitor(cfg) as mon:
            def seen():
                send(replace(make_message("capture", OtherEvent("hello", {})), pid=77))
                return mon.report()["events"].get("capture.hello", 0) > 0
            assert wait_until(seen, timeout=10, interval=0.05)
            good_hb = replace(make_message("capture", Heartbeat(True, 1.0, {})), pid=77)
            malformed = ([b"event.capture"],                                          # one frame
                         [b"event.capture", b"\xc1 not msgpack"],
                         [b"event.capture", msgpack.packb({"kind": "telemetry", "v": [1, 0]})],
                         [b"chunk.playback", encode(good_hb)],                        # topic mismatch
                         [b"event.capture", encode(good_hb), b"extra"])
            for frames in malformed:
                raw.send_multipart(frames)
            for service, type_, data in NONSENSE:
                send_data(service, type_, data)
            send_data("capture", "heartbeat", _OK_BEAT, schema=(SCHEMA_VERSION[0] + 1, 0))  # a later major
            send_data("capture", "heartbeat", {**_OK_BEAT, "schema": None})              # no version
            rejects = len(malformed) + len(NONSENSE) + 2
            # And then real data still counts.
            send(replace(make_message("playback", PlaybackChunk("s", 1, 224, 7.0, 2.0)), pid=77))
            send(replace(make_message("capture", Heartbeat(True, 9.0, {"dropped_capture_send": 2})), pid=77))
            assert wait_until(lambda: mon.report()["dropped"] == {"capture_send": 2}, timeout=10), mon.report()
            report = mon.report()
            assert mon.thread.is_alive()
            assert report["rejected"]["monitor"] == rejects
            assert report["chunks"] == 1 and report["e2e_latency_ms"]["p50"] == 7.0
            assert report["queue"]["playback_fill_ms_p50"] == 2.0
            assert report["model"]["id"] is None
            # Nothing rejected was counted as anything, and the monitor's own events are not
            # counted either (its heartbeats and status lines are on the same bus).
            assert set(report["events"]) == {"capture.hello"}
            assert report["counters"] == {"capture": {"dropped_capture_send": 2}}
            # Rejects are reported like every service's (at most twice a second): the count since
            # the last report, the total and the last reason.
            err = ""

            def logged() -> int:
                nonlocal err
                err += capfd.readouterr().err
                return sum(int(n) for n in re.findall(r"rejected malformed input count=(\d+) total=\d+ reason=\S", err))
            assert wait_until(lambda: logged() == rejects, timeout=10), err
        assert mon.svc.refresh_counters()["rejected"] == rejects  # what its heartbeats say
    finally:
        raw.close()
        ctx.term()


# ------------------------------------------------------------------------------ CLI
def monitor_cmd(*args: str) -> list[str]:
    sets = [a for o in endpoint_overrides("tcp") for a in ("--set", o)]
    return [str(LLVC), "monitor", *sets, *args]


@pytest.mark.parametrize("case", ["busy_port", "unknown_key", "no_report_dir"])
def test_cli_setup_failures_exit_2_with_one_line(case, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    args, expect = {
        "busy_port": (["--set", f"monitor.metrics_port={port}"], f"127.0.0.1:{port}"),
        "unknown_key": (["--set", "monitor.bogus=1"], "monitor.bogus: unknown key"),
        "no_report_dir": (["--metrics-port", "0", "--report", str(tmp_path / "nope" / "r.json")],
                          "monitor.report"),
    }[case]
    try:
        proc = subprocess.run(monitor_cmd(*args), capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot start" in errors[0] and expect in errors[0], proc.stderr


def test_cli_runs_until_sigterm_and_writes_report(tmp_path):
    path = tmp_path / "out.json"
    cmd = monitor_cmd("--metrics-port", "0", "--report", str(path), "--set", "monitor.status_interval_s=0.2")
    connect = next(a.split("=", 1)[1] for a in cmd if a.startswith("endpoints.telemetry_monitor.connect="))
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"event.monitor")
    sub.connect(connect)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sub.poll(30_000), "no status line from llvc monitor"
    finally:
        err, _ = stop_process(proc, timeout=30)
        sub.close()
        ctx.term()
    assert proc.returncode == 0, err
    report = json.loads(path.read_text())
    assert REPORT_KEYS <= set(report)
    assert report["chunks"] == 0 and report["rtf"] is None
    assert report["model"] == {"id": None, "untrained": None, "kind": "llvc", "device": None, "backend": None,
                               "chunk_len": None, "chunk_ms": None}  # the config's kind until inference says
    assert report["e2e_latency_ms"] == {"p50": None, "p95": None, "p99": None, "max": None}
    assert report["duration_s"] > 0
    assert "report written" in err
