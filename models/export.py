"""``llvc export``: the exact streaming step as a static-shape ONNX graph, for ONNX Runtime.

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

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import ModelInfo, file_digest
from .config import ARTIFACT_VERSION, CHECKPOINT_DEFAULT_HELP, CONFIG_DEFAULT_HELP
from .fast_step import FastStep
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
    if info.checkpoint is not None:
        return file_digest(Path(info.checkpoint))
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
        self.context_len = model.in_kernel - model.L

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
    if not isinstance(chunk_factor, int) or isinstance(chunk_factor, bool) or chunk_factor < 1:
        raise ValueError(f"chunk_factor must be an integer >= 1, got {chunk_factor!r}")
    out = Path(out_path)
    if out.suffix != ".onnx":
        raise ValueError(f"{out}: output must end in .onnx")
    model = model.to("cpu").eval()
    step = FastStep(model, chunk_factor)
    state = step.initial_state()
    chunk = torch.zeros(step.chunk_len)
    want_prime = model.has_prenet and step.context_len > 0
    shapes = {name: list(t.shape) for name, t in zip(step.state_names, state)}
    sidecar = {
        "artifact_version": ARTIFACT_VERSION,
        "checkpoint_sha256": model_hash(model, info),
        "checkpoint": str(info.checkpoint) if info.checkpoint else None,
        "model_id": info.model_id,
        "trained": info.trained,
        "config": model.cfg.to_json_dict(),
        "chunk_factor": chunk_factor,
        "L": model.L,
        "chunk_len": step.chunk_len,
        "context_len": step.context_len,
        "head_len": step.context_len - model.left_pad,
        "sample_rate": model.cfg.sample_rate,
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
    temps = []
    try:
        for final in finals:
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{final.name}.", suffix=".tmp")
            os.close(fd)
            temps.append(Path(tmp))
        if want_prime:
            _export(PrimeStep(model), (torch.zeros(step.context_len), model.convnet_pre.init_ctx(1)),
                    ["lead", "prenet"], ["ctx", "new_prenet"], temps[0])
        _export(step, (chunk, *state), ["chunk", *step.state_names],
                ["audio", *(f"new_{n}" for n in step.state_names)], temps[-2])
        temps[-1].write_text(json.dumps(sidecar, indent=2) + "\n")
        for tmp, final in zip(temps, finals):
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; an artifact is meant to be shared
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc export``'s flags on ``p``."""
    p.add_argument("-p", "--checkpoint", help="LLVC checkpoint (G_500000.pth or a bare state dict); "
                   + CHECKPOINT_DEFAULT_HELP)
    p.add_argument("-c", "--config", help=f"model config JSON in upstream format ({CONFIG_DEFAULT_HELP})")
    p.add_argument("-n", "--chunk-factor", type=int, default=1,
                   help="chunk = 13*16*N samples; the graph is fixed to this size (default 1: 13 ms)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--out", help="output path, must end in .onnx "
                       "(the sidecar <out>.json and, with a pre-net, <out>.prime.onnx go beside it)")
    where.add_argument("--cache", action="store_true", help="write into the artifact cache ($LLVC_CACHE_DIR, "
                       "else $XDG_CACHE_HOME/llvc, else ~/.cache/llvc), where backend auto looks")


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc export``; returns the exit status."""
    from .checkpoint import load_model

    try:
        model, info = load_model(args.checkpoint, args.config)
        if args.cache:
            from .backends import cached_artifact_path

            args.out = cached_artifact_path(args.checkpoint, args.config, args.chunk_factor)
        path = export_onnx(model, info, args.chunk_factor, args.out)
    except Exception as exc:  # one line, whatever failed
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"llvc export: {msg}", file=sys.stderr)
        return 1
    print(f"llvc export: wrote {path} (chunk factor {args.chunk_factor}, {info.describe()})")
    return 0
