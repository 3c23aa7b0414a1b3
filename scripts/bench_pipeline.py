"""Benchmark the whole pipeline: e2e latency, underruns, drops and RTF per chunk factor.

Runs ``llvc run`` (real processes under supervisord) for ``--seconds`` at each chunk factor,
with a looped LibriSpeech clip as the source and a null sink paced like a device, and prints
one row per setting from the monitor's report. Not a test: numbers depend on the machine.

Variants (``--variant LABEL=ARGS``, repeatable) run side by side: each round runs every chunk
factor under every variant in turn, so a machine that drifts over minutes moves them alike.

    .venv/bin/python scripts/bench_pipeline.py                 # 60 s at chunk factors 1, 2, 4
    .venv/bin/python scripts/bench_pipeline.py --seconds 20 --factors 1 --json
    .venv/bin/python scripts/bench_pipeline.py --factors 1 --rounds 3 \
        --variant today= --variant adaptive="--set playback.adaptive=true"
    .venv/bin/python scripts/bench_pipeline.py --factors 1 --breakdown   # where each chunk's e2e goes

``--breakdown`` taps the pipeline's telemetry as the dashboard does and splits every chunk's
e2e into the dashboard's parts (``services.dashboard.state.breakdown``), plus its arrival: when
it reached playback after its first sample's capture (the parts before the buffer's wait), the
figure a playout margin has to cover.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common.config import load_pipeline_config
from services.lab.breakdown import PART_NAMES, BreakdownTap, breakdown_table

REPO = Path(__file__).resolve().parent.parent
LLVC = Path(sys.executable).parent / "llvc"
CLIP = REPO / "tests" / "data" / "174-50561-0000.wav"


def run_once(factor: int, seconds: float, extra: list[str], breakdown: bool = False,
             trace: Path | None = None) -> dict:
    tap = BreakdownTap(load_pipeline_config(None, env={}), seconds) if breakdown or trace else None
    with tempfile.TemporaryDirectory(prefix="llvc-bench-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [str(LLVC), "run", "--source", f"file:{CLIP}", "--sink", "null", "-n", str(factor),
               "--duration", str(seconds), "--report", str(report), "--set", "capture.loop=true",
               "--set", "monitor.metrics_port=0", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
        if proc.returncode != 0 or not report.exists():
            raise SystemExit(f"llvc run failed at chunk factor {factor}: {proc.stderr.strip()[-500:]}")
        result = json.loads(report.read_text())
    if tap is not None:
        rows = tap.rows()
        result["breakdown"] = {"chunks": len(rows), **breakdown_table(rows)}
        if trace is not None:  # every chunk playback received, late ones too: scripts/replay_playout.py
            a = np.array(tap.arrivals, np.int64).reshape(-1, 4)
            np.savez(trace, offset=a[:, 0], n_samples=a[:, 1], t_capture_ns=a[:, 2], t_recv_ns=a[:, 3])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--factors", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=1, help="times to run every factor and variant (interleaved)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="a named set of extra llvc run arguments, e.g. adaptive='--set playback.adaptive=true'")
    ap.add_argument("--json", action="store_true", help="print the reports as JSON instead of a table")
    ap.add_argument("--breakdown", action="store_true", help="also split every chunk's e2e into its parts")
    ap.add_argument("--trace", type=Path, metavar="DIR",
                    help="save every chunk's arrival at playback per run (cf<N>-<variant>-<round>.npz) for "
                         "scripts/replay_playout.py")
    ap.add_argument("extra", nargs="*", help="more llvc run arguments after --, e.g. -- -p G_500000.pth")
    args = ap.parse_args()
    variants = dict(v.partition("=")[::2] for v in args.variant) or {"": ""}
    factors = [int(f) for f in args.factors.split(",")]
    rows = []  # (factor, variant, round, report)
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
    for rnd in range(args.rounds):
        for factor in factors:
            for label, extra in variants.items():
                trace = args.trace / f"cf{factor}-{label or 'run'}-{rnd}.npz" if args.trace else None
                rows.append((factor, label, rnd, run_once(factor, args.seconds, [*args.extra, *shlex.split(extra)],
                                                         args.breakdown, trace)))
    if args.json:
        print(json.dumps([{"factor": f, "variant": v, "round": n, "report": r} for f, v, n, r in rows], indent=2))
        return 0
    print(f"pipeline benchmark: {args.seconds:g} s per run, null sink, looped {CLIP.name}, "
          f"{args.rounds} round(s) interleaved")
    head = (f"{'cf':>3} {'variant':>10} {'chunk ms':>8} {'algo ms':>8} {'e2e p50':>8} {'p95':>7} {'p99':>7} "
            f"{'max':>7} {'underruns':>9} {'under %':>8} {'drops':>6} {'inf p50':>8} {'inf p95':>8} {'RTF':>6}")
    print(head)
    print("-" * len(head))
    for factor, label, _, r in sorted(rows, key=lambda row: (row[0], list(variants).index(row[1]), row[2])):
        e, inf = r["e2e_latency_ms"], r["inference_ms"]
        drops = sum(r["dropped"].values()) if isinstance(r["dropped"], dict) else r["dropped"]
        under_pct = 100.0 * r["underruns"] / max(r["chunks"], 1)
        print(f"{factor:>3} {label or '-':>10} {r['model']['chunk_ms']:>8g} {r['algorithmic_latency_ms']:>8.1f} "
              f"{e['p50']:>8.2f} {e['p95']:>7.2f} {e['p99']:>7.2f} {e['max']:>7.2f} {r['underruns']:>9} "
              f"{under_pct:>8.3f} {drops:>6} {inf['p50']:>8.2f} {inf['p95']:>8.2f} {r['rtf']:>6.2f}")
    if args.breakdown:
        parts = [*PART_NAMES, "arrival"]
        print("\nwhere e2e goes, ms: p50 / p99 / p99.9 per part (arrival: every part before the buffer's wait)")
        head = f"{'cf':>3} {'variant':>10} {'chunks':>7} " + " ".join(f"{p[:20]:>20}" for p in parts)
        print(head)
        print("-" * len(head))
        for factor, label, _, r in sorted(rows, key=lambda row: (row[0], list(variants).index(row[1]), row[2])):
            b = r["breakdown"]
            print(f"{factor:>3} {label or '-':>10} {b['chunks']:>7} "
                  + " ".join(f"{' / '.join(f'{v:.2f}' for v in b[p]):>20}" for p in parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
