"""Timing properties shared by the streaming engines (torch-free, so light services can use it)."""
from __future__ import annotations

import time

import numpy as np


class StreamGeometry:
    """Latency bookkeeping of an engine that converts ``head + chunk_0 + chunk_1 + ...``.

    Subclasses set ``chunk_len`` (samples per ``process()`` call), ``head_len`` (samples the
    stream starts with, L with lookahead), ``context_len`` (``in_conv`` context, 2L) and
    ``sample_rate``, and keep ``_primed``. These are the numbers other code reads; nothing
    repeats them.
    """

    chunk_len: int
    head_len: int
    context_len: int
    sample_rate: int
    _primed: bool = False

    @property
    def delay_samples(self) -> int:
        """Constant lag of the output behind the chunks fed to ``process()`` (``head_len``).

        Output sample ``m`` of the concatenated ``process()`` results is the conversion of
        stream sample ``m`` of ``head + chunks``; the chunks start at stream sample ``head_len``.
        """
        return self.head_len

    @property
    def latency_samples(self) -> int:
        """How long each sample waits for its conversion, before compute: ``chunk_len + L``."""
        return self.chunk_len + self.delay_samples

    @property
    def algorithmic_latency_s(self) -> float:
        """Upstream's definition, ``(2L + chunk_len) / sr`` (counts all 2L context as future)."""
        return (self.context_len + self.chunk_len) / self.sample_rate

    @property
    def latency_s(self) -> float:
        """:attr:`latency_samples` in seconds (the true algorithmic latency)."""
        return self.latency_samples / self.sample_rate

    @property
    def chunk_s(self) -> float:
        """Duration of one chunk in seconds."""
        return self.chunk_len / self.sample_rate

    @property
    def primed(self) -> bool:
        """Whether the stream head has been consumed (by ``prime()`` or the first chunk)."""
        return self._primed

    def convert(self, signal: np.ndarray, on_chunk=None) -> np.ndarray:
        """Stream a whole signal and return its conversion, aligned and of the same length.

        Uses the subclass's ``reset``/``prime``/``process``: resets the engine, primes it with
        the signal's head and feeds the rest chunk by chunk, zero-padded at the end so the last
        samples' lookahead is there. Because the head went
        in through :meth:`prime`, output sample ``m`` is the conversion of input sample ``m``.
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
