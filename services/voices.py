"""Voices: loading a model into a ready engine, the folder of voices to pick from, and loading a
new voice in the background while the current one keeps converting.

:func:`load_voice` is the one way inference turns a :class:`~models.spec.ModelSpec` into an
engine (at start-up and for a switch). :class:`VoiceLoader` runs it in a thread; whatever
would hold the interpreter for long (an ONNX export: torch tracing, ~10 s) runs in a child
process instead, so the audio loop keeps its turns. The swap itself happens in the loop, at a
chunk boundary (:mod:`services.inference`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.protocol import MAX_NAME_LEN
from common.realtime import runs_realtime
from models.backends import NO_EXPORT_ENV, export_possible, resolve_backend
from models.config import DEMO_CHECKPOINT, is_demo_checkpoint
from models.spec import ModelSpec

WARMUP_STEPS = 5
#: The interpreter's thread switch interval while a voice loads. Loading (model construction,
#: state-dict copies, session set-up) is mostly Python holding the GIL; at the default 5 ms the
#: audio loop waited up to 5 ms for the GIL at each of its many hand-offs per chunk, and lost
#: 12-35 chunks per eager switch (scripts/bench_voice_switch.py). At 0.2 ms the longest wait a
#: loader thread caused fell from 75 to 9 ms (eager) and from 5 to 3.6 ms (ONNX).
LOADING_SWITCH_INTERVAL_S = 0.0002


@dataclass
class Voice:
    """A loaded model, ready to step: its engine and what status reports about it."""

    engine: Any
    backend: str
    model_id: str
    trained: bool
    device: str
    checkpoint: str                    # as asked for ("" = the embedded demo voice)
    notes: list[str] = field(default_factory=list)   # warning lines for the log
    load_s: float = 0.0
    warm_step_s: float = 0.0
    pool: Any = None                   # its stream pool (models/pool.py), once made for a service


def load_voice(spec: ModelSpec, backend: str, device: str, artifact: str, threads: int, checkpoint: str = "",
               export: bool = False) -> Voice:
    """Load ``spec``'s model on the backend ``backend`` resolves to (:mod:`models.backends`),
    warmed up. ``export``: when ``auto`` finds no ONNX artifact, make one first, in a child
    process. Raises the loaders' one-line errors."""
    t0 = time.perf_counter()
    chosen = resolve_backend(backend, device, artifact, spec, threads)
    if chosen.engine is None and chosen.note and export and backend == "auto" and _may_export():
        _export_in_child(spec)
        chosen = resolve_backend(backend, device, artifact, spec, threads)
    notes = []
    if chosen.engine is not None:
        engine, used_device = chosen.engine, "cpu"
        model_id, trained = chosen.engine.model_id, chosen.engine.trained
    else:
        engine, used_device, model_id, trained = _load_eager(spec, device, threads, notes.append)
        if chosen.note:  # once eager is known to load: a bad checkpoint's error stays the one line
            notes.append(chosen.note)
    voice = Voice(engine, chosen.backend, model_id[:MAX_NAME_LEN], trained, used_device, checkpoint, notes)
    voice.load_s = time.perf_counter() - t0
    voice.warm_step_s = warm_up(engine)
    return voice


def _may_export() -> bool:
    return export_possible() and os.environ.get(NO_EXPORT_ENV, "") in ("", "0")


def _export_in_child(spec: ModelSpec) -> None:
    """``llvc export --cache`` for ``spec`` in a child process (its failure: eager is used)."""
    cmd = [sys.executable, "-m", "services.cli", "export", "--cache", "-n", str(spec.chunk_factor)]
    if spec.checkpoint is not None:
        cmd += ["-p", str(spec.checkpoint)]
    cmd += ["-c", str(spec.files.config)]
    subprocess.run(["nice", "-n", str(LOADER_NICE), *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=300, cwd=Path(__file__).resolve().parents[1])


def _load_eager(spec: ModelSpec, device: str, threads: int, warn: Callable[[str], Any]):
    import torch

    from models.checkpoint import load_spec
    from models.streaming import StreamingEngine

    # One thread by default: see models/convert.py on OpenMP workers under contention.
    torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("inference.device = cuda: no CUDA device is available to torch")
    model, info = load_spec(spec, warn=warn)
    return StreamingEngine(model, spec.chunk_factor, device), device, info.model_id, info.trained


def warm_up(engine) -> float:
    """A few steps on low noise so the first real chunk is not slow; the last step's time."""
    x = (np.random.default_rng(0).standard_normal(engine.chunk_len) * 0.01).astype(np.float32)
    engine.reset()
    engine.prime(None)
    step_s = 0.0
    for _ in range(WARMUP_STEPS):
        t0 = time.perf_counter()
        engine.process(x)
        step_s = time.perf_counter() - t0
    engine.reset()
    return step_s


# --------------------------------------------------------------------------- the folder
def list_voices(folder: Path) -> list[dict[str, str]]:
    """The checkpoints in ``folder`` (``*.pth``, sorted), then the embedded demo voice if the
    folder does not hold it: ``{"name", "checkpoint"}`` each."""
    try:
        paths = sorted(p for p in folder.glob("*.pth") if p.is_file())
    except OSError:
        paths = []
    out = [{"name": p.stem, "checkpoint": str(p)} for p in paths]
    if not any(is_demo_checkpoint(p) for p in paths):
        out.append({"name": DEMO_CHECKPOINT.stem, "checkpoint": str(DEMO_CHECKPOINT)})
    return out


def resolve_voice(folder: Path, checkpoint: str, local: bool) -> Path:
    """The file a voice request names: a bare name is ``folder/NAME.pth``; a path is taken as
    given, but only from a local controller (a remote one may pick from ``folder`` only).
    ``ValueError`` (one line) otherwise."""
    path = Path(checkpoint).expanduser()
    if len(path.parts) == 1:  # a name: the folder's NAME.pth (or NAME as it is, if that is a file there)
        path = folder / (checkpoint if path.suffix == ".pth" else f"{checkpoint}.pth")
        if not path.exists() and path.name == DEMO_CHECKPOINT.name:
            path = DEMO_CHECKPOINT  # the embedded voice is always there to go back to
    if not local and not is_demo_checkpoint(path):
        try:
            inside = path.resolve().parent == folder.resolve()
        except OSError:
            inside = False
        if not inside:
            raise ValueError(f"{checkpoint}: a remote controller may pick only voices in {folder}")
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint (voices in {folder}: "
                         f"{', '.join(v['name'] for v in list_voices(folder)) or 'none'})")
    return path


# --------------------------------------------------------------------------- in the background
#: Nice value of the loader thread and the export child: on a small machine a loading thread
#: takes a whole core from the audio threads of every service (Linux schedules threads, and a
#: thread's nice value is its own). Not the loader thread's when the thread starting it runs
#: SCHED_FIFO (``realtime.priority``): the audio threads then win by policy already, and at nice
#: 19 the loader lost to every normal process while holding the interpreter lock that the
#: real-time loop waits for (a live voice switch took over a second longer in a suite run).
LOADER_NICE = 19


def _lower_this_threads_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICE)
    except (OSError, AttributeError):
        pass  # not Linux, or not permitted: loading just competes at the same priority

class VoiceLoader:
    """Loads one voice at a time in a thread; the loop collects it with :meth:`take`."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._interval = sys.getswitchinterval()
        self._result: tuple[Voice | None, str | None] | None = None
        self.asked: dict[str, Any] | None = None     # what is loading: checkpoint, by, since

    @property
    def busy(self) -> bool:
        """Whether a load is under way or done but not yet taken."""
        return self.asked is not None

    def start(self, spec: ModelSpec, checkpoint: str, by: str, load: Callable[[ModelSpec, str], Voice]) -> None:
        """Start loading ``spec`` with ``load(spec, checkpoint)``."""
        self.asked = {"checkpoint": checkpoint, "by": by, "since": time.monotonic()}
        self._result = None
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(LOADING_SWITCH_INTERVAL_S)
        lower = not runs_realtime()  # asked on the starting thread: the new one starts normal

        def work():
            if lower:
                _lower_this_threads_priority()
            try:
                result = (load(spec, checkpoint), None)
            except Exception as exc:  # any failure is reported as one line; the current voice stays
                result = (None, " ".join((str(exc) or type(exc).__name__).split()))
            self._result = result

        self._thread = threading.Thread(target=work, name="voice-loader", daemon=True)
        self._thread.start()

    def take(self) -> tuple[Voice | None, str | None, dict[str, Any]] | None:
        """``(voice, error, asked)`` once the load has finished (then the loader is free)."""
        if self._result is None or self.asked is None:
            return None
        voice, error = self._result
        asked, self.asked, self._result = self.asked, None, None
        sys.setswitchinterval(self._interval)
        return voice, error, asked
