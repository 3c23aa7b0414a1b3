"""The ``llvc`` command: one entry point, one sub-command per job.

Sub-command modules are imported only when chosen, so light commands never pay for torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from common.config import SERVICES, TAPS
from services import early_stop

# name -> (module, help). Each module has add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "convert": ("models.convert", "convert audio files with LLVC (offline or streamed)"),
    "bench": ("models.bench", "benchmark the streaming step per backend, chunk factor and threads"),
    "make-dataset": ("models.dataset",
                     "build a parallel training set (LibriSpeech + espeak-ng, Praat's Change gender)"),
    "train": ("models.train", "train an LLVC checkpoint on a parallel dataset (upstream layout)"),
    "export": ("models.export_command", "export the streaming step to ONNX for the torch-free ONNX Runtime engine"),
    "download": ("models.download", "fetch upstream's released checkpoint from the Hugging Face hub"),
    "run": ("services.run", "run the whole pipeline under supervisord and print the monitor's report"),
    "capture": ("services.capture", "service: capture audio (device, file or test signal) and send chunks"),
    "inference": ("services.inference", "service: convert chunks with LLVC (one streaming state per stream)"),
    "playback": ("services.playback", "service: jitter buffer and output (device, file or null)"),
    "monitor": ("services.monitor", "service: latency, drops, health; status lines, /metrics, report"),
    "dashboard": ("services.dashboard", "service: the live web dashboard (latency, losses, levels, health)"),
    "devices": ("common.devices", "list the sound devices PortAudio sees (what device:NAME can open)"),
    "ctl": ("services.ctl", "steer a running pipeline: bypass, gains, noise gate, AGC, switching voices"),
    "tap": ("common.tap", "print the pipeline's telemetry as JSON lines"),
    "keys": ("common.security", "create CURVE key pairs for LAN links"),
}


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``argv_command``'s module is imported for its full flags."""
    parser = argparse.ArgumentParser(prog="llvc", description="Real-time voice conversion with LLVC.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if name != argv_command:
            # Only the chosen command's module is imported: a service starts fast.
            sub.add_parser(name, help=help_text)
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``llvc``; returns (and, as a console script, exits with) the status."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen in SERVICES + TAPS:  # the pipeline's processes, stopped by SIGTERM
        early_stop.catch()  # before the imports: a stop asked meanwhile is honoured, not fatal
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args)
    except KeyboardInterrupt:
        print(f"llvc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
