"""The monitor's judgements: is each service alive, does inference keep up, did a sound device glitch.

Each watcher here keeps its own state and, when something changes, returns :class:`Note`\\ s: the
event to publish and the log line to write. The service publishes and logs them; nothing here
touches the bus or the clock (callers pass ``now``, monotonic seconds), so it is testable alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.config import SERVICES
from common.telemetry import (
    Counter,
    Event,
    Heartbeat,
    InferenceChunk,
    InputOverflow,
    OutputUnderflow,
    OverloadCleared,
    Overloaded,
    Record,
    ServiceBack,
    ServiceRestarted,
    ServiceStale,
)
from services.stats import CounterLedger, OverloadWatch

__all__ = ["Note", "Health", "Liveness", "Overload", "DeviceFlags", "PIPELINE", "MAX_PIDS"]

#: The services a pipeline has: listed in status and report even before they are first seen.
PIPELINE = tuple(s for s in SERVICES if s != "monitor")
MAX_PIDS = 32           # pids remembered per service for the report


@dataclass(frozen=True)
class Note:
    """Something worth saying: a log line (``level``, ``message``, ``fields``) and, unless
    ``event`` is ``None``, the event that tells the same to telemetry subscribers."""

    level: str
    message: str
    fields: dict[str, Any]
    event: Event | None = None


# --------------------------------------------------------------------------- liveness
@dataclass
class Health:
    """Liveness of one service: its latest heartbeat and process."""

    last_seen: float
    host: str
    pid: int
    uptime_s: float
    ready: bool
    incarnation: int = 1      # +1 per process (new pid, or the same pid with its uptime reset)
    stale: bool = False
    down: bool = False        # its publisher's connection dropped (see Liveness.lost)
    stale_incarnation: int = 0
    pids: list[int] = field(default_factory=list)

    @property
    def restarts(self) -> int:
        """Processes after the first."""
        return self.incarnation - 1

    def state(self) -> str:
        """``down``, ``stale``, ``ok`` (ready) or ``starting``."""
        if self.down:
            return "down"
        return "stale" if self.stale else ("ok" if self.ready else "starting")


class Liveness:
    """:class:`Health` per service from heartbeats (arrival time on the monitor's clock).

    A service is stale after ``stale_heartbeats`` missed periods of ``interval_s`` plus half a
    period of slack for jitter. One instance per service name is assumed, as in the pipeline.
    """

    def __init__(self, stale_heartbeats: int, interval_s: float):
        self.limit_s = (stale_heartbeats + 0.5) * interval_s
        self.health: dict[str, Health] = {}

    def add(self, record: Record, now: float) -> list[Note]:
        """Take one record (only heartbeats matter); notes for a service seen, back or restarted."""
        if not isinstance(record, Heartbeat):
            return []
        name, host, pid, uptime = record.service, record.host, record.pid, record.uptime_s
        h = self.health.get(name)
        if h is None:
            self.health[name] = Health(now, host, pid, uptime, record.ready, pids=[pid])
            return [Note("info", "service seen", {"svc": name, "pid": pid, "host": host})]
        # A new pid, or the same pid whose uptime went back (containers reuse pids).
        new_process = (host, pid) != (h.host, h.pid) or uptime < h.uptime_s
        if new_process:
            h.incarnation += 1
            if pid not in h.pids:
                h.pids = (h.pids + [pid])[-MAX_PIDS:]
        h.last_seen, h.host, h.pid, h.uptime_s, h.ready = now, host, pid, uptime, record.ready
        h.down = False
        if h.stale:
            h.stale = False
            restarted = h.incarnation != h.stale_incarnation
            return [Note("info", "service back", {"svc": name, "pid": pid, "restarted": restarted},
                         ServiceBack(name, pid, restarted))]
        if new_process:  # back before it was missed: still say so
            return [Note("info", "service restarted", {"svc": name, "pid": pid, "restarts": h.restarts},
                         ServiceRestarted(name, pid, h.restarts))]
        return []

    def check(self, now: float) -> list[Note]:
        """Notes for every service whose heartbeats stopped since the last check."""
        notes = []
        for name, h in self.health.items():
            if not h.stale and now - h.last_seen > self.limit_s:
                h.stale, h.stale_incarnation = True, h.incarnation
                ago = round(now - h.last_seen, 3)
                notes.append(Note("warning", "service stale", {"svc": name, "pid": h.pid, "last_seen_s_ago": ago},
                                  ServiceStale(name, h.pid, ago)))
        return notes

    def lost(self, name: str) -> None:
        """The connection to ``name``'s telemetry publisher dropped: its process ended (a killed
        one too: the kernel closes its sockets) or its host is unreachable. It is ``down`` at
        once, not a few heartbeat periods later, until its next heartbeat; a restart quicker than
        the stale limit still shows."""
        h = self.health.get(name)
        if h is not None:
            h.down = True

    def states(self) -> dict[str, str]:
        """``ok`` / ``starting`` / ``down`` / ``stale`` / ``unseen`` for each pipeline service and
        any other seen."""
        names = list(PIPELINE) + sorted(set(self.health) - set(PIPELINE))
        return {n: self.health[n].state() if n in self.health else "unseen" for n in names}


# --------------------------------------------------------------------------- overload
class Overload:
    """Inference's overload (:class:`services.stats.OverloadWatch`), judged every second."""

    def __init__(self) -> None:
        self.watch = OverloadWatch()

    def add(self, record: Record) -> None:
        """Take one record (only inference's step times matter)."""
        if isinstance(record, InferenceChunk):
            self.watch.add_step(record.proc_ms)

    def check(self, now: float, chunk_ms: float | None, backlog_drops: int) -> list[Note]:
        """A note when inference starts or stops falling behind; ``chunk_ms`` is the chunk
        duration inference reports (``None``: not known yet), ``backlog_drops`` its cumulative
        ``dropped_inference_backlog``."""
        change = self.watch.judge(now, chunk_ms, backlog_drops)
        if change == "overloaded":
            reason = self.watch.last_reason
            return [Note("warning", "inference overloaded: it cannot keep up with real time", {"reason": reason},
                         Overloaded(reason))]
        if change == "cleared":
            duration = round(self.watch.last_duration, 3)
            return [Note("info", "inference keeps up again", {"overloaded_s": duration}, OverloadCleared(duration))]
        return []

    @property
    def overloaded(self) -> bool:
        """Whether inference is overloaded now."""
        return self.watch.overloaded

    def summary(self, now: float) -> dict[str, Any]:
        """The report's ``overload``: now, episodes, seconds (the current episode included)."""
        w = self.watch
        return {"now": w.overloaded, "episodes": w.episodes, "seconds": w.total_seconds(now)}


# --------------------------------------------------------------------------- device flags
#: PortAudio status flags that services count: event → (service, counter).
DEVICE_FLAGS: dict[type[Event], tuple[str, str]] = {
    InputOverflow: ("capture", Counter.INPUT_OVERFLOWS),
    OutputUnderflow: ("playback", Counter.DEVICE_UNDERFLOWS),
}


class DeviceFlags:
    """Sound device input overflows and output underflows, from the services' counters.

    At most one note per flag per check, and the counters arrive with heartbeats: the events
    cannot flood however often the device glitches.
    """

    def __init__(self) -> None:
        self.flags: dict[str, dict[str, int]] = {str(ev.NAME): {"total": 0, "events": 0} for ev in DEVICE_FLAGS}

    def check(self, ledger: CounterLedger) -> list[Note]:
        """A note (and an event) per flag whose total rose since the last check."""
        notes = []
        for event, (service, counter) in DEVICE_FLAGS.items():
            flag = str(event.NAME)
            seen = self.flags[flag]
            total = ledger.total(counter, service)
            new = total - seen["total"]
            if new > 0:
                seen["total"] = total
                seen["events"] += 1
                notes.append(Note("warning", f"sound device {flag.replace('_', ' ')}",
                                  {"svc": service, "new": new, "total": total}, event(service, new, total)))
        return notes

    def totals(self) -> dict[str, int]:
        """Each flag's total."""
        return {flag: v["total"] for flag, v in self.flags.items()}

    def summary(self) -> dict[str, dict[str, int]]:
        """The report's ``device_flags``: each flag's total and events (a copy)."""
        return {flag: dict(v) for flag, v in self.flags.items()}
