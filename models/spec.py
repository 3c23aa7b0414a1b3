"""What a command or service was asked to run, resolved once: :class:`ModelSpec`.

A user names a model with a checkpoint, a config (both optional) and a chunk factor. From those
three, :class:`ModelSpec` derives, each in one place, everything other code needs to know about
the model without loading it: which files (:func:`models.config.resolve_model_files`), the
config, the stream geometry (:class:`models.geometry.StreamGeometry`), the checkpoint's SHA-256
(read once, when first asked), the model id that names it on the wire, and the key of its ONNX
artifact. Torch-free: capture, the ONNX path and ``llvc run`` use it without importing torch.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .config import (
    ARTIFACT_VERSION,
    DEMO_CHECKPOINT,
    REPO_ROOT,
    ModelConfig,
    ModelFiles,
    file_digest,
    load_config,
    resolve_model_files,
)
from .geometry import StreamGeometry, check_chunk_factor

#: Seed of the untrained model's weights (the same model every time; see models/checkpoint.py).
UNTRAINED_SEED = 0
#: The model id of the untrained seeded model (it has no file to hash).
UNTRAINED_MODEL_ID = f"llvc-default-untrained-seed{UNTRAINED_SEED}"


def checkpoint_model_id(path: str | Path, sha256: str | None = None) -> str:
    """The id of a model loaded from the checkpoint file ``path``: ``llvc-<stem>-<sha256[:12]>``.

    ``sha256``: the file's digest when already known (else the file is read).
    """
    path = Path(path)
    return f"llvc-{path.stem}-{(sha256 or file_digest(path))[:12]}"


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A model as asked for: its files, its config and the chunk factor, and what they imply.

    Build it with :meth:`resolve`. The checkpoint is hashed at most once per spec, and only when
    the id or the artifact key is wanted (capture never asks).
    """

    files: ModelFiles
    config: ModelConfig
    chunk_factor: int

    @classmethod
    def resolve(cls, checkpoint: str | Path | None, config: str | Path | None,
                chunk_factor: int = 1) -> ModelSpec:
        """The spec for ``checkpoint`` and ``config`` as a user gave them (``None``/``""``: not
        given) at ``chunk_factor``. Raises :class:`~models.config.ConfigError` for a bad config
        and ``ValueError`` for a bad chunk factor; the checkpoint is not read here."""
        files = resolve_model_files(checkpoint, config)
        return cls(files, load_config(files.config), check_chunk_factor(chunk_factor))

    @cached_property
    def geometry(self) -> StreamGeometry:
        """How a stream of this model is cut (chunk, head, context) at :attr:`chunk_factor`."""
        return StreamGeometry.of(self.config, self.chunk_factor)

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint file; ``None`` for the untrained seeded model."""
        return self.files.checkpoint

    @property
    def untrained(self) -> bool:
        """Whether this is the untrained seeded model (a config was given, no checkpoint)."""
        return self.files.untrained

    @property
    def demo(self) -> bool:
        """Whether this is the embedded demo voice (nothing was given)."""
        return self.files.demo

    @cached_property
    def checkpoint_sha256(self) -> str | None:
        """SHA-256 of the checkpoint file, hex (read once); ``None`` for the untrained model.
        Raises ``OSError`` if the file cannot be read."""
        return file_digest(self.checkpoint) if self.checkpoint is not None else None

    @property
    def model_id(self) -> str:
        """How the model is named on the wire and in reports."""
        if self.checkpoint is None:
            return UNTRAINED_MODEL_ID
        return checkpoint_model_id(self.checkpoint, self.checkpoint_sha256)

    @property
    def label(self) -> str:
        """How the model is named in messages: the demo voice, its checkpoint file, or untrained."""
        if self.demo:
            return f"the embedded demo voice ({DEMO_CHECKPOINT.relative_to(REPO_ROOT)})"
        if self.checkpoint is None:
            return f"the untrained seeded model of {self.files.config}"
        return str(self.checkpoint)

    @property
    def artifact_key(self) -> str:
        """What an ONNX artifact of this model depends on, hashed (20 hex digits).

        A SHA-256 over the checkpoint file's SHA-256 (``"untrained-default"`` for the untrained
        model), the config (``to_json_dict()``, keys sorted), the chunk factor and the artifact
        layout version: anything that changes what the graph would be changes the key.
        """
        key = {
            "checkpoint_sha256": self.checkpoint_sha256 or "untrained-default",
            "config": self.config.to_json_dict(),
            "chunk_factor": self.chunk_factor,
            "artifact_version": ARTIFACT_VERSION,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]

    @property
    def artifact_name(self) -> str:
        """The artifact's file name in a cache: ``<checkpoint stem>-cf<N>-<key>.onnx``."""
        stem = (re.sub(r"[^A-Za-z0-9_.-]+", "_", self.checkpoint.stem)[:40]
                if self.checkpoint is not None else "untrained")
        return f"{stem}-cf{self.chunk_factor}-{self.artifact_key}.onnx"


def demo_description(model_id: str | None = None) -> str:
    """How the embedded demo voice is named in messages (``model_id``: computed when not given)."""
    if model_id is None:
        try:
            model_id = checkpoint_model_id(DEMO_CHECKPOINT)
        except OSError as exc:  # loading it will say so in its own line
            model_id = f"unreadable: {exc.strerror or exc}"
    return (f"embedded demo voice {DEMO_CHECKPOINT.relative_to(REPO_ROOT)} "
            f"({model_id}; see models/MODEL_CARD.md)")


def demo_model_line(prog: str, model_id: str | None = None) -> str:
    """The one line a command prints when it used the embedded demo voice (nothing given)."""
    return f"{prog}: model: {demo_description(model_id)}"
