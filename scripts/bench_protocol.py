"""Benchmark common.protocol: encode and decode cost per message, in microseconds.

Cases: a 208-sample f32le chunk (chunk factor 1) with 0 and 1 stages, a 208-sample s16le chunk,
a 1664-sample f32le chunk (chunk factor 8), and a per-chunk telemetry message. Every call is
timed on its own with ``time.perf_counter_ns``; the table gives the median, p95 and p99.

The operations run interleaved: each round runs every (case, op) for ``iterations / rounds``
calls, in an order that rotates from round to round, so that drift (frequency scaling, other
processes) hits all of them alike. The garbage collector stays on, as in the services.

    .venv/bin/python scripts/bench_protocol.py            # table
    .venv/bin/python scripts/bench_protocol.py --json     # the same numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import msgpack
import numpy as np

from common.protocol import (
    AudioChunk,
    StageRecord,
    decode,
    encode,
    make_telemetry,
)


def cases() -> dict[str, object]:
    """The messages to time, by name."""
    rng = np.random.default_rng(0)

    def chunk(n: int, fmt: str = "f32le", stages: tuple = ()) -> AudioChunk:
        x = (0.1 * rng.standard_normal(n)).astype(np.float32)
        return AudioChunk("4b1d0c2e-capture", 1234, time.monotonic_ns(), time.time_ns(), x,
                          fmt=fmt, stages=stages)

    now = time.monotonic_ns()
    stage = StageRecord("inference", "gpu-host-1", now, now + 4_200_000,
                        4_100_000, "llvc-G_500000", False)
    telemetry = make_telemetry("inference", "chunk", {
        "stream_id": "4b1d0c2e-capture", "seq": 1234, "proc_ns": 4_100_000, "queue_ns": 120_000,
        "rtf": 0.31, "reset": False, "model": "llvc-G_500000",
    })
    return {
        "f32le 208, 0 stages": chunk(208),
        "f32le 208, 1 stage": chunk(208, stages=(stage,)),
        "s16le 208, 0 stages": chunk(208, "s16le"),
        "f32le 1664 (cf 8), 1 stage": chunk(1664, stages=(stage,)),
        "telemetry chunk": telemetry,
    }


def percentile(ns: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of times in ns, in µs (to the nanosecond)."""
    return round(float(np.percentile(ns, q)) / 1000.0, 3)


def run(iterations: int, rounds: int) -> dict:
    msgs = cases()
    encoded = {name: encode(m) for name, m in msgs.items()}
    ops = []
    for name, m in msgs.items():
        ops.append((name, "encode", encode, m))
        ops.append((name, "decode", decode, encoded[name]))
    per_round = max(1, iterations // rounds)
    times = {(name, op): np.empty(per_round * rounds, np.int64) for name, op, _, _ in ops}
    clock = time.perf_counter_ns

    for _, _, fn, arg in ops:  # warm-up
        for _ in range(200):
            fn(arg)
    for r in range(rounds):
        order = ops[r % len(ops):] + ops[:r % len(ops)]
        for name, op, fn, arg in order:
            out = times[(name, op)]
            base = r * per_round
            for i in range(per_round):
                t0 = clock()
                fn(arg)
                out[base + i] = clock() - t0

    overhead = np.empty(10000, np.int64)
    for i in range(len(overhead)):
        t0 = clock()
        overhead[i] = clock() - t0

    results = []
    for (name, op), t in times.items():
        results.append({
            "case": name, "op": op, "bytes": len(encoded[name]), "n": int(len(t)),
            "median_us": percentile(t, 50), "p95_us": percentile(t, 95),
            "p99_us": percentile(t, 99), "min_us": round(float(t.min()) / 1000.0, 3),
        })
    return {
        "python": platform.python_version(), "msgpack": ".".join(map(str, msgpack.version)),
        "numpy": np.__version__, "machine": platform.machine(),
        "timer_overhead_us": round(float(np.median(overhead)) / 1000.0, 3),
        "iterations": per_round * rounds, "rounds": rounds, "results": results,
    }


def print_table(report: dict) -> None:
    print(f"common.protocol, {report['iterations']} calls per op in {report['rounds']} "
          f"interleaved rounds (Python {report['python']}, msgpack {report['msgpack']}, "
          f"numpy {report['numpy']})")
    overhead = report["timer_overhead_us"]
    print(f"times in µs per call, timer overhead included (~{overhead:.3f} µs)\n")
    header = f"{'case':<28} {'op':<7} {'bytes':>6} {'median':>8} {'p95':>8} {'p99':>8}"
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        print(f"{r['case']:<28} {r['op']:<7} {r['bytes']:>6} {r['median_us']:>8.2f} "
              f"{r['p95_us']:>8.2f} {r['p99_us']:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=20000, help="calls per op (default 20000)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.iterations < 1 or args.rounds < 1:
        p.error("--iterations and --rounds must be >= 1")
    report = run(args.iterations, args.rounds)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
