"""What the monitor counts and measures: typed telemetry records in, figures out.

:class:`Stats` takes every record (:meth:`Stats.add`, dispatching on the record's type) and
keeps, in bounded memory (:mod:`services.stats`):

* **series**, over the whole run and the last ``window_s`` seconds: ``e2e_ms`` and ``fill_ms``
  from :class:`~common.telemetry.PlaybackChunk`; ``proc_ms``, ``rtf`` and ``queue_chunks`` from
  :class:`~common.telemetry.InferenceChunk`; and ``chunks``, the number of playback chunks;
* **counters** from heartbeats, summed over every process of a service
  (:class:`~services.stats.CounterLedger`, which uses the uptime to notice a reused pid);
* **model info** from inference's heartbeat status (:class:`~common.telemetry.InferenceStatus`);
* **event counts** per ``"<service>.<event name>"``, unknown names
  (:class:`~common.telemetry.OtherEvent`) included, at most :data:`MAX_EVENT_KINDS` names.

Nothing here touches the bus or the clock: callers pass ``now`` (monotonic seconds).
"""
from __future__ import annotations

from typing import Any

from common.telemetry import (
    DROPPED_PREFIX,
    Counter,
    Event,
    Heartbeat,
    InferenceChunk,
    InferenceStatus,
    PlaybackChunk,
    Record,
)
from services.stats import CounterLedger, Series

__all__ = ["Stats", "MAX_EVENT_KINDS", "E2E_QS"]

E2E_QS = (0.5, 0.95, 0.99)
MAX_EVENT_KINDS = 256   # distinct (service, event) names counted; more are ignored
SERIES = ("e2e_ms", "proc_ms", "rtf", "queue_chunks", "fill_ms")


class Stats:
    """Series, counters, model info and event counts of one monitor run."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.series = {k: Series(window_s) for k in SERIES}
        self.ledger = CounterLedger()
        #: Inference's latest heartbeat status: the model it runs and its geometry.
        self.inference: InferenceStatus | None = None
        self.events: dict[str, int] = {}
        self.chunks = 0

    # ------------------------------------------------------------------ records in
    def add(self, record: Record, now: float) -> None:
        """Take one record seen at ``now``."""
        match record:
            case PlaybackChunk():
                self.chunks += 1
                self.series["e2e_ms"].add(record.e2e_ms, now)
                self.series["fill_ms"].add(record.fill_ms, now)
            case InferenceChunk():
                self.series["proc_ms"].add(record.proc_ms, now)
                self.series["rtf"].add(record.rtf, now)
                self.series["queue_chunks"].add(record.queue_chunks, now)
            case Heartbeat():
                self.ledger.update(record.service, record.host, record.pid, record.counters, record.uptime_s)
                if isinstance(record.status, InferenceStatus):
                    self.inference = record.status
            case Event():
                key = f"{record.service}.{record.name}"
                if key in self.events or len(self.events) < MAX_EVENT_KINDS:
                    self.events[key] = self.events.get(key, 0) + 1
            case _:
                pass  # audio headers: the monitor does not subscribe to them

    # ------------------------------------------------------------------ figures out
    @property
    def chunk_ms(self) -> float | None:
        """The chunk duration inference reports, ``None`` until its heartbeat says (a duration
        that is not positive means nothing: typed decoding checks types, not sense)."""
        ms = self.inference.chunk_ms if self.inference is not None else None
        return ms if ms is not None and ms > 0 else None

    def total(self, counter: str) -> int:
        """Counter ``counter`` summed over every service."""
        return self.ledger.total(counter)

    def dropped(self) -> dict[str, int]:
        """Dropped audio by cause (every ``dropped_<cause>`` counter), summed over services."""
        return self.ledger.by_prefix(DROPPED_PREFIX)

    def totals(self) -> dict[str, int]:
        """The run's totals: chunks played, underruns, resets."""
        return {"chunks": self.chunks, "underruns": self.total(Counter.UNDERRUNS), "resets": self.total(Counter.RESETS)}

    def counters(self) -> dict[str, dict[str, int]]:
        """Every service's counters, summed over its processes."""
        return {s: self.ledger.totals(s) for s in self.ledger.services()}

    def rejected(self) -> dict[str, int]:
        """Counter ``rejected`` per service that reported counters."""
        return {s: self.ledger.total(Counter.REJECTED, s) for s in self.ledger.services()}

    def rtf(self, mean_proc_ms: float | None, mean_rtf: float | None) -> float | None:
        """Chunk duration / mean step time: a ratio of means rather than a mean of per-chunk
        ratios, which fast chunks would inflate. Until the chunk duration is known, the mean
        of the per-chunk ``rtf`` stands in."""
        chunk_ms = self.chunk_ms
        if chunk_ms and mean_proc_ms:
            return chunk_ms / mean_proc_ms
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
            "rtf": self.rtf(mean("proc_ms"), mean("rtf")),
            "queue": {"inference_chunks_p95": quantiles("queue_chunks", (0.95,))[0],
                      "playback_fill_ms_p50": quantiles("fill_ms", (0.5,))[0]},
        }
