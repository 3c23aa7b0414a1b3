"""Benchmark conversion quality on held-out clips: STFT distance to the target and median F0.

For every pair in a dataset's ``dev/`` split (speakers and voices never used in training), the
table gives the multi-resolution STFT distance from the input and from the model's output to
the target transform, the reduction, and the median F0 of input, target and output, with the
issue's targets (reduction >= 40%, F0 within 10%). :mod:`models.quality` defines each number.

Without ``--data`` the dataset the shipped demo voice was trained on is rebuilt first with
``llvc make-dataset`` at its defaults (seed 0; about 15 s) into a temporary folder.

    .venv/bin/python scripts/bench_quality.py                       # the embedded demo voice
    .venv/bin/python scripts/bench_quality.py -p G_4000.pth -c config.json --data DATASET
    .venv/bin/python scripts/bench_quality.py --json out/quality.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.checkpoint import load_model
from models.dataset import make_dataset
from models.quality import evaluate_clip, format_table, read_split, to_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-p", "--checkpoint", help="checkpoint (default: the embedded demo voice)")
    p.add_argument("-c", "--config", help="its model config JSON")
    p.add_argument("--data", help="dataset folder with dev/ (default: rebuild the demo voice's dataset)")
    p.add_argument("--split", default="dev", help="split to measure (default dev: held out)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, info = load_model(args.checkpoint, args.config)
    with tempfile.TemporaryDirectory(prefix="llvc-quality-") as tmp:
        data = args.data
        if data is None:
            t0 = time.perf_counter()
            data = Path(tmp) / "dataset"
            make_dataset(data, seed=0, jobs=2)
            print(f"rebuilt the demo voice's dataset (llvc make-dataset, seed 0) in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
        pairs = read_split(data, args.split)
        rows = [evaluate_clip(model, x, y, name) for name, x, y in pairs]
    print(f"model: {info.describe()}; {len(rows)} {args.split} clips")
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(to_json(rows, info.model_id) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
