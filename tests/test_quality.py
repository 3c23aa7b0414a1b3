"""Conversion quality: the measurements of models/quality.py, and the shipped demo voice on
held-out clips.

The clips are LibriSpeech speakers 174 (the README's demo clip) and 7850, whom
``llvc make-dataset`` holds out for ``dev``: the demo voice never trained on them. Their targets
are made here the way the dataset makes every target (trim, normalise, Praat's Change gender;
needs praat-parselmouth).
"""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from conftest import DATA
from models.quality import (
    MAX_F0_ERROR,
    MIN_REDUCTION,
    ClipQuality,
    evaluate_clip,
    format_table,
    read_split,
    stft_distance,
    summary,
)

pytest.importorskip("parselmouth", reason="praat-parselmouth is not installed (pip install -e '.[train]')")

from models.dataset import DEV_SPEAKERS, change_gender, median_f0, normalise, trim_silence  # noqa: E402

SR = 16000
#: Held-out clips -> what the shipped demo voice reaches on them (models/MODEL_CARD.md), with a
#: margin: (lowest STFT distance reduction, largest |median F0 error|). The issue's targets are
#: MIN_REDUCTION (40%) and MAX_F0_ERROR (10%): the F0 target is met on 7850's clip, not on the
#: demo clip (measured -37%, from 129 Hz at the input: the pitch moves, but not far enough), and
#: the distance target on neither (measured 15.2% and 13.2%).
HELD_OUT = {"7850-73752-0000": (DATA / "llvc-reference" / "ref_nc_input.wav", 0.13, MAX_F0_ERROR),
            "174-50561-0000": (DATA / "174-50561-0000.wav", 0.11, 0.40)}


def held_out_pair(path):
    x, sr = sf.read(path, dtype="float32")
    assert sr == SR
    x = normalise(trim_silence(x))
    return x, change_gender(x, praat_seed=1)


def _tone(f0: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * f0 * k * t + k) / k for k in range(1, 20) if f0 * k < 7000)
    return (0.1 * x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def test_stft_distance_ranks_what_it_should():
    target = _tone(230)
    assert stft_distance(target, target) < 1e-6
    near, octave_down = stft_distance(_tone(232), target), stft_distance(_tone(115), target)
    assert 0 < near < 0.5 * octave_down


def test_targets_and_summary():
    rows = [ClipQuality("a", 1.0, 2.0, 1.0, 100.0, 230.0, 225.0),   # 50% closer, F0 -2.2%: passes
            ClipQuality("b", 1.0, 2.0, 1.3, 100.0, 230.0, 240.0),   # 35% closer: fails the distance
            ClipQuality("c", 1.0, 2.0, 1.0, 100.0, 230.0, 100.0)]   # F0 -57%: fails the pitch
    assert [r.passes for r in rows] == [True, False, False]
    assert rows[0].reduction == pytest.approx(0.5) and rows[2].f0_error == pytest.approx(100 / 230 - 1)
    s = summary(rows)
    assert (s["reduction_met"], s["f0_met"], s["both_met"]) == (2, 2, 1)
    assert s["median_reduction"] == pytest.approx(0.5) and MIN_REDUCTION == 0.40 and MAX_F0_ERROR == 0.10
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 5 and "both targets met on 1/3 clips" in table


def test_read_split_pairs_files(tmp_path):
    (tmp_path / "dev").mkdir()
    for name, f0 in (("p1", 120.0), ("p2", 200.0)):
        sf.write(tmp_path / "dev" / f"{name}_original.wav", _tone(f0), SR)
        sf.write(tmp_path / "dev" / f"{name}_converted.wav", _tone(230.0), SR)
    pairs = read_split(tmp_path)
    assert [p[0] for p in pairs] == ["p1", "p2"] and all(len(p[1]) == len(p[2]) == SR for p in pairs)
    with pytest.raises(ValueError, match="no PREFIX_original.wav"):
        read_split(tmp_path, "val")


@pytest.mark.parametrize("clip", sorted(HELD_OUT))
def test_shipped_demo_voice_on_a_held_out_clip(clip):
    from models.checkpoint import load_model

    path, min_reduction, max_f0_error = HELD_OUT[clip]
    assert clip.split("-")[0] in DEV_SPEAKERS
    x, target = held_out_pair(path)
    assert abs(median_f0(target) / 230.0 - 1) < 0.05  # the transform did move the pitch to ~230 Hz
    model, info = load_model()
    assert info.trained and "demo" in info.model_id
    q = evaluate_clip(model, x, target, clip)
    print(format_table([q]))
    assert q.reduction >= min_reduction, q
    assert abs(q.f0_error) <= max_f0_error, q
    # The output moved towards the target: its pitch is nearer the target's than the input's.
    assert abs(q.f0_output - q.f0_target) < abs(q.f0_input - q.f0_target), q
