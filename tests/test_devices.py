"""Real sound devices: a PulseAudio server with null sinks (tests/pulse.py, the ``pulse`` fixture).

``llvc devices`` lists them; capture's ``device:`` source hears a tone played into the
``llvc_in`` sink; playback's ``device:`` sink plays a tone that the ``llvc_out`` sink's monitor
records. Every process that opens a device gets the server's ``env`` (PULSE_SERVER,
ALSA_CONFIG_PATH): the services as subprocesses, ``pacat``/``parec`` alike.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common.devices
from bus_helpers import wait_until
from common.devices import NO_DEVICES
from services.cli import main
from test_capture import Peers, spawn, stop
from test_playback import Playback

LLVC = Path(sys.executable).parent / "llvc"
HZ, LEVEL = 440.0, 0.5
PULSE_VARS = ("PULSE_SERVER", "PULSE_SINK", "PULSE_SOURCE", "ALSA_CONFIG_PATH")


def devices(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LLVC), "devices", *args], env=env, capture_output=True, text=True, timeout=30)


def tone(seconds: float, rate: int) -> np.ndarray:
    return (LEVEL * np.sin(2 * np.pi * HZ * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def pa_args(pulse, device: str) -> list[str]:
    """pacat/parec flags for mono float32 at the server's rate on ``device``."""
    return ["-d", device, f"--rate={pulse.rate}", "--channels=1", "--format=float32le", "--latency-msec=20"]


# --------------------------------------------------------------------------- llvc devices
def test_devices_lists_the_pulse_devices_as_a_table_and_as_json(pulse):
    env = {**os.environ, **pulse.env}
    table = devices(env)
    assert table.returncode == 0 and table.stderr == "", table.stderr
    rows = {line.split()[-1]: line for line in table.stdout.splitlines()[1:-1]}
    assert {"llvc_in", "llvc_out", "pulse", "default"} <= set(rows), table.stdout
    # The ALSA pulse plugin offers 44.1 kHz by default, whatever the sink's rate (PulseAudio resamples).
    assert all(" 32 " in rows[n] and " 44100 " in rows[n] and " ALSA " in rows[n] for n in rows), table.stdout
    assert rows["default"].split()[1:3] == ["*", "*"]  # default input and default output

    listed = json.loads(devices(env, "--json").stdout)
    by_name = {d["name"]: d for d in listed}
    assert by_name["default"]["default_input"] and by_name["default"]["default_output"]
    assert sum(d["default_input"] for d in listed) == 1 and sum(d["default_output"] for d in listed) == 1
    assert by_name["llvc_in"] == {**by_name["llvc_in"], "max_input_channels": 32, "max_output_channels": 32,
                                  "default_samplerate": 44100.0, "hostapi": "ALSA"}

    found = json.loads(devices(env, "--json", "--find", "llvc_out").stdout)
    assert [d["name"] for d in found] == ["llvc_out"]
    missing = devices(env, "--find", "no-such-device")
    assert missing.returncode == 1 and "no input device matches 'no-such-device'" in missing.stderr
    # Playback's side, by the same rule: llvc_ is both llvc_in and llvc_out, so it names neither.
    found = json.loads(devices(env, "--json", "--find", "LLVC_OUT", "--output").stdout)
    assert [d["name"] for d in found] == ["llvc_out"]
    ambiguous = devices(env, "--find", "llvc_", "--output")
    assert ambiguous.returncode == 1 and "'llvc_' matches several output devices" in ambiguous.stderr


def test_devices_without_a_sound_server_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in PULSE_VARS}
    env["PULSE_SERVER"] = f"unix:{tmp_path}/no-server"  # a dead socket: nothing answers
    out = devices(env)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    listed = json.loads(devices(env, "--json").stdout)
    if not listed:  # no sound card: the usual case on these machines
        assert out.stdout.splitlines() == [NO_DEVICES]
    else:  # a real card's ALSA devices; the PulseAudio ones need the server
        assert not {"pulse", "llvc_in"} & {d["name"] for d in listed}


def test_devices_without_portaudio_exits_2_with_one_line(monkeypatch, capsys):
    def missing():
        raise OSError("PortAudio library not found")
    monkeypatch.setattr(common.devices, "_import_sounddevice", missing)
    assert main(["devices"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "llvc devices: PortAudio is not available: PortAudio library not found\n"


# --------------------------------------------------------------------------- capture, playback
def test_capture_device_source_hears_a_tone_played_into_the_input_sink(pulse, tmp_path, monkeypatch):
    for k, v in pulse.env.items():
        monkeypatch.setenv(k, v)  # spawn() passes os.environ on
    raw = tmp_path / "tone.f32"
    tone(20, pulse.rate).tofile(raw)
    player = subprocess.Popen(["pacat", "--playback", *pa_args(pulse, "llvc_in"), str(raw)],
                              stderr=subprocess.PIPE, text=True)
    try:
        # Fixed 2 ms callbacks (the low-latency profile's capture.device_block_ms) instead of the
        # host's choice, which test_capture's default-device test covers.
        with Peers("capture.wait_ready_s=0", "capture.device_block_ms=2").bind_audio() as p:
            proc = spawn(p, "--source", "device:llvc_in")
            try:
                # 1.5 s of stream: the resampler settles, and 1 s is left to look at.
                assert p.collect(lambda p: sum(c.n_samples for c in p.chunks) >= 24_000 and p.beats, 15,
                                 ready=False)
            finally:
                rc, err, _ = stop(proc)
    finally:
        player.kill()
        player.wait()
    assert rc == 0, err
    beat = p.beats[-1]
    assert beat.status.device == "llvc_in" and "input_overflows" in beat.counters, beat  # what the monitor watches
    assert beat.status.device_block == round(0.002 * beat.status.device_rate), beat  # PortAudio took the block size
    x = np.concatenate([c.samples for c in p.chunks if c.stream_id == beat.status.stream_id])[-16_000:]
    assert abs(dominant_hz(x, 16_000) - HZ) <= 5
    assert 0.8 * LEVEL < np.sqrt(2 * np.mean(x ** 2)) < 1.2 * LEVEL  # the tone's level, not a trace of it


def test_playback_device_sink_plays_a_tone_the_output_sink_records(pulse, tmp_path):
    recorded = tmp_path / "monitor.f32"
    with open(recorded, "wb") as out:
        recorder = subprocess.Popen(["parec", *pa_args(pulse, "llvc_out.monitor")], stdout=out,
                                    stderr=subprocess.PIPE, env={**os.environ, **pulse.env})
    # Fixed 2 ms callbacks instead of the host's choice (test_acoustic and the pipeline tests use
    # that). Under PulseAudio's ALSA plugin they come in bursts, which the ring's default margin covers.
    pb = Playback(tmp_path, "playback.device_block_ms=2", sink="device:llvc_out", env={**os.environ, **pulse.env})
    try:
        pb.wait_ready()
        assert pb.heartbeat()["sink"] == "device:llvc_out"
        pb.send_stream(tone(1.5, 16_000))
        time.sleep(0.3)  # played out: target_ms plus the device's latency
        assert wait_until(lambda: pb.heartbeat()["counters"].get("chunks_played", 0) > 100, timeout=5), pb.logs()
        beat = pb.heartbeat()
        assert "device_underflows" in beat["counters"]  # what the monitor watches
        assert beat["device_block"] == round(0.002 * beat["device_rate"]), beat  # PortAudio took the block size
        assert pb.terminate() < 5
    finally:
        pb.close()
        recorder.terminate()
        recorder.wait(5)
    y = np.fromfile(recorded, dtype="<f4")
    loud = np.flatnonzero(np.abs(y) > LEVEL / 2)
    assert len(loud), "the monitor recorded silence"
    x = y[loud[0]:loud[-1]]
    assert len(x) > pulse.rate  # most of the 1.5 s played
    assert abs(dominant_hz(x, pulse.rate) - HZ) <= 5
    assert 0.8 * LEVEL < np.sqrt(2 * np.mean(x ** 2)) < 1.2 * LEVEL
