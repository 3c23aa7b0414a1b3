"""The ``llvc`` command: one entry point, one sub-command per job.

Sub-command modules are imported only when chosen, so light commands never pay for torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). Each module has add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "convert": ("models.convert", "convert audio files with LLVC (offline or streamed)"),
    "download": ("models.download", "fetch upstream's released checkpoint from the Hugging Face hub"),
    "tap": ("common.tap", "print the pipeline's telemetry as JSON lines"),
    "keys": ("common.security", "create CURVE key pairs for LAN links"),
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (imports each sub-command module to get its flags)."""
    parser = argparse.ArgumentParser(prog="llvc", description="Real-time voice conversion with LLVC.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``llvc``; returns (and, as a console script, exits with) the status."""
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args)
    except KeyboardInterrupt:
        print(f"llvc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
