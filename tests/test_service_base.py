"""services.base: settings validation names the key and where the value came from."""
from __future__ import annotations

import pytest

from common.config import PipelineConfigError, load_pipeline_config
from services.base import parse_settings
from services.capture import CAPTURE_SCHEMA
from services.playback import SCHEMA as PLAYBACK_SCHEMA


def test_the_default_file_matches_every_service_schema():
    cfg = load_pipeline_config(env={})
    s = parse_settings(cfg, "playback", PLAYBACK_SCHEMA)
    assert (s.sink, s.target_ms) == ("null", 6.0)
    assert parse_settings(cfg, "capture", CAPTURE_SCHEMA).source == "tone"


def test_values_layer_and_ints_become_floats():
    cfg = load_pipeline_config(env={}, overrides=["playback.target_ms=3"])
    s = parse_settings(cfg, "playback", PLAYBACK_SCHEMA, {"sink": "file:/tmp/x.wav"})
    assert (s.sink, s.target_ms) == ("file:/tmp/x.wav", 3.0)


def test_errors_name_key_and_source():
    cfg = load_pipeline_config(env={}, overrides=["capture.level=2"])
    with pytest.raises(PipelineConfigError) as err:
        parse_settings(cfg, "playback", PLAYBACK_SCHEMA, {"target_ms": -1.0})
    assert str(err.value).startswith("command line: playback.target_ms: must be >= 0")
    with pytest.raises(PipelineConfigError) as err:
        parse_settings(cfg, "capture", CAPTURE_SCHEMA)
    assert "--set capture.level: capture.level: must be in [0, 1], got 2.0" in str(err.value)
    with pytest.raises(PipelineConfigError, match=r"playback\.colour: unknown key \(known: block_ms"):
        parse_settings(load_pipeline_config(env={}, overrides=["playback.colour=1"]), "playback", PLAYBACK_SCHEMA)
    with pytest.raises(PipelineConfigError, match=r"playback\.target_ms: must be float, got True"):
        parse_settings(load_pipeline_config(env={}, overrides=["playback.target_ms=true"]), "playback",
                       PLAYBACK_SCHEMA)
