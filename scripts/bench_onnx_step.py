"""Per-chunk time of the exact streaming step: eager StreamingEngine vs OnnxEngine, interleaved.

Usage: ``python scripts/bench_onnx_step.py [-n CHUNK_FACTOR] [--threads T] [--rounds R]``.
Uses the untrained default model (same architecture and cost as a trained one). Both engines
run the same random chunks, alternating in blocks, so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    """Run the benchmark and print median/p90 ms per chunk for each engine."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--chunk-factor", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved blocks per engine")
    ap.add_argument("--block", type=int, default=30, help="chunks per block")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from models.checkpoint import load_model
    from models.export import export_onnx
    from models.onnx_engine import OnnxEngine
    from models.streaming import StreamingEngine

    model, info = load_model(None, None, warn=lambda _msg: None)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, info, args.chunk_factor, Path(tmp) / "step.onnx")
        engines = {"eager": StreamingEngine(model, args.chunk_factor),
                   "onnx": OnnxEngine.load(path, threads=args.threads)}
    C = engines["eager"].chunk_len
    rng = np.random.default_rng(0)
    chunks = (0.1 * rng.standard_normal((args.block, C))).astype(np.float32)
    times: dict[str, list[float]] = {k: [] for k in engines}
    for e in engines.values():  # warm-up
        for c in chunks[:10]:
            e.process(c)
    for _ in range(args.rounds):
        for name, e in engines.items():
            for c in chunks:
                t0 = time.perf_counter()
                e.process(c)
                times[name].append(time.perf_counter() - t0)
    print(f"chunk factor {args.chunk_factor} ({C} samples, {1000 * C / 16000:.0f} ms audio), "
          f"{args.threads} thread(s), {args.rounds * args.block} chunks each")
    for name, ts in times.items():
        ms = sorted(1000 * t for t in ts)
        print(f"  {name:6s} median {statistics.median(ms):6.2f} ms   p90 {ms[int(0.9 * len(ms))]:6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
