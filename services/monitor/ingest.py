"""What the monitor counts and measures: typed telemetry records in, figures out.

:class:`Stats` takes every record (:meth:`Stats.add`, dispatching on the record's type) and
keeps, in bounded memory (:mod:`services.stats`):

* **series**, over the whole run and the last ``window_s`` seconds: ``e2e_ms`` and ``fill_ms``
  from :class:`~common.telemetry.PlaybackChunk`; ``proc_ms``, ``rtf`` and ``queue_chunks`` from
  :class:`~common.telemetry.InferenceChunk`; and ``chunks``, the number of playback chunks;
* **bucket counts** of ``e2e_ms`` and ``proc_ms`` over the whole run (:class:`Buckets`, fixed
  bounds :data:`E2E_BUCKETS_MS` and :data:`INFERENCE_BUCKETS_MS`): what ``/metrics`` serves as the
  Prometheus histograms ``llvc_e2e_latency_seconds`` and ``llvc_inference_seconds``, whose
  quantiles (``histogram_quantile``) aggregate across hosts and time, as rolling ones cannot;
* **counters** from heartbeats, summed over every process of a service
  (:class:`~services.stats.CounterLedger`, which uses the uptime to notice a reused pid);
* **model info** from inference's heartbeat status (:class:`~common.telemetry.InferenceStatus`);
* **event counts** per ``"<service>.<event name>"``, unknown names
  (:class:`~common.telemetry.OtherEvent`) included, at most :data:`MAX_EVENT_KINDS` names.

Nothing here touches the bus or the clock: callers pass ``now`` (monotonic seconds).
"""
from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from common.telemetry import (
    DROPPED_PREFIX,
    Counter,
    Event,
    Heartbeat,
    InferenceChunk,
    InferenceStatus,
    PlaybackChunk,
    PlaybackStatus,
    Record,
)
from services.stats import CounterLedger, LogHistogram, Series

__all__ = ["Stats", "Buckets", "BucketCounts", "MAX_EVENT_KINDS", "MAX_SESSIONS", "E2E_QS", "E2E_BUCKETS_MS",
           "INFERENCE_BUCKETS_MS", "HISTOGRAMS", "session_dropped"]

E2E_QS = (0.5, 0.95, 0.99)
MAX_EVENT_KINDS = 256   # distinct (service, event) names counted; more are ignored
MAX_SESSIONS = 256      # client sessions followed one by one; more are counted only in the totals
SERIES = ("e2e_ms", "proc_ms", "rtf", "queue_chunks", "fill_ms")

#: Upper bounds (ms, inclusive) of the end-to-end latency histogram. 1 ms apart where the
#: pipeline lives (22-30 ms at chunk factor 1: p50 target 22, p99 target 30), so
#: ``histogram_quantile``'s linear interpolation inside a bucket is off by well under 1 ms there;
#: coarser out to 1 s, beyond which a figure only says "broken".
E2E_BUCKETS_MS = (5, 7.5, 10, 12.5, 15, 17.5, 20, 21, 22, 23, 24, 25, 26, 28, 30, 32.5, 35, 40, 45, 50,
                  60, 70, 80, 100, 150, 200, 300, 500, 750, 1000)
#: Upper bounds (ms, inclusive) of the inference step time histogram: dense over 0.5-5 ms, where
#: steps take 1.2 ms alone and 2-6 ms in the pipeline. 13, 26 and 52 ms are the chunk durations at
#: chunk factor 1, 2 and 4, so the share of steps slower than real time reads off one bucket.
INFERENCE_BUCKETS_MS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6.5,
                        8, 10, 13, 20, 26, 52, 100)
#: Which series gets a histogram, and its bounds.
HISTOGRAMS = {"e2e_ms": E2E_BUCKETS_MS, "proc_ms": INFERENCE_BUCKETS_MS}


@dataclass(frozen=True)
class BucketCounts:
    """A :class:`Buckets` at one moment, in tuples nobody can change: safe to hand to another thread.

    ``cumulative[i]`` counts the values <= ``bounds_ms[i]``; ``count`` counts them all (the
    ``+Inf`` bucket); ``sum_ms`` is their sum.
    """

    bounds_ms: tuple[float, ...]
    cumulative: tuple[int, ...]
    count: int
    sum_ms: float


class Buckets:
    """Counts of values per fixed bucket, a count and a sum: a Prometheus histogram's figures.

    Memory is fixed (one int per bound) however long the monitor runs. A value counts in the
    first bucket whose bound is >= it (Prometheus's ``le``: inclusive), compared in the unit it
    was measured in, so a value exactly at a bound lands where its figure says.
    """

    def __init__(self, bounds_ms: tuple[float, ...]):
        if not bounds_ms or any(b >= c for b, c in zip(bounds_ms, bounds_ms[1:])):
            raise ValueError(f"bucket bounds must be increasing: {bounds_ms}")
        self.bounds_ms = tuple(float(b) for b in bounds_ms)
        self.counts = [0] * (len(bounds_ms) + 1)  # per bucket, not cumulative; the last is above every bound
        self.count = 0
        self.sum_ms = 0.0

    def add(self, value_ms: float) -> None:
        """Count one value. A non-finite one is skipped (it would poison the sum for good); a
        negative one (clocks that disagree) counts as 0, so that the sum only grows, as
        Prometheus's ``rate()`` of ``_sum`` needs."""
        if not math.isfinite(value_ms):
            return
        value_ms = max(value_ms, 0.0)
        self.counts[bisect_left(self.bounds_ms, value_ms)] += 1
        self.count += 1
        self.sum_ms += value_ms

    def snapshot(self) -> BucketCounts:
        """The counts now, cumulative per bound (what Prometheus exposes)."""
        cumulative = tuple(accumulate(self.counts[:-1]))
        return BucketCounts(self.bounds_ms, cumulative, self.count, self.sum_ms)


def session_dropped(entry: dict[str, Any]) -> dict[str, int]:
    """Dropped audio by cause of one session (an entry of :meth:`Stats.sessions`): its playback's
    drops and inference's ``dropped_<cause>`` counters for it, added where a cause is in both."""
    out = dict(entry.get("playback_dropped") or {})
    for k, v in (entry.get("inference") or {}).items():
        if k.startswith(DROPPED_PREFIX):
            cause = k[len(DROPPED_PREFIX):]
            out[cause] = out.get(cause, 0) + v
    return out


class Stats:
    """Series, bucket counts, counters, model info and event counts of one monitor run."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.series = {k: Series(window_s) for k in SERIES}
        #: Whole-run bucket counts of the series in :data:`HISTOGRAMS` (for /metrics histograms).
        self.buckets = {k: Buckets(bounds) for k, bounds in HISTOGRAMS.items()}
        self.ledger = CounterLedger()
        #: Inference's latest heartbeat status: the model it runs and its geometry.
        self.inference: InferenceStatus | None = None
        self.events: dict[str, int] = {}
        self.chunks = 0
        #: Per client session (issue 18): e2e over the whole run and chunk counts from playback's
        #: chunk records, the latest counters of each playback process by session.
        self.session_e2e: dict[str, LogHistogram] = {}
        self.session_chunks: dict[str, int] = {}
        self.playback_counters: dict[tuple[str, str, int], dict[str, int]] = {}

    # ------------------------------------------------------------------ records in
    def add(self, record: Record, now: float) -> None:
        """Take one record seen at ``now``."""
        match record:
            case PlaybackChunk():
                self.chunks += 1
                self.series["e2e_ms"].add(record.e2e_ms, now)
                self.buckets["e2e_ms"].add(record.e2e_ms)
                self.series["fill_ms"].add(record.fill_ms, now)
                s = record.session
                if s is not None and (s in self.session_e2e or len(self.session_e2e) < MAX_SESSIONS):
                    self.session_e2e.setdefault(s, LogHistogram()).add(record.e2e_ms)
                    self.session_chunks[s] = self.session_chunks.get(s, 0) + 1
            case InferenceChunk():
                self.series["proc_ms"].add(record.proc_ms, now)
                self.buckets["proc_ms"].add(record.proc_ms)
                self.series["rtf"].add(record.rtf, now)
                self.series["queue_chunks"].add(record.queue_chunks, now)
            case Heartbeat():
                self.ledger.update(record.service, record.host, record.pid, record.counters, record.uptime_s)
                if isinstance(record.status, InferenceStatus):
                    self.inference = record.status
                elif isinstance(record.status, PlaybackStatus) and record.status.session is not None:
                    key = (record.status.session, record.host, record.pid)
                    if key in self.playback_counters or len(self.playback_counters) < MAX_SESSIONS:
                        self.playback_counters[key] = record.counters
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

    def histograms(self) -> dict[str, BucketCounts]:
        """The whole-run bucket counts of each series in :data:`HISTOGRAMS`, as copies."""
        return {k: b.snapshot() for k, b in self.buckets.items()}

    def sessions(self) -> dict[str, dict[str, Any]]:
        """Per client session: chunks played, e2e quantiles, underruns and drops of its playback
        processes, and what inference counts for it (its latest heartbeat)."""
        out: dict[str, dict[str, Any]] = {}
        for name, hist in self.session_e2e.items():
            p50, p95, p99 = hist.quantiles(list(E2E_QS))
            out[name] = {"chunks": self.session_chunks[name], "e2e_latency_ms": {"p50": p50, "p95": p95, "p99": p99}}
        for (name, _, _), counters in self.playback_counters.items():
            if name not in out and len(out) >= MAX_SESSIONS:
                continue  # so that at most MAX_SESSIONS names come out (they become /metrics labels)
            entry = out.setdefault(name, {"chunks": 0})
            entry["underruns"] = entry.get("underruns", 0) + counters.get(Counter.UNDERRUNS, 0)
            drops = entry.setdefault("playback_dropped", {})
            for k, v in counters.items():
                if k.startswith(DROPPED_PREFIX):
                    drops[k[len(DROPPED_PREFIX):]] = drops.get(k[len(DROPPED_PREFIX):], 0) + v
        for s in (self.inference.sessions or []) if self.inference is not None else []:
            if isinstance(s, dict) and isinstance(s.get("name"), str) and (s["name"] in out or len(out) < MAX_SESSIONS):
                counters = s.get("counters")
                # Typed decoding leaves a session's counters unchecked (Any); keep what it would
                # let through as a heartbeat's own counters: ints, not negative.
                out.setdefault(s["name"], {"chunks": 0})["inference"] = (
                    {k: v for k, v in counters.items() if type(v) is int and v >= 0}
                    if isinstance(counters, dict) else None)
        return out

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
