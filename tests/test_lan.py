"""Two hosts on one machine: inference in its own network namespace (the "GPU box"), capture,
playback and the monitor in another, joined by a veth pair, CURVE on; then faults on that link.

Needs root, ``ip`` (iproute2) and, for packet loss, ``nft`` (nftables): without them every test
here skips and says why. Figures (e2e p50/p99 before/during/after, underruns, drops, recovery)
are printed: ``pytest -s tests/test_lan.py``; ``scripts/bench_lan.py`` runs longer faults.

What the fault tests hold the pipeline to: it never wedges (audio captured after the fault ends
is played within 5 s), e2e latency afterwards is back within a generous margin of before, and no
service crashed (every pid unchanged). Note that e2e of the chunks that *are* played stays flat
through a fault by design (playback plays on a fixed timeline and drops what comes too late), so
the damage shows in the ``played during`` share, underruns and drops, not in e2e.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from bus_helpers import chunk
from common.protocol import encode
from services.lab import netlab
from services.lab.harness import e2e_stats

REF = Path(__file__).resolve().parent / "data" / "llvc-reference"
RECOVERY_BOUND_MS = 5000.0


def require(need_nft: bool = False) -> None:
    reason = netlab.skip_reason(need_nft)
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def no_namespaces_left():
    """Every test leaves none of this process's namespaces behind, pass or fail."""
    yield
    left = [line.split()[0] for line in netlab._run("ip", "netns", "list", check=False).stdout.splitlines()
            if re.match(rf"llvc-(cap|gpu)-{os.getpid()}-", line)] if netlab.skip_reason() is None else []
    assert left == [], f"namespaces left behind: {left}"


def show(result: netlab.FaultResult, report: dict | None) -> None:
    print(f"\n{netlab.TABLE_HEAD}\n{result.row()}")
    print(f"  drops by cause: {result.drops or 'none'}; notes: {result.notes}")
    if report:
        print(f"  monitor report (capture host, whole run): e2e {report['e2e_latency_ms']}, "
              f"underruns {report['underruns']}, dropped {({k: v for k, v in report['dropped'].items() if v})}")


# --------------------------------------------------------------------------- the lab itself
def test_skip_reasons_name_what_is_missing(monkeypatch):
    """Runs anywhere: the reasons a non-root or tool-less machine gets."""
    monkeypatch.setattr(netlab.sys, "platform", "linux")
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 1000)
    assert "needs root" in netlab._probe(need_nft=False)
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netlab.shutil, "which", lambda tool: None if tool == "nft" else f"/usr/sbin/{tool}")
    assert "nftables" in netlab._probe(need_nft=True)
    monkeypatch.setattr(netlab.shutil, "which", lambda tool: None)
    assert "iproute2" in netlab._probe(need_nft=False)


def test_lab_is_removed_even_when_the_body_fails():
    require()
    with pytest.raises(RuntimeError, match="boom"):
        with netlab.NetLab() as lab:
            names = (lab.cap, lab.gpu)
            assert set(names) <= set(netlab._run("ip", "netns", "list").stdout.split())
            raise RuntimeError("boom")
    assert not set(names) & set(netlab._run("ip", "netns", "list").stdout.split())


def _echo_server(ready: threading.Event, address: tuple[str, int]) -> None:
    with socket.create_server(address) as srv:
        ready.set()
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def _round_trips(address: tuple[str, int], n: int) -> list[tuple[bytes, float]]:
    out = []
    with socket.create_connection(address, timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(n):
            msg = f"{i:08d}".encode()
            t = time.monotonic()
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += s.recv(len(msg) - len(got))
            out.append((got, (time.monotonic() - t) * 1000))
            time.sleep(0.005)
    return out


def test_relay_delays_each_direction_and_keeps_the_bytes_in_order():
    """An echo in the GPU box, reached through the relay: every round trip crosses it twice."""
    require()
    with netlab.NetLab() as lab:
        ready = threading.Event()
        server = threading.Thread(target=netlab.in_netns, args=(lab.gpu, _echo_server, ready, (lab.gpu_ip, 7000)),
                                  daemon=True)
        server.start()
        assert ready.wait(10)
        relay = lab.relay(7100, f"{lab.gpu_ip}:7000", delay_ms=5, jitter_ms=3, seed=3)
        trips = netlab.in_netns(lab.cap, _round_trips, ("127.0.0.1", 7100), 40)
        stats = relay.stop()
    assert [got for got, _ in trips] == [f"{i:08d}".encode() for i in range(40)]
    rtts = sorted(ms for _, ms in trips)
    # Each direction holds 2..8 ms: a round trip is never below 4 ms; scheduling only adds.
    assert rtts[0] >= 3.9, rtts
    assert 6 <= rtts[len(rtts) // 2] < 100, rtts
    assert stats["chunks"] == 80 and 2 <= stats["mean_hold_ms"] <= 8.5, stats
    print(f"\nrelay 5±3 ms, round trip through it twice: min {rtts[0]:.1f} p50 {rtts[20]:.1f} "
          f"max {rtts[-1]:.1f} ms; {stats}")


# --------------------------------------------------------------------------- the pipeline
def _hostile_clients(address: str, server_public: bytes, stream_id: str) -> int:
    """A plaintext PUSH and a CURVE PUSH with an unknown key, each offering chunks; returns how many were queued."""
    ctx = zmq.Context()
    queued = 0
    try:
        plain = ctx.socket(zmq.PUSH)
        stranger = ctx.socket(zmq.PUSH)
        public, secret = zmq.curve_keypair()
        stranger.curve_publickey, stranger.curve_secretkey, stranger.curve_serverkey = public, secret, server_public
        for s in (plain, stranger):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDTIMEO, 0)
            s.connect(address)
        for seq in range(40):
            for s in (plain, stranger):
                try:
                    s.send(encode(chunk(seq, stream=stream_id)), zmq.NOBLOCK)
                    queued += 1
                except zmq.Again:
                    pass
            time.sleep(0.025)
        plain.close(0)
        stranger.close(0)
    finally:
        ctx.term()
    return queued


@pytest.mark.timeout(150)
def test_two_hosts_with_curve_end_to_end_real_model(tmp_path):
    """The LLVC fixture model in the GPU box; the capture host hears it; strangers get nothing in."""
    require()
    model = ["-p", str(REF / "ref_default.pth"), "-c", str(REF / "config.json")]
    with netlab.LanPipeline(tmp_path, model_args=model) as lp:
        lp.cap_run.wait_streaming(3.0, timeout=120)
        pids = lp.pids()
        t0 = time.monotonic_ns()
        counts0 = lp.counters_at(t0)
        intruder = "intruder-" + os.urandom(4).hex()
        server_public, _ = zmq.auth.load_certificate(tmp_path / "keys" / "server.key")
        netlab.in_netns(lp.lab.cap, _hostile_clients, f"tcp://{lp.lab.gpu_ip}:{netlab.PORTS['audio_in']}",
                        server_public, intruder)
        time.sleep(3.0)
        t1 = time.monotonic_ns()
        time.sleep(0.6)  # the heartbeats that carry counters up to t1
        counts1 = lp.counters_at(time.monotonic_ns())
        played = [p for p in lp.observer.played(t0) if p.t_capture_ns < t1]
        inference_msgs = lp.observer.select(service="inference")
        assert lp.pids() == pids
        beat = lp.observer.last_heartbeat("inference")
        model_info = beat.status.model if beat else None
    stats = e2e_stats(played)
    drops = netlab._delta(counts1, counts0, lambda n: n.startswith("dropped_"))
    expected = (t1 - t0) / netlab.CHUNK_NS
    print(f"\nclean, two hosts, CURVE, LLVC fixture model: e2e p50 {stats['p50']:.1f} p99 {stats['p99']:.1f} ms "
          f"over {stats['n']} chunks ({expected:.0f} expected); drops {drops}; model {model_info}")
    if lp.report:
        print(f"  monitor report: e2e {lp.report['e2e_latency_ms']}, underruns {lp.report['underruns']}")
    # The link carries the audio. How much of it plays in time is the machine's: ~100 % here, but
    # with the real model on 2 shared cores other jobs make chunks late or inference fall behind
    # (seen: 0, 12 of 309, 26 of 310 in a slow full-suite run, 90 of 311 on a CI machine whose
    # compute step was 3x this one's, 124 of 313 with a busy core beside the test), which has
    # nothing to do with the link. Drops of any other kind are the link's.
    assert stats["n"] >= 0.5 * expected, stats
    assert 15.0 < stats["p50"] <= stats["p99"] < 200.0, stats
    timing = drops["dropped_late"] + drops["dropped_overflow"] + drops["dropped_inference_backlog"]
    assert timing <= 0.5 * expected and sum(drops.values()) - timing <= 3, drops
    # Neither the plaintext client nor the stranger's key got a chunk into inference.
    assert inference_msgs, "no telemetry from the GPU box reached the capture host"
    assert not [m for _, m in inference_msgs if getattr(m, "stream_id", None) == intruder
                or getattr(getattr(m, "status", None), "stream_id", None) == intruder]
    assert lp.report is not None and lp.report["model"]["untrained"] is False


# Loss at 20 % only (5 % behaved the same, a milder case of it; dropped to keep the suite's time).
FAULTS = ["loss 20%", "link down 2 s", "relay 5±3 ms"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", FAULTS)
def test_fault_on_the_link_then_recovery(tmp_path, name):
    require(need_nft=name.startswith("loss"))
    spec = netlab.scenarios(fault_s=4.0)[name]
    result, report = netlab.run_scenario(tmp_path, name, spec, warmup_s=2.0, before_s=3.0, after_s=3.0)
    show(result, report)
    assert result.pids_after == result.pids_before, "a service was restarted (crashed?) during the fault"
    assert result.recovery_ms is not None and result.recovery_ms < RECOVERY_BOUND_MS, \
        f"audio captured after the fault was not played within {RECOVERY_BOUND_MS:.0f} ms: {result}"
    before, after = result.before["p50"], result.after["p50"]
    assert result.before["n"] > 100 and result.after["n"] > 100, result
    assert after <= max(before + 10.0, 1.5 * before), f"latency did not come back: {before} -> {after} ms"
