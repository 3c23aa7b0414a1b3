"""Benchmark the whole pipeline: e2e latency, underruns, drops and RTF per chunk factor.

Runs ``llvc run`` (real processes under supervisord) for ``--seconds`` at each chunk factor,
with a looped LibriSpeech clip as the source and a null sink paced like a device, and prints
one row per setting from the monitor's report. Not a test: numbers depend on the machine.

    .venv/bin/python scripts/bench_pipeline.py                 # 60 s at chunk factors 1, 2, 4
    .venv/bin/python scripts/bench_pipeline.py --seconds 20 --factors 1 --json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLVC = Path(sys.executable).parent / "llvc"
CLIP = REPO / "tests" / "data" / "174-50561-0000.wav"


def run_once(factor: int, seconds: float, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="llvc-bench-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [str(LLVC), "run", "--source", f"file:{CLIP}", "--sink", "null", "-n", str(factor),
               "--duration", str(seconds), "--report", str(report), "--set", "capture.loop=true",
               "--set", "monitor.metrics_port=0", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
        if proc.returncode != 0 or not report.exists():
            raise SystemExit(f"llvc run failed at chunk factor {factor}: {proc.stderr.strip()[-500:]}")
        return json.loads(report.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--factors", default="1,2,4")
    ap.add_argument("--json", action="store_true", help="print the reports as JSON instead of a table")
    ap.add_argument("extra", nargs="*", help="more llvc run arguments after --, e.g. -- -p G_500000.pth")
    args = ap.parse_args()
    rows = {}
    for factor in (int(f) for f in args.factors.split(",")):
        rows[factor] = run_once(factor, args.seconds, args.extra)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"pipeline benchmark: {args.seconds:g} s per setting, null sink, looped {CLIP.name}")
    head = (f"{'cf':>3} {'chunk ms':>8} {'algo ms':>8} {'e2e p50':>8} {'p95':>7} {'p99':>7} {'max':>7} "
            f"{'underruns':>9} {'under %':>8} {'drops':>6} {'inf p50':>8} {'inf p95':>8} {'RTF':>6}")
    print(head)
    print("-" * len(head))
    for factor, r in rows.items():
        e, inf = r["e2e_latency_ms"], r["inference_ms"]
        drops = sum(r["dropped"].values()) if isinstance(r["dropped"], dict) else r["dropped"]
        under_pct = 100.0 * r["underruns"] / max(r["chunks"], 1)
        print(f"{factor:>3} {r['model']['chunk_ms']:>8g} {r['algorithmic_latency_ms']:>8.1f} {e['p50']:>8.2f} "
              f"{e['p95']:>7.2f} "
              f"{e['p99']:>7.2f} {e['max']:>7.2f} {r['underruns']:>9} {under_pct:>8.3f} {drops:>6} "
              f"{inf['p50']:>8.2f} {inf['p95']:>8.2f} {r['rtf']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
