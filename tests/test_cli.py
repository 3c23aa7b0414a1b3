"""End-to-end tests of the ``llvc`` console script (``llvc convert`` and ``llvc download``).

Every test runs the real installed script in a subprocess on real files written into tmp_path;
nothing is mocked. Numbers are checked against upstream's offline outputs in
``tests/data/llvc-reference/`` (see its README). Runs that only check behaviour use short
clips so that the whole file stays fast on a small CPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from models.config import load_config
from models.geometry import StreamGeometry

LLVC = Path(sys.executable).parent / "llvc"
REF = Path(__file__).resolve().parent / "data" / "llvc-reference"
CKPT = REF / "ref_default.pth"
CFG = REF / "config.json"
CKPT_NC = REF / "ref_nc.pth"
CFG_NC = REF / "config_nc.json"
INPUT = REF / "ref_default_input.wav"
INPUT_NC = REF / "ref_nc_input.wav"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "llvc.json"
SR = 16000
#: One decoder window of the fixture model (dec_chunk_size * L): the shortest input convertible.
WINDOW = StreamGeometry.of(load_config(REF / "config.json")).window_samples


# ------------------------------------------------------------------------------------ helpers


def llvc(*args: object, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the ``llvc`` console script; cwd is a tmp folder so nothing lands in the repo."""
    assert LLVC.is_file(), f"console script not installed at {LLVC}"
    return subprocess.run([str(LLVC), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (hidden temp files included), relative; [] if it is absent."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def assert_one_error(proc: subprocess.CompletedProcess, command: str, rc: int, *fragments: object) -> str:
    """Exit status ``rc`` and exactly one stderr line ``llvc COMMAND: error: ...`` holding fragments."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == rc, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(f"llvc {command}: error: "), line
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert str(fragment) in line, (fragment, line)
    return line


def convert_ok(tmp: Path, *args: object) -> subprocess.CompletedProcess:
    proc = llvc("convert", *args, cwd=tmp)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc


def read_out(path: Path) -> np.ndarray:
    """Read a converted file and check the promised format: float32 WAV, 16 kHz, mono."""
    info = sf.info(path)
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "FLOAT", SR, 1), info
    y, _ = sf.read(path, dtype="float32")
    assert y.ndim == 1 and np.isfinite(y).all()
    return y


def write_json(path: Path, raw: object) -> Path:
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def ref_input() -> np.ndarray:
    x, sr = sf.read(INPUT, dtype="float32")
    assert sr == SR and len(x) == 40800
    return x


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """Half a second of speech (the voiced middle of the reference input), 16 kHz mono WAV."""
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    sf.write(path, ref_input()[4000:12000], SR, subtype="FLOAT")
    return path


# ---------------------------------------------------------------------- 1-2: fixture numbers


@pytest.mark.parametrize("n", [None, 1, 3], ids=["offline", "stream-n1", "stream-n3"])
def test_convert_reproduces_upstream_offline_output(tmp_path, n):
    # Stream mode runs with one torch thread: with torch's default (one per core) a single busy
    # core elsewhere on a 2-core machine slows the per-chunk loop 40-100x (OpenMP oversubscription).
    extra = () if n is None else ("-s", "-n", n, "--threads", 1)
    # Offline: upstream's numbers to 1e-5. Stream: to 1e-4 except the last n windows, which the
    # streaming engine cannot finish without the lookahead that a padded offline pass invents.
    tol, tail = (1e-5, 0) if n is None else (1e-4, WINDOW * n)
    out = tmp_path / "out"
    proc = convert_ok(tmp_path, "-p", CKPT, "-c", CFG, "-f", INPUT, "-o", out, *extra)
    assert files_under(out) == ["ref_default_input.wav"]
    y = read_out(out / "ref_default_input.wav")
    ref = np.load(REF / "ref_default_offline.npy")
    assert len(y) == len(ref) == 40800
    keep = len(ref) - tail
    err = float(np.abs(y[:keep] - ref[:keep]).max())
    assert err <= tol, err
    assert "UNTRAINED" not in proc.stderr
    if n is not None:  # stream mode reports its timings the way upstream's infer.py does
        assert f"chunk {WINDOW * n} samples" in proc.stdout
        assert "RTF:" in proc.stdout
        assert "End-to-end latency:" in proc.stdout
        assert "p50" in proc.stdout and "p95" in proc.stdout
    else:
        assert "RTF:" not in proc.stdout


def test_convert_no_prenet_model(tmp_path):
    out = tmp_path / "out"
    convert_ok(tmp_path, "-p", CKPT_NC, "-c", CFG_NC, "-f", INPUT_NC, "-o", out)
    y = read_out(out / "ref_nc_input.wav")
    ref = np.load(REF / "ref_nc_offline.npy")
    assert len(y) == len(ref) == len(sf.read(INPUT_NC)[0])
    assert float(np.abs(y - ref).max()) <= 1e-5


# ------------------------------------------------------------------ 3: resampling and formats


def test_resampled_stereo_input_is_converted_aligned(tmp_path):
    from common.audio import read_audio
    from models.checkpoint import load_model

    x = ref_input()[4000:20000]  # 1 s
    x44 = soxr.resample(x, SR, 44100, quality="HQ")
    # Left at full gain, right at half gain: the mono mix is 0.75 * x.
    flac = tmp_path / "in" / "stereo44k.flac"
    flac.parent.mkdir()
    sf.write(flac, np.stack([x44, 0.5 * x44], axis=1), 44100, subtype="PCM_24")
    assert sf.info(flac).channels == 2 and sf.info(flac).samplerate == 44100

    out = tmp_path / "out"
    convert_ok(tmp_path, "-p", CKPT, "-c", CFG, "-f", flac, "-o", out)
    assert files_under(out) == ["stereo44k.wav"]
    y = read_out(out / "stereo44k.wav")
    assert abs(len(y) - round(len(x44) * SR / 44100)) <= 1

    # The input the CLI converts is the downmixed, resampled file, aligned with the original:
    mono = read_audio(flac)
    assert len(mono) == len(y)
    assert float(np.abs(mono - 0.75 * x).max()) < 1e-2
    assert float(np.abs(mono[1:] - 0.75 * x[:-1]).max()) > 3e-2  # a one-sample shift would show
    # ... and the output is exactly the model's conversion of that input, sample for sample.
    model, _ = load_model(CKPT, CFG)
    with torch.inference_mode():
        expected = model(torch.from_numpy(mono).view(1, 1, -1)).view(-1).numpy()
    assert float(np.abs(y - expected).max()) <= 1e-5


@pytest.mark.parametrize("fmt", ["OGG", "MP3"])
def test_48k_compressed_inputs(tmp_path, clip, fmt):
    x48 = soxr.resample(sf.read(clip, dtype="float32")[0], SR, 48000, quality="HQ")
    src = tmp_path / f"clip48k.{fmt.lower()}"
    try:
        sf.write(src, x48, 48000, format=fmt)
    except (sf.LibsndfileError, ValueError, TypeError) as exc:  # pragma: no cover - old libsndfile
        pytest.skip(f"this libsndfile cannot write {fmt}: {exc}")
    frames = sf.info(src).frames
    out = tmp_path / "out"
    convert_ok(tmp_path, "-p", CKPT, "-c", CFG, "-f", src, "-o", out)
    assert files_under(out) == ["clip48k.wav"]
    y = read_out(out / "clip48k.wav")
    assert abs(len(y) - round(frames * SR / 48000)) <= 1
    assert abs(len(y) - 8000) <= 1


# ---------------------------------------------------------------------------- 4: folder input


def test_folder_input_mirrors_layout_and_skips_bad_file(tmp_path, clip):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copyfile(clip, src / "a.wav")
    x = sf.read(clip, dtype="float32")[0]
    sf.write(src / "sub" / "b.flac", soxr.resample(x, SR, 22050, quality="HQ"), 22050)
    bad = src / "sub" / "bad.wav"
    bad.write_bytes(np.random.default_rng(0).bytes(4000))
    (src / "notes.txt").write_text("not audio")

    out = tmp_path / "out"
    proc = llvc("convert", "-p", CKPT, "-c", CFG, "-f", src, "-o", out, cwd=tmp_path)
    assert_one_error(proc, "convert", 1, bad, "cannot read audio")
    # Sub-folders are mirrored; the bad file leaves nothing behind, not even a temp file.
    assert files_under(out) == ["a.wav", "sub/b.wav"]
    assert "converted 2 of 3 file(s)" in proc.stdout
    assert len(read_out(out / "a.wav")) == len(x)
    assert abs(len(read_out(out / "sub" / "b.wav")) - len(x)) <= 1


def test_folder_outputs_that_would_collide(tmp_path, clip):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(clip, src / "x.wav")
    x = sf.read(clip, dtype="float32")[0]
    sf.write(src / "x.flac", x, SR)  # also wants OUT/x.wav: must not overwrite x.wav's conversion
    out = tmp_path / "out"
    proc = llvc("convert", "-p", CKPT, "-c", CFG, "-f", src, "-o", out, cwd=tmp_path)
    assert_one_error(proc, "convert", 1, src / "x.wav", "would overwrite", src / "x.flac")
    assert files_under(out) == ["x.wav"]


# ------------------------------------------------------------------------------ 5: bad inputs


def _missing(d: Path) -> Path:
    return d / "nope.wav"


def _corrupt(d: Path) -> Path:
    p = d / "corrupt.wav"
    p.write_bytes(b"RIFF\x00\x00\x00\x00WAVE" + np.random.default_rng(1).bytes(2000))
    return p


def _empty(d: Path) -> Path:
    p = d / "empty.wav"
    sf.write(p, np.zeros(0, np.float32), SR)
    assert sf.info(p).frames == 0
    return p


def _short(d: Path) -> Path:
    p = d / "short.wav"
    sf.write(p, np.full(100, 0.1, np.float32), SR, subtype="FLOAT")
    return p


def _nan(d: Path) -> Path:
    p = d / "nan.wav"
    x = np.full(4000, 0.1, np.float32)
    x[1234] = np.nan
    sf.write(p, x, SR, subtype="FLOAT")
    return p


@pytest.mark.parametrize("make, rc, fragments", [
    (_missing, 2, ["no such file"]),
    (_corrupt, 1, ["cannot read audio"]),
    (_empty, 1, ["empty audio"]),
    (_short, 1, ["too short", "100 samples", f"at least {WINDOW}"]),
    (_nan, 1, ["non-finite", "index 1234"]),
], ids=["missing", "corrupt", "empty", "too-short", "nan"])
def test_bad_input_file(tmp_path, make, rc, fragments):
    (tmp_path / "in").mkdir()
    src = make(tmp_path / "in")
    out = tmp_path / "out"
    proc = llvc("convert", "-p", CKPT, "-c", CFG, "-f", src, "-o", out, cwd=tmp_path)
    assert_one_error(proc, "convert", rc, src, *fragments)
    assert files_under(out) == []


def test_unwritable_output_folder(tmp_path, clip):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "out"
    proc = llvc("convert", "-p", CKPT, "-c", CFG, "-f", clip, "-o", out, cwd=tmp_path)
    assert_one_error(proc, "convert", 2, out, "not writable")
    assert blocker.read_text() == "x"
    assert files_under(tmp_path) == ["a-file"]


def _params(**changes):
    def edit(raw):
        raw["model_params"].update(changes)
    return edit


def _sr(raw):
    raw["data"]["sr"] = 22050


@pytest.mark.parametrize("edit, fragments", [
    (_params(bogus_key=1), ["model_params", "unknown key 'bogus_key'"]),
    (_params(L=0), ["model_params.L", "positive integer", "got 0"]),
    (_params(L=-3), ["model_params.L", "positive integer", "got -3"]),
    (None, ["not valid JSON"]),
    (_sr, ["data.sr", "22050"]),
], ids=["unknown-key", "L-zero", "L-negative", "not-json", "sr-22050"])
def test_bad_config(tmp_path, clip, edit, fragments):
    cfg = tmp_path / "cfg.json"
    if edit is None:
        cfg.write_text('{"model_params": {"L": 16,', encoding="utf-8")
    else:
        raw = json.loads(CFG.read_text())
        edit(raw)
        write_json(cfg, raw)
    out = tmp_path / "out"
    proc = llvc("convert", "-p", CKPT, "-c", cfg, "-f", clip, "-o", out, cwd=tmp_path)
    assert_one_error(proc, "convert", 2, cfg, *fragments)
    assert files_under(out) == []


@pytest.mark.parametrize("flags, fragments", [
    (("-s", "-n", "0"), ["--chunk-factor", "got 0"]),
    (("--threads", "0"), ["--threads", "got 0"]),
    (("--device", "tpu"), ["--device", "'tpu'"]),
], ids=["chunk-factor-0", "threads-0", "device-tpu"])
def test_bad_flag_values(tmp_path, clip, flags, fragments):
    out = tmp_path / "out"
    proc = llvc("convert", "-p", CKPT, "-c", CFG, "-f", clip, "-o", out, *flags, cwd=tmp_path)
    assert_one_error(proc, "convert", 2, *fragments)
    assert files_under(out) == []


def _ref_sd() -> dict[str, torch.Tensor]:
    return torch.load(CKPT, map_location="cpu", weights_only=True)["model"]


def _ckpt_missing_file(d):
    return d / "absent.pth", ["no such checkpoint file"]


def _ckpt_random_bytes(d):
    p = d / "random.pth"
    p.write_bytes(np.random.default_rng(2).bytes(5000))
    return p, ["not a loadable PyTorch checkpoint"]


def _ckpt_missing_key(d):
    sd = _ref_sd()
    del sd["out_conv.0.weight"]
    torch.save({"model": sd}, d / "missing.pth")
    return d / "missing.pth", ["missing keys", "out_conv.0.weight"]


def _ckpt_extra_key(d):
    sd = _ref_sd()
    sd["surprise.weight"] = torch.zeros(3)
    torch.save({"model": sd}, d / "extra.pth")
    return d / "extra.pth", ["unexpected keys", "surprise.weight"]


def _ckpt_wrong_shape(d):
    sd = _ref_sd()
    sd["in_conv.0.weight"] = torch.zeros(512, 1, 32)
    torch.save({"model": sd}, d / "shape.pth")
    return d / "shape.pth", ["in_conv.0.weight", "(512, 1, 32)", "(512, 1, 48)"]


def _ckpt_other_config(d):
    return CKPT_NC, ["missing keys", "convnet_pre."]


def _ckpt_not_tensors(d):
    torch.save({"model": {"x": 3}}, d / "ints.pth")
    return d / "ints.pth", ["not tensors", "x"]


@pytest.mark.parametrize("make", [
    _ckpt_missing_file, _ckpt_random_bytes, _ckpt_missing_key, _ckpt_extra_key, _ckpt_wrong_shape,
    _ckpt_other_config, _ckpt_not_tensors,
], ids=["missing-file", "random-bytes", "missing-key", "extra-key", "wrong-shape", "nc-ckpt-default-config",
        "not-tensors"])
def test_bad_checkpoint(tmp_path, clip, make):
    ckpt, fragments = make(tmp_path)
    out = tmp_path / "out"
    proc = llvc("convert", "-p", ckpt, "-c", CFG, "-f", clip, "-o", out, cwd=tmp_path)
    assert_one_error(proc, "convert", 2, ckpt, *fragments)
    assert files_under(out) == []


def test_bare_state_dict_is_accepted(tmp_path, clip):
    bare = tmp_path / "bare.pth"
    torch.save(_ref_sd(), bare)
    convert_ok(tmp_path, "-p", bare, "-c", CFG, "-f", clip, "-o", tmp_path / "bare")
    convert_ok(tmp_path, "-p", CKPT, "-c", CFG, "-f", clip, "-o", tmp_path / "wrapped")
    a = read_out(tmp_path / "bare" / "clip.wav")
    b = read_out(tmp_path / "wrapped" / "clip.wav")
    assert len(a) == 8000
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------- 6: untrained seeded model (a config, no -p)


def test_untrained_model_of_a_config(tmp_path, clip):
    outs = []
    for name in ("run1", "run2"):
        proc = convert_ok(tmp_path, "-c", DEFAULT_CONFIG, "-f", clip, "-o", tmp_path / name)
        assert "UNTRAINED" in proc.stderr and "model: llvc-default-untrained-seed0 (UNTRAINED" in proc.stdout
        assert "error" not in proc.stderr
        outs.append(read_out(tmp_path / name / "clip.wav"))
    a, b = outs
    np.testing.assert_array_equal(a, b)
    assert len(a) == 8000
    assert float(np.sqrt(np.mean(a.astype(np.float64) ** 2))) > 1e-4
    assert float(np.abs(a).max()) < 0.99


# ------------------------------------------------------------------------------ 7: download


def _snapshot(root: Path, ckpt: Path | None, config: Path | None,
              config_at: str = "experiments/llvc/config.json") -> Path:
    if ckpt is not None:
        dst = root / "models" / "checkpoints" / "llvc" / "G_500000.pth"
        dst.parent.mkdir(parents=True)
        shutil.copyfile(ckpt, dst)
    if config is not None:
        dst = root / config_at
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config, dst)
    root.mkdir(parents=True, exist_ok=True)
    return root


def test_download_from_snapshot_installs_a_working_model(tmp_path):
    snap = _snapshot(tmp_path / "snap", CKPT, CFG)
    out = tmp_path / "models"
    proc = llvc("download", "--from-snapshot", snap, "-o", out, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert files_under(out) == ["G_500000.pth", "config.json"]
    assert (out / "G_500000.pth").read_bytes() == CKPT.read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads(CFG.read_text())

    conv = tmp_path / "conv"
    convert_ok(tmp_path, "-p", out / "G_500000.pth", "-c", out / "config.json", "-f", INPUT, "-o", conv)
    y = read_out(conv / "ref_default_input.wav")
    ref = np.load(REF / "ref_default_offline.npy")
    assert len(y) == len(ref)
    assert float(np.abs(y - ref).max()) <= 1e-5


def test_download_snapshot_checkpoint_not_matching_config(tmp_path):
    snap = _snapshot(tmp_path / "snap", CKPT_NC, CFG, config_at="models/checkpoints/llvc/config.json")
    out = tmp_path / "models"
    proc = llvc("download", "--from-snapshot", snap, "-o", out, cwd=tmp_path)
    assert_one_error(proc, "download", 1, "G_500000.pth", "missing keys", "convnet_pre.")
    assert not (out / "G_500000.pth").exists()
    assert files_under(out) == []


def test_download_snapshot_without_checkpoint(tmp_path):
    snap = _snapshot(tmp_path / "snap", None, CFG)
    out = tmp_path / "models"
    proc = llvc("download", "--from-snapshot", snap, "-o", out, cwd=tmp_path)
    assert_one_error(proc, "download", 1, snap, "models/checkpoints/llvc/G_500000.pth")
    assert files_under(out) == []


def test_download_without_network_fails_cleanly(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "models"
    proc = llvc("download", "-o", out, cwd=tmp_path, env=env, timeout=60)
    line = assert_one_error(proc, "download", 1)
    assert "huggingface_hub is not installed" in line or "cannot download" in line
    assert files_under(out) == []
