"""``llvc tap``: print the pipeline's telemetry as JSON lines.

Connects a SUB to every service's telemetry PUB (see :mod:`common.bus`) and prints each record
(:mod:`common.telemetry`, the contract) as one JSON object per line: the envelope (topic,
service, type, host, pid, both clocks) and the record's ``data`` as it is on the wire. Attaching
and detaching never affects the audio path. ``--filter`` keeps topics with the given prefixes
(``event.``, ``chunk.inference``, ...); ``--audio`` adds the headers of the audio chunks
playback receives (``audio.playback``: every stage record, no samples). Ctrl-C (or SIGTERM)
ends it cleanly with status 0; malformed messages are counted and reported at the end.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from .config import PipelineConfigError, add_config_arguments, config_from_args
from .telemetry import Record


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc tap``'s flags on ``p``."""
    add_config_arguments(p)
    p.add_argument("--filter", action="append", default=[], metavar="PREFIX",
                   help="only topics starting with PREFIX (repeatable), e.g. event. or chunk.inference")
    p.add_argument("--audio", action="store_true",
                   help="also print the headers of the chunks playback receives (topic audio.playback)")
    p.add_argument("--sound", action="store_true",
                   help="also print capture's and playback's level/spectrum frames (topics sound.*)")
    p.add_argument("--count", type=int, default=0, help="exit after this many messages (0: run until Ctrl-C)")
    p.add_argument("--duration", type=float, default=0.0, help="exit after this many seconds (0: no limit)")


#: Telemetry types a subscriber gets only when it asks: many messages, of use to few.
ON_REQUEST = ("audio", "sound")


def topics_for(filters: list[str], audio: bool, sound: bool = False) -> list[str]:
    """SUB prefixes for the flags: explicit filters win; otherwise all but :data:`ON_REQUEST`'s
    (``--audio`` adds chunk headers, ``--sound`` level frames)."""
    extra = [f"{t}." for t, wanted in zip(ON_REQUEST, (audio, sound))
             if wanted and not any(f.startswith(t) for f in filters)]
    if filters:
        return list(filters) + extra
    from .protocol import TELEMETRY_TYPES

    return [f"{t}." for t in TELEMETRY_TYPES if t not in ON_REQUEST] + extra


def to_json(record: Record) -> str:
    """One JSON line for a telemetry record: its envelope and its wire ``data``."""
    o = record.origin
    return json.dumps({"topic": record.topic, "service": o.service, "type": record.TYPE, "host": o.host,
                       "pid": o.pid, "t_mono_ns": o.t_mono_ns, "t_wall_ns": o.t_wall_ns,
                       "data": record.to_data()}, separators=(",", ":"), allow_nan=False)


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc tap``."""
    from .bus import Bus, BusError
    from .security import SecurityError

    stop = False

    def on_signal(signum, frame):  # only sets a flag: the loop below notices within 100 ms
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cfg = config_from_args(args)
        bus = Bus(cfg, "tap")
        sub = bus.subscriber(topics_for(args.filter, args.audio, args.sound))
    except (PipelineConfigError, BusError, SecurityError) as exc:
        print(f"llvc tap: error: {exc}", file=sys.stderr)
        return 2
    printed = 0
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    try:
        while not stop:
            if deadline is not None and time.monotonic() >= deadline:
                break
            msg = sub.recv(timeout_ms=100)
            if msg is None:
                continue
            sys.stdout.write(to_json(msg) + "\n")
            sys.stdout.flush()
            printed += 1
            if args.count and printed >= args.count:
                break
    except BrokenPipeError:  # e.g. piped into `head`: not an error
        pass
    finally:
        bus.close()
    if sub.rejected:
        print(f"llvc tap: rejected {sub.rejected} malformed message(s); last: {sub.last_reject}", file=sys.stderr)
    return 0
