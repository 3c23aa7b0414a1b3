"""``llvc capture`` over real ZeroMQ sockets: the stream contract, pacing, readiness, drops, exits.

The service runs either as a real subprocess (``llvc capture --set ...``: exit codes, signals,
heartbeats) or in this test's thread, driven by calling ``loop_once`` (stalls can then be made
on purpose). Either way the test side plays inference and playback: it binds ``audio_in`` and
publishes ready heartbeats. The device data path is checked without a sound card by feeding
:class:`services.sources.DeviceInput` blocks the way PortAudio's callback would.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from bus_helpers import endpoint_overrides, wire
from common.bus import Bus
from common.config import PipelineConfigError, load_pipeline_config
from common.devices import DeviceError, find_device
from common.telemetry import Heartbeat
from models.geometry import StreamGeometry
from models.spec import ModelSpec
from services.capture import CaptureService, Framer
from services.sources import DeviceInput

LLVC = Path(sys.executable).parent / "llvc"
CLIP = Path(__file__).parent / "data" / "1919-142785-0000.wav"
#: The default model's geometry at chunk factor 1: what capture frames for.
_G = ModelSpec.resolve(None, None).geometry
HEAD, CHUNK, SR = _G.head_len, _G.chunk_len, _G.sample_rate
NS_PER_SAMPLE = 1_000_000_000 // SR


@pytest.fixture
def cut(tmp_path):
    """0.6 s of speech as a 16 kHz float WAV, and its samples."""
    x, sr = sf.read(CLIP, dtype="float32")
    assert sr == SR
    x = x[SR // 2: SR // 2 + 9600]
    path = tmp_path / "cut.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    return path, x


class Peers:
    """The test's inference + playback + monitor: audio_in PULL, ready heartbeats, a SUB on capture."""

    def __init__(self, *extra: str):
        # Quick reconnects: the SUB finds the subprocess's PUB within 100 ms of its bind.
        self.overrides = [*endpoint_overrides(), "bus.reconnect_ivl_max_ms=100", *extra]
        self.cfg = load_pipeline_config(env={}, overrides=self.overrides)
        self.inference = Bus(self.cfg, "inference")
        self.playback = Bus(self.cfg, "playback")
        self.monitor = Bus(self.cfg, "monitor")
        self.rx = None
        self.pubs = [self.inference.publisher(), self.playback.publisher()]
        self.sub = self.monitor.subscriber(["event.capture", "heartbeat.capture"], endpoints=["telemetry_capture"])
        self.chunks, self.events, self.beats, self.arrivals = [], [], [], []
        self._next_beat = 0.0

    def bind_audio(self) -> Peers:
        self.rx = self.inference.audio_receiver("audio_in")
        return self

    def collect(self, until, timeout: float, ready: bool = True, step=None) -> bool:
        """Receive until ``until(self)`` (or ``timeout`` s), publishing ready heartbeats and
        calling ``step`` (an in-thread service's ``loop_once``) each turn.

        With a subprocess, readiness is given only once its heartbeats arrive: then the SUB is
        connected and no event of the stream is missed.
        """
        deadline = time.monotonic() + timeout
        while not until(self):
            if time.monotonic() > deadline:
                return False
            if ready and (self.beats or step) and time.monotonic() >= self._next_beat:
                for pub in self.pubs:
                    pub.publish(Heartbeat(True, 0.0, {}))
                self._next_beat = time.monotonic() + 0.1
            if step is not None:
                step()
            while self.rx is not None and (c := self.rx.recv(0 if step else 5)) is not None:
                self.chunks.append(c)
                self.arrivals.append(time.monotonic())
            while (m := self.sub.recv(0)) is not None:
                (self.beats if isinstance(m, Heartbeat) else self.events).append(m)
        return True

    def event(self, name: str):
        return next((wire(m) for m in self.events if m.name == name), None)

    def close(self) -> None:
        for bus in (self.inference, self.playback, self.monitor):
            bus.close()

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spawn(peers: Peers, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLVC")}
    sets = [a for o in peers.overrides for a in ("--set", o)]
    return subprocess.Popen([str(LLVC), "capture", *sets, *args], stderr=subprocess.PIPE, text=True, env=env)


def stop(proc: subprocess.Popen) -> tuple[int, str, float]:
    """SIGTERM; (exit status, stderr, seconds it took to exit)."""
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    return proc.returncode, err, time.monotonic() - t


def in_thread(peers: Peers) -> CaptureService:
    service = CaptureService(peers.cfg)
    service.setup()
    return service


def run_in_thread(peers: Peers, until) -> CaptureService:
    """Drive a CaptureService in this thread until ``until(peers)``, then tear it down."""
    service = in_thread(peers)
    try:
        assert peers.collect(until, 10, step=service.loop_once)
    finally:
        service.teardown()
    return service


def n_samples(p: Peers) -> int:
    return sum(c.n_samples for c in p.chunks)


def check_grid(chunks, head: int = HEAD, size: int = CHUNK) -> None:
    """Head at offset 0, then ``size`` samples at ``head + k*size``, seq on the grid, one stream."""
    assert (chunks[0].offset, chunks[0].n_samples, chunks[0].seq) == (0, head, 0)
    for k, c in enumerate(chunks[1:]):
        assert (c.offset, c.n_samples, c.seq) == (head + k * size, size, k + 1)
    assert len({c.stream_id for c in chunks}) == 1


# --------------------------------------------------------------------------- file source
def test_file_source_follows_the_contract_in_real_time(cut):
    path, x = cut
    with Peers().bind_audio() as p:
        proc = spawn(p, "--source", f"file:{path}")
        try:
            assert p.collect(lambda p: p.event("eof") and p.beats and p.beats[-1].status.state == "ended", 10)
        finally:
            rc, err, _ = stop(proc)
    assert rc == 0, err
    chunks = p.chunks
    check_grid(chunks)
    audio = np.concatenate([c.samples for c in chunks])
    last = 1 + (len(x) - HEAD - 1) // CHUNK  # index of the message holding the last sample
    assert len(chunks) == last + 3 and len(audio) == chunks[-1].end
    assert np.array_equal(audio[:len(x)], x) and not audio[len(x):].any()
    assert [c.source_end for c in chunks] == [None] * last + [len(x)] * 3
    assert p.event("eof") == {"event": "eof", "stream_id": chunks[0].stream_id, "source_end": len(x)}
    start = p.event("stream_start")
    assert start == {"event": "stream_start", "stream_id": chunks[0].stream_id, "offset": 0,
                     "source": f"file:{path}", "chunk_len": CHUNK, "head_len": HEAD, "sample_rate": SR}
    # Stamps on the paced schedule: exactly one sample's ns per sample (integer ns).
    for a, b in zip(chunks, chunks[1:]):
        assert abs((b.t_capture_ns - a.t_capture_ns) - (b.offset - a.offset) * NS_PER_SAMPLE) <= 1
    assert len({c.t_wall_ns - c.t_capture_ns for c in chunks}) == 1  # the same instants, on the wall clock
    # Real time: the whole stream took about its own duration to arrive, not a burst.
    span = (chunks[-1].end - chunks[0].end) / SR
    assert 0.8 * span <= p.arrivals[-1] - p.arrivals[0] <= span + 1.0
    beat = p.beats[-1]
    assert beat.ready is True and beat.counters["chunks_sent"] == len(chunks)
    assert beat.status.stream_id == chunks[0].stream_id and beat.status.offset == chunks[-1].end


def test_chunk_factor_2_gives_416_sample_chunks(cut):
    path, x = cut
    with Peers("model.chunk_factor=2", f"capture.source=file:{path}").bind_audio() as p:
        run_in_thread(p, lambda p: n_samples(p) >= len(x) + 2 * 416)
    check_grid(p.chunks, size=416)
    assert np.array_equal(np.concatenate([c.samples for c in p.chunks])[:len(x)], x)


def test_loop_continues_the_same_stream(tmp_path):
    x = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)  # shorter than 5 chunks: wraps mid-chunk
    sf.write(tmp_path / "short.wav", x, SR, subtype="FLOAT")
    with Peers(f"capture.source=file:{tmp_path / 'short.wav'}", "capture.loop=true").bind_audio() as p:
        service = run_in_thread(p, lambda p: n_samples(p) >= 3500)
    check_grid(p.chunks)
    audio = np.concatenate([c.samples for c in p.chunks])
    assert np.array_equal(audio, np.resize(x, len(audio)))
    assert all(c.source_end is None for c in p.chunks) and service.state == "streaming"


# --------------------------------------------------------------------------- test signals
def test_tone_has_the_set_frequency_and_level():
    with Peers("capture.tone_hz=1000", "capture.level=0.25").bind_audio() as p:
        run_in_thread(p, lambda p: n_samples(p) >= 8000)
    check_grid(p.chunks)
    audio = np.concatenate([c.samples for c in p.chunks])[:8000]
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    assert np.argmax(spectrum) * SR / len(audio) == pytest.approx(1000, abs=2)
    assert np.max(np.abs(audio)) == pytest.approx(0.25, rel=1e-3)


def test_clicks_every_250_ms():
    with Peers("capture.source=clicks", "capture.level=0.5").bind_audio() as p:
        run_in_thread(p, lambda p: n_samples(p) >= 9000)
    audio = np.concatenate([c.samples for c in p.chunks])[:9000]
    onsets = np.flatnonzero(np.diff(np.concatenate([[0.0], np.abs(audio)])) > 0)
    assert list(onsets) == [0, 4000, 8000]
    assert np.count_nonzero(audio) == 3 * 16 and audio.max() == 0.5 and audio.min() == -0.5


# --------------------------------------------------------------------------- pacing
def test_a_late_loop_catches_up_and_a_stall_over_1s_re_anchors():
    with Peers("capture.source=silence", "bus.send_hwm=1000", "bus.recv_hwm=1000").bind_audio() as p:
        service = in_thread(p)
        try:
            assert p.collect(lambda p: len(p.chunks) >= 5, 10, step=service.loop_once)
            time.sleep(0.3)  # late by ~23 chunks: all of them are sent at once, on the old schedule
            service.loop_once()
            assert service.counters.get("schedule_slips", 0) == 0
            before = len(p.chunks)
            time.sleep(1.3)  # late by more than 1 s: re-anchored
            service.loop_once()
            assert p.collect(lambda p: len(p.chunks) >= before + 20, 10, step=service.loop_once)
        finally:
            service.teardown()
    assert service.counters["schedule_slips"] == 1
    check_grid(p.chunks)  # nothing skipped either way
    steps = [b.t_capture_ns - a.t_capture_ns for a, b in zip(p.chunks, p.chunks[1:])]
    jumps = [s for s in steps[1:] if s != CHUNK * NS_PER_SAMPLE]
    assert len(jumps) == 1 and jumps[0] > 1_000_000_000  # the re-anchor, and only there


# --------------------------------------------------------------------------- readiness, drops
def test_without_ready_peers_it_starts_after_wait_ready_s():
    with Peers("capture.wait_ready_s=1.5", "bus.heartbeat_interval_s=0.2").bind_audio() as p:
        proc = spawn(p)
        try:
            assert p.collect(lambda p: p.chunks and any(b.ready for b in p.beats), 10, ready=False)
        finally:
            rc, err, _ = stop(proc)
    assert any(b.status.state == "waiting" and b.ready is False for b in p.beats)
    beat = p.beats[0]
    started_ns = beat.origin.t_mono_ns - beat.uptime_s * 1e9
    assert 1.2 <= (p.chunks[0].t_capture_ns - started_ns) / 1e9 <= 3.5
    assert p.chunks[0].offset == 0  # audio_in was connected all along: the head got through
    assert "starting anyway" in err and "not_ready=inference,playback" in err and rc == 0


def test_drops_are_counted_while_nobody_receives_and_the_stream_goes_on():
    with Peers("capture.wait_ready_s=0") as p:
        proc = spawn(p)
        try:
            assert p.collect(lambda p: any(b.counters.get("dropped_capture_send", 0) > 5 for b in p.beats),
                             10, ready=False)
            p.bind_audio()
            assert p.collect(lambda p: len(p.chunks) >= 3, 10, ready=False)
        finally:
            stop(proc)
    beat = next(b for b in p.beats if b.counters.get("dropped_capture_send", 0) > 5)
    assert beat.counters.get("chunks_sent", 0) == 0 and beat.status.offset > 5 * CHUNK
    first = p.chunks[0]
    assert first.offset > beat.status.offset and first.seq == 1 + (first.offset - HEAD) // CHUNK
    assert all(b.offset == a.end and b.seq == a.seq + 1 for a, b in zip(p.chunks, p.chunks[1:]))


# --------------------------------------------------------------------------- process lifetime
def test_sigterm_stops_promptly_and_a_restart_is_a_new_stream():
    ids = []
    with Peers().bind_audio() as p:
        for _ in range(2):
            p.chunks.clear()
            proc = spawn(p)
            try:
                assert p.collect(lambda p: len(p.chunks) >= 3, 10)
            finally:
                rc, err, took = stop(proc)
            assert rc == 0 and took < 3.0, err
            assert p.chunks[0].offset == 0 and p.chunks[0].seq == 0
            ids.append(p.chunks[0].stream_id)
    assert ids[0] != ids[1] and len(ids[0]) == 32


@pytest.mark.parametrize("source, fragments", [
    ("file:{tmp}/missing.wav", ["missing.wav", "no such file"]),
    ("device:no-such-device-xyz", ["no-such-device-xyz", "input devices:"]),
])
def test_unusable_source_exits_2_with_one_line(tmp_path, source, fragments):
    with Peers() as p:
        proc = spawn(p, "--source", source.format(tmp=tmp_path))
        _, err = proc.communicate(timeout=20)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err
    assert "capture ERROR cannot start" in lines[0] and all(f in lines[0] for f in fragments)


@pytest.mark.parametrize("override", ["capture.source=tone:5", "capture.level=1.5", "capture.queue_chunks=0",
                                      "capture.device_latency=soon", "capture.wait_ready_s=-1", "capture.bogus=1"])
def test_bad_settings_are_refused(override):
    cfg = load_pipeline_config(env={}, overrides=[override])
    with pytest.raises(PipelineConfigError, match=override.split("=")[0].replace(".", r"\.")):
        CaptureService(cfg).setup()


# --------------------------------------------------------------------------- device path
class FakeCard:
    """Feeds :class:`DeviceInput` what PortAudio would: stereo blocks of a sine, with ADC times."""

    HZ, T0_NS, STREAM_T0 = 500.0, 7_000_000_000, 100.0

    def __init__(self, rate: int, queue_blocks: int = 4, jitter_s: float = 0.0):
        self.rate, self.block, self.jitter_s = rate, rate // 100, jitter_s
        self.sent = []
        framer = Framer(StreamGeometry(CHUNK, HEAD, 2 * HEAD, SR), lambda c: self.sent.append(c) or True,
                        lambda *a: None)
        self.dev = DeviceInput(framer, rate, queue_blocks)
        self.dev.sync(stream_time=self.STREAM_T0, mono_ns=self.T0_NS)
        self.rng = np.random.default_rng(0)

    def signal(self, frames: np.ndarray) -> np.ndarray:
        """The card's input at these frame indices (from the stream's start)."""
        return np.sin(2 * np.pi * self.HZ * frames / self.rate)

    def feed(self, k: int, pump: bool = True) -> None:
        frames = k * self.block + np.arange(self.block)
        t = frames / self.rate
        x = self.signal(frames).astype(np.float32)
        adc = self.STREAM_T0 + t[0] + self.rng.uniform(-self.jitter_s, self.jitter_s)
        self.dev.callback(np.stack([x, x], axis=1), self.block, SimpleNamespace(inputBufferAdcTime=adc),
                          SimpleNamespace(input_overflow=False))
        while pump and self.dev.pump(0):
            pass

    def stamp_errors_ns(self, chunks) -> np.ndarray:
        """Each chunk's stamp minus its first sample's true capture time."""
        return np.array([c.t_capture_ns - (self.T0_NS + c.offset * NS_PER_SAMPLE) for c in chunks])


@pytest.mark.parametrize("rate", [48000, 44100])
def test_device_blocks_become_16k_chunks_on_the_adc_timeline(rate):
    """Stereo blocks through the callback → mono 16 kHz chunks stamped with their ADC time;
    a full queue drops blocks (counted) and downstream sees a gap, with the timeline intact."""
    card = FakeCard(rate)
    for k in range(40):
        card.feed(k)
    check_grid(card.sent)
    assert np.abs(card.stamp_errors_ns(card.sent)).max() < 1000
    # The sender stalls: 4 blocks fit in the queue, the next 6 are dropped and counted.
    for k in range(40, 50):
        card.feed(k, pump=False)
    assert card.dev.overflows == 6
    for k in range(50, 80):
        card.feed(k)
    offsets = [c.offset for c in card.sent]
    assert any(b - a > CHUNK for a, b in zip(offsets, offsets[1:]))  # downstream sees the gap
    assert all((o - HEAD) % CHUNK == 0 for o in offsets[1:])  # still on the grid
    assert np.abs(card.stamp_errors_ns(card.sent)).max() < 100_000
    # Every sample sits at its capture time's place on the timeline: the sine there, resampled.
    # Around the gap: the dropped blocks, and the resampler's buffered tail (its delay).
    gap = (44 * SR // 100 - 700, 50 * SR // 100 + 200)
    for c in card.sent:
        i = c.offset + np.arange(c.n_samples)
        keep = (i >= 100) & ((i < gap[0]) | (i >= gap[1]))
        expect = np.sin(2 * np.pi * FakeCard.HZ * i / SR)
        assert np.abs(c.samples[keep] - expect[keep]).max(initial=0) < 2e-3


def test_device_adc_time_jitter_is_smoothed():
    card = FakeCard(48000, queue_blocks=8, jitter_s=0.002)  # +-2 ms per block, as PulseAudio gives
    for k in range(300):
        card.feed(k)
    settled = [c for c in card.sent if c.offset >= SR]  # after the first second
    assert np.abs(card.stamp_errors_ns(settled)).max() < 500_000


def test_one_device_rule_for_inputs_and_outputs():
    """common.devices.find_device: capture's device:SPEC and playback's alike."""
    devices = [{"name": "HDA Intel: ALC (hw:0,0)", "max_input_channels": 2, "max_output_channels": 2,
                "default_samplerate": 44100.0},
               {"name": "Speakers", "max_input_channels": 0, "max_output_channels": 2, "default_samplerate": 48000.0},
               {"name": "pulse", "max_input_channels": 32, "max_output_channels": 32, "default_samplerate": 44100.0},
               {"name": "USB Mic", "max_input_channels": 1, "max_output_channels": 0, "default_samplerate": 48000.0},
               {"name": "USB Mic 2", "max_input_channels": 1, "max_output_channels": 0, "default_samplerate": 48000.0}]
    assert find_device("2", devices)[0] == 2
    assert find_device("usb mic", devices)[0] == 3  # an exact name beats the substring it also is
    assert find_device("PULSE", devices)[0] == 2
    assert find_device("", devices, default=3)[0] == 3 and find_device("default", devices, default=2)[0] == 2
    assert find_device("speak", devices, direction="output")[0] == 1
    listing = r"no input device matches '1' \(input devices: 0: HDA.*; 2: pulse.*; 3: USB Mic.*; 4: USB Mic 2"
    with pytest.raises(DeviceError, match=listing):
        find_device("1", devices)  # an output-only device is not an input
    with pytest.raises(DeviceError, match="Speakers"):
        find_device("Speakers", devices)
    with pytest.raises(DeviceError, match=r"'usb' matches several input devices"):
        find_device("usb", devices)  # ambiguous: said, not guessed
    with pytest.raises(DeviceError, match=r"no output device matches 'USB Mic' \(output devices: 0: HDA"):
        find_device("USB Mic", devices, direction="output")
    with pytest.raises(DeviceError, match="PortAudio lists no input devices"):
        find_device("x", [])


def test_default_input_device_streams_on_the_grid(pulse, monkeypatch):
    """On PulseAudio's ``default`` device (the ``pulse`` fixture: null sinks, tests/pulse.py)."""
    for k, v in pulse.env.items():
        monkeypatch.setenv(k, v)  # spawn() passes os.environ on
    with Peers("capture.wait_ready_s=0").bind_audio() as p:
        proc = spawn(p, "--source", "device:")
        try:
            assert p.collect(lambda p: len(p.chunks) >= 40 and p.beats, 15, ready=False)
        finally:
            rc, err, took = stop(proc)
    assert rc == 0 and took < 3.0, err
    sid = p.beats[-1].status.stream_id
    chunks = [c for c in p.chunks if c.stream_id == sid]
    assert all(b.offset == a.end and b.seq == a.seq + 1 for a, b in zip(chunks, chunks[1:]))
    assert all(c.n_samples == CHUNK and (c.offset - HEAD) % CHUNK == 0 for c in chunks[1:])
    beat = p.beats[-1]
    assert beat.status.device and beat.status.device_rate > 0 and beat.ready is True
    # Stamped at capture: before arrival, by less than the audio path can plausibly take.
    lag_ms = [(t * 1e9 - c.t_capture_ns) / 1e6 for t, c in zip(p.arrivals, p.chunks) if c.stream_id == sid]
    assert 0 < min(lag_ms) and max(lag_ms) < 500
