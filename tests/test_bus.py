"""The bus over real ZeroMQ sockets (tcp loopback and ipc): delivery, drops, restarts, CURVE."""
from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from bus_helpers import chunk, make_config, wait_until
from common.bus import Bus, BusError
from common.protocol import encode, max_message_bytes
from common.security import SecurityError, init_keys, load_keys
from common.telemetry import Drained, Heartbeat, Underrun, make_message

LLVC = Path(sys.executable).parent / "llvc"


def receive_n(receiver, n: int, timeout: float = 5.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        c = receiver.recv(timeout_ms=50)
        if c is not None:
            got.append(c)
    return got


def assert_capture_still_served(cfg, rx, seq: int = 99) -> None:
    with Bus(cfg, "capture") as capture:
        tx = capture.audio_sender("audio_in")
        assert wait_until(lambda: tx.send(chunk(seq)), timeout=5)
        assert receive_n(rx, 1)[0].seq == seq


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_chunks_are_delivered_in_order_and_intact(scheme):
    cfg = make_config(scheme)
    with Bus(cfg, "inference") as inference, Bus(cfg, "capture") as capture:
        rx = inference.audio_receiver("audio_in")
        tx = capture.audio_sender("audio_in")
        sent = [chunk(i) for i in range(50)]
        for c in sent:
            # IMMEDIATE: sends fail until the connection is up; retry like a real-time loop would.
            assert wait_until(lambda: tx.send(c), timeout=5, interval=0.002)
            time.sleep(0.001)
        got = receive_n(rx, 50)
    assert [c.seq for c in got] == list(range(50))
    for a, b in zip(sent, got):
        assert np.array_equal(a.samples, b.samples) and a.t_capture_ns == b.t_capture_ns
    assert rx.rejected == 0 and rx.received == 50


def test_nothing_queues_for_an_absent_peer():
    """IMMEDIATE on the connecting side: with inference down, every send is a counted drop."""
    cfg = make_config("tcp")
    with Bus(cfg, "capture") as capture:
        tx = capture.audio_sender("audio_in")
        t0 = time.perf_counter()
        results = [tx.send(chunk(i)) for i in range(100)]
        elapsed = time.perf_counter() - t0
    assert not any(results) and tx.dropped == 100 and tx.sent == 0
    assert elapsed < 2.0  # never blocks (generous: 100 sends normally take ~1 ms)


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_stalled_receiver_costs_counted_drops_and_no_silent_loss(scheme):
    cfg = make_config(scheme)
    n = 20000  # ~17 MB of audio: more than any kernel socket buffer holds
    with Bus(cfg, "inference") as inference, Bus(cfg, "capture") as capture:
        rx = inference.audio_receiver("audio_in")
        tx = capture.audio_sender("audio_in")
        assert wait_until(lambda: tx.send(chunk(0)), timeout=5)
        tx.dropped = 0  # sends tried before the connection was up do not count here
        for i in range(1, n):
            tx.send(chunk(i))
        assert tx.sent + tx.dropped == n
        assert tx.dropped > 0, "a stalled receiver must cost drops"
        # Everything that was accepted for sending arrives: drops are the only loss, and counted.
        got = receive_n(rx, tx.sent, timeout=20)
        assert len(got) == tx.sent
        assert rx.recv(timeout_ms=200) is None
        seqs = [c.seq for c in got]
        assert seqs == sorted(seqs)


def test_receiver_restart_reconnects_by_itself():
    cfg = make_config("tcp")
    with Bus(cfg, "capture") as capture:
        tx = capture.audio_sender("audio_in")
        inference = Bus(cfg, "inference")
        rx = inference.audio_receiver("audio_in")
        assert wait_until(lambda: tx.send(chunk(1)), timeout=5)
        assert receive_n(rx, 1)[0].seq == 1
        inference.close()  # the peer goes away...
        assert wait_until(lambda: not tx.send(chunk(2)), timeout=5)  # ...sends become drops
        dropped_while_down = tx.dropped
        with Bus(cfg, "inference") as restarted:  # ...and comes back on the same address
            rx2 = restarted.audio_receiver("audio_in")
            assert wait_until(lambda: tx.send(chunk(3)), timeout=5)
            got = receive_n(rx2, 1)
        assert got and got[0].seq == 3
        assert dropped_while_down >= 1


def test_malformed_input_is_rejected_counted_and_the_stream_goes_on():
    cfg = make_config("tcp")
    with Bus(cfg, "inference") as inference:
        rx = inference.audio_receiver("audio_in")
        raw = _raw_pusher(cfg.endpoint("audio_in").connect)
        try:
            good = chunk(7)
            bad_rate = encode(dataclasses.replace(chunk(8), sample_rate=22050))
            for msg in (os.urandom(300), b"", encode(good)[:-10], bad_rate, encode(good)):
                raw.send(msg)
            got = receive_n(rx, 1)
            assert got and got[0].seq == 7
            assert wait_until(lambda: rx.recv() is not None or rx.rejected >= 3, timeout=2)
            assert rx.rejected >= 3 and rx.last_reject
            assert "\n" not in rx.last_reject
        finally:
            raw.close()


def test_oversized_message_never_reaches_the_application():
    cfg = make_config("tcp", "bus.max_samples=1000")
    with Bus(cfg, "inference") as inference:
        rx = inference.audio_receiver("audio_in")
        raw = _raw_pusher(cfg.endpoint("audio_in").connect)
        try:
            raw.send(b"\x00" * (max_message_bytes(1000) + 1))
            assert rx.recv(timeout_ms=500) is None
            assert rx.rejected == 0  # libzmq dropped it (and that peer) before we saw a byte
        finally:
            raw.close()
        assert_capture_still_served(cfg, rx)  # a well-behaved peer gets through afterwards


def test_telemetry_taps_attach_and_detach_freely():
    cfg = make_config("tcp")
    with Bus(cfg, "playback") as playback, Bus(cfg, "monitor") as monitor:
        pub = playback.publisher()
        events = monitor.subscriber(["event."])
        everything = monitor.subscriber()

        underrun = Underrun("s1", 1, 56, 3)

        def published_and_seen(sub, topic_prefix):
            pub.publish(underrun)
            pub.publish(Heartbeat(True, 1.0, {}))
            msg = sub.recv(timeout_ms=50)
            return msg is not None and msg.topic.startswith(topic_prefix)

        assert wait_until(lambda: published_and_seen(events, "event.playback"), timeout=5)
        assert wait_until(lambda: published_and_seen(everything, ""), timeout=5)
        # The event-only tap never sees a heartbeat.
        seen = [events.recv(timeout_ms=100) for _ in range(20)]
        assert all(m is None or isinstance(m, Underrun) for m in seen)
        ev = next(m for m in seen + [events.recv(timeout_ms=500)] if m is not None)
        assert ev == underrun and ev.pid == os.getpid() and ev.service == "playback"  # typed, with its origin
        events.socket.close()  # a tap leaves; publishing goes on unaffected
        assert all(pub.publish(Heartbeat(True, float(i), {})) for i in range(100))
        assert pub.dropped == 0


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_what_a_stopped_publisher_sent_last_is_still_read_after_it_is_gone(scheme):
    """A service's final heartbeat goes out as it stops; a busy subscriber (the monitor, niced)
    reads it only after the publisher has closed. With IMMEDIATE on the SUB, libzmq dropped
    the unread messages of a publisher the moment it disconnected (every other run's report
    undercounted)."""
    cfg = make_config(scheme)
    with Bus(cfg, "monitor") as monitor:
        sub = monitor.subscriber(["heartbeat."])
        with Bus(cfg, "playback") as playback:
            pub = playback.publisher()
            assert wait_until(lambda: pub.publish(Heartbeat(True, 0.0, {})) and sub.recv(timeout_ms=20) is not None,
                              timeout=5)
            while sub.recv(timeout_ms=100) is not None:  # the connection is up and nothing queued
                pass
            for i in range(1, 21):
                pub.publish(Heartbeat(True, float(i), {"n": i}))
        # The publisher's bus is closed (its linger spent, its context ended) and its connection
        # gone; only now does the subscriber read.
        time.sleep(0.5)
        got = [sub.recv(timeout_ms=200) for _ in range(21)]
    counts = [m.counters["n"] for m in got if m is not None]
    print(f"read after the publisher left: {counts}")
    assert counts == list(range(1, 21))


def test_bind_conflict_is_one_clear_error():
    cfg = make_config("tcp")
    with Bus(cfg, "inference") as first:
        first.audio_receiver("audio_in")
        with Bus(cfg, "inference") as second:
            with pytest.raises(BusError, match=r"inference: cannot bind audio_in at tcp://127\.0\.0\.1:\d+"):
                second.audio_receiver("audio_in")


# --------------------------------------------------------------------------- CURVE
@pytest.fixture()
def keys(tmp_path):
    return init_keys(tmp_path / "keys")


def curve_config(keys_dir: Path):
    return make_config("tcp", "security.curve=true", f"security.keys_dir={keys_dir}")


@pytest.mark.parametrize("wildcard_bind", [False, True])
def test_curve_authorized_client_delivers(keys, wildcard_bind):
    cfg = curve_config(keys)
    if wildcard_bind:  # the LAN shape: the binder binds tcp://*:PORT, the others connect to a host
        port = cfg.endpoint("audio_in").connect.rsplit(":", 1)[1]
        cfg = make_config("tcp", "security.curve=true", f"security.keys_dir={keys}",
                          f"endpoints.audio_in.connect=tcp://127.0.0.1:{port}",
                          f"endpoints.audio_in.bind=tcp://*:{port}")
    with Bus(cfg, "inference") as inference, Bus(cfg, "capture") as capture, Bus(cfg, "monitor") as monitor:
        rx = inference.audio_receiver("audio_in")
        tx = capture.audio_sender("audio_in")
        assert wait_until(lambda: tx.send(chunk(5)), timeout=5)
        got = receive_n(rx, 1)
        assert got and got[0].seq == 5
        pub = inference.publisher()
        sub = monitor.subscriber(["heartbeat."])
        assert wait_until(lambda: pub.publish(Heartbeat(True, 1.0, {})) and sub.recv(timeout_ms=50) is not None,
                          timeout=5)


def _raw_pusher(address: str, keys=None, client_pair=None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    if client_pair is not None:
        sock.curve_publickey, sock.curve_secretkey = client_pair
        sock.curve_serverkey = keys.server_public
    sock.connect(address)
    return sock


@pytest.mark.parametrize("client", ["unknown-key", "plaintext"])
def test_curve_refuses_unknown_and_plaintext_clients(keys, client):
    cfg = curve_config(keys)
    loaded = load_keys(keys)
    with Bus(cfg, "inference") as inference:
        rx = inference.audio_receiver("audio_in")
        pair = zmq.curve_keypair() if client == "unknown-key" else None
        raw = _raw_pusher(cfg.endpoint("audio_in").connect, loaded, pair)
        try:
            for i in range(20):
                try:
                    raw.send(encode(chunk(i)), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                time.sleep(0.02)
            assert rx.recv(timeout_ms=500) is None
            assert rx.received == 0 and rx.rejected == 0  # nothing reached the application at all
        finally:
            raw.close()
        assert_capture_still_served(cfg, rx)  # the authorized client is still served


def test_curve_without_keys_is_one_clear_error(tmp_path):
    cfg = curve_config(tmp_path / "nokeys")
    with pytest.raises(SecurityError, match="keys folder not found .*llvc keys init"):
        Bus(cfg, "inference")


def test_llvc_keys_init_makes_private_keys(tmp_path):
    folder = tmp_path / "k"
    proc = subprocess.run([str(LLVC), "keys", "init", str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("server", "client"):
        assert stat.S_IMODE((folder / f"{name}.key_secret").stat().st_mode) == 0o600
        assert (folder / f"{name}.key").is_file()
    assert (folder / "authorized" / "client.key").read_bytes() == (folder / "client.key").read_bytes()
    again = subprocess.run([str(LLVC), "keys", "init", str(folder)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr and len(again.stderr.splitlines()) == 1
    add = subprocess.run([str(LLVC), "keys", "add-client", str(folder), "dashboard"],
                         capture_output=True, text=True, timeout=60)
    assert add.returncode == 0, add.stderr
    assert (folder / "authorized" / "dashboard.key").is_file()
    assert stat.S_IMODE((folder / "dashboard.key_secret").stat().st_mode) == 0o600


def test_subscriber_rejects_malformed_telemetry_and_keeps_going():
    cfg = make_config("tcp")
    raw = zmq.Context.instance().socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.bind(cfg.endpoint("telemetry_playback").connect)
    try:
        with Bus(cfg, "monitor") as monitor:
            sub = monitor.subscriber()
            from common.protocol import make_telemetry

            good = make_message("playback", Drained("s", 100))
            unfit = make_telemetry("playback", "event", {"schema": [1, 0], "event": "drained"})  # no fields
            bad = [[b"event.playback", os.urandom(50)], [b"event.playback"],
                   [b"event.other", encode(good)],  # topic frame that lies about the message
                   [unfit.topic.encode(), encode(unfit)]]  # a valid envelope, its record not

            def round_trip():
                for frames in bad:
                    raw.send_multipart(frames)
                raw.send_multipart([good.topic.encode(), encode(good)])
                return sub.recv(timeout_ms=50) == Drained("s", 100)

            assert wait_until(round_trip, timeout=5)
            assert wait_until(lambda: sub.recv(timeout_ms=20) is None and sub.rejected >= 4, timeout=5)
            # A record that does not fit its schema is rejected with the field at fault (sent last:
            # once it has been read, nothing older is left).
            raw.send_multipart([unfit.topic.encode(), encode(unfit)])
            assert wait_until(lambda: sub.recv(timeout_ms=20) is None
                              and sub.last_reject == "event.playback.drained.stream_id: missing", timeout=5)
    finally:
        raw.close()


def test_drain_returns_everything_waiting_without_blocking():
    cfg = make_config("ipc")
    with Bus(cfg, "inference") as inference, Bus(cfg, "capture") as capture:
        rx = inference.audio_receiver("audio_in")
        tx = capture.audio_sender("audio_in")
        assert wait_until(lambda: tx.send(chunk(0)), timeout=5)
        for i in range(1, 4):
            assert tx.send(chunk(i))
        got = []
        assert wait_until(lambda: got.extend(rx.drain()) or len(got) == 4, timeout=5)
        assert [c.seq for c in got] == [0, 1, 2, 3]
        t0 = time.perf_counter()
        assert rx.drain() == []
        assert time.perf_counter() - t0 < 0.5
