"""Shared fixtures: the upstream reference checkpoints, their inputs and offline outputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

DATA = Path(__file__).parent / "data"
REF = DATA / "llvc-reference"
#: name -> config file of the upstream reference fixtures (see tests/data/llvc-reference/README.md)
REF_CONFIGS = {"ref_default": "config.json", "ref_nc": "config_nc.json"}


class Reference:
    """One upstream fixture: model loaded from its checkpoint, input signal, offline output."""

    def __init__(self, name: str):
        from models.checkpoint import load_model

        self.name = name
        self.checkpoint = REF / f"{name}.pth"
        self.config = REF / REF_CONFIGS[name]
        self.model, self.info = load_model(self.checkpoint, self.config)
        self.input, sr = sf.read(REF / f"{name}_input.wav", dtype="float32")
        assert sr == 16000
        self.offline = np.load(REF / f"{name}_offline.npy").astype(np.float32)


_cache: dict[str, Reference] = {}


@pytest.fixture(scope="session", params=sorted(REF_CONFIGS))
def reference(request) -> Reference:
    """Each upstream fixture in turn (loaded once per session)."""
    if request.param not in _cache:
        _cache[request.param] = Reference(request.param)
    return _cache[request.param]


@pytest.fixture(scope="session")
def ref_default() -> Reference:
    """The default-config fixture (pre-net on)."""
    if "ref_default" not in _cache:
        _cache["ref_default"] = Reference("ref_default")
    return _cache["ref_default"]


@pytest.fixture(scope="session")
def ref_default_artifact(tmp_path_factory) -> Path:
    """``llvc export``'s artifact of the ref_default fixture at chunk factor 1 (exported once)."""
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install -e '.[onnx]')")
    from models.checkpoint import load_model
    from models.export import export_onnx

    model, info = load_model(REF / "ref_default.pth", REF / REF_CONFIGS["ref_default"])
    return export_onnx(model, info, 1, tmp_path_factory.mktemp("onnx") / "ref_default-cf1.onnx")


@pytest.fixture(autouse=True, scope="session")
def _artifact_cache(tmp_path_factory):
    """An empty ONNX artifact cache of the session's own, and no export by ``llvc run``.

    Through the environment, so every service and ``llvc run`` the tests start sees it: backend
    auto then falls back to eager as on a fresh machine, whatever the developer's ~/.cache holds,
    and no ``llvc run`` spends ~10 s exporting. tests/test_backends.py overrides both where it
    tests them.
    """
    from models.backends import CACHE_ENV, NO_EXPORT_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("llvc-cache")))
        mp.setenv(NO_EXPORT_ENV, "1")
        yield


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    # Two cores here; pinning keeps timings and results reproducible across runs.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def pulse(tmp_path_factory):
    """A PulseAudio server with null sinks ``llvc_in`` and ``llvc_out`` for the session (tests/pulse.py).

    Clients need its ``env`` (``PULSE_SERVER`` and ``ALSA_CONFIG_PATH``); PortAudio then lists
    ``llvc_in``, ``llvc_out``, ``pulse`` and ``default``. Skips where PulseAudio is not installed.
    """
    from services.lab.pulse import PulseServer

    if not PulseServer.available():
        pytest.skip("PulseAudio is not installed (pulseaudio, pulseaudio-utils): no virtual sound devices")
    with PulseServer.start(tmp_path_factory.mktemp("pulse")) as srv:
        yield srv
