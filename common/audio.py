"""Audio file helpers: read any supported file as 16 kHz mono float32, write WAV atomically.

Everything here works on 1-D ``numpy.float32`` arrays. Every failure raises :class:`AudioError`,
whose message is a single line that names the file and says what is wrong, so that a command
line tool can print it as it is.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from .files import atomic_path

__all__ = [
    "SAMPLE_RATE",
    "ms_to_samples",
    "AUDIO_EXTENSIONS",
    "AudioError",
    "read_audio",
    "write_wav_atomic",
    "ensure_output_dir",
    "find_audio_files",
]

#: The pipeline's audio rate: the LLVC model's, the wire's model input and every function's
#: default here. Declared once, here; everything else imports it.
SAMPLE_RATE = 16000


def ms_to_samples(ms: float, sr: int = SAMPLE_RATE) -> int:
    """Milliseconds as a whole number of samples (rounded)."""
    return int(round(ms * sr / 1000.0))

#: Lower-case file extensions (with the dot) that soundfile can read and that
#: :func:`find_audio_files` picks up in folders.
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".caf"}
)


class AudioError(Exception):
    """An audio file cannot be read or written; ``str()`` is one line naming the file."""


def _one_line(text: object) -> str:
    """Collapse all whitespace (newlines included) so that a message stays on one line."""
    return " ".join(str(text).split())


def _error(path: object, problem: str) -> AudioError:
    """Build an :class:`AudioError` reading ``"<path>: <problem>"`` on one line."""
    name = str(path).replace("\n", "\\n").replace("\r", "\\r")
    return AudioError(f"{name}: {_one_line(problem)}")


def _reason(exc: BaseException) -> str:
    """A short, one-line reason for an exception from the OS or from libsndfile."""
    text = getattr(exc, "error_string", None)  # soundfile.LibsndfileError: without the path
    if not text and isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    if not text:
        text = str(exc) or type(exc).__name__
    return _one_line(text).rstrip(".")


def _first_non_finite(x: np.ndarray) -> tuple[int, int]:
    """Count of non-finite entries along axis 0 (a row counts once) and the first row's index."""
    bad = ~np.isfinite(x)
    if bad.ndim > 1:
        bad = bad.any(axis=tuple(range(1, bad.ndim)))
    count = int(np.count_nonzero(bad))
    return count, (int(np.argmax(bad)) if count else -1)


def read_audio(path: str | os.PathLike, target_sr: int = SAMPLE_RATE, min_samples: int = 1) -> np.ndarray:
    """Read an audio file as mono float32 samples at ``target_sr``.

    Multi-channel audio is averaged to mono; other rates are resampled with soxr (HQ). A 16 kHz
    mono file comes back exactly as ``soundfile.read(path, dtype="float32")`` gives it.

    Args:
        path: any file soundfile can read (WAV, FLAC, OGG, MP3, AIFF, ...).
        target_sr: the sample rate of the result.
        min_samples: the fewest samples (after resampling) that the caller accepts.

    Returns:
        A 1-D, C-contiguous ``float32`` array.

    Raises:
        AudioError: the file is missing, a folder, unreadable, empty, holds NaN or Inf, or is
            shorter than ``min_samples``.
    """
    import soundfile as sf  # here, not at import: SAMPLE_RATE's readers need neither library
    import soxr

    if target_sr <= 0:
        raise ValueError(f"target_sr must be positive, got {target_sr}")
    p = Path(path)
    if not p.exists():
        raise _error(p, "no such file")
    if p.is_dir():
        raise _error(p, "is a folder, not an audio file")
    try:
        data, sr = sf.read(p, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError, TypeError) as exc:
        raise _error(p, f"cannot read audio ({_reason(exc)})") from exc
    if data.shape[0] == 0:
        raise _error(p, "empty audio")

    count, first = _first_non_finite(data)
    if count:
        raise _error(p, f"{count} non-finite samples (first at index {first})")

    if data.shape[1] == 1:
        x = data[:, 0]
    else:
        # float64 accumulation: loud float files cannot overflow to inf while averaging.
        x = data.mean(axis=1, dtype=np.float64).astype(np.float32)

    if sr != target_sr:
        x = soxr.resample(x, sr, target_sr, quality="HQ")
    x = np.ascontiguousarray(x, dtype=np.float32)

    if len(x) < min_samples:
        raise _error(
            p,
            f"too short: {len(x)} samples at {target_sr / 1000:g} kHz "
            f"({len(x) * 1000 / target_sr:.1f} ms), need at least {min_samples}",
        )
    return x


def write_wav_atomic(path: str | os.PathLike, samples: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """Write mono samples as a 32-bit float WAV file, atomically.

    Through :func:`common.files.atomic_path`: readers see either the old file or the complete
    new one, never a partial file; on any failure the target is left untouched.

    Args:
        path: the target file; its folder must exist (see :func:`ensure_output_dir`).
        samples: 1-D array of samples (any real dtype; written as float32).
        sr: the sample rate to record in the file.

    Raises:
        AudioError: the samples are not 1-D or hold NaN or Inf, or the file cannot be written.
    """
    target = Path(path)
    x = np.asarray(samples)
    if x.ndim != 1:
        raise _error(target, f"cannot write (expected 1-D mono samples, got shape {x.shape})")
    try:
        x = np.ascontiguousarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise _error(target, f"cannot write (samples are not numbers: {_reason(exc)})") from exc
    count, first = _first_non_finite(x)
    if count:
        raise _error(target, f"cannot write ({count} non-finite samples, first at index {first})")
    if sr <= 0:
        raise _error(target, f"cannot write (invalid sample rate {sr})")

    import soundfile as sf

    try:
        with atomic_path(target) as tmp:
            sf.write(tmp, x, sr, subtype="FLOAT", format="WAV")
    except Exception as exc:  # noqa: BLE001 - one line, whatever failed (atomic_path cleaned up)
        raise _error(target, f"cannot write ({_reason(exc)})") from exc


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (with parents) if needed and check that files can be created in it.

    Writability is checked twice: with :func:`os.access`, and by creating and removing a hidden
    probe file (``os.access`` alone says yes to root on a read-only file system).

    Returns:
        The folder as a :class:`~pathlib.Path`.

    Raises:
        AudioError: ``"<dir>: output folder is not writable (<reason>)"``.
    """
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise _error(d, "output folder is not writable (exists and is not a folder)") from None
    except OSError as exc:
        raise _error(d, f"output folder is not writable ({_reason(exc)})") from exc
    if not d.is_dir():  # e.g. a symlink to a file
        raise _error(d, "output folder is not writable (not a folder)")
    if not os.access(d, os.W_OK | os.X_OK):
        raise _error(d, "output folder is not writable (permission denied)")
    probe = d / f".write-probe.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise _error(d, f"output folder is not writable ({_reason(exc)})") from exc
    return d


def find_audio_files(folder: str | os.PathLike) -> list[Path]:
    """All audio files below ``folder``, recursively, sorted by path.

    A file counts when its extension, lower-cased, is in :data:`AUDIO_EXTENSIONS`. Hidden files
    and everything inside hidden folders (names starting with ``.``) are skipped.

    Raises:
        AudioError: ``folder`` does not exist or is not a folder.
    """
    root = Path(folder)
    if not root.exists():
        raise _error(root, "no such folder")
    if not root.is_dir():
        raise _error(root, "not a folder")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath, name)
            if not name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file():
                found.append(p)
    return sorted(found)
