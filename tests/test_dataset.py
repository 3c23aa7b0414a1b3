"""``llvc make-dataset``: layout, held-out dev speakers, determinism, target F0, alignment, errors.

Runs the real espeak-ng and Praat (praat-parselmouth) on a small set: 6 espeak utterances and the
two LibriSpeech clips in tests/data.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from services.cli import main

pytestmark = [
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)"),
    pytest.mark.skipif(importlib.util.find_spec("parselmouth") is None,
                       reason="praat-parselmouth not installed (pip install -e '.[train]')"),
]

DATA = Path(__file__).parent / "data"
SMALL = dict(librispeech=DATA, n_espeak=6, segment_seconds=4.0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three small builds: seed 0 (one process), seed 0 again (two processes), seed 1."""
    from models.dataset import make_dataset

    root = tmp_path_factory.mktemp("ds")
    make_dataset(root / "a", seed=0, jobs=1, **SMALL)
    make_dataset(root / "b", seed=0, jobs=2, **SMALL)
    make_dataset(root / "c", seed=1, jobs=1, **SMALL)
    return root


def rows(d: Path) -> list[dict]:
    with open(d / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def pairs(d: Path):
    for r in rows(d):
        base = d / r["split"] / r["prefix"]
        yield r, Path(f"{base}_original.wav"), Path(f"{base}_converted.wav")


def hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.suffix in (".wav", ".csv")}


def test_layout(built):
    d = built / "a"
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "dev", "metadata.csv", "train", "val"]
    meta = rows(d)
    assert {r["split"] for r in meta} == {"train", "val", "dev"}
    assert len(meta) == 8  # 2 LibriSpeech clips of <= 4.5 s (one segment each) + 6 espeak utterances
    wavs = sorted(p for p in d.rglob("*.wav"))
    assert len(wavs) == 2 * len(meta)
    for r, orig, conv in pairs(d):
        a, sra = sf.read(orig, dtype="float32", always_2d=True)
        b, srb = sf.read(conv, dtype="float32", always_2d=True)
        assert sra == srb == 16000 and a.shape[1] == b.shape[1] == 1
        assert len(a) == len(b) == int(r["samples"]) > 8000
        assert 0.01 < np.sqrt(np.mean(a ** 2)) and np.max(np.abs(b)) <= 1.0
    readme = (d / "README.md").read_text()
    assert "Change gender" in readme and "formant shift ratio 1.2" in readme and "Seed 0" in readme


def test_dev_speakers_and_voices_held_out(built):
    meta = rows(built / "a")
    dev = {(r["source"], r["speaker"]) for r in meta if r["split"] == "dev"}
    seen = {(r["source"], r["speaker"]) for r in meta if r["split"] != "dev"}
    assert not dev & seen
    assert {s for s, _ in dev} == {"librispeech", "espeak"}  # a held-out reader and a held-out voice
    assert ("librispeech", "174") in dev


def test_deterministic_from_seed(built):
    a, b, c = (hashes(built / k) for k in "abc")
    assert a == b  # same seed, one process or two: byte-identical
    assert a != c
    espeak = lambda h: {v for k, v in h.items() if Path(k).name.startswith("es_")}  # noqa: E731
    assert espeak(a).isdisjoint(espeak(c))  # other sentences' voices, rates, pitches


def test_converted_f0_is_the_target(built):
    import parselmouth

    from models.dataset import TRANSFORM

    target = TRANSFORM["new_pitch_median"]

    def f0(p):
        x, sr = sf.read(p)
        f = parselmouth.Sound(x, sampling_frequency=sr).to_pitch().selected_array["frequency"]
        return float(np.median(f[f > 0]))

    for r, orig, conv in pairs(built / "a"):
        fo, fc = f0(orig), f0(conv)
        assert abs(fc - target) < 0.05 * target, (r["prefix"], fc)
        assert abs(fo - fc) > 0.1 * target, (r["prefix"], fo, fc)


def test_pairs_are_time_aligned(built):
    """Peak of the cross-correlation of 5 ms-smoothed envelopes at lag 0 +- 2 ms (searched +-50 ms)."""
    k = np.ones(80) / 80
    for r, orig, conv in pairs(built / "a"):
        a, _ = sf.read(orig)
        b, _ = sf.read(conv)
        ea = np.convolve(np.abs(a), k, "same")[::8]  # 0.5 ms steps
        eb = np.convolve(np.abs(b), k, "same")[::8]
        ea, eb = ea - ea.mean(), eb - eb.mean()
        lags = np.arange(-100, 101)
        c = [np.dot(ea[max(0, -L): len(ea) - max(0, L)], eb[max(0, L): len(eb) - max(0, -L)]) for L in lags]
        lag_ms = lags[int(np.argmax(c))] * 0.5
        assert abs(lag_ms) <= 2.0, (r["prefix"], lag_ms)


def _cli(args, capsys):
    rc = main(["make-dataset", *map(str, args)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_refuses_non_empty_out_dir_unless_force(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    small = ["--librispeech", DATA, "--espeak-utterances", 2, "--jobs", 1]
    rc, err = _cli([out, *small], capsys)
    assert rc == 1 and len(err) == 1 and err[0].startswith("llvc make-dataset: ") and "--force" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    rc, err = _cli([out, *small, "--force"], capsys)
    assert rc == 0 and not (out / "keep.txt").exists() and (out / "metadata.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left


def test_failure_leaves_nothing(tmp_path, capsys, monkeypatch):
    import models.dataset as ds

    calls = []

    def broken(x, seed):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("Praat exploded\nsecond line")
        return x

    monkeypatch.setattr(ds, "change_gender", broken)
    rc, err = _cli([tmp_path / "ds", "--librispeech", DATA, "--espeak-utterances", 3, "--jobs", 1], capsys)
    assert rc == 1 and err[-1] == "llvc make-dataset: Praat exploded"  # after the one progress line
    assert len(err) == 2
    assert list(tmp_path.iterdir()) == []
    rc, err = _cli([tmp_path / "ds", "--librispeech", tmp_path / "nowhere"], capsys)
    assert rc == 1 and len(err) == 1 and "nowhere" in err[0] and list(tmp_path.iterdir()) == []


def test_missing_tool_exits_2(tmp_path, capsys, monkeypatch):
    import models.dataset as ds

    monkeypatch.setattr(ds.shutil, "which", lambda name: None)
    rc, err = _cli([tmp_path / "ds"], capsys)
    assert rc == 2 and len(err) == 1 and "espeak-ng" in err[0] and not (tmp_path / "ds").exists()
