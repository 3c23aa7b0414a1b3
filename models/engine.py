"""What a streaming engine is: :class:`Engine`, the interface inference and the commands use, and
:class:`EngineBase`, what every engine shares (its geometry's numbers, whole-signal conversion).

Three engines implement it: :class:`models.streaming.StreamingEngine` (PyTorch),
:class:`models.onnx_engine.OnnxEngine` (ONNX Runtime, no torch) and
:class:`models.passthrough.PassthroughEngine` (the identity, for diagnostics). Torch-free.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from .geometry import StreamGeometry


@runtime_checkable
class Engine(Protocol):
    """One stream's state and the step that converts it, chunk in, chunk out.

    The stream is ``head + chunk_0 + chunk_1 + ...``: :meth:`prime` takes the head
    (``geometry.head_len`` samples, ``None`` for silence), :meth:`process` exactly
    ``geometry.chunk_len`` samples and returns as many, lagging by ``geometry.delay_samples``.
    """

    geometry: StreamGeometry
    chunks_processed: int

    @property
    def primed(self) -> bool:
        """Whether the stream head has been consumed."""

    def reset(self) -> None:
        """Forget the stream; the next one needs a new head."""

    def prime(self, head: np.ndarray | None = None) -> None:
        """Start the stream with its first ``head_len`` samples (``None``: silence)."""

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Convert exactly ``chunk_len`` new samples; returns ``chunk_len`` float32 samples."""

    def state_is_finite(self) -> bool:
        """False if the state holds NaN/Inf (the stream then needs a reset)."""


class SlotsFull(RuntimeError):
    """Every slot of a stream pool holds a stream (:mod:`models.pool`): it cannot admit another."""


def free_slot(taken, slots: int) -> int:
    """The lowest of ``range(slots)`` not in ``taken`` (raises :class:`SlotsFull`): the slot a
    stream pool gives the next stream it admits."""
    free = next((s for s in range(slots) if s not in taken), None)
    if free is None:
        raise SlotsFull(f"all {slots} stream slots are in use")
    return free


class EngineBase:
    """Shared by the engines: the geometry's numbers as attributes, and :meth:`convert`.

    Subclasses set :attr:`geometry` and keep ``_primed``; the numbers are read from the
    geometry, never recomputed.
    """

    geometry: StreamGeometry
    _primed: bool = False

    @property
    def chunk_len(self) -> int:
        """Samples per :meth:`process` call."""
        return self.geometry.chunk_len

    @property
    def head_len(self) -> int:
        """Samples :meth:`prime` takes (L with lookahead, else 0)."""
        return self.geometry.head_len

    @property
    def context_len(self) -> int:
        """Samples of ``in_conv`` context carried between chunks (2L with lookahead)."""
        return self.geometry.context_len

    @property
    def sample_rate(self) -> int:
        """Hz."""
        return self.geometry.sample_rate

    @property
    def chunk_factor(self) -> int:
        """Decoder windows per chunk."""
        return self.geometry.chunk_factor

    @property
    def chunk_s(self) -> float:
        """Duration of one chunk in seconds."""
        return self.geometry.chunk_s

    @property
    def primed(self) -> bool:
        """Whether the stream head has been consumed (by ``prime()`` or the first chunk)."""
        return self._primed

    def convert(self, signal: np.ndarray, on_chunk: Callable[[float], object] | None = None) -> np.ndarray:
        """Stream a whole signal and return its conversion, aligned and of the same length.

        Resets the engine, primes it with the signal's head and feeds the rest chunk by chunk,
        zero-padded at the end so the last samples' lookahead is there. Because the head went
        in through ``prime``, output sample ``m`` is the conversion of input sample ``m``.
        ``on_chunk(seconds)`` is called with each chunk's processing time. Equals the offline
        forward except in the final partial decoder window (offline pads it with zero frames,
        a live stream never ends).
        """
        x = np.asarray(signal, dtype=np.float32)
        n, C, H = len(x), self.chunk_len, self.head_len
        self.reset()
        self.prime(x[:H] if n >= H else np.pad(x, (0, H - n)))
        body = x[H:]
        n_chunks = -(-n // C)
        padded = np.zeros(n_chunks * C, dtype=np.float32)
        padded[: len(body)] = body
        out = np.empty(n_chunks * C, dtype=np.float32)
        for k in range(n_chunks):
            t0 = time.perf_counter()
            out[k * C:(k + 1) * C] = self.process(padded[k * C:(k + 1) * C])
            if on_chunk is not None:
                on_chunk(time.perf_counter() - t0)
        return out[:n]

    def reset(self) -> None:  # pragma: no cover - every engine overrides it
        raise NotImplementedError

    def prime(self, head=None) -> None:  # pragma: no cover
        raise NotImplementedError

    def process(self, chunk) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def checked(samples, n: int, what: str) -> np.ndarray:
        """``samples`` as a contiguous 1-D float32 array of exactly ``n``, else ``ValueError``."""
        a = np.asarray(samples)
        if a.ndim != 1 or a.shape[0] != n:
            raise ValueError(f"{what} must be 1-D with exactly {n} samples, got shape {a.shape}")
        return np.ascontiguousarray(a, dtype=np.float32)
