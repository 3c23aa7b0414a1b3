"""Exact streaming: one stream's LLVC state, chunk in → chunk out, equal to the offline forward.

How the offline forward sees a signal ``s`` (upstream ``Net.forward(pad=True)``): it puts ``L``
zeros before ``s``, runs the causal pre-net over everything, adds it to the signal, and
``in_conv`` (kernel ``3L``, stride ``L``) reads frame ``t`` from padded samples
``[tL, tL + 3L)``, i.e. from ``s[tL - L, tL + 2L)``: one hop of past and ``L`` samples of
future beyond the hop. The decoder then works on windows of ``dec_chunk_size`` frames that
start at frame 0, and inside a window every frame attends to every other one. Consequences:

* A window's output (``dec_chunk_size * L`` samples) is known once ``L`` samples beyond its end
  have arrived: that ``L`` is the model's lookahead.
* Windows must sit on offline's grid: shifting the signal by one hop regroups the frames and
  changes the output (by up to 0.23 on the fixture), so "prime with 2L zeros" is not exact.

So the engine converts the stream ``s = head + chunk_0 + chunk_1 + ...`` where ``head`` is the
stream's first ``L`` samples (given to :meth:`StreamingEngine.prime`, or silence if never
given). ``process(chunk_k)`` returns offline's output for ``s[kC, (k+1)C)``: it lags its input by
exactly ``delay_samples = L`` samples, and every output sample is ready ``C + L`` samples after
it was captured (``latency_samples``), the least this model allows.

Upstream's own streaming loop instead re-feeds the ``2L`` raw lookahead samples through the
pre-net at every chunk. The pre-net is causal and cached, so its cache then sees those samples
twice and its output drifts from offline (6e-3 on the fixture, and it depends on the chunk
factor). Here the pre-net sees each sample exactly once: only the ``C`` new samples go through
it, and the ``2L`` context ``in_conv`` needs is kept on the pre-net's *output* side
(``x + prenet(x)``), so nothing is computed twice.
"""
from __future__ import annotations

import numpy as np
import torch

from .engine import EngineBase
from .geometry import StreamGeometry
from .llvc import LLVC


class StreamingEngine(EngineBase):
    """One stream's state and the exact streaming step.

    By default the step is :class:`models.fast_step.FastStep`: the model's own weights laid out
    time-major with constants folded (the ONNX graph's math too), 1.7-1.8x faster than the
    module code in eager PyTorch at chunk factor 1 and equal to it to float rounding. State is
    FastStep's (encoder buffers per layer, decoder key/value cache, output overlap buffer,
    pre-net cache, ``in_conv`` context); :meth:`reset` zeroes it.

    ``restructured=False`` runs the module code instead (``apply_prenet``, ``in_conv``,
    ``frames_to_audio`` on :meth:`LLVC.init_state`'s buffers, updated in place): what
    ``llvc bench``'s ``reference`` backend measures, and the fallback for configurations
    FastStep does not cover.
    """

    def __init__(self, model: LLVC, chunk_factor: int = 1, device: str | torch.device = "cpu",
                 restructured: bool = True):
        self.geometry = StreamGeometry.of(model.cfg, chunk_factor)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._fast = None
        if restructured:
            from .fast_step import FastStep

            try:
                self._fast = FastStep(model, chunk_factor).to(self.device)
            except ValueError:  # a configuration FastStep does not restructure: module code
                self._fast = None
        with torch.inference_mode():
            self._label = model.label_vector(1, self.device)
            if self._fast is not None:
                self._fast_state = [t.to(self.device) for t in self._fast.initial_state()]
            self._state = model.init_state(1, self.device)
            # in_conv input: [context | new chunk], reused every step (module code).
            self._in = torch.zeros(1, 1, self.context_len + self.chunk_len, device=self.device)
        self._primed = False
        self.chunks_processed = 0

    def fork(self) -> StreamingEngine:
        """Another stream of the same model (its weights shared): its own state, zeroed."""
        return StreamingEngine(self.model, self.geometry.chunk_factor, self.device, self.restructured)

    @property
    def restructured(self) -> bool:
        """Whether steps run :class:`~models.fast_step.FastStep` (else the module code)."""
        return self._fast is not None

    # ------------------------------------------------------------------ control
    def reset(self) -> None:
        """Forget the stream: zero every buffer; the next stream needs a new head."""
        with torch.inference_mode():
            for buf in [*self._state.values(), *getattr(self, "_fast_state", [])]:
                buf.zero_()
            self._in.zero_()
        self._primed = False
        self.chunks_processed = 0

    def prime(self, head: np.ndarray | torch.Tensor | None = None) -> None:
        """Start the stream with its first ``head_len`` samples (``None``: silence).

        This is offline's left padding followed by the head, pushed through the pre-net once;
        its output becomes the ``in_conv`` context for the first chunk.
        """
        if self._primed:
            raise RuntimeError("stream already started: reset() before priming again")
        head_t = self._as_tensor(head, self.head_len, "head") if head is not None else None
        with torch.inference_mode():
            if self.context_len:
                lead = torch.zeros(1, 1, self.context_len, device=self.device)
                if head_t is not None and self.head_len:
                    lead[0, 0, self.context_len - self.head_len:] = head_t
                if self._fast is None:
                    self._in[..., : self.context_len] = self.model.apply_prenet(lead, self._state)
                else:
                    names = self._fast.state_names
                    st = ({"prenet": self._fast_state[names.index("prenet")]}
                          if "prenet" in names else {})
                    self._fast_state[names.index("ctx")] = self.model.apply_prenet(lead, st)
        self._primed = True

    def process(self, chunk: np.ndarray | torch.Tensor) -> np.ndarray:
        """Convert exactly ``chunk_len`` new samples; returns ``chunk_len`` float32 samples."""
        return self.process_tensor(self._as_tensor(chunk, self.chunk_len, "chunk")).cpu().numpy()

    def process_tensor(self, chunk: torch.Tensor) -> torch.Tensor:
        """Like :meth:`process` for a 1-D float32 tensor already on :attr:`device`."""
        if not self._primed:
            self.prime(None)
        if self._fast is not None:
            with torch.inference_mode():
                audio, *self._fast_state = self._fast(chunk, *self._fast_state)
            self.chunks_processed += 1
            return audio
        m, C, N = self.model, self.chunk_len, self.context_len
        with torch.inference_mode():
            x = m.apply_prenet(chunk.view(1, 1, C), self._state)
            self._in[..., N:] = x
            frames = m.in_conv(self._in)
            if N:
                # C >= 13L > 2L, so the two regions never overlap.
                self._in[..., :N] = self._in[..., C:]
            y = m.frames_to_audio(frames, self._label, self._state)
        self.chunks_processed += 1
        return y.view(C)

    def state_is_finite(self) -> bool:
        """False if any buffer holds NaN/Inf (the stream then needs a reset)."""
        with torch.inference_mode():
            bufs = self._fast_state if self._fast is not None else [*self._state.values(), self._in]
            return bool(all(torch.isfinite(b).all() for b in bufs))

    # ------------------------------------------------------------------ helpers
    def _as_tensor(self, samples, n: int, what: str) -> torch.Tensor:
        return step_tensor(samples, n, what, self.device)


def step_tensor(samples, n: int, what: str, device: torch.device) -> torch.Tensor:
    """``samples`` (array or tensor) as a 1-D float32 tensor of exactly ``n`` on ``device``,
    else ``ValueError`` naming ``what``."""
    t = torch.as_tensor(samples)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{what} must be 1-D with exactly {n} samples, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)
