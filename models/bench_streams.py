"""``llvc bench --streams N ...``: one batched step for N streams against N single-stream steps.

For each chunk factor and stream count N, N different streams (the clip, each started at its
own offset) are converted two ways, side by side in one run: by one
:class:`~models.batch.BatchedEngine` (one call per chunk for all N) and by N
:class:`~models.streaming.StreamingEngine` s (N calls per chunk, as N single-stream servers
would). They alternate in blocks of about one second of audio, as ``llvc bench`` interleaves
its backends, so both see the same machine. Reported per setting: the batched call's time
(median, p95) and per stream, the single step's time, N single steps' time per chunk, the
speed-up, and the largest difference between the two outputs (they must agree to
:data:`models.benchkit.TOLERANCE`). Speed is measured, never asserted.
"""
from __future__ import annotations

import time

import numpy as np

from .benchkit import BLOCK_S, DEFAULT_CLIP, TOLERANCE, load_clip, machine_info

DEFAULT_STREAMS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_CHUNK_FACTORS = (1, 4)
#: Seconds of audio each stream converts per setting.
DEFAULT_SECONDS = 2.0


def _streams(x: np.ndarray, n: int, head_len: int, chunk_len: int, chunks: int):
    """``n`` different streams of ``chunks`` chunks: the clip read from ``n`` offsets, wrapping."""
    need = head_len + chunks * chunk_len
    reps = -(-(need + len(x)) // len(x))
    loop = np.tile(x, reps)
    out = []
    for i in range(n):
        start = (i * len(x) // max(n, 1)) % len(x)
        s = loop[start:start + need]
        out.append((s[:head_len], [s[head_len + k * chunk_len:head_len + (k + 1) * chunk_len] for k in range(chunks)]))
    return out


def _ms(times_ns: list[int]) -> dict:
    t = np.asarray(times_ns, np.float64) / 1e6
    return {"median_ms": float(np.median(t)), "p95_ms": float(np.percentile(t, 95)), "calls": len(t)}


def bench_setting(model, chunk_factor: int, n: int, x: np.ndarray, seconds: float, warmup: int = 10) -> dict:
    """N streams at one chunk factor: batched vs single, interleaved (module docstring)."""
    from models.batch import BatchedEngine
    from models.streaming import StreamingEngine

    batched = BatchedEngine(model, chunk_factor, slots=n)
    singles = [StreamingEngine(model, chunk_factor) for _ in range(n)]
    g = batched.geometry
    chunks = max(2, round(seconds / g.chunk_s))
    streams = _streams(x, n, g.head_len, g.chunk_len, warmup + chunks)
    slots = [batched.open() for _ in range(n)]
    for slot, single, (head, _) in zip(slots, singles, streams):
        batched.prime(slot, head)
        single.prime(head)
    for k in range(warmup):  # untimed: first calls allocate
        batched.step({s: streams[i][1][k] for i, s in enumerate(slots)})
        for i, single in enumerate(singles):
            single.process(streams[i][1][k])
    t_batch, t_single, t_round, diff = [], [], [], 0.0
    block = max(2, round(BLOCK_S / g.chunk_s))
    for start in range(warmup, warmup + chunks, block):
        ks = range(start, min(start + block, warmup + chunks))
        got = {}
        for k in ks:
            t0 = time.perf_counter_ns()
            got[k] = batched.step({s: streams[i][1][k] for i, s in enumerate(slots)})
            t_batch.append(time.perf_counter_ns() - t0)
        for k in ks:
            r0 = time.perf_counter_ns()
            for i, single in enumerate(singles):
                t0 = time.perf_counter_ns()
                y = single.process(streams[i][1][k])
                t_single.append(time.perf_counter_ns() - t0)
                diff = max(diff, float(np.abs(y - got[k][slots[i]]).max()))
            t_round.append(time.perf_counter_ns() - r0)
    b, s, r = _ms(t_batch), _ms(t_single), _ms(t_round)
    return {"streams": n, "chunk_factor": chunk_factor, "chunk_ms": 1000 * g.chunk_s, "chunks": chunks,
            "batched": b, "per_stream_ms": b["median_ms"] / n, "single": s, "n_singles": r,
            "speedup": r["median_ms"] / b["median_ms"], "max_abs_diff": diff,
            "valid": bool(np.isfinite(diff) and diff <= TOLERANCE),
            # How many streams one core keeps up with at this per-stream cost (chunk / per stream).
            "realtime_streams": 1000 * g.chunk_s / (b["median_ms"] / n)}


def run_streams_bench(streams=DEFAULT_STREAMS, chunk_factors=DEFAULT_CHUNK_FACTORS, threads: int = 1,
                      clip=None, seconds: float = DEFAULT_SECONDS, checkpoint=None, config=None,
                      log=None) -> dict:
    """Every (chunk factor, N) setting; returns the report dict."""
    import torch

    from models.checkpoint import load_model

    log = log or (lambda msg: None)
    warnings: list[str] = []
    model, info = load_model(checkpoint, config, warn=warnings.append)
    x, clip_name = load_clip(clip or DEFAULT_CLIP, model.cfg.sample_rate, None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    report = {"machine": machine_info(), "threads": threads, "clip": clip_name, "seconds": seconds,
              "model": {"id": info.model_id, "trained": info.trained, "demo": info.demo}, "settings": []}
    try:
        for cf in chunk_factors:
            for n in streams:
                log(f"chunk factor {cf}, {n} stream(s)")
                report["settings"].append(bench_setting(model, cf, n, x, seconds))
    finally:
        torch.set_num_threads(before)
    return report


def format_streams_table(report: dict) -> str:
    """The report as a fixed-width table."""
    lines = [f"batched streams vs single-stream steps ({report['threads']} thread(s), "
             f"{report['seconds']:g} s per stream, eager PyTorch)",
             f"{'cf':>2} {'N':>3} {'batched p50':>12} {'p95':>7} {'per stream':>11} {'single p50':>11} "
             f"{'N singles':>10} {'speed-up':>9} {'streams/core':>13} {'max diff':>9}"]
    for s in report["settings"]:
        b = s["batched"]
        lines.append(f"{s['chunk_factor']:>2} {s['streams']:>3} {b['median_ms']:>9.3f} ms {b['p95_ms']:>7.3f} "
                     f"{s['per_stream_ms']:>8.3f} ms {s['single']['median_ms']:>8.3f} ms "
                     f"{s['n_singles']['median_ms']:>7.2f} ms {s['speedup']:>8.2f}x {s['realtime_streams']:>13.1f} "
                     f"{s['max_abs_diff']:>9.1e}{'' if s['valid'] else ' INVALID'}")
    return "\n".join(lines)
