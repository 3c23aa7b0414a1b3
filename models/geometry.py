"""A stream's geometry: chunk, head and context lengths and the latencies they imply.

Every one of these numbers is derived here, from a model config and a chunk factor
(:meth:`StreamGeometry.of`), and everything else reads it: the engines, the export and its
sidecar, capture's framing, inference's re-framing, the benchmarks. Torch-free, so light services
(capture, the ONNX path) use it without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import ModelConfig


def check_chunk_factor(value: Any) -> int:
    """``value`` if it is a chunk factor (an int >= 1, not a bool), else ``ValueError`` (one line)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"chunk_factor must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class StreamGeometry:
    """How one stream is cut for an engine that converts ``head + chunk_0 + chunk_1 + ...``.

    ``chunk_len``: samples per ``process()`` call (whole decoder windows, so windows stay on
    offline's grid). ``head_len``: samples the stream starts with, given to ``prime()`` (L with
    lookahead, else 0). ``context_len``: samples of ``in_conv`` context carried between chunks
    (2L with lookahead). Build it with :meth:`of`; constructing it directly is for tests of odd
    geometries.
    """

    chunk_len: int
    head_len: int
    context_len: int
    sample_rate: int
    chunk_factor: int = 1

    @classmethod
    def of(cls, cfg: ModelConfig, chunk_factor: int = 1) -> StreamGeometry:
        """The geometry of ``cfg``'s model streamed at ``chunk_factor`` (checked here, once)."""
        check_chunk_factor(chunk_factor)
        context_len = cfg.in_kernel - cfg.L
        return cls(chunk_len=cfg.window_samples * chunk_factor, head_len=context_len - cfg.left_pad,
                   context_len=context_len, sample_rate=cfg.sample_rate, chunk_factor=chunk_factor)

    @property
    def window_samples(self) -> int:
        """One decoder window (the chunk at chunk factor 1): the shortest input convertible."""
        return self.chunk_len // self.chunk_factor

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
    def chunk_ms(self) -> float:
        """Duration of one chunk in milliseconds."""
        return 1000.0 * self.chunk_s

    def samples(self, ms: float) -> int:
        """``ms`` milliseconds as a whole number of samples at this sample rate."""
        return round(ms * self.sample_rate / 1000)
