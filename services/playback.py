"""``llvc playback``: jitter buffer and output to a sound device, a WAV file, or nowhere.

The service connects a PULL to ``audio_out``, puts every chunk into a
:class:`~services.jitter.JitterBuffer` keyed by stream offset, and lets the sink take audio out
of it on the sink's own clock (see ``services/__init__.py`` for the contract).

Outputs: the sink (``null``, ``file:PATH`` or ``device:NAME-or-INDEX``,
:mod:`services.sinks`) owns the clock; ``record`` adds a WAV recording beside any sink
(:mod:`services.recorder`, which also says what happens on a failing disk and on restarts).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from common.config import PipelineConfigError
from services.base import Service, Setting, add_service_arguments, non_negative, parse_settings, positive, \
    service_main
from services.jitter import SAMPLE_RATE, JitterBuffer, ReadResult
from services.recorder import WavRecorder, make_recorders
from services.sinks import make_sink

NS_PER_SAMPLE = 1_000_000_000 / SAMPLE_RATE
SLICE_NS = 50_000_000          # one loop_once: at most this long, so SIGTERM is noticed quickly
REPORT_INTERVAL_S = 0.5        # frequent events (underruns, drops, rejects): at most 2 reports/s
#: Without a connection to inference for this long, dial again by hand. ZeroMQ reconnects by
#: itself after a peer goes away, but not after a protocol error (libzmq 4.3: a message over
#: MAXMSGSIZE from the binder ends the session for good), which would leave playback deaf.
REDIAL_S = 1.0


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
    "record": Setting(str, ""),
    "target_ms": Setting(float, 6.0, non_negative),
    "max_ms": Setting(float, 60.0, positive),
    "block_ms": Setting(float, 2.0, lambda v: positive(v) or (None if v <= 1000 else "must be <= 1000")),
    "fade_ms": Setting(float, 2.0, non_negative),
    "device_latency": Setting((str, float), "low", _latency_problem),
}


def playback_settings(cfg, args: argparse.Namespace | None = None):
    """The validated ``[playback]`` table, with ``--sink`` / ``--record`` / ``--target-ms`` applied."""
    overrides = {k: getattr(args, k, None) for k in ("sink", "record", "target_ms")}
    s = parse_settings(cfg, "playback", SCHEMA, overrides)
    if s.max_ms <= s.target_ms:
        raise PipelineConfigError(f"{cfg.source}: playback.max_ms: must be above target_ms "
                                  f"({s.target_ms:g}), got {s.max_ms:g}")
    sink_file = s.sink.partition(":")[2] if s.sink.startswith("file:") else ""
    if s.record and sink_file and os.path.realpath(s.record) == os.path.realpath(sink_file):
        raise PipelineConfigError(f"{cfg.source}: playback.record: names the sink's own file "
                                  f"({s.record}); record to another path")
    return s


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


# --------------------------------------------------------------------------- the service
class PlaybackService(Service):
    """Receives converted chunks, buffers them on their stream timeline, plays them out."""

    name = "playback"

    def __init__(self, cfg, args=None):
        super().__init__(cfg, args)
        self.sink = None
        self.recorders: list[WavRecorder] = []
        self.sink_started = False
        self.receiver = None
        self.monitor_socket = None
        self.connected = False
        self._unconnected_since = time.monotonic()
        self.redials = 0
        self.throttles = {k: Throttle() for k in ("underrun", "late", "overflow", "reject")}
        self.rejects_seen = 0

    def setup(self) -> None:
        self.settings = s = playback_settings(self.cfg, self.args)
        self.jb = JitterBuffer(s.target_ms, s.max_ms, s.fade_ms)
        self.sink = make_sink(s, self.log)
        self.sink.open()  # first: a sink that cannot open is a one-line exit 2, before any socket
        self.recorders = make_recorders(s, self.log, self.event)
        for r in self.recorders:
            r.open()
        self.sink.recorders = self.recorders
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
                 **self.sink.describe(), **{k: v for r in self.recorders for k, v in r.describe().items()})
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
            self._unconnected_since = time.monotonic()
        if not self.connected and self.monitor_socket is not None \
                and time.monotonic() - self._unconnected_since > REDIAL_S:
            self._redial()
        if self.connected != self.ready:
            self.ready = self.connected
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
        for r in self.recorders:
            self.counters.update(r.counters())
        self.counters["rejected"] = self.receiver.rejected
        self.counters["redials"] = self.redials
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
        return {"sink": self.settings.sink, **({"record": self.settings.record} if self.settings.record else {}),
                "target_ms": self.settings.target_ms, "fill_ms": round(self.jb.fill_ms, 3),
                "stream_id": self.jb.stream_id, **self._output_status()}

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
        self.close_bus()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``llvc playback`` flags: the pipeline config, and shortcuts for three ``[playback]`` keys."""
    add_service_arguments(p)
    g = p.add_argument_group("playback")
    g.add_argument("--sink", metavar="SPEC", default=None,
                   help="null | file:PATH | device:NAME-or-INDEX (playback.sink)")
    g.add_argument("--record", metavar="PATH", default=None,
                   help="also write what the sink plays to this WAV file (playback.record)")
    g.add_argument("--target-ms", type=float, default=None, metavar="MS",
                   help="jitter buffer target: a stream plays this long after its first chunk arrives "
                        "(playback.target_ms)")


def run(args: argparse.Namespace) -> int:
    """Run the playback service until SIGTERM/SIGINT."""
    return service_main(PlaybackService, args)
