"""Store a trained checkpoint as float16 for shipping, checked against its float32 output.

The probe is the dataset's ``val/`` split concatenated (clips never used as training steps);
the float16 weights are written only when the model they give, run in float32, stays within
``--tol`` (default 1e-3, max abs) of the float32 original on it.

    .venv/bin/python scripts/ship_voice.py RUN/best.pth RUN/config.json models/demo_voice.pth --data DATASET
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from models.quality import read_split
from models.train import TrainError, save_float16


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="float32 checkpoint ({'model': state_dict})")
    p.add_argument("config", help="its model config JSON")
    p.add_argument("out", help="where the float16 checkpoint goes")
    p.add_argument("--data", required=True, help="dataset folder whose val/ split is the probe")
    p.add_argument("--tol", type=float, default=1e-3, help="largest output difference accepted (default 1e-3)")
    args = p.parse_args()
    probe = np.concatenate([x for _, x, _ in read_split(args.data, "val")])
    try:
        diff = save_float16(args.checkpoint, args.config, args.out, probe, args.tol)
    except (TrainError, ValueError) as exc:
        print(f"ship_voice: {exc}", file=sys.stderr)
        return 1
    print(f"ship_voice: wrote {args.out} (float16); output within {diff:.2e} of float32 "
          f"over {len(probe) / 16000:.1f} s of val audio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
