"""The exact streaming step as a static-shape ONNX graph, for ONNX Runtime (``llvc export``'s
library; the command is :mod:`models.export_command`).

The graph is one step of :class:`models.streaming.StreamingEngine` with every piece of state
as an explicit input and output: ``chunk [chunk_len]`` plus the state in, ``audio [chunk_len]``
plus the updated state out. Its math is :class:`models.fast_step.FastStep`: the same weights,
read from the same model, laid out time-major with constants folded (that module says what and
why); it equals the module code to float rounding and tests hold it to the reference.

Shapes are static for one chunk factor: a dynamic-shape export was measured 3x slower
(design notes, section 5). Priming (the pre-net over the stream head) is a second, tiny
graph, ``<out>.prime.onnx``, written only for models that have a pre-net and lookahead;
without a pre-net the context is the head itself.

Artifact: ``<out>.onnx`` (+ ``<out>.prime.onnx``) and the sidecar ``<out>.json`` that
:class:`models.onnx_engine.OnnxEngine` checks before use (see :func:`model_hash`). All files
are written under temporary names and renamed, so a failure leaves no partial artifact.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from common.files import atomic_files

from .checkpoint import ModelInfo
from .config import ARTIFACT_VERSION
from .fast_step import FastStep
from .geometry import StreamGeometry
from .llvc import LLVC

OPSET = 18


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def sidecar_path(onnx_path: str | Path) -> Path:
    """``x.onnx`` → ``x.json``: where the artifact's description lives."""
    return Path(onnx_path).with_suffix(".json")


def prime_path(onnx_path: str | Path) -> Path:
    """``x.onnx`` → ``x.prime.onnx``: the priming graph (pre-net models only)."""
    return Path(onnx_path).with_suffix(".prime.onnx")


def model_hash(model: LLVC, info: ModelInfo) -> str:
    """The hash an artifact is tied to: SHA-256 of the checkpoint file, hex.

    For the untrained seeded model (no file) it is the SHA-256 over the state dict instead: for each
    key in sorted order, the key's UTF-8 bytes then the tensor's float32 C-order bytes.
    """
    if info.spec.checkpoint_sha256 is not None:
        return info.spec.checkpoint_sha256
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class PrimeStep(nn.Module):
    """Priming as a pure function: ``(lead [2L], prenet) -> (ctx [1,1,2L], prenet')``.

    ``lead`` is offline's left padding followed by the stream head, as in
    :meth:`StreamingEngine.prime`.
    """

    def __init__(self, model: LLVC):
        super().__init__()
        self.model = model.eval()
        self.context_len = StreamGeometry.of(model.cfg).context_len

    def forward(self, lead: Tensor, prenet: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        st = {"prenet": prenet.clone()}
        ctx = self.model.apply_prenet(lead.reshape(1, 1, self.context_len), st)
        return ctx, st["prenet"]


def _slice_scatter(self, src, dim: int = 0, start=None, end=None, step: int = 1):
    """``aten.slice_scatter`` (a state buffer's in-place slice update) as Slice + Concat.

    The stock lowering transposes the whole buffer to the front axis, ScatterNDs and transposes
    back: on the ``[1, 512, 510]`` encoder buffer, eight times a step, that was 2.6 of 8.2 ms
    (1 thread). With static shapes the update is just ``concat(before, src, after)``: 3.4 ms.
    """
    from onnxscript import opset18 as op

    if step != 1:
        raise NotImplementedError("slice_scatter with step != 1")
    axes = op.Constant(value_ints=[dim])
    big = op.Constant(value_ints=[2 ** 62])  # "to the end", as ONNX Slice clamps
    before = op.Slice(self, op.Constant(value_ints=[0]), op.Constant(value_ints=[start or 0]), axes)
    after = op.Slice(self, op.Constant(value_ints=[end]) if end is not None else big, big, axes)
    return op.Concat(before, src, after, axis=dim)


def _export(module: nn.Module, args: tuple[Tensor, ...], in_names: list[str],
            out_names: list[str], path: Path) -> None:
    """Export ``module`` to ``path`` with the dynamo exporter (static shapes).

    The TorchScript exporter cannot export this model (no ``unfold`` with these shapes), so
    there is no fallback.
    """
    # The exporter reports progress and harmless warnings on stdout/stderr, and logs more
    # (torchvision missing, ...) through a handler made before any redirect: keep all off.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    with torch.no_grad(), open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null), contextlib.redirect_stderr(null), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)
        try:
            torch.onnx.export(module, args, str(path), input_names=in_names, output_names=out_names,
                              opset_version=OPSET, dynamo=True, external_data=False, optimize=True,
                              verbose=False,
                              custom_translation_table={torch.ops.aten.slice_scatter.default: _slice_scatter})
        finally:
            quiet.setLevel(level)


def export_onnx(model: LLVC, info: ModelInfo, chunk_factor: int, out_path: str | Path) -> Path:
    """Export ``model``'s streaming step for ``chunk_factor`` to ``out_path`` (+ sidecar).

    Returns the ``.onnx`` path. Nothing is left at the destination if anything fails.
    """
    out = Path(out_path)
    if out.suffix != ".onnx":
        raise ValueError(f"{out}: output must end in .onnx")
    model = model.to("cpu").eval()
    step = FastStep(model, chunk_factor)  # checks the chunk factor (StreamGeometry.of)
    geometry = step.geometry
    state = step.initial_state()
    chunk = torch.zeros(geometry.chunk_len)
    want_prime = model.has_prenet and geometry.context_len > 0
    shapes = {name: list(t.shape) for name, t in zip(step.state_names, state)}
    sidecar = {
        "artifact_version": ARTIFACT_VERSION,
        "checkpoint_sha256": model_hash(model, info),
        "checkpoint": str(info.checkpoint) if info.checkpoint else None,
        "model_id": info.model_id,
        "trained": info.trained,
        "config": model.cfg.to_json_dict(),
        "chunk_factor": chunk_factor,
        # For people reading the file: the engine derives these from config and chunk factor.
        "geometry": {"chunk_len": geometry.chunk_len, "head_len": geometry.head_len,
                     "context_len": geometry.context_len, "sample_rate": geometry.sample_rate},
        "state_names": step.state_names,
        "state_shapes": shapes,
        "prime_graph": prime_path(out).name if want_prime else None,
        "opset": OPSET,
        "graph": "FastStep",
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch_version": torch.__version__,
        "onnxscript_version": _version("onnxscript"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # The sidecar goes last: whoever sees it sees the graphs it describes.
    finals = ([prime_path(out)] if want_prime else []) + [out, sidecar_path(out)]
    with atomic_files(*finals) as temps:
        if want_prime:
            _export(PrimeStep(model), (torch.zeros(geometry.context_len), model.convnet_pre.init_ctx(1)),
                    ["lead", "prenet"], ["ctx", "new_prenet"], temps[0])
        _export(step, (chunk, *state), ["chunk", *step.state_names],
                ["audio", *(f"new_{n}" for n in step.state_names)], temps[-2])
        temps[-1].write_text(json.dumps(sidecar, indent=2) + "\n")
    return out
