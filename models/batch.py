"""Many streams, one step: per-stream LLVC state in batch slots, stepped together.

A GPU box (or a CPU core) that converts one 13 ms chunk in about 1.3 ms idles most of the
time with one stream. :class:`BatchedEngine` keeps up to ``slots`` streams, each with the state
:class:`~models.streaming.StreamingEngine` keeps for one, and converts the next chunk of any
subset of them in **one** call: :class:`~models.fast_step.FastStep` itself,
the exact step with a leading stream dimension (the single-stream step is its batch of one, so
the math exists once). Each stream's output is its own exact streaming output (and so its
offline conversion) whatever the other slots hold, to float rounding: the batched GEMMs add no
term across streams, only a different blocking of the same sums. (``torch.func.vmap`` over the
single step gives the same outputs, but its per-op overhead made a call 5 ms slower on this
CPU: batch 1 took 7.7 ms against 2.6 ms.)

State is kept **batch-major** (one ``[slots, ...]`` tensor per state name): a step over slots
``a..b`` in order reads and writes views; any other subset is gathered (``index_select``) and
scattered back (``index_copy_``). A slot's state is zeroed when its stream opens, as a fresh
:class:`~models.streaming.StreamingEngine` starts.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .engine import SlotsFull, free_slot
from .geometry import StreamGeometry
from .llvc import LLVC
from .streaming import step_tensor

__all__ = ["BatchedEngine", "SlotsFull"]


class BatchedEngine:
    """Up to ``slots`` exact LLVC streams, converted together by :meth:`step` (a stream pool,
    :mod:`models.pool`)."""

    batched = True

    def __init__(self, model: LLVC, chunk_factor: int = 1, slots: int = 8, device: str | torch.device = "cpu"):
        from .fast_step import FastStep  # raises ValueError for a configuration it does not cover

        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.geometry = StreamGeometry.of(model.cfg, chunk_factor)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._step = FastStep(model, chunk_factor).to(self.device)
        self._names = self._step.state_names
        self._batched = self._step
        self.slots = slots
        with torch.inference_mode():
            self._state = [torch.zeros((slots, *t.shape), device=self.device) for t in self._step.initial_state()]
        self._open: dict[int, bool] = {}  # slot -> primed
        self.chunks_processed = 0

    # ------------------------------------------------------------------ slots
    @property
    def active(self) -> list[int]:
        """Slots holding a stream, in order."""
        return sorted(self._open)

    def open(self) -> int:
        """Admit a stream: its slot, state zeroed (raises :class:`SlotsFull`)."""
        free = free_slot(self._open, self.slots)
        with torch.inference_mode():
            for buf in self._state:
                buf[free].zero_()
        self._open[free] = False
        return free

    def close(self, slot: int) -> None:
        """Free ``slot`` (its stream is gone); a no-op if it is free already."""
        self._open.pop(slot, None)

    def reset(self, slot: int) -> None:
        """Forget ``slot``'s stream (state zeroed); the next one needs a new head."""
        self._check(slot)
        with torch.inference_mode():
            for buf in self._state:
                buf[slot].zero_()
        self._open[slot] = False

    def primed(self, slot: int) -> bool:
        """Whether ``slot``'s stream has its head."""
        self._check(slot)
        return self._open[slot]

    def prime(self, slot: int, head: np.ndarray | None = None) -> None:
        """Start ``slot``'s stream with its first ``geometry.head_len`` samples (``None``: silence),
        as :meth:`StreamingEngine.prime` does for one stream."""
        self._check(slot)
        if self._open[slot]:
            raise RuntimeError(f"slot {slot}'s stream already started: close and open it again")
        C, H = self.geometry.context_len, self.geometry.head_len
        with torch.inference_mode():
            if C:
                lead = torch.zeros(1, 1, C, device=self.device)
                if head is not None and H:
                    lead[0, 0, C - H:] = self._as_tensor(head, H, "head")
                cache = {"prenet": self._state[self._names.index("prenet")][slot]} if "prenet" in self._names else {}
                # apply_prenet updates the cache view in place, i.e. this slot's row.
                self._state[self._names.index("ctx")][slot] = self.model.apply_prenet(lead, cache)
        self._open[slot] = True

    # ------------------------------------------------------------------ the step
    def step(self, chunks: Mapping[int, np.ndarray | torch.Tensor]) -> dict[int, np.ndarray]:
        """Convert one chunk of each given slot in one batched call; returns slot -> output.

        ``chunks`` maps open slots to exactly ``geometry.chunk_len`` new samples each. A slot never
        primed is primed with silence first, as a single stream is.
        """
        if not chunks:
            return {}
        slots = sorted(chunks)
        for s in slots:
            self._check(s)
            if not self._open[s]:
                self.prime(s, None)
        x = torch.stack([self._as_tensor(chunks[s], self.geometry.chunk_len, f"slot {s}'s chunk") for s in slots])
        with torch.inference_mode():
            if slots == list(range(slots[0], slots[-1] + 1)):  # a run of slots: views, no gather
                lo, hi = slots[0], slots[-1] + 1
                audio, *new = self._batched(x, *(buf[lo:hi] for buf in self._state))
                for buf, value in zip(self._state, new):
                    buf[lo:hi] = value
            else:
                index = torch.tensor(slots, device=self.device)
                audio, *new = self._batched(x, *(buf.index_select(0, index) for buf in self._state))
                for buf, value in zip(self._state, new):
                    buf.index_copy_(0, index, value)
        self.chunks_processed += len(slots)
        out = audio.cpu().numpy()
        return {s: out[i] for i, s in enumerate(slots)}

    def state_is_finite(self, slot: int) -> bool:
        """False if ``slot``'s state holds NaN/Inf (its stream then needs to be reopened)."""
        self._check(slot)
        with torch.inference_mode():
            return bool(all(torch.isfinite(buf[slot]).all() for buf in self._state))

    # ------------------------------------------------------------------ helpers
    def _check(self, slot: int) -> None:
        if slot not in self._open:
            raise KeyError(f"slot {slot} holds no stream (open one first)")

    def _as_tensor(self, samples, n: int, what: str) -> torch.Tensor:
        return step_tensor(samples, n, what, self.device)
