"""``llvc monitor``: watch the pipeline's telemetry; status lines, Prometheus ``/metrics``, a report.

The monitor subscribes to every service's telemetry (all types but ``audio.``) and keeps:

* **Latency and throughput**, over the whole run and over the last ``window_s`` seconds
  (:mod:`services.stats`): end-to-end latency from ``chunk.playback`` ``e2e_ms``; inference
  time from ``chunk.inference`` ``proc_ms``; the inference queue (``queue_chunks``) and the
  playback buffer (``fill_ms``); ``chunks`` = number of ``chunk.playback`` messages.
  RTF (real-time factor, > 1 = faster than real time) = chunk duration / mean ``proc_ms``, the
  chunk duration being ``chunk_len`` from the inference heartbeat at 16 kHz. A ratio of means
  rather than a mean of per-chunk ratios, which fast chunks would inflate. Until that
  heartbeat arrives the mean of the per-chunk ``rtf`` field stands in.
* **Counters** from heartbeats (and ``counters.<service>``), summed over every process of a
  service (:class:`services.stats.CounterLedger`): ``underruns`` (playback), ``resets``
  (inference), ``rejected`` per service, and every ``dropped_<cause>`` as ``dropped[cause]``.
  A restarted service never double counts nor loses the old process's counts; a restarted
  monitor starts from zero.
* **Liveness** per service from heartbeats (time of arrival on the monitor's clock): stale
  after ``stale_heartbeats`` missed ``bus.heartbeat_interval_s`` periods (plus half a period of
  slack for jitter) → event ``service_stale``; its next heartbeat → ``service_back {service,
  pid, restarted}``. A new process seen before the old one went stale → ``service_restarted
  {service, pid, restarts}``. One instance per service name is assumed, as in the pipeline.
* **Model info** from the inference heartbeat.
* **Overload** (:class:`services.stats.OverloadWatch`), judged every second: inference's mean
  step time above the chunk duration, or inference dropping backlog, → event ``overloaded
  {reason}``, a warning, ``OVERLOADED`` at the head of the status line, gauge
  ``llvc_overloaded``; the first second without either (and with steps running) →
  ``overload_cleared {duration_s}``. The report's ``overload`` has episodes and seconds.
* **Sound device flags**: PortAudio's input overflows (capture's ``input_overflows``) and
  output underflows (playback's ``device_underflows``). When a total rises → event
  ``input_overflow`` / ``output_underflow {service, new, total}``, a warning, and counter
  ``llvc_device_flags{flag}``; the report's ``device_flags`` has each flag's total and events.

Every ``status_interval_s`` one line (rolling window) is logged and published as
``event.monitor {"event": "status", "line"}``; ``inf`` there is the p50 of ``proc_ms``.
Prometheus metrics (private registry; rolling figures as gauges with a ``quantile`` label, the
maximum as quantile ``"1"``; totals as counters) are served on ``metrics_host:metrics_port``
unless the port is 0. On
shutdown the JSON report (whole-run figures, :meth:`MonitorService.report`) is written
atomically to ``report`` if set.

Nothing from the wire can stop it: malformed messages are counted by the subscriber (the
monitor's own ``rejected``), and fields of the wrong type are skipped (``bad_fields``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.config import SERVICES, PipelineConfigError
from common.protocol import SAMPLE_RATE, Telemetry
from common.tap import topics_for
from services.base import (MODEL_SCHEMA, Service, Setting, add_service_arguments, non_negative, positive,
                           parse_settings, service_main)
from services.stats import CounterLedger, OverloadWatch, Series

SCHEMA = {
    "status_interval_s": Setting(float, 2.0, positive),
    "window_s": Setting(float, 10.0, positive),
    "stale_heartbeats": Setting(int, 3, lambda v: None if v >= 1 else "must be >= 1"),
    "metrics_host": Setting(str, "127.0.0.1", lambda v: None if v else "must not be empty"),
    "metrics_port": Setting(int, 9108, lambda v: non_negative(v) or (None if v <= 65535 else "must be <= 65535")),
    "report": Setting(str, ""),
}

#: The services a pipeline has: listed in status and report even before they are first seen.
PIPELINE = tuple(s for s in SERVICES if s != "monitor")
E2E_QS = (0.5, 0.95, 0.99)
MAX_BATCH = 5000        # messages handled per loop_once, so a flood cannot hold the loop
MAX_EVENT_KINDS = 256   # distinct (service, event) names counted; more are ignored
MAX_PIDS = 32           # pids remembered per service for the report
#: PortAudio status flags that services count → (service, counter): a rise becomes an event.
DEVICE_FLAGS = {"input_overflow": ("capture", "input_overflows"),
                "output_underflow": ("playback", "device_underflows")}


class MetricsError(RuntimeError):
    """The /metrics server could not start (one line)."""


def _number(v: Any) -> float | None:
    """A finite int or float from the wire (never a bool), else ``None``."""
    if type(v) in (int, float) and math.isfinite(v):
        return float(v)
    return None


def _round(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


@dataclass
class Health:
    """Liveness of one service: its latest heartbeat and process."""

    last_seen: float
    host: str
    pid: int
    uptime_s: float | None
    ready: bool
    incarnation: int = 1      # +1 per process (new pid, or the same pid with its uptime reset)
    stale: bool = False
    stale_incarnation: int = 0
    pids: list[int] = field(default_factory=list)

    @property
    def restarts(self) -> int:
        return self.incarnation - 1

    def state(self) -> str:
        return "stale" if self.stale else ("ok" if self.ready else "starting")


class MonitorService(Service):
    """Subscribes to all telemetry and turns it into status lines, metrics and a report."""

    name = "monitor"

    def __init__(self, cfg, args: argparse.Namespace | None = None):
        super().__init__(cfg, args)
        self.settings = None
        self._sub = None
        self._http = None
        self._lock = threading.Lock()  # loop thread vs. the /metrics thread
        self._me = (self.name, socket.gethostname(), os.getpid())

    # ------------------------------------------------------------------ lifetime
    def setup(self) -> None:
        """Validate settings, start /metrics (if on), subscribe to all telemetry."""
        overrides = {}
        if self.args is not None:
            overrides = {"report": getattr(self.args, "report", None),
                         "metrics_port": getattr(self.args, "metrics_port", None)}
        s = self.settings = parse_settings(self.cfg, "monitor", SCHEMA, overrides)
        if s.report and not Path(s.report).resolve().parent.is_dir():
            raise PipelineConfigError(f"{self.cfg.source}: monitor.report: directory of {s.report!r} does not exist")
        self._init_state()
        if s.metrics_port:
            self._http = self._start_metrics(s.metrics_host, s.metrics_port)
        self.open_bus()
        self._sub = self.bus.subscriber(topics_for([], audio=False))
        self.ready = True

    def _init_state(self) -> None:
        now = time.monotonic()
        w = self.settings.window_s
        self.series = {k: Series(w) for k in ("e2e_ms", "proc_ms", "rtf", "queue_chunks", "fill_ms")}
        self.ledger = CounterLedger()
        self.health: dict[str, Health] = {}
        self.model: dict[str, Any] = {}
        self.events: dict[str, int] = {}
        self.chunks = 0
        self.overload = OverloadWatch()
        self.device_flags = {flag: {"total": 0, "events": 0} for flag in DEVICE_FLAGS}
        self.status_line = ""
        self._t0 = now
        self.started_wall = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        self._next_status = now + self.settings.status_interval_s
        self._logged_rejects = 0
        self._logged_errors = 0
        self._last_handle_error = ""

    def _start_metrics(self, host: str, port: int):
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)  # private: only the monitor's metrics
        registry.register(_Collector(self))
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise MetricsError(f"metrics: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        self.log("info", "metrics served", url=f"http://{host}:{port}/metrics")
        return server, thread

    def teardown(self) -> None:
        """Write the report (if set and the monitor ran), stop /metrics, close the bus."""
        if self._sub is not None and self.settings.report:
            self._write_report(Path(self.settings.report))
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(2)
            self._http = None
        self._sub = None
        self.close_bus()

    # ------------------------------------------------------------------ loop
    def loop_once(self) -> None:
        """Handle what arrived (waiting up to 50 ms), then liveness and the status line."""
        batch = self._receive(timeout_ms=50, budget_s=0.05)
        now = time.monotonic()
        with self._lock:
            for msg in batch:
                try:
                    self._handle(msg, now)
                except Exception as exc:  # noqa: BLE001 - one odd message must not cost the batch
                    self.count("handle_errors")
                    self._last_handle_error = f"{msg.topic}: {exc!r}"
            self.counters["messages"] = self.counters.get("messages", 0) + len(batch)
            self.counters["rejected"] = self._sub.rejected
            self._check_liveness(now)
            self._check_overload(now)
            self._check_device_flags()
            if now >= self._next_status:
                self._next_status = now + self.settings.status_interval_s
                self._emit_status(now)

    def _receive(self, timeout_ms: int, budget_s: float) -> list[Telemetry]:
        """Wait up to ``timeout_ms`` for telemetry, then take what is waiting for up to ``budget_s``."""
        sub, out = self._sub, []
        deadline = None
        for _ in range(MAX_BATCH):
            seen = sub.received + sub.rejected
            msg = sub.recv(timeout_ms)
            timeout_ms = 0
            if msg is not None:
                out.append(msg)
            elif sub.received + sub.rejected == seen:
                break  # nothing waiting (a rejected message also returns None, but is counted)
            now = time.monotonic()
            deadline = deadline or now + budget_s
            if now >= deadline:
                break
        return out

    def status(self) -> dict[str, Any]:
        """Heartbeat extras: chunks seen so far."""
        return {"chunks": self.chunks}

    # ------------------------------------------------------------------ one message
    def _bad(self) -> None:
        self.count("bad_fields")

    def _handle(self, msg: Telemetry, now: float) -> None:
        if (msg.service, msg.host, msg.pid) == self._me:
            return  # our own heartbeats and status lines
        data, kind = msg.data, msg.type
        if kind == "heartbeat":
            self._on_heartbeat(msg, now)
        elif kind == "counters":
            self._on_counters(msg, data, None)
        elif kind == "chunk" and msg.service == "playback":
            self.chunks += 1
            self._sample("e2e_ms", data.get("e2e_ms"), now)
            self._sample("fill_ms", data.get("fill_ms"), now)
        elif kind == "chunk" and msg.service == "inference":
            self._sample("proc_ms", data.get("proc_ms"), now)
            proc_ms = _number(data.get("proc_ms"))
            if proc_ms is not None:
                self.overload.add_step(proc_ms)
            self._sample("queue_chunks", data.get("queue_chunks"), now)
            if "rtf" in data:
                self._sample("rtf", data["rtf"], now)
        elif kind == "event":
            name = data.get("event")
            key = f"{msg.service}.{name}"
            if type(name) is not str:
                self._bad()
            elif key in self.events or len(self.events) < MAX_EVENT_KINDS:
                self.events[key] = self.events.get(key, 0) + 1

    def _sample(self, series: str, value: Any, now: float) -> None:
        v = _number(value)
        if v is None:
            self._bad()
        else:
            self.series[series].add(v, now)

    def _on_counters(self, msg: Telemetry, counters: Any, uptime_s: float | None) -> None:
        if type(counters) is not dict:
            self._bad()
            return
        good = {k: v for k, v in counters.items() if type(v) is int and v >= 0}
        if len(good) != len(counters):
            self._bad()
        self.ledger.update(msg.service, msg.host, msg.pid, good, uptime_s)

    def _on_heartbeat(self, msg: Telemetry, now: float) -> None:
        data = msg.data
        uptime = _number(data.get("uptime_s"))
        self._on_counters(msg, data.get("counters", {}), uptime)
        ready = data.get("ready") is True
        if msg.service == "inference":
            self._on_model(data)
        h = self.health.get(msg.service)
        if h is None:
            h = self.health[msg.service] = Health(now, msg.host, msg.pid, uptime, ready, pids=[msg.pid])
            self.log("info", "service seen", svc=msg.service, pid=msg.pid, host=msg.host)
            return
        new_process = (msg.host, msg.pid) != (h.host, h.pid) or (
            uptime is not None and h.uptime_s is not None and uptime < h.uptime_s)
        if new_process:
            h.incarnation += 1
            if msg.pid not in h.pids:
                h.pids = (h.pids + [msg.pid])[-MAX_PIDS:]
        h.last_seen, h.host, h.pid, h.uptime_s, h.ready = now, msg.host, msg.pid, uptime, ready
        if h.stale:
            h.stale = False
            restarted = h.incarnation != h.stale_incarnation
            self.log("info", "service back", svc=msg.service, pid=msg.pid, restarted=restarted)
            self.event("service_back", service=msg.service, pid=msg.pid, restarted=restarted)
        elif new_process:  # back before it was missed: still say so
            self.log("info", "service restarted", svc=msg.service, pid=msg.pid, restarts=h.restarts)
            self.event("service_restarted", service=msg.service, pid=msg.pid, restarts=h.restarts)

    def _on_model(self, data: dict) -> None:
        for key, kinds in (("model", (str,)), ("untrained", (bool,)), ("kind", (str,)), ("device", (str,)),
                           ("backend", (str,)),
                           ("chunk_len", (int,)), ("algorithmic_latency_ms", (int, float)),
                           ("latency_ms", (int, float))):
            v = data.get(key)
            if v is None:
                continue
            if type(v) not in kinds or (key == "chunk_len" and v <= 0):
                self._bad()
            else:
                self.model[key] = v

    def _check_liveness(self, now: float) -> None:
        limit = (self.settings.stale_heartbeats + 0.5) * self.cfg.bus.heartbeat_interval_s
        for name, h in self.health.items():
            if not h.stale and now - h.last_seen > limit:
                h.stale, h.stale_incarnation = True, h.incarnation
                ago = round(now - h.last_seen, 3)
                self.log("warning", "service stale", svc=name, pid=h.pid, last_seen_s_ago=ago)
                self.event("service_stale", service=name, pid=h.pid, last_seen_s_ago=ago)

    def _check_overload(self, now: float) -> None:
        chunk_len = self.model.get("chunk_len")
        chunk_ms = chunk_len / SAMPLE_RATE * 1000.0 if chunk_len else None
        change = self.overload.judge(now, chunk_ms, self.ledger.total("dropped_inference_backlog"))
        if change == "overloaded":
            self.log("warning", "inference overloaded: it cannot keep up with real time",
                     reason=self.overload.last_reason)
            self.event("overloaded", reason=self.overload.last_reason)
        elif change == "cleared":
            duration = round(self.overload.last_duration, 3)
            self.log("info", "inference keeps up again", overloaded_s=duration)
            self.event("overload_cleared", duration_s=duration)

    def _check_device_flags(self) -> None:
        """An event (and a warning) when a device flag counter rose since the last check.

        At most one event per flag per loop turn, and the counters arrive with heartbeats: the
        events cannot flood however often the device glitches.
        """
        for flag, (service, counter) in DEVICE_FLAGS.items():
            seen = self.device_flags[flag]
            total = self.ledger.total(counter, service)
            new = total - seen["total"]
            if new > 0:
                seen["total"] = total
                seen["events"] += 1
                self.log("warning", f"sound device {flag.replace('_', ' ')}", svc=service, new=new, total=total)
                self.event(flag, service=service, new=new, total=total)

    # ------------------------------------------------------------------ figures
    def _rtf(self, mean_proc_ms: float | None, mean_rtf: float | None) -> float | None:
        chunk_len = self.model.get("chunk_len")
        if chunk_len and mean_proc_ms:
            return chunk_len / SAMPLE_RATE * 1000.0 / mean_proc_ms
        return mean_rtf

    def figures(self, now: float, whole: bool) -> dict[str, Any]:
        """Latency, inference and queue figures: the whole run, or the rolling window."""
        def quantiles(name: str, qs) -> list[float | None]:
            s = self.series[name]
            return s.whole.quantiles(list(qs)) if whole else s.recent_quantiles(list(qs), now)

        def mean(name: str) -> float | None:
            s = self.series[name]
            return s.whole.mean if whole else s.recent_mean(now)

        e2e = self.series["e2e_ms"]
        p50, p95, p99 = quantiles("e2e_ms", E2E_QS)
        e2e_max = (e2e.whole.max if e2e.whole.count else None) if whole else e2e.recent_max(now)
        i50, i95 = quantiles("proc_ms", (0.5, 0.95))
        return {
            "e2e_latency_ms": {"p50": p50, "p95": p95, "p99": p99, "max": e2e_max},
            "inference_ms": {"p50": i50, "p95": i95, "mean": mean("proc_ms")},
            "rtf": self._rtf(mean("proc_ms"), mean("rtf")),
            "queue": {"inference_chunks_p95": quantiles("queue_chunks", (0.95,))[0],
                      "playback_fill_ms_p50": quantiles("fill_ms", (0.5,))[0]},
        }

    def service_states(self) -> dict[str, str]:
        """``ok`` / ``starting`` / ``stale`` / ``unseen`` for each pipeline service and any other seen."""
        names = list(PIPELINE) + sorted(set(self.health) - set(PIPELINE))
        return {n: self.health[n].state() if n in self.health else "unseen" for n in names}

    def _emit_status(self, now: float) -> None:
        f = self.figures(now, whole=False)

        def show(v: float | None) -> str:
            return "—" if v is None else f"{v:.1f}"

        e2e, inf = f["e2e_latency_ms"], f["inference_ms"]
        states = self.service_states().items()
        services = " ".join(f"{n} {'—' if state == 'unseen' else state}" for n, state in states)
        self.status_line = (
            ("OVERLOADED | " if self.overload.overloaded else "") +
            f"e2e p50 {show(e2e['p50'])} p99 {show(e2e['p99'])} ms | inf {show(inf['p50'])} ms "
            f"rtf {show(f['rtf'])} | underruns {self.ledger.total('underruns')} "
            f"drops {sum(self.ledger.by_prefix('dropped_').values())} resets {self.ledger.total('resets')} | "
            f"{services}")
        self.log("info", self.status_line)
        self.event("status", line=self.status_line)
        rejected = self._sub.rejected
        if rejected > self._logged_rejects:
            self.log("warning", "malformed telemetry rejected", count=rejected - self._logged_rejects,
                     last=self._sub.last_reject)
            self._logged_rejects = rejected
        errors = self.counters.get("handle_errors", 0)
        if errors > self._logged_errors:  # a bug here, not bad input: say so, once per status line
            self.log("error", "telemetry handling failed", count=errors - self._logged_errors,
                     last=self._last_handle_error)
            self._logged_errors = errors

    def rejected(self) -> dict[str, int]:
        """Rejected input per service (counter ``rejected``), the monitor's malformed telemetry included."""
        out = {s: self.ledger.total("rejected", s) for s in self.ledger.services()}
        out[self.name] = self._sub.rejected if self._sub is not None else 0
        return out

    def report(self) -> dict[str, Any]:
        """The whole-run report (what is written to ``report`` on shutdown); JSON-ready."""
        with self._lock:
            now = time.monotonic()
            f = self.figures(now, whole=True)
            services = {}
            for name, state in self.service_states().items():
                h = self.health.get(name)
                services[name] = {
                    "up": state in ("ok", "starting"), "ready": state == "ok", "state": state,
                    "restarts": h.restarts if h else 0,
                    "last_seen_s_ago": round(now - h.last_seen, 3) if h else None,
                    "pids": list(h.pids) if h else [],
                }
            m = self.model
            return _rounded({
                "chunks": self.chunks,
                **f,
                "underruns": self.ledger.total("underruns"),
                "dropped": self.ledger.by_prefix("dropped_"),
                "resets": self.ledger.total("resets"),
                "device_flags": {flag: dict(v) for flag, v in self.device_flags.items()},
                "algorithmic_latency_ms": m.get("algorithmic_latency_ms"),
                "latency_ms": m.get("latency_ms"),
                "model": {"id": m.get("model"), "untrained": m.get("untrained"),
                          "kind": m.get("kind", self.cfg.services.get("model", {}).get(
                              "kind", MODEL_SCHEMA["kind"].default)),
                          "device": m.get("device"), "backend": m.get("backend"),
                          "chunk_len": m.get("chunk_len")},
                "services": services,
                "overload": {"now": self.overload.overloaded, "episodes": self.overload.episodes,
                             "seconds": self.overload.total_seconds(now)},
                "rejected": self.rejected(),
                "counters": {s: self.ledger.totals(s) for s in self.ledger.services()},
                "events": dict(sorted(self.events.items())),
                "window": {"window_s": self.settings.window_s, **self.figures(now, whole=False)},
                "status_line": self.status_line,
                "duration_s": now - self._t0,
                "started_wall": self.started_wall,
            })

    def _write_report(self, path: Path) -> None:
        """Write :meth:`report` to ``path`` atomically: a temp file beside it, then rename."""
        tmp = None
        try:
            text = json.dumps(self.report(), indent=2, allow_nan=False) + "\n"
            fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            self.log("info", "report written", path=str(path))
        except (OSError, ValueError) as exc:
            self.log("error", f"cannot write report: {exc}", path=str(path))
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


def _rounded(value: Any) -> Any:
    """``value`` with every float rounded to 3 decimals (nested dicts and lists)."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


class _Collector:
    """Prometheus collector: reads the monitor's state at scrape time (under its lock)."""

    def __init__(self, monitor: MonitorService):
        self.monitor = monitor

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        mon = self.monitor
        with mon._lock:
            now = time.monotonic()
            f = mon.figures(now, whole=False)
            states = mon.service_states()
            totals = {"chunks": mon.chunks, "underruns": mon.ledger.total("underruns"),
                      "resets": mon.ledger.total("resets")}
            dropped, rejected = mon.ledger.by_prefix("dropped_"), mon.rejected()
            restarts = {n: h.restarts for n, h in mon.health.items()}
            flags = {flag: v["total"] for flag, v in mon.device_flags.items()}
            model = dict(mon.model)
            overloaded = mon.overload.overloaded
        window = f"over the last {mon.settings.window_s:g} s"

        def quantile_gauge(name: str, doc: str, values: dict[str, float | None]) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, f"{doc} {window}", labels=["quantile"])
            for q, v in values.items():
                if v is not None:  # no data: no sample, rather than a made-up number
                    g.add_metric([q], v)
            return g

        e2e, inf, queue = f["e2e_latency_ms"], f["inference_ms"], f["queue"]
        yield quantile_gauge("llvc_e2e_latency_ms", "End-to-end latency (capture to output), ms,",
                             {"0.5": e2e["p50"], "0.95": e2e["p95"], "0.99": e2e["p99"], "1": e2e["max"]})
        yield quantile_gauge("llvc_inference_ms", "Inference time per chunk, ms,",
                             {"0.5": inf["p50"], "0.95": inf["p95"]})
        yield quantile_gauge("llvc_inference_queue_chunks", "Inference input queue, chunks,",
                             {"0.95": queue["inference_chunks_p95"]})
        yield quantile_gauge("llvc_playback_fill_ms", "Playback buffer fill, ms,",
                             {"0.5": queue["playback_fill_ms_p50"]})
        rtf = GaugeMetricFamily("llvc_inference_rtf", f"Chunk duration / mean inference time {window}")
        if f["rtf"] is not None:
            rtf.add_metric([], f["rtf"])
        yield rtf
        for name, doc in (("chunks", "Chunks played (chunk.playback messages)"),
                          ("underruns", "Playback underruns"), ("resets", "Inference state resets")):
            yield CounterMetricFamily(f"llvc_{name}", doc, value=totals[name])
        for name, doc, label, values in (
                ("dropped", "Dropped audio by cause", "cause", dropped),
                ("rejected", "Rejected input messages by service", "service", rejected),
                ("service_restarts", "Service process restarts", "service", restarts),
                ("device_flags", "Sound device input overflows and output underflows (PortAudio)", "flag", flags)):
            c = CounterMetricFamily(f"llvc_{name}", doc, labels=[label])
            for key, n in values.items():
                c.add_metric([key], n)
            yield c
        yield GaugeMetricFamily("llvc_overloaded", "1 while inference cannot keep up with real time",
                                value=1.0 if overloaded else 0.0)
        up = GaugeMetricFamily("llvc_service_up", "1 while the service's heartbeats arrive", labels=["service"])
        for name, state in states.items():
            up.add_metric([name], 1.0 if state in ("ok", "starting") else 0.0)
        yield up
        for key in ("algorithmic_latency_ms", "latency_ms"):
            if key in model:
                yield GaugeMetricFamily(f"llvc_model_{key}", f"Model {key.replace('_', ' ')}", value=model[key])
        if "model" in model:
            info = GaugeMetricFamily("llvc_model_info", "The model inference runs",
                                     labels=["model", "untrained", "device"])
            info.add_metric([model["model"], str(model.get("untrained", "")).lower(), model.get("device", "")], 1)
            yield info


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
