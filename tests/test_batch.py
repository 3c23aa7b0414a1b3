"""Batched streams (models/batch.py): each stream's output is its own exact streaming output,
whatever the other slots do, including streams that join and leave mid-run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.audio import read_audio
from conftest import DATA
from models.batch import BatchedEngine, SlotsFull
from models.bench import TOLERANCE
from models.streaming import StreamingEngine
from services.cli import main
from test_streaming import offline

#: Batched and single-stream GEMMs sum the same terms in another blocking: float rounding only.
SAME = 1e-5


def inputs(reference) -> list[np.ndarray]:
    """Four different voices of different lengths (about a second each: the point is the
    joins and leaves, not the length)."""
    x = reference.input[:16000]
    speech = read_audio(DATA / "1919-142785-0000.wav", 16000)
    long = np.resize(speech, 3 * len(x))  # the clip repeated as far as needed
    return [x, 0.5 * x[::-1].copy(), long[: int(1.5 * len(x))], 2.0 * long[2 * len(x):]]


def chunked(x: np.ndarray, engine) -> tuple[np.ndarray, list[np.ndarray]]:
    """A stream as engines take it: its head, then whole chunks (the last zero-padded)."""
    H, C = engine.geometry.head_len, engine.geometry.chunk_len
    body = x[H:]
    padded = np.zeros(-(-len(body) // C) * C, np.float32)
    padded[: len(body)] = body
    return x[:H], [padded[i:i + C] for i in range(0, len(padded), C)]


def alone(model, chunk_factor: int, x: np.ndarray) -> np.ndarray:
    """``x`` streamed on its own."""
    engine = StreamingEngine(model, chunk_factor)
    head, chunks = chunked(x, engine)
    engine.prime(head)
    return np.concatenate([engine.process(c) for c in chunks])


@pytest.mark.parametrize("chunk_factor", (1, 4))
def test_each_stream_equals_its_own_stream_while_others_join_and_leave(reference, chunk_factor):
    model = reference.model
    engine = BatchedEngine(model, chunk_factor, slots=3)
    signals = inputs(reference)
    heads, chunks = zip(*(chunked(x, engine) for x in signals))
    # When each stream opens (in steps of the run) and, for stream 0, when it is cut short:
    # stream 3 can only open once stream 0 has left, into its slot.
    starts = [0, 0, 5, len(chunks[0]) // 2 + 1]
    stop_0 = len(chunks[0]) // 2
    slot_of, done, outputs, shapes = {}, set(), {k: [] for k in range(4)}, set()
    step = 0
    while len(done) < 4:
        for k in range(4):
            if k not in slot_of and k not in done and step >= starts[k]:
                slot_of[k] = engine.open()
                engine.prime(slot_of[k], heads[k])
        # Stream 1 skips every third step (its chunk not complete yet): other subsets than
        # "every open slot" are stepped, i.e. the gather/scatter path as well as the views.
        due = {k: s for k, s in slot_of.items() if not (k == 1 and step % 3 == 2)}
        got = engine.step({s: chunks[k][len(outputs[k])] for k, s in due.items()})
        shapes.add(tuple(sorted(due.values())))
        for k, s in due.items():
            outputs[k].append(got[s])
            if len(outputs[k]) == len(chunks[k]) or (k == 0 and len(outputs[k]) == stop_0):
                engine.close(s)
                del slot_of[k]
                done.add(k)
        step += 1
    assert any(len(s) > 1 and s != tuple(range(s[0], s[-1] + 1)) for s in shapes), shapes  # gathered
    assert any(len(s) > 1 and s == tuple(range(s[0], s[-1] + 1)) for s in shapes), shapes  # views
    for k, x in enumerate(signals):
        want = alone(model, chunk_factor, x)[: len(outputs[k]) * engine.geometry.chunk_len]
        got = np.concatenate(outputs[k])
        assert np.abs(got - want).max() < SAME, (k, np.abs(got - want).max())
    # ... and so each equals its offline conversion (output sample m is offline sample m).
    y = np.concatenate(outputs[2])
    n = len(signals[2]) - engine.geometry.chunk_len
    assert np.abs(y[:n] - offline(model, signals[2])[:n]).max() < 1e-4


def test_a_reopened_slot_starts_from_silence(ref_default):
    engine = BatchedEngine(ref_default.model, 1, slots=1)
    head, chunks = chunked(ref_default.input, engine)
    slot = engine.open()
    engine.prime(slot, head)
    for c in chunks[:10]:
        engine.step({slot: c})
    engine.close(slot)
    assert engine.open() == slot
    engine.prime(slot, head)
    got = np.concatenate([engine.step({slot: c})[slot] for c in chunks[:10]])
    want = alone(ref_default.model, 1, ref_default.input)[: len(got)]
    assert np.abs(got - want).max() < SAME


def test_admission_and_bad_input_are_refused_with_what_and_where(ref_default):
    engine = BatchedEngine(ref_default.model, 1, slots=2)
    a, b = engine.open(), engine.open()
    assert (a, b) == (0, 1) and engine.active == [0, 1]
    with pytest.raises(SlotsFull, match="all 2 stream slots"):
        engine.open()
    with pytest.raises(ValueError, match="slot 1's chunk must be 1-D with exactly 208 samples"):
        engine.step({a: np.zeros(208, np.float32), b: np.zeros(100, np.float32)})
    engine.close(a)
    with pytest.raises(KeyError, match="slot 0 holds no stream"):
        engine.step({a: np.zeros(208, np.float32)})
    with pytest.raises(ValueError, match="slots must be >= 1"):
        BatchedEngine(ref_default.model, 1, slots=0)
    assert engine.step({}) == {} and engine.state_is_finite(b)


def test_bench_streams_puts_one_batched_call_beside_n_single_steps(tmp_path, capsys):
    """``llvc bench --streams``: what is measured and how it is judged (speed is not asserted)."""
    out = tmp_path / "streams.json"
    assert main(["bench", "--streams", "1", "3", "--quick", "-n", "1", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert "batched p50" in stdout[1] and "N singles" in stdout[1]
    rows = [line.split() for line in stdout[2:4]]
    assert [r[:2] for r in rows] == [["1", "1"], ["1", "3"]] and not any("INVALID" in r for r in rows)
    data = json.loads(out.read_text())
    for s in data["settings"]:
        assert s["valid"] and s["max_abs_diff"] <= TOLERANCE
        # One batched call per chunk for all N streams; N single steps per chunk.
        assert s["batched"]["calls"] == s["n_singles"]["calls"] == s["chunks"]
        assert s["single"]["calls"] == s["streams"] * s["chunks"]
        assert s["speedup"] == pytest.approx(s["n_singles"]["median_ms"] / s["batched"]["median_ms"])
    assert main(["bench", "--streams", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--streams must be >= 1" in err[0]


def test_an_onnx_pool_keeps_each_streams_state_apart(ref_default, ref_default_artifact):
    """The pool ONNX Runtime sessions use (models/pool.py: one forked engine per slot, the graphs
    shared): interleaved streams, a reset and a reopened slot each give their own stream."""
    from models.onnx_engine import OnnxEngine
    from models.pool import EnginePool, pool_for

    engine = OnnxEngine.load(ref_default_artifact)
    pool = pool_for(engine, 2)
    assert isinstance(pool, EnginePool) and not pool.batched
    signals = inputs(ref_default)[:3]
    heads, chunks = zip(*(chunked(x, engine) for x in signals))
    a, b = pool.open(), pool.open()
    with pytest.raises(SlotsFull):
        pool.open()
    pool.prime(a, heads[0])
    pool.prime(b, heads[1])
    out = {0: [], 1: [], 2: []}
    for k in range(10):
        got = pool.step({a: chunks[0][k], b: chunks[1][k]})
        out[0].append(got[a])
        out[1].append(got[b])
    pool.close(b)  # stream 1 leaves; stream 2 takes its slot, from silence
    c = pool.open()
    pool.prime(c, heads[2])
    for k in range(10):
        got = pool.step({a: chunks[0][10 + k], c: chunks[2][k]})
        out[0].append(got[a])
        out[2].append(got[c])
    for k in range(3):
        single = OnnxEngine.load(ref_default_artifact)
        single.prime(heads[k])
        want = np.concatenate([single.process(ch) for ch in chunks[k][:len(out[k])]])
        assert np.abs(np.concatenate(out[k]) - want).max() < SAME, k
