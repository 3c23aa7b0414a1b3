"""Training losses for ``llvc train``: multi-resolution STFT and mel-spectrogram L1.

No torchaudio here: the mel filterbank is built with numpy (Slaney mel scale and area
normalisation, librosa's defaults and what upstream's HiFi-GAN-style ``mel_spectrogram`` uses).
The default resolutions are upstream's ``aux_mel`` settings (``experiments/llvc/config.json``):
FFT sizes 1024/2048/512, hops 120/240/50, windows 600/1200/240, 80 mels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

#: (n_fft, hop, win) triples: upstream's ``aux_mel.params``.
DEFAULT_RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))
DEFAULT_MELS = 80
LOSS_PARTS = ("sc", "log_mag", "lin_mag", "mel", "acf")
#: Lags the periodicity term compares: 2-12.5 ms, i.e. F0 from 80 to 500 Hz at 16 kHz.
ACF_LAGS = (32, 200)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (math.log(6.4) / 27), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((math.log(6.4) / 27) * (m - 15.0)), m * (200.0 / 3))


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters, Slaney-normalised (librosa's default)."""
    fmax = sr / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.astype(np.float32)


class SpectralLoss(nn.Module):
    """Multi-resolution STFT loss (spectral convergence + log-magnitude L1 + linear-magnitude
    L1) and log-mel L1, each averaged over the resolutions.

    ``forward(y, target)`` takes ``[B, 1, T]`` or ``[B, T]`` audio and returns the weighted
    total and a dict of the unweighted parts (:data:`LOSS_PARTS`).
    """

    def __init__(self, sr: int = 16000, resolutions: Sequence[Sequence[int]] = DEFAULT_RESOLUTIONS,
                 n_mels: int = DEFAULT_MELS, fmin: float = 0.0, fmax: float | None = None,
                 mel_weight: float = 1.0, acf_weight: float = 0.0):
        super().__init__()
        self.resolutions = [tuple(int(v) for v in r) for r in resolutions]
        self.mel_weight, self.acf_weight = mel_weight, acf_weight
        for i, (n_fft, _hop, win) in enumerate(self.resolutions):
            if win > n_fft:
                raise ValueError(f"STFT resolution {i}: window {win} longer than n_fft {n_fft}")
            self.register_buffer(f"window_{i}", torch.hann_window(win), persistent=False)
            self.register_buffer(f"mel_{i}", torch.from_numpy(mel_filterbank(sr, n_fft, n_mels, fmin, fmax)),
                                 persistent=False)

    @classmethod
    def from_config(cls, raw: dict[str, Any], sr: int = 16000, mel_weight: float = 1.0,
                    acf_weight: float = 0.0) -> SpectralLoss:
        """Resolutions and mel settings from an upstream config's ``aux_mel.params`` (if any)."""
        params = (raw.get("aux_mel") or {}).get("params") or {}
        try:
            res = list(zip(params["n_fft"], params["hop_size"], params["win_size"]))
        except (KeyError, TypeError):
            res = list(DEFAULT_RESOLUTIONS)
        return cls(sr, res or DEFAULT_RESOLUTIONS, int(params.get("num_mels", DEFAULT_MELS)),
                   float(params.get("fmin") or 0.0), params.get("fmax"), mel_weight, acf_weight)

    def _mag(self, x: Tensor, i: int) -> Tensor:
        n_fft, hop, win = self.resolutions[i]
        spec = torch.stft(x, n_fft, hop, win, getattr(self, f"window_{i}"), center=True,
                          pad_mode="reflect", return_complex=True)
        return torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)  # [B, F, frames]

    def forward(self, y: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # noqa: D102
        y, target = y.reshape(-1, y.shape[-1]), target.reshape(-1, target.shape[-1])
        parts = {k: y.new_zeros(()) for k in LOSS_PARTS}
        for i in range(len(self.resolutions)):
            my, mt = self._mag(y, i), self._mag(target, i)
            parts["sc"] = parts["sc"] + torch.linalg.norm(mt - my) / torch.linalg.norm(mt).clamp_min(1e-7)
            parts["log_mag"] = parts["log_mag"] + (torch.log(my) - torch.log(mt)).abs().mean()
            parts["lin_mag"] = parts["lin_mag"] + (my - mt).abs().mean()
            fb = getattr(self, f"mel_{i}")
            mel_y = torch.log(torch.matmul(fb, my).clamp_min(1e-5))
            mel_t = torch.log(torch.matmul(fb, mt).clamp_min(1e-5))
            parts["mel"] = parts["mel"] + (mel_y - mel_t).abs().mean()
            if self.acf_weight:
                parts["acf"] = parts["acf"] + self._acf_distance(my, mt, i)
        n = len(self.resolutions)
        parts = {k: v / n for k, v in parts.items()}
        total = (parts["sc"] + parts["log_mag"] + parts["lin_mag"] + self.mel_weight * parts["mel"]
                 + self.acf_weight * parts["acf"])
        return total, parts

    def _acf_distance(self, my: Tensor, mt: Tensor, i: int) -> Tensor:
        """Periodicity: L1 between the frames' normalised autocorrelations over :data:`ACF_LAGS`,
        weighted by the target frames' energy.

        Magnitude losses reward the spectral envelope long before the harmonic positions (a
        voice keeps its source's pitch under them for thousands of steps); the autocorrelation
        peaks at the pitch period, so this term points straight at the target's F0.
        """
        n_fft = self.resolutions[i][0]
        lo, hi = ACF_LAGS
        if hi >= n_fft // 2:
            return my.new_zeros(())
        ry = torch.fft.irfft(my ** 2, n=n_fft, dim=1)
        rt = torch.fft.irfft(mt ** 2, n=n_fft, dim=1)
        ny = ry[:, lo:hi] / ry[:, :1].clamp_min(1e-7)
        nt = rt[:, lo:hi] / rt[:, :1].clamp_min(1e-7)
        w = rt[:, 0]  # [B, frames]: target frame energy
        w = w / w.sum().clamp_min(1e-7)
        return ((ny - nt).abs().mean(dim=1) * w).sum()
