"""``llvc monitor``: watch the pipeline's telemetry; status lines, Prometheus ``/metrics``, a report.

The monitor subscribes to every service's telemetry (all types but ``audio.``), reads it as
typed records (:mod:`common.telemetry`) and keeps:

* **Latency and throughput** (:mod:`.ingest`), over the whole run and over the last
  ``window_s`` seconds (:mod:`services.stats`): end-to-end latency from ``chunk.playback``
  ``e2e_ms``; inference time from ``chunk.inference`` ``proc_ms``; the inference queue
  (``queue_chunks``) and the playback buffer (``fill_ms``); ``chunks`` = number of
  ``chunk.playback`` records. RTF (real-time factor, > 1 = faster than real time) = chunk
  duration / mean ``proc_ms``, the chunk duration being ``chunk_ms`` of inference's heartbeat
  status. A ratio of means rather than a mean of per-chunk ratios, which fast chunks would
  inflate. Until that heartbeat arrives the mean of the per-chunk ``rtf`` stands in. End-to-end
  latency and inference time are also counted in fixed buckets over the whole run, for the
  Prometheus histograms ``llvc_e2e_latency_seconds`` and ``llvc_inference_seconds``.
* **Counters** from heartbeats, summed over every process of a service
  (:class:`services.stats.CounterLedger`): ``underruns`` (playback), ``resets`` (inference),
  ``rejected`` per service, and every ``dropped_<cause>`` as ``dropped[cause]``. A restarted
  service never double counts nor loses the old process's counts; a restarted monitor starts
  from zero.
* **Per client session** (``Stats.sessions``, at most ``ingest.MAX_SESSIONS`` names): chunks
  played and whole-run e2e quantiles from the ``session`` of ``chunk.playback``, underruns and
  drops of the playback that plays it, and inference's counters for it; and inference's batch
  sizes (``/metrics``: ``llvc_session_*{session}`` and ``llvc_inference_batches{size}``).
* **Event counts** per ``<service>.<event>``, names this version does not know included.
* **Model info** from inference's heartbeat status.
* **Liveness** per service (:mod:`.health`) from heartbeats (time of arrival on the monitor's
  clock): stale after ``stale_heartbeats`` missed ``bus.heartbeat_interval_s`` periods (plus half
  a period of slack for jitter) → event ``service_stale``; its next heartbeat → ``service_back
  {service, pid, restarted}``. A new process seen before the old one went stale →
  ``service_restarted {service, pid, restarts}``. One instance per service name is assumed.
* **Overload** (:class:`services.stats.OverloadWatch`), judged every second: inference's mean
  step time above the chunk duration, or inference dropping backlog, → event ``overloaded
  {reason}``, a warning, ``OVERLOADED`` at the head of the status line, gauge
  ``llvc_overloaded``; the first second without either (and with steps running) →
  ``overload_cleared {duration_s}``. The report's ``overload`` has episodes and seconds.
* **Sound device flags**: PortAudio's input overflows (capture's ``input_overflows``) and
  output underflows (playback's ``device_underflows``). When a total rises → event
  ``input_overflow`` / ``output_underflow {service, new, total}``, a warning, and counter
  ``llvc_device_flags{flag}``; the report's ``device_flags`` has each flag's total and events.

Every ``status_interval_s`` one line (rolling window, :mod:`.report`) is logged and published as
``event.monitor {"event": "status", "line"}``; ``inf`` there is the p50 of ``proc_ms``. Once
more than one client session has been seen, the line ends with each one's whole-run e2e p50/p99
and underruns (:func:`.report.sessions_part`).
Prometheus metrics (:mod:`.metrics`) are served on ``metrics_host:metrics_port`` unless the port
is 0: the rolling figures as gauges with a ``quantile`` label, the counters, and the two whole-run
histograms, whose ``histogram_quantile()`` aggregates across hosts and time;
``config/grafana-llvc.json`` is a Grafana dashboard of them. On shutdown the JSON report
(whole-run figures, :meth:`MonitorService.report`) is written atomically to ``report`` if set.
The monitor's own telemetry (its heartbeats and events) is ignored by process,
``(service, host, pid)``.

**Threads.** Only the loop thread touches the monitor's state. It publishes an immutable
:class:`~.report.Snapshot` (figures, states, the report) every
:data:`SNAPSHOT_INTERVAL_S`, with every status line, and before it publishes any event, so a
subscriber that saw an event finds it in the report. The ``/metrics`` thread and callers of
:meth:`MonitorService.report` read only that snapshot; there is no lock.

Nothing from the wire can stop it: malformed envelopes and records that do not fit their schema
(:func:`common.telemetry.decode`) are rejected by the subscriber, counted as the monitor's
``rejected`` and reported like every service's rejects (``Service.watch_rejects``). An exception
while handling a valid record is a bug: counted as ``handle_errors`` and logged once per status
line.
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.config import PipelineConfigError
from common.settings import at_least, non_negative, positive, setting
from common.tap import topics_for
from common.telemetry import Counter, MonitorStatus, Record, Status
from services.base import ModelSettings, Service, add_service_arguments, service_main

from .health import DeviceFlags, Liveness, Note, Overload
from .ingest import Stats
from .metrics import MetricsError, start_metrics, stop_metrics
from .report import Snapshot, status_line, take_snapshot, write_report

__all__ = ["MonitorService", "MonitorSettings", "MetricsError", "add_arguments", "run"]

MAX_BATCH = 5000             # records handled per loop_once, so a flood cannot hold the loop
RECEIVE_WAIT_MS = 50         # wait this long for the first record of a turn
RECEIVE_BUDGET_S = 0.05      # then take what is waiting for at most this long
#: The snapshot other threads read is at most this old (plus one loop turn).
SNAPSHOT_INTERVAL_S = 0.2
#: At teardown: take in records until none has come for this long (or see ``_drain``) ...
DRAIN_QUIET_MS = 100
#: ... for at most this long in all (supervisord's stopwaitsecs for the monitor is 5 s).
DRAIN_LIMIT_S = 3.0


@dataclass(frozen=True)
class MonitorSettings:
    """The ``[monitor]`` table (config/pipeline.toml documents each key)."""

    status_interval_s: float = setting(2.0, positive)
    window_s: float = setting(10.0, positive)
    stale_heartbeats: int = setting(3, at_least(1))
    metrics_host: str = setting("127.0.0.1", lambda v: None if v else "must not be empty")
    metrics_port: int = setting(9108, lambda v: non_negative(v) or (None if v <= 65535 else "must be <= 65535"))
    report: str = setting("")


class MonitorService(Service):
    """Subscribes to all telemetry and turns it into status lines, metrics and a report."""

    name = "monitor"

    def __init__(self, cfg, args: argparse.Namespace | None = None):
        super().__init__(cfg, args)
        self.settings: MonitorSettings | None = None
        self.stats: Stats | None = None
        self.snapshot: Snapshot | None = None  # replaced whole by the loop thread, read by any
        self.status_line = ""
        self.last_handle_error = ""
        self._sub = None
        self._http = None
        self._me = (self.name, socket.gethostname(), os.getpid())

    # ------------------------------------------------------------------ lifetime
    def setup(self) -> None:
        """Validate settings, start /metrics (if on), subscribe to all telemetry."""
        flags = {k: getattr(self.args, k, None) for k in ("report", "metrics_port")}
        s = self.settings = self.cfg.settings("monitor", MonitorSettings, flags)
        if s.report and not Path(s.report).resolve().parent.is_dir():
            where = "command line" if flags["report"] is not None else self.cfg.origin("monitor", "report")
            raise PipelineConfigError(f"{where}: monitor.report: directory of {s.report!r} does not exist")
        now = time.monotonic()
        self.stats = Stats(s.window_s)
        self.liveness = Liveness(s.stale_heartbeats, self.cfg.bus.heartbeat_interval_s)
        self.overload = Overload()
        self.device_flags = DeviceFlags()
        self._t0 = now
        self._started_wall = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        self._default_kind = self.cfg.services.get("model", {}).get("kind", ModelSettings.kind)
        self._next_status = now + s.status_interval_s
        self._next_snapshot = now
        self._logged_errors = 0
        self._take_snapshot(now)  # report() and /metrics work from the start
        if s.metrics_port:
            self._http = start_metrics(s.metrics_host, s.metrics_port, lambda: self.snapshot)
            self.log("info", "metrics served", url=f"http://{s.metrics_host}:{s.metrics_port}/metrics")
        self.open_bus()
        self._sub = self.bus.subscriber(topics_for([], audio=False))
        self.watch_rejects(self._sub)
        self.ready = True

    def teardown(self) -> None:
        """Take in what was sent before the stop (:meth:`_drain`), write a fresh report (if set
        and the monitor ran), stop /metrics, close the bus."""
        if self._sub is not None:
            # Stopped last (llvc run's order), the monitor still has the others' final heartbeats
            # to take in, and on a busy machine (it runs at nice 10) possibly seconds of telemetry
            # before them: all of it belongs in the report, not only what a fixed budget allows.
            self._drain(time.time_ns())
            self._take_snapshot(time.monotonic())
            if self.settings.report:
                write_report(Path(self.settings.report), self.snapshot.report, self.log)
        if self._http is not None:
            stop_metrics(self._http)
            self._http = None
        self._sub = None
        self.close_bus()

    def _drain(self, stop_wall_ns: int) -> None:
        """Take in every record sent before ``stop_wall_ns``: until nothing has come for
        :data:`DRAIN_QUIET_MS` (the rest of the pipeline has stopped), or, when something still
        publishes (the monitor stopped alone), until a record it sent after the stop has come
        and the queue is empty; at most :data:`DRAIN_LIMIT_S`."""
        end = time.monotonic() + DRAIN_LIMIT_S
        caught_up = False
        while time.monotonic() < end:
            batch = self._receive(0 if caught_up else DRAIN_QUIET_MS, RECEIVE_BUDGET_S)
            if not batch:
                return
            now = time.monotonic()
            for record in batch:
                caught_up = caught_up or (record.origin is not None and record.origin.t_wall_ns >= stop_wall_ns)
                if (record.service, record.host, record.pid) != self._me:
                    try:
                        self._handle(record, now)
                    except Exception:  # noqa: BLE001 - a bug shows in the counters; write the report
                        self.count("handle_errors")

    # ------------------------------------------------------------------ loop
    def loop_once(self) -> None:
        """Handle what arrived (waiting up to 50 ms), then liveness, overload, device flags and
        the status line; refresh the snapshot; publish and log what changed."""
        batch = self._receive(RECEIVE_WAIT_MS, RECEIVE_BUDGET_S)
        now = time.monotonic()
        notes: list[Note] = []
        for record in batch:
            if (record.service, record.host, record.pid) == self._me:
                continue  # our own heartbeats and events
            try:
                notes += self._handle(record, now)
            except Exception as exc:  # noqa: BLE001 - one odd record must not cost the batch
                self.count("handle_errors")
                self.last_handle_error = f"{record.topic}: {exc!r}"
        self.count("messages", len(batch))
        stats = self.stats
        notes += self.liveness.check(now)
        notes += self.overload.check(now, stats.chunk_ms, stats.total(Counter.DROPPED_INFERENCE_BACKLOG))
        notes += self.device_flags.check(stats.ledger)
        window = sessions = None
        if now >= self._next_status:
            self._next_status = now + self.settings.status_interval_s
            window, sessions = stats.figures(now, whole=False), stats.sessions()
            self.status_line = status_line(window, self.overload.overloaded, stats.totals(),
                                           sum(stats.dropped().values()), self.liveness.states(), sessions)
        # Before anything is published: whoever sees an event finds it in the report.
        if notes or window is not None or now >= self._next_snapshot:
            self._take_snapshot(now, window, sessions)
        for note in notes:
            self.log(note.level, note.message, **note.fields)
            if note.event is not None:
                self.publish(note.event)
        if window is not None:
            self._emit_status()

    def _handle(self, record: Record, now: float) -> list[Note]:
        """One record from another process: into the statistics and the health watchers."""
        self.stats.add(record, now)
        self.overload.add(record)
        return self.liveness.add(record, now)

    def _receive(self, timeout_ms: int, budget_s: float) -> list[Record]:
        """Wait up to ``timeout_ms`` for telemetry, then take what is waiting for up to ``budget_s``."""
        sub, out = self._sub, []
        deadline = None
        for _ in range(MAX_BATCH):
            seen = sub.received + sub.rejected
            record = sub.recv(timeout_ms)
            timeout_ms = 0
            if record is not None:
                out.append(record)
            elif sub.received + sub.rejected == seen:
                break  # nothing waiting (a rejected message also returns None, but is counted)
            now = time.monotonic()
            deadline = deadline or now + budget_s
            if now >= deadline:
                break
        return out

    def _emit_status(self) -> None:
        self.log("info", self.status_line)
        self.publish(Status(self.status_line))
        errors = self.counters.get("handle_errors", 0)
        if errors > self._logged_errors:  # a bug here, not bad input: say so, once per status line
            self.log("error", "telemetry handling failed", count=errors - self._logged_errors,
                     last=self.last_handle_error)
            self._logged_errors = errors

    def _take_snapshot(self, now: float, window: dict[str, Any] | None = None,
                       sessions: dict[str, dict[str, Any]] | None = None) -> None:
        """Build and publish (one reference assignment) a new :class:`~.report.Snapshot`."""
        self._next_snapshot = now + SNAPSHOT_INTERVAL_S
        own_rejected = self._sub.rejected if self._sub is not None else 0
        self.snapshot = take_snapshot(now, self.stats, self.liveness, self.overload, self.device_flags,
                                      own=(self.name, own_rejected), default_kind=self._default_kind,
                                      status=self.status_line, t0=self._t0, started_wall=self._started_wall,
                                      window=window, sessions=sessions)

    # ------------------------------------------------------------------ outside views
    def status(self) -> MonitorStatus:
        """The heartbeat's status: chunks seen so far."""
        return MonitorStatus(self.stats.chunks if self.stats is not None else 0)

    def report(self) -> dict[str, Any]:
        """The whole-run report (what is written to ``report`` on shutdown), JSON-ready: a copy
        of the latest snapshot's, so any thread may call it. Raises RuntimeError before setup."""
        snap = self.snapshot
        if snap is None:
            raise RuntimeError("the monitor has not been set up")
        return snap.report_copy()


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc monitor``'s flags on ``p``."""
    add_service_arguments(p)
    p.add_argument("--report", metavar="PATH", default=None,
                   help="write the JSON report here on shutdown (monitor.report)")
    p.add_argument("--metrics-port", metavar="N", type=int, default=None,
                   help="serve Prometheus /metrics on this port, 0 = off (monitor.metrics_port)")


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc monitor``."""
    return service_main(MonitorService, args)
