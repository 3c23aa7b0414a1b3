"""Tests for common.protocol: round trips, versions, every malformed case, and fuzzing of decode.

The fuzz tests check two properties on thousands of inputs: :func:`decode` raises nothing but
:class:`ProtocolError`, and whatever it accepts encodes and decodes again to an equal message.
"""

from __future__ import annotations

import math
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import common.protocol as protocol
from common.audio import SAMPLE_RATE
from common.protocol import (
    DEFAULT_MAX_SAMPLES,
    FORMATS,
    MAX_DATA_DEPTH,
    MAX_NAME_LEN,
    MAX_STAGES,
    PROTOCOL_VERSION,
    TELEMETRY_TYPES,
    AudioChunk,
    ProtocolError,
    StageRecord,
    Telemetry,
    decode,
    decode_audio,
    decode_telemetry,
    encode,
    make_telemetry,
    max_message_bytes,
)
from common.telemetry import AudioHeader

# No example database: the suite leaves no .hypothesis/ folder behind.
FUZZ = settings(max_examples=800, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- helpers


def stage(i: int = 0, **kw) -> StageRecord:
    fields = dict(name=f"stage{i}", host="host-a", t_recv_ns=1_000 + i, t_send_ns=2_000 + i,
                  proc_ns=500 + i, model="llvc-G_500000" if i % 2 == 0 else None, reset=i == 1)
    fields.update(kw)
    return StageRecord(**fields)


def chunk(n: int = 208, fmt: str = "f32le", n_stages: int = 0, seed: int = 0, **kw) -> AudioChunk:
    rng = np.random.default_rng(seed)
    samples = (0.3 * rng.standard_normal(n)).astype(np.float32)
    fields = dict(stream_id="3f2a9c01-capture", seq=41, t_capture_ns=123_456_789_012,
                  t_wall_ns=1_700_000_000_000_000_000, samples=samples, sample_rate=SAMPLE_RATE,
                  fmt=fmt, stages=tuple(stage(i) for i in range(n_stages)))
    fields.update(kw)
    return AudioChunk(**fields)


NESTED = {"ms": 4.25, "n": 3, "neg": -7, "ok": True, "none": None, "name": "x y\nz",
          "list": [1, 2.5, "s", None, [False, {"deep": [1]}]],
          "map": {"a": {"b": {"c": 1}}}, "empty": {}, "big": 2**64 - 1, "small": -(2**63)}


def telemetry(type_: str = "chunk", data: dict | None = None,
              service: str = "inference") -> Telemetry:
    return Telemetry(service=service, type=type_, data=NESTED if data is None else data,
                     host="host-a", pid=4242, t_mono_ns=99_000_000,
                     t_wall_ns=1_700_000_000_000_000_000)


def wire(msg) -> dict:
    """The msgpack map of an encoded message, for crafting malformed ones."""
    return msgpack.unpackb(encode(msg), raw=False)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def refused(data, *fragments: str, fn=decode, **kw) -> str:
    """Assert that ``fn(data)`` raises ProtocolError, on one line, naming every fragment."""
    with pytest.raises(ProtocolError) as info:
        fn(data, **kw)
    text = str(info.value)
    assert "\n" not in text and text.strip() == text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return text


def assert_round_trips(msg) -> None:
    """``msg`` encodes, decodes to an equal message, and does so again."""
    again = decode(encode(msg))
    assert again == msg
    assert decode(encode(again)) == again


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("n_stages", [0, 1, 3])
def test_round_trip_f32le(n_stages):
    c = chunk(n_stages=n_stages)
    d = decode(encode(c))
    assert isinstance(d, AudioChunk) and d == c
    assert d.samples.dtype == np.float32 and d.samples.ndim == 1 and d.n_samples == 208
    assert np.array_equal(d.samples, c.samples)  # exact, bit for bit
    assert d.stages == c.stages and len(d.stages) == n_stages
    assert decode_audio(encode(c)) == c


@pytest.mark.parametrize("n_stages", [0, 1, 3])
def test_round_trip_s16le(n_stages):
    c = chunk(fmt="s16le", n_stages=n_stages)
    d = decode(encode(c))
    assert d.fmt == "s16le" and d.samples.dtype == np.float32
    assert np.max(np.abs(d.samples - c.samples)) <= 0.5 / 32768 + 1e-9  # rounded, not truncated
    assert d.stages == c.stages and d.seq == c.seq and d.stream_id == c.stream_id
    assert decode(encode(d)) == d  # quantised values survive exactly
    assert d.samples.flags.writeable


def test_s16le_clips_to_range():
    c = chunk(fmt="s16le", samples=np.array([-2.0, -1.0, 0.0, 0.99999, 1.0, 5.0], np.float32))
    d = decode(encode(c))
    assert d.samples.tolist() == [-1.0, -1.0, 0.0, 32767 / 32768, 32767 / 32768, 32767 / 32768]


def test_f32le_decodes_without_copy_and_read_only():
    data = encode(chunk())
    d = decode(data)
    assert not d.samples.flags.writeable
    with pytest.raises(ValueError):
        d.samples[0] = 1.0


def test_other_sample_dtypes_encode_as_float32():
    x = np.linspace(-0.5, 0.5, 208)  # float64
    d = decode(encode(chunk(samples=x)))
    assert d.samples.dtype == np.float32 and np.array_equal(d.samples, x.astype(np.float32))
    d = decode(encode(chunk(samples=np.arange(10, dtype=np.int16))))
    assert d.samples.tolist() == list(range(10))
    d = decode(encode(chunk(samples=x.astype(np.float32)[::2])))  # not contiguous
    assert np.array_equal(d.samples, x.astype(np.float32)[::2])


@pytest.mark.parametrize("as_type", [bytes, bytearray, memoryview])
def test_decode_accepts_bytes_like(as_type):
    c = chunk(n_stages=1)
    assert decode(as_type(encode(c))) == c


def test_with_stage_and_with_samples():
    c = chunk(n_stages=1)
    s = stage(5)
    c2 = c.with_stage(s)
    assert c2.stages == c.stages + (s,) and c.stages == (stage(0),)
    assert c2.samples is c.samples  # the payload is not copied
    assert (c2.stream_id, c2.seq, c2.t_capture_ns, c2.t_wall_ns, c2.sample_rate, c2.fmt) == (
        c.stream_id, c.seq, c.t_capture_ns, c.t_wall_ns, c.sample_rate, c.fmt)
    y = np.zeros(208, np.float32)
    c3 = c2.with_samples(y)
    assert c3.samples is y and c3.stages == c2.stages and c3 != c2
    assert decode(encode(c3)) == c3
    # A decoded chunk passes through a stage without touching the payload.
    d = decode(encode(c))
    assert decode(encode(d.with_stage(s))) == c2


def test_chunk_equality():
    c = chunk()
    assert c == chunk() and c != chunk(seed=1) and c != chunk(seq=42) and c != "x"
    assert c != chunk(n=207)


@pytest.mark.parametrize("type_", TELEMETRY_TYPES)
def test_round_trip_telemetry(type_):
    t = telemetry(type_)
    d = decode(encode(t))
    assert isinstance(d, Telemetry) and d == t
    assert d.topic == f"{type_}.inference"
    assert decode_telemetry(encode(t)) == t


def test_telemetry_tuples_arrive_as_lists():
    d = decode(encode(telemetry(data={"t": (1, (2, 3))})))
    assert d.data == {"t": [1, [2, 3]]}


def test_telemetry_numpy_scalars_and_dict_subclasses_encode():
    from collections import OrderedDict
    d = decode(encode(telemetry(data=OrderedDict(a=np.float64(1.5), b=np.float32(2.0).item()))))
    assert d.data == {"a": 1.5, "b": 2.0}


def test_topics():
    assert telemetry("event", service="playback").topic == "event.playback"
    assert telemetry("heartbeat", service="capture").topic == "heartbeat.capture"
    assert telemetry("chunk", service="inference").topic == "chunk.inference"


def test_make_telemetry():
    import os
    import socket
    before_m, before_w = time.monotonic_ns(), time.time_ns()
    src = {"a": 1}
    t = make_telemetry("capture", "event", src)
    src["a"] = 2
    assert t.data == {"a": 1}
    assert t.host == socket.gethostname() and t.pid == os.getpid()
    assert before_m <= t.t_mono_ns <= time.monotonic_ns()
    assert before_w <= t.t_wall_ns <= time.time_ns()
    assert make_telemetry("capture", "heartbeat").data == {}
    assert decode(encode(t)) == t


def test_max_message_bytes():
    assert max_message_bytes() == max_message_bytes(DEFAULT_MAX_SAMPLES) == 4 * 16000 + 65536
    assert max_message_bytes(208) < max_message_bytes(1664)
    with pytest.raises(ValueError):
        max_message_bytes(0)
    # The largest legal chunk, with every stage and every name at its longest, still fits.
    name = "n" * MAX_NAME_LEN
    stages = tuple(StageRecord(name, name, 2**63 - 1, 2**63 - 1, 2**63 - 1, name, True)
                   for _ in range(MAX_STAGES))
    c = chunk(n=DEFAULT_MAX_SAMPLES, stream_id=name, stages=stages, seq=2**63 - 1)
    data = encode(c)
    assert len(data) <= max_message_bytes()
    assert decode(data) == c


# --------------------------------------------------------------------------- versions


def test_higher_minor_with_unknown_fields_decodes():
    c = chunk(n_stages=2)
    m = wire(c)
    m["v"] = [PROTOCOL_VERSION[0], PROTOCOL_VERSION[1] + 3]
    m["loudness_db"] = -23.5
    m["future"] = {"nested": [1, b"raw", {"x": None}], "flag": True}
    m["stages"][0]["gpu"] = "H100"
    m["stages"][1]["queue_ns"] = [5, 6]
    assert decode(pack(m)) == c

    t = telemetry()
    m = wire(t)
    m["v"] = [PROTOCOL_VERSION[0], 99]
    m["region"] = "eu"
    assert decode(pack(m)) == t


@pytest.mark.parametrize("version", [[0, 0], [2, 0], [PROTOCOL_VERSION[0] + 1, 0], [7, 3]])
def test_other_major_refused(version):
    for msg in (chunk(), telemetry()):
        m = wire(msg)
        m["v"] = version
        refused(pack(m), "v:", f"major version {version[0]}")


@pytest.mark.parametrize("version", ["1.0", [1], [1, 0, 0], [True, 0], [1, False], [-1, 0],
                                     [1, -1], [1.0, 0], None, {"major": 1}])
def test_malformed_version_refused(version):
    m = wire(chunk())
    m["v"] = version
    refused(pack(m), "v:")


def test_missing_version_refused():
    m = wire(telemetry())
    del m["v"]
    refused(pack(m), "v: missing")


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", b"\x81\xa1a", pack({"a": 1}) + b"\x00",
                                  b"\xa3ab", b"\xd9\x02\xff\xfe"])
def test_not_msgpack(data):
    refused(data, "message:")


@pytest.mark.parametrize("obj", [[1, 2], 5, "audio", None, True, b"bytes", 1.5])
def test_not_a_map(obj):
    refused(pack(obj), "message:", "expected a msgpack map")


@pytest.mark.parametrize("obj", [5, "x", None, [1], {"a": 1}])
def test_not_bytes(obj):
    refused(obj, "message:", "expected bytes")


def test_multibyte_memoryview_refused():
    refused(memoryview(np.zeros(8, np.float32)), "message:")


@pytest.mark.parametrize("kind", ["video", "", "AUDIO", 1, None, True, b"audio", ["audio"]])
def test_unknown_kind(kind):
    m = wire(chunk())
    m["kind"] = kind
    refused(pack(m), "kind:")


def test_missing_kind():
    m = wire(chunk())
    del m["kind"]
    refused(pack(m), "kind: missing")


def test_wrong_kind_for_decode_audio_and_decode_telemetry():
    refused(encode(telemetry()), "kind:", "expected audio", fn=decode_audio)
    refused(encode(chunk()), "kind:", "expected telemetry", fn=decode_telemetry)


AUDIO_FIELDS = ["stream_id", "seq", "t_capture_ns", "t_wall_ns", "sample_rate", "n_samples",
                "fmt", "payload", "stages"]
STAGE_FIELDS = ["name", "host", "t_recv_ns", "t_send_ns", "proc_ns", "model", "reset"]
TELEMETRY_FIELDS = ["service", "type", "host", "pid", "t_mono_ns", "t_wall_ns", "data"]


@pytest.mark.parametrize("key", AUDIO_FIELDS)
def test_audio_missing_field(key):
    m = wire(chunk(n_stages=1))
    del m[key]
    refused(pack(m), f"audio.{key}: missing")
    m["extra"] = 1  # as many keys as expected, one unknown: still missing
    refused(pack(m), f"audio.{key}: missing")


@pytest.mark.parametrize("key", STAGE_FIELDS)
def test_stage_missing_field(key):
    m = wire(chunk(n_stages=2))
    del m["stages"][1][key]
    refused(pack(m), f"audio.stages[1].{key}: missing")


@pytest.mark.parametrize("key", TELEMETRY_FIELDS)
def test_telemetry_missing_field(key):
    m = wire(telemetry())
    del m[key]
    refused(pack(m), f"telemetry.{key}: missing")


EXT = msgpack.ExtType(5, b"\x01\x02")
BAD_AUDIO = [
    ("stream_id", ""), ("stream_id", "s" * (MAX_NAME_LEN + 1)), ("stream_id", 7),
    ("stream_id", b"abc"), ("stream_id", None),
    ("seq", -1), ("seq", 2**63), ("seq", 1.0), ("seq", "1"), ("seq", True), ("seq", None),
    ("seq", EXT),
    ("t_capture_ns", -5), ("t_capture_ns", False), ("t_capture_ns", 1.5e9), ("t_capture_ns", [1]),
    ("t_wall_ns", -1), ("t_wall_ns", True), ("t_wall_ns", "now"),
    ("sample_rate", 0), ("sample_rate", -16000), ("sample_rate", 16000.0), ("sample_rate", True),
    ("sample_rate", "16k"),
    ("n_samples", 0), ("n_samples", -208), ("n_samples", 207), ("n_samples", 209),
    ("n_samples", True), ("n_samples", 208.0), ("n_samples", "208"),
    ("fmt", "f64le"), ("fmt", "F32LE"), ("fmt", ""), ("fmt", 1), ("fmt", None), ("fmt", b"f32le"),
    ("payload", "text"), ("payload", [0.0] * 208), ("payload", None), ("payload", b"\x00" * 831),
    ("payload", b"\x00" * 833), ("payload", b""), ("payload", EXT),
    ("stages", None), ("stages", {}), ("stages", "none"), ("stages", [1]), ("stages", [None]),
    ("stages", [[1, 2]]),
]


@pytest.mark.parametrize("key,value", BAD_AUDIO)
def test_audio_bad_field(key, value):
    m = wire(chunk())
    m[key] = value
    field = "audio.payload:" if key == "n_samples" and value in (207, 209) else f"audio.{key}"
    refused(pack(m), field)


BAD_STAGE = [
    ("name", ""), ("name", 5), ("name", "n" * (MAX_NAME_LEN + 1)), ("host", None), ("host", ""),
    ("t_recv_ns", -1), ("t_recv_ns", True), ("t_send_ns", 1.0), ("t_send_ns", 2**64 - 1),
    ("proc_ns", -3), ("proc_ns", False), ("proc_ns", None),
    ("model", ""), ("model", 3), ("model", False), ("model", "m" * (MAX_NAME_LEN + 1)),
    ("reset", 0), ("reset", 1), ("reset", None), ("reset", "yes"), ("reset", EXT),
]


@pytest.mark.parametrize("key,value", BAD_STAGE)
def test_stage_bad_field(key, value):
    m = wire(chunk(n_stages=3))
    m["stages"][2][key] = value
    refused(pack(m), f"audio.stages[2].{key}:")


def test_too_many_stages():
    m = wire(chunk(n_stages=1))
    m["stages"] = m["stages"] * (MAX_STAGES + 1)
    refused(pack(m), "audio.stages:", "at most 16")
    m["stages"] = m["stages"][:MAX_STAGES]
    assert len(decode(pack(m)).stages) == MAX_STAGES


BAD_TELEMETRY = [
    ("service", ""), ("service", "s" * (MAX_NAME_LEN + 1)), ("service", 1), ("service", None),
    ("type", "metrics"), ("type", ""), ("type", 1), ("type", None), ("type", "Event"),
    ("host", ""), ("host", 3), ("pid", 0), ("pid", -1), ("pid", True), ("pid", "1"),
    ("pid", 1.0), ("pid", 2**63),
    ("t_mono_ns", -1), ("t_mono_ns", True), ("t_wall_ns", 0.5), ("t_wall_ns", None),
    ("data", None), ("data", []), ("data", "x"), ("data", 1), ("data", b"{}"),
]


@pytest.mark.parametrize("key,value", BAD_TELEMETRY)
def test_telemetry_bad_field(key, value):
    m = wire(telemetry())
    m[key] = value
    refused(pack(m), f"telemetry.{key}:")


def nest(depth: int):
    """``depth`` containers, alternating maps and lists, around a 1."""
    value = 1
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


@pytest.mark.parametrize("value,fragment", [
    (b"raw", "telemetry.data.bad:"), (EXT, "telemetry.data.bad:"),
    (msgpack.Timestamp(1, 0), "telemetry.data.bad:"), ([1, b"x"], "telemetry.data.bad[1]:"),
    ({"inner": {"x": EXT}}, "telemetry.data.bad.inner.x:"), (nest(MAX_DATA_DEPTH + 1), "deeper"),
])
def test_telemetry_bad_data(value, fragment):
    m = wire(telemetry(data={}))
    m["data"] = {"ok": 1, "bad": value}
    refused(pack(m), fragment)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_telemetry_non_finite_float_refused(value):
    m = wire(telemetry(data={}))
    m["data"] = {"list": [1.0, value]}
    refused(pack(m), "telemetry.data.list[1]:", "non-finite")
    with pytest.raises(ProtocolError, match="telemetry.data.list"):
        encode(telemetry(data={"list": [1.0, value]}))


def test_telemetry_data_depth_limit():
    assert decode(encode(telemetry(data={"d": nest(MAX_DATA_DEPTH)}))).data == {"d": nest(4)}
    too_deep = pack({**wire(telemetry()), "data": {"d": nest(MAX_DATA_DEPTH + 1)}})
    refused(too_deep, "telemetry.data.d")
    with pytest.raises(ProtocolError, match="deeper than 4"):
        encode(telemetry(data={"d": nest(MAX_DATA_DEPTH + 1)}))


def test_non_str_keys_refused():
    # strict_map_key lets bytes keys through msgpack; the protocol does not.
    m = wire(chunk(n_stages=1))
    m[b"seq2"] = 1
    refused(pack(m), "audio:", "map keys must be str")
    m = wire(chunk(n_stages=1))
    m["stages"][0][b"gpu"] = "x"
    m["stages"][0]["other"] = 1
    refused(pack(m), "audio.stages[0]:", "map keys must be str")
    m = wire(telemetry())
    m["data"] = {"a": {b"k": 1}}
    refused(pack(m), "telemetry.data.a:", "map keys must be str")
    m = wire(chunk())
    m["future"] = {"ok": {b"k": 1}}
    refused(pack(m), "audio.future.ok:", "map keys must be str")
    # Int keys never get past the unpacker.
    m = wire(telemetry())
    m["data"] = {1: "x"}
    refused(pack(m), "message:")


def test_ext_types_refused_anywhere():
    refused(pack(EXT), "message:")
    m = wire(chunk())
    m["future"] = EXT
    refused(pack(m), "audio.future:", "ext")
    m = wire(chunk())
    m["future"] = {"when": [1, msgpack.Timestamp(5, 0)]}
    refused(pack(m), "audio.future.when[1]:", "ext")
    m = wire(chunk(n_stages=1))
    m["stages"][0]["x"] = EXT
    m["stages"][0]["y"] = 1
    refused(pack(m), "audio.stages[0].")
    m = wire(chunk())
    m[b"\x00"] = EXT
    refused(pack(m), "audio")


def test_unknown_field_nesting_deeper_than_recursion_limit():
    m = wire(chunk())
    value = EXT
    for _ in range(900):  # msgpack's own nesting limit is 1024
        value = [value]
    m["future"] = value
    refused(pack(m), "audio.future", "ext")


@pytest.mark.parametrize("key,value", [("seq", True), ("t_capture_ns", False),
                                       ("n_samples", True), ("sample_rate", True)])
def test_bool_is_not_an_int(key, value):
    m = wire(chunk(n=1, samples=np.ones(1, np.float32)))
    m[key] = value
    refused(pack(m), f"audio.{key}:", "bool")


def test_oversized_refused_before_unpacking(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("unpackb called on an oversized message")

    monkeypatch.setattr(protocol.msgpack, "unpackb", boom)
    big = b"\x00" * 10_000_000
    start = time.perf_counter()
    text = refused(big, "message:", "10000000 bytes", str(max_message_bytes()))
    assert time.perf_counter() - start < 0.05
    refused(memoryview(big), "message:", "10000000 bytes")
    refused(b"\x00" * (max_message_bytes(208) + 1), "message:", fn=decode_audio, max_samples=208)
    assert "\n" not in text


def test_size_limit_follows_max_samples():
    data = encode(chunk(n=208))
    padded = pack({**wire(chunk(n=208)), "future": b"\x00" * max_message_bytes(208)})
    refused(padded, "message:", "bytes, more than the limit", max_samples=208)
    assert decode(data, max_samples=208) == chunk(n=208)


@pytest.mark.parametrize("prefix", [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                                    b"\xdc\xff\xff", b"\xde\xff\xff", b"\xc6\xff\xff\xff\xff",
                                    b"\xdb\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01",
                                    b"\x81\xa1a\xdd\x7f\xff\xff\xff"])
def test_hostile_length_prefix_allocates_little(prefix):
    tracemalloc.start()
    try:
        refused(prefix + b"\x00" * 100, "message:", "not valid msgpack")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000


def test_count_above_max():
    c = chunk(n=DEFAULT_MAX_SAMPLES + 1)
    data = encode(c)
    assert len(data) <= max_message_bytes()  # so it is the count that is refused, not the size
    refused(data, "audio.n_samples:", str(DEFAULT_MAX_SAMPLES))
    refused(encode(chunk(n=208)), "audio.n_samples:", "[1, 100]", max_samples=100)
    assert decode(encode(chunk(n=DEFAULT_MAX_SAMPLES))).n_samples == DEFAULT_MAX_SAMPLES
    assert decode(data, max_samples=DEFAULT_MAX_SAMPLES + 1) == c


def test_sample_rate_check():
    c = chunk(sample_rate=44100)
    data = encode(c)
    refused(data, "audio.sample_rate:", "44100", "16000", fn=decode_audio)
    refused(data, "audio.sample_rate:", fn=decode, expect_rate=16000)
    assert decode_audio(data, expect_rate=None) == c
    assert decode(data) == c
    assert decode_audio(data, expect_rate=44100) == c
    assert decode_audio(encode(chunk())) == chunk()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_payload_refused(bad):
    m = wire(chunk())
    x = chunk().samples.copy()
    x[17] = bad
    m["payload"] = x.astype("<f4").tobytes()
    refused(pack(m), "audio.payload:", "non-finite", "index 17")


def test_caller_errors_are_value_errors():
    with pytest.raises(ValueError):
        decode(encode(chunk()), max_samples=0)
    with pytest.raises(ValueError):
        decode(encode(chunk()), expect_rate=0)


# --------------------------------------------------------------------------- encode refuses


@pytest.mark.parametrize("msg,fragment", [
    (chunk(samples=np.array([0.1, np.nan], np.float32)), "audio.samples:"),
    (chunk(samples=np.array([np.inf], np.float32)), "audio.samples:"),
    (chunk(samples=np.array([1e300, 0.0])), "audio.samples:"),  # overflows float32
    (chunk(samples=np.zeros((2, 104), np.float32)), "audio.samples:"),
    (chunk(samples=np.float32(0.5)), "audio.samples:"),
    (chunk(samples=np.zeros(0, np.float32)), "audio.samples:"),
    (chunk(samples=np.zeros(4, np.complex64)), "audio.samples:"),
    (chunk(samples=np.zeros(4, bool)), "audio.samples:"),
    (chunk(fmt="f64le"), "audio.fmt:"),
    (chunk(seq=True), "audio.seq:"),
    (chunk(seq=-1), "audio.seq:"),
    (chunk(seq=np.int64(3)), "audio.seq:"),
    (chunk(t_capture_ns=1.5), "audio.t_capture_ns:"),
    (chunk(stream_id=""), "audio.stream_id:"),
    (chunk(sample_rate=0), "audio.sample_rate:"),
    (chunk(stages=(stage(),) * (MAX_STAGES + 1)), "audio.stages:"),
    (chunk(stages=("inference",)), "audio.stages[0]:"),
    (chunk(stages=(stage(reset=1),)), "audio.stages[0].reset:"),
    (chunk(stages=(stage(model=""),)), "audio.stages[0].model:"),
    (chunk(stages=(stage(proc_ns=-1),)), "audio.stages[0].proc_ns:"),
    (telemetry("metrics"), "telemetry.type:"),
    (telemetry(service=""), "telemetry.service:"),
    (Telemetry("svc", "event", {}, "h", 0, 1, 1), "telemetry.pid:"),
    (Telemetry("svc", "event", {}, "h", 1, -1, 1), "telemetry.t_mono_ns:"),
    (Telemetry("svc", "event", [], "h", 1, 1, 1), "telemetry.data:"),
    (telemetry(data={"s": {1, 2}}), "telemetry.data.s:"),
    (telemetry(data={"b": b"x"}), "telemetry.data.b:"),
    (telemetry(data={"i": 2**64}), "telemetry.data.i:"),
    (telemetry(data={1: "x"}), "telemetry.data:"),
    (telemetry(data={"e": EXT}), "telemetry.data.e:"),
    ("not a message", "message:"),
])
def test_encode_refuses(msg, fragment):
    with pytest.raises(ProtocolError) as info:
        encode(msg)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- fuzzing


BASES = [
    chunk(n=208), chunk(n=208, n_stages=1), chunk(n=16, n_stages=3, seed=3),
    chunk(n=24, fmt="s16le", n_stages=1, seed=4), chunk(n=5, fmt="s16le", sample_rate=8000),
    *(telemetry(t, data={"a": 1.5, "b": [1, "x", None], "c": {"d": True}})
      for t in TELEMETRY_TYPES),
    telemetry("audio", data=AudioHeader.of(chunk(n_stages=2)).to_data()),
]
ENCODED = [encode(m) for m in BASES]


def check_decode(data) -> None:
    """The fuzz property: only ProtocolError, and anything accepted round-trips."""
    try:
        msg = decode(data)
    except ProtocolError as exc:
        assert "\n" not in str(exc)
        return
    again = decode(encode(msg))
    assert again == msg


def test_truncations_at_every_length():
    cases = 0
    for data in ENCODED:
        for cut in range(len(data)):
            refused(data[:cut], "message:")
            cases += 1
        assert decode(data) is not None
    assert cases > 2000


json_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
             | st.text(max_size=12))
wire_leaf = json_leaf | st.binary(max_size=12) | st.builds(
    msgpack.ExtType, st.integers(0, 127), st.binary(max_size=6))
wire_values = st.recursive(
    wire_leaf,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.binary(max_size=3), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.one_of(st.binary(max_size=1200), wire_values.map(pack)))
def test_fuzz_random_input(data):
    check_decode(data)


@FUZZ
@given(st.sampled_from(range(len(ENCODED))),
       st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10**6),
                          st.integers(1, 255)), min_size=1, max_size=4))
def test_fuzz_byte_mutations(index, ops):
    data = bytearray(ENCODED[index])
    for op, pos, byte in ops:
        pos %= len(data) + (op == "insert")
        if op == "flip" and data:
            data[pos] ^= byte
        elif op == "insert":
            data.insert(pos, byte)
        elif op == "delete" and data:
            del data[pos]
    check_decode(bytes(data))


def field_paths(m: dict) -> list[tuple]:
    """Paths (tuples of keys) to every top-level field, stage field and data entry."""
    paths = [(k,) for k in m]
    stages = m.get("stages")
    if isinstance(stages, list):
        paths += [("stages", i, k) for i, s in enumerate(stages) if isinstance(s, dict) for k in s]
    if isinstance(m.get("data"), dict):
        paths += [("data", k) for k in m["data"]]
    return paths


@FUZZ
@given(st.data())
def test_fuzz_structured_mutations(data):
    m = msgpack.unpackb(ENCODED[data.draw(st.sampled_from(range(len(ENCODED))))], raw=False)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(field_paths(m)))
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        op = data.draw(st.sampled_from(["replace", "replace", "drop", "add", "minor"]))
        if op == "replace":
            parent[path[-1]] = data.draw(wire_values)
        elif op == "drop":
            del parent[path[-1]]
        elif op == "add":
            parent[data.draw(st.text(max_size=8) | st.binary(max_size=3))] = data.draw(wire_values)
        else:
            m["v"] = [PROTOCOL_VERSION[0], data.draw(st.integers(0, 2**32))]
        if not m:
            break
    check_decode(pack(m))


def depth(value) -> int:
    """How many containers deep ``value`` is (a leaf is 0, ``[1]`` is 1)."""
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


finite_leaf = json_leaf.filter(lambda v: not (isinstance(v, float) and not math.isfinite(v)))
json_values = st.recursive(
    finite_leaf,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@FUZZ
@given(st.sampled_from(FORMATS), st.integers(1, 300), st.integers(0, 3), st.integers(0, 2**32),
       st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_fuzz_valid_messages_round_trip(fmt, n, n_stages, seed, data):
    c = chunk(n=n, fmt=fmt, n_stages=n_stages, seed=seed)
    d = decode(encode(c))
    if fmt == "f32le":
        assert d == c
    else:
        clipped = np.clip(c.samples, -1.0, 32767 / 32768)
        assert np.max(np.abs(d.samples - clipped)) <= 0.5 / 32768 + 1e-9
        assert d.with_samples(c.samples) == c and decode(encode(d)) == d
    t = telemetry("event", data=data)
    if max(map(depth, data.values()), default=0) <= MAX_DATA_DEPTH:
        assert decode(encode(t)) == t
    else:
        with pytest.raises(ProtocolError, match="deeper than"):
            encode(t)


def test_offset_and_source_end_round_trip():
    c = chunk(offset=41616, source_end=42560)
    assert_round_trips(c)
    back = decode(encode(c))
    assert (back.offset, back.source_end, back.end) == (41616, 42560, 41616 + 208)
    live = decode(encode(chunk(offset=5)))
    assert live.source_end is None and "source_end" not in wire(chunk(offset=5))
    m = wire(chunk())
    m["offset"] = -1
    refused(pack(m), "audio.offset")
    m = wire(chunk())
    m["source_end"] = "end"
    refused(pack(m), "audio.source_end")
    m = wire(chunk())
    del m["offset"]
    refused(pack(m), "offset")
    m = wire(chunk())
    m["source_end"] = None  # nil: a live source
    assert decode(pack(m)).source_end is None
