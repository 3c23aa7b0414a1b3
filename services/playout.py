"""Adaptive playout: how far behind the arrivals the jitter buffer's timeline should run.

Pure logic, no clocks or audio: :class:`AdaptivePlayout` sees one number per arriving chunk,
its **headroom** (in samples): how far ahead of the read position its first sample was when it
arrived. Negative headroom means the chunk was late by that much (its place was already played).
It answers how far to move the timeline: later (grow, the buffer pauses) or earlier (shrink, the
buffer skips a few samples under a crossfade).

The rule follows WebRTC NetEq's: the timeline should sit just behind the latest arrivals seen
recently. An arrival later than every recent one is what an underrun is, so an estimate from
the extreme of a sliding window holds underruns to about one per window:

* **Grow at once** on a late chunk, by its lateness plus :data:`SAFETY_MS`, so that an arrival
  as late as this one would have made it. One late chunk is enough: it has already underrun,
  and its successors usually arrive as late (a slow step, a congested link).
* **Shrink slowly**: when even the least headroom of the window (``window_s`` of arrivals) is
  above :data:`SAFETY_MS`, give back at most :data:`SHRINK_STEP_MS` per :data:`SHRINK_EVERY`
  arrivals (0.25 ms per 100 ms at 13 ms chunks), so latency creeps down to what the
  arrivals need without an audible jump.
* **Bounds**: the margin, the headroom of the median of the last :data:`RECENT` arrivals,
  which is what a fixed ``target_ms`` used to set, stays between ``floor_ms`` and
  ``ceiling_ms``: growth stops at the ceiling and shrinking at the floor. A stall (a few chunks
  arriving together) therefore grows the timeline by the ceiling at most, and loses the rest;
  a link that stays later is followed once most recent arrivals are late, as the margin is
  then measured against them (within the buffer's ``max_ms``).

Headrooms are stored minus the sum of the moves so far, so one move shifts the whole window
without rewriting it.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from common.audio import SAMPLE_RATE, ms_to_samples

#: Headroom kept for the latest arrival of the window: room for an arrival slightly later than
#: any seen, and for the read position stepping a block at a time.
SAFETY_MS = 0.5
#: Largest single shrink. A cut this short under a crossfade is not heard as a jump.
SHRINK_STEP_MS = 0.25
#: Arrivals between two shrinks (about 100 ms at 13 ms chunks).
SHRINK_EVERY = 8
#: Arrivals the margin is the median of: recent enough that a lasting change of the arrivals
#: moves it within about 100 ms at 13 ms chunks, enough that one stall's chunks do not.
RECENT = 16
#: A window holding fewer arrivals than this says too little about the lateness to shrink by.
MIN_ARRIVALS = 32


class AdaptivePlayout:
    """See the module docstring. All amounts are samples; times are monotonic ns."""

    def __init__(self, floor_ms: float, ceiling_ms: float, window_s: float, sample_rate: int = SAMPLE_RATE,
                 coverage: float = 1.0):
        if not 0 <= floor_ms < ceiling_ms:
            raise ValueError(f"need 0 <= floor_ms < ceiling_ms, got {floor_ms} and {ceiling_ms}")
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        if not 0.5 <= coverage <= 1.0:
            raise ValueError(f"coverage must be in [0.5, 1], got {coverage}")
        self.coverage = coverage
        self.sr = sample_rate
        self.floor = ms_to_samples(floor_ms, sample_rate)
        self.ceiling = ms_to_samples(ceiling_ms, sample_rate)
        self.window_ns = int(window_s * 1e9)
        self.safety = ms_to_samples(SAFETY_MS, sample_rate)
        self.step = max(1, ms_to_samples(SHRINK_STEP_MS, sample_rate))
        self.reset()

    def reset(self) -> None:
        """Forget every arrival (a new stream)."""
        self._window: deque[tuple[int, int]] = deque()  # (arrival ns, headroom - shift)
        self._shift = 0
        self._since = 0  # arrivals since the last move

    def headrooms(self) -> np.ndarray:
        """The window's headrooms as the timeline stands now (samples)."""
        return np.fromiter((h for _, h in self._window), np.int64, len(self._window)) + self._shift

    @property
    def margin(self) -> int | None:
        """The median recent arrival's headroom now (samples), None before any arrival."""
        if not self._window:
            return None
        return int(np.median(self.headrooms()[-RECENT:]))

    def _covered(self, h: np.ndarray) -> int:
        """The least headroom among the ``coverage`` share of the window that arrived earliest
        relative to the timeline: all of it at 1.0 (the window's minimum)."""
        k = min(len(h) - 1, int((1.0 - self.coverage) * len(h)))
        return int(np.partition(h, k)[k]) if k else int(h.min())

    def moved(self, delta: int) -> None:
        """The timeline moved by ``delta`` samples for another reason (an overflow trim)."""
        self._shift += delta

    def arrived(self, headroom: int, arrival_ns: int, room: int) -> int:
        """Note a chunk's headroom at its arrival; returns the move: > 0 grow (the timeline runs
        that much later; at most ``room``, what the buffer can hold), < 0 shrink, 0 neither."""
        self._window.append((arrival_ns, headroom - self._shift))
        while arrival_ns - self._window[0][0] > self.window_ns:
            self._window.popleft()
        self._since += 1
        h = self.headrooms()
        margin = int(np.median(h[-RECENT:]))
        covered = self._covered(h)
        if headroom < 0:
            move = max(0, min(self.safety - covered, self.ceiling - margin, room))
        elif self._since >= SHRINK_EVERY and len(h) >= MIN_ARRIVALS:
            move = -max(0, min(self.step, covered - self.safety, margin - self.floor))
        else:
            move = 0
        if move:
            self._shift += move
            self._since = 0
            return move
        return 0
