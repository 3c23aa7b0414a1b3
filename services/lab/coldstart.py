"""How fast a (re)started inference is back: process start to its first converted chunk, and its memory.

:func:`cold_start` starts ``llvc inference`` on private ports and feeds it over the bus as capture
would; ``scripts/bench_cold_start.py`` prints the figures per backend side by side. Measured,
never asserted (tests check only that it measures).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from common.bus import Bus
from common.config import load_pipeline_config
from common.protocol import AudioChunk
from models.spec import ModelSpec

from .endpoints import endpoint_overrides

REPO = Path(__file__).resolve().parents[2]


def rss_mib(pid: int) -> float | None:
    """A process's resident memory (``VmRSS``) in MiB, ``None`` if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cold_start(chunk_factor: int = 1, threads: int = 1, checkpoint=None, config=None,
               timeout: float = 120.0, extra: tuple[str, ...] = ()) -> dict:
    """Start ``llvc inference`` on private ports; time process start -> first output chunk.

    Sends the stream head and chunks of low noise as soon as the service accepts them (capture's
    sends fail until it has bound, after loading and warming up) and reads the process's RSS
    when the first output arrives. ``extra``: more ``llvc inference`` arguments (the backend).
    Returns ``{"first_output_s", "rss_mib", ...}`` or ``{"error": ...}``.
    """
    geometry = ModelSpec.resolve(checkpoint, config, chunk_factor).geometry
    overrides = endpoint_overrides("tcp")
    cfg = load_pipeline_config(env={}, overrides=overrides)
    cmd = [str(Path(sys.executable).parent / "llvc"), "inference", *[a for o in overrides for a in ("--set", o)],
           "-n", str(chunk_factor), "--threads", str(threads),
           *(["-p", str(checkpoint)] if checkpoint else []), *(["-c", str(config)] if config else []), *extra]
    sid = uuid.uuid4().hex
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    errlog = tempfile.TemporaryFile("w+")  # a file, not a pipe: the child never blocks on it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errlog, text=True,
                            env={**os.environ, "LLVC_PIPELINE_CONFIG": ""}, cwd=REPO)
    result: dict = {"command": f"llvc inference -n {chunk_factor} --threads {threads} {' '.join(extra)}".strip()}
    try:
        with Bus(cfg, "capture") as capture, Bus(cfg, "playback") as playback:
            tx, rx = capture.audio_sender("audio_in"), playback.audio_listener("audio_out", "")
            seq, offset, got, listening = 0, 0, None, False
            deadline = time.perf_counter() + timeout
            while got is None and time.perf_counter() < deadline and proc.poll() is None:
                n = geometry.head_len if seq == 0 else geometry.chunk_len
                c = AudioChunk(sid, seq, time.monotonic_ns(), time.time_ns(),
                               (rng.standard_normal(n) * 0.01).astype(np.float32), offset=offset)
                # Audio only once playback's request for it is out: inference sends a session's
                # output only to playbacks that asked (and drops it, not queues it, before that).
                listening = listening or rx.listen()
                if listening and tx.send(c):
                    seq, offset = seq + 1, offset + n
                got = rx.recv(5)
            first_s = time.perf_counter() - t0
            if got is None:
                reason = f"exited with status {proc.poll()}" if proc.poll() is not None else "timed out"
                errlog.seek(0)
                last = errlog.read().strip().splitlines()[-1:] or [""]
                result["error"] = f"no output: {reason} {last[0][:200]}".strip()
            else:
                result.update(first_output_s=first_s, rss_mib=rss_mib(proc.pid), output_offset=got.offset)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errlog.close()
    return result
