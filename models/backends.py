"""Which backend runs the streaming step: the fastest valid one available, and its artifact cache.

Backends (``inference.backend``, ``llvc convert --backend``):

* ``eager``: PyTorch (:class:`models.streaming.StreamingEngine`), CPU or CUDA.
* ``onnx``: ONNX Runtime (:class:`models.onnx_engine.OnnxEngine`) on an artifact made by
  ``llvc export``; CPU only, several times faster there, and torch is never imported.
* ``auto`` (the default): eager on CUDA; on CPU, ONNX Runtime when ``onnxruntime`` is installed
  and a valid artifact is at hand (the one configured, else the cached one for this checkpoint,
  config and chunk factor), otherwise eager with one line saying why and how to get the fast
  path. Resolving never exports: a (re)starting service must be back fast, and an export
  takes ~10 s. ``llvc run`` and ``llvc export --cache`` fill the cache (:func:`ensure_artifact`).

The cache: ``$LLVC_CACHE_DIR``, else ``$XDG_CACHE_HOME/llvc``, else ``~/.cache/llvc``; artifacts
live under ``onnx/`` there, named by a hash of everything they depend on
(:attr:`models.spec.ModelSpec.artifact_key`), so a changed checkpoint, config, chunk factor or artifact format
gets a new name instead of a stale file.

This module must not import torch at import time, nor when resolving (only
:func:`ensure_artifact`'s export does).
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_CONFIG_PATH
from .spec import ModelSpec

#: What ``inference.backend`` and ``llvc convert --backend`` accept.
BACKENDS = ("auto", "eager", "onnx")
#: Environment: the cache folder (wins over ``$XDG_CACHE_HOME/llvc``).
CACHE_ENV = "LLVC_CACHE_DIR"
#: Environment: when set non-empty (not "0"), ``llvc run`` does not export (the tests set it).
NO_EXPORT_ENV = "LLVC_NO_EXPORT"
#: Devices whose presence (torch-free) makes ``device = auto`` mean CUDA (or ROCm).
_GPU_NODES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")


class BackendError(ValueError):
    """An explicitly requested backend that cannot run (one line)."""


def cache_dir() -> Path:
    """``$LLVC_CACHE_DIR``, else ``$XDG_CACHE_HOME/llvc``, else ``~/.cache/llvc``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "llvc"
    return Path.home() / ".cache" / "llvc"


def cached_artifact_path(spec: ModelSpec) -> Path:
    """Where the cache keeps the artifact of ``spec``'s model: ``<cache>/onnx/<name>.onnx``, the
    name ending in :attr:`~models.spec.ModelSpec.artifact_key`. Raises ``OSError`` when the
    checkpoint cannot be read."""
    return cache_dir() / "onnx" / spec.artifact_name


def export_hint(spec: ModelSpec) -> str:
    """The command that fills the cache for ``spec``'s model."""
    given = "" if spec.demo else (
        (f" -p {spec.checkpoint}" if spec.checkpoint else "")
        + (f" -c {spec.files.config}" if spec.untrained or spec.files.config != DEFAULT_CONFIG_PATH else ""))
    return f"llvc export --cache{given} -n {spec.chunk_factor}"


def ensure_artifact(spec: ModelSpec, log: Callable[[str], Any] = lambda msg: None, threads: int = 1) -> Path:
    """The cached artifact for ``spec``'s model, exported first if it is absent or stale.

    ``log(line)`` is called once, just before exporting (never when the cache is valid).
    Imports torch only to export. Two processes that race take turns on a lock file; the
    second then finds the first one's artifact. Raises whatever loading or exporting raises.
    """
    from .onnx_engine import ArtifactError, OnnxEngine

    path = cached_artifact_path(spec)

    def valid() -> bool:
        try:
            OnnxEngine.for_model(path, spec, threads)
            return True
        except ArtifactError:
            return False

    if valid():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if valid():  # made by whoever held the lock before us
            return path
        log(f"exporting the ONNX step for {spec.label} cf {spec.chunk_factor} into {path} (once; ~10 s)")
        from .checkpoint import load_spec
        from .export import export_onnx

        model, info = load_spec(spec, warn=lambda msg: None)
        export_onnx(model, info, spec.chunk_factor, path)
        OnnxEngine.for_model(path, spec, threads)  # what a service will check
    return path


def onnx_importable() -> bool:
    """Whether ``onnxruntime`` is installed (found, not imported: that costs time and memory)."""
    return importlib.util.find_spec("onnxruntime") is not None


def export_possible() -> bool:
    """Whether this process could export: torch, onnxruntime and onnxscript are installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "onnxruntime", "onnxscript"))


def gpu_wanted(device: str) -> bool:
    """Whether ``device`` means a GPU: ``cuda``, or ``auto`` with a GPU device node present."""
    return device == "cuda" or (device == "auto" and any(os.path.exists(p) for p in _GPU_NODES))


@dataclass
class Resolved:
    """What :func:`resolve_backend` chose."""

    backend: str                 # "eager" or "onnx"
    engine: Any = None           # the loaded OnnxEngine when backend == "onnx"
    artifact: Path | None = None
    note: str | None = None      # one line: why ``auto`` fell back to eager (None: it did not)


def resolve_backend(requested: str, device: str, artifact: str | Path | None, spec: ModelSpec,
                    threads: int = 1, setting: str = "inference.backend",
                    artifact_setting: str = "inference.artifact") -> Resolved:
    """Choose the backend for ``requested`` (one of :data:`BACKENDS`) to run ``spec``; never exports.

    ``onnx`` loads ``artifact`` (empty: the cached one) or raises :class:`BackendError` (or the
    :class:`~models.onnx_engine.ArtifactError` of a stale artifact), one line each. ``auto``
    never raises for the backend's sake: it falls back to eager with :attr:`Resolved.note` set.
    ``setting`` and ``artifact_setting`` name the knobs in messages.
    """
    if requested not in BACKENDS:
        raise BackendError(f"{setting}: must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "eager" or (requested == "auto" and gpu_wanted(device)):
        return Resolved("eager")
    explicit = requested == "onnx"
    label = f"{setting} = onnx" if explicit else "backend auto"
    make = f"make it with: {export_hint(spec)}; llvc run makes it too"

    def fallback(why: str, how: str) -> Resolved:
        if explicit:
            raise BackendError(f"{label}: {why} ({how})")
        return Resolved("eager", note=f"{label}: {why}; using eager PyTorch ({how})")

    if not onnx_importable():
        return fallback("onnxruntime is not installed", "pip install -e '.[onnx]' for the faster ONNX Runtime backend")
    if artifact:
        path = Path(artifact)
    else:
        try:
            path = cached_artifact_path(spec)
        except OSError as exc:
            if not explicit:
                return Resolved("eager")  # a missing checkpoint: eager reports it as usual
            raise BackendError(f"{spec.checkpoint}: cannot read the checkpoint ({exc.strerror or exc})") from None
        if not path.is_file():
            needs = f"needs {artifact_setting} or a cached artifact, and " if explicit else ""
            return fallback(f"{needs}no ONNX artifact is cached for this model (cf {spec.chunk_factor}) at {path}",
                            make)
    try:
        from .onnx_engine import ArtifactError, OnnxEngine
    except ImportError as exc:  # found but broken
        return fallback(f"onnxruntime cannot be imported ({exc})", "pip install -e '.[onnx]'")
    try:
        engine = OnnxEngine.for_model(path, spec, threads)
    except ArtifactError as exc:
        if explicit:
            raise
        where = f"{artifact_setting} unusable" if artifact else "cached ONNX artifact unusable"
        return fallback(f"{where}: {exc}", make)
    except OSError as exc:  # the checkpoint cannot be read to check the artifact against
        if not explicit:
            return Resolved("eager")
        raise BackendError(f"{spec.checkpoint}: cannot read the checkpoint ({exc.strerror or exc})") from None
    return Resolved("onnx", engine, path)
