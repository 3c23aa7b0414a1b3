"""Playback's WAV files on real failing disks, beside other sinks, and across a kill -9.

Real parts only: ``llvc playback`` as a subprocess fed by a real PUSH (see
``tests/test_playback.py``), real filesystems mounted for the test (a tiny tmpfs fills up; an
ext4 image aborted with ``errors=remount-ro`` turns read-only under an open file, which a plain
``mount -o remount,ro`` refuses to do while a file is open for writing).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from bus_helpers import endpoint_overrides, wait_until
from common.config import PipelineConfigError, load_pipeline_config
from common.telemetry import Heartbeat, PlaybackChunk
from test_playback import LLVC, C, FakeStream, Flags, Playback, noise

#: Slack for this shared 2-core machine: these tests check files, not latency.
SLACK = ("playback.max_ms=400.0",)
TARGET = 80.0


class Mounts:
    """Filesystems mounted for one test, all unmounted when it ends."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.points: list[Path] = []

    def _mount(self, point: Path, *args: str) -> Path:
        point.mkdir()
        proc = subprocess.run(["mount", *args, str(point)], capture_output=True, text=True, timeout=60)
        if proc.returncode:
            pytest.skip(f"cannot mount a test filesystem: {proc.stderr.strip()}")
        self.points.append(point)
        return point

    def tmpfs(self, size: int, read_only: bool = False) -> Path:
        """A tmpfs of ``size`` bytes."""
        opts = f"size={size}" + (",ro" if read_only else "")
        return self._mount(self.tmp / f"tmpfs{len(self.points)}", "-t", "tmpfs", "-o", opts, "tmpfs")

    def ext4(self, size_mb: int = 4) -> Path:
        """A fresh ext4 image on a loop device that goes read-only on its first error."""
        if shutil.which("mkfs.ext4") is None:
            pytest.skip("needs mkfs.ext4 to make a disk go read-only under an open file")
        image = self.tmp / f"disk{len(self.points)}.img"
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        mkfs = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True, text=True, timeout=60)
        if mkfs.returncode:
            pytest.skip(f"cannot make an ext4 image: {mkfs.stderr.strip()}")
        return self._mount(self.tmp / f"ext4-{len(self.points)}", "-o", "loop,errors=remount-ro", str(image))

    def unmount_all(self) -> None:
        for point in reversed(self.points):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)  # still busy: detach


@pytest.fixture
def mounts(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.unmount_all()


def error_lines(pb: Playback) -> list[str]:
    return [line for line in pb.logs().splitlines() if " ERROR " in line]


def assert_went_on_after_failure(pb: Playback, counter: str, n_chunks: int) -> dict:
    """One sink_error, and the service played the stream to its end anyway; returns the event."""
    assert wait_until(lambda: pb.of("event", "drained"), timeout=10), pb.logs()
    errors = pb.of("event", "sink_error")
    assert len(errors) == 1, (errors, pb.logs())
    seqs = [t["seq"] for t in pb.of("chunk")]  # chunk.playback telemetry went on after the failure
    assert seqs and seqs[-1] == n_chunks - 1 and len(seqs) > n_chunks - 5, seqs
    assert wait_until(lambda: pb.heartbeat()["counters"].get(counter) == 1, timeout=5), pb.logs()
    assert pb.proc.poll() is None
    assert pb.terminate() < 5
    logs = pb.logs()
    assert "Traceback" not in logs and "loop error" not in logs, logs
    lines = error_lines(pb)
    assert len(lines) == 1 and errors[0]["error"] in lines[0] and f"samples={errors[0]['samples']}" in lines[0], logs
    return errors[0]


def test_full_disk_keeps_what_was_written_and_playback_goes_on(tmp_path, mounts):
    disk = mounts.tmpfs(64 << 10)  # ~1 s of float audio
    out = disk / "out.wav"
    pb = Playback(tmp_path, *SLACK, sink=f"file:{out}", target_ms=TARGET)
    try:
        pb.wait_ready()
        sig = noise(150, seed=5)  # ~2 s
        pb.send_stream(sig, source_end=len(sig))
        err = assert_went_on_after_failure(pb, "file_errors", 150)
        assert err["path"] == str(out) and "No space left on device" in err["error"], err
        got, sr = sf.read(out, dtype="float32")
        assert sr == 16000 and len(got) == err["samples"]
        # All the disk could take, part of the block that failed included, and nothing else.
        assert (64 << 10) - 4096 < 4 * len(got) < 64 << 10, len(got)
        np.testing.assert_array_equal(got, sig[:len(got)])
        assert pb.heartbeat()["file_open"] is False
    finally:
        pb.close()


def test_disk_gone_read_only_mid_stream_keeps_the_record_and_the_sink_plays_on(tmp_path, mounts):
    disk = mounts.ext4()
    rec = disk / "rec.wav"
    pb = Playback(tmp_path, *SLACK, f"playback.record={rec}", sink="null", target_ms=TARGET)

    def abort():  # what the kernel does on a disk error with errors=remount-ro
        subprocess.run(["mount", "-o", "remount,abort", str(disk)], check=True, capture_output=True, timeout=60)

    try:
        pb.wait_ready()
        sig = noise(120, seed=6)
        pb.send_stream(sig, source_end=len(sig), at={60: abort})
        err = assert_went_on_after_failure(pb, "record_errors", 120)
        assert err["path"] == str(rec) and "Read-only file system" in err["error"], err
        got, _ = sf.read(rec, dtype="float32")
        # Everything written before the disk went read-only: the header was current.
        assert len(got) == err["samples"] and 20 * C < len(got) < 60 * C, len(got)
        np.testing.assert_array_equal(got, sig[:len(got)])
    finally:
        pb.close()


def test_record_on_a_read_only_disk_at_start_exits_2_with_one_line(tmp_path, mounts):
    disk = mounts.tmpfs(64 << 10, read_only=True)
    proc = subprocess.run([str(LLVC), "playback", "--record", str(disk / "rec.wav"),
                           *[a for o in endpoint_overrides("tcp") for a in ("--set", o)]],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "playback.record" in lines[0] and "Read-only file system" in lines[0], lines


def test_record_beside_a_null_sink_is_what_a_file_sink_writes(tmp_path):
    rec = tmp_path / "rec.wav"
    pb = Playback(tmp_path, *SLACK, "playback.fade_ms=0.0", f"playback.record={rec}", sink="null",
                  target_ms=TARGET)
    try:
        pb.wait_ready()
        sig = noise(40, seed=7)
        end = 40 * C - 2 * C - 50  # capture's padding runs past the end
        pb.send_stream(sig, skip={10}, source_end=end)
        assert wait_until(lambda: not pb.heartbeat().get("record_open", True), timeout=10), pb.logs()
        want = sig[:end].copy()
        want[10 * C:11 * C] = 0  # a missing chunk is silence in its place (no fade with fade_ms 0)
        got, sr = sf.read(rec, dtype="float32")
        assert sr == 16000 and sf.info(rec).subtype == "FLOAT"
        np.testing.assert_array_equal(got, want)
        hb = pb.heartbeat()
        assert hb["record"] == str(rec) and hb["record_samples"] == end and hb["counters"]["record_errors"] == 0
        assert pb.terminate() < 5
    finally:
        pb.close()


def test_record_and_file_sink_on_one_path_is_a_config_error(tmp_path):
    cfg = load_pipeline_config(env={}, overrides=[f"playback.sink=file:{tmp_path}/a.wav",
                                                  f"playback.record={tmp_path}/./a.wav"])
    from services.playback import playback_settings

    with pytest.raises(PipelineConfigError, match="playback.record: names the sink's own file"):
        playback_settings(cfg)


def test_a_restart_goes_on_with_the_same_file(tmp_path):
    """kill -9 mid-stream, start again under the same run folder: nothing written is lost."""
    out, run_dir = tmp_path / "out.wav", tmp_path / "run"
    run_dir.mkdir()
    pb = Playback(tmp_path, *SLACK, sink=f"file:{out}", target_ms=TARGET,
                  env={**os.environ, "LLVC_RUN_DIR": str(run_dir)})
    kill_at, skipped = 50, 20
    before: dict[str, int] = {}

    def restart():
        pb.proc.kill()
        pb.proc.wait()
        before["samples"] = sf.info(out).frames  # the header was current when the process died
        pb.spawn()
        assert wait_until(lambda: any(isinstance(m, Heartbeat) and m.pid == pb.proc.pid and m.ready
                                      for m in list(pb.messages)), timeout=30), pb.logs()

    try:
        pb.wait_ready()
        sig = noise(110, seed=8)
        pb.send_stream(sig, source_end=len(sig), at={kill_at: restart},
                       skip=set(range(kill_at, kill_at + skipped)))
        assert wait_until(lambda: pb.of("event", "drained"), timeout=10), pb.logs()
        assert wait_until(lambda: not pb.heartbeat().get("file_open", True), timeout=5), pb.logs()
        a = before["samples"]
        b = min(m.seq for m in list(pb.messages) if isinstance(m, PlaybackChunk) and m.pid == pb.proc.pid) * C
        assert 20 * C < a < kill_at * C and b == (kill_at + skipped) * C, (a, b)
        got, _ = sf.read(out, dtype="float32")
        assert len(got) == len(sig)
        np.testing.assert_array_equal(got[:a], sig[:a])  # all the first process wrote
        assert not got[a:b].any()                        # the restart's gap is silence
        np.testing.assert_array_equal(got[b:], sig[b:])  # the rest, in its place
        assert "resuming the file after a restart" in pb.logs()
        assert pb.terminate() < 5
    finally:
        pb.close()


def test_record_beside_a_device_sink_gets_the_16k_blocks_it_plays(tmp_path):
    """The device path without PortAudio (see tests/test_playback.py): the recorder gets each
    block the service reads for the ring, before resampling to the device's 48 kHz."""
    import soxr

    from services.jitter import JitterBuffer
    from services.recorder import WavRecorder
    from services.sinks import DeviceSink

    quiet = lambda *a, **k: None  # noqa: E731
    sink = DeviceSink("device:x", "low", quiet)
    sink.rate, sink.ring, sink.stream, sink.index = 48000, np.zeros(48000, np.float32), FakeStream(), 0
    sink.resampler = soxr.ResampleStream(16000, 48000, 1, dtype="float32", quality="QQ")
    rec = WavRecorder(str(tmp_path / "rec.wav"), "playback.record", "record", quiet, quiet)
    rec.open()
    sink.recorders = [rec]
    jb = JitterBuffer(target_ms=0, max_ms=400, fade_ms=2)
    sig = noise(10, seed=9)
    end = len(sig) - 30
    for k in range(10):
        jb.put("d", k * C, sig[k * C:(k + 1) * C], 0, seq=k, t_capture_ns=0, source_end=end if k == 9 else None)
    for i in range(200):
        if rec.file is None:
            break
        sink.pump(jb, time.monotonic_ns())
        sink.due_ns = 0
        sink._callback(np.zeros((480, 1), np.float32), 480, SimpleNamespace(outputBufferDacTime=i / 100), Flags())
    got, sr = sf.read(tmp_path / "rec.wav", dtype="float32")
    assert sr == 16000 and rec.status() == {"record_samples": end, "record_open": False}
    np.testing.assert_array_equal(got, sig[:end])


@pytest.mark.parametrize("margin_ms", (1.0, 3.0, 0.0))
def test_ring_margin_ms_is_what_the_ring_keeps_beyond_one_callback(margin_ms):
    """``playback.ring_margin_ms``: after a callback drains the ring, the service thread tops it
    up to the largest callback plus the margin (and no more than one 16-sample read beyond)."""
    from services.jitter import JitterBuffer
    from services.sinks import DeviceSink

    sink = DeviceSink("device:x", "low", lambda *a, **k: None, 0.0, margin_ms)
    sink.rate, sink.ring, sink.stream, sink.index = 48000, np.zeros(48000, np.float32), FakeStream(), 0
    sink._make_resampler()
    jb = JitterBuffer(target_ms=0, max_ms=400, fade_ms=2)
    sig = noise(10, seed=3)
    for k in range(10):
        jb.put("m", k * C, sig[k * C:(k + 1) * C], 0, seq=k, t_capture_ns=0)
    fills = []
    for i in range(40):
        sink.pump(jb, time.monotonic_ns())
        fills.append(sink.written - sink.taken)
        sink._callback(np.zeros((96, 1), np.float32), 96, SimpleNamespace(outputBufferDacTime=i / 500), Flags())
    want = 96 + margin_ms * 48
    print(f"margin {margin_ms} ms: ring fill after each top-up {min(fills[1:])}..{max(fills[1:])} frames (want {want})")
    assert all(want <= f < want + 48 for f in fills[1:]), fills
