"""Settings tables (common/settings.py) and what services/base.py gives every service.

Settings: validation names the key and where the value came from; every key of
``config/pipeline.toml`` is a key of the code's schema and the other way round, with the value
the file shows equal to the code's default (declared once, in the code). Service base: rate-limited
reports, mirrored counters, reject watching, and the exit record ``llvc run`` reads.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest

from common.config import (
    _TABLES,
    DEFAULT_PIPELINE_CONFIG,
    BusOptions,
    PipelineConfigError,
    SecurityOptions,
    load_pipeline_config,
)
from common.settings import fields_of
from common.telemetry import Reject
from services.base import (
    SETUP_FAILED,
    ModelSettings,
    RateLimited,
    RealtimeSettings,
    Service,
    read_exit_record,
    run_service,
)
from services.capture import CaptureSettings
from services.controls import LiveSettings
from services.dashboard import DashboardSettings
from services.inference import InferenceSettings
from services.monitor import MonitorSettings
from services.playback import PlaybackSettings

#: Every settings table of the pipeline config and the class that declares it.
TABLES = {"bus": BusOptions, "security": SecurityOptions, "model": ModelSettings, "capture": CaptureSettings,
          "inference": InferenceSettings, "playback": PlaybackSettings, "monitor": MonitorSettings,
          "dashboard": DashboardSettings, "control": LiveSettings, "realtime": RealtimeSettings}


def documented_defaults() -> dict[str, dict[str, object]]:
    """``{table: {key: value}}`` for every ``# key = value`` line of the default file."""
    out: dict[str, dict[str, object]] = {}
    table = None
    for line in DEFAULT_PIPELINE_CONFIG.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"\[(\w+)\]", line):
            table = m.group(1)
            out[table] = {}
        elif table and (m := re.match(r"# (\w+) = (.+?)(?:\s{2,}#.*)?$", line)):
            out[table][m.group(1)] = tomllib.loads(f"v = {m.group(2)}")["v"]
    return out


def test_every_table_of_the_config_is_declared_by_a_settings_class():
    assert set(TABLES) | {"endpoints"} == set(_TABLES)


def test_the_default_file_shows_every_key_with_the_codes_default_and_nothing_else():
    shown = documented_defaults()
    for table, cls in TABLES.items():
        code = {name: default for name, _, default, _ in fields_of(cls)}
        assert set(shown[table]) == set(code), table  # both ways: no key missing, none extra
        for key, value in shown[table].items():
            want = code[key]
            want = str(want) if isinstance(want, type(DEFAULT_PIPELINE_CONFIG)) else want
            assert value == want and type(value) is type(want), f"{table}.{key}: file {value!r}, code {want!r}"
    # ... and what the file says is what a config built from it holds.
    cfg = load_pipeline_config(env={})
    for table, cls in TABLES.items():
        if table not in ("bus", "security"):
            assert cfg.settings(table, cls) == cls(), table


def test_values_layer_and_ints_become_floats():
    cfg = load_pipeline_config(env={}, overrides=["playback.target_ms=3"])
    s = cfg.settings("playback", PlaybackSettings, {"sink": "file:/tmp/x.wav"})
    assert (s.sink, s.target_ms) == ("file:/tmp/x.wav", 3.0) and type(s.target_ms) is float


def test_errors_name_key_and_source():
    cfg = load_pipeline_config(env={}, overrides=["capture.level=2"])
    with pytest.raises(PipelineConfigError) as err:
        cfg.settings("playback", PlaybackSettings, {"target_ms": -1.0})
    assert str(err.value) == "command line: playback.target_ms: must be >= 0, got a float -1.0"
    with pytest.raises(PipelineConfigError) as err:
        cfg.settings("capture", CaptureSettings)
    assert str(err.value) == "--set capture.level: capture.level: must be in [0, 1], got a float 2.0"
    with pytest.raises(PipelineConfigError, match=r"--set playback.colour: playback\.colour: unknown key "
                                                  r"\(known: adapt_coverage, adapt_window_s"):
        load_pipeline_config(env={}, overrides=["playback.colour=1"]).settings("playback", PlaybackSettings)
    with pytest.raises(PipelineConfigError, match=r"env LLVC__PLAYBACK__TARGET_MS: playback\.target_ms: must be a "
                                                  r"number, got a boolean true"):
        load_pipeline_config(env={"LLVC__PLAYBACK__TARGET_MS": "true"}).settings("playback", PlaybackSettings)


def test_checks_across_keys_name_the_key():
    cfg = load_pipeline_config(env={}, overrides=["playback.max_ms=5"])
    with pytest.raises(PipelineConfigError, match=r"--set playback.max_ms: playback\.max_ms: must be above "
                                                  r"target_ms \(6\), got 5"):
        cfg.settings("playback", PlaybackSettings)


def test_device_latency_is_one_rule_for_capture_and_playback():
    for table, cls in (("capture", CaptureSettings), ("playback", PlaybackSettings)):
        for good in ('"low"', '"high"', "0.02", "1"):
            assert cfg_with(f"{table}.device_latency={good}").settings(table, cls)
        for bad, why in (('"soon"', 'must be "low", "high" or seconds'), ("0", "must be in (0, 10) seconds"),
                         ("12", "must be in (0, 10) seconds"), ("true", "must be a string or a number")):
            with pytest.raises(PipelineConfigError) as err:
                cfg_with(f"{table}.device_latency={bad}").settings(table, cls)
            assert f"{table}.device_latency: {why}" in str(err.value), str(err.value)


def cfg_with(*overrides: str):
    return load_pipeline_config(env={}, overrides=list(overrides))


# ------------------------------------------------------------------------------ service base
def test_rate_limited_reports_sum_counts_and_keep_the_latest_fields():
    r = RateLimited(interval_s=0.5)
    assert r.take(0.0) is None  # nothing happened
    r.add({"n": 1}, {"where": "a"})
    assert r.take(0.0) == ({"n": 1, "where": "a"}, 1)  # the first at once
    r.add({"n": 2}, {"where": "b"})
    r.add({"n": 3}, {"where": "c"})
    assert r.take(0.4) is None  # not due yet: held, not lost
    assert r.take(0.5) == ({"n": 5, "where": "c"}, 2)
    assert r.take(5.0) is None


class _Receiver:
    rejected, last_reject = 0, None


class _Recorder(Service):
    name = "capture"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.published, self.lines = [], []

    def publish(self, record):
        self.published.append(record)

    def log(self, level, message, **fields):
        self.lines.append((level, message, fields))


def test_rejects_are_mirrored_and_reported_at_most_twice_a_second():
    svc, rx = _Recorder(cfg_with()), _Receiver()
    svc.watch_rejects(rx)
    svc.mirror(lambda: {"other": 7})
    rx.rejected, rx.last_reject = 3, "audio.seq: expected an int"
    svc.flush_reports(100.0)
    assert svc.published == [Reject(3, 3, "audio.seq: expected an int")]
    rx.rejected = 5
    svc.flush_reports(100.1)  # within the interval: held
    assert len(svc.published) == 1 and svc.refresh_counters() == {"rejected": 5, "other": 7}
    svc.flush_reports(100.6)
    assert svc.published[-1] == Reject(2, 5, "audio.seq: expected an int")
    assert [line[1] for line in svc.lines] == ["rejected malformed input"] * 2


class _FailsSetup(Service):
    name = "capture"

    def setup(self):
        raise PipelineConfigError("somewhere: capture.source: must be tone, ...")


def test_a_failed_setup_exits_2_and_leaves_its_exit_record(tmp_path, monkeypatch):
    monkeypatch.setenv("LLVC_RUN_DIR", str(tmp_path))
    assert run_service(_FailsSetup(cfg_with())) == SETUP_FAILED
    record = read_exit_record(tmp_path, "capture")
    assert record["status"] == SETUP_FAILED and record["error"] == "somewhere: capture.source: must be tone, ..."
    assert read_exit_record(tmp_path, "playback") is None


def test_settings_classes_are_frozen_dataclasses():
    for cls in TABLES.values():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
