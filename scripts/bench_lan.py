"""Benchmark the two-host pipeline under faults on the link: loss, link down, delay/jitter.

Each scenario gets a fresh pair of network namespaces (capture host, GPU box) joined by a veth
pair, CURVE on, the passthrough model, a tone source and a null sink (see tests/netlab.py), and
plays ``--before`` s clean, the fault for ``--fault`` s (link down: 2 s and ``--fault`` s), then
``--after`` s. Needs root, iproute2 and nftables. Not a test: numbers depend on the machine.

Columns: e2e p50/p99 (ms) of the chunks played, by capture time before / during / after the
fault ("after" starts 1 s after recovery); "played during" = share of the audio captured during
the fault whose chunk start was played; underruns and drops (all dropped_* counters of capture,
inference and playback) from the fault's start to the end; recovery = first chunk played that
was captured after the fault ended, minus the fault's end.

    sudo .venv/bin/python scripts/bench_lan.py                      # every scenario, 10 s faults
    sudo .venv/bin/python scripts/bench_lan.py --fault 4 --only "loss 20%" --keep /tmp/lan-runs
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from services.lab import netlab

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fault", type=float, default=10.0, help="seconds each fault lasts (link down: also 2 s)")
    ap.add_argument("--before", type=float, default=5.0, help="seconds measured before the fault")
    ap.add_argument("--after", type=float, default=5.0, help="seconds measured after recovery")
    ap.add_argument("--only", action="append", help="run only this scenario (repeatable)")
    ap.add_argument("--keep", help="keep each scenario's run folders (logs, reports) under this folder")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = ap.parse_args()
    all_scenarios = netlab.scenarios(args.fault)
    names = args.only or list(all_scenarios)
    unknown = [n for n in names if n not in all_scenarios]
    if unknown:
        raise SystemExit(f"unknown scenario {unknown[0]!r}; known: {', '.join(all_scenarios)}")
    reason = netlab.skip_reason(need_nft=any(n.startswith("loss") for n in names))
    if reason:
        raise SystemExit(f"bench_lan: cannot run here: {reason}")
    results = []
    for i, name in enumerate(names):
        print(f"bench_lan: {name} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="llvc-lan-") as tmp:
            folder = Path(args.keep) / f"{i}-{name.replace(' ', '_').replace('%', 'pct')}" if args.keep else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            result, report = netlab.run_scenario(folder, name, all_scenarios[name], warmup_s=2.0,
                                                 before_s=args.before, after_s=args.after)
        results.append((result, report))
    if args.json:
        print(json.dumps([{**dataclasses.asdict(r), "report": rep} for r, rep in results], indent=2, default=str))
        return 0
    print(f"two hosts (network namespaces, veth, CURVE on), passthrough model, chunk 13 ms: "
          f"{args.before:g} s before, fault {args.fault:g} s (link down as named), {args.after:g} s after")
    print(netlab.TABLE_HEAD)
    print("-" * len(netlab.TABLE_HEAD.splitlines()[-1]))
    for r, _ in results:
        print(r.row())
    print()
    for r, _ in results:
        same = ("all pids unchanged" if r.pids_after == r.pids_before
                else f"PIDS CHANGED {r.pids_before} -> {r.pids_after}")
        print(f"{r.scenario}: drops {r.drops or 'none'}; {same}; {r.notes or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
