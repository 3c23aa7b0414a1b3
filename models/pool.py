"""Stream pools: the exact state of every session one voice converts, and one call that steps any
set of them (:mod:`services.inference` keeps one pool per voice).

A pool has ``slots`` places; a session opens one (:class:`SlotsFull` when
none is free) and keeps it until it leaves. Each slot is one stream exactly as a single engine
converts it (:class:`~models.engine.Engine`: primed with its head, then chunk by chunk), so each
session's output is its own exact streamed conversion whatever the other slots do. Two kinds:

* :class:`~models.batch.BatchedEngine` for the eager PyTorch step: state batch-major, and one
  call of the step converts every given slot (``batched``).
* :class:`EnginePool` for any other engine (ONNX Runtime, the module code, passthrough): one
  engine per slot (:meth:`fork`: the weights or graphs shared, the state its own), stepped in
  turn. On this CPU a batched ONNX graph gained 1.16x at best per stream (docs/performance.md),
  so ONNX Runtime keeps its lean single-stream graph.

Torch-free: :func:`pool_for` imports the batched engine only for an eager engine.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .engine import SlotsFull, free_slot

__all__ = ["EnginePool", "SlotsFull", "pool_for"]


class EnginePool:
    """Up to ``slots`` streams, each its own engine (``engine`` itself, then its forks)."""

    batched = False

    def __init__(self, engine: Any, slots: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.geometry = engine.geometry
        self.slots = slots
        self._engines: dict[int, Any] = {0: engine}   # made once per slot, kept for reuse
        self._open: set[int] = set()

    @property
    def active(self) -> list[int]:
        """Slots holding a stream, in order."""
        return sorted(self._open)

    def open(self) -> int:
        """Admit a stream: its slot, state reset (raises :class:`SlotsFull`)."""
        free = free_slot(self._open, self.slots)
        if free not in self._engines:
            self._engines[free] = self._engines[0].fork()
        self._engines[free].reset()
        self._open.add(free)
        return free

    def close(self, slot: int) -> None:
        """Free ``slot``; a no-op if it is free already."""
        self._open.discard(slot)

    def reset(self, slot: int) -> None:
        """Forget ``slot``'s stream; the next one needs a new head."""
        self._engine(slot).reset()

    def primed(self, slot: int) -> bool:
        """Whether ``slot``'s stream has its head."""
        return self._engine(slot).primed

    def prime(self, slot: int, head: np.ndarray | None = None) -> None:
        """Start ``slot``'s stream with its first ``head_len`` samples (``None``: silence)."""
        self._engine(slot).prime(head)

    def step(self, chunks: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Convert one chunk of each given slot; returns slot -> output."""
        return {s: self._engine(s).process(x) for s, x in chunks.items()}

    def state_is_finite(self, slot: int) -> bool:
        """False if ``slot``'s state holds NaN/Inf."""
        return self._engine(slot).state_is_finite()

    def _engine(self, slot: int) -> Any:
        if slot not in self._open:
            raise KeyError(f"slot {slot} holds no stream (open one first)")
        return self._engines[slot]


#: Steps a new pool takes on silence before its first real chunk (the first calls are slower).
WARM_STEPS = 3


def pool_for(engine: Any, slots: int) -> Any:
    """The pool for ``engine``'s voice, warmed up: batched for the eager restructured step, else
    one engine per slot. ``engine`` is the voice's loaded engine. Takes tens of ms (eager): build
    it off the audio path when a loop is running."""
    if getattr(engine, "restructured", False):
        from .batch import BatchedEngine

        pool = BatchedEngine(engine.model, engine.geometry.chunk_factor, slots, engine.device)
    else:
        pool = EnginePool(engine, slots)
    slot = pool.open()
    silence = np.zeros(pool.geometry.chunk_len, np.float32)
    for _ in range(WARM_STEPS):
        pool.step({slot: silence})
    pool.close(slot)
    return pool
