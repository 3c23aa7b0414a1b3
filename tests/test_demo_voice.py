"""The embedded default model: the trained demo voice (models/demo_voice.pth, config/demo_voice.json).

Without -p and -c every command and service loads it (``models.config.resolve_model_files``);
a config without a checkpoint still means the untrained seeded model (tests/test_model.py).
The checkpoint is replaced by better-trained ones of the same config, so nothing here depends
on its digest or on its exact output.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import DATA
from models import config as model_config
from models.backends import CACHE_ENV, cached_artifact_path, ensure_artifact
from models.bench import TOLERANCE
from models.checkpoint import load_model, read_state_dict
from models.config import (
    DEFAULT_CONFIG_PATH,
    DEMO_CHECKPOINT,
    DEMO_CONFIG,
    ModelFiles,
    file_digest,
    load_config,
    resolve_model_files,
)
from models.spec import ModelSpec, checkpoint_model_id, demo_description
from models.streaming import StreamingEngine
from services.cli import main as llvc_main
from test_streaming import assert_convert_equals_offline

spec = ModelSpec.resolve

CLIP = DATA / "174-50561-0000.wav"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread, as the streaming commands use: with two, any other busy process on a
    2-core machine makes the many small steps ~100x slower (OpenMP workers wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo():
    """``load_model()`` with nothing given, and what it passed to ``warn``."""
    messages: list[str] = []
    model, info = load_model(warn=messages.append)
    return model, info, messages


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """The first 3 s of a LibriSpeech clip."""
    x, sr = sf.read(CLIP, dtype="float32")
    assert sr == 16000
    return x[: 3 * sr]


@pytest.fixture(scope="module")
def default_artifact(tmp_path_factory):
    """The default model's cf 1 artifact, exported into a private cache as ``llvc run`` does.

    Yields ``(path, logged lines)``; the cache stays set for the module's tests.
    """
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e '.[onnx]')")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install -e '.[onnx]')")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        logged: list[str] = []
        yield ensure_artifact(spec(None, None, 1), log=logged.append), logged


def test_nothing_given_resolves_to_the_demo_files():
    assert DEMO_CHECKPOINT.is_file() and DEMO_CONFIG.is_file()
    for none in (None, ""):
        assert resolve_model_files(none, none) == ModelFiles(DEMO_CHECKPOINT, DEMO_CONFIG, demo=True)
    assert resolve_model_files("g.pth", None) == ModelFiles(Path("g.pth"), DEFAULT_CONFIG_PATH, demo=False)
    assert resolve_model_files("g.pth", "c.json") == ModelFiles(Path("g.pth"), Path("c.json"), demo=False)
    only_config = resolve_model_files("", "c.json")
    assert only_config == ModelFiles(None, Path("c.json"), demo=False) and only_config.untrained
    assert not resolve_model_files(None, None).untrained


def test_load_model_with_nothing_is_the_trained_demo_voice_in_float32(demo, capsys):
    model, info, messages = demo
    assert messages == []
    assert info.trained and info.demo and (info.checkpoint, info.config) == (DEMO_CHECKPOINT, DEMO_CONFIG)
    assert info.model_id == checkpoint_model_id(DEMO_CHECKPOINT) and info.model_id.startswith("llvc-demo_voice-")
    assert info.describe() == demo_description(info.model_id)
    assert info.describe().startswith("embedded demo voice models/demo_voice.pth (llvc-demo_voice-")
    assert model.cfg == load_config(DEMO_CONFIG) and (model.cfg.enc_dim, model.cfg.dec_dim) == (256, 128)
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    load_model()  # the default warn prints to stderr: nothing to say
    assert "UNTRAINED" not in capsys.readouterr().err


def test_demo_checkpoint_is_float16_storage_loaded_exactly(demo):
    sd = read_state_dict(DEMO_CHECKPOINT)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    loaded = demo[0].state_dict()
    assert sd.keys() == loaded.keys()
    assert all(torch.equal(loaded[k], v.float()) for k, v in sd.items())


def test_demo_voice_converts_speech_and_streams_exactly(demo, speech):
    y = assert_convert_equals_offline(demo[0], speech, chunk_factor=1)
    assert np.isfinite(y).all()
    assert float(np.sqrt(np.mean(y.astype(np.float64) ** 2))) > 1e-3


def test_default_artifact_key_is_the_demo_checkpoints_sha(tmp_path, monkeypatch):
    default = cached_artifact_path(spec(None, None, 1))
    assert default == cached_artifact_path(spec("", "", 1))
    assert default == cached_artifact_path(spec(DEMO_CHECKPOINT, DEMO_CONFIG, 1))
    assert default.name.startswith("demo_voice-cf1-")
    untrained = {cached_artifact_path(spec(None, config, 1)) for config in (DEFAULT_CONFIG_PATH, DEMO_CONFIG)}
    assert default not in untrained and len(untrained) == 2
    # A better-trained checkpoint in its place gets an artifact of its own.
    replaced = tmp_path / "demo_voice.pth"
    replaced.write_bytes(DEMO_CHECKPOINT.read_bytes() + b"\0")
    monkeypatch.setattr(model_config, "DEMO_CHECKPOINT", replaced)
    assert cached_artifact_path(spec(None, None, 1)) not in (default, *untrained)
    assert cached_artifact_path(spec(None, None, 1)) == cached_artifact_path(spec(replaced, DEMO_CONFIG, 1))


def test_default_runs_on_onnx_runtime_from_the_cache(default_artifact, demo, speech):
    from models.onnx_engine import ArtifactError, OnnxEngine  # onnxruntime: the fixture skips without it

    path, logged = default_artifact
    assert path == cached_artifact_path(spec(None, None, 1))
    assert len(logged) == 1 and "the embedded demo voice (models/demo_voice.pth) cf 1" in logged[0]
    assert ensure_artifact(spec(None, None, 1), log=logged.append) == path and len(logged) == 1  # valid: kept
    engine = OnnxEngine.for_model(path, spec(None, None, 1))
    assert engine.trained and engine.model_id == demo[1].model_id
    assert engine.checkpoint_sha256 == file_digest(DEMO_CHECKPOINT)
    x = speech[:16000]
    assert float(np.abs(engine.convert(x) - StreamingEngine(demo[0], 1).convert(x)).max()) <= TOLERANCE
    with pytest.raises(ArtifactError, match="stale artifact"):  # a config alone: the untrained model
        OnnxEngine.for_model(path, spec(None, DEMO_CONFIG, 1))


def test_convert_names_the_demo_voice_on_torch_and_onnx(default_artifact, demo, speech, tmp_path, capsys):
    clip = tmp_path / "clip.wav"
    sf.write(clip, speech[:8000], 16000, subtype="FLOAT")
    named = f"model: {demo_description(demo[1].model_id)}"
    assert llvc_main(["convert", "-f", str(clip), "-o", str(tmp_path / "torch")]) == 0
    out, err = capsys.readouterr()
    assert f"{named}; mode: offline;" in out and "UNTRAINED" not in err
    artifact = default_artifact[0]
    assert llvc_main(["convert", "--onnx", str(artifact), "-f", str(clip), "-o", str(tmp_path / "onnx")]) == 0
    out, err = capsys.readouterr()
    assert f"{named}, artifact {artifact}; mode: stream" in out and "UNTRAINED" not in err
