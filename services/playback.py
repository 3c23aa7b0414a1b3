"""``llvc playback``: jitter buffer and output to a sound device, a WAV file, or nowhere.

The service connects a PULL to ``audio_out``, puts every chunk into a
:class:`~services.jitter.JitterBuffer` keyed by stream offset, and lets the sink take audio out
of it on the sink's own clock (see ``services/__init__.py`` for the contract).

Sinks
  * ``null``: paced by ``CLOCK_MONOTONIC`` exactly like a device: a tick every ``block_ms``,
    scheduled from the sink's start ``t0`` (tick ``k`` at ``t0 + k * block``, so it never
    drifts); a block's output time is its scheduled tick time.
  * ``file:PATH``: the same pacing, and every played sample of the first stream goes into a
    32-bit float WAV aligned to the source (file sample ``i`` = stream offset ``i``). When the
    stream drains the file is exactly ``source_end`` samples long and is closed.
  * ``device:NAME-or-INDEX``: a PortAudio output stream at the device's own rate. The service
    reads the jitter buffer, resamples 16 kHz to the device rate and keeps a small ring topped
    up (one callback's worth plus 3 ms); the audio callback only copies from that ring. Output
    times come from PortAudio's ``outputBufferDacTime`` mapped to ``CLOCK_MONOTONIC``. Here
    ``target_ms`` is the slack between a stream's first arrival and the moment its audio leaves
    the buffer; the ring and the device's latency come on top, and e2e includes them.

The paced sinks run inside :meth:`PlaybackService.loop_once` (one thread: the socket is polled
until the next tick is due), so a file is written from the service loop, never from a clock
callback.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any, Callable

import numpy as np
import soundfile as sf
import zmq
from zmq.utils.monitor import recv_monitor_message

from common.config import PipelineConfigError
from services.base import Service, Setting, add_service_arguments, non_negative, parse_settings, positive, \
    service_main
from services.jitter import SAMPLE_RATE, JitterBuffer, ReadResult

NS_PER_SAMPLE = 1_000_000_000 / SAMPLE_RATE
SLICE_NS = 50_000_000          # one loop_once: at most this long, so SIGTERM is noticed quickly
MAX_TICKS_PER_PUMP = 50        # a late paced sink catches up at most this many blocks per pump
RESYNC_NS = 1_000_000_000      # further behind than this (process stopped): restart the schedule
MAX_FILE_GAP_S = 600           # a timeline jump larger than this ends the file instead of padding it
REPORT_INTERVAL_S = 0.5        # frequent events (underruns, drops, rejects): at most 2 reports/s
DEVICE_POLL_NS = 1_000_000     # how often the device ring is topped up
DEVICE_MARGIN_S = 0.003        # ring fill kept beyond one callback's worth
#: soxr quality for the device path. Streaming soxr emits HQ/MQ output in ~1500-frame bursts
#: (up to 37 ms behind its input at 16 -> 48 kHz), LQ up to 20 ms; QQ (cubic) is 0.1 ms behind
#: and smooth, and its imaging is far below the speech band. Latency wins here.
RESAMPLE_QUALITY = "QQ"


def _sink_problem(v: str) -> str | None:
    kind, sep, rest = v.partition(":")
    if v == "null" or (kind == "device" and sep) or (kind == "file" and rest):
        return None
    return "must be null, file:PATH or device:NAME-or-INDEX"


def _latency_problem(v) -> str | None:
    if isinstance(v, str):
        return None if v in ("low", "high") else 'must be "low", "high" or seconds'
    return positive(v)


SCHEMA = {
    "sink": Setting(str, "null", _sink_problem),
    "target_ms": Setting(float, 6.0, non_negative),
    "max_ms": Setting(float, 60.0, positive),
    "block_ms": Setting(float, 2.0, lambda v: positive(v) or (None if v <= 1000 else "must be <= 1000")),
    "fade_ms": Setting(float, 2.0, non_negative),
    "device_latency": Setting((str, float), "low", _latency_problem),
}


def playback_settings(cfg, args: argparse.Namespace | None = None):
    """The validated ``[playback]`` table, with ``--sink`` / ``--target-ms`` applied."""
    overrides = {"sink": getattr(args, "sink", None), "target_ms": getattr(args, "target_ms", None)}
    s = parse_settings(cfg, "playback", SCHEMA, overrides)
    if s.max_ms <= s.target_ms:
        raise PipelineConfigError(f"{cfg.source}: playback.max_ms: must be above target_ms "
                                  f"({s.target_ms:g}), got {s.max_ms:g}")
    return s


class SinkError(RuntimeError):
    """A sink cannot be opened (one line; the service exits 2)."""


class Throttle:
    """Counts of a frequent happening, let out at most once per ``interval_s``."""

    def __init__(self, interval_s: float = REPORT_INTERVAL_S):
        self.interval = interval_s
        self.pending: dict[str, int] = {}
        self.next = 0.0

    def add(self, **counts: int) -> None:
        for k, v in counts.items():
            self.pending[k] = self.pending.get(k, 0) + v

    def take(self, now: float) -> dict[str, int] | None:
        """The counts gathered since the last report, if one is due now."""
        if not self.pending or now < self.next:
            return None
        out, self.pending, self.next = self.pending, {}, now + self.interval
        return out


# --------------------------------------------------------------------------- paced sinks
class PacedSink:
    """``null``: consumes ``block_ms`` of audio per tick on the monotonic clock, like a device."""

    def __init__(self, spec: str, block_ms: float, log: Callable[..., None]):
        self.spec = spec
        self.n = max(1, round(block_ms * SAMPLE_RATE / 1000))
        self.buf = np.zeros(self.n, np.float32)
        self.log = log
        self.t0 = 0
        self.k = 0
        self.resyncs = 0
        self.lateness = np.zeros(4096, np.int64)  # how late recent ticks ran, ns (for status)
        self.ticks = 0

    def open(self) -> None:
        """Acquire what the sink writes to; raise :class:`SinkError` if it cannot."""

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
            self.consume(res, self.buf)
            played.append((res, t))
            self.k += 1
        return played

    def consume(self, res: ReadResult, block: np.ndarray) -> None:
        """What to do with a played block (``null``: nothing)."""

    def counters(self) -> dict[str, int]:
        return {"sink_resyncs": self.resyncs}

    def status(self) -> dict[str, Any]:
        late = self.lateness[:min(self.ticks, len(self.lateness))] / 1e6
        p50, p99, worst = np.percentile(late, [50, 99, 100]) if len(late) else (0.0, 0.0, 0.0)
        return {"tick_late_ms": [round(float(v), 3) for v in (p50, p99, worst)]}  # recent ticks

    def close(self) -> None:
        """Release the sink (idempotent)."""


class FileSink(PacedSink):
    """``file:PATH``: paced like ``null``; the first stream played goes into a float WAV."""

    def __init__(self, spec: str, block_ms: float, log: Callable[..., None]):
        super().__init__(spec, block_ms, log)
        self.path = spec.partition(":")[2]
        self.file: sf.SoundFile | None = None
        self.stream: str | None = None
        self.written = 0
        self.unflushed = 0

    def open(self) -> None:
        try:
            self.file = sf.SoundFile(self.path, "w", samplerate=SAMPLE_RATE, channels=1,
                                     subtype="FLOAT", format="WAV")
        except (RuntimeError, OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())
            raise SinkError(f"playback.sink: cannot write {self.path} ({reason})") from None

    def _write(self, samples: np.ndarray) -> None:
        self.file.write(samples)
        self.written += len(samples)
        self.unflushed += len(samples)
        if self.unflushed >= SAMPLE_RATE:  # keep the header current: a killed process leaves a valid file
            self.file.flush()
            self.unflushed = 0

    def consume(self, res: ReadResult, block: np.ndarray) -> None:
        if self.file is None:
            return
        if res.stream_samples:
            if self.stream is None:
                self.stream = res.stream_id
            elif res.stream_id != self.stream:
                return self.finish("another stream started before the first one drained")
            gap = res.stream_offset - self.written  # overflow skips, and silence before the first chunk
            if gap > MAX_FILE_GAP_S * SAMPLE_RATE:
                return self.finish(f"the stream's timeline jumped {gap} samples ahead")
            for a in range(0, gap, SAMPLE_RATE):
                self._write(np.zeros(min(SAMPLE_RATE, gap - a), np.float32))
            self._write(block[res.stream_index:res.stream_index + res.stream_samples])
        if res.drained and res.drained[0] == self.stream:
            missing = res.drained[1] - self.written
            if missing > 0:
                self._write(np.zeros(missing, np.float32))
            self.finish("stream drained")

    def finish(self, why: str) -> None:
        """Close the file (valid header) and write nothing more."""
        if self.file is not None:
            self.file.close()
            self.file = None
            self.log("info", f"file sink closed: {why}", path=self.path, stream_id=self.stream,
                     samples=self.written)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.path}

    def status(self) -> dict[str, Any]:
        return {**super().status(), "file_samples": self.written, "file_open": self.file is not None}

    def close(self) -> None:
        self.finish("shutdown")


# --------------------------------------------------------------------------- device sink
class DeviceSink:
    """``device:NAME-or-INDEX``: PortAudio output at the device rate, fed through a ring.

    Only the service thread reads the jitter buffer and runs the resampler; the callback copies
    ``frames`` samples out of the ring (or zeros where it ran dry) and notes where it was. The
    ring is single-producer single-consumer over two cumulative frame counters, each written by
    one side only.
    """

    def __init__(self, spec: str, latency: str | float, log: Callable[..., None]):
        self.spec = spec
        self.device = spec.partition(":")[2].strip()
        self.latency = latency
        self.log = log
        self.stream = None
        self.index, self.device_name = None, None
        self.rate = SAMPLE_RATE
        self.resampler = None
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
        outputs = [(i, d["name"]) for i, d in enumerate(sd.query_devices()) if d["max_output_channels"] > 0]
        listing = ", ".join(f"{i} {name!r}" for i, name in outputs) or "none"
        ids = [i for i, _ in outputs]
        name = self.device
        if name in ("", "default"):
            found = [sd.default.device[1]]
        elif name.isdigit():
            found = [int(name)]
        else:
            exact = [i for i, n in outputs if n.lower() == name.lower()]
            found = exact or [i for i, n in outputs if name.lower() in n.lower()]
        if len(found) == 1 and found[0] in ids:
            return found[0]
        what = "matches several output devices" if len(found) > 1 else "is not an output device"
        raise SinkError(f"playback.sink: {name or 'default'!r} {what} (output devices: {listing})")

    def open(self) -> None:
        try:
            import sounddevice as sd
        except OSError as exc:  # no PortAudio library at all
            raise SinkError(f"playback.sink: PortAudio is not available ({exc})") from None
        index = self._resolve(sd)
        self.rate = int(round(sd.query_devices(index)["default_samplerate"]))
        if self.rate != SAMPLE_RATE:
            import soxr
            self.resampler = soxr.ResampleStream(SAMPLE_RATE, self.rate, 1, dtype="float32",
                                                 quality=RESAMPLE_QUALITY)
        self.ring = np.zeros(self.rate, np.float32)  # 1 s: far above any fill this keeps
        try:
            self.stream = sd.OutputStream(device=index, samplerate=self.rate, channels=1, dtype="float32",
                                          latency=self.latency, callback=self._callback)
        except Exception as exc:  # noqa: BLE001 - PortAudio's errors vary by host API
            raise SinkError(f"playback.sink: cannot open output device {index} "
                            f"({' '.join(str(exc).split())})") from None
        self.index, self.device_name = index, sd.query_devices(index)["name"]

    def start(self, now_ns: int) -> None:
        try:
            self.stream.start()
        except Exception as exc:  # noqa: BLE001 - PortAudio's errors vary by host API
            raise SinkError(f"playback.sink: cannot start output device {self.index} "
                            f"({' '.join(str(exc).split())})") from None
        self._sync_clock(now_ns)

    def describe(self) -> dict[str, Any]:
        return {"device": self.index, "device_name": self.device_name, "device_rate": self.rate,
                "device_latency_ms": round(self.stream.latency * 1000, 3), "resampler": RESAMPLE_QUALITY}

    def _sync_clock(self, now_ns: int) -> None:
        """Map PortAudio's stream clock to CLOCK_MONOTONIC by reading both together.

        A reading bracketed tightly (no preemption between the two clock reads) replaces the
        mapping; a loose one only if the mapping is old, so the two clocks' drift is followed.
        """
        a = time.monotonic_ns()
        st = self.stream.time
        b = time.monotonic_ns()
        if b - a <= 2 * self.clock_spread_ns or now_ns - self.clock_synced_ns > 10_000_000_000:
            self.clock_offset_ns = (a + b) / 2 - st * 1e9
            self.clock_spread_ns = max(b - a, 1_000)
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
        # Sample j of the jitter buffer's output is ring frame j * rate / 16000: soxr keeps the
        # two time-aligned (its delay only holds output back; QQ holds back ~5 frames).
        t_out = self._frame_time_ns(self.fed * self.rate / SAMPLE_RATE, now_ns)
        # The buffer's clock is when audio leaves it (now), not when it reaches the DAC: target_ms
        # is slack for arrival jitter, and the device's own latency comes on top (e2e shows it).
        res = jb.read(n, self.buf, now_ns)
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


def make_sink(settings, log: Callable[..., None]):
    """The sink for ``settings.sink``."""
    kind = settings.sink.partition(":")[0]
    if kind == "device":
        return DeviceSink(settings.sink, settings.device_latency, log)
    if kind == "file":
        return FileSink(settings.sink, settings.block_ms, log)
    return PacedSink(settings.sink, settings.block_ms, log)


# --------------------------------------------------------------------------- the service
class PlaybackService(Service):
    """Receives converted chunks, buffers them on their stream timeline, plays them out."""

    name = "playback"

    def __init__(self, cfg, args=None):
        super().__init__(cfg, args)
        self.sink = None
        self.sink_started = False
        self.receiver = None
        self.monitor_socket = None
        self.connected = False
        self.throttles = {k: Throttle() for k in ("underrun", "late", "overflow", "reject")}
        self.rejects_seen = 0

    def setup(self) -> None:
        self.settings = s = playback_settings(self.cfg, self.args)
        self.jb = JitterBuffer(s.target_ms, s.max_ms, s.fade_ms)
        self.sink = make_sink(s, self.log)
        self.sink.open()  # first: a sink that cannot open is a one-line exit 2, before any socket
        self.receiver = self.open_bus().audio_receiver("audio_out")
        address = self.cfg.endpoint("audio_out").connect
        if address.startswith("inproc://"):
            self.connected = True  # inproc has no connection events; connecting is immediate
        else:
            sock = self.receiver.socket
            self.monitor_socket = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
            # The Bus connected the socket before the monitor existed, and a handshake that
            # finished in between would never be reported (seen under load): connect again
            # under the monitor's eye. At worst the few chunks already on their way to this
            # brand-new connection are dropped, once, at startup.
            sock.disconnect(address)
            sock.connect(address)
        self.log("info", "sink open", sink=s.sink, target_ms=s.target_ms, max_ms=s.max_ms,
                 **self.sink.describe())
        self.sink.start(time.monotonic_ns())  # last: the first tick is due now, not a setup ago
        self.sink_started = True

    def _watch_connection(self) -> None:
        """Ready = sink open and the PULL's handshake with inference done (capture waits for it)."""
        while self.monitor_socket is not None:
            try:
                ev = recv_monitor_message(self.monitor_socket, zmq.NOBLOCK)
            except zmq.Again:
                break
            self.connected = ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        if self.connected != self.ready:
            self.ready = self.connected
            self.log("info", "ready" if self.ready else "inference disconnected")
            self.heartbeat()  # say it now: capture is waiting for it

    def loop_once(self) -> None:
        self._watch_connection()
        now = time.monotonic_ns()
        slice_end = now + SLICE_NS
        while not self.stop_requested:
            if self.sink.next_due_ns() <= now:
                self._played(self.sink.pump(self.jb, now))
                now = time.monotonic_ns()
            if now >= slice_end:
                break
            self._receive(min(self.sink.next_due_ns(), slice_end) - now)
            now = time.monotonic_ns()
        self._report(time.monotonic())

    def _receive(self, wait_ns: int) -> None:
        """Wait up to ``wait_ns`` for chunks (ZeroMQ polls in whole ms; the rest is a short sleep)."""
        ms = wait_ns // 1_000_000
        chunk = self.receiver.recv(int(ms) if ms >= 1 else 0)
        if chunk is None:
            if ms < 1 and wait_ns > 0:
                time.sleep(wait_ns / 1e9)
            return
        self._accept(chunk, time.monotonic_ns())
        for c in self.receiver.drain(64):
            self._accept(c, time.monotonic_ns())

    def _accept(self, chunk, arrival_ns: int) -> None:
        res = self.jb.put(chunk.stream_id, chunk.offset, chunk.samples, arrival_ns, seq=chunk.seq,
                          t_capture_ns=chunk.t_capture_ns, source_end=chunk.source_end)
        if res.new_stream:
            self.event("stream_start", stream_id=chunk.stream_id, seq=chunk.seq, offset=chunk.offset,
                       target_ms=self.settings.target_ms)
            self.log("info", "stream start", stream_id=chunk.stream_id, offset=chunk.offset)
        if res.late:
            self.throttles["late"].add(chunks=1, samples=res.late)
        if res.overflow:
            self.throttles["overflow"].add(events=1, samples=res.overflow)

    def _played(self, blocks: list[tuple[ReadResult, int]]) -> None:
        """Per-chunk e2e latency, underruns and drains of the blocks the sink just played."""
        for res, t_out in blocks:
            for s in res.starts:
                e2e_ns = t_out + s.index * NS_PER_SAMPLE - s.t_capture_ns
                self.telemetry.chunk_timing(stream_id=s.stream_id, seq=s.seq, offset=s.offset,
                                            e2e_ms=round(e2e_ns / 1e6, 3), fill_ms=round(self.jb.fill_ms, 3))
            if res.underruns or res.invented:
                self.throttles["underrun"].add(underruns=res.underruns, samples=res.invented)
            if res.drained:
                stream_id, source_end = res.drained
                self.event("drained", stream_id=stream_id, source_end=source_end)
                self.log("info", "stream drained", stream_id=stream_id, source_end=source_end)

    def _report(self, now: float) -> None:
        """Counters from the buffer, receiver and sink; throttled reports of frequent trouble."""
        self.counters.update(vars(self.jb.stats))
        self.counters.update(self.sink.counters())
        self.counters["rejected"] = self.receiver.rejected
        self.counters["received"] = self.receiver.received
        if self.receiver.rejected > self.rejects_seen:
            self.throttles["reject"].add(rejected=self.receiver.rejected - self.rejects_seen)
            self.rejects_seen = self.receiver.rejected
        underrun = self.throttles["underrun"].take(now)
        if underrun:
            self.event("underrun", stream_id=self.jb.stream_id, **underrun, total=self.jb.stats.underruns)
            self.log("warning", "underrun", **underrun, total=self.jb.stats.underruns)
        for cause in ("late", "overflow"):
            drops = self.throttles[cause].take(now)
            if drops:
                self.log("warning", f"dropped {cause} audio", **drops)
        reject = self.throttles["reject"].take(now)
        if reject:
            self.event("reject", reason=self.receiver.last_reject, **reject, total=self.rejects_seen)
            self.log("warning", "rejected messages", reason=self.receiver.last_reject, **reject,
                     total=self.rejects_seen)

    def status(self) -> dict[str, Any]:
        if self.sink is None:
            return {}
        return {"sink": self.settings.sink, "target_ms": self.settings.target_ms,
                "fill_ms": round(self.jb.fill_ms, 3), "stream_id": self.jb.stream_id, **self.sink.status()}

    def teardown(self) -> None:
        if self.monitor_socket is not None:
            self.receiver.socket.disable_monitor()
            self.monitor_socket.close(0)  # before the bus ends its context, or term() would wait
            self.monitor_socket = None
        if self.sink_started:
            self.log("info", "sink closing", **self.sink.status())
        if self.sink is not None:
            self.sink.close()
        self.close_bus()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``llvc playback`` flags: the pipeline config, and shortcuts for two ``[playback]`` keys."""
    add_service_arguments(p)
    g = p.add_argument_group("playback")
    g.add_argument("--sink", metavar="SPEC", default=None,
                   help="null | file:PATH | device:NAME-or-INDEX (playback.sink)")
    g.add_argument("--target-ms", type=float, default=None, metavar="MS",
                   help="jitter buffer target: a stream plays this long after its first chunk arrives "
                        "(playback.target_ms)")


def run(args: argparse.Namespace) -> int:
    """Run the playback service until SIGTERM/SIGINT."""
    return service_main(PlaybackService, args)
