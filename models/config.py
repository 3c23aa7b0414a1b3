"""Model configuration: upstream LLVC ``config.json`` format, validated.

Upstream's config file carries training settings too (``optim``, ``aux_mel``, ...); only
``model_params`` and ``data.sr`` describe the network, so only those are read and checked here.
Every problem is reported as one :class:`ConfigError` line naming the file and the key.

It also holds the one rule for which model files are loaded when a user gives a checkpoint, a
config, both or neither (:func:`resolve_model_files`: neither is the embedded demo voice),
torch-free so that the ONNX path resolves it without importing torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from common.audio import SAMPLE_RATE

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The config a checkpoint given without one is read with (upstream's architecture).
DEFAULT_CONFIG_PATH = REPO_ROOT / "config" / "llvc.json"
#: The embedded default model: a trained demo voice (models/MODEL_CARD.md) and its config.
DEMO_CHECKPOINT = REPO_ROOT / "models" / "demo_voice.pth"
DEMO_CONFIG = REPO_ROOT / "config" / "demo_voice.json"
#: ``-p`` / ``-c`` help text: what is loaded when they are not given (see :func:`resolve_model_files`).
CHECKPOINT_DEFAULT_HELP = ("default: the embedded demo voice, models/demo_voice.pth; "
                           "-c without -p: an UNTRAINED seeded model of that config")
CONFIG_DEFAULT_HELP = ("default: config/demo_voice.json without -p; with -p, CHECKPOINT's name with .json "
                       "beside it if there is one, else config/llvc.json")


class ConfigError(ValueError):
    """A model config that cannot be used; ``str()`` is one line naming file and key."""


@dataclass(frozen=True)
class PrenetConfig:
    """``model_params.convnet_config``: the cached causal convnet before ``in_conv``."""

    convnet_prenet: bool = True
    out_channels: tuple[int, ...] = (1,) * 12
    kernel_sizes: tuple[int, ...] = (3,) * 12
    dilations: tuple[int, ...] = (1,) * 12
    dropout: float = 0.5
    combine_residuals: str | None = None
    skip_connection: str | None = "add"
    use_residual_blocks: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """``model_params`` of an upstream config, with upstream's constructor defaults."""

    label_len: int = 1
    L: int = 16
    enc_dim: int = 512
    num_enc_layers: int = 8
    dec_dim: int = 256
    num_dec_layers: int = 1
    dec_buf_len: int = 13
    dec_chunk_size: int = 13
    out_buf_len: int = 4
    use_pos_enc: bool = True
    skip_connection: bool = True
    proj: bool = True
    lookahead: bool = True
    decoder_dropout: float = 0.0
    convnet_config: PrenetConfig = field(default_factory=PrenetConfig)
    sample_rate: int = SAMPLE_RATE

    @property
    def window_samples(self) -> int:
        """Samples in one decoder window (``dec_chunk_size * L``): the smallest chunk."""
        return self.dec_chunk_size * self.L

    @property
    def in_kernel(self) -> int:
        """``in_conv``'s kernel: ``3L`` with lookahead (L past, L present, L future), else ``L``."""
        return 3 * self.L if self.lookahead else self.L

    @property
    def left_pad(self) -> int:
        """Zeros the offline forward puts before the first sample (``L`` with lookahead)."""
        return self.L if self.lookahead else 0

    def to_json_dict(self) -> dict[str, Any]:
        """The config in upstream's layout (``model_params`` and ``data.sr``)."""
        params = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sample_rate"}
        params["convnet_config"] = {
            f.name: (list(v) if isinstance(v := getattr(self.convnet_config, f.name), tuple) else v)
            for f in fields(PrenetConfig)
        }
        return {"data": {"sr": self.sample_rate}, "model_params": params}


# Value checks by kind; a key a config omits takes upstream Net()'s default.
_POSITIVE_INTS = ("L", "enc_dim", "num_enc_layers", "dec_dim", "num_dec_layers",
                  "dec_buf_len", "dec_chunk_size", "label_len")
_NON_NEGATIVE_INTS = ("out_buf_len",)
_BOOLS = ("use_pos_enc", "skip_connection", "proj", "lookahead")
_PRENET_COMBINE = (None, "add", "multiply")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_prenet(raw: Any, where: str) -> PrenetConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be an object, got {type(raw).__name__}")
    known = {f.name for f in fields(PrenetConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for key in ("convnet_prenet", "use_residual_blocks"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise ConfigError(f"{where}.{key}: must be true or false, got {raw[key]!r}")
            values[key] = raw[key]
    lengths = set()
    for key in ("out_channels", "kernel_sizes", "dilations"):
        if key in raw:
            seq = raw[key]
            if not isinstance(seq, list) or not seq or not all(_is_int(v) and v > 0 for v in seq):
                raise ConfigError(f"{where}.{key}: must be a non-empty list of positive integers, got {seq!r}")
            values[key] = tuple(seq)
        lengths.add(len(values.get(key, getattr(PrenetConfig, key))))
    if len(lengths) != 1:
        raise ConfigError(f"{where}: out_channels, kernel_sizes and dilations must have the same length")
    if values.get("out_channels", (1,))[-1] != 1:
        raise ConfigError(f"{where}.out_channels: the last entry must be 1 (in_conv reads one channel)")
    if "dropout" in raw:
        if not _is_number(raw["dropout"]) or not 0 <= raw["dropout"] < 1:
            raise ConfigError(f"{where}.dropout: must be a number in [0, 1), got {raw['dropout']!r}")
        values["dropout"] = float(raw["dropout"])
    for key in ("combine_residuals", "skip_connection"):
        if key in raw:
            if raw[key] not in _PRENET_COMBINE:
                raise ConfigError(f"{where}.{key}: must be null, \"add\" or \"multiply\", got {raw[key]!r}")
            values[key] = raw[key]
    return PrenetConfig(**values)


def parse_config(raw: Any, source: str = "<config>") -> ModelConfig:
    """Validate an upstream-format config dict and return a :class:`ModelConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a JSON object")
    params = raw.get("model_params")
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: missing \"model_params\" object")
    where = f"{source}: model_params"
    known = {f.name for f in fields(ModelConfig)} - {"sample_rate"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for key in _POSITIVE_INTS:
        if key in params:
            if not _is_int(params[key]) or params[key] <= 0:
                raise ConfigError(f"{where}.{key}: must be a positive integer, got {params[key]!r}")
            values[key] = params[key]
    for key in _NON_NEGATIVE_INTS:
        if key in params:
            if not _is_int(params[key]) or params[key] < 0:
                raise ConfigError(f"{where}.{key}: must be a non-negative integer, got {params[key]!r}")
            values[key] = params[key]
    for key in _BOOLS:
        if key in params:
            if not isinstance(params[key], bool):
                raise ConfigError(f"{where}.{key}: must be true or false, got {params[key]!r}")
            values[key] = params[key]
    if "decoder_dropout" in params:
        v = params["decoder_dropout"]
        if not _is_number(v) or not 0 <= v < 1:
            raise ConfigError(f"{where}.decoder_dropout: must be a number in [0, 1), got {v!r}")
        values["decoder_dropout"] = float(v)
    if "convnet_config" in params:
        values["convnet_config"] = _parse_prenet(params["convnet_config"], f"{where}.convnet_config")
    else:
        # Upstream's Net() indexes convnet_config unconditionally: a config without it never worked.
        raise ConfigError(f"{where}: missing key 'convnet_config'")
    dec_dim = values.get("dec_dim", ModelConfig.dec_dim)
    if dec_dim % 8:
        raise ConfigError(f"{where}.dec_dim: must be divisible by the decoder's 8 attention heads, got {dec_dim}")
    if dec_dim % 2:
        raise ConfigError(f"{where}.dec_dim: must be even (sinusoidal positional encoding), got {dec_dim}")
    if values.get("proj", True) and values.get("enc_dim", ModelConfig.enc_dim) % dec_dim:
        raise ConfigError(f"{where}.enc_dim: must be a multiple of dec_dim for the grouped projections")
    if values.get("dec_buf_len", 13) + values.get("dec_chunk_size", 13) > 200 and values.get("use_pos_enc", True):
        raise ConfigError(f"{where}: dec_buf_len + dec_chunk_size must be at most 200 (positional encoding table)")
    data = raw.get("data", {})
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: \"data\" must be an object")
    sr = data.get("sr", SAMPLE_RATE)
    if sr != SAMPLE_RATE:
        raise ConfigError(f"{source}: data.sr: LLVC runs at {SAMPLE_RATE} Hz only, got {sr!r}")
    return ModelConfig(**values)


def load_config(path: str | Path | None = None) -> ModelConfig:
    """Read and validate a config file (default: ``config/llvc.json``)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a JSON config (not UTF-8 text: byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return parse_config(raw, str(path))


#: Version of ``llvc export``'s artifacts (graph inputs/outputs and sidecar meaning); bumped
#: whenever they change, so cached artifacts of an older layout are never picked up again.
#: 2: FastStep's math and state layout (per-layer time-major encoder buffers, decoder K/V cache).
ARTIFACT_VERSION = 2


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, hex (what checkpoints and the artifacts made from them are known by)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ModelFiles(NamedTuple):
    """What a checkpoint and config, as a user gave them, load (:func:`resolve_model_files`)."""

    checkpoint: Path | None  # None: the UNTRAINED seeded model of ``config``
    config: Path
    demo: bool               # True: nothing was given, this is the embedded demo voice

    @property
    def untrained(self) -> bool:
        """Whether this is the untrained seeded model (a config was given, no checkpoint)."""
        return self.checkpoint is None


def resolve_model_files(checkpoint: str | Path | None, config: str | Path | None) -> ModelFiles:
    """The one rule for which model is loaded, for every command and service.

    ``None`` and ``""`` mean "not given". Neither given: the embedded demo voice
    (:data:`DEMO_CHECKPOINT`, :data:`DEMO_CONFIG`). A checkpoint: that checkpoint, with
    ``config``, else the config beside it with its name (``voice.pth`` -> ``voice.json``: a
    folder of voices is a folder of such pairs), else :data:`DEMO_CONFIG` for the demo
    checkpoint and :data:`DEFAULT_CONFIG_PATH` for any other. Only a config: the UNTRAINED
    seeded model of that config (``checkpoint`` is ``None``; loading it warns).
    """
    if not checkpoint and not config:
        return ModelFiles(DEMO_CHECKPOINT, DEMO_CONFIG, demo=True)
    if not checkpoint:
        return ModelFiles(None, Path(config), demo=False)
    path = Path(checkpoint)
    if config:
        return ModelFiles(path, Path(config), demo=False)
    beside = path.with_suffix(".json")
    if beside.is_file():
        return ModelFiles(path, beside, demo=False)
    return ModelFiles(path, DEMO_CONFIG if is_demo_checkpoint(path) else DEFAULT_CONFIG_PATH, demo=False)


def is_demo_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is the embedded demo voice's checkpoint (by its resolved location)."""
    try:
        return Path(path).resolve() == DEMO_CHECKPOINT.resolve()
    except OSError:
        return False
