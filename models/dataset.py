"""``llvc make-dataset OUT_DIR``: a parallel training set in upstream LLVC's layout.

Layout: ``OUT_DIR/{train,val,dev}/PREFIX_original.wav`` + ``PREFIX_converted.wav``, 16 kHz mono
PCM16, the two files of a pair sample-aligned and of the same length; ``OUT_DIR/metadata.csv``
(one row per pair: split, prefix, source, speaker/voice, text, rate, pitch, length, F0s, measured
lag) and ``OUT_DIR/README.md`` (sources, counts, transform, seed, command line).

Sources (the "original" side):

* LibriSpeech clips (``--librispeech DIR``, ``*.wav``, named speaker-chapter-utterance), cut at
  their quietest 20 ms frame near every ``--segment-seconds`` into segments;
* espeak-ng speech (``espeak-ng -w``, 22.05 kHz, resampled to 16 kHz with soxr) of sentences from a
  small seeded grammar plus a fixed list, over :data:`TRAIN_VOICES` with random rate (130-190
  words/min) and base pitch (25-75 on espeak's 0-99 scale).

Every original is trimmed to its speech (frames within 40 dB of its loudest 20 ms frame, plus
0.1 s margin) and scaled to an RMS of 0.06 (about -24 dBFS), peak at most 0.9.

Target (the "converted" side): ONE fixed target voice, Praat's *Change gender* via
praat-parselmouth applied to every original with :data:`TRANSFORM`: pitch analysis 75-600 Hz,
formant shift ratio 1.2, new pitch median 230 Hz, pitch range factor 1.0, duration factor 1.0.
Whatever the speaker, the output has a median F0 near 230 Hz and formants raised by 20%.
Duration factor 1.0 keeps the length: Praat returns exactly as many samples as it was given
(checked for every pair; a difference of more than :data:`MAX_LENGTH_DIFF` samples is an error).
Alignment is measured for every pair as the lag of the peak of the cross-correlation of the two
10 ms-smoothed amplitude envelopes within +-20 ms; any lag above :data:`MAX_LAG_MS` is an error.
Measured on the default run (seed 0, 315 pairs): Praat returned exactly the input length for
every pair (nothing padded or trimmed); envelope lag mean -0.05 ms, 95th percentile of |lag|
0.46 ms, largest 1.1 ms, i.e. aligned to the envelope's resolution (the README the command
writes repeats the numbers for its own run).

Held out for ``dev`` (never in train or val): LibriSpeech speakers :data:`DEV_SPEAKERS` (when
present; otherwise the last speaker, if there are at least two) and espeak voices
:data:`DEV_VOICES` (about 10% of the espeak utterances). ``val`` is a seeded random 5% of the
training speakers' and voices' pairs. Everything is drawn from ``--seed``, Praat's own random
generator included (seeded per pair): the same seed gives the same files byte for byte, with any
``--jobs``. Output is written into a temporary folder beside OUT_DIR and renamed into place at
the end, so a failure leaves nothing behind.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SR = 16000
REPO = Path(__file__).resolve().parents[1]
#: Praat "Change gender" arguments, in call order (see the module docstring).
TRANSFORM = {"pitch_floor": 75.0, "pitch_ceiling": 600.0, "formant_shift_ratio": 1.2,
             "new_pitch_median": 230.0, "pitch_range_factor": 1.0, "duration_factor": 1.0}
DEV_SPEAKERS = ("174", "7850")  # LibriSpeech: 174 is the README's demo clip (male), 7850 female
_LANGS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan")
_TRAIN_VARIANTS = ("m1", "m3", "m4", "m5", "m6", "m7", "f1", "f3")
TRAIN_VOICES = tuple(f"{lang}+{v}" for lang in _LANGS for v in _TRAIN_VARIANTS)
DEV_VOICES = ("en-gb-x-rp+m2", "en-us+f2")  # variants m2, f2 never occur in training voices
DEV_FRACTION, VAL_FRACTION = 0.10, 0.05
TARGET_RMS, MAX_PEAK = 0.06, 0.9
MAX_LENGTH_DIFF = 4   # samples that may be padded/trimmed after the transform
MAX_LAG_MS = 2.0      # largest envelope lag accepted between original and converted


class DatasetError(Exception):
    """A failure reported as one line, exit status 1."""


class MissingTool(DatasetError):
    """espeak-ng or parselmouth is not installed: exit status 2."""


# --------------------------------------------------------------------------- sentences
_FIXED = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A rainbow is a division of white light into many beautiful colours.",
    "Could you tell me the way to the nearest railway station?",
    "We will meet again on Tuesday, the fourteenth of March, at half past nine.",
    "Bright sunshine melted the last of the snow on the mountain pass.",
    "My phone number is five five five, two three eight, nine zero one six.",
    "Honestly, I never expected the meeting to last three whole hours!",
    "She sells sea shells by the sea shore every summer.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "The museum opens at ten and closes at six, except on holidays.",
    "Turn left at the bakery, then keep going until you see the old church.",
    "Nobody knows exactly why the ancient bridge was built so high.",
    "Thank you very much for your help; I really appreciate it.",
    "The orchestra played quietly while the audience found their seats.",
    "Is it true that the library will be closed for the whole winter?",
)
_SUBJ = ("the old fisherman", "my younger sister", "a tired engineer", "the small grey cat",
         "our new neighbour", "the head teacher", "a curious child", "the night nurse",
         "the football team", "my grandfather", "a quiet student", "the tall musician",
         "the village baker", "a lonely sailor", "the company director", "her best friend")
_VERB = (("carried", "carry"), ("painted", "paint"), ("found", "find"), ("repaired", "repair"),
         ("sold", "sell"), ("borrowed", "borrow"), ("described", "describe"), ("cleaned", "clean"),
         ("opened", "open"), ("forgot", "forget"), ("photographed", "photograph"), ("hid", "hide"))
_OBJ = ("a heavy wooden box", "the broken bicycle", "three yellow umbrellas", "an enormous map",
        "the silver teapot", "a letter from Paris", "the kitchen window", "twelve fresh eggs",
        "a strange blue stone", "the garden gate", "an old piano", "the winter coats")
_PLACE = ("near the harbour", "in the basement", "behind the station", "on the top floor",
          "at the edge of the forest", "by the river", "in the crowded market", "under the bridge")
_TIME = ("yesterday morning", "last week", "before dawn", "late at night", "every Sunday",
         "during the storm", "after lunch", "in nineteen ninety two")
_TEMPLATES = (
    "{S} {vp} {o} {p} {t}.",
    "{T}, {s} {vp} {o} {p}.",
    "Did {s} really {v} {o} {t}?",
    "Why would {s} want to {v} {o} {p}?",
    "I think {s} will {v} {o} {t}, but nobody is sure.",
    "There were {n} people {p} when {s} {vp} {o}.",
    "{S} said that {s2} had {vp} {o} {t}.",
    "Please ask {s} to {v} {o} before {h} o'clock.",
    "Wow, {s} {vp} {o} in only {n} minutes!",
    "If it rains {t}, {s} will not {v} {o}.",
)


def make_sentences(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` sentences: the fixed list first (as far as it goes), then seeded grammar output."""
    out = list(_FIXED[:n])
    while len(out) < n:
        pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
        vp, v = pick(_VERB)
        s = pick(_SUBJ)
        t = pick(_TIME)
        out.append(pick(_TEMPLATES).format(
            S=s[0].upper() + s[1:], s=s, s2=pick(_SUBJ), vp=vp, v=v, o=pick(_OBJ), p=pick(_PLACE),
            t=t, T=t[0].upper() + t[1:], n=int(rng.integers(2, 60)), h=int(rng.integers(1, 13))))
    return out


# --------------------------------------------------------------------------- signal helpers
def _frame_energy(x: np.ndarray, frame: int = 320) -> np.ndarray:
    n = len(x) // frame
    return (x[: n * frame].reshape(n, frame).astype(np.float64) ** 2).mean(axis=1) + 1e-12


def trim_silence(x: np.ndarray, floor_db: float = 40.0, margin_s: float = 0.1) -> np.ndarray:
    """``x`` from its first to its last 20 ms frame within ``floor_db`` of the loudest, plus margin."""
    e = _frame_energy(x)
    if len(e) == 0:
        return x
    active = np.flatnonzero(10 * np.log10(e / e.max()) > -floor_db)
    margin = int(margin_s * SR)
    return x[max(0, active[0] * 320 - margin): min(len(x), (active[-1] + 1) * 320 + margin)]


def normalise(x: np.ndarray) -> np.ndarray:
    """Scale to RMS :data:`TARGET_RMS`, then down to peak :data:`MAX_PEAK` if it exceeds it."""
    x = x * (TARGET_RMS / max(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))), 1e-9))
    peak = float(np.max(np.abs(x)))
    return (x * (MAX_PEAK / peak) if peak > MAX_PEAK else x).astype(np.float32)


def split_points(x: np.ndarray, seconds: float) -> list[tuple[int, int]]:
    """Cut ``x`` into ~``seconds`` long pieces at the quietest 20 ms frame within +-0.5 s."""
    n = max(1, round(len(x) / (seconds * SR)))
    e = _frame_energy(x)
    cuts = [0]
    for k in range(1, n):
        centre = k * len(x) // n // 320
        lo, hi = max(0, centre - 25), min(len(e), centre + 25)
        cuts.append((lo + int(np.argmin(e[lo:hi]))) * 320 + 160)
    cuts.append(len(x))
    return list(zip(cuts[:-1], cuts[1:]))


def envelope_lag(a: np.ndarray, b: np.ndarray, max_ms: float = 20.0) -> float:
    """Lag (ms, positive: ``b`` late) of the peak cross-correlation of the 10 ms-smoothed envelopes."""
    k = np.ones(SR // 100) / (SR // 100)
    ea = np.convolve(np.abs(a), k, "same")
    eb = np.convolve(np.abs(b), k, "same")
    ea, eb = ea - ea.mean(), eb - eb.mean()
    n = len(ea) + len(eb)
    c = np.fft.irfft(np.fft.rfft(eb, n) * np.conj(np.fft.rfft(ea, n)), n)
    m = int(max_ms * SR / 1000)
    lags = np.arange(-m, m + 1)
    return float(lags[int(np.argmax(c[lags]))] * 1000 / SR)


def median_f0(x: np.ndarray) -> float:
    """Median F0 (Hz) of the voiced frames of ``x`` (Praat's default pitch analysis)."""
    import parselmouth

    f = parselmouth.Sound(x.astype(np.float64), sampling_frequency=SR).to_pitch().selected_array["frequency"]
    return float(np.median(f[f > 0])) if np.any(f > 0) else 0.0


def change_gender(x: np.ndarray, praat_seed: int) -> np.ndarray:
    """The target transform (:data:`TRANSFORM`) of ``x``, trimmed/padded to ``len(x)``.

    Praat's overlap-add draws random numbers (in unvoiced stretches), so its generator is seeded
    with ``praat_seed`` first: without that the same input gives a different output each call.
    """
    import parselmouth
    from parselmouth.praat import call, run

    t = TRANSFORM
    run(f"random_initializeWithSeedUnsafelyButPredictably ({int(praat_seed)})")
    out = call(parselmouth.Sound(x.astype(np.float64), sampling_frequency=SR), "Change gender",
               t["pitch_floor"], t["pitch_ceiling"], t["formant_shift_ratio"], t["new_pitch_median"],
               t["pitch_range_factor"], t["duration_factor"])
    run("random_initializeSafelyAndUnpredictably ()")
    if out.sampling_frequency != SR:
        raise DatasetError(f"Change gender returned {out.sampling_frequency} Hz, expected {SR}")
    y = out.values[0]
    if abs(len(y) - len(x)) > MAX_LENGTH_DIFF:
        raise DatasetError(f"Change gender changed the length: {len(x)} -> {len(y)} samples")
    y = np.pad(y, (0, max(0, len(x) - len(y))))[: len(x)]
    peak = float(np.max(np.abs(y))) if len(y) else 0.0
    return (y * (0.99 / peak) if peak > 0.99 else y).astype(np.float32)


# --------------------------------------------------------------------------- plan and work
@dataclass
class Item:
    """One pair to produce; everything needed is drawn beforehand, so workers are order-free."""

    split: str
    prefix: str
    source: str          # "librispeech" or "espeak"
    speaker: str         # LibriSpeech speaker id or espeak voice
    text: str = ""       # espeak sentence
    rate: int = 0        # espeak words per minute
    pitch: int = 0       # espeak base pitch 0-99
    path: str = ""       # LibriSpeech file
    start: int = 0       # LibriSpeech segment, samples
    end: int = 0
    praat_seed: int = 0  # seeds Praat's generator for this pair's transform


def _read_16k(path: str | Path) -> np.ndarray:
    import soundfile as sf
    import soxr

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    return soxr.resample(x, sr, SR).astype(np.float32) if sr != SR else x


def plan(librispeech: list[Path], n_espeak: int, segment_seconds: float, seed: int) -> list[Item]:
    """All pairs with their split, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    speakers = sorted({p.name.split("-")[0] for p in librispeech})
    dev_spk = {s for s in speakers if s in DEV_SPEAKERS}
    if not dev_spk and len(speakers) >= 2:
        dev_spk = {speakers[-1]}
    if dev_spk == set(speakers) and len(speakers) >= 2:
        dev_spk = {sorted(dev_spk)[0]}
    for p in sorted(librispeech):
        spk = p.name.split("-")[0]
        x = _read_16k(p)
        for i, (a, b) in enumerate(split_points(x, segment_seconds)):
            if b - a >= SR // 2:
                items.append(Item("dev" if spk in dev_spk else "train", f"ls_{p.stem}_{i:02d}",
                                  "librispeech", spk, path=str(p), start=a, end=b))
    n_dev = max(1, round(n_espeak * DEV_FRACTION)) if n_espeak >= 2 else 0
    dev_idx = set(rng.choice(n_espeak, n_dev, replace=False).tolist()) if n_dev else set()
    for i, text in enumerate(make_sentences(n_espeak, rng)):
        voices = DEV_VOICES if i in dev_idx else TRAIN_VOICES
        voice = voices[int(rng.integers(len(voices)))]
        items.append(Item("dev" if i in dev_idx else "train", f"es_{i:04d}_{voice.replace('+', '_')}",
                          "espeak", voice, text=text, rate=int(rng.integers(130, 191)),
                          pitch=int(rng.integers(25, 76))))
    train = [k for k, it in enumerate(items) if it.split == "train"]
    n_val = max(1, round(len(train) * VAL_FRACTION)) if len(train) >= 2 else 0
    for k in rng.choice(train, n_val, replace=False) if n_val else []:
        items[int(k)].split = "val"
    for it, ps in zip(items, rng.integers(1, 2**31 - 1, len(items))):
        it.praat_seed = int(ps)
    return items


def _original(item: Item, work: Path) -> np.ndarray:
    if item.source == "librispeech":
        x = _read_16k(item.path)[item.start: item.end]
    else:
        wav = work / f"{item.prefix}.wav"
        r = subprocess.run(["espeak-ng", "-v", item.speaker, "-s", str(item.rate), "-p", str(item.pitch),
                            "-w", str(wav), item.text], capture_output=True, text=True)
        if r.returncode != 0 or not wav.exists():
            raise DatasetError(f"espeak-ng failed for {item.prefix}: {(r.stderr.strip() or 'no output')[:200]}")
        x = _read_16k(wav)
        wav.unlink()
    return normalise(trim_silence(x))


def make_pair(item: Item, root: str) -> dict:
    """Write ``item``'s two files under ``root/<split>/``; returns its metadata row."""
    import soundfile as sf

    work = Path(root) / ".work"
    x = _original(item, work)
    y = change_gender(x, item.praat_seed)
    lag = envelope_lag(x, y)
    if abs(lag) > MAX_LAG_MS:
        raise DatasetError(f"{item.prefix}: converted lags the original by {lag:g} ms (> {MAX_LAG_MS:g})")
    for kind, sig in (("original", x), ("converted", y)):
        sf.write(str(Path(root) / item.split / f"{item.prefix}_{kind}.wav"), sig, SR, subtype="PCM_16")
    row = {k: v for k, v in asdict(item).items() if k not in ("path", "start", "end")}
    return row | {"samples": len(x), "f0_original": round(median_f0(x), 1),
                  "f0_converted": round(median_f0(y), 1), "lag_ms": lag}


# --------------------------------------------------------------------------- the command
def check_tools() -> None:
    """Raise :class:`MissingTool` unless espeak-ng and parselmouth are available."""
    if shutil.which("espeak-ng") is None:
        raise MissingTool("espeak-ng not found: apt-get install espeak-ng (scripts/setup.sh installs it)")
    try:
        importlib.import_module("parselmouth")
    except ImportError:
        raise MissingTool("praat-parselmouth not installed: pip install -e '.[train]'") from None


def default_librispeech() -> Path:
    """``../shared/audio/librispeech`` beside the repository if it exists, else ``tests/data``."""
    shared = REPO.parent / "shared" / "audio" / "librispeech"
    return shared if shared.is_dir() else REPO / "tests" / "data"


def _readme(rows: list[dict], args: argparse.Namespace, sources: list[Path]) -> str:
    count = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "dev")}
    secs = {s: sum(r["samples"] for r in rows if r["split"] == s) / SR for s in count}
    who = {s: sorted({r["speaker"] for r in rows if r["split"] == s}) for s in count}
    lags = np.array([r["lag_ms"] for r in rows])
    conv = np.array([r["f0_converted"] for r in rows if r["f0_converted"] > 0])
    t = TRANSFORM
    lines = [
        "# Parallel LLVC dataset", "",
        f"Made by `llvc make-dataset` (models/dataset.py): `{' '.join(args.argv)}`", "",
        f"Seed {args.seed}. Same seed, same files byte for byte.", "",
        "| split | pairs | seconds | speakers / voices |", "| --- | --- | --- | --- |",
        *[f"| {s} | {count[s]} | {secs[s]:.1f} | {', '.join(who[s])} |" for s in count], "",
        "Layout: `<split>/PREFIX_original.wav` and `PREFIX_converted.wav`, 16 kHz mono PCM16, same "
        "length, sample-aligned. `metadata.csv` has one row per pair.", "",
        "## Sources", "",
        f"* LibriSpeech test-clean clips ({len(sources)} files; Panayotov et al., ICASSP 2015, "
        f"www.openslr.org/12, CC BY 4.0), cut into ~{args.segment_seconds:g} s segments at quiet frames.",
        f"* espeak-ng: {args.espeak_utterances} utterances of seeded sentences, rate 130-190 wpm, "
        "pitch 25-75, resampled 22.05 -> 16 kHz with soxr.",
        f"* dev only (held out): LibriSpeech speakers {', '.join(DEV_SPEAKERS)} (those present), "
        f"espeak voices {', '.join(DEV_VOICES)}. val: a random {VAL_FRACTION:.0%} of the training material.",
        "* Originals trimmed to speech (40 dB below the loudest 20 ms frame, 0.1 s margin), RMS 0.06, peak <= 0.9.",
        "", "## Transform (converted = target voice)", "",
        f"Praat `Change gender` (praat-parselmouth) on every original: pitch floor {t['pitch_floor']:g} Hz, "
        f"pitch ceiling {t['pitch_ceiling']:g} Hz, formant shift ratio {t['formant_shift_ratio']:g}, new pitch "
        f"median {t['new_pitch_median']:g} Hz, pitch range factor {t['pitch_range_factor']:g}, duration factor "
        f"{t['duration_factor']:g}. Peak limited to 0.99.", "",
        f"Measured: converted median F0 {np.median(conv):.1f} Hz (pairs' 5-95%: {np.percentile(conv, 5):.1f}-"
        f"{np.percentile(conv, 95):.1f} Hz); output length equals input length for every pair; envelope "
        f"cross-correlation lag (10 ms smoothing) over {len(rows)} pairs: mean {np.mean(lags):.3f} ms, 95th "
        f"percentile of |lag| {np.percentile(np.abs(lags), 95):.3f} ms, largest {np.max(np.abs(lags)):.3f} ms.",
        "",
    ]
    return "\n".join(lines)


def make_dataset(out_dir: str | Path, librispeech: str | Path | None = None, n_espeak: int = 300,
                 segment_seconds: float = 4.0, seed: int = 0, jobs: int = 1, force: bool = False,
                 argv: list[str] | None = None, log=lambda msg: None) -> list[dict]:
    """Build the dataset into ``out_dir`` (atomically); returns the metadata rows."""
    check_tools()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise DatasetError(f"{out} exists and is not an empty folder (use --force to replace it)")
    src_dir = Path(librispeech) if librispeech is not None else default_librispeech()
    if not src_dir.is_dir():
        raise DatasetError(f"--librispeech: no folder {src_dir}")
    sources = sorted(src_dir.glob("*.wav"))
    if n_espeak < 0 or segment_seconds <= 0 or jobs < 1:
        raise DatasetError("--espeak-utterances must be >= 0, --segment-seconds > 0, --jobs >= 1")
    items = plan(sources, n_espeak, segment_seconds, seed)
    if not items:
        raise DatasetError("nothing to make: no LibriSpeech clips and no espeak utterances")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for d in ("train", "val", "dev", ".work"):
            (tmp / d).mkdir()
        log(f"making {len(items)} pairs ({len(sources)} LibriSpeech clips, {n_espeak} espeak utterances)")
        if jobs == 1:
            rows = [make_pair(it, str(tmp)) for it in items]
        else:
            with ProcessPoolExecutor(jobs) as pool:
                rows = list(pool.map(make_pair, items, [str(tmp)] * len(items), chunksize=4))
        (tmp / ".work").rmdir()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        (tmp / "metadata.csv").write_text(buf.getvalue())
        ns = argparse.Namespace(argv=argv or ["llvc", "make-dataset", str(out)], seed=seed,
                                segment_seconds=segment_seconds, espeak_utterances=n_espeak)
        (tmp / "README.md").write_text(_readme(rows, ns, sources))
        old = None
        if out.exists():
            old = out.parent / f"{tmp.name}.old"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc make-dataset``'s flags on ``p``."""
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (train/, val/, dev/, README.md)")
    p.add_argument("--librispeech", metavar="DIR", help=f"LibriSpeech *.wav clips (default {default_librispeech()})")
    p.add_argument("--espeak-utterances", type=int, default=300, metavar="N",
                   help="espeak-ng utterances (default 300)")
    p.add_argument("--segment-seconds", type=float, default=4.0,
                   help="cut LibriSpeech clips into segments of about this length (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed for everything drawn (default 0)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes (default: CPU count, at most 4)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")


def _command_line(args: argparse.Namespace) -> list[str]:
    cmd = ["llvc", "make-dataset", str(args.out_dir), "--seed", str(args.seed),
           "--espeak-utterances", str(args.espeak_utterances), "--segment-seconds", f"{args.segment_seconds:g}"]
    return cmd + (["--librispeech", str(args.librispeech)] if args.librispeech else [])


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc make-dataset``; returns the exit status."""
    try:
        rows = make_dataset(args.out_dir, args.librispeech, args.espeak_utterances, args.segment_seconds,
                            args.seed, args.jobs, args.force, argv=_command_line(args),
                            log=lambda m: print(f"llvc make-dataset: {m}", file=sys.stderr, flush=True))
    except MissingTool as exc:
        print(f"llvc make-dataset: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one line, whatever failed
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"llvc make-dataset: {msg}", file=sys.stderr)
        return 1
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "dev")}
    print(f"llvc make-dataset: wrote {args.out_dir}: " + ", ".join(f"{s} {n} pairs" for s, n in counts.items()))
    return 0
