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
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from common.audio import SAMPLE_RATE
from common.devices import DeviceError, block_frames, find_device, read_stream_clock
from services.jitter import JitterBuffer, ReadResult
from services.recorder import SinkError, WavRecorder
from services.resample import PASSBAND, StreamResampler, supported
from services.virtual_mic import OWNER_ENV, VirtualMic, VirtualMicError, parse_spec, route_alsa_to

MAX_TICKS_PER_PUMP = 50        # a late paced sink catches up at most this many blocks per pump
RESYNC_NS = 1_000_000_000      # further behind than this (process stopped): restart the schedule
DEVICE_POLL_NS = 1_000_000     # how often the device ring is topped up
DEVICE_MARGIN_MS = 3.0         # ring fill kept beyond one callback's worth (playback.ring_margin_ms)
MONITOR_FILL_S = 0.010         # a monitor output starts one callback and this far ahead of its device ...
MONITOR_MAX_S = 0.060          # ... and drops a block that would take it beyond one callback + this
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

    setting = "playback.sink"  # what error messages name

    def __init__(self, spec: str, latency: str | float, log: Callable[..., None], block_ms: float = 0.0,
                 margin_ms: float = DEVICE_MARGIN_MS):
        self.spec = spec
        self.device = spec.partition(":")[2].strip()
        self.latency = latency
        self.block_ms = block_ms    # audio per callback, in ms; 0: the host API's choice
        self.margin_ms = margin_ms
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
        self.extra_latency_ns = 0.0  # past the DAC time: a virtual microphone's source buffer
        self.due_ns = 0
        self.buf = np.zeros(SAMPLE_RATE // 10, np.float32)

    # ------------------------------------------------------------------ opening
    def _resolve(self, sd) -> int:
        try:
            index, _ = find_device(self.device, list(sd.query_devices()), sd.default.device[1], "output")
        except DeviceError as exc:
            raise SinkError(f"{self.setting}: {exc}") from None
        return index

    def open(self) -> None:
        try:
            import sounddevice as sd
        except OSError as exc:  # no PortAudio library at all
            raise SinkError(f"{self.setting}: PortAudio is not available ({exc})") from None
        index = self._resolve(sd)
        self.rate = int(round(sd.query_devices(index)["default_samplerate"]))
        self._make_resampler()
        self.ring = np.zeros(self.rate, np.float32)  # 1 s: far above any fill this keeps
        try:
            self.stream = sd.OutputStream(device=index, samplerate=self.rate, channels=1, dtype="float32",
                                          latency=self.latency, blocksize=block_frames(self.block_ms, self.rate),
                                          callback=self._callback)
        except Exception as exc:  # noqa: BLE001 - PortAudio's errors vary by host API
            raise SinkError(f"{self.setting}: cannot open output device {index} "
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
            raise SinkError(f"{self.setting}: cannot start output device {self.index} "
                            f"({' '.join(str(exc).split())})") from None
        self._sync_clock(now_ns)

    def describe(self) -> dict[str, Any]:
        return {"device": self.index, "device_name": self.device_name, "device_rate": self.rate,
                "device_latency_ms": round(self.stream.latency * 1000, 3), "device_block_ms": self.block_ms,
                "ring_margin_ms": self.margin_ms, "resampler": self.resampler_name,
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
    @property
    def margin(self) -> int:
        """``margin_ms`` in device frames."""
        return round(self.margin_ms * self.rate / 1000)

    def next_due_ns(self) -> int:
        return self.due_ns

    def _frame_time_ns(self, frame: float, now_ns: int) -> int:
        """When ring frame ``frame`` reaches the DAC, in monotonic ns."""
        latency_ns = self.stream.latency * 1e9
        if self.last_cb is None:
            return int(now_ns + latency_ns + (frame - self.taken) * 1e9 / self.rate)
        taken, dac, cb_ns = self.last_cb
        t = dac * 1e9 + self.clock_offset_ns if dac > 0 else cb_ns + latency_ns  # some APIs give 0
        return int(t + (frame - taken) * 1e9 / self.rate + self.extra_latency_ns)

    def pump(self, jb: JitterBuffer, now_ns: int) -> list[tuple[ReadResult, int]]:
        """Top the ring up to one callback's worth plus a margin; returns the block read."""
        self.due_ns = now_ns + DEVICE_POLL_NS
        if not self.stream.active:
            # PortAudio stopped the stream (device unplugged, host error): the loop's errors end
            # the process with status 1 and supervisord starts it again.
            raise SinkError(f"output device {self.index} stopped")
        if now_ns - self.clock_synced_ns > 2_000_000_000:
            self._sync_clock(now_ns)
        want = max(self.frames_max, 64) + self.margin
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
        self._push(self._resample(self.buf[:n]))
        return [(res, t_out)]

    def _resample(self, block: np.ndarray) -> np.ndarray:
        """16 kHz ``block`` at the device rate (the resampler keeps its state across blocks)."""
        return block if self.resampler is None else self.resampler.resample_chunk(block)

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


class VirtualMicSink(DeviceSink):
    """``virtual-mic[:NAME]``: a :class:`DeviceSink` playing into a virtual microphone
    (:mod:`services.virtual_mic`), made as the sink opens. The source's own buffering comes
    after the DAC time PortAudio reports, so it is added to every output time (and e2e)."""

    def __init__(self, spec: str, *args: Any):
        super().__init__(spec, *args)  # DeviceSink's timing arguments, as they are
        self.mic_name = parse_spec(spec)
        self.mic: VirtualMic | None = None
        self.alsa_conf = None

    def open(self) -> None:
        try:
            self.mic = VirtualMic.ensure(self.mic_name)
            self.alsa_conf = route_alsa_to(self.mic)
        except VirtualMicError as exc:
            raise SinkError(f"playback.sink: {exc}") from None
        if "sounddevice" in sys.modules:  # PortAudio lists ALSA's devices as it starts: again
            sd = sys.modules["sounddevice"]
            sd._terminate()
            sd._initialize()
        self.device = self.mic.feed
        try:
            super().open()
        except SinkError as exc:
            raise SinkError(f"{exc} (the virtual microphone's feed needs ALSA's pulse plugin: "
                            "libasound2-plugins)") from None
        self.extra_latency_ns = self.mic.source_latency_ms() * 1e6

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "virtual_mic": self.mic_name,
                "virtual_mic_latency_ms": round(self.extra_latency_ns / 1e6, 3)}

    def close(self) -> None:
        super().close()
        if self.alsa_conf is not None:
            self.alsa_conf.unlink(missing_ok=True)
            self.alsa_conf = None
        if self.mic is not None and OWNER_ENV not in os.environ:  # run alone: nobody else removes it
            try:
                self.log("info", "virtual microphone removed", name=self.mic.name, modules=self.mic.remove())
            except VirtualMicError as exc:
                self.log("warning", f"cannot remove the virtual microphone: {exc}")
            self.mic = None


class MonitorOutput(DeviceSink):
    """``[playback] monitor``: what the sink plays, also on a second device (headphones, to hear
    yourself), with its own ring, resampler and clock.

    It takes the sink's 16 kHz blocks as a recorder does (:meth:`consume`) and never reads the
    jitter buffer, so it cannot hold the sink back: a block that would overfill its ring (the
    two devices' clocks drift apart) is dropped, a callback that finds it short plays silence;
    both are counted, as ``monitor_*`` counters, apart from the sink's.
    """

    setting = "playback.monitor"

    def __init__(self, spec: str, latency: str | float, log: Callable[..., None]):
        super().__init__(spec, latency, log)
        self.dropped = 0
        self._before: tuple[int, int] | None = None  # (starved, underflows) before the first sound
        self._starved_seen = 0

    def consume(self, res: ReadResult, block: np.ndarray) -> None:
        """One block the sink played (the recorder interface): resample it into the ring."""
        if self._before is None:
            if not res.stream_samples:
                return  # nothing to hear yet (and the sink's device may not be pulling yet)
            self._before = (self.starved, self.underflows)
            self._starved_seen = self.starved - 1  # prime it
        if self.starved != self._starved_seen:
            # At the first sound, and after running dry (its clock ahead of the sink's): one
            # callback's worth and some slack for the jitter of the blocks' arrival, as silence.
            self._starved_seen = self.starved
            self._push(np.zeros(max(self.frames_max, 64) + int(MONITOR_FILL_S * self.rate), np.float32))
        y = self._resample(block)
        if self.written - self.taken + len(y) > max(self.frames_max, 64) + int(MONITOR_MAX_S * self.rate):
            self.dropped += 1
            return
        self._push(y)

    def counters(self) -> dict[str, int]:
        starved, underflows = self._before or (self.starved, self.underflows)  # not counted before it
        return {"monitor_underflows": self.underflows - underflows, "monitor_starved": self.starved - starved,
                "monitor_dropped": self.dropped}

    def describe(self) -> dict[str, Any]:
        return {f"monitor_{k}": v for k, v in super().describe().items()}


def make_sink(settings, log: Callable[..., None]) -> Sink:
    """The sink for ``settings.sink``."""
    timing = (settings.device_latency, log, settings.device_block_ms, settings.ring_margin_ms)
    if settings.sink.startswith("device:"):
        return DeviceSink(settings.sink, *timing)
    if parse_spec(settings.sink):
        return VirtualMicSink(settings.sink, *timing)
    return PacedSink(settings.sink, settings.block_ms, log)  # null, or file: (with its recorder)


def make_monitor(settings, log: Callable[..., None]) -> MonitorOutput | None:
    """The monitor output for ``settings.monitor`` (``None`` if none is set)."""
    return MonitorOutput(settings.monitor, settings.device_latency, log) if settings.monitor else None
