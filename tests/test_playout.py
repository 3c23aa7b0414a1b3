"""Adaptive playout (issue 19): the jitter buffer's margin follows the arrivals.

Pure logic like tests/test_jitter.py: simulated arrivals and sink ticks, no sockets, no clocks.
Each test asserts a mechanism (grow at once, shrink slowly, the bounds, a cut that is not heard),
never a latency a machine happened to reach.
"""
from __future__ import annotations

import numpy as np
import pytest

from services.jitter import JitterBuffer
from services.playout import SAFETY_MS, SHRINK_EVERY, SHRINK_STEP_MS, AdaptivePlayout
from test_jitter import BLOCK, MS, NS, C, put_chunk, simulate

SR = 16000


def adaptive_buffer(target_ms=6.0, floor_ms=1.0, ceiling_ms=30.0, window_s=2.0) -> JitterBuffer:
    return JitterBuffer(target_ms, 60.0, 2.0, adaptive=AdaptivePlayout(floor_ms, ceiling_ms, window_s))


def tone(n: int, hz: float = 220.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(n) / SR)).astype(np.float32)


def run(jb, sig, delays_ms, n_chunks):
    """Chunk k arrives at its real-time place plus ``delays_ms[k]``; returns (out, e2e per chunk
    played in ms keyed by seq, results)."""
    puts = [(k * C * NS + int(delays_ms[k] * MS),
             lambda k=k: put_chunk(jb, sig, k, k * C * NS + int(delays_ms[k] * MS), capture_lead_ns=0))
            for k in range(n_chunks)]
    out, results = simulate(jb, puts, (n_chunks * C) // BLOCK)
    e2e = {s.seq: (t + s.index * NS - s.t_capture_ns) / MS for t, r in results for s in r.starts}
    return out, e2e, results


def test_a_late_chunk_grows_the_timeline_at_once_and_the_next_as_late_one_makes_it():
    jb = adaptive_buffer(target_ms=3.0)
    n = 300
    delays = np.full(n, 1.0)
    delays[100] = delays[101] = 9.0  # two chunks in a row 8 ms later than the rest
    sig = tone(n * C)
    _, e2e, _ = run(jb, sig, delays, n)
    print("e2e around the late chunk:", [round(e2e.get(k, -1), 2) for k in range(98, 104)], jb.stats)
    assert jb.stats.timeline_grows == 1                 # grew on the first late chunk ...
    assert jb.stats.dropped_late == 1                   # ... so the second, as late, was on time
    assert 101 in e2e and 100 not in e2e
    grown_ms = jb.stats.grown_samples * 1000 / SR
    assert 8.0 - 3.0 <= grown_ms <= 8.0 + SAFETY_MS + 1.0, grown_ms
    assert e2e[101] > e2e[99] + 4.0


def test_the_margin_shrinks_slowly_to_what_the_arrivals_need_and_no_lower():
    jb = adaptive_buffer(target_ms=12.0, window_s=1.0)
    n = 1200  # 15.6 s
    rng = np.random.default_rng(0)
    delays = 1.0 + rng.uniform(0, 2.0, n)  # 2 ms of jitter
    _, e2e, _ = run(jb, tone(n * C), delays, n)
    seqs = sorted(e2e)
    first, last = e2e[seqs[5]], e2e[seqs[-1]]
    print(f"e2e {first:.2f} -> {last:.2f} ms, margin {jb.target_ms:.2f} ms, {jb.stats}")
    assert jb.stats.underruns == 0 and jb.stats.dropped_late == 0
    assert jb.stats.timeline_shrinks >= 20
    # Slowly: never more than one step per SHRINK_EVERY arrivals.
    assert jb.stats.shrunk_samples <= jb.stats.timeline_shrinks * round(SHRINK_STEP_MS * SR / 1000)
    assert jb.stats.timeline_shrinks <= n // SHRINK_EVERY
    # Down to the latest arrival plus the safety and a block, from 12 ms of margin at the start.
    assert last < first - 6.0
    assert last <= 13.0 + 1.0 + 3.0 + SAFETY_MS + 2.0 + 0.5
    assert jb.target_ms >= 1.0


def test_the_floor_and_the_ceiling_bound_the_margin_and_a_lasting_shift_is_followed():
    n = 600
    jb = adaptive_buffer(target_ms=6.0, floor_ms=4.0, window_s=1.0)
    run(jb, tone(n * C), np.full(n, 1.0), n)  # no jitter at all
    print("margin with no jitter:", jb.target_ms, jb.stats)
    assert jb.stats.timeline_shrinks > 0 and jb.stats.underruns == 0
    assert jb.target_ms >= 4.0 - 1000 / SR

    # A 40 ms stall (chunks 200-203 arrive together, in order): growth stops at the ceiling's
    # margin, so the stall's own chunks are lost (in part) and nothing after them.
    jb = adaptive_buffer(target_ms=2.0, ceiling_ms=10.0)
    delays = np.full(n, 1.0)
    delays[200:204] = 41.0 - 13.0 * np.arange(4)
    run(jb, tone(n * C), delays, n)
    print("after one 40 ms spike:", jb.target_ms, jb.stats)
    assert 1 <= jb.stats.timeline_grows <= 4 and 1 <= jb.stats.dropped_late <= 4
    assert jb.stats.grown_samples * 1000 / SR <= 10.0  # not the 40 ms the stall lasted

    # A link that runs 59 ms later from chunk 200 on: the timeline follows it (within max_ms),
    # so the loss is a burst, not everything after the step.
    jb = adaptive_buffer(target_ms=2.0, ceiling_ms=10.0)
    delays[200:] = 60.0
    _, e2e, _ = run(jb, tone(n * C), delays, n)
    print("after a lasting 59 ms step:", jb.target_ms, jb.stats)
    assert jb.stats.dropped_late < 30
    assert e2e[n - 40] > e2e[150] + 55.0
    assert jb.target_ms <= 10.0 + 1000 / SR


def test_a_shrink_is_a_crossfade_not_a_jump():
    jb = adaptive_buffer(target_ms=10.0, window_s=0.5)
    n = 400
    sig = tone(n * C, hz=300.0)
    out, _, _ = run(jb, sig, np.full(n, 1.0), n)
    assert jb.stats.timeline_shrinks >= 10
    played = out[np.flatnonzero(out)[0]:]  # from the stream's start
    steps = np.abs(np.diff(played[:-C]))
    natural = np.abs(np.diff(sig)).max()
    # A plain cut of up to 0.25 ms of a 300 Hz tone jumps by up to 0.5 * sin(2 pi 300 * 0.25 ms)
    # = 0.23; the crossfade keeps every step within a quarter of the tone's own.
    print(f"largest step {steps.max():.4f} against the tone's {natural:.4f}")
    assert steps.max() <= natural * 1.25


def test_a_duplicate_or_retransmitted_chunk_does_not_grow_the_timeline():
    jb = adaptive_buffer(target_ms=3.0)
    n = 200
    sig = tone(n * C)
    puts = [(k * C * NS + MS, lambda k=k: put_chunk(jb, sig, k, k * C * NS + MS, capture_lead_ns=0))
            for k in range(n)]
    # chunk 50 again, 100 ms after its place: late, but not new audio
    puts.append((50 * C * NS + 100 * MS, lambda: put_chunk(jb, sig, 50, 50 * C * NS + 100 * MS)))
    simulate(jb, puts, (n * C) // BLOCK)
    assert jb.stats.dropped_late == 1 and jb.stats.timeline_grows == 0


def test_with_coverage_below_one_a_rare_late_chunk_is_lost_and_a_recurring_lateness_is_covered():
    n = 1200  # 15.6 s; the window (5 s) holds ~385 arrivals, so 1 % of it is ~4
    delays = np.full(n, 1.0)
    delays[300] = delays[700] = 12.0  # two lone 11 ms spikes, far apart
    delays[1000:1040:4] = 10.0        # then one chunk in four 9 ms late for half a second
    sig = tone(n * C)
    every = adaptive_buffer(target_ms=3.0, window_s=5.0)
    _, e2e_every, _ = run(every, sig, delays, n)
    most = JitterBuffer(3.0, 60.0, 2.0, adaptive=AdaptivePlayout(1.0, 30.0, 5.0, coverage=0.99))
    _, e2e, _ = run(most, sig, delays, n)
    print("coverage 1.0:", every.stats, [round(e2e_every[k], 2) for k in (290, 900, 1100)])
    print("coverage 0.99:", most.stats, [round(e2e[k], 2) for k in (290, 900, 1100)])
    # Covering every arrival: the first spike grows the timeline, and nothing later is lost.
    assert every.stats.timeline_grows >= 1 and every.stats.dropped_late == 1
    # Covering 99 %: the lone spikes are lost instead, and latency stays where the rest need it ...
    assert 300 not in e2e and 700 not in e2e
    assert e2e[900] < e2e_every[900] - 5.0
    # ... while lateness that recurs (more than 1 % of the window) is covered after a few.
    assert most.stats.timeline_grows >= 1
    assert most.stats.dropped_late <= 2 + 5
    assert e2e[1100] > e2e[900] + 6.0


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="floor_ms < ceiling_ms"):
        AdaptivePlayout(5.0, 5.0, 1.0)
    with pytest.raises(ValueError, match="window_s"):
        AdaptivePlayout(1.0, 5.0, 0.0)
    with pytest.raises(ValueError, match="coverage"):
        AdaptivePlayout(1.0, 5.0, 1.0, coverage=0.3)


@pytest.mark.parametrize("override, message", [
    (["playback.target_min_ms=8", "playback.target_max_ms=8"], "playback.target_max_ms: must be above target_min_ms"),
    (["playback.target_max_ms=70"], "playback.target_max_ms: must be below max_ms (60)"),
    (["playback.adapt_coverage=1.5"], "playback.adapt_coverage: must be in [0.5, 1]"),
])
def test_adaptive_bounds_in_the_config_are_one_clear_line(override, message):
    from common.config import PipelineConfigError, load_pipeline_config
    from services.playback import playback_settings

    cfg = load_pipeline_config(env={}, overrides=["playback.adaptive=true", *override])
    with pytest.raises(PipelineConfigError) as err:
        playback_settings(cfg)
    print(err.value)
    assert message in str(err.value) and "\n" not in str(err.value)
    # The same values are fine while adaptive playout is off: they are not used.
    playback_settings(load_pipeline_config(env={}, overrides=override))


def test_a_recording_keeps_every_sample_a_shrink_skipped(tmp_path):
    """A shrink changes what is heard, not the stream: a file sink or ``playback.record`` holds
    the stream as converted, sample for sample, while the output heard is shorter."""
    import soundfile as sf

    from services.recorder import WavRecorder

    jb = adaptive_buffer(target_ms=10.0, window_s=0.5)
    n = 400
    sig = (0.1 * np.random.default_rng(3).standard_normal(n * C)).astype(np.float32)
    out, _, results = run(jb, sig, np.full(n, 1.0), n)
    quiet = lambda *a, **k: None  # noqa: E731
    rec = WavRecorder(str(tmp_path / "rec.wav"), "playback.record", "record", quiet, quiet)
    rec.open()
    for i, (_, res) in enumerate(results):
        rec.consume(res, out[i * BLOCK:(i + 1) * BLOCK])
    rec.finish("test")
    got, sr = sf.read(tmp_path / "rec.wav", dtype="float32")
    print(f"{jb.stats.timeline_shrinks} shrinks skipped {jb.stats.shrunk_samples} samples; "
          f"recorded {len(got)} of {len(sig)}")
    assert jb.stats.timeline_shrinks >= 10 and jb.stats.underruns == 0
    assert len(got) >= len(sig) - 2 * C  # to where the reads stopped
    np.testing.assert_array_equal(got, sig[:len(got)])
    # ... while what was heard skipped them (the heard stream is that much shorter).
    heard = out[np.flatnonzero(out)[0]:]
    assert not np.array_equal(heard[:len(got) // 2], sig[:len(got) // 2])
