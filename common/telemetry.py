"""The telemetry records: what every service publishes on its PUB socket, typed and versioned.

This is the contract every dashboard taps. :mod:`common.protocol` owns the envelope (a
:class:`~common.protocol.Telemetry` message: service, host, pid, both clocks, a ``type`` and a
``data`` map, published under the topic ``<type>.<service>``); this module owns what ``data``
holds, one frozen dataclass per record, and is the one way to build it (:meth:`Record.to_data`)
and to read it (:func:`decode`, which raises only :class:`TelemetryError`).

=================  ====================  ======================================================
topic              record                published
=================  ====================  ======================================================
``heartbeat.<s>``  :class:`Heartbeat`    by every service every ``bus.heartbeat_interval_s``:
                                         readiness, uptime, cumulative counters, and the
                                         service's status (:class:`CaptureStatus`,
                                         :class:`InferenceStatus`, :class:`PlaybackStatus`,
                                         :class:`MonitorStatus`)
``chunk.inference``:class:`InferenceChunk` per converted chunk: step time, RTF, queue
``chunk.playback`` :class:`PlaybackChunk`  per chunk whose first sample reached the output:
                                         end-to-end latency, buffer fill
``event.<s>``      an :class:`Event`      something happened; :class:`EventName` lists them all
``audio.playback`` :class:`AudioHeader`  per chunk playback received: the chunk's header and
                                         every stage record, without the samples
``sound.<s>``      :class:`SoundFrame`   capture (what it sends) and playback (what it plays),
                                         every ``bus.sound_frame_s``: levels and a spectrum
=================  ====================  ======================================================

**Versions.** Every ``data`` map carries ``"schema": [major, minor]`` (:data:`SCHEMA_VERSION`).
A different major is refused. A later minor may only add: fields this version does not know are
ignored, and an event name it does not know decodes as :class:`OtherEvent`. 1.1 added
:class:`SoundFrame`, :class:`PlaybackChunk`'s ``wait_ms`` and ``device_ms`` and
:class:`InferenceStatus`' ``chunk_factor``; 1.2 added :class:`ControlChanged`,
:class:`VoiceSwitch` and :class:`InferenceStatus`' ``controls`` and ``voice``; 1.3 added
sessions (:mod:`services.sessions`): the ``session`` label on :class:`InferenceChunk`,
:class:`Reset` and :class:`PlaybackChunk`, :class:`SessionChange`, and :class:`InferenceStatus`'
``sessions``, ``max_streams`` and ``batch_sizes``; 1.4 added the audio services' status field
``scheduling`` (:mod:`common.realtime`); 1.5 added :class:`CaptureStatus`' ``device_block``;
a subscriber
by topic prefix (``heartbeat.``, ``chunk.``, ``event.``) never sees a type it does not know.

**Counters** (in heartbeats) are cumulative since the publishing process started; the monitor
sums them over a service's processes. The names consumers interpret are :class:`Counter`, and
every counter named ``dropped_<cause>`` counts drops by cause.
"""
from __future__ import annotations

import dataclasses
import enum
import time
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Union

from .protocol import MAX_NAME_LEN, ProtocolError, StageRecord, Telemetry, make_telemetry

__all__ = [
    "SCHEMA_VERSION", "TelemetryError", "Counter", "DROPPED_PREFIX", "EventName", "ResetReason",
    "Origin", "Record", "Heartbeat", "CaptureStatus", "InferenceStatus", "PlaybackStatus", "MonitorStatus",
    "InferenceChunk", "PlaybackChunk", "AudioHeader", "SoundFrame", "Event", "StreamStart", "Reset", "Eof", "Drained",
    "Underrun", "Reject", "ControlChanged", "VoiceSwitch", "SessionChange", "Status", "ServiceStale", "ServiceBack",
    "ServiceRestarted", "Overloaded",
    "OverloadCleared", "InputOverflow", "OutputUnderflow", "SinkError", "OtherEvent", "decode", "make_message",
]

#: ``(major, minor)`` of the records this module writes (``data["schema"]``).
SCHEMA_VERSION = (1, 5)


class TelemetryError(ProtocolError):
    """A telemetry record that does not fit its schema; ``str()`` is one line naming the field."""


class Counter(enum.StrEnum):
    """Counter names that consumers interpret (heartbeat ``counters``)."""

    UNDERRUNS = "underruns"                  # playback: runs of invented samples inside a stream
    UNDERRUN_SAMPLES = "underrun_samples"    # playback: samples those runs invented (concealed audio)
    RESETS = "resets"                        # inference: stream state resets
    REJECTED = "rejected"                    # any receiver: malformed input rejected
    INPUT_OVERFLOWS = "input_overflows"      # capture: PortAudio input overflows
    DEVICE_UNDERFLOWS = "device_underflows"  # playback: PortAudio output underflows
    DROPPED_INFERENCE_BACKLOG = "dropped_inference_backlog"  # inference fell behind live audio


#: Counters named ``dropped_<cause>`` count dropped audio by cause.
DROPPED_PREFIX = "dropped_"


class EventName(enum.StrEnum):
    """Every event a service publishes (``event.<service>``, field ``event``)."""

    STREAM_START = "stream_start"            # capture: a source began a stream; playback: its first chunk
    RESET = "reset"                          # inference reset a stream's state (:class:`ResetReason`)
    EOF = "eof"                              # capture: a file source sent its last chunk
    DRAINED = "drained"                      # playback played a finite stream to its end
    UNDERRUN = "underrun"                    # playback had nothing to play (at most 2 per second)
    REJECT = "reject"                        # a receiver rejected malformed input (at most 2 per second)
    STATUS = "status"                        # monitor: its status line
    SERVICE_STALE = "service_stale"          # monitor: a service's heartbeats stopped
    SERVICE_BACK = "service_back"            # monitor: ... and came back
    SERVICE_RESTARTED = "service_restarted"  # monitor: a new process before the old one was missed
    OVERLOADED = "overloaded"                # monitor: inference cannot keep up with real time
    OVERLOAD_CLEARED = "overload_cleared"    # monitor: ... and keeps up again
    INPUT_OVERFLOW = "input_overflow"        # monitor: capture's sound device overflowed
    OUTPUT_UNDERFLOW = "output_underflow"    # monitor: playback's sound device underflowed
    SINK_ERROR = "sink_error"                # playback: writing a file failed
    CONTROL = "control"                      # inference: live settings changed (llvc ctl, a dashboard)
    VOICE = "voice"                          # inference: a voice switch began, completed or failed
    SESSION = "session"                      # inference: a session opened, was refused or was evicted


class ResetReason(enum.StrEnum):
    """Why inference reset a stream's state (:class:`Reset`)."""

    NEW_STREAM = "new_stream"
    GAP = "gap"
    BACKLOG = "backlog"
    NON_FINITE = "non_finite"
    VOICE = "voice"                          # (1.2) a voice switch: the new voice starts afresh


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Origin:
    """Who published a record, and when (from the envelope)."""

    service: str
    host: str
    pid: int
    t_mono_ns: int
    t_wall_ns: int


@dataclass(frozen=True)
class Record:
    """A telemetry record. ``origin`` is set on the records :func:`decode` returns."""

    TYPE: ClassVar[str] = ""
    origin: Origin | None = field(default=None, kw_only=True, compare=False, repr=False)

    def to_data(self) -> dict[str, Any]:
        """The record as the envelope's ``data`` map."""
        return {"schema": list(SCHEMA_VERSION), **_encode_fields(self)}

    # The envelope, for records read off the bus.
    @property
    def service(self) -> str:
        """The publishing service."""
        return self.origin.service if self.origin else ""

    @property
    def host(self) -> str:
        """The publishing host."""
        return self.origin.host if self.origin else ""

    @property
    def pid(self) -> int:
        """The publishing process."""
        return self.origin.pid if self.origin else 0

    @property
    def topic(self) -> str:
        """``<type>.<service>``."""
        return f"{self.TYPE}.{self.service}"


# ---- heartbeats and each service's status
@dataclass(frozen=True)
class CaptureStatus:
    """Capture's heartbeat status."""

    source: str | None
    state: str                      # starting | waiting | streaming | ended | device_lost
    stream_id: str | None
    chunk_len: int | None
    head_len: int | None
    offset: int
    device: str | None = None
    device_rate: int | None = None
    scheduling: str | None = None   # (1.4) how the process is scheduled (common/realtime.py)
    device_block: int | None = None  # (1.5) the largest PortAudio callback so far, in device frames


@dataclass(frozen=True)
class InferenceStatus:
    """Inference's heartbeat status: the model it runs and its geometry."""

    backend: str
    model: str
    untrained: bool
    kind: str                       # llvc | passthrough
    device: str
    threads: int
    stream_id: str | None
    chunk_len: int | None = None
    chunk_ms: float | None = None
    algorithmic_latency_ms: float | None = None  # upstream's (2L + chunk) / sr
    latency_ms: float | None = None              # chunk + L: how long a sample waits before compute
    chunk_factor: int | None = None              # (1.1)
    controls: dict[str, Any] | None = None       # (1.2) the live settings (services/controls.py)
    voice: str | None = None                     # (1.2) the checkpoint in use ("" = the demo voice)
    sessions: list[dict[str, Any]] | None = None  # (1.3) each session: name, stream_id, slot, counters
    max_streams: int | None = None               # (1.3) sessions admitted at most
    batch_sizes: dict[str, int] | None = None     # (1.3) batched steps so far, by how many sessions each held
    scheduling: str | None = None                # (1.4) how the process is scheduled (common/realtime.py)


@dataclass(frozen=True)
class PlaybackStatus:
    """Playback's heartbeat status: its sink, buffer and outputs."""

    sink: str
    target_ms: float
    fill_ms: float
    stream_id: str | None
    record: str | None = None
    tick_late_ms: list[float] | None = None  # paced sinks: p50, p99, max lateness of recent ticks
    device_rate: int | None = None           # device sinks
    device_block: int | None = None
    file_samples: int | None = None          # the file sink's recorder
    file_open: bool | None = None
    record_samples: int | None = None        # record's recorder
    record_open: bool | None = None
    session: str | None = None               # (1.3) the client session it plays
    scheduling: str | None = None            # (1.4) how the process is scheduled (common/realtime.py)


@dataclass(frozen=True)
class MonitorStatus:
    """The monitor's heartbeat status."""

    chunks: int


#: Which status a service's heartbeat carries; another service's status is kept as a plain map.
STATUS_TYPES: dict[str, type] = {"capture": CaptureStatus, "inference": InferenceStatus,
                                 "playback": PlaybackStatus, "monitor": MonitorStatus}


@dataclass(frozen=True)
class Heartbeat(Record):
    """``heartbeat.<service>``: alive, ready or not, counters since the process started, status."""

    TYPE: ClassVar[str] = "heartbeat"
    ready: bool
    uptime_s: float
    counters: dict[str, int]
    status: Any = None              # the service's status record (STATUS_TYPES), a map, or None


# ---- per-chunk timings
@dataclass(frozen=True)
class InferenceChunk(Record):
    """``chunk.inference``: one converted chunk."""

    TYPE: ClassVar[str] = "chunk"
    stream_id: str
    seq: int
    offset: int
    proc_ms: float
    rtf: float
    queue_chunks: float
    reset: bool
    session: str | None = None          # (1.3) the client session
    batch: int | None = None            # (1.3) sessions converted in the same call


@dataclass(frozen=True)
class PlaybackChunk(Record):
    """``chunk.playback``: a chunk whose first sample reached the output."""

    TYPE: ClassVar[str] = "chunk"
    stream_id: str
    seq: int
    offset: int
    e2e_ms: float
    fill_ms: float
    # Where the last part of e2e went (1.1): from arrival until the jitter buffer let the first
    # sample out, and from then until it reached the output (0 for the paced sinks).
    wait_ms: float | None = None
    device_ms: float | None = None
    session: str | None = None          # (1.3) the client session


#: Which chunk record a service publishes.
CHUNK_TYPES: dict[str, type] = {"inference": InferenceChunk, "playback": PlaybackChunk}


@dataclass(frozen=True)
class AudioHeader(Record):
    """``audio.<service>``: an audio chunk's header and stage records, without its samples."""

    TYPE: ClassVar[str] = "audio"
    stream_id: str
    seq: int
    t_capture_ns: int
    t_wall_ns: int
    sample_rate: int
    n_samples: int
    fmt: str
    offset: int
    source_end: int | None
    stages: list[StageRecord]
    t_recv_ns: int | None = None    # when the publishing service received it (its monotonic clock)

    @classmethod
    def of(cls, chunk, t_recv_ns: int | None = None) -> AudioHeader:
        """The header of an :class:`~common.protocol.AudioChunk`."""
        return cls(chunk.stream_id, chunk.seq, chunk.t_capture_ns, chunk.t_wall_ns, chunk.sample_rate,
                   chunk.n_samples, chunk.fmt, chunk.offset, chunk.source_end, list(chunk.stages), t_recv_ns)


@dataclass(frozen=True)
class SoundFrame(Record):
    """``sound.<service>``: levels and spectrum of ``frame_ms`` of audio (:mod:`common.levels`)."""

    TYPE: ClassVar[str] = "sound"
    frame_ms: float
    rms_dbfs: float
    peak_dbfs: float
    spectrum_db: list[float]        # per band of common.levels.band_centres_hz


# ---- events
@dataclass(frozen=True)
class Event(Record):
    """``event.<service>``: something happened. Each subclass is one :class:`EventName`."""

    TYPE: ClassVar[str] = "event"
    NAME: ClassVar[str] = ""

    @property
    def name(self) -> str:
        """The event's name (an :class:`EventName`, or any str for :class:`OtherEvent`)."""
        return self.NAME

    def to_data(self) -> dict[str, Any]:
        return {"schema": list(SCHEMA_VERSION), "event": str(self.name), **_encode_fields(self)}


@dataclass(frozen=True)
class StreamStart(Event):
    """A stream began: capture's source started one, or playback got its first chunk."""

    NAME: ClassVar[str] = EventName.STREAM_START
    stream_id: str
    offset: int = 0
    seq: int | None = None             # playback: the first chunk's
    source: str | None = None          # capture
    chunk_len: int | None = None       # capture
    head_len: int | None = None        # capture
    sample_rate: int | None = None     # capture
    device: str | None = None          # capture from a device
    device_rate: int | None = None
    target_ms: float | None = None     # playback


@dataclass(frozen=True)
class Reset(Event):
    """Inference reset a stream's state (``reason``: a :class:`ResetReason`) at ``offset``."""

    NAME: ClassVar[str] = EventName.RESET
    stream_id: str | None
    reason: str
    offset: int
    session: str | None = None          # (1.3) the client session


@dataclass(frozen=True)
class Eof(Event):
    """Capture sent a file source's last chunk; the source had ``source_end`` samples."""

    NAME: ClassVar[str] = EventName.EOF
    stream_id: str
    source_end: int


@dataclass(frozen=True)
class Drained(Event):
    """Playback played ``stream_id`` to its ``source_end``."""

    NAME: ClassVar[str] = EventName.DRAINED
    stream_id: str
    source_end: int


@dataclass(frozen=True)
class Underrun(Event):
    """Playback invented ``samples`` of silence in ``underruns`` runs since the last such event."""

    NAME: ClassVar[str] = EventName.UNDERRUN
    stream_id: str | None
    underruns: int
    samples: int
    total: int


@dataclass(frozen=True)
class Reject(Event):
    """A receiver rejected ``count`` malformed messages since its last such event (``total`` in all)."""

    NAME: ClassVar[str] = EventName.REJECT
    count: int
    total: int
    reason: str | None


@dataclass(frozen=True)
class ControlChanged(Event):
    """Live settings changed to ``changes`` (key -> new value), asked by ``by`` (a controller's
    key name, or ``local``). They apply from the output chunk at stream sample ``offset`` of
    ``stream_id`` (``None`` before any stream); settings before the model (input gain, gate,
    AGC) from input sample ``offset + head_len``, as the model already had the lookahead."""

    NAME: ClassVar[str] = EventName.CONTROL
    changes: dict[str, Any]
    by: str
    stream_id: str | None = None
    offset: int | None = None


@dataclass(frozen=True)
class VoiceSwitch(Event):
    """A voice switch: ``phase`` is ``loading`` (asked for), ``swapped`` (the new voice converts
    from stream sample ``offset``; ``load_ms`` it took to load, off the audio path) or
    ``failed`` (``reason``, one line; the current voice stays)."""

    NAME: ClassVar[str] = EventName.VOICE
    phase: str
    voice: str
    model: str | None = None
    by: str | None = None
    stream_id: str | None = None
    offset: int | None = None
    load_ms: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class SessionChange(Event):
    """A client session ``opened``, was ``refused`` (``reason``: every stream slot is taken, or
    the session belongs to another CURVE key; its capture logs it) or was ``evicted`` (silent for
    ``inference.idle_s``); ``sessions`` is how many are open now, of ``max_streams``."""

    NAME: ClassVar[str] = EventName.SESSION
    action: str
    session: str
    sessions: int
    max_streams: int
    reason: str | None = None
    chunks: int | None = None


@dataclass(frozen=True)
class Status(Event):
    """The monitor's status line."""

    NAME: ClassVar[str] = EventName.STATUS
    line: str


@dataclass(frozen=True)
class ServiceStale(Event):
    """The monitor missed ``service``'s heartbeats."""

    NAME: ClassVar[str] = EventName.SERVICE_STALE
    service_name: str
    service_pid: int
    last_seen_s_ago: float


@dataclass(frozen=True)
class ServiceBack(Event):
    """A stale service's heartbeats came back (``restarted``: from a new process)."""

    NAME: ClassVar[str] = EventName.SERVICE_BACK
    service_name: str
    service_pid: int
    restarted: bool


@dataclass(frozen=True)
class ServiceRestarted(Event):
    """A new process of ``service`` appeared before the old one was missed."""

    NAME: ClassVar[str] = EventName.SERVICE_RESTARTED
    service_name: str
    service_pid: int
    restarts: int


@dataclass(frozen=True)
class Overloaded(Event):
    """Inference cannot keep up with real time."""

    NAME: ClassVar[str] = EventName.OVERLOADED
    reason: str


@dataclass(frozen=True)
class OverloadCleared(Event):
    """Inference keeps up again, after ``duration_s`` overloaded."""

    NAME: ClassVar[str] = EventName.OVERLOAD_CLEARED
    duration_s: float


@dataclass(frozen=True)
class InputOverflow(Event):
    """Capture's sound device overflowed ``new`` times since the monitor's last look."""

    NAME: ClassVar[str] = EventName.INPUT_OVERFLOW
    service_name: str
    new: int
    total: int


@dataclass(frozen=True)
class OutputUnderflow(Event):
    """Playback's sound device underflowed ``new`` times since the monitor's last look."""

    NAME: ClassVar[str] = EventName.OUTPUT_UNDERFLOW
    service_name: str
    new: int
    total: int


@dataclass(frozen=True)
class SinkError(Event):
    """Writing a file failed; it keeps its ``samples`` and gets nothing more."""

    NAME: ClassVar[str] = EventName.SINK_ERROR
    path: str
    error: str
    samples: int


@dataclass(frozen=True)
class OtherEvent(Event):
    """An event this version does not know (a later minor's): its name and fields as they came."""

    event_name: str
    fields: dict[str, Any]

    @property
    def name(self) -> str:
        return self.event_name

    def to_data(self) -> dict[str, Any]:
        return {"schema": list(SCHEMA_VERSION), **self.fields, "event": self.event_name}


EVENT_TYPES: dict[str, type] = {cls.NAME: cls for cls in (
    StreamStart, Reset, Eof, Drained, Underrun, Reject, Status, ServiceStale, ServiceBack, ServiceRestarted,
    Overloaded, OverloadCleared, InputOverflow, OutputUnderflow, SinkError, ControlChanged, VoiceSwitch,
    SessionChange)}
assert set(EVENT_TYPES) == set(EventName), "every event name has its record"


# --------------------------------------------------------------------------- encoding
# Event fields that would shadow the envelope's names in Python carry the contract's names on the
# wire (a ServiceStale's "service" and "pid" are those of the service that went stale).
_WIRE_NAMES = {"service_name": "service", "service_pid": "pid"}
_PY_NAMES = {v: k for k, v in _WIRE_NAMES.items()}


@cache
def _fields_of(cls: type) -> tuple[tuple[str, str, bool], ...]:
    """``(python name, wire name, optional)`` per field of ``cls`` (``optional``: has a default)."""
    return tuple((f.name, _WIRE_NAMES.get(f.name, f.name),
                  f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
                 for f in dataclasses.fields(cls) if f.name != "origin")


def _encode_value(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return _encode_fields(v)
    if isinstance(v, (list, tuple)):
        return [_encode_value(x) for x in v]
    if isinstance(v, dict):  # keys may be Counter members: plain str on the wire
        return {str(k): _encode_value(x) for k, x in v.items()}
    if isinstance(v, enum.Enum):
        return v.value
    return v


def _encode_fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields by wire name; an optional field left at ``None`` is left out."""
    out = {}
    for name, wire, optional in _fields_of(type(obj)):
        v = getattr(obj, name)
        if v is not None or not optional:
            out[wire] = _encode_value(v)
    return out


def make_message(service: str, record: Record, host: str | None = None, pid: int | None = None) -> Telemetry:
    """The envelope that publishes ``record`` from ``service`` (this process, now; ``host`` and
    ``pid`` when the caller already knows them)."""
    if host is None or pid is None:
        return make_telemetry(service, record.TYPE, record.to_data())
    return Telemetry(service, record.TYPE, record.to_data(), host, pid, time.monotonic_ns(), time.time_ns())


# --------------------------------------------------------------------------- decoding
def _show(v: Any) -> str:
    text = " ".join(repr(v)[:60].split())
    return f"{text} ({type(v).__name__})"


def _check(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and converted: int to float, maps to
    dataclasses); :class:`TelemetryError` naming ``path`` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], path) if len(inner) == 1 else value
    if tp is Any:
        return value
    if tp is bool:
        if type(value) is not bool:
            raise TelemetryError(f"{path}: expected a bool, got {_show(value)}")
        return value
    if tp is int:
        if type(value) is not int:
            raise TelemetryError(f"{path}: expected an int, got {_show(value)}")
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise TelemetryError(f"{path}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if type(value) is not str:
            raise TelemetryError(f"{path}: expected a str, got {_show(value)}")
        return value
    if origin is list:
        if type(value) is not list:
            raise TelemetryError(f"{path}: expected an array, got {_show(value)}")
        (item,) = typing.get_args(tp)
        return [_check(x, item, f"{path}[{i}]") for i, x in enumerate(value)]
    if origin is dict:
        if type(value) is not dict:
            raise TelemetryError(f"{path}: expected a map, got {_show(value)}")
        _, item = typing.get_args(tp)
        return {k: _check(x, item, f"{path}.{k}") for k, x in value.items()}
    if dataclasses.is_dataclass(tp):
        if type(value) is not dict:
            raise TelemetryError(f"{path}: expected a map, got {_show(value)}")
        return _decode_fields(tp, value, path)
    raise TypeError(f"unsupported annotation {tp!r}")  # a bug in this module, not bad input


@cache
def _schema_of(cls: type) -> tuple[tuple[str, str, Any, bool], ...]:
    """``(python name, wire name, annotation, required)`` per field of ``cls``."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _WIRE_NAMES.get(f.name, f.name), hints[f.name],
                  f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                 for f in dataclasses.fields(cls) if f.name != "origin")


def _decode_fields(cls: type, data: dict, path: str, **extra: Any) -> Any:
    values = dict(extra)
    for name, wire, tp, required in _schema_of(cls):
        if name in values:
            continue
        if wire in data:
            values[name] = _check(data[wire], tp, f"{path}.{wire}")
        elif required:
            raise TelemetryError(f"{path}.{wire}: missing")
    return cls(**values)


def _check_version(data: dict, path: str) -> None:
    v = data.get("schema")
    if type(v) is not list or len(v) != 2 or not all(type(x) is int for x in v):
        raise TelemetryError(f"{path}.schema: expected [major, minor], got {_show(v)}")
    if v[0] != SCHEMA_VERSION[0]:
        raise TelemetryError(f"{path}.schema: major version {v[0]} is not supported "
                             f"(this is {SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]})")


def decode(msg: Telemetry) -> Record:
    """The typed record a telemetry message carries, with its :attr:`~Record.origin` set.

    The one way to read telemetry. Raises :class:`TelemetryError` (one line naming the field)
    for a record that does not fit: an unsupported schema major, a field missing or of the wrong
    type, negative counters, or a chunk timing from a service that publishes none.
    """
    data, path = msg.data, f"{msg.type}.{msg.service}"
    _check_version(data, path)
    origin = Origin(msg.service, msg.host, msg.pid, msg.t_mono_ns, msg.t_wall_ns)
    if msg.type == "heartbeat":
        raw = data.get("status")
        status_cls = STATUS_TYPES.get(msg.service)
        status = (_check(raw, status_cls, f"{path}.status") if status_cls is not None and raw is not None
                  else _check(raw, dict[str, Any] | None, f"{path}.status"))
        beat = _decode_fields(Heartbeat, data, path, status=status, origin=origin)
        bad = [k for k, n in beat.counters.items() if n < 0]
        if bad:
            raise TelemetryError(f"{path}.counters.{bad[0]}: expected an int >= 0, got {beat.counters[bad[0]]}")
        return beat
    if msg.type == "chunk":
        cls = CHUNK_TYPES.get(msg.service)
        if cls is None:
            raise TelemetryError(f"{path}: {msg.service} publishes no chunk timings")
        return _decode_fields(cls, data, path, origin=origin)
    if msg.type == "event":
        name = data.get("event")
        if type(name) is not str or not 0 < len(name) <= MAX_NAME_LEN:
            raise TelemetryError(f"{path}.event: expected an event name, got {_show(name)}")
        cls = EVENT_TYPES.get(name)
        if cls is None:
            fields = {k: v for k, v in data.items() if k not in ("schema", "event")}
            return OtherEvent(name, fields, origin=origin)
        return _decode_fields(cls, data, f"{path}.{name}", origin=origin)
    if msg.type == "audio":
        return _decode_fields(AudioHeader, data, path, origin=origin)
    if msg.type == "sound":
        return _decode_fields(SoundFrame, data, path, origin=origin)
    raise TelemetryError(f"{path}: no record of type {msg.type!r}")
