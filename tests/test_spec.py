"""models/geometry.py and models/spec.py: every geometry number and the model's identity, derived once."""
from __future__ import annotations

from pathlib import Path

import pytest

import models.spec
from models.config import load_config
from models.geometry import StreamGeometry, check_chunk_factor
from models.spec import UNTRAINED_MODEL_ID, ModelSpec

REF = Path(__file__).resolve().parent / "data" / "llvc-reference"


@pytest.mark.parametrize("cf", [1, 2, 4])
def test_geometry_of_upstreams_config(cf):
    g = StreamGeometry.of(load_config(REF / "config.json"), cf)
    assert (g.chunk_len, g.head_len, g.context_len, g.sample_rate, g.chunk_factor) == (208 * cf, 16, 32, 16000, cf)
    assert g.window_samples == 208 and g.delay_samples == 16 and g.latency_samples == 208 * cf + 16
    assert g.chunk_ms == 13.0 * cf and g.latency_s == (208 * cf + 16) / 16000
    assert g.algorithmic_latency_s == pytest.approx((32 + 208 * cf) / 16000)
    assert g.samples(40.0) == 640


def test_without_lookahead_there_is_no_head():
    cfg = load_config(REF / "config.json")
    no_lookahead = type(cfg)(**{**cfg.__dict__, "lookahead": False})
    g = StreamGeometry.of(no_lookahead, 1)
    assert (g.head_len, g.context_len) == (0, 0)


@pytest.mark.parametrize("bad", [0, -1, 1.0, True, "1"])
def test_one_chunk_factor_check(bad):
    with pytest.raises(ValueError, match=r"chunk_factor must be an integer >= 1"):
        check_chunk_factor(bad)
    with pytest.raises(ValueError, match=r"chunk_factor must be an integer >= 1"):
        ModelSpec.resolve(None, None, bad)


def test_the_checkpoint_is_read_once_per_spec_and_only_when_asked(monkeypatch):
    reads = []
    real = models.spec.file_digest
    monkeypatch.setattr(models.spec, "file_digest", lambda p: reads.append(p) or real(p))
    spec = ModelSpec.resolve(REF / "ref_default.pth", REF / "config.json", 2)
    assert spec.geometry.chunk_len == 416 and reads == []  # geometry needs no hash (capture)
    ids = {spec.model_id, spec.model_id, spec.artifact_key, spec.artifact_name}
    assert len(ids) == 3 and reads == [REF / "ref_default.pth"]
    assert spec.model_id.startswith("llvc-ref_default-") and spec.artifact_name.startswith("ref_default-cf2-")


def test_untrained_and_demo_identities():
    untrained = ModelSpec.resolve(None, REF / "config.json")
    assert untrained.untrained and untrained.checkpoint_sha256 is None and untrained.model_id == UNTRAINED_MODEL_ID
    assert untrained.artifact_name.startswith("untrained-cf1-")
    demo = ModelSpec.resolve("", "")
    assert demo.demo and demo.model_id.startswith("llvc-demo_voice-") and "demo voice" in demo.label
