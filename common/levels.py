"""Level meters and a banded spectrum of audio, for dashboards: what a sound frame holds.

A :class:`LevelMeter` takes blocks of samples from any thread (:meth:`LevelMeter.feed` only
appends a reference to a bounded deque, so an audio path never waits on it) and, in the thread
that publishes, cuts them into frames of ``frame_s`` seconds and measures each
(:meth:`LevelMeter.frames`): RMS and peak in dBFS and the power in :data:`BANDS` log-spaced
bands from :data:`LOW_HZ` to the Nyquist frequency: the mean power of the band's FFT bins, in dB
(Welch's average of Hann-windowed periodograms of :data:`FFT_LEN` samples, half overlapping). Levels are floored at
:data:`FLOOR_DB` so that silence is a number (JSON has no -inf).

Cost, measured on this 2-core VM: a 0.1 s frame at 16 kHz takes ~150 µs to measure: 1.5 ms
of CPU per second at 10 frames a second.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = ["BANDS", "LOW_HZ", "FFT_LEN", "FLOOR_DB", "Levels", "LevelMeter", "band_centres_hz", "measure"]

BANDS = 32          # spectrum bands per frame
LOW_HZ = 80.0       # lowest band edge: below the lowest voice fundamental of interest
FFT_LEN = 1024      # 64 ms at 16 kHz: 15.6 Hz bins, fine enough for the lowest bands
FLOOR_DB = -120.0   # silence
MAX_PENDING = 256   # blocks held between two takes; the oldest go first if nobody takes them


@dataclass(frozen=True)
class Levels:
    """One frame's measurements."""

    rms_dbfs: float
    peak_dbfs: float
    spectrum_db: list[float]    # power per band (:func:`band_centres_hz`), dB re full scale


def _db(power: np.ndarray | float) -> np.ndarray:
    return np.maximum(10 * np.log10(np.maximum(power, 1e-30)), FLOOR_DB)


@cache
def _band_edges(sample_rate: int) -> np.ndarray:
    return np.geomspace(LOW_HZ, sample_rate / 2, BANDS + 1)


def band_centres_hz(sample_rate: int) -> list[float]:
    """The geometric centre of each band, Hz."""
    e = _band_edges(sample_rate)
    return [round(float(x), 1) for x in np.sqrt(e[:-1] * e[1:])]


@cache
def _band_matrix(sample_rate: int) -> np.ndarray:
    """``(BANDS, FFT_LEN // 2 + 1)`` weights: each band averages the bins whose centre it holds,
    or, for a band narrower than a bin, takes the bin holding its centre."""
    freqs = np.fft.rfftfreq(FFT_LEN, 1 / sample_rate)
    edges = _band_edges(sample_rate)
    m = np.zeros((BANDS, len(freqs)))
    for b in range(BANDS):
        inside = (freqs >= edges[b]) & (freqs < edges[b + 1])
        if not inside.any():
            inside = np.zeros(len(freqs), bool)
            inside[int(round(np.sqrt(edges[b] * edges[b + 1]) / (sample_rate / FFT_LEN)))] = True
        m[b, inside] = 1.0 / inside.sum()
    return m


@cache
def _window() -> tuple[np.ndarray, float]:
    w = np.hanning(FFT_LEN).astype(np.float32)
    return w, float((w ** 2).sum())


def measure(x: np.ndarray, sample_rate: int) -> Levels:
    """RMS, peak and band spectrum of ``x`` (float samples, full scale = 1)."""
    x = np.asarray(x, np.float32)
    if not len(x):
        return Levels(FLOOR_DB, FLOOR_DB, [FLOOR_DB] * BANDS)
    rms_db = float(_db(float(np.mean(x.astype(np.float64) ** 2))))
    peak_db = float(_db(float(np.max(np.abs(x))) ** 2))
    if len(x) < FFT_LEN:
        x = np.concatenate([x, np.zeros(FFT_LEN - len(x), np.float32)])
    w, norm = _window()
    starts = range(0, len(x) - FFT_LEN + 1, FFT_LEN // 2)
    segments = np.stack([x[s:s + FFT_LEN] for s in starts]) * w
    # One-sided power per bin, scaled so that the bins sum to the signal's mean square (Parseval
    # with the window's energy): a band shows the mean power of its bins.
    power = (np.abs(np.fft.rfft(segments, axis=1)) ** 2).mean(axis=0) * 2 / (norm * FFT_LEN)
    bands = _db(_band_matrix(sample_rate) @ power)
    return Levels(round(rms_db, 2), round(peak_db, 2), [round(float(v), 1) for v in bands])


class LevelMeter:
    """Frames of ``frame_s`` seconds cut from what :meth:`feed` is given (see the module docstring)."""

    def __init__(self, sample_rate: int, frame_s: float):
        self.sample_rate = sample_rate
        self.frame_len = max(1, round(frame_s * sample_rate))
        self._pending: collections.deque[np.ndarray] = collections.deque(maxlen=MAX_PENDING)
        self._held = np.zeros(0, np.float32)

    def feed(self, samples: np.ndarray) -> None:
        """Hand over a block (any thread; never blocks; the caller must not change it later)."""
        self._pending.append(samples)

    def frames(self) -> list[Levels]:
        """Every complete frame since the last call, measured (in the caller's thread)."""
        blocks = []
        while True:
            try:
                blocks.append(self._pending.popleft())
            except IndexError:
                break
        if not blocks:
            return []
        x = np.concatenate([self._held, *blocks])
        n = len(x) // self.frame_len
        self._held = x[n * self.frame_len:].copy()
        return [measure(x[i * self.frame_len:(i + 1) * self.frame_len], self.sample_rate) for i in range(n)]
