"""Playback's outputs: the paced ``null``/``file:`` clock and the PortAudio device.

Sinks
  * ``null``: paced by ``CLOCK_MONOTONIC`` exactly like a device: a tick every ``block_ms``,
    scheduled from the sink's start ``t0`` (tick ``k`` at ``t0 + k * block``, so it never
    drifts); a block's output time is its scheduled tick time.
  * ``file:PATH``: the ``null`` pacing plus a :class:`WavRecorder` on PATH: every played sample
    of the first stream goes into a 32-bit float WAV aligned to the source (file sample ``i`` =
    stream offset ``i``). When the stream drains the file is exactly ``source_end`` samples
    long and is closed.
  * ``device:NAME-or-INDEX``: a PortAudio output stream at the device's own rate. The service
    reads the jitter buffer, resamples 16 kHz to the device rate and keeps a small ring topped
    up (one callback's worth plus 3 ms); the audio callback only copies from that ring. Output
    times come from PortAudio's ``outputBufferDacTime`` mapped to ``CLOCK_MONOTONIC``. Here
    ``target_ms`` is the slack between a stream's first arrival and the moment its audio leaves
    the buffer; the ring and the device's latency come on top, and e2e includes them.

The paced sinks run inside :meth:`PlaybackService.loop_once` (one thread: the socket is polled
until the next tick is due), and every sink feeds its recorders from the service thread, so a
file is written from the service loop, never from a clock callback.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from common.audio import SAMPLE_RATE
from common.devices import DeviceError, find_device, read_stream_clock
from services.jitter import JitterBuffer, ReadResult
from services.recorder import SinkError, WavRecorder
from services.resample import PASSBAND, StreamResampler, supported

MAX_TICKS_PER_PUMP = 50        # a late paced sink catches up at most this many blocks per pump
RESYNC_NS = 1_000_000_000      # further behind than this (process stopped): restart the schedule
DEVICE_POLL_NS = 1_000_000     # how often the device ring is topped up
DEVICE_MARGIN_S = 0.003        # ring fill kept beyond one callback's worth
#: The device path resamples 16 kHz up with :class:`services.resample.StreamResampler`: flat to
#: 7 kHz (0.05 dB) and the images of 0-7 kHz (from 9 kHz up) 71 dB down, for its group delay of
#: 0.81 ms at 48 kHz (0.93 ms at 44.1 kHz), which :meth:`DeviceSink.pump` counts in the output
#: time. Streaming soxr emits HQ/MQ output in ~1500-frame bursts (up to 37 ms behind its input at
#: 16 -> 48 kHz), LQ up to 20 ms; QQ (cubic) is 0.1 ms behind but poor: measured with tones,
#: 7 kHz comes out 4.3 dB down with its 9 kHz image only 5.7 dB under it (4 kHz: -0.6 dB, image
#: -26 dB). QQ is kept for rates the FIR does not take.
RESAMPLE_QUALITY = "QQ"
#: Stopband of the playback resampler, as a fraction of 16 kHz: images of the passband (7 kHz)
#: start at 9 kHz, and a stopband from there halves the filter (and its delay) against 8 kHz.
PLAYBACK_STOPBAND = 1 - PASSBAND


class Sink(Protocol):
    """What playback drives: an output with its own clock that takes audio out of the buffer.

    Every sink hands each 16 kHz block it reads to its :attr:`recorders` (the WAV files).
    """

    recorders: list[WavRecorder]

    def open(self) -> None:
        """Acquire what the sink plays to; raise :class:`SinkError` if it cannot (exit 2)."""

    def start(self, now_ns: int) -> None:
        """Start the clock; the first block is due now."""

    def describe(self) -> dict[str, Any]:
        """Fields for the "sink open" log line."""

    def next_due_ns(self) -> int:
        """When :meth:`pump` should run next (monotonic ns)."""

    def pump(self, jb: JitterBuffer, now_ns: int) -> list[tuple[ReadResult, int]]:
        """Read what is due from ``jb``; each block read with the monotonic ns it reaches the output."""

    def counters(self) -> dict[str, int]:
        """Cumulative counters (mirrored into the heartbeat)."""

    def status(self) -> dict[str, Any]:
        """Fields of :class:`~common.telemetry.PlaybackStatus` this sink fills."""

    def close(self) -> None:
        """Release the sink (idempotent)."""


# --------------------------------------------------------------------------- paced sink
class PacedSink:
    """``null`` and ``file:``: consumes ``block_ms`` of audio per tick on the monotonic clock,
    like a device; each block goes to the :attr:`recorders` (a file sink has one)."""

    def __init__(self, spec: str, block_ms: float, log: Callable[..., None]):
        self.spec = spec
        self.n = max(1, round(block_ms * SAMPLE_RATE / 1000))
        self.buf = np.zeros(self.n, np.float32)
        self.log = log
        self.recorders: list[WavRecorder] = []
        self.t0 = 0
        self.k = 0
        self.resyncs = 0
        self.lateness = np.zeros(4096, np.int64)  # how late recent ticks ran, ns (for status)
        self.ticks = 0

    def open(self) -> None:
        """Acquire what the sink plays to; raise :class:`SinkError` if it cannot."""

    def start(self, now_ns: int) -> None:
        """Start the clock: tick k is due at ``now_ns + k * block``."""
        self.t0, self.k = now_ns, 0

    def describe(self) -> dict[str, Any]:
        return {"block_ms": self.n * 1000 / SAMPLE_RATE}

    def next_due_ns(self) -> int:
        return self.t0 + self.k * self.n * 1_000_000_000 // SAMPLE_RATE

    def pump(self, jb: JitterBuffer, now_ns: int) -> list[tuple[ReadResult, int]]:
        """Run every tick that is due; each reads one block whose output time is its schedule."""
        if now_ns - self.next_due_ns() > RESYNC_NS:
            self.resyncs += 1
            self.log("warning", "sink fell behind; schedule restarted",
                     behind_ms=(now_ns - self.next_due_ns()) / 1e6)
            self.start(now_ns)
        played = []
        for _ in range(MAX_TICKS_PER_PUMP):
            t = self.next_due_ns()
            if t > now_ns:
                break
            self.lateness[self.ticks % len(self.lateness)] = now_ns - t
            self.ticks += 1
            res = jb.read(self.n, self.buf, t)
            for r in self.recorders:
                r.consume(res, self.buf)
            played.append((res, t))
            self.k += 1
        return played

    def counters(self) -> dict[str, int]:
        return {"sink_resyncs": self.resyncs}

    def status(self) -> dict[str, Any]:
        late = self.lateness[:min(self.ticks, len(self.lateness))] / 1e6
        p50, p99, worst = np.percentile(late, [50, 99, 100]) if len(late) else (0.0, 0.0, 0.0)
        return {"tick_late_ms": [round(float(v), 3) for v in (p50, p99, worst)]}  # recent ticks

    def close(self) -> None:
        """Release the sink (idempotent)."""


# --------------------------------------------------------------------------- device sink
class DeviceSink:
    """``device:NAME-or-INDEX``: PortAudio output at the device rate, fed through a ring.

    Only the service thread reads the jitter buffer and runs the resampler; the callback copies
    ``frames`` samples out of the ring (or zeros where it ran dry) and notes where it was. The
    ring is single-producer single-consumer over two cumulative frame counters, each written by
    one side only. Each 16 kHz block read goes to the :attr:`recorders` before resampling.
    """

    def __init__(self, spec: str, latency: str | float, log: Callable[..., None]):
        self.spec = spec
        self.device = spec.partition(":")[2].strip()
        self.latency = latency
        self.log = log
        self.recorders: list[WavRecorder] = []
        self.stream = None
        self.index, self.device_name = None, None
        self.rate = SAMPLE_RATE
        self.resampler = None
        self.resampler_name = "none"
        self.resampler_delay = 0  # ring frames between a 16 kHz sample's place and its output
        self.ring = np.zeros(1, np.float32)
        self.written = 0         # frames put into the ring (service thread)
        self.taken = 0           # frames taken out of it (callback)
        self.fed = 0             # 16 kHz samples read from the jitter buffer
        self.frames_max = 0      # largest callback seen
        self.underflows = 0      # PortAudio output-underflow flags
        self.starved = 0         # callbacks that found the ring short
        self.last_cb: tuple[int, float, int] | None = None  # (taken, DAC stream time, monotonic ns)
        self.clock_offset_ns = 0.0  # monotonic ns minus PortAudio stream time in ns
        self.clock_spread_ns = math.inf
        self.clock_synced_ns = 0
        self.due_ns = 0
        self.buf = np.zeros(SAMPLE_RATE // 10, np.float32)

    # ------------------------------------------------------------------ opening
    def _resolve(self, sd) -> int:
        try:
            index, _ = find_device(self.device, list(sd.query_devices()), sd.default.device[1], "output")
        except DeviceError as exc:
            raise SinkError(f"playback.sink: {exc}") from None
        return index

    def open(self) -> None:
        try:
            import sounddevice as sd
        except OSError as exc:  # no PortAudio library at all
            raise SinkError(f"playback.sink: PortAudio is not available ({exc})") from None
        index = self._resolve(sd)
        self.rate = int(round(sd.query_devices(index)["default_samplerate"]))
        self._make_resampler()
        self.ring = np.zeros(self.rate, np.float32)  # 1 s: far above any fill this keeps
        try:
            self.stream = sd.OutputStream(device=index, samplerate=self.rate, channels=1, dtype="float32",
                                          latency=self.latency, callback=self._callback)
        except Exception as exc:  # noqa: BLE001 - PortAudio's errors vary by host API
            raise SinkError(f"playback.sink: cannot open output device {index} "
                            f"({' '.join(str(exc).split())})") from None
        self.index, self.device_name = index, sd.query_devices(index)["name"]

    def _make_resampler(self) -> None:
        """The resampler from 16 kHz to :attr:`rate` (none if the device runs at 16 kHz)."""
        if supported(SAMPLE_RATE, self.rate):
            self.resampler = StreamResampler(SAMPLE_RATE, self.rate, PLAYBACK_STOPBAND)
            self.resampler_name, self.resampler_delay = "fir", self.resampler.delay_out
        elif self.rate != SAMPLE_RATE:
            import soxr
            self.resampler = soxr.ResampleStream(SAMPLE_RATE, self.rate, 1, dtype="float32",
                                                 quality=RESAMPLE_QUALITY)
            self.resampler_name = f"soxr {RESAMPLE_QUALITY}"

    def start(self, now_ns: int) -> None:
        try:
            self.stream.start()
        except Exception as exc:  # noqa: BLE001 - PortAudio's errors vary by host API
            raise SinkError(f"playback.sink: cannot start output device {self.index} "
                            f"({' '.join(str(exc).split())})") from None
        self._sync_clock(now_ns)

    def describe(self) -> dict[str, Any]:
        return {"device": self.index, "device_name": self.device_name, "device_rate": self.rate,
                "device_latency_ms": round(self.stream.latency * 1000, 3), "resampler": self.resampler_name,
                "resampler_delay_ms": round(self.resampler_delay * 1000 / self.rate, 3)}

    def _sync_clock(self, now_ns: int) -> None:
        """Map PortAudio's stream clock to CLOCK_MONOTONIC by reading both together.

        A reading bracketed tightly (no preemption between the two clock reads) replaces the
        mapping; a loose one only if the mapping is old, so the two clocks' drift is followed.
        """
        st, mono_ns, spread = read_stream_clock(self.stream, tries=3)
        if spread <= 2 * self.clock_spread_ns or now_ns - self.clock_synced_ns > 10_000_000_000:
            self.clock_offset_ns = mono_ns - st * 1e9
            self.clock_spread_ns = max(spread, 1_000)
            self.clock_synced_ns = now_ns

    # ------------------------------------------------------------------ audio thread
    def _callback(self, outdata, frames, time_info, status) -> None:
        if status.output_underflow:
            self.underflows += 1
        taken, cap = self.taken, len(self.ring)
        k = min(frames, self.written - taken)
        start = taken % cap
        first = min(k, cap - start)
        out = outdata[:, 0]
        out[:first] = self.ring[start:start + first]
        out[first:k] = self.ring[:k - first]
        out[k:] = 0.0
        if k < frames:
            self.starved += 1
        if frames > self.frames_max:
            self.frames_max = frames
        self.last_cb = (taken, time_info.outputBufferDacTime, time.monotonic_ns())
        self.taken = taken + k

    # ------------------------------------------------------------------ service thread
    def next_due_ns(self) -> int:
        return self.due_ns

    def _frame_time_ns(self, frame: float, now_ns: int) -> int:
        """When ring frame ``frame`` reaches the DAC, in monotonic ns."""
        latency_ns = self.stream.latency * 1e9
        if self.last_cb is None:
            return int(now_ns + latency_ns + (frame - self.taken) * 1e9 / self.rate)
        taken, dac, cb_ns = self.last_cb
        t = dac * 1e9 + self.clock_offset_ns if dac > 0 else cb_ns + latency_ns  # some APIs give 0
        return int(t + (frame - taken) * 1e9 / self.rate)

    def pump(self, jb: JitterBuffer, now_ns: int) -> list[tuple[ReadResult, int]]:
        """Top the ring up to one callback's worth plus a margin; returns the block read."""
        self.due_ns = now_ns + DEVICE_POLL_NS
        if not self.stream.active:
            # PortAudio stopped the stream (device unplugged, host error): the loop's errors end
            # the process with status 1 and supervisord starts it again.
            raise SinkError(f"output device {self.index} stopped")
        if now_ns - self.clock_synced_ns > 2_000_000_000:
            self._sync_clock(now_ns)
        want = max(self.frames_max, 64) + int(DEVICE_MARGIN_S * self.rate)
        need = want - (self.written - self.taken)
        if need <= 0:
            return []
        n = min(len(self.buf), -(-math.ceil(need * SAMPLE_RATE / self.rate) // 16) * 16)
        # Sample j of the jitter buffer's output is ring frame j * rate / 16000 + the resampler's
        # group delay (the FIR's; soxr aligns its output itself, QQ holding back ~5 frames).
        t_out = self._frame_time_ns(self.fed * self.rate / SAMPLE_RATE + self.resampler_delay, now_ns)
        # The buffer's clock is when audio leaves it (now), not when it reaches the DAC: target_ms
        # is slack for arrival jitter, and the device's own latency comes on top (e2e shows it).
        res = jb.read(n, self.buf, now_ns)
        for r in self.recorders:
            r.consume(res, self.buf[:n])
        self.fed += n
        y = self.buf[:n] if self.resampler is None else self.resampler.resample_chunk(self.buf[:n])
        self._push(y)
        return [(res, t_out)]

    def _push(self, y: np.ndarray) -> None:
        cap, w = len(self.ring), self.written
        y = y[:cap - (w - self.taken)]  # never overwrite unread frames (cannot happen at this fill)
        start = w % cap
        first = min(len(y), cap - start)
        self.ring[start:start + first] = y[:first]
        self.ring[:len(y) - first] = y[first:]
        self.written = w + len(y)

    def counters(self) -> dict[str, int]:
        return {"device_underflows": self.underflows, "device_starved": self.starved}

    def status(self) -> dict[str, Any]:
        return {"device_rate": self.rate, "device_block": self.frames_max}

    def close(self) -> None:
        if self.stream is not None:
            try:
                self.stream.abort()
                self.stream.close()
            except Exception as exc:  # noqa: BLE001 - shutting down: report and go on
                self.log("warning", f"closing the output stream: {exc}")
            self.stream = None


def make_sink(settings, log: Callable[..., None]) -> Sink:
    """The sink for ``settings.sink``."""
    if settings.sink.startswith("device:"):
        return DeviceSink(settings.sink, settings.device_latency, log)
    return PacedSink(settings.sink, settings.block_ms, log)  # null, or file: (with its recorder)
