"""Hostile input against the real running pipeline (``llvc run`` under real supervisord).

What a party on the network can reach, and what it gets:

* inference's ``audio_in`` (inference binds it): garbage of every kind, an oversized message, and
  floods of valid chunks from a stream that was current before and from a stranger's stream.
  Every service keeps its process, inference rejects and counts exactly what was sent, and the
  real stream goes on untouched: no reset, no chunk lost, the file sink equal to the source.
* the monitor's telemetry (subscribers connect to every ``telemetry_*`` endpoint, so a party
  that binds one is heard): garbage frames and wrongly typed fields are counted, the report
  stays right.
* playback's ``audio_out`` (playback connects; a hostile party must stand in for inference):
  garbage interleaved with a valid stream; the file sink is the valid stream exactly.
* with CURVE on, a client with an unknown key or none gets nothing processed at all.

Nothing is faked: the hostile senders are raw ZeroMQ sockets on loopback.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import soundfile as sf
import zmq
from zmq.utils.monitor import recv_monitor_message

from bus_helpers import flat, free_port, wait_until
from common.audio import read_audio
from common.protocol import AudioChunk, ProtocolError, decode_audio, encode, make_telemetry, max_message_bytes
from common.security import load_keys
from common.telemetry import Heartbeat
from models.spec import ModelSpec
from services.lab.endpoints import private_sets
from services.lab.harness import LLVC, RunningPipeline
from services.sessions import session_name
from test_playback import Playback, noise

CLIP = Path(__file__).resolve().parent / "data" / "1919-142785-0000.wav"
#: The default model's geometry at chunk factor 1 (what the pipelines here run).
_G = ModelSpec.resolve(None, None).geometry
C, HEAD = _G.chunk_len, _G.head_len
MAX_SAMPLES = 16000           # bus.max_samples in config/pipeline.toml
FLOOD = 300                   # valid chunks per flood
SESSION = session_name("")    # the real capture's session (this host's): the floods go for it
HANDSHAKE_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}
# Correctness runs: slack so that a busy machine cannot cost a chunk (latency is not measured).
SLACK = ["inference.max_backlog_ms=3000", "playback.target_ms=500", "playback.max_ms=5000",
         "bus.send_hwm=32", "bus.recv_hwm=32"]


def slack_sets(*extra: str) -> list[str]:
    return private_sets(*SLACK, *extra)


def endpoint(sets: list[str], name: str) -> str:
    return next(s.split("=", 1)[1] for s in sets if s.startswith(f"endpoints.{name}.connect="))


def pusher(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A raw PUSH. Blocking sends: a PUSH waits for its peer's queue and never drops, so every
    message sent reaches the receiver (which is what makes exact counts possible)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 20_000)
    sock.connect(address)
    return sock


def garbage(stream_id: str = "garbage") -> list[bytes]:
    """One of each malformed audio message: every one is something decode refuses."""
    base = AudioChunk(stream_id, 1, 0, 0, np.full(C, 0.1, np.float32), offset=HEAD)
    good = encode(base)
    fields = msgpack.unpackb(good, raw=False)

    def variant(**changes) -> bytes:
        return msgpack.packb({**fields, **changes}, use_bin_type=True)

    msgs = [
        *(os.urandom(n) for n in (1, 7, 300, 5000)), b"",                        # random bytes
        good[:1], good[:len(good) // 2], good[:-1],                               # truncated
        variant(v=[2, 0]), variant(v=[99, 1]),                                    # wrong version
        encode(replace(base, sample_rate=22050)), encode(replace(base, sample_rate=8000)),
        variant(payload=np.full(C, np.nan, "<f4").tobytes()),                     # NaN / Inf
        variant(payload=np.r_[np.zeros(C - 1), np.inf].astype("<f4").tobytes()),
        variant(payload=np.r_[-np.inf, np.zeros(C - 1)].astype("<f4").tobytes()),
        variant(n_samples=2**40), variant(n_samples=MAX_SAMPLES + 1),            # huge sample counts
        variant(n_samples=2**62, payload=b""),
    ]
    for m in msgs:  # the test is only as good as its garbage
        with pytest.raises(ProtocolError):
            decode_audio(m, max_samples=MAX_SAMPLES)
    return msgs


def flood(stream_id: str, first_chunk: int, n: int = FLOOD) -> list[bytes]:
    """``n`` valid chunks of ``stream_id`` on capture's grid, mid-stream (never offset 0)."""
    x = np.random.default_rng(first_chunk).uniform(-0.5, 0.5, C).astype(np.float32)
    return [encode(AudioChunk(stream_id, k, time.monotonic_ns(), time.time_ns(), x, offset=HEAD + k * C,
                              session=SESSION))
            for k in range(first_chunk, first_chunk + n)]


def send_oversized(ctx: zmq.Context, address: str) -> None:
    """One message over MAXMSGSIZE: libzmq drops it and the connection before the service sees a
    byte (nothing to count); the socket monitor shows the connection being dropped."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    sock.connect(address)
    try:
        sock.send(b"\x00" * (max_message_bytes(MAX_SAMPLES) + 1), zmq.NOBLOCK)  # queued until connected
        events = []
        deadline = time.monotonic() + 20
        while zmq.EVENT_DISCONNECTED not in events and time.monotonic() < deadline:
            if mon.poll(100):
                events.append(recv_monitor_message(mon)["event"])
        assert events[:1] == [zmq.EVENT_HANDSHAKE_SUCCEEDED] and zmq.EVENT_DISCONNECTED in events, events
    finally:
        sock.disable_monitor()
        mon.close(0)
        sock.close(0)


def counters_reach(pipe: RunningPipeline, service: str, at_least: dict, timeout: float = 30) -> dict:
    ok = wait_until(lambda: all(pipe.observer.counters(service).get(k, 0) >= v for k, v in at_least.items()),
                    timeout=timeout, interval=0.1)
    got = pipe.observer.counters(service)
    assert ok, (service, at_least, got, pipe.text()[-2000:])
    return got


def heartbeat_field(pipe: RunningPipeline, service: str, key: str):
    beat = pipe.observer.last_heartbeat(service)
    return flat(beat).get(key) if beat else None


def no_traceback(pipe: RunningPipeline) -> None:
    assert "Traceback" not in pipe.text()
    for log in pipe.run_dir.glob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log


# --------------------------------------------------------------------------- inference + monitor
def test_hostile_senders_change_nothing_for_the_real_stream(tmp_path):
    out = tmp_path / "out.wav"
    intruder = f"tcp://127.0.0.1:{free_port()}"  # a telemetry endpoint nobody in the pipeline binds
    sets = slack_sets("capture.loop=true", f"endpoints.telemetry_intruder.connect={intruder}",
                        "endpoints.telemetry_intruder.binder=capture")
    audio_in = endpoint(sets, "audio_in")
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(intruder)
    hostile = pusher(ctx, audio_in)
    # Capture is started later, by hand, so that a stream can be current before the real one.
    pipe = RunningPipeline(tmp_path / "run", ["--services", "monitor,inference,playback", "--passthrough",
                                              "--source", f"file:{CLIP}", "--sink", f"file:{out}"], sets)
    try:
        pipe.start()
        assert wait_until(lambda: heartbeat_field(pipe, "inference", "ready")
                          and heartbeat_field(pipe, "playback", "ready"), timeout=60), pipe.text()
        # Stream "old" becomes current (its head only: no output reaches playback), then the real
        # capture starts and replaces it: "old" is now a stale stream id.
        hostile.send(encode(AudioChunk("old", 0, time.monotonic_ns(), time.time_ns(),
                                       np.zeros(HEAD, np.float32), session=SESSION)))
        assert wait_until(lambda: heartbeat_field(pipe, "inference", "stream_id") == "old", timeout=20)
        pipe.rpc().supervisor.startProcess("capture", False)  # what supervisorctl start does
        pipe.wait_streaming(1.5)
        real = heartbeat_field(pipe, "capture", "stream_id")
        assert real and heartbeat_field(pipe, "inference", "stream_id") == real
        pids = pipe.pids()
        assert all(pids[name] for name in ("monitor", "inference", "playback", "capture")), pids
        before = dict(pipe.observer.counters("inference"))
        underruns = pipe.observer.counters("playback")["underruns"]
        assert before["resets"] == 2 and before["rejected"] == 0  # "old", then the real stream
        t_attack = time.monotonic_ns()

        send_oversized(ctx, audio_in)
        bad = garbage()
        for burst in (bad, flood("old", 40), bad, flood("stranger", 40), bad):
            for m in burst:
                hostile.send(m)
        expect = {"rejected": before["rejected"] + 3 * len(bad),
                  "dropped_stale_stream": before["dropped_stale_stream"] + FLOOD,
                  "dropped_unknown_stream": before["dropped_unknown_stream"] + FLOOD}
        counters_reach(pipe, "inference", expect)

        # The monitor's telemetry: garbage frames, and valid messages with wrongly typed fields.
        def hello():
            pub.send_multipart([b"event.intruder", b"\xc1 hello?"])
            return pipe.observer.counters("monitor").get("rejected", 0) > 0
        assert wait_until(hello, timeout=20, interval=0.2)  # subscribed: nothing is lost from here on
        time.sleep(1.0)
        mon_before = pipe.observer.counters("monitor")
        for frames in ([b"event.intruder"], [b"event.intruder", os.urandom(64)],
                       [b"event.intruder", msgpack.packb({"kind": "telemetry", "v": [1, 0]})],
                       [b"chunk.playback", encode(make_telemetry("intruder", "event", {"event": "x"}))],
                       [b"event.intruder", encode(make_telemetry("intruder", "event", {})), b"extra"]):
            pub.send_multipart(frames)
        wrong_types = [make_telemetry("intruder", "event", {"event": v}) for v in (5, None, True, [1], {"a": 1})]
        wrong_types.append(make_telemetry("intruder", "heartbeat", {"counters": "lots", "uptime_s": "x"}))
        for msg in wrong_types:
            pub.send_multipart([msg.topic.encode(), encode(msg)])
        # Typed records: a valid envelope whose record does not fit its schema is rejected too.
        counters_reach(pipe, "monitor", {"rejected": mon_before["rejected"] + 5 + len(wrong_types)})

        time.sleep(1.5)  # the real stream goes on a while after the attack
        after = pipe.observer.counters("inference")
        for key, value in expect.items():
            assert after[key] == value, (key, after)  # exactly what was sent, nothing more
        assert after["resets"] == before["resets"] and after["dropped_inference_backlog"] == 0
        assert pipe.observer.events("reset", "inference", since_ns=t_attack) == []
        assert heartbeat_field(pipe, "inference", "stream_id") == real
        assert pipe.observer.counters("playback")["underruns"] - underruns <= 1
        played = [p for p in pipe.observer.played(t_attack) if p.stream_id == real]
        offsets = [p.offset for p in played]
        assert len(played) > 50 and set(np.diff(offsets)) == {C}, offsets  # not one chunk missing
        assert pipe.pids() == pids  # supervisord restarted nothing
        last_played = pipe.observer.played()[-1].offset
        report = pipe.stop()
    finally:
        pipe.stop()
        hostile.close(0)
        pub.close(0)
        ctx.term()
    assert pipe.proc.returncode == 130, pipe.text()[-3000:]
    no_traceback(pipe)
    # The report counts the attack under the right causes and nothing else changed.
    assert report["rejected"]["inference"] == expect["rejected"]
    assert report["rejected"]["monitor"] >= 6
    assert report["dropped"]["stale_stream"] == FLOOD and report["dropped"]["unknown_stream"] == FLOOD
    assert report["resets"] == 2 and report["services"]["inference"]["restarts"] == 0
    assert all(report["services"][s]["restarts"] == 0 for s in ("capture", "inference", "playback"))
    assert abs(report["chunks"] - len(pipe.observer.played())) <= 5
    # The file sink is the looped source, sample for sample, up to the last chunk seen played.
    y, sr = sf.read(out, dtype="float32")
    src = read_audio(CLIP)
    assert sr == 16000 and len(y) >= last_played > 0
    np.testing.assert_array_equal(y[:last_played], np.resize(src, last_played))


# --------------------------------------------------------------------------- playback
def test_playback_fed_garbage_between_chunks_plays_the_valid_stream_exactly(tmp_path):
    """A hostile stand-in for inference: playback connects to whoever binds ``audio_out``.

    (tests/test_playback.py sends one junk message before a stream; here every kind of garbage
    comes between the chunks.)
    """
    out = tmp_path / "out.wav"
    pb = Playback(tmp_path, sink=f"file:{out}")
    try:
        pb.wait_ready()
        assert wait_until(lambda: pb.heartbeat()["counters"].get("rejected") == 0, timeout=5)
        base = pb.heartbeat()["counters"]["rejected"]
        bad = garbage()
        n = 40
        sig = noise(n, seed=3)
        end = n * C - 2 * C - 30
        sig[end:] = 0
        t0 = time.monotonic_ns()
        for k in range(n):
            due = t0 + k * C * 62_500
            while (left := due - time.monotonic_ns()) > 0:
                time.sleep(left / 1e9)
            assert pb.sender.send_bytes(bad[k % len(bad)])
            c = AudioChunk("s1", k, due - 20_000_000, time.time_ns(), sig[k * C:(k + 1) * C], offset=k * C,
                           source_end=end if (k + 1) * C >= end else None)
            assert wait_until(lambda: pb.sender.send(c), timeout=2, interval=0.0005)
        assert wait_until(lambda: pb.of("event", "drained"), timeout=10), pb.logs()
        assert wait_until(lambda: pb.heartbeat()["counters"]["rejected"] == base + n, timeout=5), pb.logs()
        c = pb.heartbeat()["counters"]
        assert c["underruns"] == 0 and c["lost_samples"] == 0 and c["chunks_played"] == 38
        assert pb.proc.poll() is None
        got, sr = sf.read(out, dtype="float32")
        np.testing.assert_array_equal(got, sig[:end])
        assert pb.terminate() < 5
        assert "Traceback" not in pb.logs()
    finally:
        pb.close()


def test_playback_reconnects_after_an_oversized_message_from_its_binder(tmp_path):
    """An oversized message from whoever binds ``audio_out`` (a stand-in for inference, or an
    inference with a larger ``bus.max_samples``) should cost a moment, not playback's input for
    good. libzmq ends the PULL's session for good (a protocol error: no reconnect); playback
    notices it has had no connection for a second and dials again by hand."""
    pb = Playback(tmp_path)
    try:
        pb.wait_ready()
        mon = pb.sender.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            assert pb.sender.send_bytes(b"\x00" * (max_message_bytes(MAX_SAMPLES) + 1))
            assert mon.poll(20_000) and recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED
        finally:
            pb.sender.socket.disable_monitor()
            mon.close(0)

        def probe():  # junk until one is counted: playback hears its binder again
            pb.sender.send_bytes(b"\x93probe")
            return pb.heartbeat()["counters"].get("rejected", 0) >= 1
        # 5 s: 20 times the reconnect interval's cap (bus.reconnect_ivl_max_ms = 250).
        assert wait_until(probe, timeout=5, interval=0.1), pb.logs()
        assert pb.proc.poll() is None
    finally:
        pb.close()


# --------------------------------------------------------------------------- CURVE
@pytest.mark.parametrize("client", ["unknown-key", "plaintext"])
def test_with_curve_an_unauthenticated_sender_gets_nothing_processed(tmp_path, client):
    keys = tmp_path / "keys"
    made = subprocess.run([str(LLVC), "keys", "init", str(keys)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    sets = slack_sets("security.curve=true", f"security.keys_dir={keys}")
    server_key = load_keys(keys).server_public
    ctx = zmq.Context()
    pair = zmq.curve_keypair() if client == "unknown-key" else None
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    if pair is not None:
        sock.curve_publickey, sock.curve_secretkey = pair
        sock.curve_serverkey = server_key
    mon = sock.get_monitor_socket()
    # What would hijack the stream if it were processed: a new stream's head, its chunks, and
    # garbage that would be counted as rejected.
    msgs = [encode(AudioChunk("intruder", 0, 0, 0, np.zeros(HEAD, np.float32))),
            *flood("intruder", 1, 50), *garbage()]
    try:
        with RunningPipeline(tmp_path / "run", ["--passthrough", "--source", "tone", "--sink", "null"],
                             sets) as pipe:
            pipe.wait_streaming(1.0)
            real = heartbeat_field(pipe, "inference", "stream_id")
            before = pipe.observer.counters("inference")
            t_attack = time.monotonic_ns()
            sock.connect(endpoint(sets, "audio_in"))
            events = []
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:  # for 2 s: sends only queue, the handshake fails
                for m in msgs:
                    try:
                        sock.send(m, zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                while mon.poll(0):
                    events.append(recv_monitor_message(mon)["event"])
                time.sleep(0.05)
            # It did reach inference, and was refused at the handshake.
            assert set(events) & HANDSHAKE_FAILED and zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, events
            time.sleep(0.5)
            after = pipe.observer.counters("inference")
            beat_t = pipe.observer.select(Heartbeat, "inference")[-1][1].origin.t_mono_ns
            # The invariant "inference received no more chunks than capture sent": a capture
            # heartbeat made after that inference heartbeat.
            assert wait_until(lambda: pipe.observer.select(Heartbeat, "capture")[-1][1].origin.t_mono_ns > beat_t,
                              timeout=5)
            capture_sent = pipe.observer.counters("capture")["chunks_sent"]
            for key in ("rejected", "resets", "dropped_unknown_stream", "dropped_stale_stream"):
                assert after[key] == before[key], (key, before, after)
            assert before["chunks_in"] < after["chunks_in"] <= capture_sent
            assert heartbeat_field(pipe, "inference", "stream_id") == real
            assert pipe.observer.events("reset", "inference", since_ns=t_attack) == []
            assert len(pipe.observer.played(t_attack)) > 50  # the real stream goes on
    finally:
        sock.disable_monitor()
        mon.close(0)
        sock.close(0)
        ctx.term()
    no_traceback(pipe)
