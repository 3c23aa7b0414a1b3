"""Where each chunk's e2e goes: the dashboard's parts, tapped from a running pipeline's telemetry.

Used by ``scripts/bench_pipeline.py --breakdown`` and ``scripts/bench_acoustic.py``: the same
split the dashboard draws (``services.dashboard.state.breakdown``), kept for a whole run.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from common.bus import Bus
from common.tap import topics_for
from common.telemetry import AudioHeader
from services.dashboard.state import PARTS, DashboardState

#: The part names, in order, as the columns of :meth:`BreakdownTap.rows` after its ``e2e``.
PART_NAMES = [name for name, _ in PARTS]


class BreakdownTap:
    """Every chunk's e2e split into the dashboard's parts, from the telemetry of the pipeline
    config ``cfg``, in a thread: :meth:`rows` are ``[e2e, *parts]``; :attr:`arrivals` every
    chunk playback received (late ones too), for ``scripts/replay_playout.py``."""

    def __init__(self, cfg, seconds: float):
        self.state = DashboardState(10.0, 3, cfg.bus.heartbeat_interval_s, history_s=seconds + 3600)
        self.arrivals: list[tuple[int, int, int, int]] = []  # (offset, n_samples, t_capture_ns, t_recv_ns)
        self.cfg, self.stopping = cfg, False
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        with Bus(self.cfg, "tap") as bus:
            sub = bus.subscriber(topics_for([], audio=True))
            self.ready.set()
            while not self.stopping:
                record = sub.recv(timeout_ms=50)
                if record is not None:
                    self.state.add(record, time.monotonic(), time.time())
                    if isinstance(record, AudioHeader) and record.service == "playback" and record.t_recv_ns:
                        self.arrivals.append((record.offset, record.n_samples, record.t_capture_ns, record.t_recv_ns))

    def rows(self) -> np.ndarray:
        """Stop tapping; one row per chunk played: ``[e2e, *parts]``, in ms."""
        self.stopping = True
        self.thread.join(5)
        return np.array([p[1:] for p in self.state.parts.points], float).reshape(-1, 1 + len(PARTS))


def breakdown_table(rows: np.ndarray, quantiles: tuple[float, ...] = (50, 99, 99.9)) -> dict[str, list[float]]:
    """The ``quantiles`` of each part and of the arrival (every part before the buffer's wait)."""
    cols = {name: rows[:, 1 + i] for i, name in enumerate(PART_NAMES)}
    cols["arrival"] = rows[:, 1:1 + PART_NAMES.index("jitter_buffer")].sum(axis=1)
    return {k: [round(float(np.percentile(v, q)), 2) for q in quantiles] if len(v) else []
            for k, v in cols.items()}
