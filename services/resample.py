"""A streaming polyphase FIR resampler with a known, constant delay (numpy only).

Capture resamples a sound card's native rate (48 kHz, 44.1 kHz, ...) to the model's 16 kHz and
playback 16 kHz back up to the card's rate. Streaming soxr holds its output back in blocks (HQ:
6-37 ms behind its input from 48 kHz, 21 ms on average); this filter releases every output
sample as soon as the input it needs has arrived, so what it costs is its group delay: 1.62 ms
from 48 kHz, 1.69 ms from 44.1 kHz (``scripts/bench_resample.py``).

The rate change ``rate_out / rate_in = L / M`` (reduced) is done as the textbook zero-stuff by
``L``, low-pass, keep every ``M``-th sample, without computing the zeros or the dropped samples:
output sample ``j`` is ``sum_i x[i] * h[j*M - i*L]`` over input samples ``i >= 0`` (the stream
starts from silence), with ``h`` split into ``L`` phases of ``K`` taps each. ``h`` is a
linear-phase low-pass at the rate ``rate_in * L`` (see :func:`design`):

* passband up to 7/16 of the lower rate (7 kHz when one side is 16 kHz), ripple <= 0.05 dB;
* stopband from 1/2 of the lower rate (8 kHz) on, attenuated >= 71 dB: what would alias on the
  way down (playback's upsampler starts it at 9 kHz, where the passband's images begin);
* its length ``N`` has ``(N - 1) / 2`` a multiple of ``M``, so the group delay is a whole number
  of output samples: output ``j`` is the input signal at input position
  ``j * M / L - delay_in``, ``delay_in = (N - 1) / (2 L)`` input samples, that is
  ``delay_out = (N - 1) / (2 M)`` output samples. Dropping the first ``delay_out`` outputs
  makes output ``j`` the input's time ``j / rate_out`` exactly (what capture does).

Ratios with ``max(L, M) <= MAX_FACTOR`` are supported (48000/32000/96000 -> 16000, 16000 ->
48000, and 44100 <-> 16000 = 160/441 too); :func:`supported` says whether a pair is. A 10 ms
block takes 25-40 us here (soxr: ~4 us).
"""
from __future__ import annotations

from functools import lru_cache
from math import ceil, gcd

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

#: Largest up/down factor accepted (44100 <-> 16000 is 160/441).
MAX_FACTOR = 1000
#: Passband edge and (default) stopband edge, as fractions of the lower rate: 7 and 8 kHz at
#: 16 kHz. A stopband from 1/2 rejects everything that would alias on the way down; on the way up
#: (playback), a stopband from ``1 - PASSBAND`` (9 kHz) rejects the images of the passband.
PASSBAND = 0.4375
STOPBAND = 0.5
#: What the filter is designed to, and checked against: stopband attenuation (dB) and the
#: passband's deviation from 0 dB (dB, either way).
ATTENUATION_DB = 71.0
RIPPLE_DB = 0.05
#: Up to this many taps on each side of the centre (at the higher rate), the filter is a
#: minimax design, about 30% shorter than a Kaiser window's for the same spec (whose passband
#: ripple equals its stopband's, wasting the ripple allowed); beyond, a Kaiser-windowed sinc.
MINIMAX_MAX_HALF = 1000
#: Up to this many phases the phases are filtered one matrix product each; beyond, the
#: windows are gathered and each multiplied by its own phase.
_LOOP_PHASES = 8


def ratio(rate_in: int, rate_out: int) -> tuple[int, int]:
    """``(L, M)``: ``rate_out / rate_in`` reduced."""
    g = gcd(rate_in, rate_out)
    return rate_out // g, rate_in // g


def supported(rate_in: int, rate_out: int) -> bool:
    """Whether :class:`StreamResampler` takes this pair of rates (different, small factors)."""
    if rate_in <= 0 or rate_out <= 0 or rate_in == rate_out:
        return False
    return max(ratio(rate_in, rate_out)) <= MAX_FACTOR


def _deviations() -> tuple[float, float]:
    return 10 ** (RIPPLE_DB / 20) - 1, 10 ** (-ATTENUATION_DB / 20)


def _meets_spec(h: np.ndarray, fs: float, f_pass: float, f_stop: float) -> bool:
    """Whether ``h`` (DC gain 1) meets :data:`RIPPLE_DB` and :data:`ATTENUATION_DB`."""
    n = 1 << max(16, int(np.ceil(np.log2(len(h) * 32))))
    amp = np.abs(np.fft.rfft(h, n))
    f = np.arange(len(amp)) * fs / n
    passband, stopband = amp[f <= f_pass], amp[f >= f_stop]
    db = 20 * np.log10(np.maximum(passband, 1e-12))
    return bool(np.abs(db).max() <= RIPPLE_DB and stopband.max() <= 10 ** (-ATTENUATION_DB / 20))


def _minimax(fs: float, f_pass: float, f_stop: float, half: int, iterations: int = 12) -> np.ndarray:
    """A linear-phase low-pass of ``2 * half + 1`` taps close to equiripple, by Lawson's
    iteratively reweighted least squares: the weight of each grid frequency grows with its error
    until the largest weighted errors are nearly alike (:func:`design` checks what came out)."""
    dp, ds = _deviations()
    width = fs / 2 - (f_stop - f_pass)  # the bands' total width: ~8 grid points per tap there
    grid = np.concatenate([np.linspace(0, f_pass, max(32, round(8 * half * f_pass / width))),
                           np.linspace(f_stop, fs / 2, max(32, round(8 * half * (fs / 2 - f_stop) / width)))])
    want = (grid <= f_pass).astype(np.float64)
    weight = np.where(grid <= f_pass, 1 / dp, 1 / ds)
    # Amplitude at frequency f: a0 + 2 * sum_k a_k cos(2 pi f k / fs); h = [a_half..a_1, a0, a_1..a_half].
    basis = np.cos(2 * np.pi * np.outer(grid, np.arange(half + 1)) / fs)
    basis[:, 1:] *= 2
    v = np.ones(len(grid))
    for _ in range(iterations):
        w = np.sqrt(v) * weight
        a = np.linalg.lstsq(basis * w[:, None], want * w, rcond=None)[0]
        err = np.abs(basis @ a - want) * weight
        v *= err
        v /= v.sum()
    return np.concatenate([a[:0:-1], a])


def _kaiser(fs: float, f_pass: float, f_stop: float, half: int, attenuation_db: float) -> np.ndarray:
    """A Kaiser-windowed sinc of ``2 * half + 1`` taps, DC gain 1."""
    beta = 0.1102 * (attenuation_db - 8.7)
    cutoff = (f_pass + f_stop) / 2 / fs
    t = np.arange(-half, half + 1, dtype=np.float64)
    h = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(2 * half + 1, beta)
    return h / h.sum()


def _kaiser_half(fs: float, f_pass: float, f_stop: float, attenuation_db: float) -> float:
    """Kaiser's estimate of ``(N - 1) / 2`` for a windowed sinc."""
    return (attenuation_db - 7.95) / (2.285 * 2 * np.pi * (f_stop - f_pass) / fs) / 2


def _interpolated(h: np.ndarray, factor: int, base: float, f_stop: float, down: int) -> np.ndarray:
    """``h`` (at ``base``) carried to ``base * factor``: zero-stuffed, then smoothed by a short
    windowed sinc that is flat (0.001 dB) to ``f_stop`` and removes ``h``'s images from
    ``base - f_stop`` on by 10 dB more than the stopband. The response is ``h``'s times the
    kernel's, and ``h``'s stopband covers the kernel's transition. The kernel's length is picked
    so that the total ``(N - 1) / 2`` is a multiple of ``down``."""
    fs = base * factor
    half_h = (len(h) - 1) // 2
    db = ATTENUATION_DB + 10
    half_g = ceil(_kaiser_half(fs, f_stop, base - f_stop, db))
    half_g += -(half_h * factor + half_g) % down
    stuffed = np.zeros((len(h) - 1) * factor + 1)
    stuffed[::factor] = h
    out = np.convolve(stuffed, _kaiser(fs, f_stop, base - f_stop, half_g, db))
    return (out + out[::-1]) / 2  # exactly symmetric (linear phase), as both parts are


@lru_cache(maxsize=16)
def design(rate_in: int, rate_out: int, stopband: float = STOPBAND) -> np.ndarray:
    """The prototype low-pass ``h`` at ``rate_in * L`` (float64, DC gain ``L``, read-only).

    Passband to ``PASSBAND``, stopband from ``stopband`` (fractions of the lower rate).
    ``len(h) - 1`` is a multiple of ``2 * M``, so the delay is whole output samples.

    The filter is a minimax design at the higher of the two rates (``base``: the prototype's
    own rate for integer ratios), the shortest one (from Herrmann's estimate up) that meets the
    spec; for rational ratios (44.1 kHz) it is then carried up to the prototype's rate by
    :func:`_interpolated` (+0.1 ms of delay). Where neither fits, a Kaiser-windowed sinc.
    """
    up, down = ratio(rate_in, rate_out)
    fs = rate_in * up  # a multiple of both rates
    low, base = min(rate_in, rate_out), max(rate_in, rate_out)
    factor = fs // base
    f_pass, f_stop = PASSBAND * low, stopband * low
    if not f_pass < f_stop <= base / 2:
        raise ValueError(f"stopband {stopband} is not between the passband and the Nyquist frequency")
    dp, ds = _deviations()
    # Herrmann's estimate of the equiripple length at the base rate.
    equiripple = (-20 * np.log10(np.sqrt(dp * ds)) - 13) / (14.6 * (f_stop - f_pass) / base)
    minimax = (equiripple / 2 <= MINIMAX_MAX_HALF
               and (factor == 1 or base - 2 * f_stop >= f_stop - f_pass))  # room for the kernel
    if minimax:
        grain = down if factor == 1 else 1  # (N - 1) / 2 must be a multiple of M
        half = grain * max(1, ceil(0.95 * equiripple / 2 / grain))
    else:
        grain = down
        half = grain * max(1, ceil(_kaiser_half(fs, f_pass, f_stop, ATTENUATION_DB + 1) / grain))
    for _ in range(64):
        if not minimax:
            h = _kaiser(fs, f_pass, f_stop, half, ATTENUATION_DB + 1)  # 1 dB over: the estimate runs short
        elif factor == 1:
            h = _minimax(base, f_pass, f_stop, half)
        else:
            h = _interpolated(_minimax(base, f_pass, f_stop, half), factor, base, f_stop, down)
        if _meets_spec(h, fs, f_pass, f_stop):
            break
        half += grain * max(1, round(0.02 * half / grain))  # 2% longer at a time
    else:
        raise RuntimeError(f"no filter for {rate_in} -> {rate_out} Hz meets the spec")
    h = h * up
    h.setflags(write=False)
    return h


class StreamResampler:
    """Resample a mono float32 stream from ``rate_in`` to ``rate_out`` block by block.

    :meth:`process` takes blocks of any size and returns every output sample whose inputs have
    all arrived; the concatenated outputs equal filtering the whole stream at once (to float32
    rounding), and after ``n`` input samples ``ceil(n * L / M)`` outputs have come out.
    """

    def __init__(self, rate_in: int, rate_out: int, stopband: float = STOPBAND):
        if not supported(rate_in, rate_out):
            raise ValueError(f"cannot resample {rate_in} -> {rate_out} Hz "
                             f"(rates must differ, with factors up to {MAX_FACTOR})")
        self.rate_in, self.rate_out = rate_in, rate_out
        self.up, self.down = ratio(rate_in, rate_out)
        h = design(rate_in, rate_out, stopband)
        #: Taps of the prototype filter (at ``rate_in * up``).
        self.taps = len(h)
        half = (self.taps - 1) // 2
        #: Group delay in output samples (a whole number) and in input samples.
        self.delay_out = half // self.down
        self.delay_in = half / self.up
        #: Taps per phase: each output sample is a dot product of this many input samples.
        self.k = ceil(self.taps / self.up)
        padded = np.zeros(self.k * self.up)
        padded[:self.taps] = h
        # phases[p, k] = h[p + k*L], reversed along k so that a window buf[s:s+K] of the input
        # (oldest first) dots with it directly.
        self.phases = np.ascontiguousarray(padded.reshape(self.k, self.up).T[:, ::-1], dtype=np.float32)
        self.reset()

    def reset(self) -> None:
        """Start over from silence (as if newly made)."""
        # _buf[0] is input sample b (K-1 zeros stand for the silence before the stream);
        # _rel is the next output's position at the up-sampled rate, counted from _buf[0].
        self._buf = np.zeros(self.k - 1, np.float32)
        self._rel = (self.k - 1) * self.up

    def process(self, x: np.ndarray) -> np.ndarray:
        """Feed ``x`` (1-D float32); the output samples it completes (float32, maybe none)."""
        x = np.asarray(x, dtype=np.float32)
        buf = np.concatenate([self._buf, x]) if len(x) else self._buf
        up, down, k = self.up, self.down, self.k
        count = max(0, -(-(len(buf) * up - self._rel) // down))
        y = np.empty(count, np.float32)
        if count:
            n = self._rel + down * np.arange(min(count, up), dtype=np.int64)
            starts, phase = n // up - (k - 1), n % up  # window start and phase of outputs 0..up-1
            windows = sliding_window_view(buf, k)
            if up <= _LOOP_PHASES:
                # Outputs t, t+L, t+2L, ... share a phase and their windows step by M inputs.
                for t in range(len(n)):
                    y[t::up] = windows[starts[t]::down][:len(range(t, count, up))] @ self.phases[phase[t]]
            else:
                n = self._rel + down * np.arange(count, dtype=np.int64)
                starts, phase = n // up - (k - 1), n % up
                y[:] = np.einsum("ij,ij->i", windows[starts], self.phases[phase])
        nxt = self._rel + count * down
        drop = nxt // up - (k - 1)  # the next output's window starts here: older input is done
        self._buf = buf[drop:].copy()
        self._rel = nxt - drop * up
        return y

    # soxr.ResampleStream's names, so either can sit where a resampler goes.
    resample_chunk = process
    clear = reset
