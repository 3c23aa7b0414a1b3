"""The exact streaming step on ONNX Runtime: numpy + onnxruntime only, no torch.

Runs the artifact :mod:`models.export` writes and behaves like
:class:`models.streaming.StreamingEngine` (same geometry, same ``prime``/``process``/``reset``/
``convert``), so a service can convert without paying torch's import time and memory. The
state lives in numpy arrays handed in and out of each step; the sidecar ``<artifact>.json``
says what they are and which checkpoint and settings the graph was made from, and
:meth:`OnnxEngine.load` refuses an artifact that does not match what the caller expects.

This module must not import torch (tests check it in a fresh interpreter).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from .config import ConfigError, parse_config
from .engine import EngineBase
from .geometry import StreamGeometry

if TYPE_CHECKING:
    from .spec import ModelSpec


class ArtifactError(ValueError):
    """An ONNX artifact that is missing, malformed or stale for the given model (one line)."""


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # With threads > 1 ORT's workers spin while waiting for work (its default). Turning that
    # off made 2 threads slower than 1 (cf 1: 1.61 vs 1.31 ms; cf 4: 3.64 vs 3.61 ms), since
    # every parallel op then pays a wake-up; with spinning 2 threads give 1.22 and 2.86 ms.
    # The price is a busy second core during steps: inference.threads defaults to 1.
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own types for unreadable graphs
        raise ArtifactError(f"{path}: not a loadable ONNX graph ({str(exc).strip()[:200]})") from None


class OnnxEngine(EngineBase):
    """One stream's state and the exact streaming step, run by ONNX Runtime.

    Build it with :meth:`load`. Output equals the eager engine's to float rounding.
    """

    def __init__(self, step: ort.InferenceSession, prime: ort.InferenceSession | None,
                 meta: dict[str, Any], path: Path | None = None):
        self.path = path
        self.meta = meta
        try:  # derived from the config the graph was made from, as every engine derives it
            self.geometry = StreamGeometry.of(parse_config(meta["config"], f"{path} sidecar"),
                                              meta["chunk_factor"])
        except (ConfigError, ValueError) as exc:
            raise ArtifactError(f"{path}: sidecar describes no usable model ({exc})") from None
        self.checkpoint_sha256 = meta["checkpoint_sha256"]
        self._step, self._prime = step, prime
        self._names = list(meta["state_names"])
        self._shapes = {k: tuple(v) for k, v in meta["state_shapes"].items()}
        self._out_names = ["audio", *(f"new_{n}" for n in self._names)]
        self._state: dict[str, np.ndarray] = {}
        self.reset()

    @classmethod
    def load(cls, path: str | Path, threads: int = 1, expect_checkpoint_hash: str | None = None,
             expect_chunk_factor: int | None = None, expect_config: dict | None = None) -> OnnxEngine:
        """Load the artifact at ``path`` (the ``.onnx``; its sidecar ``.json`` must be beside it).

        ``threads`` is ONNX Runtime's intra-op thread count. Each ``expect_*`` given must match
        the sidecar (checkpoint SHA-256 as :func:`models.export.model_hash` defines it, chunk
        factor, config as ``ModelConfig.to_json_dict()``); otherwise :class:`ArtifactError`
        names what differs (a stale artifact: export it again).
        """
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such ONNX artifact (make one with llvc export)")
        meta = read_sidecar(path)
        stale = []
        if expect_checkpoint_hash is not None and expect_checkpoint_hash != meta["checkpoint_sha256"]:
            stale.append(f"checkpoint sha256 {meta['checkpoint_sha256'][:12]}..., "
                         f"expected {expect_checkpoint_hash[:12]}...")
        if expect_chunk_factor is not None and expect_chunk_factor != meta["chunk_factor"]:
            stale.append(f"chunk factor {meta['chunk_factor']}, expected {expect_chunk_factor}")
        if expect_config is not None and expect_config != meta["config"]:
            stale.append("model config differs")
        if stale:
            raise ArtifactError(f"{path}: stale artifact: " + "; ".join(stale) + " (run llvc export again)")
        prime = None
        if meta.get("prime_graph"):
            prime_file = path.parent / meta["prime_graph"]
            if not prime_file.exists():
                raise ArtifactError(f"{path}: its priming graph {prime_file} is missing")
            prime = _session(prime_file, threads)
        return cls(_session(path, threads), prime, meta, path)

    @classmethod
    def for_model(cls, path: str | Path, spec: ModelSpec, threads: int = 1) -> OnnxEngine:
        """Load the artifact at ``path`` for the model a command or service was told to run.

        What ``spec`` resolves to is checked against the sidecar without torch: the checkpoint
        by its file's SHA-256, the config and the chunk factor. Anything that differs is a stale
        artifact (:class:`ArtifactError`).
        """
        engine = cls.load(path, threads=threads, expect_checkpoint_hash=spec.checkpoint_sha256,
                          expect_chunk_factor=spec.chunk_factor, expect_config=spec.config.to_json_dict())
        if spec.untrained and engine.meta.get("checkpoint"):
            raise ArtifactError(f"{path}: stale artifact: made from {engine.meta['checkpoint']}, but the "
                                "model asked for is the untrained seeded model (a config, no checkpoint)")
        return engine

    @property
    def model_id(self) -> str:
        """The model's id as ``load_model`` named it when the artifact was exported."""
        return str(self.meta.get("model_id", "onnx"))

    @property
    def trained(self) -> bool:
        """False for an artifact of the untrained seeded model."""
        return bool(self.meta.get("trained"))

    def fork(self) -> OnnxEngine:
        """Another stream of the same graphs: its own state, the ONNX Runtime sessions shared."""
        return OnnxEngine(self._step, self._prime, self.meta, self.path)

    # ------------------------------------------------------------------ control
    def reset(self) -> None:
        """Forget the stream: zero every buffer; the next stream needs a new head."""
        self._state = {k: np.zeros(self._shapes[k], dtype=np.float32) for k in self._names}
        self._primed = False
        self.chunks_processed = 0

    def prime(self, head: np.ndarray | None = None) -> None:
        """Start the stream with its first ``head_len`` samples (``None``: silence)."""
        if self._primed:
            raise RuntimeError("stream already started: reset() before priming again")
        if self.context_len:
            lead = np.zeros(self.context_len, dtype=np.float32)
            if head is not None and self.head_len:
                lead[self.context_len - self.head_len:] = self.checked(head, self.head_len, "head")
            if self._prime is not None:
                ctx, prenet = self._prime.run(None, {"lead": lead, "prenet": self._state["prenet"]})
                self._state["ctx"], self._state["prenet"] = ctx, prenet
            else:  # no pre-net: the context is the (padded) head itself
                self._state["ctx"] = lead.reshape(1, 1, -1)
        elif head is not None:
            self.checked(head, self.head_len, "head")
        self._primed = True

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Convert exactly ``chunk_len`` new samples; returns ``chunk_len`` float32 samples."""
        x = self.checked(chunk, self.chunk_len, "chunk")
        if not self._primed:
            self.prime(None)
        feeds = {"chunk": x, **self._state}
        outs = self._step.run(self._out_names, feeds)
        self._state = dict(zip(self._names, outs[1:]))
        self.chunks_processed += 1
        return outs[0]

    def state_is_finite(self) -> bool:
        """False if any buffer holds NaN/Inf (the stream then needs a reset)."""
        return all(bool(np.isfinite(b).all()) for b in self._state.values())


_REQUIRED = ("checkpoint_sha256", "config", "chunk_factor", "state_names", "state_shapes")


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """The artifact's sidecar (``x.onnx`` → ``x.json``), checked for the fields the engine needs."""
    side = Path(onnx_path).with_suffix(".json")
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{onnx_path}: no sidecar {side.name} beside it (export with llvc export)") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{side}: unreadable sidecar ({exc})") from None
    missing = [k for k in _REQUIRED if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ArtifactError(f"{side}: sidecar lacks {', '.join(missing)}")
    return meta
