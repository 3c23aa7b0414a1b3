"""How well a model reaches the target voice, measured on held-out pairs.

Two numbers per clip, the ones issue 8 sets targets for:

* **Spectral distance.** The multi-resolution STFT distance of Parallel WaveGAN (Yamamoto et
  al., 2020): spectral convergence plus log-magnitude L1, averaged over upstream's three
  resolutions (FFT 1024/2048/512, hop 120/240/50, window 600/1200/240; :mod:`models.losses`).
  It is measured from the model's output to the target and from the input to the target; the
  *reduction* is ``1 - d(output, target) / d(input, target)``. Target: at least
  :data:`MIN_REDUCTION`.
* **Median F0.** Praat's default pitch analysis (75-600 Hz) over voiced frames
  (:func:`models.dataset.median_f0`, the same measurement ``llvc make-dataset`` records). Target:
  the output's median within :data:`MAX_F0_ERROR` of the target's.

The output is the model's offline forward pass, which the streaming engine reproduces to
float rounding at every chunk factor (tests/test_streaming.py), so these are the numbers a
listener of the streamed pipeline gets.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .dataset import SR, median_f0
from .losses import DEFAULT_RESOLUTIONS, SpectralLoss

MIN_REDUCTION = 0.40   # output->target STFT distance at least 40% below input->target
MAX_F0_ERROR = 0.10    # output median F0 within 10% of the target's

_DISTANCE = SpectralLoss(SR, DEFAULT_RESOLUTIONS)


def stft_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Multi-resolution STFT distance (spectral convergence + log-magnitude L1) of two signals."""
    n = min(len(a), len(b))
    ta, tb = (torch.from_numpy(np.ascontiguousarray(v[:n], dtype=np.float32)).view(1, -1) for v in (a, b))
    with torch.no_grad():
        _, parts = _DISTANCE(ta, tb)
    return float(parts["sc"] + parts["log_mag"])


def convert(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """The model's offline output for mono ``x`` (same length), in eval mode."""
    model.eval()
    with torch.inference_mode():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(1, 1, -1)).view(-1).numpy()


@dataclass(frozen=True)
class ClipQuality:
    """One held-out clip's measurements (distances unitless, F0 in Hz)."""

    clip: str
    seconds: float
    d_input: float
    d_output: float
    f0_input: float
    f0_target: float
    f0_output: float

    @property
    def reduction(self) -> float:
        """``1 - d_output / d_input``: how much closer to the target the model's output is."""
        return 1.0 - self.d_output / self.d_input if self.d_input > 0 else 0.0

    @property
    def f0_error(self) -> float:
        """Relative error of the output's median F0 against the target's (signed)."""
        return self.f0_output / self.f0_target - 1.0 if self.f0_target > 0 else float("inf")

    @property
    def passes(self) -> bool:
        """Both targets met on this clip."""
        return self.reduction >= MIN_REDUCTION and abs(self.f0_error) <= MAX_F0_ERROR

    def as_dict(self) -> dict:
        """Fields plus the derived numbers, for JSON."""
        return asdict(self) | {"reduction": self.reduction, "f0_error": self.f0_error, "passes": self.passes}


def evaluate_clip(model: torch.nn.Module, x: np.ndarray, target: np.ndarray, clip: str) -> ClipQuality:
    """Convert ``x`` and measure output and input against ``target`` (same length, aligned)."""
    if len(x) != len(target):
        raise ValueError(f"{clip}: input has {len(x)} samples, target {len(target)}")
    y = convert(model, x)
    return ClipQuality(clip, len(x) / SR, stft_distance(x, target), stft_distance(y, target),
                       median_f0(x), median_f0(target), median_f0(y))


def read_split(data: str | Path, split: str = "dev") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(prefix, original, converted)`` for every pair of ``data/split`` (``llvc make-dataset``'s layout)."""
    import soundfile as sf

    d = Path(data) / split
    pairs = []
    for orig in sorted(d.glob("*_original.wav")):
        prefix = orig.name[: -len("_original.wav")]
        x, sr_x = sf.read(str(orig), dtype="float32")
        y, sr_y = sf.read(str(d / f"{prefix}_converted.wav"), dtype="float32")
        if sr_x != SR or sr_y != SR:
            raise ValueError(f"{d / prefix}: expected {SR} Hz, got {sr_x} / {sr_y} Hz")
        pairs.append((prefix, x, y))
    if not pairs:
        raise ValueError(f"{d}: no PREFIX_original.wav / PREFIX_converted.wav pairs")
    return pairs


def summary(rows: list[ClipQuality]) -> dict:
    """Medians and pass counts over ``rows``."""
    red = np.array([r.reduction for r in rows])
    f0e = np.array([abs(r.f0_error) for r in rows])
    return {"clips": len(rows), "median_reduction": float(np.median(red)), "min_reduction": float(red.min()),
            "median_abs_f0_error": float(np.median(f0e)), "max_abs_f0_error": float(f0e.max()),
            "reduction_met": int((red >= MIN_REDUCTION).sum()), "f0_met": int((f0e <= MAX_F0_ERROR).sum()),
            "both_met": int(sum(r.passes for r in rows))}


def format_table(rows: list[ClipQuality]) -> str:
    """A plain-text table, one row per clip, then the summary lines."""
    head = (f"{'clip':<34} {'sec':>5} {'d(in,tgt)':>9} {'d(out,tgt)':>10} {'reduct':>7} "
            f"{'F0 in':>6} {'F0 tgt':>6} {'F0 out':>6} {'F0 err':>7}  ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.clip[:34]:<34} {r.seconds:5.1f} {r.d_input:9.3f} {r.d_output:10.3f} {r.reduction:7.1%} "
                     f"{r.f0_input:6.1f} {r.f0_target:6.1f} {r.f0_output:6.1f} {r.f0_error:+7.1%}  "
                     f"{'yes' if r.passes else 'NO'}")
    s = summary(rows)
    lines += ["-" * len(head),
              f"STFT distance reduction: median {s['median_reduction']:.1%}, lowest {s['min_reduction']:.1%}; "
              f"target >= {MIN_REDUCTION:.0%} met on {s['reduction_met']}/{s['clips']} clips",
              f"median F0 error: median {s['median_abs_f0_error']:.1%}, largest {s['max_abs_f0_error']:.1%}; "
              f"target <= {MAX_F0_ERROR:.0%} met on {s['f0_met']}/{s['clips']} clips",
              f"both targets met on {s['both_met']}/{s['clips']} clips"]
    return "\n".join(lines)


def to_json(rows: list[ClipQuality], model: str) -> str:
    """The rows and the summary as JSON text."""
    return json.dumps({"model": model, "summary": summary(rows), "clips": [r.as_dict() for r in rows]}, indent=2)
