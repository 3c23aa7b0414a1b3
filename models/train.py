"""``llvc train``: train an LLVC checkpoint on a parallel dataset in upstream's layout.

The dataset is ``DIR/train/`` and ``DIR/val/`` holding pairs ``PREFIX_original.wav`` /
``PREFIX_converted.wav`` (16 kHz mono, sample-aligned; what ``llvc make-dataset`` writes).
Each step draws ``--batch-size`` random aligned segments from ``train/`` (the same offset in
both files of a pair, pairs weighted by length), runs the model's offline forward
(:meth:`models.llvc.LLVC.forward`, exactly upstream's, in training mode) and minimises
:class:`models.losses.SpectralLoss` (multi-resolution STFT + mel L1) with AdamW; upstream's
optimiser settings (``optim``, ``lr_sched``, ``grad_clip_threshold``) are read from the config
when it has them. No discriminator.

Output directory: ``config.json`` (the config trained), ``G_<step>.pth`` (``{"model": sd}``,
what :func:`models.checkpoint.load_model` reads), ``state_<step>.pth`` (optimizer, step, RNG
states, best val loss: only the latest is kept), ``best.pth`` (lowest val loss),
``train_log.csv`` and ``loss.png``. Every file is written under a temporary name and renamed.
``--resume`` continues from the latest ``G_``/``state_`` pair and gives the same weights as an
uninterrupted run with the same seed and thread count.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import atomic_path, write_atomic

SR = 16000
LOG_COLUMNS = ("step", "loss", "sc", "log_mag", "lin_mag", "mel", "acf", "lr", "steps_per_s", "val_loss")
#: Upstream's ``optim`` / ``lr_sched`` / ``grad_clip_threshold`` (used when a config lacks them).
UPSTREAM_OPTIM = {"lr": 5e-4, "betas": [0.8, 0.999], "eps": 1e-9, "weight_decay": 0.0}
UPSTREAM_LR_DECAY = 0.999
UPSTREAM_GRAD_CLIP = 1.0


class TrainError(ValueError):
    """A problem reported as one line, exit status 1."""


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Pair:
    original: Path
    converted: Path
    frames: int


def scan_split(data: Path, split: str) -> list[Pair]:
    """The split's pairs, checked: both files present, readable, 16 kHz mono, equal length."""
    import soundfile as sf

    d = data / split
    if not d.is_dir():
        raise TrainError(f"{d}: missing split (expected {split}/PREFIX_original.wav + PREFIX_converted.wav)")
    originals = {p.name[: -len("_original.wav")]: p for p in d.glob("*_original.wav")}
    converted = {p.name[: -len("_converted.wav")]: p for p in d.glob("*_converted.wav")}
    if not originals and not converted:
        raise TrainError(f"{d}: no PREFIX_original.wav / PREFIX_converted.wav pairs")
    for a, b, kind in ((originals, converted, "converted"), (converted, originals, "original")):
        lone = sorted(set(a) - set(b))
        if lone:
            raise TrainError(f"{a[lone[0]]}: no matching {lone[0]}_{kind}.wav")
    pairs = []
    for prefix in sorted(originals):
        frames = []
        for path in (originals[prefix], converted[prefix]):
            try:
                info = sf.info(str(path))
            except Exception as exc:
                raise TrainError(f"{path}: unreadable audio ({str(exc).strip().splitlines()[0][:120]})") from None
            if info.samplerate != SR or info.channels != 1:
                raise TrainError(f"{path}: expected {SR} Hz mono, got {info.samplerate} Hz, "
                                 f"{info.channels} channels")
            frames.append(info.frames)
        if frames[0] != frames[1]:
            raise TrainError(f"{d / prefix}: original has {frames[0]} samples, converted {frames[1]} "
                             "(pairs must be sample-aligned)")
        if frames[0] == 0:
            raise TrainError(f"{originals[prefix]}: empty audio")
        pairs.append(Pair(originals[prefix], converted[prefix], frames[0]))
    return pairs


def read_pair(pair: Pair, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of both files from ``start``, zero-padded past the end."""
    import soundfile as sf

    out = []
    for path in (pair.original, pair.converted):
        a = sf.read(str(path), start=start, frames=n, dtype="float32", always_2d=False)[0]
        out.append(np.pad(a, (0, n - len(a))))
    return out[0], out[1]


def sample_batch(pairs: list[Pair], rng: np.random.Generator, batch: int, seg: int):
    """``batch`` random aligned segments (pairs weighted by length) → two ``[B, 1, seg]`` arrays."""
    frames = np.array([p.frames for p in pairs], dtype=np.float64)
    idx = rng.choice(len(pairs), size=batch, p=frames / frames.sum())
    xs, ys = [], []
    for i in idx:
        start = int(rng.integers(0, max(1, pairs[i].frames - seg + 1)))
        x, y = read_pair(pairs[i], start, seg)
        xs.append(x)
        ys.append(y)
    return np.stack(xs)[:, None], np.stack(ys)[:, None]


# --------------------------------------------------------------------------- files
def save_torch(obj, path: Path) -> None:
    """``torch.save`` atomically (:func:`common.files.atomic_path`)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def latest_step(out: Path) -> int | None:
    """The highest step with both ``G_<step>.pth`` and ``state_<step>.pth`` in ``out``."""
    steps = [int(m.group(1)) for p in out.glob("state_*.pth") if (m := re.fullmatch(r"state_(\d+)\.pth", p.name))]
    steps = [s for s in steps if (out / f"G_{s}.pth").is_file()]
    return max(steps) if steps else None


def write_log(out: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / "train_log.csv", buf.getvalue())


def read_log(out: Path, upto: int) -> list[dict]:
    path = out / "train_log.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto]


def plot_losses(out: Path, rows: list[dict]) -> bool:
    """``loss.png``: train loss and val loss per step. False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    loss = np.array([float(r["loss"]) for r in rows])
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="train loss")
    k = max(1, len(loss) // 50)
    if k > 1:  # a running mean over ~2% of the run, so the trend shows through dropout's noise
        ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5,
                label=f"train loss, mean of {k}")
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss") not in ("", None)]
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- progress
class Progress:
    """A one-line progress bar on stderr (a line every ~5% when stderr is not a terminal)."""

    def __init__(self, start: int, total: int):
        self.start, self.total, self.rate = start, total, None
        self.tty = sys.stderr.isatty()
        self.every = max(1, (total - start) // 20)

    def update(self, step: int, dt: float, loss: float, extra: str = "") -> None:
        self.rate = 1 / dt if self.rate is None else 0.9 * self.rate + 0.1 / dt
        if not (self.tty or extra or step % self.every == 0 or step == self.total):
            return
        frac = step / self.total
        bar = "#" * int(frac * 24)
        eta = (self.total - step) / self.rate
        line = (f"step {step}/{self.total} [{bar:<24}] {self.rate:.2f} steps/s loss {loss:.4f} "
                f"eta {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}{extra}")
        print(("\r" + line + "\033[K") if self.tty else line, end="\n" if not self.tty or extra else "",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


# --------------------------------------------------------------------------- training
def _load_raw_config(path: Path) -> dict:
    from .config import ConfigError, load_config

    load_config(path)  # validates model_params / data.sr (ConfigError, one line)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def validate(model, crit, val: list[tuple]) -> float:
    """Mean loss over the fixed validation clips (eval mode, no dropout)."""
    import torch

    model.eval()
    with torch.no_grad():
        losses = [float(crit(model(x), y)[0]) for x, y in val]
    model.train()
    return float(np.mean(losses))


def prepare(args) -> tuple:
    """Check everything that can be checked before anything is written."""
    from .config import DEFAULT_CONFIG_PATH

    data, out = Path(args.data), Path(args.out)
    if not data.is_dir():
        raise TrainError(f"{data}: no such dataset directory")
    train_pairs, val_pairs = scan_split(data, "train"), scan_split(data, "val")
    start = None
    if args.resume:
        start = latest_step(out) if out.is_dir() else None
        if start is None:
            raise TrainError(f"{out}: --resume but no G_<step>.pth + state_<step>.pth to resume from")
        config_path = Path(args.config) if args.config else out / "config.json"
    else:
        if out.is_dir() and (latest_step(out) is not None or any(out.glob("G_*.pth"))):
            raise TrainError(f"{out}: already holds checkpoints; pass --resume or another --out")
        config_path = Path(args.config) if args.config else DEFAULT_CONFIG_PATH
    raw = _load_raw_config(config_path)
    if args.resume and (out / "config.json").is_file():
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
        if saved.get("model_params") != raw.get("model_params"):
            raise TrainError(f"{config_path}: model_params differ from {out / 'config.json'} of the run resumed")
    if args.steps < 1 or (start is not None and args.steps <= start):
        raise TrainError(f"--steps {args.steps}: must exceed the step resumed from ({start or 0})")
    for name in ("batch_size", "val_every", "ckpt_every", "decay_every"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')}: must be at least 1")
    if not args.segment_seconds > 0:
        raise TrainError("--segment-seconds: must be positive")
    return data, out, train_pairs, val_pairs, start, config_path, raw


def train(args) -> int:
    import torch

    from .checkpoint import check_state_dict, read_state_dict
    from .config import parse_config
    from .llvc import LLVC
    from .losses import LOSS_PARTS, SpectralLoss

    data, out, train_pairs, val_pairs, start, config_path, raw = prepare(args)
    torch.set_num_threads(args.threads or 2)
    cfg = parse_config(raw, str(config_path))
    optim = {**UPSTREAM_OPTIM, **(raw.get("optim") or {})}
    lr0 = args.lr if args.lr is not None else float(optim["lr"])
    decay = float((raw.get("lr_sched") or {}).get("lr_decay", UPSTREAM_LR_DECAY))
    clip = raw.get("grad_clip_threshold", UPSTREAM_GRAD_CLIP)
    seg = int(round(args.segment_seconds * SR))

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = LLVC(cfg)
    if args.init and start is None:
        sd = read_state_dict(args.init)
        check_state_dict(model, sd, str(args.init))
        model.load_state_dict(sd)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr0, betas=tuple(optim["betas"]),
                            eps=float(optim["eps"]), weight_decay=float(optim["weight_decay"]))
    crit = SpectralLoss.from_config(raw, SR, args.mel_weight, args.acf_weight).to(device)
    rng = np.random.default_rng(args.seed)
    best = math.inf
    if start is not None:
        model.load_state_dict(read_state_dict(out / f"G_{start}.pth"))
        st = torch.load(out / f"state_{start}.pth", map_location="cpu", weights_only=True)
        opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["torch_rng"])
        rng.bit_generator.state = json.loads(st["numpy_rng"])
        best = st["best_val"]
        rows = read_log(out, start)
    else:
        start, rows = 0, []
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.json", json.dumps(raw, indent=2) + "\n")

    n_val = int(round(args.val_seconds * SR))
    val = [tuple(torch.from_numpy(a).view(1, 1, -1).to(device) for a in read_pair(p, 0, min(p.frames, n_val)))
           for p in val_pairs[: args.val_clips]]
    print(f"llvc train: {len(train_pairs)} train / {len(val_pairs)} val pairs from {data}; "
          f"config {config_path}; {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{'resuming at step ' + str(start) if start else 'from scratch'}; out {out}", file=sys.stderr)

    def weights() -> dict:
        # Always CPU tensors, so a checkpoint trained on CUDA loads anywhere as it is.
        return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}

    def checkpoint(step: int) -> None:
        save_torch(weights(), out / f"G_{step}.pth")
        save_torch({"optimizer": opt.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
                    "numpy_rng": json.dumps(rng.bit_generator.state), "best_val": best}, out / f"state_{step}.pth")
        for old in out.glob("state_*.pth"):
            if old.name != f"state_{step}.pth":
                old.unlink(missing_ok=True)
        write_log(out, rows)

    progress, plotted = Progress(start, args.steps), True
    for step in range(start + 1, args.steps + 1):
        t0 = time.perf_counter()
        lr = lr0 * decay ** ((step - 1) // args.decay_every)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = (torch.from_numpy(a).to(device) for a in sample_batch(train_pairs, rng, args.batch_size, seg))
        loss, parts = crit(model(x), y)
        if not torch.isfinite(loss):
            progress.close()
            raise TrainError(f"step {step}: loss is {loss.item()}; last checkpoint kept in {out}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
        opt.step()
        dt = time.perf_counter() - t0
        loss_v = loss.item()
        row = {"step": step, "loss": f"{loss_v:.6g}", "lr": f"{lr:.6g}", "steps_per_s": f"{1 / dt:.4g}",
               "val_loss": "", **{k: f"{parts[k].item():.6g}" for k in LOSS_PARTS}}
        rows.append(row)
        extra = ""
        if step % args.val_every == 0 or step == args.steps:
            v = validate(model, crit, val)
            row["val_loss"] = f"{v:.6g}"
            extra = f" val {v:.4f}"
            if v < best:
                best = v
                save_torch(weights(), out / "best.pth")
                extra += " (best)"
        progress.update(step, dt, loss_v, extra)
        if step % args.ckpt_every == 0 or step == args.steps:
            checkpoint(step)
        elif step % 10 == 0:
            write_log(out, rows)
        if extra:
            plotted = plot_losses(out, rows) and plotted
    progress.close()
    if not plotted:
        print("llvc train: matplotlib is not installed: no loss.png (train_log.csv has the numbers)",
              file=sys.stderr)
    print(f"llvc train: step {args.steps}: wrote {out / f'G_{args.steps}.pth'}; best val loss {best:.4f} "
          f"({out / 'best.pth'})")
    return 0


def save_float16(checkpoint: str | Path, config: str | Path, out: str | Path, probe: np.ndarray,
                 tol: float = 1e-3) -> float:
    """Write ``checkpoint``'s weights to ``out`` stored as float16 (half the size), after checking
    that the model they give, run in float32 as every loader does, stays within ``tol`` (max
    abs) of the float32 original on the audio ``probe``. Returns that difference; raises
    :class:`TrainError` (writing nothing) when it is larger.
    """
    import torch

    from .checkpoint import check_state_dict, read_state_dict
    from .config import load_config
    from .llvc import LLVC

    cfg = load_config(config)
    sd = read_state_dict(checkpoint)
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in sd.items()}
    x = torch.from_numpy(np.ascontiguousarray(probe, dtype=np.float32)).view(1, 1, -1)
    outputs = []
    for weights in (sd, half):
        model = LLVC(cfg)
        check_state_dict(model, weights, str(checkpoint))
        model.load_state_dict(weights)  # copies (casts) into the float32 parameters
        with torch.inference_mode():
            outputs.append(model.eval()(x))
    diff = float((outputs[0] - outputs[1]).abs().max())
    if not diff <= tol:
        raise TrainError(f"{checkpoint}: float16 storage moves the output by {diff:.2g} (> {tol:g}); kept float32")
    save_torch({"model": half}, Path(out))
    return diff


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc train``'s flags on ``p``."""
    p.add_argument("--data", required=True, help="dataset DIR with train/ and val/ (PREFIX_original.wav + "
                   "PREFIX_converted.wav pairs, 16 kHz mono, aligned)")
    p.add_argument("-c", "--config", help="model config JSON, upstream format (default config/llvc.json; "
                   "with --resume, OUT/config.json)")
    p.add_argument("-o", "--out", required=True, help="output directory for checkpoints and logs")
    p.add_argument("--steps", type=int, default=2000, help="train until this step (default 2000)")
    p.add_argument("--batch-size", type=int, default=8, help="segments per step (default 8)")
    p.add_argument("--segment-seconds", type=float, default=1.0, help="segment length (default 1.0)")
    p.add_argument("--lr", type=float, help="learning rate (default: the config's optim.lr, upstream 5e-4)")
    p.add_argument("--decay-every", type=int, default=100,
                   help="multiply the lr by the config's lr_sched.lr_decay (0.999) every N steps (default 100)")
    p.add_argument("--mel-weight", type=float, default=1.0, help="weight of the mel L1 term (default 1)")
    p.add_argument("--acf-weight", type=float, default=0.0,
                   help="weight of the periodicity (autocorrelation) term that steers the pitch (default 0)")
    p.add_argument("--seed", type=int, default=1234, help="seed for weights, dropout and sampling (default 1234)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--init", help="start from these weights (a checkpoint of the same config) instead of random")
    p.add_argument("--val-every", type=int, default=100, help="validate every N steps (default 100)")
    p.add_argument("--val-clips", type=int, default=16, help="val clips used (default 16, first ones by name)")
    p.add_argument("--val-seconds", type=float, default=4.0, help="first seconds of each val clip (default 4)")
    p.add_argument("--ckpt-every", type=int, default=500, help="write G_<step>.pth every N steps (default 500)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu; --resume is "
                   "bit-exact on the CPU only)")


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc train``; returns the exit status."""
    try:
        return train(args)
    except Exception as exc:  # one line, whatever failed
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"llvc train: {msg}", file=sys.stderr)
        return 1
