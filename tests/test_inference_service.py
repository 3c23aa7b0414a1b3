"""The inference service over real ZeroMQ sockets: exactness, streams, gaps, backlog, bad input.

The service runs in a thread of this process (setup, then loop_once until stopped, with a
heartbeat every 0.2 s) between a test capture (PUSH to ``audio_in``) and a test playback (PULL
from ``audio_out``); the CLI tests run ``llvc inference`` as a subprocess.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import soundfile as sf
import torch
import zmq

from bus_helpers import endpoint_overrides, listen_before_sending, make_config, stop_process, wait_until
from common.bus import Bus
from common.protocol import AudioChunk, encode
from common.telemetry import Event, Heartbeat, InferenceChunk
from models.config import DEFAULT_CONFIG_PATH, load_config
from models.geometry import StreamGeometry
from models.passthrough import PassthroughEngine
from models.streaming import StreamingEngine
from services.inference import InferenceService

LLVC = Path(sys.executable).parent / "llvc"
REF = Path(__file__).parent / "data" / "llvc-reference"
NS_PER_SAMPLE = 62_500  # at 16 kHz
#: The fixture model's geometry at chunk factor 1 (these tests run it, and the passthrough of it).
GEOMETRY = StreamGeometry.of(load_config(REF / "config.json"))
HEAD, C = GEOMETRY.head_len, GEOMETRY.chunk_len
T0, W0 = 10**12, 1_700_000_000 * 10**9  # capture clocks at stream sample 0


def stream_chunks(signal: np.ndarray, chunk_len: int = C, stream_id: str = "s") -> list[AudioChunk]:
    """What capture sends for a finite source: the head, chunks on the shifted grid, 2 zero chunks."""
    n = len(signal)
    n_chunks = -(-(n - HEAD) // chunk_len) + 2
    padded = np.zeros(HEAD + n_chunks * chunk_len, np.float32)
    padded[:n] = signal
    bounds = [(0, HEAD)] + [(HEAD + k * chunk_len, HEAD + (k + 1) * chunk_len) for k in range(n_chunks)]
    return [AudioChunk(stream_id, seq, T0 + a * NS_PER_SAMPLE, W0 + a * NS_PER_SAMPLE, padded[a:b],
                       offset=a, source_end=n if b >= n else None) for seq, (a, b) in enumerate(bounds)]


def config(*extra: str):
    """Private endpoints, with queues deep enough for the bursts passthrough sends back to back.

    With ``send_hwm = 4`` a PUSH that sends 4 messages within microseconds can already refuse
    one (libzmq hands queue credit back in batches): a counted drop, right for the pipeline,
    noise for tests that check every sample.
    """
    return make_config("tcp", "bus.send_hwm=16", "bus.recv_hwm=16", *extra)


def place(outputs: list[AudioChunk]) -> np.ndarray:
    """The outputs laid out on the stream timeline by offset."""
    y = np.full(max(c.end for c in outputs), np.nan, np.float32)
    for c in outputs:
        y[c.offset:c.end] = c.samples
    return y


class Harness:
    """InferenceService in a thread, with a test capture, playback and telemetry tap around it."""

    def __init__(self, cfg, loop: bool = True, **flags):
        args = argparse.Namespace(**{"checkpoint": None, "config": None, "chunk_factor": None,
                                     "model_kind": None, "device": None, "threads": None, **flags})
        self._threads = torch.get_num_threads()
        self.svc = InferenceService(cfg, args)
        self.svc.setup()
        self.errors: list[BaseException] = []
        self.outputs: list[AudioChunk] = []
        self.telemetry: list = []
        self.closed = False
        self.capture, self.playback, self.tap = Bus(cfg, "capture"), Bus(cfg, "playback"), Bus(cfg, "tap")
        self.tx = self.capture.audio_sender("audio_in")
        self.rx = self.playback.audio_listener("audio_out", "")
        self.sub = self.tap.subscriber(endpoints=["telemetry_inference"])
        # The loop is not running yet, so beating from this thread is safe: once one arrives, the
        # tap is connected. Likewise inference's router is read here until it has our listener.
        assert wait_until(lambda: (self.svc.heartbeat(), self.heartbeats())[1], timeout=5)
        assert wait_until(lambda: (self.rx.listen(), self.svc.router.poll_listeners(),
                                   self.svc.router.listening(""))[2], timeout=5)
        self._thread = threading.Thread(target=self._run, daemon=True)
        if loop:
            self.start_loop()

    def start_loop(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        next_beat = 0.0
        while not self.svc.stop_requested:
            if time.monotonic() >= next_beat:
                self.svc.heartbeat()
                next_beat = time.monotonic() + 0.2
            try:
                self.svc.loop_once()
                self.svc.flush_reports()  # as run_service does after every turn
            except BaseException as exc:  # the service must never raise on input: record it
                self.errors.append(exc)
                return

    def close(self) -> None:
        self.svc.request_stop()
        if self._thread.is_alive():
            self._thread.join(5)
        self.svc.teardown()
        self.poll()
        self.closed = True  # what arrived stays readable after this
        for bus in (self.capture, self.playback, self.tap):
            bus.close()
        torch.set_num_threads(self._threads)  # the service sets it process-wide
        assert not self.errors, self.errors

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ io
    def send(self, c: AudioChunk) -> None:
        assert wait_until(lambda: self.tx.send(c), timeout=5, interval=0.002)

    def poll(self) -> bool:
        """Collect whatever output and telemetry has arrived; True (for wait_until chains)."""
        if self.closed:
            return True
        while (c := self.rx.recv(0)) is not None:
            self.outputs.append(c)
        while (t := self.sub.recv(0)) is not None:
            self.telemetry.append(t)
        return True

    def wait_outputs(self, n: int, timeout: float = 10.0) -> list[AudioChunk]:
        assert wait_until(lambda: self.poll() and len(self.outputs) >= n, timeout=timeout), \
            f"{len(self.outputs)} outputs, expected {n}"
        return self.outputs

    def feed_paced(self, chunks: list[AudioChunk]) -> None:
        """Send each chunk once the outputs it completes from the previous one have arrived."""
        for c in chunks:
            before = len(self.outputs)
            self.send(c)
            if c.offset > 0:  # the head completes nothing
                self.wait_outputs(before + c.n_samples // self.svc.engine.chunk_len)

    # ------------------------------------------------------------------ telemetry
    def of_type(self, kind: type) -> list:
        """Every telemetry record of ``kind`` (a common.telemetry class) received so far."""
        self.poll()
        return [t for t in self.telemetry if isinstance(t, kind)]

    def heartbeats(self) -> list[Heartbeat]:
        return self.of_type(Heartbeat)

    def events(self, name: str) -> list[Event]:
        return [e for e in self.of_type(Event) if e.name == name]

    def counters(self, **at_least) -> dict:
        """Counters from the newest heartbeat, waiting until they reach ``at_least``."""
        def seen() -> bool:
            beats = self.heartbeats()
            return bool(beats) and all(beats[-1].counters[k] >= v for k, v in at_least.items())
        assert wait_until(seen, timeout=5), self.heartbeats()[-1].counters
        return self.heartbeats()[-1].counters


# --------------------------------------------------------------------------- passthrough engine
def test_passthrough_engine_outputs_the_stream_delayed_like_the_real_one(ref_default):
    x = np.random.default_rng(1).standard_normal(HEAD + 10 * C).astype(np.float32)
    e = PassthroughEngine(StreamGeometry(C, HEAD, 2 * HEAD, 16000))
    e.prime(x[:HEAD])
    out = np.concatenate([e.process(x[HEAD + k * C:HEAD + (k + 1) * C]) for k in range(10)])
    assert np.array_equal(out, x[:10 * C]) and e.state_is_finite()
    e.reset()
    assert np.array_equal(e.process(x[HEAD:HEAD + C])[:HEAD], np.zeros(HEAD))  # never primed: silent head
    with pytest.raises(ValueError, match="exactly 208"):
        e.process(x[:100])
    for cf in (1, 2):
        real = StreamingEngine(ref_default.model, cf)
        fake = PassthroughEngine(StreamGeometry.of(ref_default.model.cfg, cf))
        assert fake.geometry == real.geometry  # the same numbers, derived in one place
        for attr in ("chunk_len", "head_len", "context_len", "chunk_s", "sample_rate", "chunk_factor"):
            assert getattr(fake, attr) == getattr(real, attr), attr


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("cf", [1, 2])
def test_outputs_reproduce_offline_conversion_with_source_timestamps(ref_default, cf):
    signal = sf.read(REF / "ref_default_input.wav", dtype="float32")[0]
    chunks = stream_chunks(signal, C * cf)
    cfg = config(f"model.chunk_factor={cf}")
    with Harness(cfg, checkpoint=str(REF / "ref_default.pth"), config=str(REF / "config.json")) as h:
        h.feed_paced(chunks)
        counters = h.counters(chunks_out=len(chunks) - 1)
        timings, beat = h.of_type(InferenceChunk), h.heartbeats()[-1]
    out = h.outputs
    assert [c.offset for c in out] == [k * C * cf for k in range(len(chunks) - 1)]
    assert [c.seq for c in out] == list(range(len(out)))
    n = len(signal)
    y = place(out)
    assert np.abs(y[:n - C] - ref_default.offline[:n - C]).max() < 1e-4
    for c in out:  # the capture time of the output's first source sample
        assert (c.t_capture_ns, c.t_wall_ns) == (T0 + c.offset * NS_PER_SAMPLE, W0 + c.offset * NS_PER_SAMPLE)
        assert c.sample_rate == 16000 and c.fmt == "f32le" and c.stream_id == "s"
        (stage,) = c.stages
        assert stage.name == "inference" and stage.model == ref_default.info.model_id
        assert stage.reset == (c.seq == 0) and stage.t_send_ns >= stage.t_recv_ns and stage.proc_ns > 0
    assert out[-1].source_end == n and out[0].source_end is None
    assert counters["dropped_inference_send"] == counters["resets"] - 1 == 0
    assert len(h.events("reset")) == 1 and h.events("reset")[0].reason == "new_stream"
    assert [t.offset for t in timings] == [c.offset for c in out] and [t.seq for t in timings] == [c.seq for c in out]
    assert timings[0].reset and not timings[1].reset and timings[5].rtf > 0 and timings[5].proc_ms > 0
    st = beat.status
    assert beat.ready and st.kind == "llvc" and st.untrained is False
    assert st.chunk_len == C * cf and st.chunk_ms == C * cf / 16 and st.stream_id == "s" and st.device == "cpu"
    assert st.latency_ms == pytest.approx((C * cf + 16) / 16) and st.threads == 1
    assert st.algorithmic_latency_ms == pytest.approx((C * cf + 32) / 16)


def test_passthrough_reframes_any_chunking_exactly():
    x = np.random.default_rng(2).uniform(-0.5, 0.5, 5000).astype(np.float32)
    sizes = [16, 100, 333, 208, 5, 1000, 208, 400]
    bounds = np.cumsum([0] + sizes * 3)
    bounds = bounds[bounds <= len(x)]
    chunks = [AudioChunk("p", i, T0 + int(a) * NS_PER_SAMPLE, W0, x[a:b], offset=int(a))
              for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    with Harness(config(), model_kind="passthrough") as h:
        for c in chunks:
            h.send(c)
            h.wait_outputs((c.end - HEAD) // C)
        assert h.heartbeats()[-1].status.model == "passthrough"
    y = place(h.outputs)
    assert [c.offset for c in h.outputs] == [k * C for k in range(len(h.outputs))]
    assert np.array_equal(y, x[:len(y)]) and len(y) > len(x) - C - HEAD
    assert all(c.t_capture_ns == T0 + c.offset * NS_PER_SAMPLE for c in h.outputs)


# --------------------------------------------------------------------------- streams and gaps
def test_new_stream_resets_and_the_replaced_stream_is_dropped():
    x = np.random.default_rng(3).uniform(-0.5, 0.5, 3000).astype(np.float32)
    a, b = stream_chunks(x, stream_id="a"), stream_chunks(x[::-1].copy(), stream_id="b")
    with Harness(config(), model_kind="passthrough") as h:
        h.feed_paced(a[:6])
        h.feed_paced(b[:4])
        for c in a[6:9]:  # the old capture is still sending: a flood from a replaced stream
            h.send(c)
        h.feed_paced(b[4:6])
        counters = h.counters(dropped_stale_stream=3, chunks_in=15)
        resets = h.events("reset")
    from_a = [c for c in h.outputs if c.stream_id == "a"]
    from_b = [c for c in h.outputs if c.stream_id == "b"]
    assert len(from_a) == 5 and [c.offset for c in from_b] == [k * C for k in range(5)]
    assert [c.seq for c in from_b] == list(range(5)) and from_b[0].stages[-1].reset
    assert np.array_equal(place(from_b), x[::-1][:5 * C])
    assert [(r.stream_id, r.reason, r.offset) for r in resets] == [("a", "new_stream", 0),
                                                                           ("b", "new_stream", 0)]
    assert counters["resets"] == 2 and counters["chunks_in"] == 15


def test_unknown_stream_mid_stream_takes_over_only_once_the_current_stream_falls_silent():
    rng = np.random.default_rng(9)
    a = stream_chunks(rng.uniform(-0.5, 0.5, HEAD + 12 * C).astype(np.float32), stream_id="a")
    u = stream_chunks(rng.uniform(-0.5, 0.5, HEAD + 40 * C).astype(np.float32), stream_id="u")
    with Harness(config(), model_kind="passthrough") as h:
        bound = h.svc.takeover_silence_ns
        assert bound == 250_000_000  # max(4 chunks of 13 ms, 250 ms) at chunk factor 1
        # No current stream: a stream joined late (its head never came) is taken at any offset.
        h.feed_paced(a[3:5])
        # While it is live, a stranger's valid chunks (mid-stream, never seen) are dropped. The
        # bound is raised for this part only, so that this test thread stalling on a busy
        # machine cannot make stream a look silent between two of its chunks.
        h.svc.takeover_silence_ns = 60 * 10**9
        for k in range(5, 10):
            for c in u[5:25]:
                h.send(c)
            h.feed_paced([a[k]])
        counters = h.counters(dropped_unknown_stream=100, chunks_in=107)
        assert counters["resets"] == 1 and counters["dropped_stale_stream"] == 0
        assert [c.stream_id for c in h.outputs] == ["a"] * 7
        assert [c.offset for c in h.outputs] == [a[3].offset - HEAD + k * C for k in range(7)]
        assert h.heartbeats()[-1].status.stream_id == "a"
        # Stream a falls silent for longer than the (real) bound: the stranger takes over mid-stream,
        # on the chunk grid with a silent head, and a's late chunks are now stale.
        h.svc.takeover_silence_ns = bound
        time.sleep(3 * bound / 1e9)
        h.feed_paced(u[30:33])
        h.send(a[10])
        h.feed_paced(u[33:34])
        counters = h.counters(dropped_stale_stream=1, chunks_out=11)
        resets = h.events("reset")
    from_u = [c for c in h.outputs if c.stream_id == "u"]
    assert [c.offset for c in from_u] == [u[30].offset - HEAD + k * C for k in range(4)]
    assert from_u[0].seq == 0 and from_u[0].stages[-1].reset
    assert [(r.stream_id, r.reason, r.offset) for r in resets] == [("a", "new_stream", a[3].offset),
                                                                           ("u", "new_stream", u[30].offset)]
    assert counters["dropped_unknown_stream"] == 100 and counters["resets"] == 2


def test_short_gap_is_zero_filled_and_long_gap_resets_on_the_grid():
    x = np.random.default_rng(4).uniform(-0.5, 0.5, HEAD + 40 * C).astype(np.float32)
    chunks = stream_chunks(x)  # chunks[k + 1] is chunk k, at offset 16 + 208k
    with Harness(config(), model_kind="passthrough") as h:
        h.feed_paced(chunks[:6])          # head, chunks 0-4
        h.send(chunks[7])                 # chunk 5 lost: 13 ms gap, zero-filled
        h.wait_outputs(7)
        h.feed_paced(chunks[8:10])        # chunks 7, 8
        assert [c.offset for c in h.outputs] == [k * C for k in range(9)]
        h.feed_paced(chunks[30:32])       # chunks 9-28 lost: 260 ms > max_gap_ms, reset
        counters = h.counters(chunks_out=11)
        resets = h.events("reset")
    y = place(h.outputs[:9])
    lost = slice(HEAD + 5 * C, HEAD + 6 * C)
    assert np.array_equal(y[lost], np.zeros(C)) and counters["zero_filled_samples"] == C
    y[lost] = x[lost]
    assert np.array_equal(y, x[:9 * C])
    new = chunks[30].offset
    assert [r.reason for r in resets] == ["new_stream", "gap"] and resets[1].offset == new
    first = h.outputs[9]
    assert first.offset == new - HEAD == 29 * C and first.stages[-1].reset
    assert np.array_equal(first.samples[:HEAD], np.zeros(HEAD))  # a silent head
    assert np.array_equal(first.samples[HEAD:], x[new:new + C - HEAD])
    assert first.t_capture_ns == T0 + first.offset * NS_PER_SAMPLE  # extrapolated back
    assert counters["resets"] == 2 and counters["dropped_duplicate"] == 0


def test_duplicates_are_dropped():
    chunks = stream_chunks(np.random.default_rng(5).uniform(-0.5, 0.5, 2000).astype(np.float32))
    with Harness(config(), model_kind="passthrough") as h:
        h.feed_paced(chunks[:4])
        h.send(chunks[2])                 # a replay
        h.feed_paced(chunks[4:6])
        counters = h.counters(dropped_duplicate=1)
    assert [c.offset for c in h.outputs] == [k * C for k in range(5)] and counters["resets"] == 1


def test_non_finite_output_resets_and_is_not_sent():
    x = np.random.default_rng(8).uniform(-0.5, 0.5, HEAD + 8 * C).astype(np.float32)
    chunks = stream_chunks(x)
    # Finite on the wire, but it overflows inside the model.
    huge = chunks[4].with_samples(np.full(C, 3e38, np.float32))
    with Harness(config(), checkpoint=str(REF / "ref_default.pth"), config=str(REF / "config.json")) as h:
        h.feed_paced(chunks[:4])
        h.send(huge)
        h.feed_paced(chunks[5:8])
        counters = h.counters(chunks_out=6, resets=2)
        resets = h.events("reset")
    assert [c.offset for c in h.outputs] == [k * C for k in (0, 1, 2, 4, 5, 6)]
    assert all(np.isfinite(c.samples).all() for c in h.outputs) and h.outputs[3].stages[-1].reset
    assert [(r.reason, r.offset) for r in resets] == [("new_stream", 0), ("non_finite", 3 * C)]
    assert counters["dropped_inference_send"] == 0


# --------------------------------------------------------------------------- backlog
def test_backlog_is_dropped_oldest_first_and_output_resumes_live():
    cfg = config("bus.send_hwm=64", "bus.recv_hwm=64")
    chunks = stream_chunks(np.random.default_rng(6).uniform(-0.5, 0.5, HEAD + 40 * C).astype(np.float32))
    with Harness(cfg, loop=False, model_kind="passthrough") as h:
        for c in chunks[:31]:             # the head and 30 chunks arrive before the loop runs
            h.send(c)
        time.sleep(0.3)
        h.start_loop()
        h.wait_outputs(1)
        time.sleep(0.3)
        counters = h.counters(dropped_inference_backlog=1)
        n_burst = len(h.outputs)
        h.feed_paced(chunks[31:34])      # live again: every chunk converted at once
        resets = h.events("reset")
    burst = h.outputs[:n_burst]
    # The newest chunk and the 3 before it (39 ms <= 40 ms behind it) are kept; the head and
    # the 26 oldest chunks are dropped.
    assert counters["dropped_inference_backlog"] == 27 and n_burst == 4
    assert [c.offset for c in burst] == [c.offset - HEAD for c in chunks[27:31]]
    assert burst[0].stages[-1].reset and not burst[1].stages[-1].reset
    assert [r.reason for r in resets] == ["new_stream", "backlog"]
    assert resets[1].offset == chunks[27].offset
    assert [c.offset for c in h.outputs[n_burst:]] == [c.offset - HEAD for c in chunks[31:34]]


# --------------------------------------------------------------------------- bad input
def test_malformed_input_is_rejected_and_the_service_keeps_converting():
    cfg = config()
    good = stream_chunks(np.random.default_rng(7).uniform(-0.5, 0.5, 1000).astype(np.float32))
    nan_message = msgpack.packb({
        "kind": "audio", "v": [1, 0], "stream_id": "s", "seq": 1, "t_capture_ns": 0, "t_wall_ns": 0,
        "sample_rate": 16000, "n_samples": C, "fmt": "f32le", "stages": [], "offset": HEAD,
        "payload": np.full(C, np.nan, "<f4").tobytes()}, use_bin_type=True)
    wrong_rate = encode(AudioChunk("s", 1, 0, 0, np.zeros(C, np.float32), sample_rate=22050, offset=HEAD))
    with Harness(cfg, model_kind="passthrough") as h:
        raw = h.capture.context.socket(zmq.PUSH)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(cfg.endpoint("audio_in").connect)
        try:
            raw.send(encode(good[0]))
            for bad in (os.urandom(300), wrong_rate, nan_message, b""):
                raw.send(bad)
            raw.send(encode(good[1]))
            h.wait_outputs(1)
            counters = h.counters(rejected=4)
            assert wait_until(lambda: h.events("reject"), timeout=5)
            h.feed_paced(good[2:4])
        finally:
            raw.close()
    assert counters["rejected"] == 4 and counters["chunks_in"] == 2
    reject = h.events("reject")[0]
    assert reject.reason and reject.count >= 1 and reject.total >= reject.count
    assert [c.offset for c in h.outputs] == [0, C, 2 * C]


# --------------------------------------------------------------------------- the command
def llvc_inference(cfg_overrides: list[str], *flags: str) -> subprocess.Popen:
    args = [str(LLVC), "inference", *[a for o in cfg_overrides for a in ("--set", o)], *flags]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LLVC_PIPELINE_CONFIG": ""})


def overrides() -> list[str]:
    return endpoint_overrides("tcp")


@pytest.mark.parametrize("flags, fragment", [
    (["-p", "/nonexistent/G_404.pth"], "/nonexistent/G_404.pth: no such checkpoint file"),
    (["-c", "/nonexistent/llvc.json"], "/nonexistent/llvc.json: no such config file"),
    (["--threads", "0"], "inference.threads: must be >= 1"),
    (["--set", "inference.bogus=1"], "inference.bogus: unknown key"),
])
def test_bad_setup_exits_2_with_one_line(flags, fragment):
    proc = llvc_inference(overrides(), *flags)
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], err
    assert "inference ERROR cannot start" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_device_exits_2():
    proc = llvc_inference(overrides(), "--device", "cuda", "--model-kind", "llvc")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no CUDA device" in err.strip().splitlines()[-1]


def serve_two_chunks(proc, ov: list[str], inspect=None) -> tuple[list[AudioChunk], str, float]:
    """Drive a running ``llvc inference`` (started with overrides ``ov``): once it is ready, send
    a head and two chunks of silence and take the two outputs; ``inspect()`` runs while it still
    serves. Then SIGTERM it. Returns the outputs, its stderr and how long it took to stop."""
    cfg = make_config("tcp", *ov)
    try:
        with Bus(cfg, "capture") as capture, Bus(cfg, "playback") as playback, Bus(cfg, "tap") as tap:
            tx, rx = capture.audio_sender("audio_in"), playback.audio_listener("audio_out", "")
            sub = tap.subscriber(("heartbeat.",), endpoints=["telemetry_inference"])
            assert wait_until(lambda: isinstance(hb := sub.recv(50), Heartbeat) and hb.ready, timeout=60)
            listen_before_sending(rx)
            sid = uuid.uuid4().hex
            for c in stream_chunks(np.zeros(2 * C, np.float32), stream_id=sid)[:3]:
                assert wait_until(lambda: tx.send(c), timeout=5)
            got = [rx.recv(5000) for _ in range(2)]
            assert [c.offset for c in got if c is not None] == [0, C] and got[0].stream_id == sid
            if inspect is not None:
                inspect()
    finally:
        err, elapsed = stop_process(proc)
    return got, err, elapsed


def test_command_converts_warns_when_untrained_and_stops_promptly_on_sigterm():
    ov = [*overrides(), f"model.config={DEFAULT_CONFIG_PATH}"]  # a config and no checkpoint: untrained
    proc = llvc_inference(ov, "-n", "1", "--threads", "1")
    got, err, elapsed = serve_two_chunks(proc, ov)
    assert got[0].stages[-1].model == "llvc-default-untrained-seed0"
    assert proc.returncode == 0 and elapsed < 3.0, (elapsed, err)
    assert "UNTRAINED" in err and " WARNING " in err and "inference INFO stopped" in err


# --------------------------------------------------------------------------- sessions
def test_a_session_beyond_max_streams_is_refused_until_a_silent_one_is_evicted():
    cfg = config("inference.max_streams=1", "inference.idle_s=0.5")
    x = np.random.default_rng(5).uniform(-0.5, 0.5, HEAD + 6 * C).astype(np.float32)
    with Harness(cfg, model_kind="passthrough") as h:
        for c in stream_chunks(x, stream_id="b-stream")[:3]:  # session "b" takes the one slot
            h.send(replace(c, session="b"))
        assert wait_until(lambda: [e.action for e in h.events("session")] == ["opened"], timeout=5)
        refused = stream_chunks(x, stream_id="mine")[0]  # ours (session ""): refused while "b" holds it
        h.send(refused)
        assert h.counters(dropped_refused_session=1)["sessions_opened"] == 1
        assert wait_until(lambda: any(e.action == "refused" for e in h.events("session")), timeout=5)
        ev = next(e for e in h.events("session") if e.action == "refused")
        assert (ev.session, ev.sessions, ev.max_streams) == ("", 1, 1) and "all 1 stream slots" in ev.reason
        # "b" falls silent: evicted after idle_s, and its slot is ours.
        assert wait_until(lambda: any(e.action == "evicted" for e in h.events("session")), timeout=5)
        assert next(e for e in h.events("session") if e.action == "evicted").session == "b"
        h.feed_paced(stream_chunks(x, stream_id="mine"))
        counters = h.counters(sessions_evicted=1, sessions_opened=2)
    assert counters["dropped_foreign_session"] == 0
    y = place([c for c in h.outputs if c.stream_id == "mine"])
    assert all(c.session == "" for c in h.outputs)  # nothing of "b" reached session ""'s listener
    assert np.array_equal(y[:len(x)], x)
