"""``llvc convert``: convert audio files offline or through the exact streaming engine.

Flags mirror upstream ``infer.py``. Each output is ``OUT_DIR/<stem>.wav`` (sub-folders of an
input folder are mirrored), 32-bit float WAV, 16 kHz mono, as long as the input after
resampling and aligned with it. Files are written under a temporary name and renamed, so a
failure never leaves a partial output. One bad file in a folder is reported and skipped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from common.audio import AudioError, ensure_output_dir, find_audio_files, read_audio, write_wav_atomic
from models.config import CHECKPOINT_DEFAULT_HELP, CONFIG_DEFAULT_HELP
from models.geometry import check_chunk_factor
from models.spec import ModelSpec, demo_description


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc convert``'s flags on ``p``."""
    p.add_argument("-p", "--checkpoint", help="LLVC checkpoint (G_500000.pth or a bare state dict); "
                   + CHECKPOINT_DEFAULT_HELP)
    p.add_argument("-c", "--config", help=f"model config JSON in upstream format ({CONFIG_DEFAULT_HELP})")
    p.add_argument("-f", "--input", "--fname", dest="input", required=True,
                   help="audio file, or folder searched recursively")
    p.add_argument("-o", "--out-dir", default="converted_out", help="output folder (default converted_out)")
    p.add_argument("-s", "--stream", action="store_true", help="convert chunk by chunk with the streaming engine")
    p.add_argument("-n", "--chunk-factor", type=int, default=1,
                   help="chunk = 13*16*N samples in --stream mode (default 1: 13 ms)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --stream, torch's choice offline)")
    p.add_argument("--backend", choices=("auto", "eager", "onnx"), default="auto",
                   help="streaming backend. auto (default): ONNX Runtime on CPU when the artifact cache "
                        "has one for -p/-c/-n (llvc export --cache), else PyTorch; eager: PyTorch; onnx: "
                        "ONNX Runtime (implies --stream). Offline conversion is always PyTorch")
    p.add_argument("--onnx", metavar="ARTIFACT", default=None,
                   help="stream with ONNX Runtime on this artifact from llvc export (implies --stream and "
                        "--backend onnx; torch is not imported; -p/-c/-n must be what it was exported for)")


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    return name


class _Progress:
    """A one-line progress bar on stderr for folders (silent when stderr is not a terminal)."""

    def __init__(self, total: int):
        self.total, self.done, self.tty = total, 0, sys.stderr.isatty()

    def step(self, name: str) -> None:
        self.done += 1
        if self.tty:
            width = 30
            fill = width * self.done // self.total
            sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {name[:40]:<40}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _plan(src: Path, out_dir: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs; raises AudioError when there is nothing to convert."""
    if src.is_dir():
        files = find_audio_files(src)
        if not files:
            raise AudioError(f"{src}: no audio files found (looked for .wav, .flac, .ogg, .mp3, ...)")
        return [(f, out_dir / f.relative_to(src).parent / f"{f.stem}.wav") for f in files]
    if not src.exists():
        raise AudioError(f"{src}: no such file or folder")
    return [(src, out_dir / f"{src.stem}.wav")]


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc convert``; returns the exit status."""
    def fail(msg: str) -> None:
        print(f"llvc convert: error: {msg}", file=sys.stderr)

    try:
        check_chunk_factor(args.chunk_factor)
    except ValueError as exc:
        fail(f"--chunk-factor: {exc}")
        return 2
    if args.threads is not None and args.threads < 1:
        fail(f"--threads must be >= 1, got {args.threads}")
        return 2
    if args.onnx and args.backend == "eager":
        fail("--onnx runs ONNX Runtime: it contradicts --backend eager")
        return 2
    try:
        jobs = _plan(Path(args.input), Path(args.out_dir))
        spec = ModelSpec.resolve(args.checkpoint, args.config, args.chunk_factor)
        model, engine, trained, described, runtime = _load(args, spec)
        geometry = spec.geometry
        sample_rate, min_samples = geometry.sample_rate, geometry.window_samples
        out_root = ensure_output_dir(args.out_dir)
    except (ValueError, AudioError) as exc:  # ConfigError/CheckpointError/ArtifactError are ValueErrors
        fail(str(exc))
        return 2
    print(f"model: {described}; mode: "
          + (f"stream, chunk {engine.chunk_len} samples ({1000 * engine.chunk_s:g} ms)" if engine else "offline")
          + f"; {runtime}")

    collisions: dict[Path, Path] = {}
    times: list[float] = []
    failed = 0
    progress = _Progress(len(jobs)) if len(jobs) > 1 else None
    for src, dst in jobs:
        try:
            if dst in collisions:
                raise AudioError(f"{src}: output {dst} would overwrite the conversion of {collisions[dst]}")
            collisions[dst] = src
            x = read_audio(src, sample_rate, min_samples=min_samples)
            y = engine.convert(x, on_chunk=times.append) if engine is not None else _offline(model, x)
            if dst.parent != out_root:
                ensure_output_dir(dst.parent)
            write_wav_atomic(dst, y, sample_rate)
        except AudioError as exc:
            failed += 1
            fail(str(exc))
        if progress:
            progress.step(src.name)

    done = len(jobs) - failed
    print(f"converted {done} of {len(jobs)} file(s) into {out_root}")
    if engine is not None and times:
        t = np.asarray(times)
        avg = float(t.mean())
        # Upstream infer.py's definitions: RTF = chunk duration / mean processing time,
        # e2e latency = (2L + chunk) / sr + mean processing time.
        print(f"RTF: {engine.chunk_s / avg:.3f}")
        print(f"End-to-end latency: {1000 * (geometry.algorithmic_latency_s + avg):.3f}ms "
              f"(upstream's definition; every sample in fact waits chunk + L = "
              f"{1000 * geometry.latency_s:g} ms + processing = {1000 * (geometry.latency_s + avg):.3f}ms)")
        print(f"per-chunk processing: p50 {1000 * np.percentile(t, 50):.3f} ms, "
              f"p95 {1000 * np.percentile(t, 95):.3f} ms over {len(t)} chunks")
    if not trained:
        print("NOTE: converted with an UNTRAINED seeded model (-c without -p): the output is not a "
              "converted voice", file=sys.stderr)
    return 1 if failed else 0


def _torch_model(args: argparse.Namespace, spec: ModelSpec):
    """(model, streaming engine or None, trained, description, runtime line) on torch."""
    import torch

    from models.checkpoint import load_spec
    from models.streaming import StreamingEngine

    device = _resolve_device(args.device)
    model, info = load_spec(spec)
    # A streaming step is many small kernels: a second thread gains ~10% on an idle 2-core
    # machine, but OpenMP workers competing with any other busy process made steps 40-100x
    # slower (measured). One thread is the safe real-time default.
    threads = args.threads if args.threads is not None else (1 if args.stream else None)
    if threads is not None:
        torch.set_num_threads(threads)
    model = model.to(device).eval()
    engine = StreamingEngine(model, spec.chunk_factor, device) if args.stream else None
    return model, engine, info.trained, info.describe(), f"device {device}, {torch.get_num_threads()} thread(s)"


def _load(args: argparse.Namespace, spec: ModelSpec):
    """(model or None, engine or None, trained, description, runtime line) for the chosen backend.

    ``--backend auto`` matters only with ``--stream`` (see :func:`models.backends.resolve_backend`);
    it never exports, and a fallback to PyTorch is one stderr line.
    """
    backend = "onnx" if args.onnx else args.backend
    if backend == "eager" or (backend == "auto" and not args.stream):
        return _torch_model(args, spec)
    from models.backends import resolve_backend

    threads = args.threads or 1
    chosen = resolve_backend(backend, args.device, args.onnx, spec, threads, setting="--backend",
                             artifact_setting="--onnx")
    if chosen.engine is None:
        loaded = _torch_model(args, spec)
        if chosen.note:  # once torch has loaded the model: an error stays the one line
            print(f"llvc convert: {chosen.note}", file=sys.stderr)
        return loaded
    engine = chosen.engine
    if spec.demo:
        described = f"{demo_description(engine.model_id)}, artifact {chosen.artifact}"
    else:
        described = f"{engine.model_id} ({chosen.artifact})"
    return None, engine, engine.trained, described, f"ONNX Runtime (CPU), {threads} thread(s)"


def _offline(model, x: np.ndarray) -> np.ndarray:
    """Upstream's offline forward over the whole signal."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(torch.from_numpy(x).to(device).view(1, 1, -1)).view(-1).cpu().numpy()
