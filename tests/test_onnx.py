"""The ONNX export of the streaming step and the torch-free OnnxEngine that runs it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnx", reason="onnx not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript (the dynamo exporter's backend) not installed")

from models.export import export_onnx, model_hash, sidecar_path  # noqa: E402
from models.onnx_engine import ArtifactError, OnnxEngine  # noqa: E402
from models.streaming import StreamingEngine  # noqa: E402
from services.cli import main as llvc_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The ends of the range (each exports an artifact, ~10 s); tests/test_streaming.py covers every
# chunk factor of the eager step, whose math the graph is.
CHUNK_FACTORS = (1, 4)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """``get(reference, cf)`` → artifact path; each (fixture, chunk factor) is exported once."""
    cache: dict[tuple[str, int], Path] = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(ref, cf: int) -> Path:
        key = (ref.name, cf)
        if key not in cache:
            cache[key] = export_onnx(ref.model, ref.info, cf, root / f"{ref.name}_cf{cf}.onnx")
        return cache[key]

    return get


@pytest.mark.parametrize("chunk_factor", CHUNK_FACTORS)
def test_onnx_equals_eager_and_offline(reference, artifacts, chunk_factor):
    path = artifacts(reference, chunk_factor)
    engine = OnnxEngine.load(path, expect_checkpoint_hash=model_hash(reference.model, reference.info),
                             expect_chunk_factor=chunk_factor,
                             expect_config=reference.model.cfg.to_json_dict())
    eager = StreamingEngine(reference.model, chunk_factor)
    assert engine.geometry == eager.geometry  # both derived from the config and chunk factor
    for attr in ("chunk_len", "head_len", "context_len", "sample_rate", "chunk_factor"):
        assert getattr(engine, attr) == getattr(eager.geometry, attr), attr
    x, C = reference.input, engine.chunk_len
    y = engine.convert(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    vs_eager = float(np.abs(y - eager.convert(x)).max())
    vs_offline = float(np.abs(y - reference.offline)[: len(x) - C].max())
    print(f"{reference.name} cf{chunk_factor}: |onnx - eager| {vs_eager:.2e}, |onnx - offline| {vs_offline:.2e}")
    assert vs_eager <= 1e-4, vs_eager
    # Same bound as tests/test_streaming.py (offline zero-pads the final partial window).
    assert vs_offline < 1e-5, vs_offline
    assert engine.state_is_finite() and engine.chunks_processed == -(-len(x) // C)


def test_prime_process_reset_and_finite_check(ref_default, artifacts):
    engine = OnnxEngine.load(artifacts(ref_default, 1))
    eager = StreamingEngine(ref_default.model, 1)
    C, L, x = engine.chunk_len, ref_default.model.L, ref_default.input
    for e in (engine, eager):  # unprimed: the stream starts with silence
        e.reset()
    np.testing.assert_allclose(engine.process(x[:C]), eager.process(x[:C]), atol=1e-5)
    with pytest.raises(RuntimeError, match="already started"):
        engine.prime(x[:L])
    with pytest.raises(ValueError, match=f"exactly {C} samples"):
        engine.process(x[: C - 1])
    engine.process(np.full(C, np.nan, dtype=np.float32))
    assert not engine.state_is_finite()
    engine.reset()
    assert engine.state_is_finite() and not engine.primed
    engine.prime(x[:L])
    eager.reset()
    eager.prime(x[:L])
    np.testing.assert_allclose(engine.process(x[L:L + C]), eager.process(x[L:L + C]), atol=1e-5)


def test_stale_artifact_is_refused(reference, artifacts):
    path = artifacts(reference, 1)
    other = "0" * 64
    with pytest.raises(ArtifactError, match="stale artifact: checkpoint sha256"):
        OnnxEngine.load(path, expect_checkpoint_hash=other)
    with pytest.raises(ArtifactError, match="chunk factor 1, expected 2"):
        OnnxEngine.load(path, expect_chunk_factor=2)
    with pytest.raises(ArtifactError, match="config differs"):
        OnnxEngine.load(path, expect_config={"model_params": {}})


def test_other_fixtures_checkpoint_is_refused(ref_default, artifacts):
    from conftest import Reference

    nc = Reference("ref_nc")
    with pytest.raises(ArtifactError, match="checkpoint sha256"):
        OnnxEngine.load(artifacts(ref_default, 1), expect_checkpoint_hash=model_hash(nc.model, nc.info))


def test_failed_export_leaves_nothing(ref_default, tmp_path, monkeypatch):
    import models.export as export

    def boom(*_args, **_kwargs):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(export, "_export", boom)
    with pytest.raises(RuntimeError, match="exporter broke"):
        export_onnx(ref_default.model, ref_default.info, 1, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_artifact_or_sidecar_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="no such ONNX artifact"):
        OnnxEngine.load(tmp_path / "x.onnx")
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError, match="no sidecar"):
        OnnxEngine.load(tmp_path / "x.onnx")


def test_onnx_engine_does_not_import_torch():
    code = "import sys, models.onnx_engine; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_cli_export_writes_artifact_and_fails_cleanly(tmp_path, capsys):
    from conftest import REF

    out = tmp_path / "good" / "nc.onnx"
    rc = llvc_main(["export", "-p", str(REF / "ref_nc.pth"), "-c", str(REF / "config_nc.json"),
                    "-n", "1", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.exists() and sidecar_path(out).exists()
    assert OnnxEngine.load(out).chunk_len == 208

    bad = tmp_path / "bad"
    rc = llvc_main(["export", "-p", str(tmp_path / "missing.pth"), "-c", str(REF / "config_nc.json"),
                    "-o", str(bad / "x.onnx")])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert "no such checkpoint file" in err and len(err.splitlines()) == 1, err
    assert not bad.exists() or not any(bad.iterdir())
