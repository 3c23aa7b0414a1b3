"""The streaming shaping stages: gain ramps, noise gate, AGC and crossfade, as pure signal logic."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from services.shaping import (
    PEAK_CEILING,
    SAMPLE_RATE,
    Agc,
    Gain,
    NoiseGate,
    crossfade,
    db_to_gain,
)

SR = SAMPLE_RATE
MS = SR // 1000          # samples per millisecond
C = 208                  # the pipeline's chunk (13 ms)
DATA = Path(__file__).parent / "data"
DOUBLE_DB = 20 * math.log10(2)


def tone(n: int, dbfs: float, freq: float = 1000.0, start: int = 0) -> np.ndarray:
    """A sine with an RMS of ``dbfs`` (1 kHz: one period per 16-sample block, so every block has it)."""
    amp = math.sqrt(2) * 10 ** (dbfs / 20)
    t = np.arange(start, start + n) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(n: int, dbfs: float, seed: int = 0) -> np.ndarray:
    """Gaussian noise with an RMS of ``dbfs``."""
    return (np.random.default_rng(seed).standard_normal(n) * 10 ** (dbfs / 20)).astype(np.float32)


def rms_db(x: np.ndarray) -> float:
    return 10 * math.log10(float(np.mean(np.square(x, dtype=np.float64))))


def in_chunks(stage, x: np.ndarray, sizes) -> np.ndarray:
    """``x`` through ``stage.process`` in pieces of the given sizes (cycled), joined."""
    out, pos, i = [], 0, 0
    while pos < len(x):
        k = sizes[i % len(sizes)]
        out.append(stage.process(x[pos:pos + k]))
        pos, i = pos + k, i + 1
    return np.concatenate(out)


def random_sizes(seed: int = 0) -> list[int]:
    """Chunk sizes: the awkward ones (1, 15, 17 around the 16-sample block), 208, 1000, and random ones."""
    rng = np.random.default_rng(seed)
    return [1, 15, 17, 208, 1000, 16, 3] + rng.integers(1, 700, 40).tolist()


def speech(dbfs: float) -> np.ndarray:
    """The two LibriSpeech test clips, twice, scaled to an overall RMS of ``dbfs`` (about 13 s)."""
    clips = [sf.read(DATA / name, dtype="float32")[0] for name in ("174-50561-0000.wav", "1919-142785-0000.wav")]
    x = np.concatenate(clips + clips).astype(np.float64)
    x *= 10 ** (dbfs / 20) / math.sqrt(np.mean(x * x))
    return x.astype(np.float32)


def speech_blocks_db(out: np.ndarray, ref: np.ndarray, floor_dbfs: float) -> float:
    """RMS (dB) of ``out`` over the 16-sample blocks where ``ref`` is above ``floor_dbfs``: active speech."""
    n = len(ref) // 16 * 16
    ms_ref = np.mean(np.square(ref[:n].reshape(-1, 16), dtype=np.float64), axis=1)
    ms_out = np.mean(np.square(out[:n].reshape(-1, 16), dtype=np.float64), axis=1)
    active = ms_ref > 10 ** (floor_dbfs / 10)
    return 10 * math.log10(float(ms_out[active].mean()))


# -- db_to_gain, Gain ---------------------------------------------------------------------------------------


def test_db_to_gain():
    assert db_to_gain(0.0) == 1.0
    assert db_to_gain(-math.inf) == 0.0
    assert db_to_gain(20.0) == pytest.approx(10.0)
    assert db_to_gain(DOUBLE_DB) == pytest.approx(2.0, rel=1e-12)


def test_gain_neutral_is_bit_exact_and_a_new_array():
    x = noise(1000, -20)
    g = Gain()
    assert g.neutral
    y = g.process(x)
    assert y.dtype == np.float32 and y is not x
    assert np.array_equal(y.view(np.int32), x.view(np.int32))


def test_gain_doubles():
    g = Gain(db=DOUBLE_DB)
    assert not g.neutral
    x = noise(C, -10)
    np.testing.assert_allclose(g.process(x), 2 * x, rtol=1e-5)


def test_gain_ramp_is_smooth_and_ends_exactly():
    ramp = 5 * MS
    g = Gain(ramp_ms=5.0)
    g.set_db(DOUBLE_DB)
    assert not g.neutral
    x = np.ones(3 * C, dtype=np.float32)
    y = in_chunks(g, x, [7, 30, 1])
    # No step larger than the ramp allows: (2 - 1) / ramp per sample (plus float32 rounding).
    steps = np.diff(np.concatenate(([1.0], y.astype(np.float64))))
    assert np.all(steps >= 0)
    assert steps.max() <= 1.0 / ramp + 1e-6
    assert y[ramp - 1] == pytest.approx(2.0, rel=1e-7)
    # After the ramp: exactly x * float32(gain).
    after = y[ramp:]
    assert np.array_equal(after, x[ramp:] * np.float32(db_to_gain(DOUBLE_DB)))
    assert not g.neutral
    z = noise(C, -20)
    assert np.array_equal(g.process(z), z * np.float32(db_to_gain(DOUBLE_DB)))
    # And back to 0 dB: neutral once the ramp is over, bit-exact again.
    g.set_db(0.0)
    g.process(np.ones(ramp, dtype=np.float32))
    assert g.neutral
    assert np.array_equal(g.process(z), z)


def test_gain_change_during_ramp_starts_from_current_gain():
    g = Gain(ramp_ms=10.0)
    g.set_db(DOUBLE_DB)
    y1 = g.process(np.ones(50, dtype=np.float32))
    g.set_db(0.0)
    y2 = g.process(np.ones(200, dtype=np.float32))
    y = np.concatenate((y1, y2)).astype(np.float64)
    assert np.abs(np.diff(y)).max() <= 1.0 / (10 * MS) + 1e-6
    assert y2[-1] == 1.0 and g.neutral


def test_gain_mutes_and_rejects_nonsense():
    g = Gain(db=-math.inf)
    assert not np.any(g.process(noise(C, -10)))
    with pytest.raises(ValueError):
        g.set_db(math.nan)
    with pytest.raises(ValueError):
        Gain(db=500.0)


# -- NoiseGate ----------------------------------------------------------------------------------------------


def test_gate_keeps_noise_out_exactly():
    gate = NoiseGate(threshold_db=-50.0)
    x = noise(3 * SR, -70)
    y = in_chunks(gate, x, [C])
    assert y.dtype == np.float32 and len(y) == len(x)
    assert not np.any(y)
    assert not gate.is_open


def test_gate_burst_opens_holds_and_releases_to_exact_zeros():
    gate = NoiseGate(threshold_db=-50.0, attack_ms=1.0, hold_ms=100.0, release_ms=50.0)
    a, b = SR, 2 * SR                        # the burst, on 16-sample block boundaries
    x = noise(4 * SR, -70)
    x[a:b] += tone(b - a, -20)
    y = in_chunks(gate, x, [C])
    # Closed until the first loud block has been measured (1 ms detection delay).
    assert not np.any(y[:a + MS])
    # Attack: 0 -> 1 over 1 ms, then the input bit for bit through the burst and the hold.
    g = y[a + MS:a + 2 * MS].astype(np.float64) / x[a + MS:a + 2 * MS]
    assert np.all(np.diff(g) > 0) and g[-1] == pytest.approx(1.0)
    hold_end = b + 100 * MS
    assert np.array_equal(y[a + 2 * MS:hold_end], x[a + 2 * MS:hold_end])
    # Release over 50 ms: the gain falls, then exact zeros.
    rel = slice(hold_end, hold_end + 50 * MS - 1)
    gain = y[rel].astype(np.float64) / x[rel]
    assert np.all(np.diff(gain) < 0) and gain[0] < 1.0
    assert not np.any(y[hold_end + 50 * MS - 1:])
    assert not gate.is_open


def test_gate_instant_attack_and_reset():
    gate = NoiseGate(threshold_db=-40.0, attack_ms=0.0)
    x = tone(10 * C, -20)
    y = gate.process(x)
    assert not np.any(y[:MS]) and np.array_equal(y[MS:], x[MS:])
    assert gate.is_open
    gate.reset()
    assert not gate.is_open and gate.gain == 0.0
    y2 = gate.process(x)
    assert np.array_equal(y, y2)


def test_gate_configure_live():
    gate = NoiseGate(threshold_db=-50.0)
    x = tone(20 * C, -30)
    assert np.array_equal(gate.process(x)[2 * MS:], x[2 * MS:])
    gate.configure(threshold_db=-20.0, hold_ms=0.0, release_ms=0.0)
    y = gate.process(x)
    # Held for what was left of the old 100 ms hold (less the 1 ms since the last decision), then shut.
    assert np.array_equal(y[:99 * MS], x[:99 * MS])
    assert not np.any(y[100 * MS:])
    with pytest.raises(ValueError):
        gate.configure(attack_ms=-1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_gate_chunking_independent(seed):
    # Bursts of tone in noise, starting off the block grid, and short settings so that every phase
    # of the envelope (attack, hold, release, reopening mid-release) happens many times.
    x = noise(3 * SR, -60, seed)
    rng = np.random.default_rng(seed)
    for start in rng.integers(0, len(x) - 3000, 25):
        k = int(rng.integers(30, 3000))
        x[start:start + k] += tone(k, float(rng.uniform(-45, -10)), 440.0)

    def make():
        return NoiseGate(threshold_db=-40.0, attack_ms=2.3, hold_ms=20.0, release_ms=7.7)

    whole = make().process(x)
    assert np.any(whole) and not np.all(whole)
    pieces = in_chunks(make(), x, random_sizes(seed))
    np.testing.assert_allclose(pieces, whole, rtol=0, atol=1e-7)
    ones = in_chunks(make(), x[:5000], [1])
    np.testing.assert_allclose(ones, whole[:5000], rtol=0, atol=1e-7)


# -- Agc ----------------------------------------------------------------------------------------------------


def test_agc_brings_speech_to_target():
    agc = Agc(target_dbfs=-24.4)
    x = speech(-44.0)
    y = in_chunks(agc, x, [C])
    last = slice(len(x) - 5 * SR, len(x))
    assert speech_blocks_db(y[last], x[last], -50.0) == pytest.approx(-24.4, abs=2.0)
    assert np.abs(y).max() <= PEAK_CEILING


def test_agc_holds_gain_through_a_pause():
    agc = Agc()
    x = speech(-44.0)
    half = len(x) // 2 // C * C
    agc_gains = []
    for k in range(0, half, C):
        agc.process(x[k:k + C])
    before = agc.gain_db
    assert before > 6.0                          # it has been raising the gain
    for _ in range(SR // C + 1):                 # 1 s of silence (digital, then a quiet hiss)
        agc.process(np.zeros(C, dtype=np.float32))
        agc_gains.append(agc.gain_db)
    for k in range(SR // C + 1):
        agc.process(noise(C, -70, k))
        agc_gains.append(agc.gain_db)
    assert max(abs(g - before) for g in agc_gains) < 1.0


def test_agc_gain_bounded_for_very_quiet_input():
    agc = Agc(max_gain_db=24.0, speech_floor_dbfs=-70.0)
    x = tone(4 * SR, -60.0)
    y = in_chunks(agc, x, [C])
    assert agc.gain_db == pytest.approx(24.0, abs=1e-9)
    np.testing.assert_allclose(y[-C:], x[-C:] * db_to_gain(24.0), rtol=1e-5, atol=1e-9)
    agc.configure(max_gain_db=6.0)
    agc.process(x[:C])
    assert agc.gain_db == pytest.approx(6.0, abs=1e-9)


def test_agc_loud_input_is_reduced_and_never_clips():
    agc = Agc()
    quiet = speech(-44.0)[:6 * SR]
    y1 = in_chunks(agc, quiet, [C])
    assert agc.gain_db > 10.0
    loud = tone(2 * SR, -6.0, 440.0)             # sudden, 38 dB louder: the limiter must act at once
    y2 = in_chunks(agc, loud, [C])
    assert np.abs(np.concatenate((y1, y2))).max() <= PEAK_CEILING
    assert agc.gain_db < 0.0
    # After the first few ms the limiter's gain keeps every sample below the ceiling: nothing is clipped.
    assert np.abs(y2[5 * MS:]).max() < PEAK_CEILING
    # -6 dBFS would need -18.4 dB: bounded by min_gain_db, so -12 dB and -18 dBFS out.
    assert agc.gain_db == pytest.approx(-12.0, abs=1e-9)
    assert rms_db(y2[-SR // 2:]) == pytest.approx(-18.0, abs=0.1)


def test_agc_chunking_independent_and_finite():
    x = speech(-40.0)[:4 * SR].copy()
    x[SR:SR + 3000] += tone(3000, -8.0)          # a loud burst: the limiter's path too
    x[2 * SR:2 * SR + 8000] = 0.0                # a pause
    whole = Agc().process(x)
    pieces = in_chunks(Agc(), x, random_sizes(3))
    np.testing.assert_allclose(pieces, whole, rtol=0, atol=1e-7)
    assert np.all(np.isfinite(whole)) and np.abs(whole).max() <= PEAK_CEILING
    bad = x[:C].copy()
    bad[[3, 50]] = [np.nan, np.inf]
    out = Agc().process(bad)
    assert np.all(np.isfinite(out)) and out.dtype == np.float32
    assert np.all(np.isfinite(bad[[0, 1]])) and np.isnan(bad[3])   # input untouched


def test_agc_reset():
    agc = Agc()
    x = speech(-44.0)[:4 * SR]
    y = in_chunks(agc, x, [C])
    assert agc.gain_db != 0.0
    agc.reset()
    assert agc.gain_db == 0.0
    assert np.array_equal(in_chunks(agc, x, [C]), y)


# -- crossfade ----------------------------------------------------------------------------------------------


def test_crossfade_exact_outside_ramp_and_monotone_inside():
    old, new = noise(C, -20, 1), noise(C, -20, 2)
    y = crossfade(old, new, 50, 100)
    assert np.array_equal(y[:50], old[:50]) and np.array_equal(y[150:], new[150:])
    z = crossfade(np.zeros(C, np.float32), np.ones(C, np.float32), 50, 100)
    assert np.all(np.diff(z[50:150]) > 0) and 0.0 < z[50] < z[149] < 1.0
    assert z[50] == pytest.approx(0.5 / 100) and z[149] == pytest.approx(99.5 / 100)
    assert np.array_equal(crossfade(old, new, -500, 100), new)
    assert np.array_equal(crossfade(old, new, C, 100), old)
    assert np.array_equal(crossfade(old, new, 20, 0)[20:], new[20:])


def test_crossfade_continues_across_chunks():
    n, start, length = 4 * C, 150, 500
    old, new = noise(n, -20, 3), noise(n, -20, 4)
    whole = crossfade(old, new, start, length)
    parts = [crossfade(old[k:k + C], new[k:k + C], start - k, length) for k in range(0, n, C)]
    assert np.array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError):
        crossfade(old, new[:-1], 0, 10)
