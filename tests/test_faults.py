"""Faults on the running pipeline: services killed and restarted, inference overloaded.

Real everything: ``llvc run`` starts supervisord and the four services; faults are SIGKILL, the
real ``supervisorctl restart``, and a slow inference (the test hook ``LLVC_TEST_SLOW_STEP``, never
a setting, which sleeps inside each step exactly where a slow machine would spend the time). What
happened is read from the telemetry bus (services/lab/harness.py). Recovery times are printed (``pytest -s``)
and benchmarked in scripts/bench_reliability.py; the assertions here are behaviour with wide
margins, since CI machines are noisy.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.telemetry import Heartbeat
from models.spec import ModelSpec
from services.inference import SLOW_STEP_ENV
from services.lab.endpoints import private_sets
from services.lab.harness import RunningPipeline, e2e_stats, final_counters, restart_fault

REF = Path(__file__).resolve().parent / "data" / "llvc-reference"
LLVC_FIXTURE = ["-p", str(REF / "ref_default.pth"), "-c", str(REF / "config.json")]
#: One chunk at chunk factor 1: the fixture's geometry, and the default model's (passthrough) too.
CHUNK_MS = ModelSpec.resolve(REF / "ref_default.pth", REF / "config.json").geometry.chunk_ms
assert CHUNK_MS == ModelSpec.resolve(None, None).geometry.chunk_ms


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def check_recovered(r: dict) -> None:
    """What every restart must satisfy (the figures themselves are printed, not asserted tight)."""
    svc = r["service"]
    print(f"\n{r['fault']:>22} {svc:<9} recovery {r['recovery_ms']:7.1f} ms  silence {r['silence_ms']:7.1f} ms  "
          f"missing {r['missing_chunks']:3d} chunks  "
          f"e2e p50 before {r['before']['p50']} after {r['after']['p50']} (from {r['after_from_ms']:.0f} ms)")
    others = {k: v for k, v in r["pids_before"].items() if k != svc}
    assert {k: r["pids_after"][k] for k in others} == others, "another service was restarted"
    assert r["pids_after"][svc] not in (0, r["pids_before"][svc]), "the service did not get a new process"
    assert r["stale_replayed"] == 0, "audio from before the fault was played after recovery"
    assert r["recovery_ms"] < 15_000  # targets (2 s inference, 1 s others) are benchmarked, not asserted
    assert r["after"]["n"] > 50, "audio did not keep flowing after recovery"
    # Latency comes back to its pre-fault level: no stale backlog is kept anywhere. A stale chunk
    # kept anywhere adds a whole chunk; less than that is a restarted playback re-settling on a
    # slow machine (one full-suite run: +9.7 ms after kill -9 of playback). A loaded machine
    # moves e2e by more than that on its own (one busy core beside this test: 84 -> 98 ms around
    # a playback restart), so the bound grows with the level it starts from.
    assert r["after"]["p50"] <= r["before"]["p50"] + max(CHUNK_MS - 1.0, 0.25 * r["before"]["p50"]), r


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["kill", "restart"])
def test_each_service_restarted_in_turn_the_others_keep_running_and_audio_resumes(tmp_path, how):
    run_dir = tmp_path / "run"
    with RunningPipeline(run_dir, ["--source", "tone", "--sink", "null", *LLVC_FIXTURE], private_sets()) as p:
        p.wait_streaming(3)
        obs = p.observer
        results = {}
        for svc in ("monitor", "capture", "playback", "inference"):
            results[svc] = r = restart_fault(p, svc, how, CHUNK_MS)
            check_recovered(r)
        report = p.stop()

    # The monitor's return: a new monitor lost no audio (it is not on the audio path) ...
    m = results["monitor"]
    # ... up to CPU contention: a process starting on a loaded 2-core machine makes chunks late
    # (the monitor runs at nice 10 for that reason): 1-6 of 50-95 alone, 12-30 of 50-75 with the
    # rest of the suite or one busy core beside it, before and after issue 14 alike, and 34 of 60
    # and 38 of 75 in two fresh-clone suite runs since (issue 18; the audio services' CPU use
    # measured unchanged within 3-7 %). On the audio path, every chunk of its restart time would
    # be missing instead: at most two thirds is the bound.
    during = m["recovery_ms"] / CHUNK_MS
    print(f"monitor restart: {m['missing_chunks']} of the {during:.0f} chunks of its recovery time missing")
    assert m["missing_chunks"] <= max(3.0, 2 * during / 3), m
    # ... and restarted its counters cleanly: the final report (from the new monitor) sums each
    # playback process's last counters exactly once, the processes before its start included
    # (their counters arrive in nothing it saw, so only the live ones count).
    assert report is not None, p.text()[-2000:]
    assert report["services"]["capture"]["restarts"] >= 1 and report["services"]["inference"]["restarts"] >= 1
    # Each process's last counters: what its final heartbeat carried, which its log repeats (the
    # observer here may not read that heartbeat before this assertion needs it); a process
    # killed with SIGKILL sent none, so its last heartbeat holds them. Exact: the monitor reads
    # every final heartbeat (test_bus: what a stopped publisher sent last is still read).
    final = final_counters(run_dir / "playback.log")
    last = {msg.pid: msg.counters.get("underruns", 0) for _, msg in obs.select(Heartbeat, "playback", m["t_back_ns"])}
    expected = {pid: final[pid].get("underruns", 0) if pid in final else n for pid, n in last.items()}
    print(f"playback underruns per process: last heartbeats {last}, final {expected}; report {report['underruns']}")
    assert report["underruns"] == sum(expected.values()), (report["underruns"], expected)

    # A restarted capture starts a new stream; inference resets for it; playback starts it.
    # (Read from inference and playback, whose publishers lived through it: the new capture's
    # own first events may go out before a subscriber has reconnected to its new publisher.)
    c = results["capture"]
    old_ids = {x.stream_id for x in obs.played() if x.t_ns < c["t_fault_ns"]}
    new_id = next(x.stream_id for x in obs.played(c["t_back_ns"]))
    assert new_id not in old_ids, "the restarted capture did not start a new stream"
    resets = [d for _, d in obs.events("reset", "inference", c["t_fault_ns"]) if d.reason == "new_stream"]
    assert resets and resets[0].stream_id == new_id
    assert new_id in [d.stream_id for _, d in obs.events("stream_start", "playback", c["t_fault_ns"])]
    # Playback's silence is the gap, not more: the new stream plays as soon as it arrives. The
    # gap begins when capture is asked to stop (it sends nothing more from SIGTERM on), which a
    # restart's recovery time, counted from when the old process was gone, leaves out: 367 ms
    # of it on a loaded CI machine (silence 1096 ms, recovery 730 ms).
    stopping_ms = (c["t_fault_ns"] - c["t_asked_ns"]) / 1e6
    print(f"capture: silence {c['silence_ms']:.0f} ms, recovery {c['recovery_ms']:.0f} ms "
          f"after a stop that took {stopping_ms:.0f} ms")
    assert c["silence_ms"] <= c["recovery_ms"] + stopping_ms + 200, c
    # The monitor reported each restart (the events it publishes on the bus).
    seen = {d.service_name for _, d in obs.events("service_restarted", "monitor")} | \
        {d.service_name for _, d in obs.events("service_back", "monitor") if d.restarted}
    assert {"capture", "playback", "inference"} <= seen, seen


@pytest.mark.timeout(240)
def test_overloaded_inference_stays_bounded_is_reported_and_recovers(tmp_path):
    run_dir = tmp_path / "run"
    # 20 ms of work per 13 ms chunk, for 6 s after the first step; the passthrough model keeps
    # the rest of the machine quiet.
    sets = private_sets("monitor.status_interval_s=0.5")
    with RunningPipeline(run_dir, ["--source", "tone", "--sink", "null", "--passthrough"], sets,
                         env={SLOW_STEP_ENV: "20:6"}) as p:
        p.wait_streaming(0.5)
        obs = p.observer
        pid = p.pids()["inference"]
        t0 = time.monotonic_ns()
        rss0 = rss_kb(pid)
        assert next(iter(obs.events("overloaded", "monitor")), None) or \
            obs_wait(lambda: obs.events("overloaded", "monitor"), 10), "the monitor never said overloaded"
        time.sleep(3)
        rss1 = rss_kb(pid)
        during = e2e_stats(obs.played(t0))
        during_s = (time.monotonic_ns() - t0) / 1e9
        assert obs_wait(lambda: obs.events("overload_cleared", "monitor"), 20), "overload never cleared"
        t_clear = obs.events("overload_cleared", "monitor")[0][0]
        time.sleep(3)
        after = e2e_stats(obs.played(t_clear + 1_000_000_000))
        counters = obs.counters("inference")
        lines = [d.line for _, d in obs.events("status", "monitor")]
        report = p.stop()
    played_rate = during["n"] / during_s / (1000 / CHUNK_MS)  # of real time's 77 chunks/s
    print(f"\noverload: e2e during p50 {during['p50']} p99 {during['p99']}, after p50 {after['p50']}; "
          f"{during['n']} chunks played in {during_s:.1f} s ({100 * played_rate:.0f}% of real time); "
          f"inference RSS {rss0} -> {rss1} kB; backlog drops {counters.get('dropped_inference_backlog')}")
    # Bounded latency: inference drops backlog beyond max_backlog_ms (40), playback's timeline
    # grows at most to max_ms (60); and what inference still produces (at most 13 of every 20 ms,
    # less the backlog it drops) keeps playing: measured 28-35% of real time here; the bound is
    # wide because a busy 2-core machine slows everything further, and nothing at all would be 0.
    assert during["p99"] < 150, during
    assert played_rate > 0.1, (during, during_s)
    assert counters["dropped_inference_backlog"] > 0
    assert rss1 - rss0 < 20_000, "memory grew while overloaded"  # kB; a queue would grow without bound
    assert any(line.startswith("OVERLOADED") for line in lines)
    assert after["n"] > 50 and after["p50"] < 40, after
    assert report["overload"]["episodes"] >= 1 and report["overload"]["now"] is False


def obs_wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
