"""What the step benchmarks share (``llvc bench`` in :mod:`models.bench`, ``llvc bench --streams``
in :mod:`models.bench_streams`): the validity bar, the clip, the interleaving block, and the
machine description every report carries."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

#: A backend's whole-clip output may differ from reference's by at most this to be valid.
TOLERANCE = 1e-4
DEFAULT_CLIP = Path(__file__).resolve().parents[1] / "tests" / "data" / "174-50561-0000.wav"
#: Seconds of audio one contender converts in a row before the next one's turn: benchmarks
#: interleave what they compare in blocks, so both see the same machine (models/bench.py says why).
BLOCK_S = 1.0


def machine_info() -> dict:
    """CPU model, core count and library versions, for the JSON report."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except Exception:  # not installed, or broken
        ort = None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort}


def load_clip(clip, sample_rate: int, seconds: float | None) -> tuple[np.ndarray, str]:
    """``clip`` (a path, or a 1-D array) as float32 at ``sample_rate``, only its first
    ``seconds`` if given; and a name for the report."""
    from common.audio import read_audio

    if isinstance(clip, (str, os.PathLike)):
        x, name = read_audio(clip, sample_rate), str(clip)
    else:
        x, name = np.asarray(clip, dtype=np.float32).reshape(-1), "<array>"
    if seconds is not None:
        x = x[: int(seconds * sample_rate)]
    return np.ascontiguousarray(x, dtype=np.float32), name
