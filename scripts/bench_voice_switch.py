"""Benchmark what a live voice switch costs: time to swap, audio lost, underruns and late drops.

One ``llvc run`` per backend (real processes under supervisord, default settings: chunk factor
1, the 6 ms playout margin), a looped LibriSpeech clip into a null sink, starting on the embedded
demo voice. Every ``--every`` seconds the real ``llvc ctl voice`` switches to the other voice
(the demo voice <-> the upstream-size reference fixture, 2.5 M vs 0.5 M parameters), ``--switches``
times. For each switch, from the moment it was asked:

* ``ask→swap``: until the inference's ``voice`` event (phase ``swapped``) reached us;
* ``load``: what inference measured for the load itself (off the audio path);
* ``missing``: chunks of the stream that never played in the 2 s after asking (audio lost);
* ``underruns`` and ``late``: playback's counters over the same 2 s, beside the same counters
  over the 2 s just before asking (the baseline with no switch).

The first switch to a voice whose ONNX artifact is not cached exports it first (a child
process, ~10 s of one core); the rows say so. Not a test: numbers depend on the machine.

    .venv/bin/python scripts/bench_voice_switch.py
    .venv/bin/python scripts/bench_voice_switch.py --switches 6 --every 4 --backends auto
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.telemetry import Heartbeat, VoiceSwitch  # noqa: E402
from services.lab.endpoints import private_sets  # noqa: E402
from services.lab.harness import LLVC, RunningPipeline  # noqa: E402

CLIP = REPO / "tests" / "data" / "174-50561-0000.wav"
REF = REPO / "tests" / "data" / "llvc-reference"
WINDOW_S = 2.0


def playback_counters(p: RunningPipeline, t_ns: int) -> dict[str, int]:
    """Playback's counters (its current process) as of the last heartbeat before ``t_ns``."""
    beats = [m for t, m in p.observer.select(Heartbeat, "playback") if t <= t_ns]
    return dict(beats[-1].counters) if beats else {}


def delta(p: RunningPipeline, a_ns: int, b_ns: int) -> tuple[int, int]:
    """(underruns, late drops) between two instants, from playback's heartbeats."""
    a, b = playback_counters(p, a_ns), playback_counters(p, b_ns)
    return (b.get("underruns", 0) - a.get("underruns", 0),
            b.get("dropped_late", 0) - a.get("dropped_late", 0))


def missing(p: RunningPipeline, a_ns: int, b_ns: int, chunk_len: int) -> int:
    """Chunks of the stream's grid between the first and last played in the window that never played."""
    offs = sorted({x.offset for x in p.observer.played(a_ns) if x.t_ns <= b_ns})
    if len(offs) < 2:
        return 0
    return (offs[-1] - offs[0]) // chunk_len + 1 - len(offs)


def run_backend(backend: str, switches: int, every: float, voices: Path) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        sets = private_sets("capture.loop=true", f"inference.backend={backend}", f'inference.voices_dir="{voices}"')
        args = ["--source", f"file:{CLIP}", "--sink", "null", "--no-dashboard"]
        p = RunningPipeline(Path(tmp) / "run", args, sets).start()
        rows = []
        try:
            p.wait_streaming(3)
            names = ["ref", "demo_voice"]
            # Each switch is preceded by a `llvc ctl status` (the row "(status)"): what starting
            # the command alone costs a 2-core machine, beside what the switch costs.
            for k in range(2 * switches):
                time.sleep(every)
                target = names[k // 2 % 2] if k % 2 else "(status)"
                cmd = ["voice", "-p", target, "--wait", "300"] if k % 2 else ["status"]
                t_ask = time.monotonic_ns()
                done = subprocess.run([str(LLVC), "ctl", *cmd, *[a for s in sets for a in ("--set", s)]],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
                time.sleep(WINDOW_S + 0.6)  # the window, plus a heartbeat to close it
                ev = [(t, m) for t, m in p.observer.select(VoiceSwitch, "inference", t_ask) if m.phase == "swapped"]
                t_swap, swap = ev[0] if ev else (t_ask, VoiceSwitch("none", "", load_ms=0.0))
                end = t_ask + int(WINDOW_S * 1e9)
                under, late = delta(p, t_ask, end)
                base_under, base_late = delta(p, t_ask - int(WINDOW_S * 1e9), t_ask)
                rows.append({"backend": backend, "to": target, "ask_ms": (t_swap - t_ask) / 1e6,
                             "load_ms": swap.load_ms,
                             "missing": missing(p, t_ask, end, 208), "underruns": under, "late": late,
                             "base_underruns": base_under, "base_late": base_late,
                             "pids": len({m.pid for _, m in p.observer.select(Heartbeat, "inference")})})
        finally:
            p.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--switches", type=int, default=6)
    ap.add_argument("--every", type=float, default=4.0, help="seconds between switches")
    ap.add_argument("--backends", default="auto,eager",
                    help="comma-separated: auto (ONNX, exported when missing), eager")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as vt:
        voices = Path(vt)
        shutil.copy(REF / "ref_default.pth", voices / "ref.pth")
        shutil.copy(REF / "config.json", voices / "ref.json")
        rows = []
        for backend in a.backends.split(","):
            rows += run_backend(backend.strip(), a.switches, a.every, voices)
    print(f"\nvoice switches: {CLIP.name} looped, chunk factor 1, default playout margin; window {WINDOW_S:g} s "
          "after asking (baseline: the 2 s before)")
    print(f"{'backend':<8} {'to':<11} {'ask→swap ms':>12} {'load ms':>8} {'missing':>8} {'underruns':>10} "
          f"{'late':>5} {'base und.':>10} {'base late':>10} {'inference pids':>15}")
    for r in rows:
        print(f"{r['backend']:<8} {r['to']:<11} {r['ask_ms']:>12.0f} {r['load_ms']:>8.0f} {r['missing']:>8} "
              f"{r['underruns']:>10} {r['late']:>5} {r['base_underruns']:>10} {r['base_late']:>10} {r['pids']:>15}")
    for backend in a.backends.split(","):
        rs = [r for r in rows if r["backend"] == backend.strip() and r["to"] != "(status)"][1:]  # 1st: export
        if rs:
            print(f"{backend}: median ask→swap {statistics.median(r['ask_ms'] for r in rs):.0f} ms, load "
                  f"{statistics.median(r['load_ms'] for r in rs):.0f} ms; over {len(rs)} switches after the first: "
                  f"missing {sum(r['missing'] for r in rs)} chunks, underruns {sum(r['underruns'] for r in rs)} "
                  f"(baseline {sum(r['base_underruns'] for r in rs)}), late {sum(r['late'] for r in rs)} "
                  f"(baseline {sum(r['base_late'] for r in rs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
