"""Loading LLVC weights: upstream checkpoints, bare state dicts, or the untrained seeded model.

Upstream publishes ``G_500000.pth`` as ``{"model": state_dict, ...}``; a bare state dict is
accepted too, in float32 or float16 storage (loaded into float32 parameters either way). Files
are read with ``torch.load(weights_only=True)`` so nothing in them is executed. Every refusal is
one :class:`CheckpointError` line: the file, then what is wrong. Which files are loaded when
none are given is :func:`models.config.resolve_model_files`'s rule: the embedded demo voice.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .llvc import LLVC
from .spec import UNTRAINED_SEED, ModelSpec, demo_description

#: Seed of the untrained model's weights (the same model every time).
DEFAULT_SEED = UNTRAINED_SEED
#: The untrained model's output conv weights are scaled by this so its tanh is not saturated.
DEFAULT_OUT_SCALE = 0.05
UNTRAINED_WARNING = ("WARNING: a model config but no checkpoint given, using the UNTRAINED seeded model "
                     "of that config (random weights): the output is not a converted voice. Pass -p "
                     "CHECKPOINT for a real model, or neither -p nor -c for the embedded demo voice "
                     "(see README, 'Models').")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the configured model (one line)."""


@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from (its :class:`~models.spec.ModelSpec`, which knows the rest)."""

    spec: ModelSpec

    @property
    def model_id(self) -> str:
        """Names the model on the wire and in reports."""
        return self.spec.model_id

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint file; ``None`` for the untrained seeded model."""
        return self.spec.checkpoint

    @property
    def config(self) -> Path:
        """The model config file."""
        return self.spec.files.config

    @property
    def trained(self) -> bool:
        """False for the untrained seeded model."""
        return not self.spec.untrained

    @property
    def demo(self) -> bool:
        """The embedded demo voice, taken because no checkpoint or config was given."""
        return self.spec.demo

    def describe(self) -> str:
        """A short human description for logs."""
        if self.demo:
            return demo_description(self.model_id)
        if self.checkpoint is None:
            return f"{self.model_id} (UNTRAINED, seed {DEFAULT_SEED}, {self.config})"
        return f"{self.model_id} ({self.checkpoint})"


def _fmt_keys(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: ``{"model": sd}`` or a bare ``sd`` of tensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/foreign files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({reason[:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected {{'model': state_dict}} or a state dict, "
                              f"got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected {{'model': state_dict}} or a state dict; "
                              f"entries that are not tensors: {_fmt_keys([str(k) for k in bad])}")
    return obj


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise unless ``sd`` matches ``model`` key for key and shape for shape, all finite.

    Any floating-point storage is accepted (float16 too: loading casts it to the model's float32).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_fmt_keys(unexpected)}")
    for k, v in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            problems.append(f"shape mismatch for {k}: checkpoint {tuple(sd[k].shape)}, "
                            f"model {tuple(v.shape)}")
            break
    if problems:
        raise CheckpointError(f"{source}: does not fit the configured model: " + "; ".join(problems))
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{source}: {k} has dtype {v.dtype}, expected floating point")
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: {k} holds non-finite values")


def default_model(cfg: ModelConfig) -> LLVC:
    """The untrained model: the configured architecture with seeded weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEFAULT_SEED)
        model = LLVC(cfg)
    with torch.no_grad():
        model.out_conv[0].weight.mul_(DEFAULT_OUT_SCALE)
    return model.eval()


def load_model(checkpoint: str | Path | None = None, config: str | Path | None = None,
               warn=None) -> tuple[LLVC, ModelInfo]:
    """The model :func:`~models.config.resolve_model_files` picks for ``checkpoint`` and ``config``.

    Neither given (``None`` or ``""``): the embedded demo voice. A checkpoint: loaded into the
    model of ``config`` (default ``config/llvc.json``), in float32 whatever its storage. Only a
    config: the untrained seeded model, and :data:`UNTRAINED_WARNING` is passed to ``warn``
    (default: printed to stderr). Raises :class:`ConfigError` or :class:`CheckpointError`.
    """
    return load_spec(ModelSpec.resolve(checkpoint, config), warn)


def load_spec(spec: ModelSpec, warn=None) -> tuple[LLVC, ModelInfo]:
    """The model ``spec`` names (see :func:`load_model`); its chunk factor does not matter here."""
    info = ModelInfo(spec)
    if spec.checkpoint is None:
        (warn or (lambda msg: print(msg, file=sys.stderr)))(UNTRAINED_WARNING)
        return default_model(spec.config), info
    path = spec.checkpoint
    sd = read_state_dict(path)
    model = LLVC(spec.config)
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=True)  # copies into the float32 parameters: float16 storage is cast
    return model.eval(), info
