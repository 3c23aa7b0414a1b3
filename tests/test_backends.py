"""Backend auto: the fastest valid backend, the artifact cache, and the fallbacks, each one line.

A real artifact (``llvc export --cache``) in a private cache (``$LLVC_CACHE_DIR``); the service
in a thread (heartbeats, log lines) and as a process (what it maps); ``llvc run`` exporting for
real. conftest.py gives every test an empty cache and ``LLVC_NO_EXPORT=1``; the tests here
override both where they test them.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install -e '.[onnx]')")

import models.spec  # noqa: E402
from bus_helpers import make_config, wait_until  # noqa: E402
from common.bus import Bus  # noqa: E402
from models import backends  # noqa: E402
from models.backends import CACHE_ENV, NO_EXPORT_ENV, cached_artifact_path, ensure_artifact, resolve_backend  # noqa: E402
from models.spec import ModelSpec, demo_model_line  # noqa: E402
from services.cli import main as llvc_main  # noqa: E402
from services.lab.endpoints import private_sets  # noqa: E402
from test_inference_service import REF, Harness, config, llvc_inference, overrides, serve_two_chunks, stream_chunks  # noqa: E402

CKPT, CONFIG = REF / "ref_default.pth", REF / "config.json"
spec = ModelSpec.resolve
NOTE = " inference WARNING backend auto: "


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache folder holding ref_default's cf 1 artifact, made by ``llvc export --cache``."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root))
        assert llvc_main(["export", "--cache", "-p", str(CKPT), "-c", str(CONFIG), "-n", "1"]) == 0
    return root


@pytest.fixture
def use_cache(monkeypatch):
    """``use_cache(folder)``: this process and the services it starts use that cache."""
    return lambda folder: monkeypatch.setenv(CACHE_ENV, str(folder))


def test_export_cache_writes_where_auto_looks(cache, use_cache, capsys):
    use_cache(cache)
    path = cached_artifact_path(spec(CKPT, CONFIG, 1))
    assert path.parent == cache / "onnx" and path.name.startswith("ref_default-cf1-")
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert sorted(p.name for p in (cache / "onnx").glob("*.onnx")) == sorted([path.name, f"{path.stem}.prime.onnx"])
    logged = []
    assert ensure_artifact(spec(CKPT, CONFIG, 1), log=logged.append) == path and logged == []  # valid: no export


def test_cache_name_follows_checkpoint_config_chunk_factor_and_format(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    base = cached_artifact_path(spec(CKPT, CONFIG, 1))
    assert base == cached_artifact_path(spec(str(CKPT), str(CONFIG), 1))  # deterministic
    copy = tmp_path / "elsewhere.pth"
    shutil.copyfile(CKPT, copy)
    # The content names it, not the path:
    assert cached_artifact_path(spec(copy, CONFIG, 1)).name.split("-")[-1] == base.name.split("-")[-1]
    variants = [cached_artifact_path(spec(*given)) for given in (
        (CKPT, CONFIG, 2), (REF / "ref_nc.pth", CONFIG, 1), (CKPT, REF / "config_nc.json", 1), (None, CONFIG, 1))]
    assert len({base, *variants}) == 5
    monkeypatch.setattr(models.spec, "ARTIFACT_VERSION", 999)
    assert cached_artifact_path(spec(CKPT, CONFIG, 1)) != base


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backends.cache_dir() == tmp_path / "xdg" / "llvc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert backends.cache_dir() == tmp_path / "home" / ".cache" / "llvc"


def test_resolver_choices(cache, use_cache, monkeypatch):
    assert resolve_backend("eager", "cpu", "", spec(CKPT, CONFIG, 1)).backend == "eager"
    assert resolve_backend("auto", "cuda", "", spec(CKPT, CONFIG, 1)) == backends.Resolved("eager")
    empty = resolve_backend("auto", "cpu", "", spec(CKPT, CONFIG, 1))  # conftest's empty cache
    assert empty.backend == "eager" and "no ONNX artifact is cached for this model (cf 1)" in empty.note
    assert f"llvc export --cache -p {CKPT} -c {CONFIG} -n 1" in empty.note
    use_cache(cache)
    for requested in ("auto", "onnx"):  # onnx with no artifact given: the cached one
        chosen = resolve_backend(requested, "cpu", "", spec(CKPT, CONFIG, 1))
        assert chosen.backend == "onnx" and chosen.note is None
        assert chosen.artifact == cached_artifact_path(spec(CKPT, CONFIG, 1))
    stale = resolve_backend("auto", "cpu", str(chosen.artifact), spec(CKPT, CONFIG, 2))  # configured, stale
    assert stale.backend == "eager" and "inference.artifact unusable" in stale.note and "stale" in stale.note
    monkeypatch.setattr(backends, "onnx_importable", lambda: False)
    missing = resolve_backend("auto", "cpu", "", spec(CKPT, CONFIG, 1))
    assert missing.backend == "eager" and "pip install -e '.[onnx]'" in missing.note
    with pytest.raises(backends.BackendError, match="onnxruntime is not installed"):
        resolve_backend("onnx", "cpu", "", spec(CKPT, CONFIG, 1))


def model(*extra: str):
    """A private config for ref_default (in [model]: as flags, -c would draw a re-framing warning)."""
    return config(f"model.checkpoint={CKPT}", f"model.config={CONFIG}", *extra)


def _served_backend(cfg, capsys) -> tuple[str, list[str]]:
    """Run the service in a thread until it converts a chunk: (heartbeat backend, its warnings)."""
    capsys.readouterr()
    with Harness(cfg) as h:
        for c in stream_chunks(np.zeros(2 * 208, np.float32))[:2]:
            h.send(c)
        h.wait_outputs(1)
        beat = h.heartbeats()[-1]
    err = capsys.readouterr().err
    return beat.status.backend, [line for line in err.splitlines() if " WARNING " in line]


def test_auto_falls_back_to_eager_with_one_line_when_nothing_is_cached(capsys):
    backend, warnings = _served_backend(model(), capsys)
    assert backend == "eager" and len(warnings) == 1 and NOTE in warnings[0], warnings
    assert "no ONNX artifact is cached for this model (cf 1)" in warnings[0] and "llvc export --cache" in warnings[0]


def test_a_corrupt_cached_artifact_falls_back_to_eager_with_one_line(cache, use_cache, tmp_path, capsys):
    broken = tmp_path / "cache"
    shutil.copytree(cache, broken)
    use_cache(broken)
    cached_artifact_path(spec(CKPT, CONFIG, 1)).write_bytes(b"not an onnx graph")
    backend, warnings = _served_backend(model(), capsys)
    assert backend == "eager" and len(warnings) == 1 and NOTE in warnings[0], warnings
    assert "cached ONNX artifact unusable" in warnings[0] and "not a loadable ONNX graph" in warnings[0]


def test_explicit_eager_says_nothing(cache, use_cache, capsys):
    use_cache(cache)
    assert _served_backend(model("inference.backend=eager"), capsys) == ("eager", [])


def test_auto_with_a_cached_artifact_serves_on_onnx_and_never_maps_torch(cache, use_cache):
    use_cache(cache)
    ov = overrides()
    proc = llvc_inference([*ov, f"model.checkpoint={CKPT}", f"model.config={CONFIG}"])
    beats = []

    def onnx_without_torch():
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "onnxruntime" in maps and "libtorch" not in maps
        with Bus(make_config("tcp", *ov), "tap") as tap:
            sub = tap.subscriber(("heartbeat.",), endpoints=["telemetry_inference"])
            assert wait_until(lambda: (hb := sub.recv(50)) is not None and beats.append(hb) is None, timeout=10)

    _, err, _ = serve_two_chunks(proc, ov, inspect=onnx_without_torch)
    assert proc.returncode == 0, err
    assert beats[0].status.backend == "onnx" and beats[0].status.untrained is False
    assert " WARNING " not in err and " backend=onnx " in next(ln for ln in err.splitlines() if " INFO ready " in ln)


@pytest.fixture
def keep_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # convert sets it process-wide


def test_convert_stream_uses_the_cache_or_says_why_not(cache, use_cache, tmp_path, capsys, keep_torch_threads):
    args = ["convert", "-s", "-p", str(CKPT), "-c", str(CONFIG), "-f", str(REF / "ref_default_input.wav")]
    assert llvc_main([*args, "-o", str(tmp_path / "a")]) == 0  # conftest's empty cache: PyTorch, one line
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert "device cpu" in out and len(lines) == 1, err
    assert lines[0].startswith("llvc convert: backend auto: no ONNX artifact is cached for this model (cf 1)")
    use_cache(cache)
    assert llvc_main([*args, "-o", str(tmp_path / "b")]) == 0
    out, err = capsys.readouterr()
    assert "ONNX Runtime" in out and err == ""
    assert llvc_main([*args, "--backend", "eager", "-o", str(tmp_path / "c")]) == 0
    assert "device cpu" in capsys.readouterr().out


def test_llvc_run_exports_once_into_the_cache_and_inference_runs_onnx(tmp_path, monkeypatch):
    from services.lab.harness import LLVC

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(NO_EXPORT_ENV)
    run_dir = tmp_path / "run"
    cmd = [str(LLVC), "run", "--source", "tone", "--sink", "null", "--duration", "4", "-n", "1",
           "--run-dir", str(run_dir), *[a for s in private_sets() for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    path = cached_artifact_path(spec(None, None, 1))
    assert path.is_file()
    lines = [ln for ln in proc.stdout.splitlines() if "exporting the ONNX step" in ln]
    assert lines == [f"llvc run: exporting the ONNX step for the embedded demo voice (models/demo_voice.pth) "
                     f"cf 1 into {path} (once; ~10 s)"], proc.stdout[-2000:]
    assert path.name.startswith("demo_voice-cf1-")
    assert demo_model_line("llvc run") in proc.stdout.splitlines()
    ready = [ln for ln in (run_dir / "inference.log").read_text().splitlines() if " INFO ready " in ln]
    assert ready and all(" backend=onnx " in ln for ln in ready), ready
    report = json.loads((run_dir / "report.json").read_text())
    assert report["model"]["untrained"] is False and report["model"]["id"].startswith("llvc-demo_voice-")
    assert "UNTRAINED" not in proc.stderr
