"""Sound devices: the one rule that finds a device by ``device:NAME-or-INDEX`` (for capture's
input and playback's output alike), the latency hint, and ``llvc devices``.

``llvc devices`` prints a table (or ``--json``) of every device: index, name, input and output
channels, default sample rate, host API, and which are the default input and output (what
``device:`` opens). ``--find SPEC`` (``--output`` for playback's side) says which device
``device:SPEC`` would open, by :func:`find_device`, the rule capture and playback use.

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
import time
from typing import Any

NO_DEVICES = ("PortAudio lists no sound devices (no sound card, or no sound server reachable); "
              "for virtual ones run scripts/virtual-audio.sh start")
#: What ``device_latency`` (PortAudio's latency hint) accepts besides seconds.
LATENCY_WORDS = ("low", "high")


class DeviceError(ValueError):
    """No device, or no single device, answers to a spec; ``str()`` is one line listing the candidates."""


def find_device(spec: str, devices: list[dict], default: int = -1, direction: str = "input") -> tuple[int, dict]:
    """``(index, info)`` of the ``direction`` (``"input"`` or ``"output"``) device ``spec`` names.

    ``""`` or ``"default"``: the default device (``default``, PortAudio's index). Digits: that
    index. Otherwise a case-insensitive name: an exact match wins; else the one device whose name
    contains it. A spec that matches no device, or several, raises :class:`DeviceError` listing
    the devices of that direction.
    """
    key = f"max_{direction}_channels"
    candidates = [(i, d) for i, d in enumerate(devices) if d.get(key, 0) > 0]
    if spec in ("", "default"):
        match = [(i, d) for i, d in candidates if i == default]
    elif spec.isdigit():
        match = [(i, d) for i, d in candidates if i == int(spec)]
    else:
        want = spec.casefold()
        match = ([(i, d) for i, d in candidates if d["name"].casefold() == want]
                 or [(i, d) for i, d in candidates if want in d["name"].casefold()])
    if len(match) == 1:
        return match[0]
    listing = "; ".join(f"{i}: {d['name']} ({d[key]} ch, {d['default_samplerate']:g} Hz)"
                        for i, d in candidates) or f"none, PortAudio lists no {direction} devices"
    if len(match) > 1:
        what = f"{spec!r} matches several {direction} devices"
    elif spec in ("", "default"):
        what = f"no default {direction} device"
    else:
        what = f"no {direction} device matches {spec!r}"
    raise DeviceError(f"{what} ({direction} devices: {listing})")


def read_stream_clock(stream, tries: int = 5) -> tuple[float, int, int]:
    """``(stream time s, monotonic ns, spread ns)``: PortAudio's stream clock and CLOCK_MONOTONIC
    read together, the tightest of ``tries`` bracketed readings.

    The monotonic time is the midpoint of the two reads around ``stream.time``; its error is at
    most half their spread. One reading preempted between its reads (a busy 2-core machine, or
    a host API that locks its main loop for the call) can be off by many ms, and a mapping made
    from it shifts every timestamp of the stream: the tightest of several is not.
    """
    best = None
    for _ in range(max(1, tries)):
        a = time.monotonic_ns()
        st = stream.time
        b = time.monotonic_ns()
        if best is None or b - a < best[2]:
            best = (st, (a + b) // 2, b - a)
    return best


def parse_latency(value: str | float) -> str | float:
    """``device_latency`` as sounddevice wants it: ``"low"``, ``"high"`` or seconds in (0, 10).

    Raises :class:`DeviceError` (what is allowed, not the value) otherwise.
    """
    if isinstance(value, str):
        if value in LATENCY_WORDS:
            return value
        raise DeviceError('must be "low", "high" or seconds')
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 10:
        raise DeviceError("must be in (0, 10) seconds")
    return float(value)


def latency_problem(value: str | float) -> str | None:
    """Settings check for ``device_latency`` (capture's and playback's alike)."""
    try:
        parse_latency(value)
    except DeviceError as exc:
        return str(exc)
    return None


#: The largest ``device_block_ms``: a callback's worth of audio beyond this is no low-latency choice.
MAX_BLOCK_MS = 100.0


def block_frames(block_ms: float, rate: int) -> int:
    """PortAudio's ``blocksize`` for callbacks of ``block_ms`` at ``rate`` (0: the host API's choice)."""
    return round(block_ms * rate / 1000)


def block_problem(value: float) -> str | None:
    """Settings check for ``device_block_ms`` (capture's and playback's alike)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_BLOCK_MS:
        return f"must be in [0, {MAX_BLOCK_MS:g}] ms (0: the host API's choice)"
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc devices``'s flags on ``p``."""
    p.add_argument("--json", action="store_true", help="print a JSON list of the devices instead of a table")
    p.add_argument("--find", metavar="SPEC",
                   help="print the device device:SPEC opens (index or name; '' = default): capture's input, "
                        "or with --output playback's output")
    p.add_argument("--output", action="store_true", help="--find looks for an output device (playback's)")


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
    """Execute ``llvc devices``."""
    try:
        sd = _import_sounddevice()
    except (OSError, ImportError) as exc:  # the PortAudio library (or sounddevice) is missing
        print(f"llvc devices: PortAudio is not available: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    devices = list_devices(sd)
    if args.find is not None:
        direction = "output" if args.output else "input"
        try:
            index, _ = find_device(args.find, list(sd.query_devices()), sd.default.device[int(args.output)], direction)
        except DeviceError as exc:
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
