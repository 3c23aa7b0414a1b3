"""What the dashboard shows, built from telemetry records: the ``/api/state`` document and the
updates the page streams (``docs/dashboard-api.md`` is the contract).

:class:`DashboardState` takes every record (:meth:`DashboardState.add`) in the service's loop
thread. The figures the monitor also computes come from the monitor's own code
(:class:`services.monitor.ingest.Stats`, :class:`~services.monitor.health.Liveness`, ...), fed the
same records, so the page and the monitor agree by construction. What only the page needs is
here:

* **Where the latency goes.** Playback publishes each chunk's header on arrival
  (``audio.playback``: the stage records, and when it arrived) and, once its first sample
  played, its e2e, ``wait_ms`` (in the jitter buffer) and ``device_ms`` (from leaving the buffer
  to the output). Joined on ``(stream_id, seq)``, with the chunk's capture time ``T`` and
  inference's stage record (``recv``: when the chunk completing this step arrived, ``send``, and
  the step's ``proc``), e2e telescopes into seven parts::

      fill                   = chunk + L (the model's floor: the last input sample arrives then)
      capture → inference    = recv - (T + fill)
      inference queue        = send - recv - proc
      compute                = proc
      inference → playback   = arrival - send
      jitter-buffer wait     = wait_ms
      device output          = device_ms

  They add up to e2e exactly when inference's clock is playback's (one host: ``clock:
  shared``). On another host only durations on its clock mean anything: the two transits are
  then what is left of e2e, split evenly (``clock: split``).
* **Series** of the last ``history_s`` seconds, each point stamped with the wall clock of the
  record's publisher when it made the record (the dashboard takes records in batches, five
  times a second: arrival times would bunch); an update carries only the points added since the
  last one.
* **Losses** with rates over the last minute, resets by reason (from ``reset`` events), and
  concealed audio (playback's ``underrun_samples``, as WebRTC counts ``concealedSamples``).
* **Sound frames** from capture (input) and playback (output).
* **Events**, the last 100 (live-setting changes and voice switches in words).
* **Control**: inference's live settings and voice, from its heartbeat (about once a second)
  and, sooner, from its ``control`` and ``voice`` events, so the page shows a change made by
  ``llvc ctl`` or another page as soon as it is made.

Nothing here touches the bus, the clock or a socket: callers pass ``now`` (monotonic) and
``wall`` (Unix seconds), so it is testable alone.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.audio import SAMPLE_RATE
from common.levels import band_centres_hz
from common.telemetry import (
    AudioHeader,
    ControlChanged,
    Counter,
    Event,
    Heartbeat,
    InferenceChunk,
    InferenceStatus,
    PlaybackChunk,
    PlaybackStatus,
    Record,
    Reset,
    SoundFrame,
    Status,
    VoiceSwitch,
)
from services.monitor.health import DeviceFlags, Liveness, Overload
from services.monitor.ingest import Stats, session_dropped

__all__ = ["PARTS", "HIST_EDGES_MS", "DashboardState", "breakdown"]

VERSION = 1
#: The parts of e2e, in the order they happen: (key, label).
PARTS = (
    ("fill", "waiting for the chunk to fill"),
    ("capture_to_inference", "capture → inference"),
    ("inference_queue", "inference queue"),
    ("compute", "compute"),
    ("inference_to_playback", "inference → playback"),
    ("jitter_buffer", "jitter-buffer wait"),
    ("device_output", "device output"),
)
#: Inference step-time histogram bins, ms (the last bin takes everything above).
HIST_EDGES_MS = tuple(round(0.25 * i, 2) for i in range(21)) + (6.0, 8.0, 10.0, 13.0, 20.0, 50.0)
SOUND_HISTORY_S = 10.0
MAX_EVENTS = 100
MAX_PENDING_HEADERS = 512   # chunk headers waiting for their first sample to play (~6 s at cf 1)
RATE_WINDOW_S = 60.0        # losses' per-minute rates


def _shown(v: Any) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def _event_text(ev: Event) -> str | None:
    """Words for a live-setting change or a voice switch (``None``: the generic key=value list)."""
    if isinstance(ev, ControlChanged):
        changes = ev.changes if isinstance(ev.changes, dict) else {}
        where = f" from sample {ev.offset}" if ev.offset is not None else ""
        return " ".join(f"{k}={_shown(v)}" for k, v in changes.items()) + f" (by {ev.by}{where})"
    if isinstance(ev, VoiceSwitch):
        voice = ev.voice or "the demo voice"
        if ev.phase == "loading":
            return f"loading {voice} (by {ev.by}; the current voice keeps converting)"
        if ev.phase == "swapped":
            took = f", loaded in {ev.load_ms / 1000:.2f} s" if ev.load_ms is not None else ""
            where = f" from sample {ev.offset}" if ev.offset is not None else ""
            return f"switched to {voice} (model {ev.model}{took}){where}"
        if ev.phase == "failed":
            return f"failed: {voice}: {ev.reason} (the current voice stays)"
    return None


def _r(v: float | None, nd: int = 3) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


def breakdown(header: AudioHeader, played: PlaybackChunk, fill_ms: float, same_clock: bool) -> list[float] | None:
    """The seven parts of ``played.e2e_ms`` (:data:`PARTS` order), or ``None`` when the chunk
    carries no inference stage or playback did not say where the end went."""
    stage = next((s for s in reversed(header.stages) if s.name == "inference"), None)
    if stage is None or header.t_recv_ns is None or played.wait_ms is None or played.device_ms is None:
        return None
    queue = (stage.t_send_ns - stage.t_recv_ns - stage.proc_ns) / 1e6
    compute = stage.proc_ns / 1e6
    if same_clock:
        to_inference = (stage.t_recv_ns - header.t_capture_ns) / 1e6 - fill_ms
        to_playback = (header.t_recv_ns - stage.t_send_ns) / 1e6
    else:
        transit = played.e2e_ms - fill_ms - queue - compute - played.wait_ms - played.device_ms
        to_inference = to_playback = transit / 2
    return [fill_ms, to_inference, queue, compute, to_playback, played.wait_ms, played.device_ms]


@dataclass
class _Series:
    """Points of the last ``history_s`` seconds (first element: wall time), and those added since
    the last :meth:`take_fresh`."""

    history_s: float

    def __post_init__(self) -> None:
        self.points: collections.deque[list] = collections.deque()
        self.fresh: list[list] = []

    def add(self, point: list) -> None:
        self.points.append(point)
        self.fresh.append(point)

    def trim(self, wall: float) -> None:
        while self.points and self.points[0][0] < wall - self.history_s:
            self.points.popleft()

    def take_fresh(self) -> list[list]:
        fresh, self.fresh = self.fresh, []
        return fresh


class DashboardState:
    """Everything the page shows (see the module docstring)."""

    def __init__(self, window_s: float, stale_heartbeats: int, heartbeat_interval_s: float,
                 history_s: float = 60.0, update_interval_s: float = 0.2, host: str = ""):
        self.window_s = window_s
        self.history_s = history_s
        self.update_interval_s = update_interval_s
        self.host = host
        self.stats = Stats(window_s)
        self.liveness = Liveness(stale_heartbeats, heartbeat_interval_s)
        self.overload = Overload()
        self.device_flags = DeviceFlags()
        self.n = 0
        self.e2e = _Series(history_s)          # [t, e2e_ms, fill_ms]
        self.quantiles = _Series(history_s)    # [t, p50, p99]
        self.parts = _Series(history_s)        # [t, e2e_ms, *parts]
        self.steps = _Series(history_s)        # [t, proc_ms, queue_chunks]
        self.sound = {"input": _Series(SOUND_HISTORY_S), "output": _Series(SOUND_HISTORY_S)}
        self.events: collections.deque[dict] = collections.deque(maxlen=MAX_EVENTS)
        self.fresh_events: list[dict] = []
        self.resets: dict[str, int] = {}
        self.playback: PlaybackStatus | None = None
        self.clock = "shared"
        self._headers: collections.OrderedDict[tuple[str, int], AudioHeader] = collections.OrderedDict()
        self._totals: collections.deque[tuple[float, dict[str, float]]] = collections.deque()
        self._level = {"input": None, "output": None}
        self.frame_ms: float | None = None
        # control: live settings and voice (None until inference says); loading and last_switch
        # come from voice events only (a heartbeat does not carry them)
        self.control: dict[str, Any] = {"controls": None, "voice": None, "loading": None, "last_switch": None}

    # ------------------------------------------------------------------ records in
    def add(self, record: Record, now: float, wall: float) -> None:
        """Take one record that arrived by ``now`` (monotonic) / ``wall`` (Unix seconds)."""
        if record.origin is not None:
            wall = record.origin.t_wall_ns / 1e9
        self.stats.add(record, now)
        self.overload.add(record)
        self.liveness.add(record, now)
        match record:
            case AudioHeader():
                self._headers[(record.stream_id, record.seq)] = record
                while len(self._headers) > MAX_PENDING_HEADERS:
                    self._headers.popitem(last=False)
            case PlaybackChunk():
                self.e2e.add([wall, record.e2e_ms, record.fill_ms])
                self._add_breakdown(record, wall)
            case InferenceChunk():
                self.steps.add([wall, _r(record.proc_ms), _r(record.queue_chunks)])
            case SoundFrame():
                side = {"capture": "input", "playback": "output"}.get(record.service)
                if side is not None:
                    self.frame_ms = record.frame_ms
                    self._level[side] = {"t": wall, "rms_dbfs": record.rms_dbfs, "peak_dbfs": record.peak_dbfs}
                    self.sound[side].add([wall, record.rms_dbfs, record.peak_dbfs, record.spectrum_db])
            case Heartbeat():
                if isinstance(record.status, PlaybackStatus):
                    self.playback = record.status
                elif isinstance(record.status, InferenceStatus):
                    self._inference_beat(record.status)
            case Status():
                pass  # the monitor's status line: the page shows the figures themselves
            case Event():
                if isinstance(record, Reset):
                    self.resets[record.reason] = self.resets.get(record.reason, 0) + 1
                elif isinstance(record, ControlChanged | VoiceSwitch):
                    self._control_event(record)
                self._event(wall, record.service, record.name, record.to_data(), _event_text(record))

    def _inference_beat(self, st: InferenceStatus) -> None:
        """The settings inference has now (a restarted inference starts from its config)."""
        c = self.control
        if isinstance(st.controls, dict):
            c["controls"] = dict(st.controls)
        if st.voice is not None:
            c["voice"] = st.voice

    def _control_event(self, ev: ControlChanged | VoiceSwitch) -> None:
        c = self.control
        if isinstance(ev, ControlChanged):
            if c["controls"] is not None and isinstance(ev.changes, dict):
                c["controls"] = {**c["controls"], **ev.changes}
        elif ev.phase == "loading":
            c["loading"] = ev.voice
        elif ev.phase == "swapped":
            c.update(voice=ev.voice, loading=None,
                     last_switch={"voice": ev.voice, "ok": True, "model": ev.model, "load_ms": ev.load_ms,
                                  "offset": ev.offset})
        elif ev.phase == "failed":
            c.update(loading=None, last_switch={"voice": ev.voice, "ok": False, "reason": ev.reason})

    def _event(self, wall: float, service: str, name: str, data: dict[str, Any], text: str | None = None) -> None:
        if text is None:
            text = " ".join(f"{k}={v}" for k, v in data.items() if k not in ("schema", "event"))
        e = {"t": round(wall, 3), "service": service, "event": str(name), "text": text[:300]}
        self.events.appendleft(e)
        self.fresh_events.append(e)

    def _add_breakdown(self, played: PlaybackChunk, wall: float) -> None:
        header = self._headers.pop((played.stream_id, played.seq), None)
        floor = self.floor_ms
        if header is None or floor is None:
            return
        stage = next((s for s in reversed(header.stages) if s.name == "inference"), None)
        same = stage is not None and stage.host == header.host
        self.clock = "shared" if same else "split"
        parts = breakdown(header, played, floor, same)
        if parts is not None:
            self.parts.add([wall, played.e2e_ms, *(round(p, 3) for p in parts)])

    def lost(self, service: str) -> None:
        """``service``'s telemetry connection dropped (:meth:`Liveness.lost`)."""
        self.liveness.lost(service)

    # ------------------------------------------------------------------ judgements
    def check(self, now: float, wall: float) -> None:
        """Liveness, overload and device flags (once per update). Their events are not added to
        the list: the monitor publishes the same ones, and the list shows those."""
        self.liveness.check(now)
        self.overload.check(now, self.stats.chunk_ms, self.stats.total(Counter.DROPPED_INFERENCE_BACKLOG))
        self.device_flags.check(self.stats.ledger)

    # ------------------------------------------------------------------ figures out
    @property
    def floor_ms(self) -> float | None:
        """The model's floor, chunk + L, from inference's heartbeat."""
        m = self.stats.inference
        return m.latency_ms if m is not None else None

    def _health(self, now: float) -> dict[str, Any]:
        states = self.liveness.states()
        services = []
        for name, state in states.items():
            h = self.liveness.health.get(name)
            services.append({"name": name, "state": state, "host": h.host if h else None, "pid": h.pid if h else None,
                             "uptime_s": _r(h.uptime_s, 1) if h else None, "restarts": h.restarts if h else 0,
                             "heartbeat_age_s": _r(now - h.last_seen, 2) if h else None})
        m = self.stats.inference
        model = None
        if m is not None:
            model = {"model": m.model, "kind": m.kind, "backend": m.backend, "device": m.device,
                     "untrained": m.untrained, "threads": m.threads, "chunk_factor": m.chunk_factor,
                     "chunk_ms": m.chunk_ms, "latency_ms": m.latency_ms,
                     "algorithmic_latency_ms": m.algorithmic_latency_ms}
        return {"services": services, "overloaded": self.overload.overloaded, "model": model,
                "stream_id": self.playback.stream_id if self.playback else None}

    def _losses(self, wall: float) -> dict[str, Any]:
        ledger = self.stats.ledger
        totals: dict[str, float] = {"underruns": float(ledger.total(Counter.UNDERRUNS)),
                                    "concealed_ms": ledger.total(Counter.UNDERRUN_SAMPLES) * 1000 / SAMPLE_RATE}
        dropped = self.stats.dropped()
        totals.update({f"dropped.{k}": float(v) for k, v in dropped.items()})
        self._totals.append((wall, totals))
        while len(self._totals) > 1 and self._totals[1][0] <= wall - RATE_WINDOW_S:
            self._totals.popleft()
        t0, first = self._totals[0]
        minutes = max(wall - t0, 1.0) / 60

        def rated(key: str) -> dict[str, float]:
            now_total = totals[key]
            return {"total": _r(now_total, 1), "per_min": _r((now_total - first.get(key, 0.0)) / minutes, 2)}

        return {"underruns": rated("underruns"), "concealed_ms": rated("concealed_ms"),
                "dropped": {k: rated(f"dropped.{k}") for k in dropped},
                "resets": dict(self.resets), "device_flags": self.device_flags.totals(),
                "rejected": self.stats.rejected()}

    def _compute(self, window: dict[str, Any]) -> dict[str, Any]:
        proc = np.array([p[1] for p in self.steps.points if p[1] is not None], float)
        edges = np.array(HIST_EDGES_MS)
        counts = np.bincount(np.clip(np.searchsorted(edges, proc, side="right") - 1, 0, len(edges) - 2),
                             minlength=len(edges) - 1) if len(proc) else np.zeros(len(edges) - 1, int)
        inf = window["inference_ms"]
        last_queue = self.steps.points[-1][2] if self.steps.points else None
        pb = self.playback
        m = self.stats.inference
        return {"inference_ms": {k: _r(inf[k]) for k in ("p50", "p95", "mean")}, "rtf": _r(window["rtf"], 2),
                "histogram": {"edges_ms": list(HIST_EDGES_MS), "counts": [int(c) for c in counts]},
                "queue": {"inference_chunks": last_queue, "playback_fill_ms": pb.fill_ms if pb else None,
                          "playback_target_ms": pb.target_ms if pb else None},
                "sessions": self._sessions(),
                "max_streams": m.max_streams if m else None,
                "batch_sizes": dict((m.batch_sizes or {}) if m else {})}

    def _sessions(self) -> list[dict[str, Any]]:
        """One row per client session (issue 18), by name: what the monitor's report says of it."""
        rows = []
        for name, s in sorted(self.stats.sessions().items()):
            e2e, inf = s.get("e2e_latency_ms") or {}, s.get("inference") or {}
            dropped = sum(session_dropped(s).values())
            rows.append({"name": name, "chunks": s.get("chunks", 0), "e2e_p50_ms": _r(e2e.get("p50")),
                         "e2e_p99_ms": _r(e2e.get("p99")), "underruns": s.get("underruns"), "dropped": dropped,
                         "resets": inf.get(Counter.RESETS)})
        return rows

    def _recent_parts(self, wall: float) -> dict[str, float | None]:
        recent = [p[2:] for p in self.parts.points if p[0] >= wall - self.window_s]
        means = np.mean(np.array(recent, float), axis=0) if recent else [None] * len(PARTS)
        return {key: _r(m) for (key, _), m in zip(PARTS, means)}

    def update(self, now: float, wall: float, full: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The next update (number :attr:`n` + 1), whose series hold what is new since the last
        one; and with ``full``, the state as of this update (``/api/state``: every series whole)."""
        self.check(now, wall)
        for s in (self.e2e, self.quantiles, self.parts, self.steps, *self.sound.values()):
            s.trim(wall)
        window = self.stats.figures(now, whole=False)
        e2e = window["e2e_latency_ms"]
        if e2e["p50"] is not None:
            self.quantiles.add([wall, _r(e2e["p50"]), _r(e2e["p99"])])
        self.n += 1
        common = self._common(now, wall, window)
        fresh_events, self.fresh_events = self.fresh_events[::-1], []  # newest first
        delta = self._document(common, lambda s: s.take_fresh(), fresh_events)
        return delta, (self._document(common, lambda s: list(s.points), list(self.events)) if full else None)

    def _common(self, now: float, wall: float, window: dict[str, Any]) -> dict[str, Any]:
        """What an update and the whole document share: every value but the series."""
        e2e = window["e2e_latency_ms"]
        return {"version": VERSION, "n": self.n, "t": round(wall, 3), "update_interval_s": self.update_interval_s,
                "history_s": self.history_s, "health": self._health(now), "losses": self._losses(wall),
                "compute": self._compute(window), "p50": _r(e2e["p50"]), "p99": _r(e2e["p99"]),
                "recent_ms": self._recent_parts(wall),
                "control": {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.control.items()}}

    def _document(self, c: dict[str, Any], series, events: list[dict]) -> dict[str, Any]:
        return {
            "version": c["version"], "n": c["n"], "t": c["t"], "update_interval_s": c["update_interval_s"],
            "history_s": c["history_s"],
            "health": c["health"],
            "latency": {"floor_ms": self.floor_ms, "window_s": self.window_s, "p50_ms": c["p50"],
                        "p99_ms": c["p99"], "chunks": series(self.e2e), "quantiles": series(self.quantiles)},
            "breakdown": {"parts": [{"key": k, "label": label} for k, label in PARTS], "clock": self.clock,
                          "chunks": series(self.parts), "recent_ms": c["recent_ms"]},
            "losses": c["losses"],
            "compute": {**c["compute"], "chunks": series(self.steps)},
            "sound": {"bands_hz": band_centres_hz(SAMPLE_RATE), "frame_ms": self.frame_ms,
                      "input": self._level["input"], "output": self._level["output"],
                      "frames": {side: series(s) for side, s in self.sound.items()}},
            "events": events,
            "control": c["control"],
        }
