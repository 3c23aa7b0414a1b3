"""Replay recorded arrivals through the jitter buffer under several playout settings, side by side.

A trace (``scripts/bench_pipeline.py --trace DIR``) holds every chunk playback received in a
run, late ones included: its stream offset, length, capture time and arrival. This script plays
it through :class:`services.jitter.JitterBuffer`, built from ``[playback]`` settings exactly as
playback builds it, the way the paced null sink does (a read of ``block_ms`` every ``block_ms``
from the first arrival), and prints e2e percentiles and underruns for each setting. Every
setting sees the same arrivals, so the differences are the rule's alone. Not a test: the
arrivals are one machine's.

    .venv/bin/python scripts/replay_playout.py out/trace/cf1-fixed-0.npz \\
        --variant fixed= --variant adaptive="adaptive=true" --variant "fixed 10=target_ms=10"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from common.audio import SAMPLE_RATE, ms_to_samples
from common.config import PipelineConfigError, load_pipeline_config
from services.playback import jitter_buffer, playback_settings

TAIL_NS = 1_000_000_000  # reads after the last arrival at most, while its chunk plays out


def replay(trace: dict[str, np.ndarray], sets: list[str]) -> dict:
    """One setting's figures over the whole trace."""
    s = playback_settings(load_pipeline_config(None, env={}, overrides=[f"playback.{x}" for x in sets]))
    jb = jitter_buffer(s)
    order = np.argsort(trace["t_recv_ns"], kind="stable")
    offset, n_samples = trace["offset"][order], trace["n_samples"][order]
    t_capture, t_recv = trace["t_capture_ns"][order], trace["t_recv_ns"][order]
    block = ms_to_samples(s.block_ms)
    block_ns = block * 1e9 / SAMPLE_RATE
    silence = np.zeros(int(n_samples.max()), np.float32)
    out = np.zeros(block, np.float32)
    e2e: list[float] = []
    i, k, t0 = 0, 0, int(t_recv[0])
    end = int(t_recv[-1]) + TAIL_NS
    last = int((offset + n_samples).max())
    while True:
        tick = t0 + int(k * block_ns)
        if tick > end or (i == len(order) and jb.read_pos + block > last):
            break  # (not on into an underrun of a stream that simply ended)
        while i < len(order) and t_recv[i] <= tick:
            jb.put("trace", int(offset[i]), silence[:n_samples[i]], int(t_recv[i]), seq=i,
                   t_capture_ns=int(t_capture[i]))
            i += 1
        res = jb.read(block, out, tick)
        e2e.extend((tick + st.index * 1e9 / SAMPLE_RATE - st.t_capture_ns) / 1e6 for st in res.starts)
        k += 1
    st = jb.stats
    q = np.percentile(e2e, [50, 95, 99, 100]) if e2e else [float("nan")] * 4
    return {"chunks": len(order), "played": len(e2e), "e2e": [round(float(x), 2) for x in q],
            "underruns": st.underruns, "late": st.dropped_late, "grows": st.timeline_grows,
            "shrinks": st.timeline_shrinks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+", type=Path, help=".npz files from bench_pipeline.py --trace")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=KEY=VALUE[,KEY=VALUE...]",
                    help="a named set of [playback] settings, e.g. adaptive=adaptive=true,target_max_ms=12")
    args = ap.parse_args()
    variants = {label: [x for x in rest.split(",") if x]
                for label, rest in (v.partition("=")[::2] for v in args.variant)} or {"today": []}
    head = (f"{'trace':>22} {'variant':>14} {'chunks':>7} {'e2e p50':>8} {'p95':>7} {'p99':>7} {'max':>7} "
            f"{'underruns':>9} {'under %':>8} {'late':>5} {'grows':>6} {'shrinks':>7}")
    print(head)
    print("-" * len(head))
    for path in args.traces:
        with np.load(path) as z:
            trace = {key: z[key] for key in z.files}
        for label, sets in variants.items():
            try:
                r = replay(trace, sets)
            except PipelineConfigError as exc:
                print(f"replay_playout: variant {label!r}: {exc}", file=sys.stderr)
                return 2
            p50, p95, p99, top = r["e2e"]
            print(f"{path.stem[-22:]:>22} {label:>14} {r['chunks']:>7} {p50:>8.2f} {p95:>7.2f} {p99:>7.2f} "
                  f"{top:>7.2f} {r['underruns']:>9} {100 * r['underruns'] / max(r['chunks'], 1):>8.3f} "
                  f"{r['late']:>5} {r['grows']:>6} {r['shrinks']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
