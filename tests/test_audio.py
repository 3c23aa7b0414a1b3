"""Tests for common.audio on real files (written with soundfile into tmp_path; no mocks)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from common.audio import (
    AUDIO_EXTENSIONS,
    SAMPLE_RATE,
    AudioError,
    ensure_output_dir,
    find_audio_files,
    read_audio,
    write_wav_atomic,
)

DATA = Path(__file__).parent / "data"
CLIP = DATA / "1919-142785-0000.wav"
REPO = Path(__file__).resolve().parent.parent


def sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spectrum)])


def assert_audio_error(exc_info: pytest.ExceptionInfo, path: Path, *fragments: str) -> str:
    msg = str(exc_info.value)
    assert str(path) in msg
    assert "\n" not in msg and "\r" not in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------- read_audio


def test_read_16k_wav_is_bit_exact():
    x = read_audio(CLIP)
    ref, sr = sf.read(CLIP, dtype="float32")
    assert sr == SAMPLE_RATE == 16000
    assert x.dtype == np.float32 and x.ndim == 1 and x.flags.c_contiguous
    assert np.array_equal(x, ref)
    assert len(x) == 42560  # 2.66 s at 16 kHz


def test_stereo_44k_flac_is_averaged_and_resampled(tmp_path):
    sr = 44100
    left = sine(440, sr, 2.0, amp=0.6)
    right = sine(440, sr, 2.0, amp=0.2) + sine(3000, sr, 2.0, amp=0.1)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right], axis=1), sr, subtype="PCM_24")
    assert sf.info(path).channels == 2

    x = read_audio(path)
    n = len(left)
    assert x.dtype == np.float32 and x.ndim == 1 and x.flags.c_contiguous
    assert abs(len(x) - round(n * 16000 / sr)) <= 1
    assert abs(dominant_hz(x, 16000) - 440) <= 2
    # Averaged, not one channel: 440 Hz at (0.6 + 0.2) / 2 = 0.4 and 3 kHz at 0.05.
    mid = x[4000:-4000]
    t = np.arange(4000, 4000 + len(mid)) / 16000
    expected = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 3000 * t)
    assert np.max(np.abs(mid - expected)) < 1e-3


def test_read_ogg_vorbis(tmp_path):
    path = tmp_path / "tone.ogg"
    sf.write(path, sine(440, 16000, 1.0), 16000, format="OGG", subtype="VORBIS")
    x = read_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 16000) <= 1
    assert abs(dominant_hz(x, 16000) - 440) <= 2


def test_read_mp3(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip(f"this soundfile build (libsndfile {sf.__libsndfile_version__}) has no MP3 support")
    path = tmp_path / "tone.mp3"
    try:
        sf.write(path, sine(440, 44100, 1.0), 44100, format="MP3", subtype="MPEG_LAYER_III")
    except sf.LibsndfileError as exc:
        pytest.skip(f"this soundfile build cannot write MP3: {exc}")
    x = read_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    # MP3 adds encoder delay/padding; the length stays close to one second at 16 kHz.
    assert abs(len(x) - 16000) < 1600
    assert abs(dominant_hz(x, 16000) - 440) <= 2


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError) as e:
        read_audio(path)
    assert_audio_error(e, path, "no such file")


def test_directory(tmp_path):
    path = tmp_path / "folder.wav"
    path.mkdir()
    with pytest.raises(AudioError) as e:
        read_audio(path)
    assert_audio_error(e, path, "folder")


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(AudioError) as e:
        read_audio(path)
    assert_audio_error(e, path, "cannot read audio (")


def test_empty_wav(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    assert sf.info(path).frames == 0
    with pytest.raises(AudioError) as e:
        read_audio(path)
    assert_audio_error(e, path, "empty audio")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
    x = np.zeros(1000, dtype=np.float32)
    x[123] = bad
    x[500] = bad
    path = tmp_path / "bad.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError) as e:
        read_audio(path)
    assert_audio_error(e, path, "2 non-finite samples (first at index 123)")


def test_too_short(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, np.full(100, 0.1, dtype=np.float32), 16000)
    with pytest.raises(AudioError) as e:
        read_audio(path, min_samples=208)
    assert_audio_error(e, path, "too short: 100 samples at 16 kHz (6.2 ms), need at least 208")
    assert len(read_audio(path, min_samples=100)) == 100


def test_too_short_counts_after_resampling(tmp_path):
    path = tmp_path / "short48k.wav"
    sf.write(path, np.full(300, 0.1, dtype=np.float32), 48000)  # 100 samples at 16 kHz
    with pytest.raises(AudioError) as e:
        read_audio(path, min_samples=150)
    assert_audio_error(e, path, "too short: 100 samples at 16 kHz")


# ---------------------------------------------------------------------------- write_wav_atomic


def test_write_float_wav_exact(tmp_path):
    x = np.random.default_rng(1).uniform(-1.5, 1.5, 5000).astype(np.float32)
    path = tmp_path / "out.wav"
    write_wav_atomic(path, x)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "FLOAT", "WAV")
    y, sr = sf.read(path, dtype="float32")
    assert sr == 16000 and np.array_equal(y, x)
    assert listing(tmp_path) == ["out.wav"]  # no temporary file left behind


def test_write_replaces_existing_file(tmp_path):
    path = tmp_path / "out.wav"
    write_wav_atomic(path, np.ones(10, dtype=np.float32))
    write_wav_atomic(path, np.full(20, 0.5))  # float64 in, float32 out
    y, _ = sf.read(path, dtype="float32")
    assert np.array_equal(y, np.full(20, 0.5, dtype=np.float32))
    assert listing(tmp_path) == ["out.wav"]


def test_write_where_parent_is_a_file(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    path = blocker / "out.wav"
    with pytest.raises(AudioError) as e:
        write_wav_atomic(path, np.zeros(10, dtype=np.float32))
    assert_audio_error(e, path, "cannot write (")
    assert listing(tmp_path) == ["not-a-folder"]
    assert blocker.read_text() == "x"


def test_write_into_proc_fails(tmp_path):
    path = Path("/proc/self/llvc-out.wav")
    with pytest.raises(AudioError) as e:
        write_wav_atomic(path, np.zeros(10, dtype=np.float32))
    assert_audio_error(e, path, "cannot write (")


def test_failed_rename_removes_temporary_file(tmp_path):
    """The temporary file is written, then os.replace fails: nothing may be left behind."""
    target = tmp_path / "out.wav"
    target.mkdir()  # a folder in the way of the rename
    (target / "keep.txt").write_text("keep")
    with pytest.raises(AudioError) as e:
        write_wav_atomic(target, np.zeros(1000, dtype=np.float32))
    assert_audio_error(e, target, "cannot write (")
    assert listing(tmp_path) == ["out.wav", "out.wav/keep.txt"]


def test_failure_mid_write_leaves_no_partial_file(tmp_path):
    """A write that fails halfway (file size limit) leaves neither a partial target nor a temp file.

    A non-atomic writer (straight into the target) would leave a truncated out.wav here. Runs in a
    child process because RLIMIT_FSIZE applies to the whole process.
    """
    script = textwrap.dedent(
        """
        import resource, signal, sys
        import numpy as np
        from common.audio import AudioError, write_wav_atomic
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        try:
            write_wav_atomic(sys.argv[1], np.zeros(100000, dtype=np.float32))
        except AudioError as exc:
            print("AudioError:", exc)
            sys.exit(0)
        print("no error")
        sys.exit(1)
        """
    )
    target = tmp_path / "out.wav"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(target)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"AudioError: {target}: cannot write (" in proc.stdout
    assert listing(tmp_path) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_write_non_finite_refused(tmp_path, bad):
    x = np.zeros(100, dtype=np.float32)
    x[42] = bad
    path = tmp_path / "out.wav"
    with pytest.raises(AudioError) as e:
        write_wav_atomic(path, x)
    assert_audio_error(e, path, "non-finite", "index 42")
    assert listing(tmp_path) == []


def test_write_non_finite_keeps_existing_file(tmp_path):
    path = tmp_path / "out.wav"
    write_wav_atomic(path, np.full(10, 0.25, dtype=np.float32))
    with pytest.raises(AudioError):
        write_wav_atomic(path, np.array([0.0, np.nan], dtype=np.float32))
    y, _ = sf.read(path, dtype="float32")
    assert np.array_equal(y, np.full(10, 0.25, dtype=np.float32))
    assert listing(tmp_path) == ["out.wav"]


def test_write_refuses_multichannel(tmp_path):
    path = tmp_path / "out.wav"
    with pytest.raises(AudioError) as e:
        write_wav_atomic(path, np.zeros((10, 2), dtype=np.float32))
    assert_audio_error(e, path, "1-D")
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- ensure_output_dir


def test_ensure_output_dir_creates_parents(tmp_path):
    d = ensure_output_dir(tmp_path / "a" / "b" / "c")
    assert d == tmp_path / "a" / "b" / "c" and d.is_dir()
    assert listing(d) == []  # the probe file is gone
    assert ensure_output_dir(d) == d  # existing folder is fine


@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_ensure_output_dir_not_writable(tmp_path, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = {
        "file": blocker,
        "under-file": blocker / "sub",
        "proc": Path("/proc/self/llvc-out"),
    }[where]
    with pytest.raises(AudioError) as e:
        ensure_output_dir(path)
    assert_audio_error(e, path, "output folder is not writable (")
    assert listing(tmp_path) == ["file"]


# ---------------------------------------------------------------------------- find_audio_files


def test_find_audio_files(tmp_path):
    files = [
        "b.wav",
        "A.WAV",
        "sub/c.Flac",
        "sub/deeper/d.mp3",
        "sub/e.ogg",
        "z.aif",
        ".hidden.wav",
        ".hidden-dir/f.wav",
        "sub/.g.flac",
        "notes.txt",
        "wav",
        "sub/h.wav.bak",
    ]
    for name in files:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    (tmp_path / "folder.wav").mkdir()  # a folder named like audio is not a file
    found = find_audio_files(tmp_path)
    assert found == [
        tmp_path / "A.WAV",
        tmp_path / "b.wav",
        tmp_path / "sub" / "c.Flac",
        tmp_path / "sub" / "deeper" / "d.mp3",
        tmp_path / "sub" / "e.ogg",
        tmp_path / "z.aif",
    ]
    assert all(isinstance(p, Path) for p in found)


def test_find_audio_files_errors(tmp_path):
    with pytest.raises(AudioError) as e:
        find_audio_files(tmp_path / "missing")
    assert_audio_error(e, tmp_path / "missing", "no such folder")
    f = tmp_path / "file.wav"
    f.write_bytes(b"")
    with pytest.raises(AudioError) as e:
        find_audio_files(f)
    assert_audio_error(e, f, "not a folder")


def test_audio_extensions():
    assert AUDIO_EXTENSIONS == frozenset(
        {".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".caf"}
    )
    assert all(ext == ext.lower() and ext.startswith(".") for ext in AUDIO_EXTENSIONS)
