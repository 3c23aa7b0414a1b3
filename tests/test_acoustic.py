"""Mouth-to-ear latency through real devices, measured acoustically, against the monitor's figure.

Two PulseAudio null sinks (``services/lab/pulse.py``): the test plays probe bursts and a speech clip
into ``llvc_in``; the pipeline captures ``llvc_in.monitor`` and plays into ``llvc_out``; two
recorder processes record both monitors on ``CLOCK_MONOTONIC`` (``services/lab/acoustic.py`` says how
and why their own latency cancels). Real server, real PortAudio devices, real services under
``llvc run``.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import soxr

from common.audio import read_audio
from models.spec import ModelSpec
from services.lab.acoustic import RATE, Recorder, Recording, burst_train, clip_match, measure, play
from services.lab.endpoints import private_sets
from services.lab.harness import RunningPipeline

DATA = Path(__file__).resolve().parent / "data"
REF = DATA / "llvc-reference"
SPEECH = DATA / "174-50561-0000.wav"
#: One chunk of the fixture model at chunk factor 1 (its geometry, derived where every geometry is).
CHUNK_MS = ModelSpec.resolve(REF / "ref_default.pth", REF / "config.json").geometry.chunk_ms
BURSTS = 20
#: The monitor's e2e median and the acoustic one may differ by at most this (the issue's bar).
AGREE_MS = 3.0


#: PortAudio output latency for the sink. With "low" (8.6 ms through the ALSA pulse plugin) a
#: loaded 2-core machine sometimes falls into ALSA underrun after underrun, each of which drains
#: the playout ahead of the audio; 20 ms keeps these tests about the pipeline, not about that.
SINK_LATENCY = "playback.device_latency=0.02"


def device_sets(*extra: str) -> list[str]:
    return private_sets(SINK_LATENCY, *extra)


def device_env(pulse) -> dict[str, str]:
    """Capture reads ``llvc_in.monitor`` and playback plays into ``llvc_out`` (their defaults)."""
    return {**pulse.env, "PULSE_SOURCE": "llvc_in.monitor", "PULSE_SINK": "llvc_out"}


def speech_48k(seconds: float) -> np.ndarray:
    x = read_audio(SPEECH, 16000)[: int(seconds * 16000)]
    return (0.5 * soxr.resample(x, 16000, RATE, quality="VHQ") / max(1e-6, float(np.abs(x).max()))).astype(np.float32)


def wait_steady(p, quiet_s: float = 1.5, timeout: float = 30.0) -> None:
    """Until playback has reported no drop and no underrun for ``quiet_s`` (a device stream's
    start can take PulseAudio a few seconds to settle)."""
    def bad() -> tuple:
        c = p.observer.counters("playback")
        return c.get("dropped_late"), c.get("underruns")
    end = time.monotonic() + timeout
    last, since = bad(), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.1)
        now = bad()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
    raise AssertionError(f"playback never ran {quiet_s} s without drops or underruns: {last}")


def run_with_probe(pulse, tmp_path: Path, args: list[str], probe: np.ndarray, settle_s: float = 2.0):
    """Record both monitors while the pipeline runs and ``probe`` plays into ``llvc_in``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rec_a = Recorder("llvc_in.monitor", tmp_path / "a.npz", pulse.env)
    rec_b = Recorder("llvc_out.monitor", tmp_path / "b.npz", pulse.env)
    try:
        rec_a.wait_ready()
        rec_b.wait_ready()
        # No dashboard: these runs time the device path to a few ms on 2 cores, and a fifth
        # process starting beside it moved the monitor's figure off the acoustic one by 3.2 ms in
        # one full-suite run (the dashboard's own cost: scripts/bench_dashboard.py).
        with RunningPipeline(tmp_path / "run", ["--source", "device:", "--sink", "device:", "--no-dashboard", *args],
                             device_sets(), env=device_env(pulse)) as p:
            p.wait_streaming(settle_s)
            wait_steady(p)
            counters_before = p.observer.counters("playback")
            player = play("llvc_in", probe, pulse.env, tmp_path)
            assert player.wait(timeout=len(probe) / RATE + 20) == 0, player.stderr.read()
            time.sleep(0.5)
            counters_after = p.observer.counters("playback")
            played = p.observer.played()
            report = p.stop()
    finally:
        a, b = rec_a.stop(), rec_b.stop()
    assert report is not None, p.text()[-3000:]
    return a, b, report, counters_before, counters_after, played


def monitor_e2e_ms(played, t_from_ns: float, t_to_ns: float) -> float:
    """Median e2e the monitor's bus reported for chunks captured in ``[t_from, t_to]``."""
    e2e = [c.e2e_ms for c in played if t_from_ns <= c.t_capture_ns <= t_to_ns]
    assert e2e, "no chunk was reported played for that period"
    return float(np.median(e2e))


def test_a_recording_times_each_sample_by_the_blocks_around_it():
    """The recorder's sample count and its ADC times drift apart under load, and may step: a
    position's time follows the blocks near it, not one origin for the whole recording."""
    rng = np.random.default_rng(7)
    starts = np.arange(2000) * 480  # 10 ms blocks, 20 s
    drift_ns = starts * 1e9 / RATE * 800e-6 + np.where(starts >= 1000 * 480, 5e6, 0.0)  # 800 ppm, +5 ms step
    true_ns = 1e12 + starts * 1e9 / RATE + drift_ns
    rec = Recording(np.zeros(2000 * 480, np.float32), starts, true_ns + rng.normal(0, 1e6, len(starts)))
    for block in (100, 600, 1500, 1990):
        pos = starts[block] + 123.5
        expected = true_ns[block] + 123.5 * 1e9 / RATE
        assert abs(rec.time_ns(pos) - expected) < 0.3e6, (block, rec.time_ns(pos) - expected)
        assert abs(rec.position(expected) - pos) <= 16, (block, rec.position(expected), pos)


#: Runs to try before the monitor and the acoustic figure are called different (or the speech
#: clip's passage spoilt: underruns on a loaded machine cut it, 0.933 against 0.95 once). Both read
#: PulseAudio's clocks, and a loaded 2-core machine sometimes moves PulseAudio's latency mid-run:
#: one CI run saw bursts at 55.1 and then 59.7 ms while the monitor said 69.0 ms, and with two CPU
#: burners beside the test they differ by 10-30 ms either way. A defect of the monitor's
#: accounting shows in every run; a disturbed run is not repeated by the next.
ATTEMPTS = 3


def test_passthrough_is_heard_as_played_and_the_monitor_e2e_is_the_acoustic_latency(pulse, tmp_path):
    speech = speech_48k(3.0)
    probe = np.concatenate([burst_train(BURSTS), np.zeros(RATE // 2, np.float32), speech])
    seen = []
    for attempt in range(ATTEMPTS):
        a, b, _, _, _, played = run_with_probe(pulse, tmp_path / str(attempt), ["--passthrough"], probe)
        m = measure(a, b)
        assert len(m.latencies_ms) >= BURSTS - 2 and m.missed <= 2, m
        assert m.correlation >= 0.95, m
        acoustic = m.median_ms
        # The monitor's figure for the same audio: chunks captured while the bursts went in.
        monitor = monitor_e2e_ms(played, min(m.times_ns), max(m.times_ns))
        # The speech clip, aligned by the measured latency, comes out as it went in.
        match = clip_match(a, b, speech, acoustic)
        print(f"\nattempt {attempt + 1}: e2e median: monitor {monitor:.2f} ms, acoustic {acoustic:.2f} ms "
              f"(bursts {len(m.latencies_ms)}, {min(m.latencies_ms):.2f}-{max(m.latencies_ms):.2f} ms); "
              f"speech clip match {match:.3f}")
        seen.append((round(monitor, 2), round(acoustic, 2), round(match, 3)))
        if abs(monitor - acoustic) <= AGREE_MS and match >= 0.95:
            break
    else:
        raise AssertionError(f"in all {ATTEMPTS} runs the monitor's e2e median and the acoustic one differ by more "
                             f"than {AGREE_MS} ms or the speech clip matched below 0.95 "
                             f"(monitor, acoustic, match): {seen}")


def test_llvc_model_runs_on_devices_without_underruns_at_steady_state(pulse, tmp_path, ref_default_artifact):
    """The fixture checkpoint on the default CPU backend (ONNX Runtime, as backend auto picks
    once the artifact exists)."""
    probe = np.concatenate([speech_48k(4.0), np.zeros(RATE, np.float32), speech_48k(4.0)])
    # A 20 ms playout margin instead of 6: on a loaded 2-core CI machine, with PulseAudio, two
    # recorders and a player beside the four services, a chunk now and then arrives 6-10 ms
    # late (1 in ~700 with 10 ms here). The latency figures are the benchmark's business.
    args = ["-p", str(REF / "ref_default.pth"), "-c", str(REF / "config.json"), "--set", "playback.target_ms=20",
            "--set", f"inference.artifact={ref_default_artifact}"]
    _, _, report, before, after, played = run_with_probe(pulse, tmp_path, args, probe, settle_s=3.0)
    # Steady state: from 3 s after audio started flowing to the end of the probe. A rate with a
    # margin, not zero: one underrun in the ~700 chunks of the probe is a busy machine's doing
    # (seen once in a full suite run), 16 in 720 in a slow one: 3 % is the bar; the figures
    # themselves are scripts/bench_acoustic.py's.
    underruns = after["underruns"] - before["underruns"]
    chunks = after["chunks_played"] - before["chunks_played"]
    print(f"\nsteady state: {underruns} underruns in {chunks} chunks played")
    assert chunks > 0.5 * len(probe) / RATE * 1000 / CHUNK_MS, (before, after)  # audio kept playing
    assert underruns <= 0.03 * chunks, (before, after)
    e2e = report["e2e_latency_ms"]
    assert e2e["p50"] is not None and 14.0 < e2e["p50"] < 200.0, e2e
    assert report["model"]["kind"] == "llvc" and report["chunks"] > 0
    assert report["model"]["backend"] == "onnx", report["model"]
