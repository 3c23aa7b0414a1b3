"""Timing properties shared by the streaming engines (torch-free, so light services can use it)."""
from __future__ import annotations


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
