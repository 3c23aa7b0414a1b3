"""The jitter buffer as pure logic: simulated arrivals and sink ticks, no sockets, no clocks."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.jitter import GROW_LATE, GROW_WINDOW, STALL_MS, TRIM_WINDOW, JitterBuffer

SR = 16000
NS = 1_000_000_000 // SR  # 62500 ns per sample
MS = 1_000_000
C = 208                   # chunk length (13 ms)
BLOCK = 32                # sink block (2 ms)


def signal(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, n).astype(np.float32)


def on_time(k: int) -> int:
    """Arrival of chunk k when chunks come exactly in real time from t = 0."""
    return k * C * NS


def put_chunk(jb, sig, k, arrival, stream="s", source_end=None, capture_lead_ns=20 * MS):
    return jb.put(stream, k * C, sig[k * C:(k + 1) * C], arrival, seq=k,
                  t_capture_ns=k * C * NS - capture_lead_ns, source_end=source_end)


def simulate(jb, puts, n_blocks, block=BLOCK, sizes=None):
    """Read ``n_blocks`` blocks from t = 0 (block i plays at its schedule); before each read,
    apply every put whose arrival time has come. ``puts`` = [(arrival_ns, callable)].
    Returns (output, [(t_out, ReadResult)])."""
    sizes = sizes or [block] * n_blocks
    pending = sorted(puts, key=lambda p: p[0])
    out = np.zeros(sum(sizes), np.float32)
    buf = np.zeros(max(sizes), np.float32)
    results, pos = [], 0
    for n in sizes:
        t = pos * NS
        while pending and pending[0][0] <= t:
            pending.pop(0)[1]()
        res = jb.read(n, buf, t)
        out[pos:pos + n] = buf[:n]
        results.append((t, res))
        pos += n
    return out, results


def blocks_for(n_chunks: int, target_ms: int = 4) -> int:
    """Blocks that play exactly ``n_chunks`` chunks after the playout delay (no tail underrun)."""
    return (n_chunks * C + target_ms * 16) // BLOCK


def chunk_puts(jb, sig, ks, arrival=on_time, **kw):
    return [(arrival(k), lambda k=k: put_chunk(jb, sig, k, arrival(k), **kw)) for k in ks]


def stream_samples(results, out, block=BLOCK):
    """{stream offset: value} of every sample the reads placed on a stream's timeline."""
    got, pos = {}, 0
    for _, r in results:
        for i in range(r.stream_samples):
            got[r.stream_offset + i] = out[pos + r.stream_index + i]
        pos += block
    return got


def test_in_order_chunks_play_exactly_after_target_with_right_e2e_and_block_index():
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(20 * C)
    out, results = simulate(jb, chunk_puts(jb, sig, range(20)), blocks_for(20))
    lead = 4 * SR // 1000
    assert not out[:lead].any()                     # silence until target_ms after arrival
    np.testing.assert_array_equal(out[lead:lead + 20 * C], sig)
    assert jb.stats.underruns == 0 and jb.stats.underrun_samples == 0 and jb.stats.dropped_late == 0
    starts = [(t, s) for t, r in results for s in r.starts]
    assert [s.seq for _, s in starts] == list(range(20))
    for t, s in starts:
        # chunk k's first sample is output sample lead + kC: block (lead + kC) // 32, index % 32
        assert s.index == (lead + s.offset) % BLOCK and t == (lead + s.offset) // BLOCK * BLOCK * NS
        e2e = t + s.index * NS - s.t_capture_ns
        assert e2e == 24 * MS                        # 20 ms before arrival + 4 ms target
    assert jb.stats.chunks_played == 20 and results[2][1].started


def test_late_chunk_is_dropped_whole_and_the_next_partly():
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(12 * C)
    late_at = 85 * MS  # chunk 5 plays 69-82 ms; it and chunk 6 (82-95 ms) come at 85 ms
    arrival = lambda k: late_at if k in (5, 6) else on_time(k)  # noqa: E731 - in order, delayed
    out, results = simulate(jb, chunk_puts(jb, sig, range(12), arrival), blocks_for(12))
    played_at_85 = (84 - 4) * 16 + BLOCK            # read position after the 84 ms tick
    assert jb.stats.dropped_late == 2
    assert jb.stats.late_samples == C + (played_at_85 - 6 * C)
    assert jb.stats.lost_samples == 0               # late, not lost: nothing is missing upstream
    assert jb.stats.underruns == 1 and jb.stats.underrun_samples == played_at_85 - 5 * C
    got = stream_samples(results, out)
    fade = 32
    assert all(got[p] == sig[p] for p in range(played_at_85 + fade, 12 * C))
    seqs = [s.seq for _, r in results for s in r.starts]
    assert 5 not in seqs and 6 not in seqs and 7 in seqs


def test_hole_plays_as_silence_and_later_chunks_are_fine():
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(12 * C)
    out, results = simulate(jb, chunk_puts(jb, sig, [k for k in range(12) if k != 5]), blocks_for(12))
    got = np.array([v for _, v in sorted(stream_samples(results, out).items())])
    fade = 32
    np.testing.assert_array_equal(got[:5 * C], sig[:5 * C])
    assert not got[5 * C + fade:6 * C].any()            # silence in its place, after the fade
    np.testing.assert_array_equal(got[6 * C + fade:12 * C], sig[6 * C + fade:])
    assert jb.stats.lost_samples == C and jb.stats.underrun_samples == C and jb.stats.underruns == 1
    assert [s.seq for _, r in results for s in r.starts] == [k for k in range(12) if k != 5]


@pytest.mark.parametrize("fade_ms", [1.0, 2.0, 5.0])
def test_underrun_fades_out_and_in_without_clicks(fade_ms):
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=fade_ms)
    level = 0.5
    sig = np.full(12 * C, level, np.float32)
    puts = chunk_puts(jb, sig, [k for k in range(12) if k not in (4, 5)])
    out, results = simulate(jb, puts, blocks_for(12))
    fade = int(fade_ms * 16)
    step = level / fade
    # Linear fade from the last level: no jump larger than one fade step anywhere after the start.
    lead = 64
    assert np.abs(np.diff(out[lead:])).max() <= step + 1e-6
    got = np.array([v for _, v in sorted(stream_samples(results, out).items())])
    hole = got[4 * C:6 * C]
    np.testing.assert_allclose(hole[:fade], level - step * np.arange(1, fade + 1), atol=1e-6)
    assert not hole[fade:].any()
    np.testing.assert_allclose(got[6 * C:6 * C + fade], step * np.arange(1, fade + 1), atol=1e-6)
    assert (got[6 * C + fade:] == level).all()
    assert jb.stats.underruns == 1 and jb.stats.underrun_samples == 2 * C


def test_overflow_drops_oldest_back_to_target():
    jb = JitterBuffer(target_ms=4, max_ms=20, fade_ms=2)   # target 64, max 320 samples
    sig = signal(8 * C)
    burst = lambda k: 0 if k == 0 else 1 * MS  # noqa: E731 - chunks 1-4 right after chunk 0
    out, results = simulate(jb, chunk_puts(jb, sig, range(5), burst), blocks_for(5))
    # Bound: the chunk 208 + max 320 = 528 buffered ahead. Chunk 2 overshoots it (624) and the
    # read position moves to keep that chunk plus target: 624 - 272 = 352; chunk 3 stays within
    # it (832 - 352 = 480), chunk 4 does not (688): 1040 - 272 = 768.
    first_kept = 4 * C - 64
    assert jb.stats.dropped_overflow == 2
    assert jb.stats.overflow_samples == first_kept       # everything below was dropped, once
    got = stream_samples(results, out)
    assert min(got) == first_kept
    assert all(got[p] == sig[p] for p in range(first_kept, 5 * C))
    assert [s.seq for _, r in results for s in r.starts] == [4]  # the only start still ahead


def test_fill_beyond_the_chunk_never_exceeds_max():
    jb = JitterBuffer(target_ms=4, max_ms=20, fade_ms=2)
    sig = signal(30 * C)
    for k in range(30):
        put_chunk(jb, sig, k, 0)
        assert jb.fill <= C + jb.max
    assert jb.stats.dropped_overflow > 0


def test_max_ms_counts_beyond_the_chunk_so_long_chunks_keep_their_jitter_room():
    # Chunk factor 4: 52 ms chunks, the default 6 ms target and 60 ms max. Arrivals 4 ms early
    # and 4 ms late in turn: the early ones fill 52 + 6 + 4 = 62 ms, which a limit on the whole
    # fill (60 ms) trimmed, and each trim made the next late chunk an underrun.
    big = 4 * C
    jb = JitterBuffer(target_ms=6, max_ms=60, fade_ms=2)
    n = 20
    sig = signal(n * big)

    def arrival(k):
        return k * big * NS + (0 if k == 0 else (-4 if k % 2 else 4) * MS)

    puts = [(arrival(k), lambda k=k: jb.put("s", k * big, sig[k * big:(k + 1) * big], arrival(k), seq=k,
                                            t_capture_ns=k * big * NS))
            for k in range(n)]
    out, results = simulate(jb, puts, (n * big + 6 * 16) // BLOCK)
    got = stream_samples(results, out)
    assert jb.stats.dropped_overflow == 0 and jb.stats.underruns == 0 and jb.stats.dropped_late == 0
    assert sorted(got) == list(range(n * big)) and all(got[p] == sig[p] for p in range(n * big))


def test_new_stream_switches_and_old_stragglers_are_dropped():
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    a, b = signal(10 * C, 1), signal(10 * C, 2)
    t_switch = 40 * MS
    puts = chunk_puts(jb, a, range(4), stream="A")
    puts += [(t_switch + k * C * NS,
              lambda k=k: jb.put("B", 5000 + k * C, b[k * C:(k + 1) * C], t_switch + k * C * NS, seq=k))
             for k in range(4)]
    puts.append((t_switch + 1 * MS, lambda: put_chunk(jb, a, 4, t_switch + MS, stream="A")))
    out, results = simulate(jb, puts, 60)
    assert jb.stats.streams == 2 and jb.stats.dropped_old_stream == 1
    by_stream = {}
    for _, r in results:
        if r.stream_samples:
            by_stream.setdefault(r.stream_id, []).append(r.stream_offset)
    assert by_stream["A"][0] == 0 and by_stream["B"][0] == 5000
    b_start = next(i for i, (_, r) in enumerate(results) if r.stream_id == "B")
    assert results[b_start][0] >= t_switch + 4 * MS - BLOCK * NS  # its own timeline, target later
    pos = b_start * BLOCK + results[b_start][1].stream_index
    np.testing.assert_array_equal(out[pos:pos + 4 * C], b[:4 * C])


def test_drained_once_at_source_end_and_padding_is_ignored():
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    end = 5 * C - 40
    sig = signal(8 * C)
    sig[end:] = 0
    puts = chunk_puts(jb, sig, range(4)) + chunk_puts(jb, sig, range(4, 7), source_end=end)
    out, results = simulate(jb, puts, 60)
    drained = [r.drained for _, r in results if r.drained]
    assert drained == [("s", end)] and jb.stats.drained == 1
    got = stream_samples(results, out)
    assert sorted(got) == list(range(end))
    assert all(got[p] == sig[p] for p in range(end))
    assert jb.stats.dropped_old_stream == 0 and jb.stats.underruns == 0 and jb.stats.dropped_late == 0
    assert jb.stream_id is None and jb.fill == 0


def test_drain_when_source_end_learned_after_it_was_passed():
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(4 * C)
    puts = chunk_puts(jb, sig, range(2))
    puts.append((100 * MS, lambda: put_chunk(jb, sig, 2, 100 * MS, source_end=2 * C)))
    _, results = simulate(jb, puts, 70)
    assert [r.drained for _, r in results if r.drained] == [("s", 2 * C)]


def test_a_stalled_stream_stops_counting_underrun_samples():
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(C)
    simulate(jb, chunk_puts(jb, sig, [0]), 600)
    assert jb.stats.underruns == 1
    assert jb.stats.underrun_samples == int(STALL_MS * 16)


def test_writer_and_reader_threads_never_misplace_a_sample():
    """The socket loop and a sink callback on two threads: every output sample is either the
    stream sample that belongs at its position or silence (fade_ms 0: no fade values)."""
    jb = JitterBuffer(target_ms=0, max_ms=20, fade_ms=0)
    n_chunks = 3000
    sig = np.arange(1, n_chunks * C + 1, dtype=np.float32)  # sample at position p is p + 1
    done = threading.Event()

    def writer():
        for k in range(n_chunks):
            put_chunk(jb, sig, k, 0)
        done.set()

    bad, buf, t = [], np.zeros(BLOCK, np.float32), 0
    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set() or jb.fill:
        r = jb.read(BLOCK, buf, t)
        t += BLOCK * NS
        got = buf[r.stream_index:r.stream_index + r.stream_samples]
        want = np.arange(r.stream_offset + 1, r.stream_offset + 1 + r.stream_samples, dtype=np.float32)
        bad += [p for p, (g, w) in enumerate(zip(got, want)) if g not in (0.0, w)]
    thread.join()
    assert not bad
    assert jb.stats.dropped_overflow > 0  # the writer outran the reader: the drop path ran too


def test_bad_read_size_and_settings_are_refused():
    with pytest.raises(ValueError):
        JitterBuffer(target_ms=60, max_ms=60, fade_ms=2)
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    with pytest.raises(ValueError):
        jb.read(0, np.zeros(1, np.float32), 0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=30, max_size=120))
def test_any_block_sizes_play_the_stream_exactly(sizes):
    """Whatever a device asks for per callback, on-time audio comes out unchanged and aligned."""
    jb = JitterBuffer(target_ms=30, max_ms=200, fade_ms=2)
    n_chunks = sum(sizes) // C
    sig = signal(max(1, n_chunks) * C)
    out, results = simulate(jb, chunk_puts(jb, sig, range(max(1, n_chunks))), len(sizes), sizes=sizes)
    pos, got = 0, []
    for n, (_, r) in zip(sizes, results):
        got.append(out[pos + r.stream_index:pos + r.stream_index + r.stream_samples])
        pos += n
    got = np.concatenate(got)
    n = min(len(got), len(sig))
    np.testing.assert_array_equal(got[:n], sig[:n])
    # Silence is invented only once the signal has run out.
    assert jb.stats.underrun_samples == min(jb.stall, max(0, len(got) - len(sig)))


def test_a_slow_first_chunk_does_not_set_latency_for_the_whole_run():
    """Chunk 0 arrives 10 ms late, the rest on cadence: once that unused slack has persisted
    for TRIM_WINDOW arrivals, the timeline is pulled earlier by exactly that much."""
    n = TRIM_WINDOW + 8
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(n * C)
    arrival = lambda k: on_time(k) + (10 * MS if k == 0 else 0)  # noqa: E731
    out, results = simulate(jb, chunk_puts(jb, sig, range(n), arrival), blocks_for(n))
    assert jb.stats.dropped_overflow == 1
    # The 10 ms nobody needed, no more (measured at arrivals, so within one read block).
    assert 10 * 16 - BLOCK <= jb.stats.overflow_samples <= 10 * 16
    assert jb.stats.underruns == 0 and jb.stats.dropped_late == 0
    got = stream_samples(results, out)
    assert all(got[p] == sig[p] for p in got)  # what plays is the source, in place


def test_one_early_chunk_after_a_slow_start_does_not_trim():
    """Slack must persist: a single chunk with spare fill is not a reason to cut latency."""
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(30 * C)
    arrival = lambda k: on_time(k) + (0 if k == 5 else 10 * MS)  # noqa: E731 - all slow but one
    simulate(jb, chunk_puts(jb, sig, range(30), arrival), blocks_for(30, target_ms=14))
    assert jb.stats.dropped_overflow == 0 and jb.stats.underruns == 0


def test_persistent_lateness_grows_the_timeline_once_and_then_audio_plays_again():
    """From chunk 10 on every chunk arrives 15 ms later than before (a slow inference): after
    GROW_LATE late arrivals the timeline moves later by their median lateness plus target, and
    from then on chunks play, in place, with e2e higher by exactly the silence inserted."""
    n = 60
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(n * C)
    arrival = lambda k: on_time(k) + (15 * MS if k >= 10 else 0)  # noqa: E731
    out, results = simulate(jb, chunk_puts(jb, sig, range(n), arrival), blocks_for(n, target_ms=40))
    assert jb.stats.timeline_grows == 1
    # Each late chunk was 15 ms - 4 ms target = 11 ms late at its start (measured at arrival,
    # so up to one read block more), + 4 ms target.
    grown = jb.stats.grown_samples - 4 * 16
    assert 11 * 16 <= grown <= 11 * 16 + BLOCK
    assert jb.stats.dropped_late == GROW_LATE and jb.stats.dropped_overflow == 0
    got = stream_samples(results, out)
    played = [s.offset for _, r in results for s in r.starts]
    # What plays is the source, in place (the late chunks' places were silence).
    assert all(got[p] == sig[p] for o in played for p in range(o, o + C) if p in got)
    starts = [(t + s.index * NS - s.t_capture_ns) / MS for t, r in results for s in r.starts]
    assert starts[0] == pytest.approx(24.0) and starts[-1] == pytest.approx(24.0 + jb.stats.grown_samples / 16)
    assert len(starts) == n - GROW_LATE


def test_one_late_burst_does_not_grow_the_timeline():
    """A 200 ms stall delays 15 chunks, which then arrive together: dropped late, no growth."""
    n = 50
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(n * C)
    arrival = lambda k: max(on_time(k), on_time(14) + 200 * MS) if 14 <= k < 29 else on_time(k)  # noqa: E731
    simulate(jb, chunk_puts(jb, sig, range(n), arrival), blocks_for(n))
    assert GROW_LATE <= jb.stats.dropped_late < GROW_WINDOW
    assert jb.stats.timeline_grows == 0 and jb.stats.dropped_overflow == 0


def test_growth_never_takes_the_timeline_more_than_max_ms_later():
    """Every 20 chunks the sender falls another 25 ms behind (stalls of a lossy link): each time
    the read position runs ahead of the data and the arrivals are persistently late. The
    timeline grows, but never past max_ms later than it started; beyond that late audio is
    dropped, which is what keeps latency bounded."""
    n = 200
    jb = JitterBuffer(target_ms=4, max_ms=40, fade_ms=2)
    sig = signal(n * C)
    arrival = lambda k: on_time(k) + (k // 20) * 25 * MS  # noqa: E731
    out, results = simulate(jb, chunk_puts(jb, sig, range(n), arrival), blocks_for(n, target_ms=700))
    e2e = [(t + s.index * NS - s.t_capture_ns) / MS for t, r in results for s in r.starts]
    assert jb.stats.timeline_grows >= 1
    assert max(e2e) <= e2e[0] + 40 + BLOCK / 16, (e2e[0], max(e2e))
    assert jb.stats.dropped_late > n / 2


def test_growth_is_given_back_once_the_lateness_is_over():
    """Chunks 10-39 arrive 6 ms late (2 ms past a 4 ms target): the timeline grows by about
    6 ms. From chunk 40 on they arrive 3 ms late: 3 ms of the growth is no longer needed and is
    given back, although 3 ms is below what the plain trim rule takes (max(target, 3 ms))."""
    n = 90
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(n * C)
    arrival = lambda k: on_time(k) + (6 * MS if 10 <= k < 40 else 3 * MS if k >= 40 else 0)  # noqa: E731
    out, results = simulate(jb, chunk_puts(jb, sig, range(n), arrival), blocks_for(n, target_ms=20))
    e2e = [(t + s.index * NS - s.t_capture_ns) / MS for t, r in results for s in r.starts]
    assert jb.stats.timeline_grows == 1
    grown_ms = jb.stats.grown_samples / 16
    assert e2e[-1] == pytest.approx(e2e[0] + 3.0, abs=BLOCK / 16)   # what the 3 ms lag needs
    assert e2e[-1] < e2e[0] + grown_ms - 2
    assert jb.stats.dropped_late == GROW_LATE  # only those that made it grow


def test_output_that_ran_ahead_at_the_start_restarts_the_playout_instead_of_dropping_all():
    """A device that drains a deep buffer as it starts reads 300 ms at once, right after the
    first chunk: every later chunk would be wholly late, beyond what growth may add (max_ms), and
    nothing would ever play. Within a stream's first chunks the playout restarts at the late
    chunk instead, and from then on the chunks play in place, on time."""
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(20 * C)
    buf = np.zeros(4800, np.float32)
    put_chunk(jb, sig, 0, on_time(0))
    jb.read(4800, buf, 0)                      # the device's deep first read
    assert jb.read_pos > 10 * C
    put_chunk(jb, sig, 1, on_time(1))          # late by more than max_ms: restart here
    assert jb.stats.timeline_restarts == 1 and jb.stats.dropped_late == 0
    underruns = jb.stats.underruns             # the deep read itself ran dry after chunk 0
    played, t = [], on_time(1) + 4 * MS
    for k in range(2, 20):
        while t < on_time(k):
            res = jb.read(BLOCK, buf, t)
            played += [s.offset for s in res.starts]
            assert np.array_equal(buf[res.stream_index:res.stream_index + res.stream_samples],
                                  sig[res.stream_offset:res.stream_offset + res.stream_samples]) or res.underruns
            t += BLOCK * NS
        put_chunk(jb, sig, k, on_time(k))
    assert played[:5] == [k * C for k in range(1, 6)]
    assert jb.stats.timeline_restarts == 1 and jb.stats.dropped_late == 0 and jb.stats.underruns == underruns


def test_late_chunks_after_the_start_are_dropped_not_restarted():
    """Once the stream has played, the restart never applies: lateness is growth's business."""
    n = 60
    jb = JitterBuffer(target_ms=4, max_ms=60, fade_ms=2)
    sig = signal(n * C)
    arrival = lambda k: on_time(k) + (15 * MS if k >= 10 else 0)  # noqa: E731
    simulate(jb, chunk_puts(jb, sig, range(n), arrival), blocks_for(n, target_ms=40))
    assert jb.stats.timeline_restarts == 0 and jb.stats.timeline_grows == 1
