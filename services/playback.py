"""``llvc playback``: jitter buffer and output to a sound device, a WAV file, or nowhere.

The service connects a PULL to ``audio_out``, puts every chunk into a
:class:`~services.jitter.JitterBuffer` keyed by stream offset, and lets the sink take audio out
of it on the sink's own clock (see ``services/__init__.py`` for the contract).

Outputs: the sink (``null``, ``file:PATH``, ``device:NAME-or-INDEX`` or ``virtual-mic[:NAME]``,
:mod:`services.sinks`) owns the clock; ``record`` adds a WAV recording beside any sink
(:mod:`services.recorder`, which also says what happens on a failing disk and on restarts);
``monitor`` plays the same audio on a second device too (:class:`services.sinks.MonitorOutput`).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from common.audio import SAMPLE_RATE
from common.devices import block_problem, latency_problem
from common.settings import non_negative, positive, setting
from common.telemetry import AudioHeader, Drained, PlaybackChunk, PlaybackStatus, StreamStart, Underrun
from services.base import Service, add_service_arguments, service_main
from services.jitter import JitterBuffer, ReadResult
from services.playout import AdaptivePlayout
from services.recorder import WavRecorder, make_recorders
from services.sinks import DEVICE_MARGIN_MS, make_monitor, make_sink
from services.virtual_mic import spec_problem as virtual_mic_problem

NS_PER_SAMPLE = 1_000_000_000 / SAMPLE_RATE
SLICE_NS = 50_000_000          # one loop_once: at most this long, so SIGTERM is noticed quickly
#: Without a connection to inference for this long, dial again by hand. ZeroMQ reconnects by
#: itself after a peer goes away, but not after a protocol error (libzmq 4.3: a message over
#: MAXMSGSIZE from the binder ends the session for good), which would leave playback deaf.
REDIAL_S = 1.0


def _sink_problem(v: str) -> str | None:
    kind, sep, rest = v.partition(":")
    if v == "null" or (kind == "device" and sep) or (kind == "file" and rest):
        return None
    if kind == "virtual-mic":
        return virtual_mic_problem(v)
    return "must be null, file:PATH, device:NAME-or-INDEX or virtual-mic[:NAME]"


def _monitor_problem(v: str) -> str | None:
    return None if not v or (v.startswith("device:") and v[7:].strip()) else "must be empty or device:NAME-or-INDEX"


@dataclass(frozen=True)
class PlaybackSettings:
    """The ``[playback]`` table (config/pipeline.toml documents each key)."""

    sink: str = setting("null", _sink_problem)
    record: str = setting("")
    target_ms: float = setting(6.0, non_negative)
    max_ms: float = setting(60.0, positive)
    # Adaptive playout (services/playout.py): target_ms is then where a stream starts, and the
    # margin follows the arrivals between target_min_ms and target_max_ms.
    adaptive: bool = setting(False)
    target_min_ms: float = setting(1.0, non_negative)
    target_max_ms: float = setting(12.0, positive)
    adapt_window_s: float = setting(30.0, positive)
    adapt_coverage: float = setting(1.0)
    block_ms: float = setting(2.0, lambda v: positive(v) or (None if v <= 1000 else "must be <= 1000"))
    fade_ms: float = setting(2.0, non_negative)
    device_latency: str | float = setting("low", latency_problem)
    device_block_ms: float = setting(0.0, block_problem)
    ring_margin_ms: float = setting(DEVICE_MARGIN_MS, non_negative)
    monitor: str = setting("", _monitor_problem)

    def problems(self):
        """Checks across keys."""
        if self.max_ms <= self.target_ms:
            yield "max_ms", f"must be above target_ms ({self.target_ms:g}), got {self.max_ms:g}"
        if self.adaptive and self.target_max_ms <= self.target_min_ms:
            yield "target_max_ms", f"must be above target_min_ms ({self.target_min_ms:g}), got {self.target_max_ms:g}"
        if self.adaptive and not 0.5 <= self.adapt_coverage <= 1.0:
            yield "adapt_coverage", f"must be in [0.5, 1], got {self.adapt_coverage:g}"
        if self.adaptive and self.target_max_ms >= self.max_ms:
            yield "target_max_ms", f"must be below max_ms ({self.max_ms:g}), got {self.target_max_ms:g}"
        sink_file = self.sink.partition(":")[2] if self.sink.startswith("file:") else ""
        if self.record and sink_file and os.path.realpath(self.record) == os.path.realpath(sink_file):
            yield "record", f"names the sink's own file ({self.record}); record to another path"


def jitter_buffer(s: PlaybackSettings) -> JitterBuffer:
    """The jitter buffer these settings describe (also what scripts/replay_playout.py replays)."""
    adaptive = (AdaptivePlayout(s.target_min_ms, s.target_max_ms, s.adapt_window_s, coverage=s.adapt_coverage)
                if s.adaptive else None)
    return JitterBuffer(s.target_ms, s.max_ms, s.fade_ms, adaptive=adaptive)


def playback_settings(cfg, args: argparse.Namespace | None = None) -> PlaybackSettings:
    """The validated ``[playback]`` table, with ``--sink`` / ``--record`` / ``--target-ms`` applied."""
    flags = {k: getattr(args, k, None) for k in ("sink", "record", "target_ms", "monitor")}
    return cfg.settings("playback", PlaybackSettings, flags)


class _MeterTap:
    """Hands what the sink plays to a level meter, as a recorder would (a copy: the sink reuses
    its block buffer)."""

    def __init__(self, meter):
        self.meter = meter

    def consume(self, res, block: np.ndarray) -> None:
        self.meter.feed(block.copy())


# --------------------------------------------------------------------------- the service
class PlaybackService(Service):
    """Receives converted chunks, buffers them on their stream timeline, plays them out."""

    name = "playback"
    audio_path = True

    def __init__(self, cfg, args=None):
        super().__init__(cfg, args)
        self.sink = None
        self.monitor_out = None  # the second device, if any
        self.meter = None  # what the sink plays, for sound.playback frames
        self.recorders: list[WavRecorder] = []
        self.sink_started = False
        self.receiver = None
        self.monitor_socket = None
        self.connected = False
        self.listening = False
        self.session = ""
        self._unconnected_since = time.monotonic()
        self.redials = 0

    def setup(self) -> None:
        self.settings = s = playback_settings(self.cfg, self.args)
        self.jb = jitter_buffer(s)
        self.sink = make_sink(s, self.log)
        self.sink.open()  # first: a sink that cannot open is a one-line exit 2, before any socket
        self.monitor_out = make_monitor(s, self.log)
        if self.monitor_out is not None:
            self.monitor_out.open()
        self.recorders = make_recorders(s, self.log, self.publish)
        for r in self.recorders:
            r.open()
        self.meter = self.level_meter()
        # The sink hands every block it plays to its recorders; the meter and the monitor output
        # take it too.
        self.sink.recorders = self.recorders + ([_MeterTap(self.meter)] if self.meter else []) + \
            ([self.monitor_out] if self.monitor_out is not None else [])
        from services.capture import client_session

        self.session = client_session(self.cfg, getattr(self.args, "session", None))
        self.receiver = self.open_bus().audio_listener("audio_out", self.session)
        self.watch_rejects(self.receiver)
        for source in (lambda: vars(self.jb.stats), self.sink.counters, *(r.counters for r in self.recorders),
                       lambda: {"redials": self.redials, "received": self.receiver.received}):
            self.mirror(source)
        if self.monitor_out is not None:
            self.mirror(self.monitor_out.counters)
        address = self.cfg.endpoint("audio_out").connect
        if address.startswith("inproc://"):
            # inproc has no connection events; connecting is immediate
            self.connected = self.listening = self.receiver.listen()
        else:
            sock = self.receiver.socket
            self.monitor_socket = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
            # The Bus connected the socket before the monitor existed, and a handshake that
            # finished in between would never be reported (seen under load): connect again
            # under the monitor's eye. At worst the few chunks already on their way to this
            # brand-new connection are dropped, once, at startup.
            sock.disconnect(address)
            sock.connect(address)
        monitor = self.monitor_out.describe() if self.monitor_out is not None else {}
        self.log("info", "sink open", sink=s.sink, target_ms=s.target_ms, adaptive=s.adaptive, max_ms=s.max_ms,
                 **self.sink.describe(), **monitor, **{k: v for r in self.recorders for k, v in r.describe().items()})
        if self.monitor_out is not None:
            self.monitor_out.start(time.monotonic_ns())
        self.sink.start(time.monotonic_ns())  # last: the first tick is due now, not a setup ago
        self.sink_started = True

    def _watch_connection(self) -> None:
        """Ready = sink open, the handshake with inference done and this session asked for
        (capture waits for it: inference sends a session's audio only to playbacks that asked)."""
        while self.monitor_socket is not None:
            try:
                ev = recv_monitor_message(self.monitor_socket, zmq.NOBLOCK)
            except zmq.Again:
                break
            self.connected = ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
            self._unconnected_since = time.monotonic()
            self.listening = False
        if self.connected and not self.listening:
            self.listening = self.receiver.listen()
        if not self.connected and self.monitor_socket is not None \
                and time.monotonic() - self._unconnected_since > REDIAL_S:
            self._redial()
        if (self.connected and self.listening) != self.ready:
            self.ready = self.connected and self.listening
            self.log("info", "ready" if self.ready else "inference disconnected")
            self.heartbeat()  # say it now: capture is waiting for it

    def _redial(self) -> None:
        address = self.cfg.endpoint("audio_out").connect
        sock = self.receiver.socket
        try:
            sock.disconnect(address)
        except zmq.ZMQError:
            pass  # the endpoint is already gone (how a protocol error leaves it)
        sock.connect(address)
        self.redials += 1
        self._unconnected_since = time.monotonic()
        if self.redials == 1 or self.redials % 60 == 0:  # once, then once a minute while it lasts
            self.log("warning", "no connection to inference: dialing again", address=address, redials=self.redials)

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
        self.publish_levels(self.meter)  # after the slice: between two ticks, never inside one

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
        self.publish(AudioHeader.of(chunk, arrival_ns))  # for taps: llvc tap --audio, dashboards
        if res.new_stream:
            self.publish(StreamStart(chunk.stream_id, chunk.offset, seq=chunk.seq, target_ms=self.settings.target_ms))
            self.log("info", "stream start", stream_id=chunk.stream_id, offset=chunk.offset)
        if res.late:
            self.notice("late", "dropped late audio", {"chunks": 1, "samples": res.late})
        if res.overflow:
            self.notice("overflow", "dropped overflow audio", {"events": 1, "samples": res.overflow})

    def _played(self, blocks: list[tuple[ReadResult, int]]) -> None:
        """Per-chunk e2e latency, underruns and drains of the blocks the sink just played."""
        for res, t_out in blocks:
            for s in res.starts:
                e2e_ns = t_out + s.index * NS_PER_SAMPLE - s.t_capture_ns
                self.publish(PlaybackChunk(s.stream_id, s.seq, s.offset, round(e2e_ns / 1e6, 3),
                                           round(self.jb.fill_ms, 3), round(s.wait_ns / 1e6, 3),
                                           round((t_out - res.t_ns) / 1e6, 3), self.session))
            if res.underruns or res.invented:
                self.notice("underrun", "underrun", {"underruns": res.underruns, "samples": res.invented}, Underrun,
                            stream_id=self.jb.stream_id, total=self.jb.stats.underruns)
            if res.drained:
                stream_id, source_end = res.drained
                self.publish(Drained(stream_id, source_end))
                self.log("info", "stream drained", stream_id=stream_id, source_end=source_end)

    def status(self) -> PlaybackStatus | None:
        if self.sink is None:
            return None
        return PlaybackStatus(self.settings.sink, round(self.jb.target_ms, 3), round(self.jb.fill_ms, 3),
                              self.jb.stream_id, self.settings.record or None, **self._output_status(),
                              session=self.session, scheduling=self.scheduling_status)

    def _output_status(self) -> dict[str, Any]:
        return {**self.sink.status(), **{k: v for r in self.recorders for k, v in r.status().items()}}

    def teardown(self) -> None:
        if self.monitor_socket is not None:
            self.receiver.socket.disable_monitor()
            self.monitor_socket.close(0)  # before the bus ends its context, or term() would wait
            self.monitor_socket = None
        if self.sink_started:
            self.log("info", "sink closing", **self._output_status())
        for r in self.recorders:
            r.close()
        if self.sink is not None:
            self.sink.close()
        if self.monitor_out is not None:
            self.monitor_out.close()
        self.close_bus()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``llvc playback`` flags: the pipeline config, and shortcuts for four ``[playback]`` keys."""
    add_service_arguments(p)
    g = p.add_argument_group("playback")
    g.add_argument("--sink", metavar="SPEC", default=None,
                   help="null | file:PATH | device:NAME-or-INDEX | virtual-mic[:NAME] (playback.sink)")
    g.add_argument("--monitor", metavar="SPEC", default=None,
                   help="device:NAME-or-INDEX: also play to this device, e.g. headphones (playback.monitor)")
    g.add_argument("--record", metavar="PATH", default=None,
                   help="also write what the sink plays to this WAV file (playback.record)")
    g.add_argument("--session", default=None, metavar="NAME",
                   help="the client session to play (capture.session; default: the host name)")
    g.add_argument("--target-ms", type=float, default=None, metavar="MS",
                   help="jitter buffer target: a stream plays this long after its first chunk arrives "
                        "(playback.target_ms)")


def run(args: argparse.Namespace) -> int:
    """Run the playback service until SIGTERM/SIGINT."""
    return service_main(PlaybackService, args)
