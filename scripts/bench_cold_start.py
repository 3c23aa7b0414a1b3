"""Cold start of the inference service per backend: process start to first output, and RSS.

Usage: .venv/bin/python scripts/bench_cold_start.py [-p CKPT] [-c CONFIG] [-n N] [--repeats R]

Exports the model's ONNX step into a temporary folder (``llvc export``), then starts ``llvc
inference`` on eager PyTorch and on ONNX Runtime in turn, ``--repeats`` times each, interleaved,
and prints the median and range of each (services.lab.coldstart says what is timed).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from services.lab.coldstart import cold_start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", "--checkpoint")
    ap.add_argument("-c", "--config")
    ap.add_argument("-n", "--chunk-factor", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = [*(["-p", args.checkpoint] if args.checkpoint else []), *(["-c", args.config] if args.config else [])]
    with tempfile.TemporaryDirectory(prefix="llvc-cold-") as tmp:
        artifact = Path(tmp) / "step.onnx"
        export = subprocess.run([str(Path(sys.executable).parent / "llvc"), "export", *model,
                                 "-n", str(args.chunk_factor), "-o", str(artifact)], capture_output=True, text=True)
        backends = {"eager": ("--set", "inference.backend=eager")}
        if export.returncode == 0:
            backends["onnx"] = ("--set", "inference.backend=onnx", "--set", f"inference.artifact={artifact}")
        else:
            print(f"onnx: unavailable ({export.stderr.strip()[-200:]})", file=sys.stderr)
        runs: dict[str, list[dict]] = {name: [] for name in backends}
        for _ in range(args.repeats):
            for name, extra in backends.items():
                runs[name].append(cold_start(args.chunk_factor, args.threads, args.checkpoint, args.config,
                                             extra=extra))
    print(f"{'backend':8} {'first output s (median, min-max)':34} {'RSS MiB (median)':>16}")
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            print(f"{name:8} error: {rs[-1]['error']}")
            continue
        t = [r["first_output_s"] for r in ok]
        rss = [r["rss_mib"] for r in ok if r["rss_mib"] is not None]
        print(f"{name:8} {statistics.median(t):6.2f} ({min(t):.2f}-{max(t):.2f}){'':20} "
              f"{statistics.median(rss) if rss else float('nan'):16.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
