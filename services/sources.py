"""Where capture's audio comes from: test signals, files, and sound devices, all as 16 kHz mono.

Paced sources (``tone``, ``silence``, ``clicks``, ``file:PATH``) make samples on demand with
:meth:`PacedSource.read`; the capture service decides *when* (it paces them in real time).

Device sources (``device:NAME-or-INDEX``) are driven by the sound card's clock instead:
:class:`DeviceInput` holds what PortAudio's callback hands over and turns it, on the sender
thread, into a continuous 16 kHz stream with a ``CLOCK_MONOTONIC`` time for every sample. It
knows nothing of sockets: it feeds a *framer* (``services.capture.Framer``) through ``pos``,
``anchor(pos, t_ns)``, ``push(samples)`` and ``skip(n)``. ``sounddevice`` is imported only by
the functions that open a device, so paced sources work where PortAudio is missing.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import soxr

from common.audio import SAMPLE_RATE, read_audio
from common.devices import DeviceError, block_frames, find_device, read_stream_clock

from .resample import StreamResampler, supported

#: Samples between clicks of the ``clicks`` source (250 ms) and a click's length (1 ms).
CLICK_PERIOD = SAMPLE_RATE // 4
CLICK_LEN = SAMPLE_RATE // 1000
#: soxr quality of the device resampler, used only for rates :mod:`services.resample` does not
#: take (factors over 1000). soxr streams in blocks, so its output lags its input by 6-37 ms
#: (21 ms on average) at HQ from 48 kHz (LQ ~11 ms; QQ 0, but it does not filter: a tone at
#: 8.5-24 kHz aliases at full level). Measured from a PulseAudio device at 44.1 kHz, a chunk
#: left capture 24 ms (median) after its last sample's ADC time with HQ, 14 ms with LQ, 2 ms
#: with QQ. The FIR resampler lags by its group delay only: 1.62 ms from 48 kHz (26 samples at
#: 16 kHz), 1.69 ms from 44.1 kHz (``scripts/bench_resample.py``); from that PulseAudio device a
#: chunk left 1.7-2.4 ms after its last sample's ADC time (HQ: 24.1-24.8 ms, same runs).
RESAMPLE_QUALITY = "HQ"
_NS = 1_000_000_000
#: Gain of the filter that smooths PortAudio's ADC times (measured jitter here: +-2 ms per
#: block through PulseAudio). 1/64 per block (~0.6 s time constant at 10 ms blocks) cuts the
#: jitter ~10x and still follows a device clock's drift (50 ppm → ~30 us of lag).
ADC_SMOOTHING = 1 / 64
#: An ADC time this far off the filtered estimate is a discontinuity: take it as it is.
ADC_RESYNC_NS = 20_000_000


class SourceError(ValueError):
    """A source cannot be used (bad spec, no such device); ``str()`` is one line."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def parse_source(spec: str) -> tuple[str, str]:
    """``"file:a.wav"`` → ``("file", "a.wav")``, ``"tone"`` → ``("tone", "")``.

    Raises :class:`SourceError` (saying what is allowed, not repeating the value) otherwise.
    """
    kind, sep, arg = spec.partition(":")
    if kind in ("tone", "silence", "clicks") and not sep:
        return kind, ""
    if kind == "file" and arg:
        return kind, arg
    if kind == "device" and sep:
        return kind, arg.strip()
    raise SourceError("must be tone, silence, clicks, file:PATH or device:NAME-or-INDEX")


# --------------------------------------------------------------------------- paced sources
class PacedSource:
    """16 kHz mono samples on demand (the capture service decides when to ask)."""

    #: True once a finite source has handed out its last sample.
    finished = False

    def __init__(self) -> None:
        self.pos = 0  # samples handed out so far

    def read(self, n: int) -> np.ndarray:
        """The next ``n`` samples (float32); fewer only at the end of a finite source."""
        x = self._make(self.pos, n)
        self.pos += len(x)
        return x

    def _make(self, start: int, n: int) -> np.ndarray:
        return np.zeros(n, np.float32)


class ToneSource(PacedSource):
    """A sine of ``hz`` at amplitude ``level``, phase-continuous across reads."""

    def __init__(self, hz: float, level: float):
        super().__init__()
        self.hz, self.level = hz, level

    def _make(self, start: int, n: int) -> np.ndarray:
        # Cycles taken modulo 1 in float64: exact enough for days of stream.
        cycles = (self.hz * (start + np.arange(n, dtype=np.float64)) / SAMPLE_RATE) % 1.0
        return (self.level * np.sin(2 * np.pi * cycles)).astype(np.float32)


class ClickSource(PacedSource):
    """A 1 ms click (one square cycle, +level then -level: no DC) every 250 ms, from sample 0.

    Its sharp onsets at known stream offsets make end-to-end latency measurable by ear or by
    correlation.
    """

    def __init__(self, level: float):
        super().__init__()
        self.level = level

    def _make(self, start: int, n: int) -> np.ndarray:
        phase = (start + np.arange(n)) % CLICK_PERIOD
        x = np.zeros(n, np.float32)
        x[phase < CLICK_LEN // 2] = self.level
        x[(phase >= CLICK_LEN // 2) & (phase < CLICK_LEN)] = -self.level
        return x


class FileSource(PacedSource):
    """An audio file as 16 kHz mono; ``loop`` starts it over, so the stream never ends."""

    def __init__(self, path: str, loop: bool):
        super().__init__()
        self.path = path
        self.samples = read_audio(path)  # AudioError (one line) if unreadable
        self.loop = loop

    def _make(self, start: int, n: int) -> np.ndarray:
        total = len(self.samples)
        if not self.loop:
            x = self.samples[start:start + n]
            self.finished = start + len(x) >= total
            return x.copy()
        i = start % total
        parts, need = [], n
        while need:  # a file shorter than a chunk wraps more than once
            part = self.samples[i:i + need]
            parts.append(part)
            need -= len(part)
            i = 0
        return np.concatenate(parts)


def make_paced_source(kind: str, arg: str, settings: Any) -> PacedSource:
    """The paced source for a parsed spec and the ``[capture]`` settings."""
    if kind == "tone":
        return ToneSource(settings.tone_hz, settings.level)
    if kind == "clicks":
        return ClickSource(settings.level)
    if kind == "file":
        return FileSource(arg, settings.loop)
    return PacedSource()  # silence


# --------------------------------------------------------------------------- devices
class DeviceInput:
    """One open input stream's data path: callback → bounded queue → mono 16 kHz → framer.

    :meth:`callback` runs on PortAudio's thread: it copies the block, its ADC time, its arrival
    time and the frames dropped before it into the queue and returns; if the queue is full the
    block is dropped and counted (:attr:`overflows`), never waited for. :meth:`pump` runs on the
    sender thread: it mixes down, resamples (:func:`make_device_resampler`), stamps and frames.

    Times: PortAudio's ADC time is on the stream's clock; :meth:`sync` samples that clock and
    ``CLOCK_MONOTONIC`` together once, and ``t_mono = adc - stream_time_at_sync +
    mono_at_sync``. Each block's ADC time gives an estimate of when input frame 0 (since the
    last resampler clear) was captured; a first-order filter smooths those estimates (ADC times
    jitter by milliseconds, the sample clock does not) while following the device clock's drift
    against the host's. The resampled stream is time-aligned with its input: stream sample
    ``j`` (since the last clear) is input time ``j / 16000`` after input frame 0. The FIR
    resampler's output ``j`` is input time ``(j - delay) / 16000`` (its group delay, a whole
    number of samples), so its first ``delay`` outputs are dropped after every clear; soxr
    aligns its output itself (it holds it back). So every pushed piece is anchored at the time
    of its first sample.
    """

    def __init__(self, framer: Any, rate: int, queue_blocks: int):
        self.framer = framer
        self.rate = rate
        self.queue: queue.Queue = queue.Queue(maxsize=queue_blocks)
        self.resampler, self.resampler_delay = make_device_resampler(rate)
        #: Blocks lost: queue full or PortAudio's input_overflow flag (written by the callback only).
        self.overflows = 0
        self.frames_max = 0       # the largest callback so far (callback thread only)
        self._dropped_frames = 0  # callback thread only: frames dropped since the last queued block
        self._sync: tuple[float, int] | None = None
        self._base = framer.pos   # stream index of resampler output 0 (since the last clear)
        self._in = 0              # input frames fed since the last clear
        self._out = 0             # output samples received since the last clear (after the delay)
        self._lead = self.resampler_delay  # resampler outputs still to drop (its group delay)
        self._t0: float | None = None  # filtered monotonic ns of input frame 0 (since the last clear)

    # ------------------------------------------------------------------ PortAudio thread
    def callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio's input callback: copy into the bounded queue and return, never block."""
        arrived = time.monotonic_ns()
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        if frames > self.frames_max:
            self.frames_max = frames
        try:
            self.queue.put_nowait((indata.copy(), time_info.inputBufferAdcTime, arrived, self._dropped_frames))
            self._dropped_frames = 0
        except queue.Full:
            self.overflows += 1
            self._dropped_frames += frames

    # ------------------------------------------------------------------ control thread
    def sync(self, stream_time: float, mono_ns: int) -> None:
        """Record the stream clock and ``CLOCK_MONOTONIC`` sampled together (before :meth:`pump`)."""
        self._sync = (stream_time, mono_ns)

    def to_mono_ns(self, adc_time: float, arrived_ns: int, frames: int) -> int:
        """The ``CLOCK_MONOTONIC`` ns of a block's first sample.

        Some host APIs report no ADC time (0): then the block is taken to end when its
        callback ran, which is late by the callback's scheduling delay.
        """
        if adc_time > 0 and self._sync is not None and self._sync[0] > 0:
            stream_time, mono = self._sync
            return mono + round((adc_time - stream_time) * _NS)
        return arrived_ns - frames * _NS // self.rate

    # ------------------------------------------------------------------ sender thread
    def pump(self, timeout: float = 0.1) -> bool:
        """Process one queued block (waiting up to ``timeout`` s); False if none came."""
        try:
            block, adc_time, arrived_ns, dropped_before = self.queue.get(timeout=timeout)
        except queue.Empty:
            return False
        self.process(block, adc_time, arrived_ns, dropped_before)
        return True

    def process(self, block: np.ndarray, adc_time: float, arrived_ns: int, dropped_before: int = 0) -> None:
        """Mix ``block`` (frames x channels) to mono, resample, stamp and push it to the framer."""
        x = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if dropped_before:
            # The dropped input and the resampler's buffered tail are lost: restart the resampler
            # and put its output where this block belongs on the timeline, so downstream sees a gap.
            target = self._base + round((self._in + dropped_before) * SAMPLE_RATE / self.rate)
            self.resampler.clear()
            self.framer.skip(max(0, target - self.framer.pos))
            self._base, self._in, self._out, self._t0 = self.framer.pos, 0, 0, None
            self._lead = self.resampler_delay
        t0 = self.to_mono_ns(adc_time, arrived_ns, len(x)) - self._in * _NS / self.rate
        if self._t0 is None or abs(t0 - self._t0) > ADC_RESYNC_NS:
            self._t0 = t0
        else:
            self._t0 += (t0 - self._t0) * ADC_SMOOTHING
        y = self.resampler.resample_chunk(x)
        if self._lead:
            cut = min(self._lead, len(y))
            y, self._lead = y[cut:], self._lead - cut
        if len(y):
            # y[0] is output sample self._out: input time self._out / 16000 after input frame 0.
            self.framer.anchor(self.framer.pos, round(self._t0 + self._out * _NS / SAMPLE_RATE))
            self.framer.push(y)
        self._in += len(x)
        self._out += len(y)


class _Same:
    """The resampler for a device already at 16 kHz: none."""

    @staticmethod
    def resample_chunk(x: np.ndarray) -> np.ndarray:
        return x

    def clear(self) -> None:
        pass


def make_device_resampler(rate: int) -> tuple[Any, int]:
    """``(resampler, delay)`` from a device's ``rate`` to 16 kHz: ``resample_chunk(x)`` and
    ``clear()``; its output ``j`` is input time ``(j - delay) / 16000`` after its input frame 0.

    The FIR resampler (:class:`services.resample.StreamResampler`, 1.6-1.7 ms of delay) where it
    applies; soxr at :data:`RESAMPLE_QUALITY` otherwise (delay 0: it holds its output back by
    6-37 ms instead).
    """
    if rate == SAMPLE_RATE:
        return _Same(), 0
    if supported(rate, SAMPLE_RATE):
        r = StreamResampler(rate, SAMPLE_RATE)
        return r, r.delay_out
    return soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY), 0


def resolve_input_device(spec: str) -> tuple[Any, int, dict, int, int]:
    """``(sounddevice, index, info, rate, channels)`` for the input device ``spec`` names.

    The rate is the device's native default (resampling happens here, not in PortAudio).
    Mono if the device allows it, else all its channels (mixed down on the sender thread).
    Raises :class:`SourceError` (one line) for no PortAudio or no such device.
    """
    try:
        import sounddevice as sd
    except OSError as exc:  # the PortAudio library itself is missing
        raise SourceError(f"device input needs PortAudio: {exc}") from None
    try:
        index, info = find_device(spec, list(sd.query_devices()), sd.default.device[0], "input")
    except DeviceError as exc:
        raise SourceError(str(exc)) from None
    rate = int(round(info["default_samplerate"]))
    try:
        sd.check_input_settings(device=index, channels=1, samplerate=rate, dtype="float32")
        channels = 1
    except Exception:  # noqa: BLE001 - some devices only open with their native channel count
        channels = int(info["max_input_channels"])
    return sd, index, info, rate, channels


class DeviceStream:
    """An open, running input stream: PortAudio callback → :class:`DeviceInput` → sender thread."""

    def __init__(self, spec: str, latency: str | float, queue_blocks: int, framer: Any,
                 count: Callable[[str, int], None], block_ms: float = 0.0):
        sd, index, info, self.rate, self.channels = resolve_input_device(spec)
        self.name = info["name"]
        self.input = DeviceInput(framer, self.rate, queue_blocks)
        self.count = count  # the sender thread's own counter names only (one writer per name)
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send_loop, name="capture-sender", daemon=True)
        try:
            self.stream = sd.InputStream(device=index, samplerate=self.rate, channels=self.channels,
                                         dtype="float32", latency=latency, blocksize=block_frames(block_ms, self.rate),
                                         callback=self.input.callback)
        except Exception as exc:  # noqa: BLE001 - PortAudio errors: one line, the process exits 2
            raise SourceError(f"cannot open input device {index} {self.name!r} at {self.rate} Hz: "
                              f"{_one_line(exc)}") from None
        try:
            self.stream.start()
        except Exception as exc:  # noqa: BLE001 - as above
            self.stream.close()
            raise SourceError(f"cannot start input device {index} {self.name!r}: {_one_line(exc)}") from None
        # Both clocks sampled together (the tightest of several readings).
        try:
            stream_time, mono_ns, _ = read_stream_clock(self.stream)
        except Exception:  # noqa: BLE001 - no stream clock: blocks are timed by their callbacks
            stream_time, mono_ns = 0.0, time.monotonic_ns()
        self.input.sync(stream_time, mono_ns)
        self._thread.start()  # after sync: no block is stamped before the clocks are tied

    @property
    def active(self) -> bool:
        """Whether PortAudio still runs the stream (False after a device error or removal)."""
        return bool(self.stream.active)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.input.pump(0.1)
            except Exception as exc:  # noqa: BLE001 - a bad block must not end the stream for good
                self.count("sender_errors", 1)
                self.last_error = f"{type(exc).__name__}: {exc}"  # logged by the service's loop

    def close(self, timeout: float = 1.0) -> None:
        """Stop the stream (without draining it), then join the sender thread."""
        self._stop.set()
        try:
            self.stream.abort()
            self.stream.close()
        finally:
            self._thread.join(timeout)
