#!/usr/bin/env python3
"""Reliability benchmark: restarts, overload and a soak run of the real pipeline, as tables.

    .venv/bin/python scripts/bench_reliability.py restarts [--repeat 3]     # ~2 min
    .venv/bin/python scripts/bench_reliability.py overload                  # ~1 min
    .venv/bin/python scripts/bench_reliability.py soak [--minutes 10]       # 10 min
    .venv/bin/python scripts/bench_reliability.py all --json out/reliability.json

Everything runs through ``llvc run`` (real supervisord, real services) with the default model
(the embedded demo voice; its enc_dim/dec_dim are half of upstream's, so its steps are cheaper
than upstream's model's) at chunk factor 1, a tone source and the null sink, observed from the
telemetry bus (tests/harness.py). Not part of the test suite: the tests in tests/test_faults.py
assert the behaviour with wide margins; this measures it. Two-host faults (loss, link down,
delay) are in scripts/bench_lan.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common.telemetry import Heartbeat, InferenceChunk
from models.spec import ModelSpec
from services.inference import SLOW_STEP_ENV
from services.lab.endpoints import private_sets
from services.lab.harness import RunningPipeline, e2e_stats, restart_fault

CHUNK_MS = ModelSpec.resolve(None, None).geometry.chunk_ms  # the default model's, at chunk factor 1
SERVICES = ("capture", "playback", "inference", "monitor")


def pipeline(args: list[str], *extra: str, env: dict[str, str] | None = None) -> RunningPipeline:
    run_dir = Path(tempfile.mkdtemp(prefix="llvc-bench-rel-")) / "run"
    return RunningPipeline(run_dir, ["--source", "tone", "--sink", "null", *args], private_sets(*extra), env=env)


def fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


# --------------------------------------------------------------------------- restarts
def bench_restarts(repeat: int) -> list[dict]:
    """Each service killed (SIGKILL) and restarted (supervisorctl), ``repeat`` times each."""
    results = []
    with pipeline([]) as p:
        p.wait_streaming(5)
        for how in ("kill", "restart"):
            for svc in SERVICES:
                for _ in range(repeat):
                    r = restart_fault(p, svc, how, CHUNK_MS)
                    others_same = all(r["pids_after"][k] == v for k, v in r["pids_before"].items() if k != svc)
                    results.append({k: r[k] for k in ("service", "fault", "recovery_ms", "silence_ms",
                                                      "missing_chunks", "before", "after", "stale_replayed")}
                                   | {"others_kept_pid": others_same})
        report = p.stop()
    rows = []
    for how in ("kill -9", "supervisorctl restart"):
        for svc in SERVICES:
            rs = [r for r in results if r["service"] == svc and r["fault"] == how]
            rec = [r["recovery_ms"] for r in rs]
            rows.append([how, svc, fmt(float(np.median(rec))), fmt(max(rec)),
                         fmt(float(np.median([r["silence_ms"] for r in rs]))),
                         fmt(float(np.median([r["before"]["p50"] for r in rs]))),
                         fmt(float(np.median([r["after"]["p50"] for r in rs]))),
                         str(sum(r["stale_replayed"] for r in rs)),
                         "yes" if all(r["others_kept_pid"] for r in rs) else "NO"])
    print(f"\nRestarts ({repeat} each; recovery = fault to first chunk played that was captured after it; "
          "monitor: to its first heartbeat)")
    print_table(["fault", "service", "recovery p50 ms", "max ms", "silence ms", "e2e p50 before", "e2e p50 after",
                 "stale chunks", "others kept pid"], rows)
    print(f"run totals: underruns {report['underruns']}, dropped {report['dropped']}, resets {report['resets']}")
    return results


# --------------------------------------------------------------------------- overload
def bench_overload(delay_ms: float = 20.0, seconds: float = 10.0) -> dict:
    """Inference slowed to ``delay_ms`` per step (13 ms chunks) for ``seconds``, then normal again."""
    with pipeline([], "monitor.status_interval_s=0.5", env={SLOW_STEP_ENV: f"{delay_ms}:{seconds}"}) as p:
        obs = p.observer
        p.wait_streaming(1)
        t0 = time.monotonic_ns()
        pid = p.pids()["inference"]
        rss = [_rss_mb(pid)]
        while not obs.events("overload_cleared", "monitor") and time.monotonic_ns() - t0 < (seconds + 20) * 1e9:
            time.sleep(1)
            rss.append(_rss_mb(pid))
        cleared = obs.events("overload_cleared", "monitor")
        t_clear = cleared[0][0] if cleared else time.monotonic_ns()
        time.sleep(5)
        during = e2e_stats([x for x in obs.played(t0) if x.t_ns < t_clear])
        after_played = obs.played(t_clear)
        normal = [x for x in after_played if x.e2e_ms <= 40]
        after = e2e_stats(obs.played(t_clear + 2_000_000_000))
        counters_i, counters_p = obs.counters("inference"), obs.counters("playback")
        overloaded = obs.events("overloaded", "monitor")
        report = p.stop()
    steps = obs.select(InferenceChunk, "inference")
    t_first = steps[0][0] if steps else t0  # the slowdown starts with the first step
    out = {"delay_ms": delay_ms, "during": during, "after": after,
           "said_overloaded_after_ms": (overloaded[0][0] - t_first) / 1e6 if overloaded else None,
           "back_to_normal_after_clear_ms": (normal[0].t_ns - t_clear) / 1e6 if normal else None,
           "rss_mb_min_max": [min(rss), max(rss)],
           "backlog_dropped": counters_i.get("dropped_inference_backlog"),
           "late_dropped": counters_p.get("dropped_late"), "timeline_grows": counters_p.get("timeline_grows"),
           "overload": report["overload"] if report else None}
    print(f"\nOverload: inference {delay_ms:g} ms per {CHUNK_MS:g} ms step for {seconds:g} s")
    print_table(["phase", "chunks played", "e2e p50 ms", "e2e p99 ms"],
                [["during", str(during["n"]), fmt(during["p50"]), fmt(during["p99"])],
                 ["after (from clear + 2 s)", str(after["n"]), fmt(after["p50"]), fmt(after["p99"])]])
    print(f"monitor said overloaded {fmt(out['said_overloaded_after_ms'], 0)} ms after the first slow step; "
          f"latency <= 40 ms again {fmt(out['back_to_normal_after_clear_ms'], 0)} ms after it cleared; "
          f"inference RSS {out['rss_mb_min_max'][0]:.1f}-{out['rss_mb_min_max'][1]:.1f} MB; "
          f"backlog chunks dropped {out['backlog_dropped']}, late chunks dropped {out['late_dropped']}, "
          f"timeline grew {out['timeline_grows']} times")
    return out


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- soak
def bench_soak(minutes: float) -> dict:
    """The pipeline for ``minutes``: RSS of every service each 10 s, e2e per minute, drops."""
    with pipeline([]) as p:
        obs = p.observer
        p.wait_streaming(2)
        pids = p.pids()
        t0 = time.monotonic_ns()
        samples = []
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            samples.append({name: _rss_mb(pid) for name, pid in pids.items() if pid})
            time.sleep(10)
        samples.append({name: _rss_mb(pid) for name, pid in pids.items() if pid})
        played = obs.played(t0)
        episodes = drop_episodes(obs, t0)
        report = p.stop()
        restarted = {k: v for k, v in restarts_by_service(pids, report).items() if v}
    minute_ns = 60_000_000_000
    first = e2e_stats([x for x in played if x.t_ns < t0 + minute_ns])
    last_start = played[-1].t_ns - minute_ns if played else t0
    last = e2e_stats([x for x in played if x.t_ns >= last_start])
    # Growth from the first sample after warm-up (the second) to the last: Python's allocator
    # settles in the first seconds.
    growth = {n: (samples[-1][n] - samples[1][n]) / samples[1][n] * 100 for n in samples[0] if n in samples[-1]}
    out = {"minutes": minutes, "rss_mb_first": samples[1], "rss_mb_last": samples[-1], "rss_growth_pct": growth,
           "e2e_first_minute": first, "e2e_last_minute": last,
           "p99_change_pct": (last["p99"] - first["p99"]) / first["p99"] * 100 if first["p99"] else None,
           "underruns": report["underruns"] if report else None, "dropped": report["dropped"] if report else None,
           "chunks": report["chunks"] if report else None, "restarted": restarted,
           "drop_episodes": episodes}
    print(f"\nSoak: {minutes:g} min, RSS sampled every 10 s")
    print_table(["service", "RSS first MB", "RSS last MB", "growth %"],
                [[n, fmt(samples[1][n]), fmt(samples[-1][n]), fmt(growth[n], 2)] for n in growth])
    print_table(["window", "chunks", "e2e p50 ms", "e2e p99 ms"],
                [["first minute", str(first["n"]), fmt(first["p50"]), fmt(first["p99"])],
                 ["last minute", str(last["n"]), fmt(last["p50"]), fmt(last["p99"])]])
    print(f"p99 change {fmt(out['p99_change_pct'])} %; underruns {out['underruns']}, dropped {out['dropped']}, "
          f"chunks {out['chunks']}, restarts {restarted or 'none'}")
    causes: dict[str, int] = {}
    for e in episodes:
        causes[e["cause"]] = causes.get(e["cause"], 0) + e["chunks"]
    print(f"drop episodes: {len(episodes)}; chunks dropped by cause: {causes or 'none'}")
    return out


def drop_episodes(obs, since_ns: int) -> list[dict]:
    """Each heartbeat interval in which playback dropped or invented audio, with its likely cause.

    A chunk is late when it arrives more than ``target_ms`` after the timeline expects it. If an
    inference step around that time took ``target_ms`` longer than the typical step, the
    processing spike explains it; otherwise the cause is scheduling or transport (no step was
    slow, so a process was not run in time).
    """
    beats = [(t, m) for t, m in obs.select(Heartbeat, "playback", since_ns)]
    steps = [(t, m.proc_ms) for t, m in obs.select(InferenceChunk, "inference", since_ns)]
    typical = float(np.median([ms for _, ms in steps])) if steps else 0.0
    out = []
    for (t0, a), (t1, b) in zip(beats, beats[1:]):
        ca, cb = a.counters, b.counters
        late = cb.get("dropped_late", 0) - ca.get("dropped_late", 0)
        under = cb.get("underruns", 0) - ca.get("underruns", 0)
        if a.pid != b.pid or (late <= 0 and under <= 0):
            continue
        target = b.status.target_ms
        near = [ms for t, ms in steps if t0 - 300_000_000 <= t <= t1]
        worst = max(near, default=0.0)
        cause = ("inference step spike (> typical + target_ms)" if worst > typical + target
                 else "scheduling/transport (no slow step)")
        out.append({"t_s": (t1 - since_ns) / 1e9, "late_chunks": late, "underruns": under,
                    "chunks": max(late, under), "worst_step_ms": worst, "cause": cause})
    return out


def restarts_by_service(pids: dict[str, int], report: dict | None) -> dict[str, int]:
    """Restarts per service as the monitor counted them (0 expected in a soak)."""
    services = (report or {}).get("services", {})
    return {n: services.get(n, {}).get("restarts", 0) for n in pids}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("restarts", "overload", "soak", "all"))
    ap.add_argument("--repeat", type=int, default=3, help="restarts: faults per service and kind")
    ap.add_argument("--minutes", type=float, default=10.0, help="soak: how long")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    figures = {}
    if args.what in ("restarts", "all"):
        figures["restarts"] = bench_restarts(args.repeat)
    if args.what in ("overload", "all"):
        figures["overload"] = bench_overload()
    if args.what in ("soak", "all"):
        figures["soak"] = bench_soak(args.minutes)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
