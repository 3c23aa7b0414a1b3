"""Helpers for tests that open real ZeroMQ sockets: configs on free ports, chunks, waiting."""
from __future__ import annotations

import time

import numpy as np
import zmq

from common.config import REQUIRED_ENDPOINTS, load_pipeline_config
from common.protocol import AudioChunk, encode
from services.lab.endpoints import endpoint_overrides, free_port  # noqa: F401 - the tests' helpers too

ENDPOINTS = tuple(REQUIRED_ENDPOINTS)


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


#: How long inference takes at most to read a listen request (one idle turn waits up to 50 ms).
LISTEN_SETTLE_S = 0.3


def listen_before_sending(listener, timeout: float = 10.0) -> None:
    """Ask for ``listener``'s session until the request goes out (connected), then give a
    separately running inference the time to read it: it routes a session's audio only to
    listeners it has heard, so outputs converted before that are dropped, not queued."""
    assert wait_until(listener.listen, timeout=timeout), "the listen request never went out"
    time.sleep(LISTEN_SETTLE_S)


class InferenceStandIn:
    """A stand-in for inference on ``audio_out`` (playback tests): a real
    :class:`~common.bus.AudioRouter`, sending whatever it is given to every playback that asked,
    whatever its session."""

    def __init__(self, bus):
        self.router = bus.audio_router("audio_out")
        self.socket = self.router.socket

    def _peers(self) -> list[bytes]:
        self.router.poll_listeners()
        return list(self.router.listeners)

    def send_bytes(self, data: bytes) -> bool:
        """Send ``data`` to every listener (waiting up to 2 s for the first); False if none took it."""
        wait_until(self._peers, timeout=2, interval=0.005)
        sent = False
        for rid in self._peers():
            try:
                self.socket.send_multipart([rid, data], zmq.NOBLOCK)
                sent = True
            except zmq.ZMQError:
                pass
        return sent

    def send(self, chunk: AudioChunk) -> bool:
        """Encode and send ``chunk`` (see :meth:`send_bytes`)."""
        return self.send_bytes(encode(chunk))


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


def wire(record) -> dict:
    """A telemetry record's ``data`` as it is on the wire, without the schema version."""
    return {k: v for k, v in record.to_data().items() if k != "schema"}


def flat(record) -> dict:
    """:func:`wire`, with a heartbeat's status merged in (how tests read a service's heartbeat)."""
    data = wire(record)
    return {**data, **(data.pop("status", None) or {})}
