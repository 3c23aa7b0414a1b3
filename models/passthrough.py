"""A stand-in for :class:`models.streaming.StreamingEngine` whose "conversion" is the identity.

It has the real engine's interface and geometry (chunk length, head, delay), and its output is
the stream ``head + chunk_0 + chunk_1 + ...`` itself, delayed exactly as the real engine delays
its conversion: ``process(chunk_k)`` returns stream samples ``[kC, (k+1)C)``. Run through the
pipeline (``[model] kind = "passthrough"``), output sample ``i`` is therefore source sample
``i``, bit for bit, which makes it the diagnostic for everything around the model: offsets,
gaps, timestamps, playback alignment and latency, without torch or weights.
"""
from __future__ import annotations

import numpy as np

from .engine import EngineBase
from .geometry import StreamGeometry


class PassthroughEngine(EngineBase):
    """Identity "model" with the streaming engine's chunking, head and delay.

    State is the last ``head_len`` samples of the stream (the delay line); :meth:`reset`
    forgets them, and a stream that is never primed starts with ``head_len`` samples of silence,
    like the real engine's ``prime(None)``. ``geometry`` is the real model's
    (:attr:`models.spec.ModelSpec.geometry`).
    """

    def __init__(self, geometry: StreamGeometry):
        if geometry.head_len > geometry.chunk_len:
            raise ValueError(f"head_len ({geometry.head_len}) must not exceed chunk_len ({geometry.chunk_len})")
        self.geometry = geometry
        self._tail = np.zeros(geometry.head_len, np.float32)
        self._primed = False
        self.chunks_processed = 0

    # ------------------------------------------------------------------ control
    def fork(self) -> PassthroughEngine:
        """Another stream with the same chunking."""
        return PassthroughEngine(self.geometry)

    def reset(self) -> None:
        """Forget the stream; the next one needs a new head."""
        self._tail[:] = 0.0
        self._primed = False
        self.chunks_processed = 0

    def prime(self, head: np.ndarray | None = None) -> None:
        """Start the stream with its first ``head_len`` samples (``None``: silence)."""
        if self._primed:
            raise RuntimeError("stream already started: reset() before priming again")
        if head is not None:
            self._tail[:] = self.checked(head, self.head_len, "head")
        self._primed = True

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Take exactly ``chunk_len`` new samples; return the ``chunk_len`` stream samples due."""
        x = self.checked(chunk, self.chunk_len, "chunk")
        if not self._primed:
            self.prime(None)
        H, C = self.head_len, self.chunk_len
        out = np.empty(C, np.float32)
        out[:H] = self._tail
        out[H:] = x[: C - H]
        self._tail[:] = x[C - H:]
        self.chunks_processed += 1
        return out

    def state_is_finite(self) -> bool:
        """False if the delay line holds NaN/Inf."""
        return bool(np.isfinite(self._tail).all())
