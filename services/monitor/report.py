"""What the monitor shows: the status line, the whole-run report, and the snapshot other threads read.

The loop thread owns the monitor's state. Other threads (the /metrics server, a caller of
:meth:`~services.monitor.MonitorService.report`) never touch it: the loop thread builds a
:class:`Snapshot`, which is never changed once built, and replaces the monitor's reference to it
(one assignment, atomic in Python). A reader takes the reference once and sees one consistent
moment, however long it reads, and no lock can ever make the loop wait for a scrape.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import write_atomic
from common.telemetry import InferenceStatus

from .health import DeviceFlags, Liveness, Overload
from .ingest import BucketCounts, Stats

__all__ = ["Snapshot", "take_snapshot", "status_line", "sessions_part", "rounded", "write_report",
           "STATUS_SESSIONS"]

#: Sessions the status line names one by one; the rest are counted as ``+N more``.
STATUS_SESSIONS = 4


@dataclass(frozen=True)
class Snapshot:
    """The monitor's figures at one moment, built in the loop thread and never changed after.

    The fields hold fresh containers nobody else refers to; readers must not change them
    (:meth:`report_copy` hands out a copy of the report for callers that might).
    """

    t: float                                # monotonic time it was taken
    window_s: float
    window: dict[str, Any]                  # rolling-window figures (Stats.figures), unrounded
    states: dict[str, str]                  # per service: ok, starting, stale, unseen
    totals: dict[str, int]                  # chunks, underruns, resets
    dropped: dict[str, int]                 # by cause
    rejected: dict[str, int]                # by service, the monitor's own included
    restarts: dict[str, int]                # per service seen
    flags: dict[str, int]                   # device flag totals
    model: InferenceStatus | None           # what inference reported of its model
    overloaded: bool
    histograms: dict[str, BucketCounts]     # whole-run bucket counts by series (e2e_ms, proc_ms)
    sessions: dict[str, dict[str, Any]]     # per client session (Stats.sessions), unrounded
    batch_sizes: dict[str, int]             # inference's batched steps by how many sessions each held
    report: dict[str, Any]                  # the whole-run report, rounded, JSON-ready

    def report_copy(self) -> dict[str, Any]:
        """A copy of :attr:`report` the caller may keep and change."""
        return copy.deepcopy(self.report)


def rounded(value: Any) -> Any:
    """``value`` with every float rounded to 3 decimals (nested dicts and lists)."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def _show(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def status_line(window: dict[str, Any], overloaded: bool, totals: dict[str, int], drops: int,
                states: dict[str, str], sessions: dict[str, dict[str, Any]] | None = None) -> str:
    """The status line: rolling figures (``inf`` is the p50 of ``proc_ms``), totals, service
    states, and with more than one client session (``Stats.sessions``) :func:`sessions_part`."""
    e2e, inf = window["e2e_latency_ms"], window["inference_ms"]
    services = " ".join(f"{n} {'—' if state == 'unseen' else state}" for n, state in states.items())
    line = (("OVERLOADED | " if overloaded else "") +
            f"e2e p50 {_show(e2e['p50'])} p99 {_show(e2e['p99'])} ms | inf {_show(inf['p50'])} ms "
            f"rtf {_show(window['rtf'])} | underruns {totals['underruns']} "
            f"drops {drops} resets {totals['resets']} | {services}")
    # One session is what the figures before already say: only several get their own part.
    return f"{line} | {sessions_part(sessions)}" if sessions and len(sessions) > 1 else line


def sessions_part(sessions: dict[str, dict[str, Any]]) -> str:
    """``sessions N: NAME P50/P99 ms uUNDERRUNS, ..., +M more``: each session's e2e p50/p99 since
    the monitor started and its playback's underruns (``—`` where nothing was measured), worst
    first (most underruns, then highest p99, then by name), at most :data:`STATUS_SESSIONS` named."""
    def worst_first(item: tuple[str, dict[str, Any]]) -> tuple:
        name, s = item
        p99 = (s.get("e2e_latency_ms") or {}).get("p99")
        return -(s.get("underruns") or 0), -p99 if p99 is not None else math.inf, name

    ranked = sorted(sessions.items(), key=worst_first)
    parts = []
    for name, s in ranked[:STATUS_SESSIONS]:
        e2e, underruns = s.get("e2e_latency_ms") or {}, s.get("underruns")
        parts.append(f"{name} {_show(e2e.get('p50'))}/{_show(e2e.get('p99'))} ms "
                     f"u{'—' if underruns is None else underruns}")
    more = f", +{len(ranked) - STATUS_SESSIONS} more" if len(ranked) > STATUS_SESSIONS else ""
    return f"sessions {len(ranked)}: {', '.join(parts)}{more}"


def take_snapshot(now: float, stats: Stats, liveness: Liveness, overload: Overload, flags: DeviceFlags, *,
                  own: tuple[str, int], default_kind: str, status: str, t0: float, started_wall: str,
                  window: dict[str, Any] | None = None, sessions: dict[str, dict[str, Any]] | None = None
                  ) -> Snapshot:
    """A :class:`Snapshot` of the monitor's parts at ``now`` (in the loop thread).

    ``own`` is the monitor's name and its subscriber's reject count, ``default_kind`` the model
    kind the config names (the report's until inference says), ``status`` the latest status
    line, ``window`` the rolling figures and ``sessions`` the per-session ones (``Stats.sessions``)
    if the caller already has them for this ``now``.
    """
    if window is None:
        window = stats.figures(now, whole=False)
    if sessions is None:
        sessions = stats.sessions()
    states = liveness.states()
    totals, dropped = stats.totals(), stats.dropped()
    rejected = {**stats.rejected(), own[0]: own[1]}
    services = {}
    for name, state in states.items():
        h = liveness.health.get(name)
        services[name] = {
            "up": state in ("ok", "starting"), "ready": state == "ok", "state": state,
            "restarts": h.restarts if h else 0,
            "last_seen_s_ago": round(now - h.last_seen, 3) if h else None,
            "pids": list(h.pids) if h else [],
        }
    m = stats.inference
    batch_sizes = dict(m.batch_sizes or {}) if m else {}
    report = rounded({
        "chunks": totals["chunks"],
        **stats.figures(now, whole=True),
        "underruns": totals["underruns"],
        "dropped": dropped,
        "resets": totals["resets"],
        "device_flags": flags.summary(),
        "algorithmic_latency_ms": m.algorithmic_latency_ms if m else None,
        "latency_ms": m.latency_ms if m else None,
        "model": {"id": m.model if m else None, "untrained": m.untrained if m else None,
                  "kind": m.kind if m else default_kind, "device": m.device if m else None,
                  "backend": m.backend if m else None, "chunk_len": m.chunk_len if m else None,
                  "chunk_ms": stats.chunk_ms},
        "services": services,
        "overload": overload.summary(now),
        "rejected": rejected,
        "counters": stats.counters(),
        # Per client session (issue 18), and how many sessions each of inference's batched
        # steps converted.
        "sessions": sessions,
        "batch_sizes": batch_sizes,
        "events": dict(sorted(stats.events.items())),
        "window": {"window_s": stats.window_s, **window},
        "status_line": status,
        "duration_s": now - t0,
        "started_wall": started_wall,
    })
    return Snapshot(t=now, window_s=stats.window_s, window=window, states=states, totals=totals,
                    dropped=dict(dropped), rejected=dict(rejected),
                    restarts={n: h.restarts for n, h in liveness.health.items()}, flags=flags.totals(),
                    model=m, overloaded=overload.overloaded, histograms=stats.histograms(), sessions=sessions,
                    batch_sizes=batch_sizes, report=report)


def write_report(path: Path, report: dict[str, Any], log: Callable[..., None]) -> bool:
    """Write ``report`` as JSON to ``path`` atomically (:func:`common.files.write_atomic`);
    a failure is one error line through ``log(level, message, **fields)``, never raised."""
    try:
        write_atomic(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    except (OSError, ValueError) as exc:
        log("error", f"cannot write report: {exc}", path=str(path))
        return False
    log("info", "report written", path=str(path))
    return True
