"""Acoustic end-to-end latency through real (PulseAudio null-sink) devices, as ``jack_iodelay`` does.

The pipeline captures from sink A's monitor and plays into sink B. The test plays a known signal
into A and records **both** monitors, each with its own recorder process, on one clock
(``CLOCK_MONOTONIC``, mapped from PortAudio's ADC times exactly as capture maps them). A burst
that appears in A's monitor at ``t_a`` and in B's monitor at ``t_b`` took ``t_b - t_a`` through
the pipeline: from the instant capture's device delivered it to the instant playback's device
played it, which is what the monitor's e2e claims to measure. The two recorders are the same
code on the same kind of source, so their own input latency (what the issue calls the test's
play/record path) cancels in the difference instead of being measured separately.

Bursts are Hann-windowed 2 kHz tone bursts (5 ms): inside the band the 16 kHz model path keeps,
and sharp under cross-correlation (sub-sample peaks by parabolic interpolation).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RATE = 48_000
BURST_HZ = 2_000
BURST_S = 0.005
#: Bursts this far apart: longer than any plausible latency, so each is matched unambiguously.
PERIOD_S = 0.5
#: A match in B below this normalised correlation is no match.
MIN_MATCH = 0.5

# A recorder process: sounddevice on the default input (PULSE_SOURCE picks the monitor), 48 kHz,
# latency low. Prints "ready" at its first callback; on SIGTERM/stdin EOF writes NPZ: samples,
# and per block its first sample's index and the CLOCK_MONOTONIC ns it was captured at (the
# block's ADC time mapped through one tight stream-clock reading, as capture maps them).
_RECORDER = r'''
import sys, time, signal, threading, numpy as np, sounddevice as sd
out, rate = sys.argv[1], int(sys.argv[2])
blocks, adc, stop = [], [], threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
def cb(indata, frames, t, status):
    blocks.append(indata[:, 0].copy()); adc.append(t.inputBufferAdcTime)
    if len(blocks) == 1:
        print("ready", flush=True)
with sd.InputStream(samplerate=rate, channels=1, dtype="float32", latency="low", callback=cb) as s:
    syncs = []
    for _ in range(5):  # stream clock and CLOCK_MONOTONIC sampled together, tightest pair kept
        a = time.monotonic_ns(); st = s.time; b = time.monotonic_ns()
        syncs.append((b - a, st, (a + b) // 2))
    _, st0, mono0 = min(syncs)
    while not stop.wait(0.05):
        pass
starts = np.cumsum([0] + [len(b) for b in blocks[:-1]])
ok = np.array(adc) > 0
np.savez(out, samples=np.concatenate(blocks), starts=starts[ok], adc_ns=mono0 + (np.array(adc)[ok] - st0) * 1e9)
'''


def burst(rate: int = RATE) -> np.ndarray:
    """One probe: a Hann-windowed tone burst."""
    n = int(BURST_S * rate)
    t = np.arange(n) / rate
    return (0.5 * np.sin(2 * np.pi * BURST_HZ * t) * np.hanning(n)).astype(np.float32)


def burst_train(count: int, rate: int = RATE, lead_s: float = 0.3) -> np.ndarray:
    """``count`` bursts every :data:`PERIOD_S`, after ``lead_s`` of silence."""
    period = int(PERIOD_S * rate)
    lead = int(lead_s * rate)
    x = np.zeros(lead + count * period, np.float32)
    b = burst(rate)
    for k in range(count):
        x[lead + k * period:lead + k * period + len(b)] = b
    return x


class Recorder:
    """A recorder process on one PulseAudio source (``PULSE_SOURCE``)."""

    def __init__(self, source: str, out: Path, env: dict):
        self.out = Path(out)
        self.proc = subprocess.Popen([sys.executable, "-c", _RECORDER, str(self.out), str(RATE)],
                                     env={**env, "PULSE_SOURCE": source}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the first input callback (raises RuntimeError on failure)."""
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready or self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"recorder did not start: {self.proc.stderr.read()[-500:]}")

    def stop(self) -> Recording:
        """Stop it; returns what it recorded."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        if not self.out.exists():
            raise RuntimeError(f"recorder wrote nothing: {err[-500:]}")
        data = np.load(self.out)
        return Recording(data["samples"], data["starts"], data["adc_ns"])


@dataclass
class Recording:
    """48 kHz samples and when they were captured: per block, its first sample's index and
    monotonic time.

    :meth:`time_ns` maps a sample position through the blocks *around* it, not through one
    origin for the whole recording: on a loaded machine a PulseAudio monitor's sample count and
    its ADC times drift apart by up to ±9 ms over 20 s (measured with two CPU burners beside a
    test run), and one origin put that drift into the latency, differently in each recorder.
    """

    samples: np.ndarray
    starts: np.ndarray  # index of each block's first sample
    adc_ns: np.ndarray  # monotonic ns each block's first sample was captured

    #: Blocks this close (either side) to a position decide its time: long enough for the
    #: median to outvote scheduling jitter of single blocks, short against the drift.
    WINDOW_S = 0.25

    def time_ns(self, pos: float) -> float:
        """Monotonic ns at which sample ``pos`` (fractional) was captured."""
        if not len(self.starts):
            raise ValueError("the recorder saw no ADC time")
        reach = self.WINDOW_S * RATE
        lo, hi = np.searchsorted(self.starts, [pos - reach, pos + reach])
        if hi <= lo:  # no block nearby (a position past the last one): the nearest block
            lo = min(int(np.searchsorted(self.starts, pos)), len(self.starts) - 1)
            hi = lo + 1
        origin = self.adc_ns[lo:hi] - self.starts[lo:hi] * 1e9 / RATE
        return float(np.median(origin)) + pos * 1e9 / RATE

    def position(self, t_ns: float) -> int:
        """The sample captured nearest to monotonic ``t_ns``."""
        pos = (t_ns - self.time_ns(0)) * RATE / 1e9
        for _ in range(2):  # the first guess's origin may be start-up's, off by 100+ ms
            pos += (t_ns - self.time_ns(pos)) * RATE / 1e9
        return int(round(pos))


def play(sink: str, signal: np.ndarray, env: dict, workdir: Path) -> subprocess.Popen:
    """Start playing ``signal`` (48 kHz mono float32) into ``sink`` with ``pacat``."""
    raw = Path(workdir) / "probe.f32"
    raw.write_bytes(np.ascontiguousarray(signal, dtype="<f4").tobytes())
    return subprocess.Popen(["pacat", "--playback", "-d", sink, "--rate", str(RATE), "--channels", "1",
                             "--format", "float32le", "--latency-msec", "10", str(raw)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def find_bursts(x: np.ndarray, rate: int = RATE, threshold: float = 0.2) -> list[float]:
    """Sub-sample positions of the bursts in ``x`` (matched filter peaks, one per period)."""
    b = burst(rate)
    corr = np.correlate(x, b, mode="valid")
    level = threshold * float(np.dot(b, b))
    peaks, k, gap = [], 0, int(0.8 * PERIOD_S * rate)
    while k < len(corr):
        if corr[k] > level:
            w = corr[k:k + len(b)]
            j = k + int(np.argmax(w))
            peaks.append(float(j) + _parabolic(corr, j))
            k = j + gap
        else:
            k += 1
    return peaks


def _parabolic(c: np.ndarray, j: int) -> float:
    if 0 < j < len(c) - 1:
        den = c[j - 1] - 2 * c[j] + c[j + 1]
        if den:
            return float(0.5 * (c[j - 1] - c[j + 1]) / den)
    return 0.0


@dataclass
class Acoustic:
    """Per-burst latencies (ms) from A's monitor to B's monitor, and the waveforms' similarity."""

    latencies_ms: list[float]
    correlation: float     # median normalised correlation of a burst with its copy in B
    missed: int = 0        # bursts of A not found in B
    times_ns: list[float] = None  # monotonic time each matched burst entered (A)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.latencies_ms))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


def measure(rec_a: Recording, rec_b: Recording, max_latency_s: float = 0.4) -> Acoustic:
    """Match every burst of recording A with the same burst in B, on the monotonic clock."""
    xa, xb = rec_a.samples.astype(np.float64), rec_b.samples.astype(np.float64)
    lat, corrs, times, missed = [], [], [], 0
    for p in find_bursts(xa):
        t_a = rec_a.time_ns(p)
        # Where in B that instant falls, then search the next max_latency_s there.
        start = rec_b.position(t_a)
        if start < 0 or start + int(max_latency_s * RATE) + len(burst()) > len(xb):
            continue
        seg_b = xb[start:start + int(max_latency_s * RATE) + len(burst())]
        ref = xa[int(p):int(p) + len(burst())]
        c = np.correlate(seg_b, ref, mode="valid")
        j = int(np.argmax(c))
        got = seg_b[j:j + len(ref)]
        denom = float(np.linalg.norm(got) * np.linalg.norm(ref))
        r = float(np.dot(got, ref)) / denom if denom else 0.0
        if r < MIN_MATCH:  # nothing of it came out (lost, or the pipeline was not running yet)
            missed += 1
            continue
        corrs.append(r)
        t_b = rec_b.time_ns(start + j + _parabolic(c, j) + (p - int(p)))
        lat.append((t_b - t_a) / 1e6)
        times.append(t_a)
    return Acoustic(lat, float(np.median(corrs)) if corrs else 0.0, missed, times)


def locate(x: np.ndarray, ref: np.ndarray) -> int:
    """Where ``ref`` best matches inside ``x`` (FFT cross-correlation)."""
    n = 1 << int(np.ceil(np.log2(len(x) + len(ref))))
    c = np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(ref, n)), n)[: len(x) - len(ref) + 1]
    return int(np.argmax(c))


def clip_match(rec_a: Recording, rec_b: Recording, clip: np.ndarray, latency_ms: float,
               window_s: float = 0.5, search_ms: float = 30.0) -> float:
    """How exactly ``clip`` as recorded in A comes out in B: the median over ``window_s`` pieces
    of the normalised correlation, each piece aligned on its own.

    The clip is found in A by cross-correlation; each piece is looked for in B around
    ``latency_ms`` later on the monotonic clock (+- ``search_ms``: the latency may step when the
    jitter buffer adapts), at the best sample alignment. Silent pieces are skipped.
    """
    xa, xb = rec_a.samples.astype(np.float64), rec_b.samples.astype(np.float64)
    ia = locate(xa, clip.astype(np.float64))
    n, reach = int(window_s * RATE), int(search_ms * RATE / 1000)
    scores = []
    for k in range(ia, ia + len(clip) - n + 1, n):
        seg_a = xa[k:k + n]
        if np.sqrt(np.mean(seg_a ** 2)) < 1e-3:
            continue
        centre = rec_b.position(rec_a.time_ns(k) + latency_ms * 1e6)
        lo = max(0, centre - reach)
        seg_b = xb[lo:centre + reach + n]
        if len(seg_b) < n:
            continue
        j = locate(seg_b, seg_a)
        got = seg_b[j:j + n]
        den = float(np.linalg.norm(seg_a) * np.linalg.norm(got))
        scores.append(float(np.dot(seg_a, got)) / den if den else 0.0)
    return float(np.median(scores)) if scores else 0.0


def report_e2e(report_path: Path) -> dict:
    """The monitor's e2e figures from an ``llvc run --report`` JSON."""
    rep = json.loads(Path(report_path).read_text())
    return rep["e2e_latency_ms"]


def wait_for(pred, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()

