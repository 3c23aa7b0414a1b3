"""common/telemetry.py: the typed, versioned records every service publishes and every tap reads.

Records go through the real wire encoding (``common.protocol.encode``/``decode_telemetry``) in
each round trip, as they would between processes.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common import telemetry as T
from common.protocol import AudioChunk, ProtocolError, StageRecord, decode_telemetry, encode, make_telemetry

V = list(T.SCHEMA_VERSION)  # what this version writes

INFERENCE = T.InferenceStatus("onnx", "llvc-x-0123456789ab", False, "llvc", "cpu", 1, "s1", chunk_len=208,
                              chunk_ms=13.0, algorithmic_latency_ms=15.0, latency_ms=14.0)
#: One record of every kind, with the service that publishes it.
RECORDS = [
    ("inference", T.Heartbeat(True, 12.5, {T.Counter.RESETS: 2, "chunks_in": 900}, INFERENCE)),
    ("capture", T.Heartbeat(True, 1.0, {}, T.CaptureStatus("tone", "streaming", "s1", 208, 16, 4176))),
    ("playback", T.Heartbeat(False, 0.2, {"underruns": 0},
                             T.PlaybackStatus("file:/x.wav", 6.0, 4.5, None, tick_late_ms=[0.1, 0.4, 1.0],
                                              file_samples=0, file_open=True))),
    ("monitor", T.Heartbeat(True, 3.0, {"rejected": 1}, T.MonitorStatus(42))),
    ("dashboard", T.Heartbeat(True, 3.0, {}, {"clients": 2})),  # a service this version has no status for
    ("inference", T.InferenceChunk("s1", 3, 640, 1.25, 10.4, 0.5, False)),
    ("inference", T.InferenceChunk("s1", 4, 848, 1.25, 10.4, 0.5, False, "alice", 3)),
    ("playback", T.PlaybackChunk("s1", 3, 640, 22.1, 4.0)),
    ("playback", T.AudioHeader.of(AudioChunk("s1", 3, 5, 6, np.zeros(208, np.float32), offset=640,
                                             stages=(StageRecord("inference", "h", 1, 2, 3, "m", True),)), 7)),
    ("capture", T.StreamStart("s1", source="tone", chunk_len=208, head_len=16, sample_rate=16000)),
    ("playback", T.StreamStart("s1", 16, seq=1, target_ms=6.0)),
    ("inference", T.Reset("s1", T.ResetReason.GAP, 2096)),
    ("inference", T.Reset("s2", T.ResetReason.GAP, 2096, "bob")),
    ("inference", T.Reset(None, T.ResetReason.NEW_STREAM, 0)),
    ("capture", T.Eof("s1", 9600)),
    ("playback", T.Drained("s1", 9600)),
    ("playback", T.Underrun("s1", 1, 32, 4)),
    ("inference", T.Reject(3, 10, "audio.seq: expected an int")),
    ("monitor", T.Status("e2e p50 20.0 ...")),
    ("monitor", T.ServiceStale("capture", 123, 0.9)),
    ("monitor", T.ServiceBack("capture", 124, True)),
    ("monitor", T.ServiceRestarted("inference", 125, 2)),
    ("monitor", T.Overloaded("mean step 20.1 ms > chunk 13.0 ms")),
    ("monitor", T.OverloadCleared(6.5)),
    ("monitor", T.InputOverflow("capture", 2, 5)),
    ("monitor", T.OutputUnderflow("playback", 1, 1)),
    ("playback", T.SinkError("/x.wav", "No space left on device", 4000)),
    ("inference", T.ControlChanged({"bypass": True, "input_gain_db": -6.0}, "local", "s1", 4176)),
    ("inference", T.VoiceSwitch("swapped", "models/demo_voice.pth", "llvc-demo", "client", "s1", 8336, 172.3)),
    ("inference", T.VoiceSwitch("failed", "x.pth", by="local", reason="x.pth: not a loadable PyTorch checkpoint")),
    ("inference", T.SessionChange("opened", "alice", 1, 8)),
    ("inference", T.SessionChange("refused", "carol", 2, 2, "all 2 stream slots are in use", 12)),
]


def through_the_wire(service: str, record: T.Record) -> T.Record:
    msg = T.make_message(service, record)
    return T.decode(decode_telemetry(encode(msg)))


@pytest.mark.parametrize("service, record", RECORDS, ids=lambda v: type(v).__name__ if not isinstance(v, str) else v)
def test_every_record_survives_the_wire_typed_and_with_its_origin(service, record):
    got = through_the_wire(service, record)
    assert got == record and type(got) is type(record)
    assert got.origin.service == service and got.pid > 0 and got.host and got.topic == f"{record.TYPE}.{service}"
    assert got.to_data()["schema"] == V


def test_every_event_name_has_its_record_and_is_covered_here():
    assert set(T.EVENT_TYPES) == set(T.EventName)
    assert {type(r) for _, r in RECORDS if isinstance(r, T.Event)} == set(T.EVENT_TYPES.values())


def test_the_wire_names_are_the_contracts():
    data = T.ServiceStale("capture", 123, 0.9).to_data()
    assert data == {"schema": V, "event": "service_stale", "service": "capture", "pid": 123,
                    "last_seen_s_ago": 0.9}
    assert type(data["event"]) is str  # plain str, not the enum, on the wire
    # An optional field left unset is left out; a required one is there even when None.
    assert T.StreamStart("s1").to_data() == {"schema": V, "event": "stream_start", "stream_id": "s1", "offset": 0}
    assert T.Reset(None, "gap", 5).to_data()["stream_id"] is None
    beat = T.Heartbeat(True, 1.0, {T.Counter.UNDERRUNS: 1}).to_data()
    assert list(beat["counters"]) == ["underruns"] and type(next(iter(beat["counters"]))) is str


def test_a_later_minor_decodes_a_later_major_does_not():
    later = dict(T.PlaybackChunk("s", 1, 16, 20.0, 4.0).to_data(), schema=[1, 7], jitter_ms=0.3)
    got = T.decode(make_telemetry("playback", "chunk", later))
    assert got == T.PlaybackChunk("s", 1, 16, 20.0, 4.0)  # the unknown field is ignored
    later["schema"] = [2, 0]
    with pytest.raises(T.TelemetryError, match=r"chunk\.playback\.schema: major version 2 is not supported"):
        T.decode(make_telemetry("playback", "chunk", later))
    new_event = {"schema": [1, 3], "event": "voice_switched", "voice": "b"}
    other = T.decode(make_telemetry("inference", "event", new_event))
    assert isinstance(other, T.OtherEvent) and other.name == "voice_switched" and other.fields == {"voice": "b"}
    assert other.to_data() == {"schema": V, "voice": "b", "event": "voice_switched"}


@pytest.mark.parametrize("service, type_, data, message", [
    ("playback", "chunk", {"seq": 1}, r"chunk\.playback\.schema: expected \[major, minor\]"),
    ("playback", "chunk", {"schema": V, "stream_id": "s", "seq": 1, "offset": 0, "e2e_ms": 3.0},
     r"chunk\.playback\.fill_ms: missing"),
    ("playback", "chunk", {"schema": V, "stream_id": "s", "seq": True, "offset": 0, "e2e_ms": 3.0,
                           "fill_ms": 1.0}, r"chunk\.playback\.seq: expected an int, got True"),
    ("capture", "chunk", {"schema": [1, 0]}, r"chunk\.capture: capture publishes no chunk timings"),
    ("capture", "heartbeat", {"schema": V, "ready": True, "uptime_s": 1.0, "counters": {"x": -1}},
     r"heartbeat\.capture\.counters\.x: expected an int >= 0"),
    ("capture", "heartbeat", {"schema": V, "ready": 1, "uptime_s": 1.0, "counters": {}},
     r"heartbeat\.capture\.ready: expected a bool"),
    ("inference", "heartbeat", {"schema": V, "ready": True, "uptime_s": 1.0, "counters": {},
                                "status": {"chunk_len": "208"}}, r"heartbeat\.inference\.status\.backend: missing"),
    ("monitor", "event", {"schema": V, "event": 5}, r"event\.monitor\.event: expected an event name"),
    ("monitor", "event", {"schema": V, "event": "status"}, r"event\.monitor\.status\.line: missing"),
    ("playback", "audio", {"schema": V, "stream_id": "s"}, r"audio\.playback\.seq: missing"),
])
def test_records_that_do_not_fit_are_one_telemetry_error_naming_the_field(service, type_, data, message):
    with pytest.raises(T.TelemetryError, match=message) as err:
        T.decode(make_telemetry(service, type_, data))
    assert isinstance(err.value, ProtocolError) and "\n" not in str(err.value)


def test_status_records_declare_what_services_fill():
    # The status a service builds is the record its consumers read, field for field.
    for cls in T.STATUS_TYPES.values():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert set(T.STATUS_TYPES) == {"capture", "inference", "playback", "monitor"}
