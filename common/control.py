"""The control protocol: requests that steer a running pipeline, and their replies.

``llvc ctl`` and the dashboard send a :class:`ControlRequest` to the ``control`` endpoint
(ZeroMQ REQ/REP; the service that owns the live settings binds it) and get one
:class:`ControlReply` back. Each is one msgpack map; :func:`decode_request` and
:func:`decode_reply` are the one way to read them and raise only :class:`ControlError`.

Request ``{"v": [1, 0], "cmd": CMD, ...}``:

=========== ==================================================== =============================
``cmd``     fields                                               does
=========== ==================================================== =============================
``status``  (none)                                               nothing; the reply has the state
``voices``  (none)                                               the reply lists the voices
``set``     ``values``: ``{key: bool | int | float | str}``      change live settings, all or none
``voice``   ``checkpoint``: str, ``config``: str (optional)      start switching voices
=========== ==================================================== =============================

Reply ``{"v": [1, 0], "ok": bool, "error": str | None, "state": {...}}``: ``state`` is the
owner's current values (after the change, when one was accepted), whatever the outcome.

**Versions.** A different major is refused; a later minor may only add fields, which are
ignored. Who may change what is the owner's business; a reply says so in ``error``.

The sockets are made by :class:`common.bus.Bus` (:meth:`~common.bus.Bus.control_server`,
:meth:`~common.bus.Bus.control_client`); this module wraps them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

__all__ = ["CONTROL_VERSION", "COMMANDS", "MAX_CONTROL_BYTES", "ControlError", "ControlRequest", "ControlReply",
           "decode_request", "decode_reply", "request_from_map", "plain_value", "ControlServer", "Incoming",
           "ControlClient"]

#: ``(major, minor)`` of the messages this module writes.
CONTROL_VERSION = (1, 0)
#: Every command a request may carry.
COMMANDS = ("status", "voices", "set", "voice")
#: Largest control message either side accepts (a reply's state and voice list fit easily).
MAX_CONTROL_BYTES = 64 * 1024
MAX_VALUES = 32
MAX_TEXT = 1024


class ControlError(ValueError):
    """A control message that cannot be used, or a request that got no reply; one line."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class ControlRequest:
    """One command for the control endpoint (see the module docstring)."""

    cmd: str
    values: dict[str, bool | int | float | str] = field(default_factory=dict)
    checkpoint: str | None = None
    config: str | None = None

    def encode(self) -> bytes:
        """The request as sent."""
        m: dict[str, Any] = {"v": list(CONTROL_VERSION), "cmd": self.cmd}
        if self.cmd == "set":
            m["values"] = dict(self.values)
        if self.cmd == "voice":
            m["checkpoint"] = self.checkpoint
            if self.config:
                m["config"] = self.config
        try:
            return msgpack.packb(m, use_bin_type=True)
        except (OverflowError, TypeError, ValueError) as exc:  # e.g. an integer beyond 64 bits
            raise ControlError(f"request: cannot be encoded ({exc})") from None


@dataclass(frozen=True)
class ControlReply:
    """The owner's answer: accepted or not (``error`` says why not, one line), and its state."""

    ok: bool
    error: str | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The reply as sent."""
        return msgpack.packb({"v": list(CONTROL_VERSION), "ok": self.ok, "error": self.error,
                              "state": self.state}, use_bin_type=True)


def _unpack(data: bytes, what: str) -> dict:
    if len(data) > MAX_CONTROL_BYTES:
        raise ControlError(f"{what}: {len(data)} bytes, more than {MAX_CONTROL_BYTES}")
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                            max_str_len=MAX_CONTROL_BYTES, max_bin_len=0, max_array_len=4096,
                            max_map_len=4096, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types for garbage
        raise ControlError(f"{what}: not msgpack ({type(exc).__name__})") from None
    if not isinstance(m, dict):
        raise ControlError(f"{what}: expected a map, got {type(m).__name__}")
    v = m.get("v")
    if not (isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v)):
        raise ControlError(f"{what}.v: expected [major, minor], got {v!r}"[:200])
    if v[0] != CONTROL_VERSION[0]:
        raise ControlError(f"{what}.v: version {v[0]}.{v[1]} is not {CONTROL_VERSION[0]}.x")
    return m


def _text(m: dict, key: str, what: str, required: bool = True) -> str | None:
    v = m.get(key)
    if v is None and not required:
        return None
    v = v.strip() if isinstance(v, str) else v
    if not isinstance(v, str) or not v or len(v) > MAX_TEXT:
        raise ControlError(f"{what}.{key}: expected a non-empty string of at most {MAX_TEXT} characters")
    return v


def plain_value(v: Any) -> bool:
    """Whether ``v`` is a value a setting can take: a bool, a finite number that every side
    carries exactly (an integer below 2**53), or a short string."""
    if isinstance(v, bool):
        return True
    if isinstance(v, int):
        return abs(v) < 2**53
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, str) and len(v) <= MAX_TEXT


def request_from_map(m: dict, where: str = "request", commands: tuple[str, ...] = COMMANDS) -> ControlRequest:
    """The request a decoded map asks for (the wire's, or a dashboard's JSON body), allowing
    ``commands``; :class:`ControlError` (one line naming the field) if it is not one."""
    cmd = m.get("cmd")
    if cmd not in commands:
        raise ControlError(f"{where}.cmd: {str(cmd)[:40]!r} is not a command (one of: {', '.join(commands)})")
    if cmd == "set":
        values = m.get("values")
        if not isinstance(values, dict) or not values:
            raise ControlError(f"{where}.values: expected a non-empty map of settings")
        if len(values) > MAX_VALUES:
            raise ControlError(f"{where}.values: {len(values)} settings, at most {MAX_VALUES}")
        for k, v in values.items():
            if not isinstance(k, str) or not k or len(k) > 64:
                raise ControlError(f"{where}.values: a key is not a name: {str(k)[:40]!r}")
            if not plain_value(v):
                raise ControlError(f"{where}.values.{k}: expected true/false, a finite number or a short string")
        return ControlRequest("set", dict(values))
    if cmd == "voice":
        return ControlRequest("voice", checkpoint=_text(m, "checkpoint", where),
                              config=_text(m, "config", where, required=False))
    return ControlRequest(cmd)


def decode_request(data: bytes) -> ControlRequest:
    """The request in ``data``; :class:`ControlError` (one line naming the field) if unusable."""
    return request_from_map(_unpack(data, "request"))


def decode_reply(data: bytes) -> ControlReply:
    """The reply in ``data``; :class:`ControlError` if unusable."""
    m = _unpack(data, "reply")
    ok, error, state = m.get("ok"), m.get("error"), m.get("state", {})
    if type(ok) is not bool:
        raise ControlError("reply.ok: expected true or false")
    if error is not None and not isinstance(error, str):
        raise ControlError("reply.error: expected a string")
    if not isinstance(state, dict):
        raise ControlError("reply.state: expected a map")
    return ControlReply(ok, _one_line(error) if error else None, state)


# --------------------------------------------------------------------------- the sockets
@dataclass(frozen=True)
class Incoming:
    """A request that arrived (``request``), or why it could not be read (``error``), and the
    peer's CURVE identity (z85 public key; ``None`` on a link without CURVE)."""

    request: ControlRequest | None
    error: str | None
    peer_key: str | None


class ControlServer:
    """The owner's REP socket. After :meth:`poll` returns a request, :meth:`reply` must follow."""

    def __init__(self, sock: zmq.Socket):
        self.socket = sock
        self.received = self.rejected = 0

    def poll(self) -> Incoming | None:
        """The next request, without waiting; ``None`` when none is waiting."""
        try:
            frame = self.socket.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        try:
            peer = frame.get("User-Id") or None
        except zmq.ZMQError:  # no ZAP handler on this link: no identity
            peer = None
        self.received += 1
        try:
            return Incoming(decode_request(frame.bytes), None, peer)
        except ControlError as exc:
            self.rejected += 1
            return Incoming(None, str(exc), peer)

    def reply(self, reply: ControlReply) -> None:
        """Answer the request :meth:`poll` returned (never blocks: REP's reply always has room)."""
        try:
            self.socket.send(reply.encode(), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the requester is gone; REP drops the reply and is ready for the next request


class ControlClient:
    """A REQ socket to the control endpoint; one :meth:`request` at a time, with a timeout."""

    def __init__(self, sock: zmq.Socket, address: str):
        self.socket = sock
        self.address = address
        # A request that timed out must not wedge the socket for the next one.
        sock.setsockopt(zmq.REQ_RELAXED, 1)
        sock.setsockopt(zmq.REQ_CORRELATE, 1)

    def request(self, req: ControlRequest, timeout_ms: int = 3000) -> ControlReply:
        """Send ``req`` and wait for the reply; :class:`ControlError` when none comes in time
        or it cannot be read."""
        # Connecting sockets are IMMEDIATE (common.bus): with no server there, nothing queues.
        if not self.socket.poll(timeout_ms, zmq.POLLOUT):
            raise ControlError(f"cannot reach {self.address} within {timeout_ms / 1000:g} s "
                               f"(is inference running, and is this client allowed to connect?)")
        self.socket.send(req.encode(), zmq.NOBLOCK)
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            raise ControlError(f"no reply from {self.address} within {timeout_ms / 1000:g} s "
                               f"(is inference running, and is this client allowed to connect?)")
        return decode_reply(self.socket.recv())
