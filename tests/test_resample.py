"""The streaming FIR resampler (:mod:`services.resample`): block-size independence, its
frequency response, its delay, and capture's timeline through it (a click on the fake card
comes out stamped with its ADC time)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from services.resample import StreamResampler, design, supported
from services.sinks import PLAYBACK_STOPBAND
from test_capture import CHUNK, HEAD, NS_PER_SAMPLE, SR, FakeCard, check_grid

#: (rate_in, rate_out, stopband): capture's rates down to 16 kHz, and playback's up.
RATES = [(48000, 16000, 0.5), (44100, 16000, 0.5), (32000, 16000, 0.5), (96000, 16000, 0.5),
         (16000, 48000, PLAYBACK_STOPBAND), (16000, 44100, PLAYBACK_STOPBAND)]
DOWN = [r for r in RATES if r[1] == SR]


def position(r: StreamResampler, i: float) -> float:
    """Where input position ``i`` comes out: output index ``(i + delay_in) * L / M``."""
    return (i + r.delay_in) * r.up / r.down


def fit(y: np.ndarray, hz: float, rate: int, start: int) -> tuple[float, float, float]:
    """Least-squares sinusoid of ``hz`` in ``y[start:]`` (index ``n`` at time ``n / rate``):
    ``(amplitude, phase, rms of what is left)``."""
    n = np.arange(start, len(y))
    basis = np.stack([np.cos(2 * np.pi * hz * n / rate), np.sin(2 * np.pi * hz * n / rate)], axis=1)
    (a, b), *_ = np.linalg.lstsq(basis, y[start:].astype(np.float64), rcond=None)
    rest = y[start:] - basis @ (a, b)
    return float(np.hypot(a, b)), float(np.arctan2(-b, a)), float(np.sqrt(np.mean(rest ** 2)))


def db(x: float) -> float:
    return 20 * np.log10(x)


def peak_at(y: np.ndarray, k: int) -> float:
    """The fractional index of the peak at sample ``k``: the parabola through ``y[k-1:k+2]``."""
    a, b, c = y[k - 1:k + 2]
    return k + 0.5 * (a - c) / (a - 2 * b + c)


def click_peaks(y: np.ndarray) -> list[float]:
    """Fractional indices of the local maxima above half the highest one."""
    return [peak_at(y, k) for k in np.flatnonzero(y > 0.5 * y.max())
            if 0 < k < len(y) - 1 and y[k] >= y[k - 1] and y[k] > y[k + 1]]


@pytest.mark.parametrize("rate_in, rate_out, stop", RATES)
def test_streaming_in_any_block_sizes_equals_one_shot(rate_in, rate_out, stop):
    rng = np.random.default_rng(rate_in + rate_out)
    x = rng.standard_normal(rate_in // 2).astype(np.float32)
    r = StreamResampler(rate_in, rate_out, stop)
    whole = r.process(x)
    assert whole.dtype == np.float32 and len(whole) == -(-len(x) * r.up // r.down)
    r.reset()
    parts, i = [], 0
    while i < len(x):
        n = int(rng.choice([0, 1, 2, 7, 96, 441, 480, 2048, int(rng.integers(1, 3000))]))
        parts.append(r.process(x[i:i + n]))
        i += n
        # After n inputs, exactly ceil(n * L / M) outputs: each as soon as its inputs are in.
        assert sum(map(len, parts)) == -(-min(i, len(x)) * r.up // r.down)
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rate_in, rate_out, stop", RATES)
def test_design_is_linear_phase_with_a_whole_output_sample_delay(rate_in, rate_out, stop):
    h = design(rate_in, rate_out, stop)
    r = StreamResampler(rate_in, rate_out, stop)
    np.testing.assert_array_equal(h, h[::-1])
    assert (len(h) - 1) % (2 * r.down) == 0 and r.delay_out == (len(h) - 1) // (2 * r.down)
    assert r.delay_in == pytest.approx((len(h) - 1) / (2 * r.up))
    assert r.delay_out / rate_out < 1.75e-3  # the group delay: all the latency it adds
    assert supported(rate_in, rate_out) and not supported(rate_in, rate_in)


@pytest.mark.parametrize("rate_in, rate_out, stop", DOWN)
def test_passband_is_flat_and_in_phase_and_what_would_alias_is_gone(rate_in, rate_out, stop):
    r = StreamResampler(rate_in, rate_out, stop)
    n = np.arange(rate_in // 5)  # 0.2 s of each tone
    settle = 2 * r.delay_out + 2  # outputs that still see the silence before the stream
    for hz in [100, 250, 500, 1000, 2000, 3000, 4000, 5000, 6000, 6500, 7000]:
        r.reset()
        y = r.process((0.5 * np.sin(2 * np.pi * hz * n / rate_in)).astype(np.float32))
        amp, phase, rest = fit(y, hz, rate_out, settle)
        assert abs(db(amp / 0.5)) <= 0.1, hz
        assert db(rest / 0.5) < -70, hz  # nothing else in the output
        # Output j is input time j / rate_out - delay_in / rate_in: its phase says the same
        # (a sine is a cosine a quarter cycle late).
        expect = -np.pi / 2 - 2 * np.pi * hz * r.delay_in / rate_in
        assert abs(np.angle(np.exp(1j * (phase - expect)))) / (2 * np.pi * hz) < 1e-6, hz  # < 1 us
    for hz in np.arange(8500, rate_in / 2, 250):
        r.reset()
        y = r.process((0.5 * np.sin(2 * np.pi * hz * n / rate_in)).astype(np.float32))
        assert db(np.sqrt(np.mean(y[settle:] ** 2)) / (0.5 / np.sqrt(2))) <= -70, hz


@pytest.mark.parametrize("rate_out", [48000, 44100])
def test_upsampling_for_playback_is_flat_without_images(rate_out):
    """Tones to 7 kHz come out within 0.1 dB, and nothing else (no image of them) above -70 dB."""
    r = StreamResampler(SR, rate_out, PLAYBACK_STOPBAND)
    n = np.arange(SR // 5)
    settle = 2 * r.delay_out + 2
    for hz in [100, 1000, 3000, 5000, 6000, 7000]:
        r.reset()
        y = r.process((0.5 * np.sin(2 * np.pi * hz * n / SR)).astype(np.float32))
        amp, _, rest = fit(y, hz, rate_out, settle)
        assert abs(db(amp / 0.5)) <= 0.1 and db(rest / 0.5) < -70, hz


@pytest.mark.parametrize("rate_in, rate_out, stop", RATES)
def test_an_impulse_comes_out_at_the_reported_delay(rate_in, rate_out, stop):
    r = StreamResampler(rate_in, rate_out, stop)
    for at in (1000, 1001, 1002, 1234):  # input positions of different phases
        x = np.zeros(3000, np.float32)
        x[at] = 1.0
        r.reset()
        y = np.concatenate([r.process(x[i:i + 333]) for i in range(0, len(x), 333)])
        k = int(np.argmax(y))
        assert abs(peak_at(y, k) - position(r, at)) <= 0.5, at
        if r.up == 1 and at % r.down == 0:
            assert k == at // r.down + r.delay_out  # on the output grid: exactly there


# --------------------------------------------------------------------------- capture's timeline
class ClickCard(FakeCard):
    """The fake card with a one-frame click every 0.1 s (plus a fraction of a 16 kHz sample)."""

    PERIOD_S, PHASE_S = 0.1, 0.0123457

    def click_frames(self, n: int = 100) -> np.ndarray:
        """The card's frames of the first ``n`` clicks."""
        return np.round((self.PHASE_S + self.PERIOD_S * np.arange(n)) * self.rate)

    def signal(self, frames: np.ndarray) -> np.ndarray:
        return np.isin(frames, self.click_frames()).astype(np.float64)

    def click_times_ns(self, n: int) -> np.ndarray:
        """ADC times (monotonic ns) of the first ``n`` clicks."""
        return self.T0_NS + self.click_frames(n) * 1e9 / self.rate


def peaks(chunks) -> list[float]:
    """Capture times (ns) of the clicks in the chunks, each from its parabola-fitted peak."""
    audio = np.concatenate([c.samples for c in chunks])
    base = chunks[0].offset
    assert all(c.offset - base == i for c, i in zip(chunks, np.cumsum([0] + [c.n_samples for c in chunks[:-1]])))
    times = []
    for p in click_peaks(audio):
        chunk = next(c for c in chunks if c.offset <= base + round(p) < c.end)
        times.append(chunk.t_capture_ns + (base + p - chunk.offset) * NS_PER_SAMPLE)
    return times


@pytest.mark.parametrize("rate", [48000, 44100, 96000])
def test_a_click_is_stamped_with_its_adc_time(rate):
    """Clicks at known ADC times come out of capture at those times (within 0.1 ms), before and
    after a gap of dropped blocks that restarts the resampler."""
    card = ClickCard(rate)
    assert card.dev.resampler_delay > 0  # the FIR resampler, with its delay taken out
    for k in range(60):
        card.feed(k)
    check_grid(card.sent, HEAD, CHUNK)
    got = peaks(card.sent)
    want = card.click_times_ns(len(got))
    assert len(got) == 6 and np.abs(np.array(got) - want).max() < 100_000
    # Blocks 60-69 never reach the sender: 4 fit in the queue, 6 are dropped.
    for k in range(60, 70):
        card.feed(k, pump=False)
    before = len(card.sent)
    for k in range(70, 130):
        card.feed(k)
    after = [c for c in card.sent[before:] if c.offset >= 70 * SR // 100 + 2 * CHUNK]
    got = peaks(after)
    want = card.click_times_ns(13)[-len(got):]
    assert len(got) >= 5 and np.abs(np.array(got) - want).max() < 100_000


# --------------------------------------------------------------------------- playback's DAC times
@pytest.mark.parametrize("rate", [48000, 44100])
def test_device_sink_output_times_count_the_resampler_delay(rate):
    """A click read from the jitter buffer reaches the DAC when playback says its block does
    (plus its place in the block), with the FIR's delay counted: within a 48 kHz frame."""
    from types import SimpleNamespace

    from services.jitter import JitterBuffer
    from services.sinks import DeviceSink
    from test_playback import FakeStream, Flags

    sink = DeviceSink("device:x", "low", lambda *a, **k: None)
    sink.rate, sink.ring, sink.stream, sink.index = rate, np.zeros(rate, np.float32), FakeStream(), 0
    sink._make_resampler()
    assert sink.resampler_name == "fir" and sink.describe()["resampler_delay_ms"] < 1.0
    now = time.monotonic_ns()
    sink._sync_clock(now)
    sig = np.zeros(12 * CHUNK, np.float32)  # 156 ms: within the buffer's max_ms
    sig[1000] = sig[2000] = 1.0
    jb = JitterBuffer(target_ms=10, max_ms=200, fade_ms=2)
    for k in range(12):
        jb.put("d", k * CHUNK, sig[k * CHUNK:(k + 1) * CHUNK], 0, seq=k, t_capture_ns=0)
    frames, played, callbacks, expected = rate // 200, np.zeros(2 * rate), [], []
    for i in range(100):
        fed = sink.fed
        for _, t_out in sink.pump(jb, now):
            n = sink.fed - fed
            for c in np.flatnonzero(sink.buf[:n] > 0.5):  # a click, c samples into this block
                expected.append(t_out + c * 1e9 / SR)
        sink.due_ns = 0
        out = np.zeros((frames, 1), np.float32)
        dac = FakeStream.time + i * frames / rate + FakeStream.latency
        taken = sink.taken
        sink._callback(out, frames, SimpleNamespace(outputBufferDacTime=dac), Flags())
        played[taken:sink.taken] = out[:sink.taken - taken, 0]  # by ring frame
        callbacks.append((taken, dac))
    got = []
    for frame in click_peaks(played):
        taken, dac = next(cb for cb in reversed(callbacks) if cb[0] <= frame)
        got.append(dac * 1e9 + sink.clock_offset_ns + (frame - taken) * 1e9 / rate)
    assert len(expected) == 2 and len(got) == 2
    assert np.abs(np.array(got) - expected).max() < 1e9 / 48000
