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

from .config import ModelConfig
from .geometry import StreamGeometry


class PassthroughEngine(StreamGeometry):
    """Identity "model" with the streaming engine's chunking, head and delay.

    State is the last ``head_len`` samples of the stream (the delay line); :meth:`reset`
    forgets them, and a stream that is never primed starts with ``head_len`` samples of silence,
    like the real engine's ``prime(None)``.
    """

    def __init__(self, chunk_len: int, head_len: int, sample_rate: int = 16000):
        for name, value, low in (("chunk_len", chunk_len, 1), ("head_len", head_len, 0),
                                 ("sample_rate", sample_rate, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if head_len > chunk_len:
            raise ValueError(f"head_len ({head_len}) must not exceed chunk_len ({chunk_len})")
        self.chunk_len = chunk_len
        self.head_len = head_len
        self.sample_rate = sample_rate
        #: What the real engine carries for in_conv: 2L with lookahead (head_len = L), else 0.
        self.context_len = 2 * head_len
        self._tail = np.zeros(head_len, np.float32)
        self._primed = False
        self.chunks_processed = 0

    @classmethod
    def from_config(cls, cfg: ModelConfig, chunk_factor: int = 1) -> "PassthroughEngine":
        """The geometry :class:`StreamingEngine` would have for ``cfg`` and ``chunk_factor``."""
        if not isinstance(chunk_factor, int) or isinstance(chunk_factor, bool) or chunk_factor < 1:
            raise ValueError(f"chunk_factor must be an integer >= 1, got {chunk_factor!r}")
        return cls(cfg.window_samples * chunk_factor, cfg.L if cfg.lookahead else 0, cfg.sample_rate)

    # ------------------------------------------------------------------ control
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
            self._tail[:] = self._checked(head, self.head_len, "head")
        self._primed = True

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Take exactly ``chunk_len`` new samples; return the ``chunk_len`` stream samples due."""
        x = self._checked(chunk, self.chunk_len, "chunk")
        if not self._primed:
            self.prime(None)
        H = self.head_len
        out = np.empty(self.chunk_len, np.float32)
        out[:H] = self._tail
        out[H:] = x[: self.chunk_len - H]
        self._tail[:] = x[self.chunk_len - H:]
        self.chunks_processed += 1
        return out

    def state_is_finite(self) -> bool:
        """False if the delay line holds NaN/Inf."""
        return bool(np.isfinite(self._tail).all())

    @staticmethod
    def _checked(samples, n: int, what: str) -> np.ndarray:
        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1 or x.shape[0] != n:
            raise ValueError(f"{what} must be 1-D with exactly {n} samples, got shape {x.shape}")
        return x
