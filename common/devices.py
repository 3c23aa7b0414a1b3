"""``llvc devices``: the sound devices PortAudio lists, as ``device:NAME-or-INDEX`` sees them.

A table (or ``--json``) of every device: index, name, input and output channels, default
sample rate, host API, and which are the default input and output (what ``device:`` opens).
``--find SPEC`` says which input device capture's ``device:SPEC`` would open (the same
matching as capture: :func:`services.sources.find_input_device`).

``sounddevice`` is imported here, inside :func:`run`: where the PortAudio library is missing
the command says so in one line and exits 2. PortAudio probing ALSA's devices writes ALSA's
complaints about devices that cannot open to the C stderr; they are kept out of the output.
On a machine with no sound card PortAudio lists nothing: ``scripts/virtual-audio.sh start``
makes PulseAudio null sinks that it lists.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

NO_DEVICES = ("PortAudio lists no sound devices (no sound card, or no sound server reachable); "
              "for virtual ones run scripts/virtual-audio.sh start")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list of the devices instead of a table")
    p.add_argument("--find", metavar="SPEC",
                   help="print the input device capture's device:SPEC opens (index or name substring; '' = default)")


def _import_sounddevice():
    """``sounddevice``, with the C-level stderr chatter of PortAudio's ALSA probing swallowed."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                import sounddevice as sd
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
    return sd


def list_devices(sd) -> list[dict[str, Any]]:
    """Every device PortAudio lists, as JSON-ready dicts (``default_input``/``default_output`` marked)."""
    hostapis = [h["name"] for h in sd.query_hostapis()]
    default_in, default_out = sd.default.device
    out = []
    for i, d in enumerate(sd.query_devices()):
        out.append({
            "index": i, "name": d["name"],
            "max_input_channels": int(d["max_input_channels"]),
            "max_output_channels": int(d["max_output_channels"]),
            "default_samplerate": float(d["default_samplerate"]),
            "hostapi": hostapis[d["hostapi"]] if 0 <= d["hostapi"] < len(hostapis) else str(d["hostapi"]),
            "default_input": i == default_in, "default_output": i == default_out,
        })
    return out


def table(devices: list[dict[str, Any]]) -> str:
    """The devices as an aligned table; ``*`` marks the default input / output."""
    rows = [("idx", "in", "out", "in_ch", "out_ch", "rate_hz", "host_api", "name")]
    for d in devices:
        rows.append((str(d["index"]), "*" if d["default_input"] else "", "*" if d["default_output"] else "",
                     str(d["max_input_channels"]), str(d["max_output_channels"]),
                     f"{d['default_samplerate']:g}", d["hostapi"], d["name"]))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = ["  ".join([*(cell.rjust(w) if c < 5 else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths))),
                        r[-1]]) for r in rows]
    return "\n".join(lines) + "\n(* = default input / output: what device: opens)"


def run(args: argparse.Namespace) -> int:
    try:
        sd = _import_sounddevice()
    except (OSError, ImportError) as exc:  # the PortAudio library (or sounddevice) is missing
        print(f"llvc devices: PortAudio is not available: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    devices = list_devices(sd)
    if args.find is not None:
        from services.sources import SourceError, find_input_device

        try:
            index, _ = find_input_device(args.find, list(sd.query_devices()), sd.default.device[0])
        except SourceError as exc:
            print(f"llvc devices: {exc}", file=sys.stderr)
            return 1
        devices = [devices[index]]
    if args.json:
        print(json.dumps(devices, indent=2))
    elif devices:
        print(table(devices))
    if not devices:
        print(NO_DEVICES, file=sys.stderr if args.json else sys.stdout)
    return 0
