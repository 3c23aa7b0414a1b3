"""The wire schema: every message between the pipeline's processes, and the only way to read one.

Every message is one msgpack map. :func:`encode` writes it; :func:`decode` (or
:func:`decode_audio` / :func:`decode_telemetry`) is the only way back in, and it raises exactly
one error type, :class:`ProtocolError`, whose ``str()`` is one line naming the field at fault.
Nothing named by the wire is ever imported or evaluated: the bytes go through a plain
``msgpack.unpackb`` (no object or ext hook), and the result is checked field by field against
the tables below, with exact types (a msgpack ``true`` is not an int, so it never passes as a
sequence number).

Two fields are common to every message:

=================  ==========  ==================================================================
field              type        meaning
=================  ==========  ==================================================================
``kind``           str         ``"audio"``, ``"telemetry"`` or ``"listen"``
``v``              [int, int]  protocol version ``[major, minor]``, see :data:`PROTOCOL_VERSION`
=================  ==========  ==================================================================

**Audio chunk** (``kind = "audio"``, :class:`AudioChunk`):

=================  ==========  ==================================================================
field              type        meaning
=================  ==========  ==================================================================
``stream_id``      str         1-64 chars; new every time a capture starts
``seq``            int         chunk number in the stream, from 0 (0 .. 2**63-1)
``t_capture_ns``   int         capture time of the chunk's first sample: ``CLOCK_MONOTONIC``
                               ns of the capture host (>= 0)
``t_wall_ns``      int         the same instant on the capture host's wall clock
                               (``time.time_ns()``, >= 0)
``sample_rate``    int         Hz, > 0 (16000 wherever the audio is model input)
``n_samples``      int         samples in ``payload``: 1 .. ``max_samples``, and exactly
                               ``len(payload) / bytes per sample``
``fmt``            str         sample format, one of :data:`FORMATS`: ``"f32le"`` (float32,
                               little-endian, all finite) or ``"s16le"`` (int16, little-endian,
                               read as ``value / 32768``)
``payload``        bin         the samples, mono
``stages``         [map]       what each stage after capture added, in order (at most 16)
``offset``         int         stream sample index of the chunk's first sample (>= 0): where
                               it sits on the source's timeline, whatever chunks were lost
``source_end``     int | nil   optional: total samples of a finite source (a file), once the
                               capture knows it; nil or absent for a live source
``session``        str | nil   optional (1.1): the client session the chunk belongs to, 1-64
                               chars (a capture + playback pair, see :mod:`services.sessions`);
                               nil or absent: the unnamed session ``""`` of a 1.0 sender
=================  ==========  ==================================================================

Each ``stages`` entry (:class:`StageRecord`; times on *that stage's* host's monotonic clock):

=================  ==========  ==================================================================
field              type        meaning
=================  ==========  ==================================================================
``name``           str         1-64 chars, the service (``"inference"``)
``host``           str         1-64 chars, its host name
``t_recv_ns``      int         when it received the chunk (>= 0)
``t_send_ns``      int         when it sent the chunk on (>= 0)
``proc_ns``        int         time spent processing it (>= 0)
``model``          str | nil   1-64 chars: the model that processed it, if any
``reset``          bool        whether the stage's state was reset for this chunk
=================  ==========  ==================================================================

**Telemetry** (``kind = "telemetry"``, :class:`Telemetry`; the records ``data`` holds are
:mod:`common.telemetry`'s):

=================  ==========  ==================================================================
field              type        meaning
=================  ==========  ==================================================================
``service``        str         1-64 chars, the sender (``"capture"``, ``"inference"``, ...)
``type``           str         one of :data:`TELEMETRY_TYPES`
``host``           str         1-64 chars, the sender's host name
``pid``            int         the sender's process id (> 0)
``t_mono_ns``      int         when it was made, sender's ``CLOCK_MONOTONIC`` ns (>= 0)
``t_wall_ns``      int         the same instant on the sender's wall clock (>= 0)
``data``           map         str keys; values None, bool, int, float (finite), str, array or
                               map (str keys), containers nested at most 4 deep below ``data``
=================  ==========  ==================================================================

**Listen** (``kind = "listen"``, :class:`Listen`, 1.1): a playback's request to inference, on
``audio_out``, for its session's converted audio. Playback repeats it while it runs (it is also
how inference learns that the playback is alive); inference routes each converted chunk only to
the live listeners of the chunk's session.

=================  ==========  ==================================================================
field              type        meaning
=================  ==========  ==================================================================
``session``        str         the session to receive: 0-64 chars (``""``: the unnamed one)
=================  ==========  ==================================================================

Telemetry travels as a two-frame ZeroMQ message ``[topic, encode(msg)]`` with
``topic = f"{type}.{service}"`` (:attr:`Telemetry.topic`), so that a SUB can filter by prefix
without decoding anything.

**Versions.** A message carries ``[major, minor]``. A different major is refused. Any minor of
the same major is read: a minor release may only *add* fields, and fields this version does not
know are ignored (they are still checked to be plain msgpack: no ext types, str map keys).
Every field listed above is required.

**Limits.** A message longer than :func:`max_message_bytes` is refused before it is unpacked,
and the unpacker's length limits are derived from that same bound, so a hostile length prefix
cannot make it allocate much more than the message itself.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from operator import itemgetter
from typing import Any

import msgpack
import numpy as np

from .audio import SAMPLE_RATE  # the model's rate: what decode_audio insists on by default

__all__ = [
    "PROTOCOL_VERSION",
    "DEFAULT_MAX_SAMPLES",
    "FORMATS",
    "TELEMETRY_TYPES",
    "MAX_STAGES",
    "MAX_NAME_LEN",
    "MAX_DATA_DEPTH",
    "ProtocolError",
    "StageRecord",
    "AudioChunk",
    "Telemetry",
    "Listen",
    "max_message_bytes",
    "make_telemetry",
    "encode",
    "decode",
    "decode_audio",
    "decode_telemetry",
    "decode_listen",
]

#: ``(major, minor)`` of what :func:`encode` writes; on the wire as ``[major, minor]``.
PROTOCOL_VERSION = (1, 1)
#: Largest chunk accepted by default: 1 s at 16 kHz, far above any real chunk (208 * chunk_factor).
DEFAULT_MAX_SAMPLES = 16000
#: Sample formats on the wire. Decoded audio is always float32.
FORMATS = ("f32le", "s16le")
#: Telemetry types; what each carries in ``data`` is :mod:`common.telemetry`'s (``"audio"`` is an
#: audio chunk's header without its payload, ``"sound"`` a level meter's frame).
TELEMETRY_TYPES = ("heartbeat", "chunk", "event", "audio", "sound")
#: Most stage records one chunk may carry.
MAX_STAGES = 16
#: Longest stream id, service, host, stage or model name, in characters.
MAX_NAME_LEN = 64
#: How deep containers may nest below a telemetry message's ``data`` map.
MAX_DATA_DEPTH = 4

#: Room for everything but the payload (header, stages, unknown fields of later minors).
_HEADER_SLACK = 64 * 1024
_INT64_MAX = 2**63 - 1
# msgpack's integer range: anything outside it cannot be packed.
_MSGPACK_INT_MIN = -(2**63)
_MSGPACK_INT_MAX = 2**64 - 1
_BYTES_PER_SAMPLE = {"f32le": 4, "s16le": 2}
_S16_SCALE = 32768.0
_F32LE = np.dtype("<f4")
_S16LE = np.dtype("<i2")
_NATIVE_F32 = np.dtype(np.float32)
_MISSING = object()

# Each message's fields in wire order; itemgetter fetches them all in one C call, and its
# KeyError names the first one missing.
_AUDIO_FIELDS = ("stream_id", "seq", "t_capture_ns", "t_wall_ns", "sample_rate", "n_samples",
                 "fmt", "payload", "stages", "offset")
_AUDIO_OPTIONAL = ("source_end", "session")
_STAGE_FIELDS = ("name", "host", "t_recv_ns", "t_send_ns", "proc_ns", "model", "reset")
_TELEMETRY_FIELDS = ("service", "type", "host", "pid", "t_mono_ns", "t_wall_ns", "data")
_AUDIO_GET = itemgetter(*_AUDIO_FIELDS)
_STAGE_GET = itemgetter(*_STAGE_FIELDS)
_TELEMETRY_GET = itemgetter(*_TELEMETRY_FIELDS)
_AUDIO_KEYS = frozenset(("kind", "v") + _AUDIO_FIELDS + _AUDIO_OPTIONAL)
_STAGE_KEYS = frozenset(_STAGE_FIELDS)
_TELEMETRY_KEYS = frozenset(("kind", "v") + _TELEMETRY_FIELDS)
_LISTEN_KEYS = frozenset(("kind", "v", "session"))
_WIRE_VERSION = list(PROTOCOL_VERSION)


class ProtocolError(ValueError):
    """A message is malformed or not allowed here; ``str()`` is one line naming the field."""


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class StageRecord:
    """What one pipeline stage adds to a chunk it passed on (times on its own monotonic clock)."""

    name: str
    host: str
    t_recv_ns: int
    t_send_ns: int
    proc_ns: int = 0
    model: str | None = None
    reset: bool = False


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """One chunk of mono audio with its capture header and the records of the stages it passed.

    ``samples`` is a 1-D float32 array. A decoded ``f32le`` chunk's array is a read-only view
    of the received bytes (no copy); copy it before writing into it. :func:`encode` accepts any
    1-D real array and writes it as float32.

    Two chunks are equal when their headers, stages and sample values are equal.
    """

    stream_id: str
    seq: int
    t_capture_ns: int
    t_wall_ns: int
    samples: np.ndarray = field(repr=False)
    sample_rate: int = SAMPLE_RATE
    fmt: str = "f32le"
    stages: tuple[StageRecord, ...] = ()
    offset: int = 0
    source_end: int | None = None
    session: str | None = None

    @property
    def n_samples(self) -> int:
        """Number of samples in the chunk."""
        return int(self.samples.shape[0])

    @property
    def end(self) -> int:
        """Stream sample index just past the chunk's last sample."""
        return self.offset + self.n_samples

    def with_stage(self, stage: StageRecord) -> AudioChunk:
        """The same header and payload (not copied), with ``stage`` appended to the stages."""
        return replace(self, stages=self.stages + (stage,))

    def with_samples(self, samples: np.ndarray) -> AudioChunk:
        """The same header and stages with a new payload (converted audio, say)."""
        return replace(self, samples=samples)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AudioChunk):
            return NotImplemented
        return (
            self.stream_id == other.stream_id
            and self.seq == other.seq
            and self.t_capture_ns == other.t_capture_ns
            and self.t_wall_ns == other.t_wall_ns
            and self.sample_rate == other.sample_rate
            and self.fmt == other.fmt
            and self.stages == other.stages
            and self.offset == other.offset
            and self.source_end == other.source_end
            and self.session == other.session
            and np.array_equal(self.samples, other.samples)
        )

    __hash__ = None  # type: ignore[assignment]  # holds an array


@dataclass(frozen=True)
class Telemetry:
    """A telemetry message's envelope: heartbeat, per-chunk timing, an event, or an audio header.

    ``data`` arrives with arrays as lists; tuples given to :func:`encode` come back as lists.
    """

    service: str
    type: str
    data: dict
    host: str
    pid: int
    t_mono_ns: int
    t_wall_ns: int

    @property
    def topic(self) -> str:
        """``f"{type}.{service}"``, the first frame on the wire, for SUB prefix filtering.

        ``"event."`` gets every service's events; ``"chunk.inference"`` one service's chunk
        timings (a prefix: it would also match a service named ``"inference2"``).
        """
        return f"{self.type}.{self.service}"



@dataclass(frozen=True)
class Listen:
    """A playback's request for its session's converted audio (see the module docstring)."""

    session: str = ""


def _require_finite(x: np.ndarray, field: str) -> None:
    """Refuse NaN/Inf samples: one of them poisons the model's state for good."""
    if not np.isfinite(x).all():
        bad = ~np.isfinite(x)
        raise ProtocolError(f"{field}: {int(np.count_nonzero(bad))} non-finite samples "
                            f"(first at index {int(np.argmax(bad))})")


def make_telemetry(service: str, type: str, data: dict | None = None) -> Telemetry:
    """A :class:`Telemetry` from this process, now: host name, pid and both clocks filled in.

    ``data`` is copied (shallowly), so later changes to the caller's dict do not leak into the
    message. Nothing is validated here; :func:`encode` does that.
    """
    return Telemetry(service, type, {} if data is None else dict(data), socket.gethostname(),
                     os.getpid(), time.monotonic_ns(), time.time_ns())


def max_message_bytes(max_samples: int = DEFAULT_MAX_SAMPLES) -> int:
    """Largest encoded message accepted: ``max_samples`` at 4 bytes each plus 64 KiB of header.

    Also the value for ``ZMQ_MAXMSGSIZE``, so that libzmq drops an oversized message before
    Python sees it.
    """
    return _limits(max_samples)[0]


@lru_cache(maxsize=16)
def _limits(max_samples: int) -> tuple[int, dict[str, int]]:
    """``(max message bytes, unpackb length limits)`` for ``max_samples`` (cached)."""
    if type(max_samples) is not int or max_samples < 1:
        raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
    max_bytes = 4 * max_samples + _HEADER_SLACK
    # Nothing in a message can be longer than the message: a str or bin needs a byte per byte,
    # an array element at least one byte, a map entry at least two. The unpacker allocates a
    # container from its length prefix before reading its items, so these caps are what keep a
    # forged prefix from asking for gigabytes.
    unpack_limits = {
        "max_str_len": max_bytes,
        "max_bin_len": max_bytes,
        "max_ext_len": max_bytes,
        "max_array_len": max_bytes,
        "max_map_len": max_bytes // 2,
    }
    return max_bytes, unpack_limits


# --------------------------------------------------------------------------- checks


def _show(value: object) -> str:
    """A short, one-line description of a value from the wire, for error messages."""
    kind = type(value).__name__
    if isinstance(value, (list, tuple, dict)) and not isinstance(value, msgpack.ExtType):
        return f"{kind} of {len(value)} items"
    if isinstance(value, (str, bytes)) and len(value) > 40:
        return f"{value[:32]!r}... ({kind} of length {len(value)})"
    text = " ".join(repr(value)[:200].split())  # one line, even for a numpy array's repr
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind})"


def _key(key: str) -> str:
    """A map key (a str) as a field path's next step: ``.name``, or ``['odd key']``."""
    if key.isidentifier() and len(key) <= 40:
        return f".{key}"
    return f"[{key[:32]!r}{'...' if len(key) > 32 else ''}]"


def _missing(path: str) -> ProtocolError:
    return ProtocolError(f"{path}: missing")


def _required(m: dict, get: itemgetter, path: str) -> tuple:
    """The values of a message's required fields, in order; the first one missing is named."""
    try:
        return get(m)
    except KeyError as exc:
        raise _missing(f"{path}.{exc.args[0]}") from None


def _uint(value: object, path: str) -> int:
    """``value`` if it is an int in [0, 2**63-1] (bool excluded)."""
    if type(value) is not int or value < 0 or value > _INT64_MAX:
        raise ProtocolError(f"{path}: expected an int in [0, 2**63-1], got {_show(value)}")
    return value


def _name(value: object, path: str) -> str:
    """``value`` if it is a non-empty str of at most :data:`MAX_NAME_LEN` characters."""
    if type(value) is not str or not 0 < len(value) <= MAX_NAME_LEN:
        raise ProtocolError(f"{path}: expected a str of 1-{MAX_NAME_LEN} chars, got {_show(value)}")
    return value


def _check_plain(value: object, path: str) -> None:
    """Check a field this version does not know: plain msgpack only (no ext, str map keys).

    Iterative, because the unpacker allows far deeper nesting than Python's recursion limit.
    """
    todo = [(value, path)]
    while todo:
        v, p = todo.pop()
        t = type(v)
        if v is None or t is bool or t is int or t is float or t is str or t is bytes:
            continue
        if t is list:
            todo.extend((item, f"{p}[{i}]") for i, item in enumerate(v))
        elif t is dict:
            for k, item in v.items():
                if type(k) is not str:
                    raise ProtocolError(f"{p}: map keys must be str, got {_show(k)}")
                todo.append((item, f"{p}{_key(k)}"))
        else:  # ExtType, Timestamp
            raise ProtocolError(f"{p}: msgpack ext types are not allowed, got {_show(v)}")


def _check_extra(m: dict, known: frozenset, path: str) -> None:
    """Check the fields of ``m`` that are not in ``known`` (from a later minor version)."""
    for k in m.keys() - known:
        if type(k) is not str:
            raise ProtocolError(f"{path}: map keys must be str, got {_show(k)}")
        _check_plain(m[k], f"{path}{_key(k)}")


def _check_json(value: object, path: str, depth: int) -> None:
    """Check a telemetry ``data`` value: JSON-like, finite, msgpack-packable, not too deep.

    ``depth`` counts the containers above ``value`` below ``data``; isinstance (not exact
    types) for numbers, str and dict, so that a caller's ``np.float64`` or ``OrderedDict`` can
    be encoded. The wire only ever yields exact types, and an ExtType (a tuple subclass) is
    rejected by the exact list/tuple test.
    """
    if value is None or type(value) is bool or isinstance(value, str):
        return
    if isinstance(value, int):
        if not _MSGPACK_INT_MIN <= value <= _MSGPACK_INT_MAX:
            raise ProtocolError(f"{path}: int out of msgpack's range, got {_show(value)}")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(f"{path}: non-finite float {value!r}")
        return
    container = type(value) is list or type(value) is tuple or isinstance(value, dict)
    if not container:
        raise ProtocolError(f"{path}: unsupported type, got {_show(value)}")
    if depth >= MAX_DATA_DEPTH:
        raise ProtocolError(f"{path}: nested deeper than {MAX_DATA_DEPTH} levels below data")
    if isinstance(value, dict):
        _check_json_map(value, path, depth + 1)
    else:
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]", depth + 1)


def _check_json_map(m: dict, path: str, depth: int) -> None:
    for k, item in m.items():
        if type(k) is not str:
            raise ProtocolError(f"{path}: map keys must be str, got {_show(k)}")
        _check_json(item, f"{path}{_key(k)}", depth)


def _check_version(m: dict) -> None:
    v = m.get("v", _MISSING)
    if v is _MISSING:
        raise _missing("v")
    if type(v) is not list or len(v) != 2 or type(v[0]) is not int or type(v[1]) is not int \
            or v[0] < 0 or v[1] < 0:
        raise ProtocolError(f"v: expected [major, minor] as two ints >= 0, got {_show(v)}")
    if v[0] != PROTOCOL_VERSION[0]:
        raise ProtocolError(
            f"v: protocol major version {v[0]} is not supported (this is "
            f"{PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]})"
        )


def _check_samples(samples: object) -> np.ndarray:
    """The samples to encode as a 1-D, finite, native float32 array (converted if needed)."""
    x = samples if isinstance(samples, np.ndarray) else np.asarray(samples)
    if x.ndim != 1:
        raise ProtocolError(f"audio.samples: expected a 1-D array, got shape {x.shape}")
    if x.shape[0] < 1:
        raise ProtocolError("audio.samples: empty chunk")
    if x.dtype != _NATIVE_F32:
        if x.dtype.kind not in "fiu":
            raise ProtocolError(f"audio.samples: expected real numbers, got dtype {x.dtype}")
        with np.errstate(over="ignore"):  # too large for float32 becomes inf, refused below
            x = x.astype(np.float32)
    _require_finite(x, "audio.samples")
    return x


# --------------------------------------------------------------------------- encode


def _stage_map(s: StageRecord, path: str) -> dict:
    if not isinstance(s, StageRecord):
        raise ProtocolError(f"{path}: expected a StageRecord, got {_show(s)}")
    if s.model is not None:
        _name(s.model, f"{path}.model")
    if type(s.reset) is not bool:
        raise ProtocolError(f"{path}.reset: expected a bool, got {_show(s.reset)}")
    return {
        "name": _name(s.name, f"{path}.name"),
        "host": _name(s.host, f"{path}.host"),
        "t_recv_ns": _uint(s.t_recv_ns, f"{path}.t_recv_ns"),
        "t_send_ns": _uint(s.t_send_ns, f"{path}.t_send_ns"),
        "proc_ns": _uint(s.proc_ns, f"{path}.proc_ns"),
        "model": s.model,
        "reset": s.reset,
    }


def _encode_audio(c: AudioChunk) -> bytes:
    x = _check_samples(c.samples)
    fmt = c.fmt
    if fmt == "f32le":
        if sys.byteorder != "little":
            x = x.astype(_F32LE)
        # A memoryview is packed as bin straight from the array's memory: one copy, into
        # the message.
        payload: Any = memoryview(np.ascontiguousarray(x))
    elif fmt == "s16le":
        q = np.rint(x * _S16_SCALE)
        np.clip(q, -32768.0, 32767.0, out=q)
        payload = q.astype(_S16LE).tobytes()
    else:
        raise ProtocolError(f"audio.fmt: expected one of {', '.join(FORMATS)}, got {_show(fmt)}")
    rate = c.sample_rate
    if type(rate) is not int or not 0 < rate <= _INT64_MAX:
        raise ProtocolError(f"audio.sample_rate: expected an int > 0, got {_show(rate)}")
    stages = c.stages
    if type(stages) is not tuple and type(stages) is not list:
        raise ProtocolError(f"audio.stages: expected a tuple of StageRecord, got {_show(stages)}")
    if len(stages) > MAX_STAGES:
        raise ProtocolError(f"audio.stages: {len(stages)} stages, at most {MAX_STAGES} allowed")
    m = {
        "kind": "audio",
        "v": _WIRE_VERSION,
        "stream_id": _name(c.stream_id, "audio.stream_id"),
        "seq": _uint(c.seq, "audio.seq"),
        "t_capture_ns": _uint(c.t_capture_ns, "audio.t_capture_ns"),
        "t_wall_ns": _uint(c.t_wall_ns, "audio.t_wall_ns"),
        "sample_rate": rate,
        "n_samples": int(x.shape[0]),
        "fmt": fmt,
        "payload": payload,
        "stages": [_stage_map(s, f"audio.stages[{i}]") for i, s in enumerate(stages)],
        "offset": _uint(c.offset, "audio.offset"),
    }
    if c.source_end is not None:
        m["source_end"] = _uint(c.source_end, "audio.source_end")
    if c.session is not None:
        m["session"] = _session(c.session, "audio.session")
    return msgpack.packb(m, use_bin_type=True)


def _encode_telemetry(t: Telemetry) -> bytes:
    if type(t.type) is not str or t.type not in TELEMETRY_TYPES:
        raise ProtocolError(
            f"telemetry.type: expected one of {', '.join(TELEMETRY_TYPES)}, got {_show(t.type)}"
        )
    pid = t.pid
    if type(pid) is not int or not 0 < pid <= _INT64_MAX:
        raise ProtocolError(f"telemetry.pid: expected an int > 0, got {_show(pid)}")
    if not isinstance(t.data, dict):
        raise ProtocolError(f"telemetry.data: expected a dict, got {_show(t.data)}")
    _check_json_map(t.data, "telemetry.data", 0)
    m = {
        "kind": "telemetry",
        "v": _WIRE_VERSION,
        "service": _name(t.service, "telemetry.service"),
        "type": t.type,
        "host": _name(t.host, "telemetry.host"),
        "pid": pid,
        "t_mono_ns": _uint(t.t_mono_ns, "telemetry.t_mono_ns"),
        "t_wall_ns": _uint(t.t_wall_ns, "telemetry.t_wall_ns"),
        "data": t.data,
    }
    return msgpack.packb(m, use_bin_type=True)


def _session(value: object, path: str) -> str:
    """``value`` if it is a str of at most :data:`MAX_NAME_LEN` characters (``""``: unnamed)."""
    if type(value) is not str or len(value) > MAX_NAME_LEN:
        raise ProtocolError(f"{path}: expected a str of 0-{MAX_NAME_LEN} chars, got {_show(value)}")
    return value


def encode(msg: AudioChunk | Telemetry | Listen) -> bytes:
    """Encode a message for the wire, checking it as strictly as :func:`decode` would.

    Audio is written in the chunk's ``fmt``: ``f32le`` as it is, ``s16le`` clipped to
    [-1, 1) and rounded to the nearest step of 1/32768.

    Raises:
        ProtocolError: a field would not pass :func:`decode` (wrong type, out of range, samples
            not 1-D or not finite, unknown format or telemetry type, ...). Nothing malformed is
            ever put on the wire.
    """
    if isinstance(msg, AudioChunk):
        return _encode_audio(msg)
    if isinstance(msg, Telemetry):
        return _encode_telemetry(msg)
    if isinstance(msg, Listen):
        return msgpack.packb({"kind": "listen", "v": _WIRE_VERSION, "session": _session(msg.session, "listen.session")},
                             use_bin_type=True)
    raise ProtocolError(f"message: expected an AudioChunk, Telemetry or Listen, got {_show(msg)}")


# --------------------------------------------------------------------------- decode


def _decode_stage(s: object, path: str) -> StageRecord:
    if type(s) is not dict:
        raise ProtocolError(f"{path}: expected a map, got {_show(s)}")
    if len(s) > len(_STAGE_KEYS):  # fewer or as many keys with an unknown one: one is missing
        _check_extra(s, _STAGE_KEYS, path)
    name, host, t_recv, t_send, proc, model, reset = _required(s, _STAGE_GET, path)
    _name(name, f"{path}.name")
    _name(host, f"{path}.host")
    _uint(t_recv, f"{path}.t_recv_ns")
    _uint(t_send, f"{path}.t_send_ns")
    _uint(proc, f"{path}.proc_ns")
    if model is not None:
        _name(model, f"{path}.model")
    if type(reset) is not bool:
        raise ProtocolError(f"{path}.reset: expected a bool, got {_show(reset)}")
    return StageRecord(name, host, t_recv, t_send, proc, model, reset)


def _decode_audio_map(m: dict, max_samples: int, expect_rate: int | None) -> AudioChunk:
    if len(m) > len(_AUDIO_FIELDS) + 2:  # more than kind, v and the required: check the rest
        _check_extra(m, _AUDIO_KEYS, "audio")
    stream_id, seq, t_cap, t_wall, rate, n, fmt, payload, stages, offset = _required(m, _AUDIO_GET, "audio")
    _name(stream_id, "audio.stream_id")
    _uint(offset, "audio.offset")
    source_end = m.get("source_end")
    if source_end is not None:
        _uint(source_end, "audio.source_end")
    session = m.get("session")
    if session is not None:
        _session(session, "audio.session")
    _uint(seq, "audio.seq")
    _uint(t_cap, "audio.t_capture_ns")
    _uint(t_wall, "audio.t_wall_ns")
    if type(rate) is not int or not 0 < rate <= _INT64_MAX:
        raise ProtocolError(f"audio.sample_rate: expected an int > 0, got {_show(rate)}")
    if expect_rate is not None and rate != expect_rate:
        raise ProtocolError(f"audio.sample_rate: {rate} Hz, expected {expect_rate} Hz")
    if type(n) is not int or not 1 <= n <= max_samples:
        raise ProtocolError(
            f"audio.n_samples: expected an int in [1, {max_samples}], got {_show(n)}"
        )
    width = _BYTES_PER_SAMPLE.get(fmt) if type(fmt) is str else None
    if width is None:
        raise ProtocolError(f"audio.fmt: expected one of {', '.join(FORMATS)}, got {_show(fmt)}")
    if type(payload) is not bytes:
        raise ProtocolError(f"audio.payload: expected bin, got {_show(payload)}")
    if len(payload) != n * width:
        raise ProtocolError(
            f"audio.payload: {len(payload)} bytes, but n_samples {n} of {fmt} need {n * width}"
        )
    if type(stages) is not list:
        raise ProtocolError(f"audio.stages: expected an array, got {_show(stages)}")
    if len(stages) > MAX_STAGES:
        raise ProtocolError(f"audio.stages: {len(stages)} stages, at most {MAX_STAGES} allowed")
    records = tuple(_decode_stage(s, f"audio.stages[{i}]") for i, s in enumerate(stages))

    if width == 4:
        # A read-only view of the received bytes: no copy (except on a big-endian host).
        x = np.frombuffer(payload, dtype=_F32LE)
        if x.dtype != _NATIVE_F32:
            x = x.astype(np.float32)
        _require_finite(x, "audio.payload")
    else:
        x = np.frombuffer(payload, dtype=_S16LE).astype(np.float32)
        x *= 1.0 / _S16_SCALE  # a power of two: exact, and encode's rint() gives the ints back
    return AudioChunk(stream_id, seq, t_cap, t_wall, x, rate, fmt, records, offset, source_end, session)


def _decode_telemetry_map(m: dict) -> Telemetry:
    if len(m) > len(_TELEMETRY_KEYS):  # fewer or as many keys with an unknown one: one is missing
        _check_extra(m, _TELEMETRY_KEYS, "telemetry")
    service, typ, host, pid, t_mono, t_wall, data = _required(m, _TELEMETRY_GET, "telemetry")
    _name(service, "telemetry.service")
    if type(typ) is not str or typ not in TELEMETRY_TYPES:
        raise ProtocolError(
            f"telemetry.type: expected one of {', '.join(TELEMETRY_TYPES)}, got {_show(typ)}"
        )
    _name(host, "telemetry.host")
    if type(pid) is not int or not 0 < pid <= _INT64_MAX:
        raise ProtocolError(f"telemetry.pid: expected an int > 0, got {_show(pid)}")
    _uint(t_mono, "telemetry.t_mono_ns")
    _uint(t_wall, "telemetry.t_wall_ns")
    if type(data) is not dict:
        raise ProtocolError(f"telemetry.data: expected a map, got {_show(data)}")
    _check_json_map(data, "telemetry.data", 0)
    return Telemetry(service, typ, data, host, pid, t_mono, t_wall)


def _decode_listen_map(m: dict) -> Listen:
    if len(m) > len(_LISTEN_KEYS):
        _check_extra(m, _LISTEN_KEYS, "listen")
    session = m.get("session", _MISSING)
    if session is _MISSING:
        raise _missing("listen.session")
    return Listen(_session(session, "listen.session"))


def _decode(data: object, max_samples: int, expect_rate: int | None,
            want: str | None) -> AudioChunk | Telemetry | Listen:
    max_bytes, unpack_limits = _limits(max_samples)
    if expect_rate is not None and (type(expect_rate) is not int or expect_rate < 1):
        raise ValueError(f"expect_rate must be None or an int >= 1, got {expect_rate!r}")
    if isinstance(data, (bytes, bytearray)):
        size = len(data)
    elif isinstance(data, memoryview):
        size = data.nbytes
    else:
        raise ProtocolError(f"message: expected bytes, got {type(data).__name__}")
    # Before unpacking: the size is all an oversized message costs.
    if size > max_bytes:
        raise ProtocolError(f"message: {size} bytes, more than the limit of {max_bytes}")
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, **unpack_limits)
    except (ValueError, TypeError, OverflowError, BufferError, msgpack.UnpackException) as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ProtocolError(f"message: not valid msgpack ({reason})") from None
    if type(m) is not dict:
        raise ProtocolError(f"message: expected a msgpack map, got {_show(m)}")
    _check_version(m)
    kind = m.get("kind", _MISSING)
    if type(kind) is str and kind == "audio":
        if want is not None and want != kind:
            raise ProtocolError(f"kind: expected {want}, got audio")
        return _decode_audio_map(m, max_samples, expect_rate)
    if type(kind) is str and kind == "telemetry":
        if want is not None and want != kind:
            raise ProtocolError(f"kind: expected {want}, got telemetry")
        return _decode_telemetry_map(m)
    if type(kind) is str and kind == "listen":
        if want is not None and want != kind:
            raise ProtocolError(f"kind: expected {want}, got listen")
        return _decode_listen_map(m)
    if kind is _MISSING:
        raise _missing("kind")
    raise ProtocolError(f"kind: expected audio, telemetry or listen, got {_show(kind)}")


def decode(data: bytes | bytearray | memoryview, *, max_samples: int = DEFAULT_MAX_SAMPLES,
           expect_rate: int | None = None) -> AudioChunk | Telemetry | Listen:
    """Decode one message from the wire: the only way in.

    Args:
        data: the message bytes.
        max_samples: the largest chunk accepted; also bounds the message size
            (:func:`max_message_bytes`).
        expect_rate: if given, an audio chunk must have this sample rate.

    Returns:
        An :class:`AudioChunk` (samples as 1-D float32; read-only for ``f32le``) or a
        :class:`Telemetry`.

    Raises:
        ProtocolError: for anything malformed or not allowed, and nothing else: too long, not
            msgpack, not a map, unknown major version or kind, a required field missing or of
            the wrong type or range, a sample count that is above ``max_samples`` or does not
            match the payload, another sample rate than ``expect_rate``, non-finite samples,
            an ext type or a non-str map key anywhere.
        ValueError: ``max_samples`` or ``expect_rate`` themselves are invalid (a caller's bug).
    """
    return _decode(data, max_samples, expect_rate, None)


def decode_audio(data: bytes | bytearray | memoryview, *, max_samples: int = DEFAULT_MAX_SAMPLES,
                 expect_rate: int | None = SAMPLE_RATE) -> AudioChunk:
    """Decode an audio chunk, by default one that is model input (16 kHz).

    Like :func:`decode`, and a :class:`ProtocolError` if the message is telemetry. Pass
    ``expect_rate=None`` to accept any sample rate.
    """
    return _decode(data, max_samples, expect_rate, "audio")  # type: ignore[return-value]


def decode_telemetry(data: bytes | bytearray | memoryview, *,
                     max_samples: int = DEFAULT_MAX_SAMPLES) -> Telemetry:
    """Decode a telemetry message; like :func:`decode`, and a :class:`ProtocolError` for audio."""
    return _decode(data, max_samples, None, "telemetry")  # type: ignore[return-value]


def decode_listen(data: bytes | bytearray | memoryview) -> Listen:
    """Decode a playback's :class:`Listen` request; like :func:`decode`, and a
    :class:`ProtocolError` for any other kind."""
    return _decode(data, DEFAULT_MAX_SAMPLES, None, "listen")  # type: ignore[return-value]
