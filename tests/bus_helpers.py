"""Helpers for tests that open real ZeroMQ sockets: configs on free ports, chunks, waiting."""
from __future__ import annotations

import itertools
import os
import socket
import tempfile
import time

import numpy as np

from common.config import load_pipeline_config
from common.protocol import AudioChunk

ENDPOINTS = ("audio_in", "audio_out", "telemetry_capture", "telemetry_inference",
             "telemetry_playback", "telemetry_monitor")
_ipc_counter = itertools.count()


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, never the same one twice."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def endpoint_overrides(scheme: str = "tcp") -> list[str]:
    """``--set`` overrides putting all six endpoints on fresh tcp ports or ipc paths."""
    out = []
    for name in ENDPOINTS:
        if scheme == "tcp":
            address = f"tcp://127.0.0.1:{free_port()}"
        else:
            address = f"ipc://{tempfile.gettempdir()}/llvc-test-{os.getpid()}-{next(_ipc_counter)}"
        out.append(f"endpoints.{name}.connect={address}")
    return out


def make_config(scheme: str = "tcp", *extra: str):
    """A pipeline config with private endpoints (and any extra ``key=value`` overrides)."""
    return load_pipeline_config(env={}, overrides=[*endpoint_overrides(scheme), *extra])


def chunk(seq: int, n: int = 208, stream: str = "test-stream", value: float | None = None) -> AudioChunk:
    """A valid chunk whose samples encode ``seq`` so order and content can be checked."""
    samples = (np.full(n, value, np.float32) if value is not None
               else (np.arange(n, dtype=np.float32) / n + seq) / 1e4)
    return AudioChunk(stream_id=stream, seq=seq, t_capture_ns=time.monotonic_ns(), t_wall_ns=time.time_ns(),
                      samples=samples)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def stop_process(proc, timeout: float = 10.0) -> tuple[str, float]:
    """SIGTERM a service subprocess and wait for it (killed if it outlives ``timeout``).

    Returns its stderr and how long it took to exit.
    """
    import signal as _signal

    t0 = time.monotonic()
    try:
        proc.send_signal(_signal.SIGTERM)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err, time.monotonic() - t0
