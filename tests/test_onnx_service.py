"""The inference service on the ONNX backend: exact output, no torch in the process, stale refused.

Real sockets, the real service (in a thread for exactness, as a subprocess for what the process
loads), a real artifact exported by ``llvc export``'s function.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install -e '.[onnx]')")

from test_inference_service import (  # noqa: E402
    REF,
    C,
    Harness,
    config,
    llvc_inference,
    overrides,
    place,
    serve_two_chunks,
    stream_chunks,
)

CKPT, CONFIG = REF / "ref_default.pth", REF / "config.json"


@pytest.fixture
def artifact(ref_default_artifact) -> Path:
    return ref_default_artifact


def test_onnx_backend_reproduces_offline_conversion(artifact, ref_default):
    signal_ = sf.read(REF / "ref_default_input.wav", dtype="float32")[0]
    chunks = stream_chunks(signal_, C)
    cfg = config("inference.backend=onnx", f"inference.artifact={artifact}")
    with Harness(cfg, checkpoint=str(CKPT), config=str(CONFIG)) as h:
        h.feed_paced(chunks)
        h.counters(chunks_out=len(chunks) - 1)
        beat = h.heartbeats()[-1]
    n = len(signal_)
    y = place(h.outputs)
    assert np.abs(y[:n - C] - ref_default.offline[:n - C]).max() < 1e-4
    assert beat.status.backend == "onnx" and beat.status.untrained is False and "ref_default" in beat.status.model


def test_onnx_service_process_never_loads_torch(artifact):
    ov = overrides()
    proc = llvc_inference(ov, "-p", str(CKPT), "-c", str(CONFIG), "-n", "1",
                          "--set", "inference.backend=onnx", "--set", f"inference.artifact={artifact}")

    def no_torch_mapped():
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "onnxruntime" in maps and "libtorch" not in maps

    _, err, _ = serve_two_chunks(proc, ov, inspect=no_torch_mapped)
    assert proc.returncode == 0, err


@pytest.mark.parametrize("flags, fragment", [
    (["-n", "2"], "stale artifact: chunk factor 1, expected 2"),
    (["-n", "1", "-p", ""], "stale artifact"),
    (["-n", "1", "--set", "inference.artifact="], "needs inference.artifact"),
])
def test_a_stale_or_missing_artifact_is_one_line_and_exit_2(artifact, flags, fragment):
    proc = llvc_inference(overrides(), "-p", str(CKPT), "-c", str(CONFIG), "--set", "inference.backend=onnx",
                          "--set", f"inference.artifact={artifact}", *flags)
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], err
    assert "inference ERROR cannot start" in lines[0]


def test_convert_with_onnx_streams_exactly_and_never_imports_torch(artifact, ref_default, tmp_path):
    """``llvc convert --onnx`` in a fresh interpreter: the output is the eager streaming output
    (offline's, up to the last chunk), and torch was never imported."""
    import subprocess
    import sys

    code = ("import sys; from services.cli import main; "
            f"rc = main(['convert', '-p', {str(CKPT)!r}, '-c', {str(CONFIG)!r}, '--onnx', {str(artifact)!r}, "
            f"'-f', {str(REF / 'ref_default_input.wav')!r}, '-o', {str(tmp_path / 'out')!r}]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ONNX Runtime" in proc.stdout and "RTF" in proc.stdout
    y, sr = sf.read(tmp_path / "out" / "ref_default_input.wav", dtype="float32")
    n = len(ref_default.offline)
    assert sr == 16000 and len(y) == n
    assert np.abs(y[:n - C] - ref_default.offline[:n - C]).max() < 1e-4


def test_convert_with_a_stale_artifact_is_one_line_and_exit_2(artifact, tmp_path):
    from services.cli import main

    rc = main(["convert", "-p", str(CKPT), "-c", str(CONFIG), "-n", "2", "--onnx", str(artifact),
               "-f", str(REF / "ref_default_input.wav"), "-o", str(tmp_path / "out")])
    assert rc == 2 and not (tmp_path / "out" / "ref_default_input.wav").exists()
