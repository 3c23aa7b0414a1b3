"""``llvc ctl``: steer a running pipeline (bypass, gains, gate, AGC, voice) through the control
endpoint inference serves (:mod:`common.control`, :mod:`services.control_plane`).

    llvc ctl status                       current values and the voice in use
    llvc ctl bypass on|off
    llvc ctl set KEY=VALUE ...            e.g. input_gain_db=-6 gate=on gate_threshold_db=-50 agc=on
    llvc ctl voices                       the checkpoints in inference.voices_dir
    llvc ctl voice -p CHECKPOINT [-c CONFIG]   switch voices; waits for the swap (or its failure)

Exit status: 0 done, 1 refused (the reply's one line on stderr), 2 bad arguments or config, or
no reply. Nothing is changed unless the whole request is accepted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common.config import PipelineConfigError, add_config_arguments, config_from_args
from common.control import ControlError, ControlReply, ControlRequest

from .controls import LiveSettings, parse_value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``llvc ctl``'s flags."""
    add_config_arguments(p)
    p.add_argument("action", choices=("status", "bypass", "set", "voices", "voice"), help="what to do")
    p.add_argument("values", nargs="*", metavar="ARG", help="bypass: on|off; set: KEY=VALUE ...")
    p.add_argument("-p", "--checkpoint", help="voice: the checkpoint (a path, or a name in inference.voices_dir)")
    p.add_argument("-c", "--config",
                   help="voice: its model config (default: NAME.json beside it, else config/llvc.json)")
    p.add_argument("--json", action="store_true", help="print the reply's state as JSON")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for a reply (default 3)")
    p.add_argument("--wait", type=float, default=120.0, help="voice: seconds to wait for the swap (default 120)")


def _request(args) -> ControlRequest:
    """The request the arguments ask for; ``ValueError`` (one line) for bad ones."""
    a = args.action
    if a in ("status", "voices"):
        if args.values:
            raise ValueError(f"{a} takes no arguments")
        return ControlRequest(a)
    if a == "bypass":
        if len(args.values) != 1 or not isinstance(parse_value(args.values[0]), bool):
            raise ValueError("bypass takes on or off")
        return ControlRequest("set", {"bypass": parse_value(args.values[0])})
    if a == "set":
        if not args.values:
            raise ValueError(f"set needs KEY=VALUE (keys: {', '.join(LiveSettings().as_dict())})")
        values = {}
        for item in args.values:
            key, eq, text = item.partition("=")
            if not eq or not key:
                raise ValueError(f"{item!r}: expected KEY=VALUE")
            values[key.strip()] = parse_value(text)
        return ControlRequest("set", values)
    if not args.checkpoint:
        raise ValueError("voice needs -p CHECKPOINT")
    return ControlRequest("voice", checkpoint=args.checkpoint, config=args.config)


def _show(state: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(state, sort_keys=True))
        return
    print(f"voice    {state.get('voice') or '(none)'}  model {state.get('model')}  "
          f"backend {state.get('backend')}" + (f"  loading {state['loading']}" if state.get("loading") else ""))
    for key, value in (state.get("controls") or {}).items():
        print(f"{key:<18} {_shown(value)}")


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc ctl``."""
    from common.bus import Bus, BusError
    from common.security import SecurityError

    try:
        req = _request(args)
        req.encode()  # what cannot be sent is a bad argument, said before connecting
        cfg = config_from_args(args)
        bus = Bus(cfg, "ctl")
    except (ValueError, ControlError, PipelineConfigError, BusError, SecurityError) as exc:
        print(f"llvc ctl: error: {exc}", file=sys.stderr)
        return 2
    try:
        client = bus.control_client()
        timeout_ms = max(1, int(args.timeout * 1000))
        reply = client.request(req, timeout_ms)
        if reply.ok and req.cmd == "voice":
            reply = _await_swap(client, req, timeout_ms, args.wait)
    except (ControlError, BusError) as exc:
        print(f"llvc ctl: error: {exc}", file=sys.stderr)
        return 2
    finally:
        bus.close()
    if not reply.ok:
        print(f"llvc ctl: refused: {reply.error}", file=sys.stderr)
        return 1
    if req.cmd == "voice":
        last = reply.state["last_switch"]
        print(f"switched to {last['voice']} (model {last['model']}, loaded in {last['load_ms'] / 1000:.2f} s "
              f"while the previous voice kept converting)")
    elif req.cmd == "voices" and not args.json:
        current = reply.state.get("voice") or ""
        for v in reply.state.get("voices") or []:
            mark = "*" if Path(v["checkpoint"]).resolve() == Path(current).resolve() and current else " "
            print(f"{mark} {v['name']:<24} {v['checkpoint']}")
    elif req.cmd == "set" and not args.json:
        now = reply.state["controls"]
        print("  ".join(f"{k} {_shown(now[k])}" for k in req.values))
    else:
        _show(reply.state, args.json)
    return 0


def _shown(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def _await_swap(client, req: ControlRequest, timeout_ms: int, wait_s: float) -> ControlReply:
    """Poll status until the voice asked for is swapped in, or its load failed.

    A poll that goes unanswered is asked again until ``wait_s`` is up: the load was accepted,
    and on a small machine it may keep inference from answering for a few seconds."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            reply = client.request(ControlRequest("status"), timeout_ms)
        except ControlError:
            if time.monotonic() >= deadline:
                raise
            continue
        st = reply.state
        last = st.get("last_switch") or {}
        if not st.get("loading") and last:
            if last.get("ok"):
                return reply
            return ControlReply(False, last.get("reason") or "the voice did not load", st)
        time.sleep(0.1)
    return ControlReply(False, f"the voice did not load within {wait_s:g} s (--wait)", {})
