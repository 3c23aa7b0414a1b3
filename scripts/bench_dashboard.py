"""Benchmark what the dashboard costs the pipeline: e2e latency, underruns and inference time
with no dashboard, with the dashboard and no browser, and with browsers open, side by side.

Each setting is one ``llvc run`` (real processes under supervisord) of ``--seconds`` at chunk
factor 1, a looped LibriSpeech clip through the default model into a null sink. Settings:

* ``no sound frames``: ``--no-dashboard`` and ``bus.sound_frame_s=0`` (capture and playback
  measure no levels): the pipeline as it was before the dashboard;
* ``no dashboard``: ``--no-dashboard`` (level frames published, nobody reading them);
* ``dashboard``: the dashboard running, no page open;
* ``dashboard + N browsers``: N headless Chromium pages open on it (``--browsers``, default 3).

The rows are run in turn, ``--rounds`` times over (interleaved, so a drift of the machine falls
on every setting alike); the table shows each setting's figures over all its rounds: the
monitor's whole-run e2e p50/p99 (median of the rounds), underruns per 1000 chunks, inference
p50, and the CPU the dashboard and the browsers took (``/proc``). Not a test: numbers depend on
the machine.

    .venv/bin/python scripts/bench_dashboard.py                  # 60 s per setting, 1 round
    .venv/bin/python scripts/bench_dashboard.py --seconds 20 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.lab.endpoints import private_sets  # noqa: E402
from services.lab.harness import RunningPipeline  # noqa: E402

CLIP = REPO / "tests" / "data" / "174-50561-0000.wav"
CHROMIUM = "/usr/bin/chromium"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their children so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        except (OSError, IndexError):
            pass
    return total / TICKS


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def run_setting(name: str, seconds: float, dashboard: bool, browsers: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="llvc-bench-dash-") as tmp:
        sets = private_sets("capture.loop=true", *extra)
        port = int(next(s for s in sets if s.startswith("dashboard.bind=")).rsplit(":", 1)[1].rstrip('"'))
        args = ["--source", f"file:{CLIP}", "--sink", "null"] + ([] if dashboard else ["--no-dashboard"])
        p = RunningPipeline(Path(tmp) / "run", args, sets, observe=True).start()
        pw = browser = None
        try:
            p.wait_streaming(2)
            dash_pid = p.pids().get("dashboard", 0)
            pages = []
            if browsers:
                from playwright.sync_api import sync_playwright

                pw = sync_playwright().start()
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                for _ in range(browsers):
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    page.goto(f"http://127.0.0.1:{port}/")
                    pages.append(page)
            # The browsers: everything this process started but the pipeline (playwright's driver
            # and the Chromium processes under it).
            browser_pids = (sorted(set(descendants(os.getpid())) - set(descendants(p.proc.pid)) - {os.getpid()})
                            if browser is not None else [])
            watched = ([dash_pid] if dash_pid else [])
            c0, b0, t0 = cpu_seconds(watched), cpu_seconds(browser_pids), time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - t0
            dash_cpu = (cpu_seconds(watched) - c0) / elapsed * 100
            browser_cpu = (cpu_seconds(browser_pids) - b0) / elapsed * 100
            updates = [pg.evaluate("window.llvcDashboard ? window.llvcDashboard.updates : 0") for pg in pages]
        finally:
            if browser is not None:
                browser.close()
            if pw is not None:
                pw.stop()
            report = p.stop()
        if report is None:
            raise SystemExit(f"{name}: no report:\n{p.text()[-2000:]}")
        return {"report": report, "dashboard_cpu_pct": dash_cpu, "browser_cpu_pct": browser_cpu,
                "page_updates_per_s": [u / seconds for u in updates]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--browsers", type=int, default=3)
    ap.add_argument("--json", metavar="PATH", help="also write every round's figures here")
    args = ap.parse_args()
    settings = [("no sound frames", False, 0, ["bus.sound_frame_s=0"]), ("no dashboard", False, 0, []),
                ("dashboard", True, 0, []), (f"dashboard + {args.browsers} browsers", True, args.browsers, [])]
    rounds: dict[str, list[dict]] = {name: [] for name, *_ in settings}
    for r in range(args.rounds):
        for name, dashboard, browsers, extra in settings:
            print(f"round {r + 1}/{args.rounds}: {name} ({args.seconds:g} s)", file=sys.stderr, flush=True)
            rounds[name].append(run_setting(name, args.seconds, dashboard, browsers, extra))
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=2))
    print(f"dashboard cost: {args.seconds:g} s x {args.rounds} per setting, cf 1, default model, null sink, "
          f"looped {CLIP.name}")
    head = (f"{'setting':<24} {'e2e p50':>8} {'e2e p99':>8} {'underruns':>9} {'per 1k':>7} {'inf p50':>8} "
            f"{'dash CPU %':>10} {'browsers CPU %':>14} {'page upd/s':>10}")
    print(head)
    print("-" * len(head))
    for name, *_ in settings:
        rs = rounds[name]
        med = lambda f: statistics.median(f(x) for x in rs)  # noqa: E731 - a local shorthand
        under = sum(x["report"]["underruns"] for x in rs)
        chunks = sum(x["report"]["chunks"] for x in rs)
        upd = [u for x in rs for u in x["page_updates_per_s"]]
        print(f"{name:<24} {med(lambda x: x['report']['e2e_latency_ms']['p50']):>8.2f} "
              f"{med(lambda x: x['report']['e2e_latency_ms']['p99']):>8.2f} {under:>9} "
              f"{1000 * under / max(chunks, 1):>7.2f} {med(lambda x: x['report']['inference_ms']['p50']):>8.2f} "
              f"{med(lambda x: x['dashboard_cpu_pct']):>10.1f} {med(lambda x: x['browser_cpu_pct']):>14.1f} "
              f"{(statistics.median(upd) if upd else 0):>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
