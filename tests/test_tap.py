"""``llvc tap`` as a real subprocess against real publishers."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bus_helpers import chunk, endpoint_overrides, wait_until
from common.bus import Bus
from common.config import load_pipeline_config
from common.telemetry import SCHEMA_VERSION, AudioHeader, Heartbeat, InferenceChunk, Underrun

LLVC = Path(sys.executable).parent / "llvc"


class Publishers:
    """Inference and playback publishing telemetry (and audio headers) until stopped."""

    def __init__(self, overrides: list[str]):
        self.cfg = load_pipeline_config(env={}, overrides=overrides)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with Bus(self.cfg, "inference") as inf, Bus(self.cfg, "playback") as play:
            p_inf, p_play = inf.publisher(), play.publisher()
            i = 0
            while not self.stop.is_set():
                p_inf.publish(InferenceChunk("s", i, 16 + 208 * i, 1.0 + i, 13.0, 0.0, False))
                p_play.publish(AudioHeader.of(chunk(i), time.monotonic_ns()))
                p_play.publish(Underrun("s", 1, i, i))
                p_play.publish(Heartbeat(True, i / 200, {"underruns": i}))
                i += 1
                time.sleep(0.005)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


def tap(overrides: list[str], *args: str) -> subprocess.Popen:
    sets = [a for o in overrides for a in ("--set", o)]
    return subprocess.Popen([str(LLVC), "tap", *sets, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_tap_filters_topics_and_prints_json_lines():
    overrides = endpoint_overrides("tcp")
    with Publishers(overrides):
        proc = tap(overrides, "--filter", "event.", "--count", "5")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 5
    for msg in lines:
        assert msg["topic"] == "event.playback" and msg["type"] == "event"
        assert msg["data"]["event"] == "underrun" and msg["data"]["schema"] == list(SCHEMA_VERSION)
        assert isinstance(msg["data"]["samples"], int) and msg["data"]["stream_id"] == "s"
        assert msg["pid"] > 0 and msg["host"]


def test_tap_shows_audio_headers_only_when_asked():
    overrides = endpoint_overrides("tcp")
    with Publishers(overrides):
        plain = tap(overrides, "--count", "60")
        out, err = plain.communicate(timeout=60)
        assert plain.returncode == 0, err
        topics = {json.loads(line)["topic"] for line in out.splitlines()}
        assert {"chunk.inference", "event.playback", "heartbeat.playback"} <= topics
        assert not any(t.startswith("audio.") for t in topics)
        audio = tap(overrides, "--audio", "--filter", "audio.", "--count", "3")
        out, err = audio.communicate(timeout=60)
    assert audio.returncode == 0, err
    headers = [json.loads(line) for line in out.splitlines()]
    assert [h["topic"] for h in headers] == ["audio.playback"] * 3
    assert all(h["data"]["n_samples"] == 208 and "payload" not in h["data"] and h["data"]["t_recv_ns"] > 0
               for h in headers)


def test_tap_exits_cleanly_on_ctrl_c():
    overrides = endpoint_overrides("tcp")
    with Publishers(overrides):
        proc = tap(overrides)
        first = proc.stdout.readline()  # it is running and printing
        assert json.loads(first)["topic"]
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_tap_with_bad_config_says_which_key():
    proc = subprocess.run([str(LLVC), "tap", "--set", "endpoints.audio_in.connect=tcp://127.0.0.1:99999"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llvc tap: error: ") and "endpoints.audio_in.connect" in lines[0]


def test_audio_keeps_flowing_while_taps_come_and_go():
    """Attaching and detaching subscribers never costs an audio chunk."""
    overrides = endpoint_overrides("tcp")
    cfg = load_pipeline_config(env={}, overrides=overrides)
    with Bus(cfg, "inference") as inference, Bus(cfg, "capture") as capture:
        rx = inference.audio_receiver("audio_in")
        pub = inference.publisher()
        tx = capture.audio_sender("audio_in")
        assert wait_until(lambda: tx.send(chunk(0)), timeout=5)
        tx.dropped = 0  # sends tried before the connection was up do not count here
        assert rx.recv(timeout_ms=2000) is not None
        taps = []
        received = 1
        for i in range(1, 200):
            if i % 40 == 0:
                taps.append(tap(overrides, "--duration", "1"))
            assert tx.send(chunk(i))
            pub.publish(AudioHeader.of(chunk(i)))
            got = rx.recv(timeout_ms=1000)
            received += got is not None
            time.sleep(0.002)
        for p in taps:
            p.communicate(timeout=30)
            assert p.returncode == 0
    assert received == 200 and tx.dropped == 0 and rx.rejected == 0
