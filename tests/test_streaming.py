"""The streaming engine: streamed output equals offline output, whatever the chunk factor."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import DATA, REF
from models.checkpoint import default_model
from models.config import load_config, parse_config
from models.llvc import LLVC
from models.streaming import StreamingEngine

CHUNK_FACTORS = (1, 2, 3, 4, 8)


def offline(model: LLVC, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(1, 1, -1)).view(-1).numpy()


def stream_chunks(engine: StreamingEngine, x: np.ndarray, head: np.ndarray | None) -> np.ndarray:
    """Feed ``x`` chunk by chunk (zero-padded to whole chunks) after an optional head."""
    engine.reset()
    if head is not None:
        engine.prime(head)
    C = engine.chunk_len
    padded = np.zeros(-(-len(x) // C) * C, dtype=np.float32)
    padded[: len(x)] = x
    return np.concatenate([engine.process(padded[i:i + C]) for i in range(0, len(padded), C)])


@pytest.mark.parametrize("restructured", (True, False), ids=("faststep", "module-code"))
@pytest.mark.parametrize("chunk_factor", CHUNK_FACTORS)
def test_streamed_equals_offline(reference, chunk_factor, restructured):
    """Both step implementations: FastStep (the default) and the module code it is derived from."""
    engine = StreamingEngine(reference.model, chunk_factor, restructured=restructured)
    assert engine.restructured is restructured
    L, C, x = engine.model.L, engine.chunk_len, reference.input
    assert engine.geometry.delay_samples == L == 16
    # The stream is head + chunks; output m is the conversion of stream sample m.
    y = stream_chunks(engine, x[L:], head=x[:L])[: len(x)]
    diff = np.abs(y - reference.offline)
    # Everywhere but the last chunk (offline zero-pads the final partial decoder window).
    assert diff[: len(x) - C].max() < 1e-5, diff[: len(x) - C].max()
    # convert() does the same bookkeeping and returns an aligned, equal-length signal.
    assert np.array_equal(engine.convert(x), y)


def test_upstream_streaming_loop_drifts_and_ours_does_not(ref_default):
    """Upstream's infer.py re-feeds the lookahead through the pre-net; see models/streaming.py."""
    upstream = np.load(REF / "ref_default_upstream_stream_cf1.npy")
    n = len(ref_default.input) - 208
    assert np.abs(upstream - ref_default.offline)[:n].max() > 1e-3
    ours = StreamingEngine(ref_default.model, 1).convert(ref_default.input)
    assert np.abs(ours - ref_default.offline)[:n].max() < 1e-5


def test_without_head_the_stream_starts_with_silence(ref_default):
    """An unprimed stream is the conversion of L zeros followed by the chunks, exactly."""
    engine = StreamingEngine(ref_default.model, 2)
    x = ref_default.input[:6000]
    y = stream_chunks(engine, x, head=None)
    L = engine.model.L
    expected = offline(ref_default.model, np.concatenate([np.zeros(L, np.float32), x]))
    n = len(x) - engine.chunk_len
    assert np.abs(y[:n] - expected[:n]).max() < 1e-5
    # ... which is a different (shifted-grid) conversion from offline(x) delayed by L.
    assert np.abs(y[L:n] - offline(ref_default.model, x)[: n - L]).max() > 1e-3


def assert_convert_equals_offline(model: LLVC, x: np.ndarray, chunk_factor: int, tol: float = 1e-5) -> np.ndarray:
    """``StreamingEngine.convert(x)`` equals the offline forward to ``tol`` (max abs), except in
    the last chunk (offline pads its final window with zeros); returns the offline output."""
    engine = StreamingEngine(model, chunk_factor)
    y = engine.convert(x)
    ref = offline(model, x)
    assert len(y) == len(x)
    err = float(np.abs(y - ref)[: len(x) - engine.chunk_len].max())
    assert err < tol, err
    return ref


@pytest.mark.parametrize("chunk_factor", (1, 2))
def test_streamed_equals_offline_on_other_speech_with_the_untrained_model(chunk_factor):
    model = default_model(load_config())
    x, sr = sf.read(DATA / "1919-142785-0000.wav", dtype="float32")
    assert sr == 16000
    assert_convert_equals_offline(model, x[: 16000 * 2], chunk_factor)


def _small_config(**prenet) -> dict:
    return {"data": {"sr": 16000}, "model_params": {
        "L": 8, "enc_dim": 64, "num_enc_layers": 4, "dec_dim": 32, "num_dec_layers": 2,
        "dec_buf_len": 5, "dec_chunk_size": 7, "out_buf_len": 2, "use_pos_enc": True,
        "convnet_config": {"convnet_prenet": True, "out_channels": [2, 3, 1], "kernel_sizes": [3, 5, 3],
                           "dilations": [1, 2, 4], "dropout": 0.1, "combine_residuals": None,
                           "skip_connection": "add", "use_residual_blocks": True, **prenet}}}


@pytest.mark.parametrize("variant", [
    {},
    {"use_residual_blocks": False, "combine_residuals": "add", "out_channels": [1, 1, 1]},
    {"skip_connection": "multiply", "combine_residuals": "multiply", "out_channels": [1, 1, 1]},
    {"convnet_prenet": False},
    {"lookahead": False},
])
def test_streamed_equals_offline_for_other_geometries(variant):
    """Odd geometries (other L, window, buffer sizes, 2 decoder layers, pre-net variants)."""
    raw = _small_config(**{k: v for k, v in variant.items() if k != "lookahead"})
    if "lookahead" in variant:
        raw["model_params"]["lookahead"] = variant["lookahead"]
    torch.manual_seed(5)
    model = LLVC(parse_config(raw)).eval()
    with torch.no_grad():
        model.out_conv[0].weight.mul_(0.1)
        for m in model.modules():  # give BatchNorm non-trivial statistics
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = np.random.default_rng(0).standard_normal(3000).astype(np.float32) * 0.3
    ref = offline(model, x)
    for chunk_factor in (1, 3):
        engine = StreamingEngine(model, chunk_factor)
        assert engine.chunk_len == 7 * 8 * chunk_factor
        assert engine.geometry.delay_samples == (0 if variant.get("lookahead") is False else 8)
        y = engine.convert(x)
        assert np.abs(y - ref)[: len(x) - engine.chunk_len].max() < 1e-5


def test_latency_properties(ref_default):
    for n in (1, 4):
        e = StreamingEngine(ref_default.model, n)
        assert e.chunk_len == 13 * 16 * n
        assert e.geometry.algorithmic_latency_s == pytest.approx((32 + 208 * n) / 16000)
        assert e.geometry.latency_samples == 208 * n + 16
    assert StreamingEngine(ref_default.model, 1).geometry.algorithmic_latency_s == pytest.approx(0.015)


def test_reset_forgets_everything_and_buffers_are_reused(ref_default):
    engine = StreamingEngine(ref_default.model, 1)
    x = ref_default.input[:208 * 12]
    first = stream_chunks(engine, x, x[:16])
    ptrs = {k: v.data_ptr() for k, v in engine._state.items()}
    shapes = {k: tuple(v.shape) for k, v in engine._state.items()}
    assert shapes == {"enc": (1, 512, 510), "dec": (1, 2, 13, 256), "out": (1, 512, 4), "prenet": (1, 1, 24)}
    engine.process(np.full(208, 0.7, np.float32))  # disturb the state
    second = stream_chunks(engine, x, x[:16])
    assert np.array_equal(first, second)
    assert {k: v.data_ptr() for k, v in engine._state.items()} == ptrs
    assert engine.chunks_processed == len(x) // 208 and engine.state_is_finite()


def test_bad_calls_are_refused(ref_default):
    engine = StreamingEngine(ref_default.model, 1)
    with pytest.raises(ValueError, match="exactly 208 samples"):
        engine.process(np.zeros(207, np.float32))
    with pytest.raises(ValueError, match="exactly 208 samples"):
        engine.process(np.zeros((2, 208), np.float32))
    with pytest.raises(ValueError, match="exactly 16 samples"):
        engine.prime(np.zeros(32, np.float32))
    engine.process(np.zeros(208, np.float32))
    with pytest.raises(RuntimeError, match="reset"):
        engine.prime(np.zeros(16, np.float32))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_factor"):
            StreamingEngine(ref_default.model, bad)


def test_non_finite_state_is_detected(ref_default):
    engine = StreamingEngine(ref_default.model, 1)
    engine.process(np.full(208, np.nan, np.float32))
    assert not engine.state_is_finite()
    engine.reset()
    assert engine.state_is_finite()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_engine_matches_cpu(ref_default):
    import copy

    x = ref_default.input[:208 * 40]
    cpu = StreamingEngine(copy.deepcopy(ref_default.model), 1).convert(x)
    gpu = StreamingEngine(copy.deepcopy(ref_default.model), 1, device="cuda").convert(x)
    assert np.abs(cpu - gpu).max() < 1e-4
