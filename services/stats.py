"""Bounded-memory statistics for the monitor: percentiles over a whole run and a rolling window,
and cumulative per-process counters summed across restarts.

Nothing here touches the bus or the clock: callers pass ``now`` (monotonic seconds), so the
logic is deterministic and testable on its own.

Whole-run percentiles come from :class:`LogHistogram`, whose memory is fixed (about 180 KiB)
however long the pipeline runs. Its bins are geometric (each 0.1 % wider than the last), so a
percentile is off by at most half a bin: 0.05 % of the value (0.01 ms at 20 ms, 0.05 ms at
100 ms). Rank interpolation matches :func:`numpy.percentile`'s default (``linear``), so for
values that fall in distinct bins the result is numpy's up to that 0.05 %. The rolling window
keeps the exact samples (a window of seconds holds a few thousand at most) and uses numpy.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np


class LogHistogram:
    """Counts of values in geometric bins from :attr:`LO` to :attr:`HI`; exact count, sum, min, max.

    Values below :attr:`LO` (zero, and anything negative, which none of the monitored quantities
    should be) share an underflow bin that stands for 0; values above :attr:`HI` share the last
    bin. Every estimate is clipped to the exact ``[min, max]`` seen, so extremes are exact.
    """

    LO = 1e-3      # smallest resolved value (ms, chunks: whatever unit the caller uses)
    HI = 1e7       # largest resolved value
    RATIO = 1.001  # bin width ratio: relative error of an estimate <= sqrt(RATIO) - 1 (0.05 %)

    def __init__(self) -> None:
        self._log_ratio = math.log(self.RATIO)
        self._bins = int(math.ceil(math.log(self.HI / self.LO) / self._log_ratio))
        self.counts = np.zeros(self._bins + 1, dtype=np.int64)  # [0] is the underflow bin
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float) -> None:
        """Count one finite value."""
        if value < self.LO:
            index = 0
        else:
            index = min(self._bins, 1 + int(math.log(value / self.LO) / self._log_ratio))
        self.counts[index] += 1
        self.count += 1
        self.total += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    @property
    def mean(self) -> float | None:
        """Exact mean, ``None`` when empty."""
        return self.total / self.count if self.count else None

    def _value_of_bin(self, index: int) -> float:
        rep = 0.0 if index == 0 else self.LO * self.RATIO ** (index - 0.5)  # geometric centre
        return min(max(rep, self.min), self.max)

    def quantiles(self, qs: list[float]) -> list[float | None]:
        """Estimated quantiles (``q`` in [0, 1]) like ``numpy.quantile(..., method="linear")``."""
        if not self.count:
            return [None] * len(qs)
        cumulative = np.cumsum(self.counts)
        out = []
        for q in qs:
            rank = q * (self.count - 1)
            lo, hi = math.floor(rank), math.ceil(rank)
            # The k-th smallest value (0-based) lies in the first bin whose cumulative count > k.
            v_lo = self._value_of_bin(int(np.searchsorted(cumulative, lo, side="right")))
            v_hi = self._value_of_bin(int(np.searchsorted(cumulative, hi, side="right")))
            out.append(v_lo + (v_hi - v_lo) * (rank - lo))
        return out


class Series:
    """One measured quantity: the whole run (a :class:`LogHistogram`) and the last ``window_s``.

    The window keeps ``(time, value)`` pairs, at most ``max_window`` of them, so even a flood of
    telemetry cannot grow it without bound (the oldest go first).
    """

    def __init__(self, window_s: float, max_window: int = 100_000) -> None:
        self.window_s = window_s
        self.whole = LogHistogram()
        self._times: deque[float] = deque(maxlen=max_window)
        self._values: deque[float] = deque(maxlen=max_window)

    def add(self, value: float, now: float) -> None:
        """Record ``value`` seen at monotonic time ``now``."""
        self.whole.add(value)
        self._times.append(now)
        self._values.append(value)

    def recent(self, now: float) -> np.ndarray:
        """The values of the last ``window_s`` seconds (older ones are forgotten)."""
        cutoff = now - self.window_s
        while self._times and self._times[0] < cutoff:
            self._times.popleft()
            self._values.popleft()
        return np.fromiter(self._values, dtype=np.float64, count=len(self._values))

    def recent_quantiles(self, qs: list[float], now: float) -> list[float | None]:
        """Exact quantiles of the window, ``None`` each when it is empty."""
        values = self.recent(now)
        if not values.size:
            return [None] * len(qs)
        return [float(v) for v in np.quantile(values, qs)]

    def recent_mean(self, now: float) -> float | None:
        """Mean of the window, ``None`` when empty."""
        values = self.recent(now)
        return float(values.mean()) if values.size else None

    def recent_max(self, now: float) -> float | None:
        """Largest value in the window, ``None`` when empty."""
        values = self.recent(now)
        return float(values.max()) if values.size else None


class CounterLedger:
    """Totals of cumulative counters, summed over every process (incarnation) of each service.

    A heartbeat carries counters cumulative since *its* process started. The ledger keeps the
    latest counters per incarnation, keyed by ``(service, host, pid)``; a service's total is the
    sum over its incarnations. So a restart (new pid) neither double counts nor loses the old
    process's counts, and repeated heartbeats of one process just replace its figures. A pid that
    is reused (containers often give a restarted process the same pid) is noticed by its
    ``uptime_s`` or a counter going backwards: the old figures are folded into a retired total
    and the process starts afresh.

    Memory is bounded: past ``max_live`` incarnations of one service, the least recently
    updated is folded into the retired total (it would only matter if it came back to life).
    """

    def __init__(self, max_live: int = 64) -> None:
        self.max_live = max_live
        self._live: dict[tuple[str, str, int], dict[str, int]] = {}
        self._uptime: dict[tuple[str, str, int], float] = {}
        self._retired: dict[str, dict[str, int]] = {}

    def _retire(self, key: tuple[str, str, int]) -> None:
        retired = self._retired.setdefault(key[0], {})
        for name, n in self._live.pop(key).items():
            retired[name] = retired.get(name, 0) + n
        self._uptime.pop(key, None)

    def update(self, service: str, host: str, pid: int, counters: dict[str, int],
               uptime_s: float | None = None) -> bool:
        """Record one process's cumulative ``counters``; ``True`` if it is a new incarnation."""
        key = (service, host, pid)
        last = self._live.get(key)
        if last is not None:
            went_back = uptime_s is not None and uptime_s < self._uptime.get(key, 0.0)
            if went_back or any(n < last.get(name, 0) for name, n in counters.items()):
                self._retire(key)  # same pid, new process: keep what the old one counted
                last = None
        new = last is None
        if new:
            same_service = [k for k in self._live if k[0] == service]
            if len(same_service) >= self.max_live:
                self._retire(same_service[0])  # dicts keep update order: the first is the stalest
            last = {}
        else:
            del self._live[key]  # re-insert below: most recently updated goes last
        last.update(counters)  # per name: a message may carry only some of the counters
        self._live[key] = last
        if uptime_s is not None:
            self._uptime[key] = uptime_s
        return new

    def totals(self, service: str) -> dict[str, int]:
        """Every counter of ``service`` summed over its incarnations."""
        out = dict(self._retired.get(service, {}))
        for (svc, _, _), counters in self._live.items():
            if svc == service:
                for name, n in counters.items():
                    out[name] = out.get(name, 0) + n
        return out

    def services(self) -> list[str]:
        """Services that reported counters, sorted."""
        return sorted({k[0] for k in self._live} | set(self._retired))

    def total(self, name: str, service: str | None = None) -> int:
        """Counter ``name`` summed over one service, or over all of them."""
        names = [service] if service is not None else self.services()
        return sum(self.totals(s).get(name, 0) for s in names)

    def by_prefix(self, prefix: str) -> dict[str, int]:
        """``{rest: total}`` for every counter named ``prefix + rest``, summed over all services."""
        out: dict[str, int] = {}
        for service in self.services():
            for name, n in self.totals(service).items():
                if name.startswith(prefix) and len(name) > len(prefix):
                    out[name[len(prefix):]] = out.get(name[len(prefix):], 0) + n
        return dict(sorted(out.items()))


class OverloadWatch:
    """Says when inference cannot keep up with real time, and when it can again.

    Judged every ``interval_s`` over what arrived since the previous judgement (not over the
    rolling window, so that the end of an overload shows within one interval): overloaded when
    the mean step time exceeded the chunk duration, or when inference dropped backlog while its
    steps took more than half the chunk duration (it fell behind on its own). Backlog dropped
    while steps are fast is the network's doing (a burst after a stall or a retransmission),
    not overload: those drops show as drops.
    """

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.overloaded = False
        self.episodes = 0
        self.seconds = 0.0           # time spent overloaded, finished episodes only
        self.since: float | None = None
        self.next_at: float | None = None
        self.last_reason = ""
        self.last_duration = 0.0     # of the episode that ended last
        self._proc_sum = 0.0
        self._proc_n = 0
        self._drops_seen: int | None = None

    def add_step(self, proc_ms: float) -> None:
        """One inference step took ``proc_ms``."""
        self._proc_sum += proc_ms
        self._proc_n += 1

    def judge(self, now: float, chunk_ms: float | None, backlog_drops: int) -> str | None:
        """``"overloaded"`` or ``"cleared"`` when the state changes at this judgement, else ``None``.

        ``backlog_drops`` is inference's cumulative ``dropped_inference_backlog``.
        """
        if self.next_at is None:
            self.next_at, self._drops_seen = now + self.interval_s, backlog_drops
            return None
        if now < self.next_at:
            return None
        self.next_at = now + self.interval_s
        dropped = backlog_drops - (self._drops_seen or 0)
        self._drops_seen = backlog_drops
        mean_ms = self._proc_sum / self._proc_n if self._proc_n else None
        self._proc_sum, self._proc_n = 0.0, 0
        slow = mean_ms is not None and chunk_ms is not None and mean_ms > chunk_ms
        reasons = [f"mean step {mean_ms:.1f} ms > chunk {chunk_ms:.1f} ms"] if slow else []
        busy = chunk_ms is None or (mean_ms is not None and mean_ms > chunk_ms / 2)
        if dropped > 0 and busy:
            reasons.append(f"{dropped} chunks of backlog dropped")
        if reasons and not self.overloaded:
            self.overloaded, self.since, self.episodes = True, now, self.episodes + 1
            self.last_reason = "; ".join(reasons)
            return "overloaded"
        # Clearing needs evidence that steps run again (a dead inference is "stale", not fine).
        if not reasons and self.overloaded and mean_ms is not None:
            self.overloaded = False
            self.last_duration = now - (self.since or now)
            self.seconds += self.last_duration
            self.since = None
            return "cleared"
        if reasons:
            self.last_reason = "; ".join(reasons)
        return None

    def total_seconds(self, now: float) -> float:
        """Time spent overloaded so far, the current episode included."""
        return self.seconds + (now - self.since if self.overloaded and self.since is not None else 0.0)
