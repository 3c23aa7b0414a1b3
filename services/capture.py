"""``llvc capture``: audio from a device, a file or a test signal, sent as timestamped chunks.

What goes on the wire is the contract in :mod:`services`: a new ``stream_id`` per source start,
first the head (``head_len`` samples at offset 0), then ``chunk_len`` samples at offsets
``head_len + k*chunk_len``, each stamped with the ``CLOCK_MONOTONIC`` time of its first sample.

Two ways the samples are timed:

* paced sources (``tone``, ``silence``, ``clicks``, ``file:PATH``): the service loop is the
  clock. Message ``[o, o+n)`` is sent at ``t0 + (o+n)/sr`` (once its last sample "has been
  captured") and stamped ``t0 + o/sr``, computed from the anchor ``t0`` every time, so the
  schedule never drifts. Before ``t0`` is taken, the service waits (up to ``wait_ready_s``)
  for ready heartbeats from inference and playback, so the stream's start is not lost.
* device sources (``device:NAME-or-INDEX``): the sound card is the clock. PortAudio's callback
  queues blocks; a sender thread resamples them to 16 kHz, stamps them with their ADC times
  and frames them (:mod:`services.sources`).

Threads: the paced path runs entirely in the service loop. With a device, the sender thread
owns the audio socket and the counters it bumps (``chunks_sent``, ``dropped_capture_send``,
``sender_errors``); the main thread owns telemetry and every other counter. One writer per
counter name, so no update is lost.
"""
from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from common.audio import SAMPLE_RATE
from common.devices import block_problem, latency_problem, parse_latency
from common.protocol import AudioChunk
from common.settings import at_least, non_negative, parsed_by, setting
from common.telemetry import CaptureStatus, Counter, Eof, Heartbeat, SessionChange, StreamStart
from models.geometry import StreamGeometry

from .base import Service, add_service_arguments, model_spec, service_main
from .sessions import check_session_name, session_name
from .sources import DeviceStream, PacedSource, SourceError, make_paced_source, parse_source

_NS = 1_000_000_000
#: Zero chunks sent after a finite source's last chunk, so its last samples get their lookahead.
FLUSH_CHUNKS = 2
#: A paced source later than this re-anchors its schedule instead of catching up.
MAX_LATE_NS = _NS
#: The services whose readiness a paced source waits for.
WAIT_FOR = frozenset({"inference", "playback"})
#: Seconds between attempts to reopen a device whose stream stopped.
DEVICE_RETRY_S = 1.0


#: Inference events read per turn at most (refusals of this session are looked for among them).
REFUSAL_READS = 32


@dataclass(frozen=True)
class CaptureSettings:
    """The ``[capture]`` table (config/pipeline.toml says what each key means)."""

    source: str = setting("tone", parsed_by(parse_source, SourceError))
    loop: bool = setting(False)
    level: float = setting(0.1, lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")
    tone_hz: float = setting(440.0, lambda v: None if 0 < v < SAMPLE_RATE / 2 else "must be in (0, 8000)")
    wait_ready_s: float = setting(15.0, non_negative)
    queue_chunks: int = setting(32, at_least(1))
    device_latency: str | float = setting("low", latency_problem)
    device_block_ms: float = setting(0.0, block_problem)
    # The client session (services/sessions.py) this capture and its playback belong to: the
    # inference server converts each session on its own and sends it to that session's playback
    # only. Empty: derived from the host's name. Playback reads it from here too.
    session: str = setting("", check_session_name)


def client_session(cfg, flag: str | None = None) -> str:
    """The session this host's capture and playback run as: ``capture.session`` (``flag``, a
    command's ``--session``, wins), or the host's name (:func:`services.sessions.session_name`)."""
    return session_name(cfg.settings("capture", CaptureSettings, {"session": flag}).session)


class Framer:
    """Cuts one stream's 16 kHz samples into the contract's messages and sends each one.

    ``seq`` is a message's index on the chunk grid (0 = the head), so a failed send or a
    skipped gap advances ``seq`` and ``offset`` alike. A message's time comes from the anchor
    (stream index ``i`` was captured at ``t_ns``) in integer ns, so spacing is exact.
    """

    def __init__(self, geometry: StreamGeometry, send: Callable[[AudioChunk], bool],
                 count: Callable[..., None], session: str | None = None):
        self.geometry = geometry
        self.session = session
        self.stream_id = uuid.uuid4().hex
        #: Offset of the next message.
        self.offset = 0
        #: Set once a finite source's length is known; carried by every later message.
        self.source_end: int | None = None
        self._send = send
        self._count = count
        self._buf = np.zeros(max(geometry.chunk_len, geometry.head_len), np.float32)
        self._fill = 0
        now = time.monotonic_ns()
        self._anchor = (0, now)
        self._wall_minus_mono = time.time_ns() - now

    @property
    def next_len(self) -> int:
        """Samples in the message at :attr:`offset` (the head, or a chunk)."""
        g = self.geometry
        return g.head_len if self.offset == 0 and g.head_len else g.chunk_len

    @property
    def pos(self) -> int:
        """Stream index of the next sample :meth:`push` takes."""
        return self.offset + self._fill

    @property
    def seq(self) -> int:
        """Sequence number of the message at :attr:`offset`."""
        g = self.geometry
        if self.offset == 0:
            return 0
        return (self.offset - g.head_len) // g.chunk_len + (1 if g.head_len else 0)

    def anchor(self, index: int, t_ns: int) -> None:
        """Stream sample ``index`` was (or counts as) captured at monotonic ``t_ns``."""
        self._anchor = (index, t_ns)

    def time_of(self, index: int) -> int:
        """Monotonic ns of stream sample ``index``, from the anchor."""
        a_index, a_t = self._anchor
        return a_t + (index - a_index) * _NS // self.geometry.sample_rate

    def push(self, samples: np.ndarray) -> None:
        """Append samples; every message they complete is sent at once."""
        i = 0
        while i < len(samples):
            take = min(self.next_len - self._fill, len(samples) - i)
            self._buf[self._fill:self._fill + take] = samples[i:i + take]
            self._fill += take
            i += take
            if self._fill == self.next_len:
                self._emit()

    def skip(self, n: int) -> None:
        """Leave ``n`` samples out (audio lost before it got here).

        Whole messages inside the gap are never sent (downstream sees the offset jump); the
        part of a message that is partly there is zeros.
        """
        target = self.pos + n
        if self._fill:
            self.push(np.zeros(min(n, self.next_len - self._fill), np.float32))
        if target > self.pos:  # then no message is partly filled
            g = self.geometry
            start = 0 if target < g.head_len else target - (target - g.head_len) % g.chunk_len
            self.offset = max(self.offset, start)
            self.push(np.zeros(target - self.offset, np.float32))

    def _emit(self) -> None:
        g = self.geometry
        n = self.next_len
        t = self.time_of(self.offset)
        chunk = AudioChunk(self.stream_id, self.seq, t, t + self._wall_minus_mono, self._buf[:n].copy(),
                           g.sample_rate, "f32le", (), self.offset, self.source_end, self.session)
        self._count("chunks_sent" if self._send(chunk) else "dropped_capture_send")
        self.offset += n
        self._fill = 0


class CaptureService(Service):
    """The capture process: one source, one stream at a time, sent to ``audio_in``."""

    name = "capture"
    audio_path = True

    def __init__(self, cfg, args: argparse.Namespace | None = None):
        super().__init__(cfg, args)
        self.settings: CaptureSettings | None = None
        self.geometry: StreamGeometry | None = None
        self.kind = ""
        self.source: PacedSource | None = None
        self.device: DeviceStream | None = None
        self.framer: Framer | None = None
        self.sender = None
        #: waiting (for readiness) | streaming | ended (file done) | device_lost
        self.state = "starting"
        self._device_spec = ""
        self._latency: str | float = "low"
        self._ready_sub = None
        self._events = None  # inference's events, for refusals of this session
        self.session = ""
        self._ready_seen: set[str] = set()
        self._wait_deadline = 0.0
        self._flush_left = 0
        self._next_device_try = 0.0
        self._overflow_base = 0  # input overflows of device streams already closed
        self._logged_error: str | None = None
        self.meter = None  # what capture sends, for sound.capture frames

    # ------------------------------------------------------------------ lifetime
    def setup(self) -> None:
        """Validate settings, load the file (if any), open the bus, then start or wait."""
        flags = {"source": getattr(self.args, "source", None), "loop": getattr(self.args, "loop", None)}
        flags["session"] = getattr(self.args, "session", None)
        s = self.settings = self.cfg.settings("capture", CaptureSettings, flags)
        self.session = session_name(s.session)
        self.geometry = model_spec(self.cfg)[1].geometry
        self.kind, arg = parse_source(s.source)
        if self.kind == "device":
            self._device_spec, self._latency = arg, parse_latency(s.device_latency)
            self.mirror(lambda: {Counter.INPUT_OVERFLOWS: self._overflow_base
                                 + (self.device.input.overflows if self.device is not None else 0)})
        else:
            self.source = make_paced_source(self.kind, arg, s)  # an unreadable file fails here
        self.sender = self.open_bus().audio_sender("audio_in")
        # Inference's events: a refusal of this session is logged here, where its user looks.
        self._events = self.bus.subscriber(["event.inference"], endpoints=["telemetry_inference"])
        self.meter = self.level_meter()
        if self.kind == "device":
            self._start_device()
        elif s.wait_ready_s > 0:
            endpoints = [f"telemetry_{name}" for name in sorted(WAIT_FOR)]
            self._ready_sub = self.bus.subscriber(["heartbeat."], endpoints=endpoints)
            self._wait_deadline = time.monotonic() + s.wait_ready_s
            self.state = "waiting"
            self.log("info", "waiting for inference and playback to be ready", up_to_s=s.wait_ready_s)
        else:
            self._start_paced()

    def loop_once(self) -> None:
        """Wait for readiness, send what is due, or watch the device; returns within ~100 ms."""
        if self.state == "waiting":
            self._wait_ready()
        elif self.state == "streaming" and self.source is not None:
            self._pace()
        else:
            if self.kind == "device":
                self._watch_device()
            time.sleep(0.1 if self.meter is None else min(0.1, self.cfg.bus.sound_frame_s))
        self._watch_refusals()
        self.publish_levels(self.meter)

    def _watch_refusals(self) -> None:
        """Log (rate-limited) when inference refuses this session's chunks."""
        for _ in range(REFUSAL_READS if self._events is not None else 0):
            msg = self._events.recv(0)
            if msg is None:
                return
            if isinstance(msg, SessionChange) and msg.action == "refused" and msg.session == self.session:
                self.count("refused_by_inference", msg.chunks or 1)
                self.notice("refused", f"inference refused session {self.session!r}: {msg.reason}",
                            session=self.session, sessions=msg.sessions, max_streams=msg.max_streams)

    def _send_chunk(self, chunk: AudioChunk) -> bool:
        """Send a message (the loop's thread, or a device's sender thread); its samples go to the
        level meter too (a reference into a bounded deque: nothing to wait for)."""
        if self.meter is not None:
            self.meter.feed(chunk.samples)
        return self.sender.send(chunk)

    def teardown(self) -> None:
        """Stop the device stream and its sender thread (joined within 1 s), close the bus."""
        self._close_device()
        self.close_bus()

    def status(self) -> CaptureStatus:
        """Heartbeat status: source, state, stream id, geometry, next offset, device."""
        f, g, d = self.framer, self.geometry, self.device
        return CaptureStatus(self.settings.source if self.settings else None, self.state,
                             f.stream_id if f else None, g.chunk_len if g else None, g.head_len if g else None,
                             f.offset if f else 0, d.name if d else None, d.rate if d else None,
                             scheduling=self.scheduling_status, device_block=d.input.frames_max if d else None)

    # ------------------------------------------------------------------ streams
    def _new_stream(self, framer: Framer, **extra: Any) -> None:
        """``framer``'s stream has begun: ready, ``stream_start`` event, log line."""
        self.framer = framer
        self.state = "streaming"
        self.ready = True
        g = self.geometry
        self.publish(StreamStart(framer.stream_id, source=self.settings.source, chunk_len=g.chunk_len,
                                 head_len=g.head_len, sample_rate=g.sample_rate, **extra))
        self.log("info", "streaming", stream_id=framer.stream_id, source=self.settings.source,
                 chunk_len=g.chunk_len, head_len=g.head_len, **extra)

    def _wait_ready(self) -> None:
        timeout_ms = int(min(100.0, max(1.0, (self._wait_deadline - time.monotonic()) * 1000)))
        msg = self._ready_sub.recv(timeout_ms)
        while msg is not None:
            if isinstance(msg, Heartbeat) and msg.service in WAIT_FOR and msg.ready:
                self._ready_seen.add(msg.service)
            msg = self._ready_sub.recv(0)
        # With IMMEDIATE set, audio_in polls writable only once inference's PULL is connected:
        # the heartbeats' SUB may reconnect sooner than the PUSH, and the head must not be lost.
        if self._ready_seen >= WAIT_FOR and self.sender.socket.poll(0, zmq.POLLOUT):
            self.log("info", "inference and playback are ready")
        elif time.monotonic() >= self._wait_deadline:
            self.log("warning", "not everyone is ready: starting anyway", waited_s=self.settings.wait_ready_s,
                     not_ready=",".join(sorted(WAIT_FOR - self._ready_seen)) or "audio_in")
        else:
            return
        self._ready_sub.socket.close()  # heartbeats are of no more use here
        self._ready_sub = None
        self._start_paced()

    def _start_paced(self) -> None:
        framer = Framer(self.geometry, self._send_chunk, self.count, self.session)
        framer.anchor(0, time.monotonic_ns())  # t0: the schedule's origin
        self._new_stream(framer)

    def _pace(self) -> None:
        """Send every message that is due (catching up if late), then sleep until the next."""
        f = self.framer
        now = time.monotonic_ns()
        while self.state == "streaming":
            n = f.next_len
            due = f.time_of(f.offset + n)
            if due > now:
                time.sleep(max(0, min(due - time.monotonic_ns(), _NS // 10)) / _NS)
                return
            if now - due > MAX_LATE_NS:
                # Stopped or starved for over a second: sending all of that at once would only
                # flood the pipeline with stale audio. Start the schedule over from now.
                self.count("schedule_slips")
                self.log("warning", "behind schedule: re-anchored", late_ms=(now - due) / 1e6, offset=f.offset)
                f.anchor(f.offset + n, now)
            self._send_next(n)

    def _send_next(self, n: int) -> None:
        f = self.framer
        if f.source_end is None:
            x = self.source.read(n)
            if self.source.finished:
                f.source_end = f.offset + len(x)
                self._flush_left = FLUSH_CHUNKS
            if len(x) < n:
                x = np.concatenate([x, np.zeros(n - len(x), np.float32)])
        else:
            x = np.zeros(n, np.float32)
            self._flush_left -= 1
        f.push(x)
        if f.source_end is not None and self._flush_left == 0:
            self.state = "ended"
            self.publish(Eof(f.stream_id, f.source_end))
            self.log("info", "end of source", stream_id=f.stream_id, source_end=f.source_end)

    # ------------------------------------------------------------------ devices
    def _start_device(self) -> None:
        framer = Framer(self.geometry, self._send_chunk, self.count, self.session)
        self.device = DeviceStream(self._device_spec, self._latency, self.settings.queue_chunks, framer,
                                   self.count, self.settings.device_block_ms)
        self._new_stream(framer, device=self.device.name, device_rate=self.device.rate)

    def _close_device(self) -> None:
        if self.device is not None:
            self._overflow_base += self.device.input.overflows
            self.device.close(1.0)
            self.device = None

    def _watch_device(self) -> None:
        """Mirror the callback's counts; reopen the device if its stream stopped."""
        d = self.device
        if d is not None:
            if d.last_error != self._logged_error:
                self._logged_error = d.last_error
                self.log("error", "sender thread error", error=d.last_error)
            if d.active:
                return
            self.log("error", "input stream stopped: reopening", device=d.name)
            self._close_device()
            self.state, self.ready = "device_lost", False
            self._next_device_try = time.monotonic()
        if time.monotonic() >= self._next_device_try:
            self._next_device_try = time.monotonic() + DEVICE_RETRY_S
            try:
                self._start_device()
            except SourceError as exc:
                self.count("device_open_failures")
                self.log("warning", f"cannot reopen the device: {exc}")


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """``llvc capture`` flags: the pipeline config, plus shortcuts into ``[capture]``."""
    add_service_arguments(p)
    p.add_argument("--source", default=None, metavar="SPEC",
                   help="tone | silence | clicks | file:PATH | device:NAME-or-INDEX (capture.source)")
    p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=None,
                   help="file source: start over at the end, in the same stream (capture.loop)")
    p.add_argument("--session", default=None, metavar="NAME",
                   help="the client session this capture feeds (capture.session; default: the host name)")


def run(args: argparse.Namespace) -> int:
    """Run the capture service until SIGTERM/SIGINT; 2 if it cannot start."""
    return service_main(CaptureService, args)
