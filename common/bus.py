"""The message bus: ZeroMQ sockets for audio (PUSH/PULL in, ROUTER/DEALER out) and telemetry (PUB/SUB).

Every socket is made here, from the pipeline config (:mod:`common.config`), so endpoints, roles
and real-time options live in one place.

Audio path. Inference is the stable server: it binds ``audio_in`` (PULL) and ``audio_out``
(ROUTER); capture and playback connect. Many captures may push into the one PULL (each chunk
names its session). Converted audio must reach only its own session's playback, which a PUSH
cannot do (it deals messages round-robin), so playback connects a DEALER and keeps asking for
its session (:class:`~common.protocol.Listen`, every :data:`LISTEN_EVERY_S`): inference's
:class:`AudioRouter` sends each chunk to the live listeners of its session only, and forgets a
listener that stopped asking or whose connection went away, so no audio is queued for a
playback that is gone. Options, and why:

* small send/receive high-water marks: a stalled peer costs dropped chunks, never a growing
  backlog of stale audio;
* ``IMMEDIATE`` on connecting sockets that send: nothing queues for a peer that is not there
  (while inference restarts, capture counts drops instead of building a backlog). Never on a
  SUB: there libzmq discards what a publisher sent but the subscriber has not read yet the
  moment that publisher disconnects, so a busy monitor lost the final heartbeat of a service
  that had just stopped (about every other run);
* ``LINGER 0``: closing never waits for unsent audio (telemetry PUBs linger briefly,
  ``bus.telemetry_linger_ms``, so a service's final heartbeat reaches every subscriber);
* ZMTP heartbeats: a dead TCP peer is noticed in seconds, not at the next TCP timeout;
* ``MAXMSGSIZE`` from the protocol's maximum: libzmq drops a peer that sends anything larger
  before it is ever allocated;
* sends are non-blocking; a send that cannot go out now is a counted drop.

Telemetry path (PUB/SUB). **Every service binds its own PUB** (``telemetry_<service>``) and
subscribers (the monitor, dashboards, ``llvc tap``) connect to all of them. Chosen over an
XSUB/XPUB forwarder because with a forwarder the forwarder's host is a single point whose
restart silences every service's telemetry; here restarting any process, the monitor included,
only interrupts that process's own messages, and ZeroMQ reconnects subscribers by itself. A PUB
never blocks and drops for slow subscribers, so taps cannot affect audio.

Security: with ``[security] curve = true`` every ``tcp://`` socket uses CURVE (see
:mod:`common.security`): binders are servers that admit only authorized client keys.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import zmq

from .audio import SAMPLE_RATE
from .config import Endpoint, PipelineConfig
from .control import ControlClient, ControlServer
from .protocol import (
    AudioChunk,
    Listen,
    ProtocolError,
    Telemetry,
    decode_audio,
    decode_listen,
    decode_telemetry,
    encode,
    max_message_bytes,
)
from .security import CurveKeys, load_keys, make_client, make_server, start_authenticator
from .telemetry import Record, make_message
from .telemetry import decode as decode_record

#: Control requests waiting at most (a REP answers one at a time; more waiting means a flood).
CONTROL_HWM = 16
#: How often a playback repeats its :class:`~common.protocol.Listen` request. Short, because a
#: restarted inference sends a playback nothing until it hears the next one.
LISTEN_EVERY_S = 0.1
#: A listener not heard from for this long is forgotten (ten requests missed).
LISTEN_TIMEOUT_S = 1.0
#: Listen requests read per :meth:`AudioRouter.poll_listeners` at most (a flood cannot stall the loop).
LISTEN_READ_LIMIT = 256


class BusError(RuntimeError):
    """A socket could not be bound or connected (one line: service, endpoint, address, why)."""


class AudioSender:
    """Non-blocking sender of audio chunks (PUSH). Never blocks; failures are counted drops."""

    def __init__(self, sock: zmq.Socket):
        self.socket = sock
        self.sent = 0
        self.dropped = 0

    def send(self, chunk: AudioChunk) -> bool:
        """Encode and send now if possible; ``False`` (and a counted drop) if not."""
        return self.send_bytes(encode(chunk))

    def send_bytes(self, data: bytes) -> bool:
        """Send an already encoded message now if possible (see :meth:`send`)."""
        try:
            self.socket.send(data, zmq.NOBLOCK, copy=True)
        except zmq.Again:  # no peer, or its queue is full: drop, never wait
            self.dropped += 1
            return False
        except zmq.ZMQError:
            self.dropped += 1
            return False
        self.sent += 1
        return True


class _Receiver:
    """Counting, polling receive side shared by audio PULL and telemetry SUB sockets."""

    def __init__(self, sock: zmq.Socket, max_samples: int):
        self.socket = sock
        self.max_samples = max_samples
        self.received = 0
        self.rejected = 0
        self.last_reject: str | None = None
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)

    def _frames(self, timeout_ms: int) -> list[bytes] | None:
        """The next message's frames within ``timeout_ms`` (0: only if already there)."""
        if timeout_ms and not self._poller.poll(timeout_ms):
            return None
        try:
            return self.socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def _accept(self, decode, frames: list[bytes]):
        """``decode(frames)``, counting a success, or a reject (``None``) on ProtocolError."""
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            self.rejected += 1
            self.last_reject = str(exc)
            return None
        self.received += 1
        return msg


class AudioReceiver(_Receiver):
    """Receiver of audio chunks (PULL). Malformed input is rejected and counted, never raised."""

    def __init__(self, sock: zmq.Socket, max_samples: int, expect_rate: int | None = SAMPLE_RATE):
        super().__init__(sock, max_samples)
        self.expect_rate = expect_rate

    def _decode(self, frames: list[bytes]) -> AudioChunk:
        if len(frames) != 1:
            raise ProtocolError(f"audio: expected 1 frame, got {len(frames)}")
        return decode_audio(frames[0], max_samples=self.max_samples, expect_rate=self.expect_rate)

    def recv(self, timeout_ms: int = 0) -> AudioChunk | None:
        """The next valid chunk, waiting up to ``timeout_ms``; ``None`` if none arrived.

        A rejected message also returns ``None`` (see :attr:`rejected`, :attr:`last_reject`).
        """
        frames = self._frames(timeout_ms)
        return None if frames is None else self._accept(self._decode, frames)

    def drain(self, limit: int = 1000) -> list[AudioChunk]:
        """Every valid chunk already waiting (up to ``limit``), without blocking."""
        out = []
        for _ in range(limit):
            frames = self._frames(0)
            if frames is None:
                break
            chunk = self._accept(self._decode, frames)
            if chunk is not None:
                out.append(chunk)
        return out

    def drain_from(self, limit: int = 1000) -> list[tuple[AudioChunk, str | None]]:
        """Like :meth:`drain`, with each chunk's sender: the CURVE key (z85) it authenticated
        with, ``None`` on a link without CURVE."""
        out = []
        for _ in range(limit):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            chunk = self._accept(self._decode, [f.bytes for f in frames])
            if chunk is not None:
                out.append((chunk, _peer_key(frames[0])))
        return out


class AudioListener(AudioReceiver):
    """Playback's side of ``audio_out`` (DEALER): asks for ``session``'s audio and receives it.

    :meth:`recv` and :meth:`drain` repeat the request when it is due, so a caller that keeps
    receiving keeps listening; :meth:`listen` sends it now (on a new connection, say).
    """

    def __init__(self, sock: zmq.Socket, max_samples: int, session: str, expect_rate: int | None = SAMPLE_RATE):
        super().__init__(sock, max_samples, expect_rate)
        self.session = session
        self._request = encode(Listen(session))
        self._next_request = 0.0

    def listen(self) -> bool:
        """Send the request now; ``False`` if it could not go out (no connection yet: then the
        next receive tries again, so a new connection is asked on at once)."""
        try:
            self.socket.send(self._request, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        self._next_request = time.monotonic() + LISTEN_EVERY_S
        return True

    def _frames(self, timeout_ms: int) -> list[bytes] | None:
        if time.monotonic() >= self._next_request:
            self.listen()
        if timeout_ms > 1000 * LISTEN_EVERY_S:  # keep asking while waiting long
            deadline = time.monotonic() + timeout_ms / 1000
            while (left := deadline - time.monotonic()) > 0:
                frames = super()._frames(max(1, int(1000 * min(left, LISTEN_EVERY_S))))
                if frames is not None:
                    return frames
                if time.monotonic() >= self._next_request:
                    self.listen()
            return None
        return super()._frames(timeout_ms)


@dataclass
class _Listener:
    session: str
    key: str | None      # the peer's CURVE key (z85), None without CURVE
    heard: float         # monotonic s of its latest request


class AudioRouter:
    """Inference's side of ``audio_out`` (ROUTER): each session's audio to its own listeners.

    :meth:`poll_listeners` reads the playbacks' requests (malformed ones are rejected and counted);
    :meth:`send` sends a chunk to every live listener of its session, never blocking: a
    listener whose queue is full loses the chunk, one whose connection is gone is forgotten at
    once (``ROUTER_MANDATORY``), and one silent for :data:`LISTEN_TIMEOUT_S` too. :attr:`sent`
    and :attr:`dropped` count chunks: those at least one listener got, and the others.
    With CURVE, a chunk goes only to listeners that authenticated with the session's key.
    """

    def __init__(self, sock: zmq.Socket, curve: bool):
        self.socket = sock
        self.curve = curve
        self.listeners: dict[bytes, _Listener] = {}
        self.sent = self.dropped = self.rejected = 0
        self.last_reject: str | None = None

    def poll_listeners(self) -> None:
        """Read waiting requests (up to :data:`LISTEN_READ_LIMIT`) and forget silent listeners."""
        now = time.monotonic()
        for _ in range(LISTEN_READ_LIMIT):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                if len(frames) != 2:
                    raise ProtocolError(f"listen: expected 1 frame, got {len(frames) - 1}")
                request = decode_listen(frames[1].bytes)
            except ProtocolError as exc:
                self.rejected += 1
                self.last_reject = str(exc)
                continue
            key = _peer_key(frames[1]) if self.curve else None
            self.listeners[frames[0].bytes] = _Listener(request.session, key, now)
        for rid in [r for r, li in self.listeners.items() if now - li.heard > LISTEN_TIMEOUT_S]:
            del self.listeners[rid]

    def listening(self, session: str) -> int:
        """How many live listeners ``session`` has."""
        return sum(li.session == session for li in self.listeners.values())

    def send(self, chunk: AudioChunk, session: str, key: str | None = None) -> bool:
        """Send ``chunk`` to ``session``'s listeners (with CURVE: those with ``key`` only);
        ``True`` if at least one got it."""
        data = encode(chunk)
        got = False
        for rid in [r for r, li in self.listeners.items()
                    if li.session == session and (not self.curve or li.key == key)]:
            try:
                self.socket.send_multipart([rid, data], zmq.NOBLOCK)
            except zmq.Again:  # its queue is full: drop, never wait
                continue
            except zmq.ZMQError:  # EHOSTUNREACH: its connection is gone
                del self.listeners[rid]
                continue
            got = True
        self.sent += got
        self.dropped += not got
        return got


def _peer_key(frame: zmq.Frame) -> str | None:
    """The CURVE key (z85) the ZAP handler authenticated the frame's sender with, if any."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


class TelemetryPublisher:
    """A service's telemetry PUB. Publishing never blocks and never raises."""

    def __init__(self, sock: zmq.Socket, service: str):
        self.socket = sock
        self.service = service
        self.published = 0
        self.dropped = 0
        self._host, self._pid = socket.gethostname(), os.getpid()

    def publish(self, record: Record) -> bool:
        """Publish a :mod:`common.telemetry` record; ``False`` if it could not go out."""
        return self.publish_message(make_message(self.service, record, self._host, self._pid))

    def publish_message(self, msg: Telemetry) -> bool:
        """Publish a ready-made :class:`Telemetry` envelope under its topic."""
        try:
            self.socket.send_multipart([msg.topic.encode(), encode(msg)], zmq.NOBLOCK)
        except (zmq.ZMQError, ProtocolError):
            self.dropped += 1
            return False
        self.published += 1
        return True


class TelemetrySubscriber(_Receiver):
    """SUB connected to telemetry endpoints, filtered by topic prefixes; yields typed records."""

    def _decode(self, frames: list[bytes]) -> Record:
        if len(frames) != 2:
            raise ProtocolError(f"telemetry: expected 2 frames (topic, message), got {len(frames)}")
        msg = decode_telemetry(frames[1], max_samples=self.max_samples)
        if frames[0] != msg.topic.encode():
            raise ProtocolError(f"telemetry: topic frame {frames[0][:64]!r} does not match {msg.topic!r}")
        return decode_record(msg)

    def recv(self, timeout_ms: int = 0) -> Record | None:
        """The next valid record (:mod:`common.telemetry`) within ``timeout_ms``, else ``None``
        (malformed messages and records are counted as rejected)."""
        frames = self._frames(timeout_ms)
        return None if frames is None else self._accept(self._decode, frames)


class Bus:
    """The sockets of one service, made from the pipeline config.

    ``service`` decides the role on each endpoint: the endpoint's ``binder`` binds, everyone
    else connects. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, cfg: PipelineConfig, service: str, context: zmq.Context | None = None):
        self.cfg = cfg
        self.service = service
        self.context = context or zmq.Context()
        self._own_context = context is None
        self._sockets: list[zmq.Socket] = []
        self._auth = None
        self._keys: CurveKeys | None = (load_keys(cfg.security.keys_dir, cfg.security.client_key)
                                           if cfg.security.curve else None)

    # ------------------------------------------------------------------ sockets
    def _socket(self, kind: int, endpoint: Endpoint, hwm_option: int, hwm: int,
                connect_only: bool = False) -> zmq.Socket:
        bus = self.cfg.bus
        address, is_bind = (endpoint.connect, False) if connect_only else endpoint.address_for(self.service)
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, bus.telemetry_linger_ms if kind == zmq.PUB else bus.linger_ms)
        sock.setsockopt(hwm_option, hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes(bus.max_samples))
        sock.setsockopt(zmq.HEARTBEAT_IVL, bus.heartbeat_ivl_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, bus.heartbeat_timeout_ms)
        sock.setsockopt(zmq.HEARTBEAT_TTL, bus.heartbeat_timeout_ms)
        sock.setsockopt(zmq.RECONNECT_IVL, bus.reconnect_ivl_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, bus.reconnect_ivl_max_ms)
        if not is_bind and kind != zmq.SUB:
            sock.setsockopt(zmq.IMMEDIATE, 1)
        if self._keys is not None and endpoint.is_tcp:
            if is_bind:
                if self._auth is None:
                    self._auth = start_authenticator(self.context, self._keys)
                make_server(sock, self._keys)
            else:
                make_client(sock, self._keys)
        try:
            sock.bind(address) if is_bind else sock.connect(address)
        except zmq.ZMQError as exc:
            sock.close(0)
            verb = "bind" if is_bind else "connect"
            raise BusError(f"{self.service}: cannot {verb} {endpoint.name} at {address} ({exc})") from None
        self._sockets.append(sock)
        return sock

    def audio_sender(self, endpoint: str) -> AudioSender:
        """A PUSH socket on ``endpoint`` (e.g. capture → ``audio_in``)."""
        ep = self.cfg.endpoint(endpoint)
        return AudioSender(self._socket(zmq.PUSH, ep, zmq.SNDHWM, self.cfg.bus.send_hwm))

    def audio_router(self, endpoint: str) -> AudioRouter:
        """The ROUTER on ``endpoint`` (inference → ``audio_out``): see :class:`AudioRouter`."""
        ep = self.cfg.endpoint(endpoint)
        sock = self._socket(zmq.ROUTER, ep, zmq.SNDHWM, self.cfg.bus.send_hwm)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.RCVHWM, CONTROL_HWM * 16)
        return AudioRouter(sock, self._keys is not None and ep.is_tcp)

    def audio_listener(self, endpoint: str, session: str, expect_rate: int | None = SAMPLE_RATE) -> AudioListener:
        """A DEALER on ``endpoint`` (playback ← ``audio_out``) that asks for ``session``'s audio."""
        ep = self.cfg.endpoint(endpoint)
        sock = self._socket(zmq.DEALER, ep, zmq.RCVHWM, self.cfg.bus.recv_hwm)
        sock.setsockopt(zmq.SNDHWM, 2)  # requests only: an old one waiting is as good as a new one
        return AudioListener(sock, self.cfg.bus.max_samples, session, expect_rate)

    def audio_receiver(self, endpoint: str, expect_rate: int | None = SAMPLE_RATE) -> AudioReceiver:
        """A PULL socket on ``endpoint`` (e.g. inference ← ``audio_in``)."""
        ep = self.cfg.endpoint(endpoint)
        sock = self._socket(zmq.PULL, ep, zmq.RCVHWM, self.cfg.bus.recv_hwm)
        return AudioReceiver(sock, self.cfg.bus.max_samples, expect_rate)

    def publisher(self) -> TelemetryPublisher:
        """This service's telemetry PUB, bound at ``telemetry_<service>``."""
        ep = self.cfg.endpoint(f"telemetry_{self.service}")
        return TelemetryPublisher(self._socket(zmq.PUB, ep, zmq.SNDHWM, self.cfg.bus.telemetry_hwm),
                                  self.service)

    def subscriber(self, topics: tuple[str, ...] | list[str] = ("",),
                   endpoints: list[str] | None = None) -> TelemetrySubscriber:
        """A SUB connected to every telemetry endpoint (or ``endpoints``), filtered by ``topics``."""
        eps = [self.cfg.endpoint(n) for n in endpoints] if endpoints else self.cfg.telemetry_endpoints()
        if not eps:
            raise BusError(f"{self.service}: no telemetry endpoints to subscribe to")
        if self._keys is not None and len({ep.is_tcp for ep in eps}) > 1:
            # CURVE is a property of the whole socket: it cannot talk to plaintext ipc peers too.
            raise BusError(f"{self.service}: with curve on, telemetry endpoints must be all tcp:// "
                           f"or all ipc:// ({', '.join(ep.name for ep in eps)})")
        first, *rest = eps
        # Subscribers always connect, even to their own service's PUB.
        sock = self._socket(zmq.SUB, first, zmq.RCVHWM, self.cfg.bus.telemetry_hwm, connect_only=True)
        for ep in rest:
            try:
                sock.connect(ep.connect)
            except zmq.ZMQError as exc:
                raise BusError(f"{self.service}: cannot connect {ep.name} at {ep.connect} ({exc})") from None
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        return TelemetrySubscriber(sock, self.cfg.bus.max_samples)

    @property
    def curve_keys(self) -> CurveKeys | None:
        """The CURVE keys in use (``None`` with ``[security] curve`` off)."""
        return self._keys

    def control_server(self) -> ControlServer:
        """The REP socket on ``control`` (bound by its binder: the owner of the live settings)."""
        ep = self.cfg.endpoint("control")
        return ControlServer(self._socket(zmq.REP, ep, zmq.RCVHWM, CONTROL_HWM))

    def control_client(self) -> ControlClient:
        """A REQ socket connected to ``control`` (``llvc ctl``, dashboards)."""
        ep = self.cfg.endpoint("control")
        return ControlClient(self._socket(zmq.REQ, ep, zmq.SNDHWM, CONTROL_HWM, connect_only=True), ep.connect)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close every socket (LINGER applies), stop the authenticator, end an own context."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context:
            self.context.term()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

