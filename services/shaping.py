"""Streaming audio shaping stages for the inference service's audio path (numpy only).

Every stage is stateful, causal and streaming: it is called once per chunk (208 samples, 13 ms, or
any other length, chunk lengths may vary), returns a new 1-D ``float32`` array of the input's
length at once (no added latency), never modifies its input and never returns NaN or Inf for
finite input (non-finite input samples are taken as 0).

* :class:`Gain`: a gain in dB whose changes ramp linearly (no zipper noise, no click).
* :class:`NoiseGate`: passes the signal while its level reaches a threshold, exact zeros otherwise.
* :class:`Agc`: automatic gain control to the level the model was trained at.
* :func:`crossfade`: a linear, equal-gain mix from one signal to another, across chunks.

Level detection (gate and AGC) works on 1 ms blocks (16 samples at 16 kHz) aligned to the
absolute sample index of the stream, not to chunk starts: a block's level is known when its last
sample arrives and its decision applies from the sample after it. That is a detection delay of one
block (1 ms), and it makes the output independent of how the stream is split into chunks: the same
signal gives the same output whether it comes in one call or in pieces of any sizes.
"""
from __future__ import annotations

import math

import numpy as np

from common.audio import SAMPLE_RATE

__all__ = [
    "SAMPLE_RATE",
    "BLOCK_MS",
    "PEAK_CEILING",
    "db_to_gain",
    "Gain",
    "NoiseGate",
    "Agc",
    "crossfade",
]

#: Length of the level-detection blocks of :class:`NoiseGate` and :class:`Agc` (16 samples at 16 kHz).
BLOCK_MS = 1.0
#: The most :class:`Agc`'s output may reach in absolute value (headroom below full scale).
PEAK_CEILING = 0.99
#: The largest gain :class:`Gain` accepts: beyond it float32 output could overflow to Inf.
MAX_GAIN_DB = 100.0
#: A release ramp's values below this are 0.0: an interrupted ramp's end can land a rounding error
#: above zero, and the gate's promise is that closed means exact digital silence.
_TINY = 1e-9


def db_to_gain(db: float) -> float:
    """The linear amplitude gain of ``db`` decibels: ``10 ** (db / 20)``; 0 dB is exactly 1.0, -inf dB 0.0."""
    return 10.0 ** (float(db) / 20.0)


def _gain_to_db(gain: float) -> float:
    """Decibels of a positive linear gain."""
    return 20.0 * math.log10(gain)


def _as_signal(x: np.ndarray, name: str = "x") -> np.ndarray:
    """``x`` as a 1-D float32 array (no copy when it is one already), non-finite samples replaced by 0.

    The check sums in float64, which cannot overflow for float32 samples, so the sum is non-finite
    exactly when some sample is: one cheap reduction on the common, clean path.
    """
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    if a.size and not math.isfinite(float(np.add.reduce(a, dtype=np.float64))):
        a = np.where(np.isfinite(a), a, np.float32(0.0))
    return a


def _number(name: str, value: float, minimum: float | None = None) -> float:
    """``value`` as a finite float, at least ``minimum``; ValueError otherwise."""
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}, got {value!r}")
    return v


def _check_rate(sample_rate: int) -> int:
    """A positive integer sample rate; ValueError otherwise."""
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    return int(sample_rate)


def _block_len(sample_rate: int) -> int:
    """Samples per level-detection block: :data:`BLOCK_MS` at ``sample_rate`` (16 at 16 kHz)."""
    return max(1, round(sample_rate * BLOCK_MS / 1000.0))


class _Blocks:
    """Splits a stream into fixed-length blocks aligned to its absolute sample index.

    Holds the samples of the incomplete block between calls; :meth:`feed` returns the blocks that
    a chunk completes, as rows of a 2-D array.
    """

    def __init__(self, block: int):
        """Blocks of ``block`` samples, starting at stream sample 0."""
        self.block = block
        self._carry = np.zeros(block, dtype=np.float32)
        #: Samples of the incomplete block held in ``_carry`` (= stream position modulo ``block``).
        self.phase = 0

    def reset(self) -> None:
        """Forget the incomplete block: the next sample starts a new stream at position 0."""
        self.phase = 0

    def feed(self, x: np.ndarray) -> np.ndarray:
        """The ``(k, block)`` float32 blocks that ``x`` completes (``k`` may be 0); keeps the rest.

        Row ``i`` ends at sample ``(i + 1) * block - phase`` of ``x`` (exclusive), ``phase`` being
        the value before this call.
        """
        b, ph, n = self.block, self.phase, len(x)
        nb = (ph + n) // b
        rem = (ph + n) - nb * b
        if nb == 0:
            blocks = np.empty((0, b), dtype=np.float32)
            self._carry[ph:ph + n] = x
        else:
            used = nb * b - ph
            # Only the first block needs the carried samples: join just those, not the whole chunk.
            blocks = np.concatenate((self._carry[:ph], x[:used])) if ph else x[:used]
            blocks = blocks.reshape(nb, b)
            if rem:
                self._carry[:rem] = x[used:]
        self.phase = rem
        return blocks


def _sum_squares(blocks: np.ndarray) -> np.ndarray:
    """Each row's sum of squares (float32: 16 squares lose nothing that a level decision could see).

    One einsum, the cheapest numpy way; a row gives the same bits wherever it lies in memory, which
    keeps the output independent of the chunking.
    """
    return np.einsum("ij,ij->i", blocks, blocks)


class Gain:
    """A gain in dB whose changes ramp linearly over ``ramp_ms`` (no zipper noise / click).

    In steady state the output is exactly ``x * float32(gain)``, and a neutral gain (exactly 1.0,
    no ramp in progress) returns the input's values bit for bit (in a new array). ``-inf`` dB mutes.
    """

    def __init__(self, db: float = 0.0, ramp_ms: float = 5.0, sample_rate: int = SAMPLE_RATE):
        """Start at ``db`` with no ramp in progress; later :meth:`set_db` calls ramp over ``ramp_ms``."""
        self.sample_rate = _check_rate(sample_rate)
        self.ramp_ms = _number("ramp_ms", ramp_ms, 0.0)
        self._ramp_n = round(self.ramp_ms * self.sample_rate / 1000.0)
        self._db = self._check_db(db)
        self._gain = db_to_gain(self._db)  # the target: the gain once any ramp is done
        self._from = self._gain            # the ramp's start gain
        self._len = 0                      # the ramp's length in samples; 0: no ramp in progress
        self._pos = 0                      # samples of the ramp already output

    @staticmethod
    def _check_db(db: float) -> float:
        """``db`` as a float: a number up to :data:`MAX_GAIN_DB`, or -inf (mute); ValueError otherwise."""
        v = float(db)
        if math.isnan(v) or v > MAX_GAIN_DB:
            raise ValueError(f"gain must be at most {MAX_GAIN_DB:g} dB (or -inf), got {db!r}")
        return v

    @property
    def db(self) -> float:
        """The gain in dB that was last set (reached once a ramp in progress ends)."""
        return self._db

    @property
    def neutral(self) -> bool:
        """True when the gain is exactly 1.0 and no ramp is in progress (process() is a copy)."""
        return self._len == 0 and self._gain == 1.0

    def _current(self) -> float:
        """The gain applied to the last sample output."""
        if self._len == 0:
            return self._gain
        return self._from + (self._gain - self._from) * (self._pos / self._len)

    def set_db(self, db: float) -> None:
        """Aim for ``db``: from the next process() call, ramp there from the current gain over ``ramp_ms``."""
        db = self._check_db(db)
        current = self._current()
        self._db = db
        target = db_to_gain(db)
        self._gain = target
        if self._ramp_n <= 1 or target == current:
            # A one-sample ramp is a jump anyway; an unchanged gain needs no ramp.
            self._len = 0
        else:
            self._from, self._len, self._pos = current, self._ramp_n, 0

    def process(self, x: np.ndarray) -> np.ndarray:
        """``x`` times the gain (ramping while a change is in progress), as a new float32 array."""
        x = _as_signal(x)
        if self._len == 0:
            if self._gain == 1.0:
                return x.copy()
            return x * np.float32(self._gain)
        n = len(x)
        out = np.empty(n, dtype=np.float32)
        k = min(n, self._len - self._pos)
        if k:
            # Ramp sample i (1-based) has gain from + (to - from) * i / len: computed from the ramp's
            # start, not accumulated, so where chunks split the ramp cannot change a single bit.
            steps = np.arange(self._pos + 1, self._pos + k + 1, dtype=np.float64)
            steps /= self._len
            g = self._from + (self._gain - self._from) * steps
            np.multiply(x[:k], g, out=out[:k], casting="unsafe")
            self._pos += k
        if self._pos >= self._len:
            self._len = 0
            if k:
                # The ramp's last sample is the steady gain itself, computed like the steady state.
                out[k - 1] = x[k - 1] * np.float32(self._gain)
            if k < n:
                np.multiply(x[k:], np.float32(self._gain), out=out[k:])
        return out


class NoiseGate:
    """A noise gate: opens when the input level reaches ``threshold_db`` (dBFS), holds open for ``hold_ms``
    after the level last reached it, then closes over ``release_ms``; opens over ``attack_ms``.

    Closed means gain exactly 0.0: a gated span comes out as exact digital silence (zeros); fully
    open means gain exactly 1.0: the input's values bit for bit.

    Level: RMS over 1 ms blocks (16 samples at 16 kHz) aligned to the stream's absolute sample index,
    in dBFS = ``20 * log10(rms)`` (an RMS of 1.0 is 0 dBFS; a full-scale sine is -3 dBFS). A block's
    decision applies from the sample after its last one: a detection delay of 1 ms, the price of an
    output that does not depend on how the stream is split into chunks and of no added latency.
    A block at or above the threshold (re)starts the hold: the gate is held open for ``hold_ms``
    (at least one block, so that a steady signal above the threshold keeps it open) from that point.
    The gain ramps linearly: 0 -> 1 over ``attack_ms`` while held open, 1 -> 0 over ``release_ms``
    once the hold has run out (from wherever it is when the direction changes). ``attack_ms=0`` opens
    on the first sample after the deciding block. The gate starts closed.
    """

    def __init__(self, threshold_db: float = -50.0, attack_ms: float = 1.0, hold_ms: float = 100.0,
                 release_ms: float = 50.0, sample_rate: int = SAMPLE_RATE):
        """A closed gate with these settings (see the class docstring for what each means)."""
        self.sample_rate = _check_rate(sample_rate)
        self._blocks = _Blocks(_block_len(self.sample_rate))
        self.threshold_db = self.attack_ms = self.hold_ms = self.release_ms = 0.0
        self.configure(threshold_db, attack_ms, hold_ms, release_ms)
        self.reset()

    def configure(self, threshold_db: float | None = None, attack_ms: float | None = None,
                  hold_ms: float | None = None, release_ms: float | None = None) -> None:
        """Change settings live (None keeps one); the gate's state (gain, hold, block) is kept.

        A ramp in progress goes on from the current gain at the new rate; a hold in progress keeps
        its remaining length, and the next block above the threshold starts a hold of the new length.
        """
        thr = self.threshold_db if threshold_db is None else _number("threshold_db", threshold_db)
        att = self.attack_ms if attack_ms is None else _number("attack_ms", attack_ms, 0.0)
        hold = self.hold_ms if hold_ms is None else _number("hold_ms", hold_ms, 0.0)
        rel = self.release_ms if release_ms is None else _number("release_ms", release_ms, 0.0)
        self.threshold_db, self.attack_ms, self.hold_ms, self.release_ms = thr, att, hold, rel
        per_ms = self.sample_rate / 1000.0
        # Compared with each block's sum of squares: no log (and no log of zero) per block.
        self._threshold_sum = self._blocks.block * 10.0 ** (thr / 10.0)
        # Ramp lengths in samples, at least 1: a ramp of one sample (or less) is a jump.
        self._attack_n = max(1.0, att * per_ms)
        self._release_n = max(1.0, rel * per_ms)
        self._hold_n = max(self._blocks.block, round(hold * per_ms))
        if hasattr(self, "_gain"):
            self._run_g0, self._run_pos = self._gain, 0

    def reset(self) -> None:
        """Back to the initial state: closed (gain 0), no hold, a new stream from sample 0."""
        self._blocks.reset()
        self._hold_left = 0   # samples, from the next input sample on, that the gate is held open for
        self._gain = 0.0      # the gain applied to the last sample output
        # The current ramp ("run"): direction (+1 opening, -1 closing), start gain, samples into it.
        self._dir, self._run_g0, self._run_pos = -1, 0.0, 0

    @property
    def is_open(self) -> bool:
        """True while any signal passes (the gain of the last sample output is above 0)."""
        return self._gain > 0.0

    @property
    def gain(self) -> float:
        """The gain (0.0 to 1.0) applied to the last sample output, e.g. for a meter."""
        return self._gain

    def process(self, x: np.ndarray) -> np.ndarray:
        """``x`` through the gate, as a new float32 array of the same length."""
        x = _as_signal(x)
        n = len(x)
        out = np.empty(n, dtype=np.float32)
        if n == 0:
            return out
        b, ph = self._blocks.block, self._blocks.phase
        blocks = self._blocks.feed(x)
        hold = self._hold_n
        # Open spans in this chunk, merged: the hold left from before, then [t, t + hold) from each
        # loud block's end t (t may be n: a block ending with the chunk holds the next one open).
        spans: list[tuple[int, int]] = []
        s, e = 0, self._hold_left
        if len(blocks):
            loud = np.flatnonzero(_sum_squares(blocks) >= self._threshold_sum)
            for t in ((loud + 1) * b - ph).tolist():
                if t <= e:
                    e = max(e, t + hold)
                else:
                    if e > s:
                        spans.append((s, e))
                    s, e = t, t + hold
        if e > s:
            spans.append((s, e))
        self._hold_left = max(0, e - n)

        pos = 0
        for s, e in spans:
            if s >= n:
                break
            if s > pos:
                self._run(x, out, pos, s, -1)
            pos = min(e, n)
            self._run(x, out, s, pos, +1)
        if pos < n:
            self._run(x, out, pos, n, -1)
        return out

    def _run(self, x: np.ndarray, out: np.ndarray, a: int, b: int, direction: int) -> None:
        """Gate ``x[a:b]`` into ``out[a:b]`` with the gain ramping in ``direction`` (+1 open, -1 close)."""
        if direction != self._dir:
            self._dir, self._run_g0, self._run_pos = direction, self._gain, 0
        if direction > 0 and self._gain == 1.0:
            out[a:b] = x[a:b]
            return
        if direction < 0 and self._gain == 0.0:
            out[a:b] = 0.0
            return
        # Gains from the ramp's start and the sample count, not accumulated: the same bits whichever
        # chunks and blocks split the ramp. Division (not a reciprocal) ends a full ramp at exactly 0 or 1.
        k = np.arange(self._run_pos + 1, self._run_pos + (b - a) + 1, dtype=np.float64)
        if direction > 0:
            k /= self._attack_n
            g = np.add(k, self._run_g0, out=k)
            np.minimum(g, 1.0, out=g)
        else:
            k /= self._release_n
            g = np.subtract(self._run_g0, k, out=k)
            g[g < _TINY] = 0.0
        np.multiply(x[a:b], g, out=out[a:b], casting="unsafe")
        self._run_pos += b - a
        self._gain = float(g[-1])
        if self._gain in (0.0, 1.0):
            # At rest: restart the run there, so that its sample count cannot grow without bound.
            self._run_g0, self._run_pos = self._gain, 0


class Agc:
    """Automatic gain control before the model: brings speech to ``target_dbfs`` (the level the model was
    trained at), with the gain bounded to [min_gain_db, max_gain_db], and no pumping on pauses: the level
    estimate only moves while speech is present (a block louder than ``speech_floor_dbfs``), and the gain
    is held through pauses.

    Per 1 ms block (16 samples at 16 kHz, aligned to the stream's absolute sample index, like
    :class:`NoiseGate`; 1 ms detection delay):

    * a speech block (mean square above ``speech_floor_dbfs``) updates the speech level, the mean
      square averaged over speech blocks with an exponential window of ``window_s`` (over the first
      ``window_s`` of speech, a plain running mean: the estimate starts from the first speech, not
      from zero), and moves the gain toward ``clip(target_dbfs - level_db, min_gain_db, max_gain_db)``
      by at most ``rise_db_per_s`` up and ``fall_db_per_s`` down (per second of speech);
    * a non-speech block moves neither: the gain is held through pauses;
    * peak limiter: if the block's peak times the gain would exceed :data:`PEAK_CEILING`, the gain
      drops at once so that it does not (below ``min_gain_db`` if need be), then recovers at the rise
      rate. The gain cannot know a block's samples before they arrive, so every output sample is
      also clipped to +-:data:`PEAK_CEILING`: a sudden loud onset is clipped for at most ~2 ms.

    The gain decided after a block ramps linearly, sample by sample, over the next block (no steps).
    All of it runs on linear gains and mean squares (dB limits become factors): no log or power per
    block, which keeps a 13 ms chunk's 13 block decisions cheap in Python.
    """

    def __init__(self, target_dbfs: float = -24.4, max_gain_db: float = 24.0, min_gain_db: float = -12.0,
                 speech_floor_dbfs: float = -50.0, window_s: float = 0.4, rise_db_per_s: float = 12.0,
                 fall_db_per_s: float = 40.0, sample_rate: int = SAMPLE_RATE):
        """An AGC at 0 dB gain with no level estimate yet (see the class docstring for the settings)."""
        self.sample_rate = _check_rate(sample_rate)
        b = _block_len(self.sample_rate)
        self._blocks = _Blocks(b)
        block_s = b / self.sample_rate
        self.min_gain_db = _number("min_gain_db", min_gain_db)
        self.target_dbfs = self.max_gain_db = 0.0
        self.configure(target_dbfs, max_gain_db)
        self.speech_floor_dbfs = _number("speech_floor_dbfs", speech_floor_dbfs)
        self.window_s = _number("window_s", window_s)
        if self.window_s <= 0.0:
            raise ValueError(f"window_s must be positive, got {window_s!r}")
        self.rise_db_per_s = _number("rise_db_per_s", rise_db_per_s, 0.0)
        self.fall_db_per_s = _number("fall_db_per_s", fall_db_per_s, 0.0)
        self._min_gain = db_to_gain(self.min_gain_db)
        self._floor_sum = b * 10.0 ** (self.speech_floor_dbfs / 10.0)   # against a block's sum of squares
        self._alpha = -math.expm1(-block_s / self.window_s)  # per-block weight of the exponential window
        self._up = db_to_gain(self.rise_db_per_s * block_s)         # the most the gain may grow per block
        self._down = db_to_gain(-self.fall_db_per_s * block_s)      # the most it may shrink per block
        # Ramp positions 1/b .. b/b: a block's last sample gets the new gain exactly (up to rounding).
        self._frac = np.arange(1, b + 1, dtype=np.float64) / b
        self.reset()

    def configure(self, target_dbfs: float | None = None, max_gain_db: float | None = None) -> None:
        """Change the target level and/or the gain's upper bound live; the state is kept.

        The gain moves toward the new target at the rise/fall rates; a gain above a lowered bound
        comes down to it over the next block.
        """
        target = self.target_dbfs if target_dbfs is None else _number("target_dbfs", target_dbfs)
        top = self.max_gain_db if max_gain_db is None else _number("max_gain_db", max_gain_db)
        if top < self.min_gain_db:
            raise ValueError(f"max_gain_db ({top:g}) must be at least min_gain_db ({self.min_gain_db:g})")
        self.target_dbfs, self.max_gain_db = target, top
        self._max_gain = db_to_gain(top)
        self._target_sum = _block_len(self.sample_rate) * 10.0 ** (target / 10.0)

    def reset(self) -> None:
        """Gain back to 0 dB, level estimate forgotten, a new stream from sample 0."""
        self._blocks.reset()
        self._level = 0.0       # speech level: a block's sum of squares (valid once _n_speech > 0)
        self._n_speech = 0      # speech blocks seen, up to the window's length (for the running mean)
        # The current block's ramp: linear gain at its start and at its end (the gain decided last).
        self._g_start = self._g_end = 1.0

    @property
    def gain_db(self) -> float:
        """The gain in dB decided last (reached at the end of the block being output now)."""
        return _gain_to_db(self._g_end)

    def process(self, x: np.ndarray) -> np.ndarray:
        """``x`` with the automatic gain applied, as a new float32 array of the same length."""
        x = _as_signal(x)
        n = len(x)
        if n == 0:
            return np.empty(0, dtype=np.float32)
        b, ph = self._blocks.block, self._blocks.phase
        blocks = self._blocks.feed(x)
        peak = float(np.abs(x).max())
        # Block-boundary gains: gains[0], gains[1] are the current block's start and end; each block
        # this chunk completes decides the end of the one after it.
        gains = [self._g_start, self._g_end]
        if len(blocks):
            sums = _sum_squares(blocks).tolist()
            # Per-block peaks only when the limiter could act (the gain cannot pass ``bound``); with the
            # phase at 0 (208-sample chunks) the blocks are all in x, whose peak is known already.
            bound = max(self._g_end, self._max_gain)
            peaks = np.abs(blocks).max(axis=1).tolist() if ph or peak * bound > PEAK_CEILING else None
            gains.extend(self._decide(sums, peaks))
        nb = len(gains) - 2
        self._g_start, self._g_end = gains[nb], gains[nb + 1]

        periods = (ph + n + b - 1) // b   # blocks that the chunk's samples fall in
        used = gains[:periods + 1]
        # Every sample's gain lies between two of ``used``: below the ceiling, no sample needs clipping.
        clip = peak * max(used) > PEAK_CEILING
        g = np.asarray(used, dtype=np.float64)
        start = g[:-1, None]
        ramp = (start + (g[1:, None] - start) * self._frac).ravel()[ph:ph + n]
        y = np.multiply(x, ramp, out=ramp)
        if clip:
            np.minimum(y, PEAK_CEILING, out=y)
            np.maximum(y, -PEAK_CEILING, out=y)
        return y.astype(np.float32)

    def _decide(self, sums: list[float], peaks: list[float] | None) -> list[float]:
        """The linear gain at the end of the block after each of these completed blocks (sums of squares)."""
        out = []
        gain = self._g_end
        floor, alpha, window_n = self._floor_sum, self._alpha, 1.0 / self._alpha
        level, count = self._level, self._n_speech
        lo, hi, target, up, down = self._min_gain, self._max_gain, self._target_sum, self._up, self._down
        for i, m in enumerate(sums):
            if m > floor:
                if count < window_n:
                    count += 1
                # A running mean until the window has filled, then exponential: no bias toward 0.
                level += max(alpha, 1.0 / count) * (m - level)
                desired = min(max(math.sqrt(target / level), lo), hi)
                gain = min(desired, gain * up) if desired > gain else max(desired, gain * down)
            if gain > hi:
                gain = hi
            if peaks is not None and peaks[i] * gain > PEAK_CEILING:
                gain = PEAK_CEILING / peaks[i]
            out.append(gain)
        self._level, self._n_speech = level, count
        return out


def crossfade(old: np.ndarray, new: np.ndarray, start: int, length: int) -> np.ndarray:
    """Mix from ``old`` to ``new`` with a linear (equal-gain) ramp: samples before ``start`` are ``old``,
    samples from ``start + length`` on are exactly ``new``, in between the ramp.

    ``old`` and ``new`` are the same span of two signals (equal lengths). Sample ``i`` at ramp
    position ``p = i - start`` (``0 <= p < length``) is ``old + w * (new - old)`` with
    ``w = (p + 0.5) / length``, computed in float64: equal gain suits two correlated signals (the same
    voice from two models or settings), where an equal-power ramp would bulge. ``start`` and
    ``length`` may reach past the arrays' ends: then only part of the ramp is in this chunk, and the
    caller continues it in the next chunk with ``start`` reduced by this chunk's length (negative:
    ``start=-50`` means the ramp began 50 samples before this chunk); the pieces are bit-identical
    to one call over the concatenation. Outside the ramp the output is bit-identical to old / new.
    ``length <= 0`` switches at ``start`` with no ramp. Returns a new float32 array.
    """
    old = _as_signal(old, "old")
    new = _as_signal(new, "new")
    n = len(old)
    if len(new) != n:
        raise ValueError(f"old and new must have the same length, got {n} and {len(new)}")
    start, length = int(start), max(0, int(length))
    lo = min(max(start, 0), n)
    hi = min(max(start + length, lo), n)
    out = np.empty(n, dtype=np.float32)
    out[:lo] = old[:lo]
    out[hi:] = new[hi:]
    if hi > lo:
        w = np.arange(lo - start, hi - start, dtype=np.float64)
        w += 0.5
        w /= length
        # float64 throughout: a float32 new - old would round before the weighting.
        a = old[lo:hi].astype(np.float64)
        out[lo:hi] = a + w * (new[lo:hi] - a)
    return out
