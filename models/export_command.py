"""``llvc export``: write the exact streaming step as an ONNX artifact (the command; the library
is :mod:`models.export`, the cache :mod:`models.backends`)."""
from __future__ import annotations

import argparse
import sys

from .config import CHECKPOINT_DEFAULT_HELP, CONFIG_DEFAULT_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc export``'s flags on ``p``."""
    p.add_argument("-p", "--checkpoint", help="LLVC checkpoint (G_500000.pth or a bare state dict); "
                   + CHECKPOINT_DEFAULT_HELP)
    p.add_argument("-c", "--config", help=f"model config JSON in upstream format ({CONFIG_DEFAULT_HELP})")
    p.add_argument("-n", "--chunk-factor", type=int, default=1,
                   help="chunk = 13*16*N samples; the graph is fixed to this size (default 1: 13 ms)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--out", help="output path, must end in .onnx "
                       "(the sidecar <out>.json and, with a pre-net, <out>.prime.onnx go beside it)")
    where.add_argument("--cache", action="store_true", help="write into the artifact cache ($LLVC_CACHE_DIR, "
                       "else $XDG_CACHE_HOME/llvc, else ~/.cache/llvc), where backend auto looks")


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc export``; returns the exit status."""
    from .backends import cached_artifact_path
    from .checkpoint import load_spec
    from .export import export_onnx
    from .spec import ModelSpec

    try:
        spec = ModelSpec.resolve(args.checkpoint, args.config, args.chunk_factor)
        model, info = load_spec(spec)
        out = cached_artifact_path(spec) if args.cache else args.out
        path = export_onnx(model, info, spec.chunk_factor, out)
    except Exception as exc:  # one line, whatever failed
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"llvc export: {msg}", file=sys.stderr)
        return 1
    print(f"llvc export: wrote {path} (chunk factor {spec.chunk_factor}, {info.describe()})")
    return 0
