"""``llvc train`` on a tiny synthetic parallel dataset with a tiny config of the same architecture.

The dataset here is fake on purpose: the real one (``llvc make-dataset``) needs espeak-ng and
Praat and takes minutes. Sources are random harmonic tones with noise; each target is the same
signal, sample-aligned, through a fixed FIR filter and gain: a transform the model can learn
in a few steps. The layout is upstream's (``train|val|dev/PREFIX_original.wav`` +
``PREFIX_converted.wav``, 16 kHz mono).
"""
from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from models import train as train_mod
from models.checkpoint import load_model
from models.losses import SpectralLoss, mel_filterbank
from models.streaming import StreamingEngine

SR = 16000
TINY = {"data": {"sr": SR}, "model_params": {
    "L": 16, "enc_dim": 64, "num_enc_layers": 2, "dec_dim": 32, "num_dec_layers": 1,
    "dec_buf_len": 5, "dec_chunk_size": 7, "out_buf_len": 2, "use_pos_enc": True, "decoder_dropout": 0.1,
    "convnet_config": {"convnet_prenet": True, "out_channels": [1, 1, 1], "kernel_sizes": [3, 3, 3],
                       "dilations": [1, 1, 1], "dropout": 0.5, "combine_residuals": None,
                       "skip_connection": "add", "use_residual_blocks": True}},
    "aux_mel": {"params": {"num_mels": 40, "n_fft": [512, 256], "hop_size": [128, 64],
                           "win_size": [512, 256], "fmin": 0.0, "fmax": None}}}


def _source(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SR
    f0 = rng.uniform(100, 250)
    x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 8))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 4) * t)) + 0.05 * rng.standard_normal(n)
    return (0.1 * x).astype(np.float32)


def make_dataset(root, n_pairs=(6, 2, 1), seconds=1.0, seed=0):
    rng = np.random.default_rng(seed)
    fir = np.array([0.6, 0.3, -0.2, 0.1], dtype=np.float32)
    for split, count in zip(("train", "val", "dev"), n_pairs):
        (root / split).mkdir(parents=True)
        for i in range(count):
            x = _source(rng, int(seconds * SR) + 800 * i)
            y = np.convolve(x, fir)[: len(x)].astype(np.float32)
            sf.write(root / split / f"s{i}_original.wav", x, SR, subtype="FLOAT")
            sf.write(root / split / f"s{i}_converted.wav", y, SR, subtype="FLOAT")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def train_args(data, out, config, steps, resume=False, **kw):
    ns = argparse.ArgumentParser()
    train_mod.add_arguments(ns)
    argv = ["--data", str(data), "--out", str(out), "--steps", str(steps), "--batch-size", "4",
            "--segment-seconds", "0.25", "--lr", "3e-3", "--seed", "7", "--val-every", "10",
            "--ckpt-every", "10", "--threads", "1", "--val-seconds", "0.5"]
    if config is not None:
        argv += ["--config", str(config)]
    if resume:
        argv.append("--resume")
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return ns.parse_args(argv)


def log_rows(out):
    with open(out / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run30(dataset, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert train_mod.run(train_args(dataset, out, tiny_config, 30)) == 0
    return out


def test_loss_decreases_and_log_has_columns(run30):
    rows = log_rows(run30)
    assert list(rows[0]) == list(train_mod.LOG_COLUMNS)
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    loss = [float(r["loss"]) for r in rows]
    assert np.mean(loss[-5:]) < np.mean(loss[:5]), loss
    assert [r["step"] for r in rows if r["val_loss"]] == ["10", "20", "30"]
    assert all(float(r["steps_per_s"]) > 0 and float(r["lr"]) > 0 for r in rows)
    files = {p.name for p in run30.iterdir()}
    assert {"G_10.pth", "G_20.pth", "G_30.pth", "state_30.pth", "best.pth", "config.json",
            "train_log.csv"} <= files
    assert not any(n.startswith("state_") and n != "state_30.pth" for n in files)
    assert not any(n.endswith(".tmp") for n in files)


def test_checkpoint_loads_and_streams_like_offline(run30, tiny_config):
    for name in ("G_30.pth", "best.pth"):
        assert set(torch.load(run30 / name, weights_only=True)) == {"model"}
        model, info = load_model(run30 / name, tiny_config)
        assert info.trained
    x = _source(np.random.default_rng(3), 4000)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x).view(1, 1, -1)).view(-1).numpy()
    engine = StreamingEngine(model, 1)
    y = engine.convert(x)
    n = len(x) - engine.chunk_len  # offline zero-pads its last partial decoder window
    assert np.abs(y - ref)[:n].max() < 1e-5
    assert np.abs(ref).max() > 1e-3


def test_resume_is_bit_exact(run30, dataset, tmp_path):
    straight = tmp_path / "straight"
    assert train_mod.run(train_args(dataset, straight, run30 / "config.json", 40)) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("G_30.pth", "state_30.pth", "config.json", "train_log.csv", "best.pth"):
        (resumed / name).write_bytes((run30 / name).read_bytes())
    assert train_mod.run(train_args(dataset, resumed, None, 40, resume=True)) == 0
    a = torch.load(straight / "G_40.pth", weights_only=True)["model"]
    b = torch.load(resumed / "G_40.pth", weights_only=True)["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert [r["step"] for r in log_rows(resumed)] == [str(i) for i in range(1, 41)]
    assert [r["loss"] for r in log_rows(resumed)][30:] == [r["loss"] for r in log_rows(straight)][30:]


@pytest.mark.parametrize("breakage, message", [
    ("no_val", "missing split"),
    ("no_pairs", "no PREFIX_original.wav"),
    ("lone", "no matching"),
    ("lengths", "sample-aligned"),
    ("stereo", "mono"),
])
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, tiny_config, capsys, breakage, message):
    data = make_dataset(tmp_path / "data", n_pairs=(2, 1, 1), seconds=0.3)
    val = data / "val"
    if breakage == "no_val":
        for p in val.iterdir():
            p.unlink()
        val.rmdir()
    elif breakage == "no_pairs":
        for p in val.iterdir():
            p.unlink()
    elif breakage == "lone":
        (data / "train" / "s1_converted.wav").unlink()
    elif breakage == "lengths":
        sf.write(data / "train" / "s0_converted.wav", np.zeros(100, np.float32), SR)
    elif breakage == "stereo":
        sf.write(data / "train" / "s0_converted.wav", np.zeros((4800, 2), np.float32), SR)
    out = tmp_path / "out"
    capsys.readouterr()
    assert train_mod.run(train_args(data, out, tiny_config, 5)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llvc train: ") and message in err, err
    assert not out.exists()


def test_resume_without_checkpoint_and_overwrite_refused(tmp_path, dataset, tiny_config, run30, capsys):
    assert train_mod.run(train_args(dataset, tmp_path / "none", tiny_config, 5, resume=True)) == 1
    assert train_mod.run(train_args(dataset, run30, tiny_config, 50)) == 1
    err = capsys.readouterr().err.splitlines()
    assert "--resume but no" in err[-2] and "already holds checkpoints" in err[-1]
    assert not (tmp_path / "none").exists()


def test_mel_filterbank_and_loss_basics():
    fb = mel_filterbank(SR, 512, 40)
    assert fb.shape == (40, 257) and (fb >= 0).all() and (fb.sum(1) > 0).all()
    peaks = fb.argmax(1)
    assert (np.diff(peaks) >= 0).all()
    crit = SpectralLoss.from_config(TINY)
    x = torch.from_numpy(_source(np.random.default_rng(1), 4000)).view(1, 1, -1)
    total, parts = crit(x, x)
    assert float(total) < 1e-3
    total2, _ = crit(0.5 * x, x)
    assert float(total2) > 0.1


def _harmonic(f0: float, n: int = 16000) -> torch.Tensor:
    t = np.arange(n) / SR
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 30) if f0 * k < 7000)
    return torch.from_numpy((0.1 * x).astype(np.float32)).view(1, 1, -1)


def test_periodicity_term_points_at_the_target_pitch():
    """The autocorrelation term is zero for the target itself, small for a 2% pitch error and
    large for the source's pitch (100 vs 230 Hz); off by default, so it never changes the total."""
    crit = SpectralLoss(SR, acf_weight=1.0)
    target = _harmonic(230)
    acf = {f0: float(crit(_harmonic(f0), target)[1]["acf"]) for f0 in (230, 235, 100)}
    assert acf[230] < 1e-6 and acf[235] < 0.5 * acf[100] and acf[100] > 0.2, acf
    plain, weighted = SpectralLoss(SR), SpectralLoss(SR, acf_weight=10.0)
    t0, p0 = plain(_harmonic(100), target)
    t1, p1 = weighted(_harmonic(100), target)
    assert float(p0["acf"]) == 0.0 and abs(float(t1 - t0) - 10.0 * float(p1["acf"])) < 1e-4


def test_acf_weight_flag_reaches_the_loss(dataset, tiny_config, tmp_path):
    out = tmp_path / "acf"
    assert train_mod.run(train_args(dataset, out, tiny_config, 2, acf_weight=5)) == 0
    rows = log_rows(out)
    assert all(float(r["acf"]) > 0 for r in rows)


def test_float16_storage_is_checked_against_float32(run30, tiny_config, tmp_path, capsys):
    probe = _source(np.random.default_rng(5), 6000)
    out = tmp_path / "voice.pth"
    diff = train_mod.save_float16(run30 / "best.pth", tiny_config, out, probe)
    assert 0 < diff <= 1e-3
    sd = torch.load(out, weights_only=True)["model"]
    assert {v.dtype for v in sd.values()} == {torch.float16}
    model, info = load_model(out, tiny_config)
    assert info.trained and {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.inference_mode():
        y = model(torch.from_numpy(probe).view(1, 1, -1)).view(-1).numpy()
    ref_model, _ = load_model(run30 / "best.pth", tiny_config)
    with torch.inference_mode():
        ref = ref_model(torch.from_numpy(probe).view(1, 1, -1)).view(-1).numpy()
    assert abs(float(np.abs(y - ref).max()) - diff) < 1e-7
    refused = tmp_path / "refused.pth"
    with pytest.raises(train_mod.TrainError, match="float16 storage moves the output"):
        train_mod.save_float16(run30 / "best.pth", tiny_config, refused, probe, tol=diff / 2)
    assert not refused.exists() and not list(tmp_path.glob(".refused*"))
