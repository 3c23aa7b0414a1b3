"""Acoustic mouth-to-ear latency through real devices, per chunk factor, beside the monitor's figure.

Starts its own PulseAudio server with two null sinks (``tests/pulse.py``; these machines have no
sound card), plays probe bursts into ``llvc_in`` while ``llvc run`` captures its monitor and
plays into ``llvc_out``, records both monitors and cross-correlates (``tests/acoustic.py``).

Per chunk factor, two runs: the passthrough model, whose output is its input, so the bursts can
be found again: acoustic p50/p95 over the bursts beside the monitor's e2e p50 for the same
chunks; then the LLVC model (the embedded demo voice unless ``-p``/``-c`` follow ``--``; backend
auto), whose output is not its input (nothing to correlate), with the monitor's figures, which
the first run shows to be the acoustic truth, and its underruns.

    .venv/bin/python scripts/bench_acoustic.py                  # cf 1, 2, 4; 30 bursts
    .venv/bin/python scripts/bench_acoustic.py --bursts 20 --factors 1
    .venv/bin/python scripts/bench_acoustic.py -- --set playback.target_ms=4   # more llvc run arguments
    .venv/bin/python scripts/bench_acoustic.py --virtual-mic    # output into the virtual microphone,
                                                                # recorded from it (llvc_voice)
    .venv/bin/python scripts/bench_acoustic.py --factors 1 --passthrough --rounds 2 \
        --variant today= --variant low="--set capture.device_block_ms=2"   # settings side by side, interleaved

A second table says where each setting's passthrough e2e goes (medians over the same chunks):
the dashboard's parts (``services.lab.breakdown``), with playback's device output split into
its resampler, what waited in its ring, and the latency PortAudio reports for the device.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common.config import load_pipeline_config
from services.lab.acoustic import Recorder, burst_train, measure, play
from services.lab.breakdown import PART_NAMES, BreakdownTap
from services.lab.endpoints import private_sets
from services.lab.harness import RunningPipeline
from services.lab.pulse import PulseServer

REPO = Path(__file__).resolve().parent.parent


def one_setting(srv, factor: int, bursts: int, model_args: list[str], extra: list[str], work: Path,
                virtual_mic: bool = False) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    rec_a = Recorder("llvc_in.monitor", work / "a.npz", srv.env)
    rec_a.wait_ready()
    rec_b = None
    if not virtual_mic:
        rec_b = Recorder("llvc_out.monitor", work / "b.npz", srv.env)
        rec_b.wait_ready()
    sets = private_sets()
    env = {**srv.env, "PULSE_SOURCE": "llvc_in.monitor", "PULSE_SINK": "llvc_out"}
    sink = "virtual-mic" if virtual_mic else "device:"
    tap = BreakdownTap(load_pipeline_config(None, env={}, overrides=sets), 600)
    try:
        with RunningPipeline(work / "run", ["--source", "device:", "--sink", sink, "-n", str(factor),
                                            *model_args, *extra], sets, env=env) as p:
            p.wait_streaming(3.0)
            if rec_b is None:  # the microphone exists now: record it as another program would
                rec_b = Recorder("llvc_voice", work / "b.npz", srv.env)
                rec_b.wait_ready()
            player = play("llvc_in", burst_train(bursts), srv.env, work)
            player.wait(timeout=bursts * 0.5 + 30)
            time.sleep(0.5)
            played = p.observer.played()
            counters = p.observer.counters("playback")
            report = p.stop()
    finally:
        a = rec_a.stop()
        b = rec_b.stop() if rec_b is not None else None  # None only if the run raised
        rows = tap.rows()
    m = measure(a, b)
    base = {"chunk_factor": factor, "underruns": counters.get("underruns"),
            "dropped_late": counters.get("dropped_late"), "report_e2e": (report or {}).get("e2e_latency_ms"),
            "inference_ms": (report or {}).get("inference_ms"),
            "backend": ((report or {}).get("model") or {}).get("backend")}
    if not m.latencies_ms:
        return {**base, "error": f"no burst came through ({m.missed} missed)"}
    lo, hi = min(m.times_ns), max(m.times_ns)
    mon = [c.e2e_ms for c in played if lo <= c.t_capture_ns <= hi]
    return {**base, "bursts": len(m.latencies_ms), "missed": m.missed,
            "acoustic_p50": m.median_ms, "acoustic_p95": m.percentile(95),
            "monitor_p50": float(np.median(mon)) if mon else None, "correlation": m.correlation,
            "parts": where_it_goes(rows, work / "run" / "playback.log")}


def _sink_open(log: Path) -> dict[str, float]:
    """``device_latency_ms`` and ``resampler_delay_ms`` from playback's "sink open" log line."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return {}
    line = next((ln for ln in text.splitlines() if " sink open " in ln), "")
    return {k: float(v) for k, v in re.findall(r"(device_latency_ms|resampler_delay_ms)=([0-9.]+)", line)}


def where_it_goes(rows: np.ndarray, playback_log: Path) -> dict[str, float]:
    """Medians of each e2e part over the run's chunks, playback's device output split into its
    resampler, its ring (and callback timing) and the latency PortAudio reports for the device."""
    if not len(rows):
        return {}
    med = {name: float(np.median(rows[:, 1 + i])) for i, name in enumerate(PART_NAMES)}
    med["e2e"] = float(np.median(rows[:, 0]))
    sink = _sink_open(playback_log)
    if "device_latency_ms" in sink:
        med["resampler"] = sink.get("resampler_delay_ms", 0.0)
        med["device_latency"] = sink["device_latency_ms"]
        med["ring"] = med["device_output"] - med["resampler"] - med["device_latency"]
    return med


def _ms(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factors", default="1,2,4")
    ap.add_argument("--bursts", type=int, default=30, help="probe bursts per setting (0.5 s apart)")
    ap.add_argument("--passthrough", action="store_true", help="only the passthrough runs (no LLVC model run)")
    ap.add_argument("--virtual-mic", action="store_true", help="play into --sink virtual-mic and record llvc_voice")
    ap.add_argument("--rounds", type=int, default=1, help="times to run every factor and variant (interleaved)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="a named set of extra llvc run arguments, e.g. low='--set capture.device_block_ms=2'")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("extra", nargs="*", help="more llvc run arguments after --")
    args = ap.parse_args()
    if not PulseServer.available():
        print("bench_acoustic: needs pulseaudio and pacat (scripts/setup.sh installs them)", file=sys.stderr)
        return 2
    variants = dict(v.partition("=")[::2] for v in args.variant) or {"": ""}
    rows = []
    with tempfile.TemporaryDirectory(prefix="llvc-acoustic-") as tmp:
        srv = PulseServer.start(Path(tmp) / "pulse", sinks=("llvc_in", "llvc_out"))
        try:
            for rnd in range(args.rounds):
                for f in (int(v) for v in args.factors.split(",")):
                    for label, more in variants.items():
                        extra = [*args.extra, *shlex.split(more)]
                        work = Path(tmp) / f"cf{f}-{label}-{rnd}"
                        row = one_setting(srv, f, args.bursts, ["--passthrough"], extra, work, args.virtual_mic)
                        row["variant"] = label
                        if not args.passthrough:
                            row["llvc"] = one_setting(srv, f, 4, [], extra, work.with_name(work.name + "-llvc"),
                                                      args.virtual_mic)
                            row["llvc"].pop("error", None)
                        rows.append(row)
        finally:
            srv.stop()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    into = "the virtual microphone llvc_voice" if args.virtual_mic else "null sinks"
    print(f"acoustic e2e through PulseAudio {into} (passthrough model), {args.bursts} bursts per setting")
    print(f"{'cf':>3} {'variant':>10} {'bursts':>6} {'acoustic p50':>13} {'p95':>7} {'monitor p50':>12} {'diff':>6} "
          f"{'underruns':>9} {'late':>5} {'corr':>6} | LLVC: {'monitor p50':>11} {'p99':>6} {'inf p50':>7} "
          f"{'underruns':>9}")
    for r in rows:
        llvc = r.get("llvc") or {}
        e2e = llvc.get("report_e2e") or {}
        inf = llvc.get("inference_ms") or {}
        tail = (f" | {'':5} {_ms(e2e.get('p50')):>11} {_ms(e2e.get('p99')):>6} {_ms(inf.get('p50')):>7} "
                f"{llvc.get('underruns', ''):>9}" if llvc else "")
        head = f"{r['chunk_factor']:>3} {r['variant'] or '-':>10}"
        if "error" in r:
            print(f"{head}  {r['error']}{tail}")
            continue
        mon = r["monitor_p50"]
        diff = f"{mon - r['acoustic_p50']:+6.2f}" if mon is not None else "   n/a"
        print(f"{head} {r['bursts']:>6} {r['acoustic_p50']:>10.2f} ms {r['acoustic_p95']:>7.2f} "
              f"{_ms(mon):>9} ms {diff} {r['underruns']:>9} {r['dropped_late']:>5} {r['correlation']:>6.3f}{tail}")
    print("\nwhere the passthrough e2e goes, medians in ms (device output = resampler + ring + device latency)")
    cols = ["e2e", *PART_NAMES[:-1], "resampler", "ring", "device_latency"]
    print(f"{'cf':>3} {'variant':>10} " + " ".join(f"{c[:12]:>12}" for c in cols))
    for r in rows:
        parts = r.get("parts") or {}
        print(f"{r['chunk_factor']:>3} {r['variant'] or '-':>10} " + " ".join(f"{_ms(parts.get(c)):>12}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
