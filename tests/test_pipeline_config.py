"""Tests of the pipeline config (``common/config.py``, ``config/pipeline.toml``).

Real files are written into tmp_path and read back; the environment is passed in as a dict, or
set with monkeypatch where ``os.environ`` itself is read. Every rejected config must raise
:class:`PipelineConfigError` with a one-line message naming the layer that gave the bad value
(file path, ``env NAME`` or ``--set key``) and the dotted key.
"""
from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path

import pytest

from common.config import (
    DEFAULT_PIPELINE_CONFIG,
    SERVICES,
    TAPS,
    BusOptions,
    Endpoint,
    PipelineConfigError,
    SecurityOptions,
    add_config_arguments,
    config_from_args,
    load_pipeline_config,
)

DEFAULT_TEXT = DEFAULT_PIPELINE_CONFIG.read_text(encoding="utf-8")

DEFAULT_ENDPOINTS = {
    "audio_in": ("tcp://127.0.0.1:5550", "inference"),
    "audio_out": ("tcp://127.0.0.1:5551", "inference"),
    "control": ("tcp://127.0.0.1:5552", "inference"),
    "telemetry_capture": ("tcp://127.0.0.1:5560", "capture"),
    "telemetry_inference": ("tcp://127.0.0.1:5561", "inference"),
    "telemetry_playback": ("tcp://127.0.0.1:5562", "playback"),
    "telemetry_monitor": ("tcp://127.0.0.1:5563", "monitor"),
}


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # The developer's own LLVC_* variables must not leak into tests that read os.environ.
    for name in list(os.environ):
        if name.upper().startswith("LLVC_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "pipeline.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def edited(old: str, new: str) -> str:
    """The default file's text with one exact fragment replaced."""
    assert old in DEFAULT_TEXT, old
    return DEFAULT_TEXT.replace(old, new, 1)


def load(*overrides: str, env: dict | None = None, path: Path | None = None):
    return load_pipeline_config(path or DEFAULT_PIPELINE_CONFIG, env=env or {}, overrides=overrides)


def error_of(*overrides: str, env: dict | None = None, path: Path | None = None) -> str:
    with pytest.raises(PipelineConfigError) as info:
        load(*overrides, env=env, path=path)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    return msg


def assert_error(msg: str, source: str, key: str | None, *fragments: str) -> None:
    """``msg`` reads "<source>: <key>: ..." and contains every fragment."""
    prefix = f"{source}: {key}: " if key else f"{source}: "
    assert msg.startswith(prefix), (msg, prefix)
    for fragment in fragments:
        assert fragment in msg, (msg, fragment)


# ------------------------------------------------------------------------------- default file


def test_default_file_loads_with_the_documented_values():
    cfg = load_pipeline_config(env={})
    assert cfg.source == str(DEFAULT_PIPELINE_CONFIG)
    assert list(cfg.endpoints) == list(DEFAULT_ENDPOINTS)
    for name, (address, binder) in DEFAULT_ENDPOINTS.items():
        # No bind in the file: it defaults to the connect address.
        assert cfg.endpoint(name) == Endpoint(name=name, connect=address, bind=address, binder=binder)
        assert cfg.endpoint(name).is_tcp
    assert cfg.bus == BusOptions(
        send_hwm=8, recv_hwm=8, linger_ms=0, telemetry_linger_ms=250, heartbeat_ivl_ms=1000, heartbeat_timeout_ms=3000,
        reconnect_ivl_ms=100, reconnect_ivl_max_ms=250, max_samples=16000, telemetry_hwm=1000,
        heartbeat_interval_s=0.25, sound_frame_s=0.1,
    )
    assert isinstance(cfg.bus.heartbeat_interval_s, float)
    assert cfg.security == SecurityOptions(curve=False, keys_dir=Path.cwd() / "keys")
    assert set(cfg.services) == {"model", "control", "realtime", *SERVICES, *TAPS}
    assert [ep.name for ep in cfg.telemetry_endpoints()] == [
        "telemetry_capture", "telemetry_inference", "telemetry_playback", "telemetry_monitor"]


def test_the_default_file_declares_no_setting_values():
    # Defaults are declared once, in the code: the file shows them commented out
    # (tests/test_service_base.py holds each shown value to the code's, key for key).
    raw = tomllib.loads(DEFAULT_TEXT)
    assert set(raw) == {"endpoints", "bus", "security", "model", "control", "realtime", *SERVICES, *TAPS}
    assert all(raw[table] == {} for table in raw if table != "endpoints")


def test_missing_tables_take_defaults(tmp_path):
    text = "[endpoints]\n" + "\n".join(
        f'{name} = {{ connect = "{address}", binder = "{binder}" }}'
        for name, (address, binder) in DEFAULT_ENDPOINTS.items())
    cfg = load(path=write(tmp_path, text))
    assert cfg.bus == BusOptions()
    assert cfg.security.curve is False
    assert cfg.services == {name: {} for name in ("model", "control", "realtime", *SERVICES, *TAPS)}


def test_service_tables_are_kept_as_plain_dicts(tmp_path):
    path = write(tmp_path, edited("[inference]\n", '[inference]\nextra = "cuda"\nchunk = { factor = 2 }\n'))
    cfg = load("capture.other=hw:1", path=path)
    assert cfg.services["inference"]["extra"] == "cuda" and cfg.services["inference"]["chunk"] == {"factor": 2}
    assert cfg.services["capture"]["other"] == "hw:1"


# ----------------------------------------------------------------------- layers and precedence


def test_file_then_env_then_cli(tmp_path):
    path = write(tmp_path, edited("# send_hwm = 8 ", "send_hwm = 5 "))
    env = {"LLVC__BUS__SEND_HWM": "6"}
    assert load("bus.send_hwm=7", env=env, path=path).bus.send_hwm == 7
    assert load(env=env, path=path).bus.send_hwm == 6
    assert load(path=path).bus.send_hwm == 5


def test_later_set_wins_and_source_lists_the_layers(tmp_path):
    cfg = load("bus.recv_hwm=2", "bus.recv_hwm=3", env={"LLVC__BUS__LINGER_MS": "5"})
    assert (cfg.bus.recv_hwm, cfg.bus.linger_ms) == (3, 5)
    assert cfg.source == (f"{DEFAULT_PIPELINE_CONFIG} + env LLVC__BUS__LINGER_MS"
                          " + --set bus.recv_hwm + --set bus.recv_hwm")


def test_file_path_from_argument_then_env_then_default(tmp_path):
    from_env = write(tmp_path, edited("# send_hwm = 8 ", "send_hwm = 7 "), "env.toml")
    from_arg = write(tmp_path, edited("# send_hwm = 8 ", "send_hwm = 9 "), "arg.toml")
    env = {"LLVC_PIPELINE_CONFIG": str(from_env)}
    assert load_pipeline_config(from_arg, env=env).bus.send_hwm == 9
    assert load_pipeline_config(env=env).bus.send_hwm == 7
    assert load_pipeline_config(env={"LLVC_PIPELINE_CONFIG": ""}).bus.send_hwm == 8
    assert load_pipeline_config(env={}).source == str(DEFAULT_PIPELINE_CONFIG)


def test_env_names_are_case_insensitive():
    env = {"llvc__Bus__Send_Hwm": "9", "LLVC__ENDPOINTS__AUDIO_IN__BIND": "tcp://*:5550"}
    cfg = load(env=env)
    assert cfg.bus.send_hwm == 9
    assert cfg.endpoint("audio_in").bind == "tcp://*:5550"


def test_env_names_differing_only_in_case_are_refused():
    msg = error_of(env={"LLVC__BUS__SEND_HWM": "8", "llvc__bus__send_hwm": "9"})
    assert "bus.send_hwm: also set by env" in msg


def test_unrelated_env_is_ignored():
    cfg = load(env={"LLVC_OTHER": "x", "PATH": "/bin", "LLVC_PIPELINE_CONFIG_X": "y"})
    assert cfg.bus == BusOptions()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8", 8),
        ("-3", -3),
        ("true", True),
        ("false", False),
        ("1.5", 1.5),
        ('"x"', "x"),
        ('"8"', "8"),
        ("hw:1,0", "hw:1,0"),
        ("tcp://10.0.0.2:5550", "tcp://10.0.0.2:5550"),
        ("[1, 2]", [1, 2]),
        ("{ a = 1 }", {"a": 1}),
        ("", ""),
        ("1\nx = 2", "1\nx = 2"),  # not one TOML value: kept whole, no key smuggled in
    ],
)
def test_override_values_are_typed_as_toml(text, expected):
    # Service tables accept any key, so they show the parsed value as it is.
    via_cli = load(f"monitor.value={text}").services["monitor"]["value"]
    via_env = load(env={"LLVC__MONITOR__VALUE": text}).services["monitor"]["value"]
    assert via_cli == expected and type(via_cli) is type(expected)
    assert via_env == expected and type(via_env) is type(expected)


def test_override_can_replace_a_whole_endpoint_table():
    cfg = load('endpoints.audio_in={ connect = "ipc:///tmp/llvc-audio-in", binder = "inference" }')
    ep = cfg.endpoint("audio_in")
    assert (ep.connect, ep.bind, ep.binder) == ("ipc:///tmp/llvc-audio-in",) * 2 + ("inference",)
    assert not ep.is_tcp


def test_override_can_add_an_endpoint():
    cfg = load("endpoints.telemetry_tap.connect=tcp://127.0.0.1:5570", "endpoints.telemetry_tap.binder=monitor")
    assert cfg.endpoint("telemetry_tap") == Endpoint("telemetry_tap", "tcp://127.0.0.1:5570",
                                                     "tcp://127.0.0.1:5570", "monitor")
    assert cfg.telemetry_endpoints()[-1].name == "telemetry_tap"


def test_override_can_replace_a_top_level_table():
    cfg = load("bus={ send_hwm = 8 }", env={"LLVC__SECURITY": "{ curve = true }"})
    assert cfg.bus == BusOptions(send_hwm=8)
    assert cfg.security.curve is True


def test_env_table_comes_before_its_keys():
    env = {"LLVC__ENDPOINTS__AUDIO_IN__BIND": "tcp://*:5550",
           "LLVC__ENDPOINTS__AUDIO_IN": '{ connect = "tcp://10.0.0.2:5550", binder = "inference" }'}
    ep = load(env=env).endpoint("audio_in")
    assert (ep.connect, ep.bind) == ("tcp://10.0.0.2:5550", "tcp://*:5550")


# ------------------------------------------------------------------------------------- roles


def test_address_for_gives_bind_to_the_binder_and_connect_to_the_others():
    cfg = load("endpoints.audio_in.bind=tcp://127.0.0.1:5550")
    audio_in = cfg.endpoint("audio_in")
    assert audio_in.address_for("inference") == ("tcp://127.0.0.1:5550", True)
    assert audio_in.address_for("capture") == ("tcp://127.0.0.1:5550", False)
    tele = cfg.endpoint("telemetry_playback")
    assert tele.address_for("playback") == ("tcp://127.0.0.1:5562", True)
    for user in ("monitor", "capture", "tap"):
        assert tele.address_for(user) == ("tcp://127.0.0.1:5562", False)


def test_lan_example(tmp_path):
    path = write(tmp_path, edited(
        'audio_in            = { connect = "tcp://127.0.0.1:5550", binder = "inference" }',
        'audio_in = { connect = "tcp://10.0.0.2:5550", bind = "tcp://*:5550", binder = "inference" }'))
    ep = load(path=path).endpoint("audio_in")
    assert ep.address_for("inference") == ("tcp://*:5550", True)
    assert ep.address_for("capture") == ("tcp://10.0.0.2:5550", False)
    assert ep.is_tcp
    # The same through overrides, as a LAN deployment would set it per host.
    ep = load("endpoints.audio_in.connect=tcp://10.0.0.2:5550",
              env={"LLVC__ENDPOINTS__AUDIO_IN__BIND": "tcp://*:5550"}).endpoint("audio_in")
    assert (ep.bind, ep.connect) == ("tcp://*:5550", "tcp://10.0.0.2:5550")


def test_services_on_different_hosts_may_bind_the_same_port():
    cfg = load("endpoints.telemetry_capture.bind=tcp://*:5560",
               "endpoints.telemetry_capture.connect=tcp://10.0.0.3:5560",
               "endpoints.telemetry_playback.bind=tcp://*:5560",
               "endpoints.telemetry_playback.connect=tcp://10.0.0.4:5560")
    assert cfg.endpoint("telemetry_playback").bind == cfg.endpoint("telemetry_capture").bind


@pytest.mark.parametrize("address", [
    "tcp://[::1]:5550", "tcp://localhost:5550", "tcp://host-1.lan:65535", "ipc:///tmp/llvc-x",
    "ipc://@abstract", "ipc:///" + "a" * 99, "inproc://audio-in",
])
def test_good_addresses(address):
    assert load(f"endpoints.audio_in.connect={address}").endpoint("audio_in").connect == address


def test_audio_binder_may_be_either_end():
    assert load("endpoints.audio_in.binder=capture").endpoint("audio_in").address_for("capture")[1]


def test_curve_with_non_tcp_endpoints_is_fine():
    cfg = load("security.curve=true", "endpoints.audio_in.connect=ipc:///tmp/llvc-in",
               "endpoints.audio_out.connect=inproc://audio-out")
    assert cfg.security.curve is True
    assert [ep.is_tcp for ep in cfg.endpoints.values()] == [False, False, True, True, True, True, True]


def test_keys_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load().security.keys_dir == tmp_path / "keys"
    assert load("security.keys_dir=/etc/llvc/keys").security.keys_dir == Path("/etc/llvc/keys")
    assert load("security.keys_dir=~/k").security.keys_dir == Path.home() / "k"


def test_unknown_endpoint_lookup():
    with pytest.raises(PipelineConfigError) as info:
        load().endpoint("nope")
    assert str(info.value).startswith(f"{DEFAULT_PIPELINE_CONFIG}: endpoints.nope: no such endpoint")


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "override, key, fragments",
    [
        # unknown keys
        ("bus.foo=1", "bus.foo", ["unknown key", "send_hwm"]),
        ("security.foo=1", "security.foo", ["unknown key"]),
        ("endpoints.audio_in.port=1", "endpoints.audio_in.port", ["unknown key", "connect, bind, binder"]),
        ("sound.rate=1", "sound", ["unknown table"]),
        # types
        ("bus.send_hwm=true", "bus.send_hwm", ["must be an integer", "got a boolean true"]),
        ("bus.send_hwm=4.0", "bus.send_hwm", ["must be an integer", "a float"]),
        ('bus.send_hwm="4"', "bus.send_hwm", ["must be an integer", "a string"]),
        ("bus.heartbeat_interval_s=true", "bus.heartbeat_interval_s", ["must be a number", "boolean"]),
        ("bus.heartbeat_interval_s=fast", "bus.heartbeat_interval_s", ["must be a number", "string"]),
        ("security.curve=1", "security.curve", ["true or false", "an integer 1"]),
        ("security.curve=yes", "security.curve", ["true or false", "a string 'yes'"]),
        ("security.keys_dir=5", "security.keys_dir", ["must be a path", "an integer 5"]),
        ("security.keys_dir=", "security.keys_dir", ["empty string"]),
        ("endpoints.audio_in.connect=5550", "endpoints.audio_in.connect", ["must be a string", "integer"]),
        ("endpoints.audio_in.binder=1", "endpoints.audio_in.binder", ["must be a string"]),
        ("endpoints.audio_in=5", "endpoints.audio_in", ["must be a table"]),
        ("bus=5", "bus", ["must be a table"]),
        ("send_hwm=3", "send_hwm", ["unknown table"]),
        ("inference=5", "inference", ["must be a table"]),
        ("bus.send_hwm.x=1", "bus.send_hwm", ["must be an integer", "got a table"]),
        # ranges
        ("bus.send_hwm=0", "bus.send_hwm", ["must be positive", "unlimited"]),
        ("bus.recv_hwm=-1", "bus.recv_hwm", ["must be positive"]),
        ("bus.telemetry_hwm=0", "bus.telemetry_hwm", ["must be positive"]),
        ("bus.heartbeat_ivl_ms=0", "bus.heartbeat_ivl_ms", ["must be positive"]),
        ("bus.heartbeat_timeout_ms=-5", "bus.heartbeat_timeout_ms", ["must be positive"]),
        ("bus.reconnect_ivl_ms=0", "bus.reconnect_ivl_ms", ["must be positive"]),
        ("bus.max_samples=0", "bus.max_samples", ["must be positive"]),
        ("bus.heartbeat_interval_s=0", "bus.heartbeat_interval_s", ["must be positive"]),
        ("bus.heartbeat_interval_s=nan", "bus.heartbeat_interval_s", ["must be positive"]),
        ("bus.heartbeat_interval_s=inf", "bus.heartbeat_interval_s", ["must be positive"]),
        ("bus.linger_ms=-1", "bus.linger_ms", ["would block shutdown"]),
        ("bus.linger_ms=-5", "bus.linger_ms", ["0 or positive"]),
        ("bus.send_hwm=2147483648", "bus.send_hwm", ["C int"]),
        ("bus.heartbeat_timeout_ms=500", "bus.heartbeat_timeout_ms", ["below heartbeat_ivl_ms 1000"]),
        ("bus.reconnect_ivl_max_ms=50", "bus.reconnect_ivl_max_ms", ["below reconnect_ivl_ms 100"]),
        # addresses
        ("endpoints.audio_in.connect=tcp://*:5550", "endpoints.audio_in.connect", ["valid in bind only"]),
        ("endpoints.audio_in.connect=tcp://127.0.0.1", "endpoints.audio_in.connect", ["tcp://HOST:PORT"]),
        ("endpoints.audio_in.connect=tcp://:5550", "endpoints.audio_in.connect", ["tcp://HOST:PORT"]),
        ("endpoints.audio_in.connect=tcp://h:0", "endpoints.audio_in.connect", ["1 to 65535"]),
        ("endpoints.audio_in.connect=tcp://h:65536", "endpoints.audio_in.connect", ["1 to 65535"]),
        ("endpoints.audio_in.connect=tcp://h:http", "endpoints.audio_in.connect", ["1 to 65535"]),
        ("endpoints.audio_in.bind=tcp://*:*", "endpoints.audio_in.bind", ["1 to 65535"]),
        ("endpoints.audio_in.connect=tcp://::1:5550", "endpoints.audio_in.connect", ["brackets"]),
        ("endpoints.audio_in.connect=tcp://[zz]:5550", "endpoints.audio_in.connect", ["bracketed IPv6"]),
        ("endpoints.audio_in.connect=tcp://bad host:5550", "endpoints.audio_in.connect", ["host name"]),
        ("endpoints.audio_in.connect=tcp://-x:5550", "endpoints.audio_in.connect", ["host name"]),
        ("endpoints.audio_in.connect=tcp://999.1.1.1:5550", "endpoints.audio_in.connect", ["IPv4"]),
        ("endpoints.audio_in.connect=udp://h:5550", "endpoints.audio_in.connect", ["tcp://, ipc:// or inproc://"]),
        ("endpoints.audio_in.connect=localhost:5550", "endpoints.audio_in.connect", ["tcp://, ipc:// or inproc://"]),
        ("endpoints.audio_in.connect=ipc://", "endpoints.audio_in.connect", ["empty path"]),
        ("endpoints.audio_in.bind=ipc://*", "endpoints.audio_in.bind", ["random path"]),
        ("endpoints.audio_in.connect=ipc:///" + "a" * 100, "endpoints.audio_in.connect", ["101 bytes", "sun_path"]),
        ("endpoints.audio_in.connect=inproc://", "endpoints.audio_in.connect", ["empty name"]),
        ("endpoints.audio_in.bind=ipc:///tmp/x", "endpoints.audio_in.bind", ["same transport"]),
        # roles
        ("endpoints.audio_in.binder=nobody", "endpoints.audio_in.binder", ["not a service", "capture, inference"]),
        ("endpoints.audio_in.binder=playback", "endpoints.audio_in.binder", ["links capture and inference"]),
        ("endpoints.telemetry_capture.binder=inference", "endpoints.telemetry_capture.binder",
         ["capture must bind its own telemetry"]),
        ("endpoints.extra.connect=tcp://127.0.0.1:5599", "endpoints.extra.binder", ["missing"]),
        ("endpoints.extra.binder=capture", "endpoints.extra.connect", ["missing"]),
        ("endpoints.Extra.connect=tcp://127.0.0.1:5599", "endpoints.Extra", ["lower-case"]),
        ("endpoints.a__b.connect=tcp://127.0.0.1:5599", "endpoints.a__b", ["single '_'"]),
        # clashes
        ("endpoints.audio_out.bind=tcp://127.0.0.1:5550", "endpoints.audio_out.bind",
         ["clashes with endpoints.audio_in", "both bound by inference"]),
        ("endpoints.audio_out.bind=tcp://*:5550", "endpoints.audio_out.bind",
         ["clashes with endpoints.audio_in", "both bound by inference"]),
        # Reported on the overridden endpoint, though telemetry_monitor comes later in the file.
        ("endpoints.telemetry_capture.connect=tcp://127.0.0.1:5563", "endpoints.telemetry_capture.connect",
         ["clashes with endpoints.telemetry_monitor", "same connect address"]),
    ],
)
def test_bad_override_names_the_key_and_the_source(override, key, fragments):
    msg = error_of(override)
    cli_key = override.partition("=")[0]
    assert_error(msg, f"--set {cli_key}", key, *fragments)


def test_a_subkey_of_a_value_set_before():
    msg = error_of("bus.send_hwm=1", "bus.send_hwm.x=1")
    assert_error(msg, "--set bus.send_hwm.x", "bus.send_hwm.x", "bus.send_hwm is an integer, not a table")


def test_same_connect_address_with_different_binds():
    msg = error_of("endpoints.audio_out.bind=tcp://*:5551", "endpoints.audio_out.connect=tcp://127.0.0.1:5550")
    assert_error(msg, "--set endpoints.audio_out.connect", "endpoints.audio_out.connect",
                 "same address as endpoints.audio_in.connect")


def test_inproc_bind_must_equal_connect():
    msg = error_of("endpoints.audio_in.connect=inproc://a", "endpoints.audio_in.bind=inproc://b")
    assert_error(msg, "--set endpoints.audio_in.bind", "endpoints.audio_in.bind", "must equal connect")


def test_bad_env_value_names_the_variable():
    msg = error_of(env={"LLVC__BUS__SEND_HWM": "0"})
    assert_error(msg, "env LLVC__BUS__SEND_HWM", "bus.send_hwm", "must be positive")
    msg = error_of(env={"llvc__endpoints__audio_in__connect": "tcp://*:1"})
    assert_error(msg, "env llvc__endpoints__audio_in__connect", "endpoints.audio_in.connect", "bind only")


def test_cli_fixes_a_bad_env_value():
    assert load("bus.send_hwm=3", env={"LLVC__BUS__SEND_HWM": "0"}).bus.send_hwm == 3


@pytest.mark.parametrize("name", ["LLVC__", "LLVC__BUS____X", "LLVC____SEND_HWM", "LLVC__BUS__"])
def test_unusable_env_names(name):
    msg = error_of(env={name: "1"})
    assert_error(msg, f"env {name}", None, "cannot tell which key")


@pytest.mark.parametrize("item, fragment", [
    ("bus.send_hwm", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    (".send_hwm=3", "cannot tell which key"),
    ("bus..x=3", "cannot tell which key"),
])
def test_unusable_set_items(item, fragment):
    msg = error_of(item)
    assert msg.startswith("--set ") and fragment in msg, msg


# The file layer: its path is the source.


@pytest.mark.parametrize(
    "old, new, key, fragments",
    [
        ("[capture]\n", "[capture]\n[sound]\nrate = 1\n", "sound", ["unknown table"]),
        ("# send_hwm = 8 ", "send_hwm = true ", "bus.send_hwm", ["must be an integer"]),
        ("# linger_ms = 0 ", "linger_ms = -1 ", "bus.linger_ms", ["would block shutdown"]),
        ("# heartbeat_timeout_ms = 3000", "heartbeat_timeout_ms = 999", "bus.heartbeat_timeout_ms",
         ["below heartbeat_ivl_ms"]),
        ("# curve = false", 'curve = "false"', "security.curve", ["true or false"]),
        ('binder = "capture" }', 'binder = "capture", bind = "tcp://127.0.0.1:5561" }',
         "endpoints.telemetry_capture.bind", ["clashes with endpoints.telemetry_inference", "the same address"]),
        ('audio_out           = { connect = "tcp://127.0.0.1:5551", binder = "inference" }', "",
         "endpoints.audio_out", ["missing", "required"]),
        ('telemetry_monitor   = { connect = "tcp://127.0.0.1:5563", binder = "monitor" }',
         'telemetry_monitor = "tcp://127.0.0.1:5563"', "endpoints.telemetry_monitor", ["must be a table"]),
        ("# keys_dir = \"keys\"", "keys_dir = \"keys\"\n\"a\\nb\" = 1", "security.a\\nb", ["unknown key"]),
    ],
)
def test_bad_file_names_the_path_and_key(tmp_path, old, new, key, fragments):
    path = write(tmp_path, edited(old, new))
    assert_error(error_of(path=path), str(path), key, *fragments)


def test_service_entry_that_is_not_a_table(tmp_path):
    path = write(tmp_path, "inference = 3\n" + DEFAULT_TEXT.replace("[inference]\n", ""))
    assert_error(error_of(path=path), str(path), "inference", "must be a table, got an integer")


def test_missing_endpoints_table(tmp_path):
    path = write(tmp_path, "[bus]\nsend_hwm = 4\n")
    assert_error(error_of(path=path), str(path), "endpoints", "missing table", "audio_in")


def test_toml_syntax_error_gives_line_and_column(tmp_path):
    path = write(tmp_path, edited("# send_hwm = 8 ", "send_hwm 8 "))
    line = DEFAULT_TEXT.splitlines().index(
        next(ln for ln in DEFAULT_TEXT.splitlines() if ln.startswith("# send_hwm"))) + 1
    msg = error_of(path=path)
    assert_error(msg, str(path), None, "not valid TOML", f"line {line}, column")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[bus]\nsend_hwm = 4 # \xff\n")
    assert_error(error_of(path=path), str(path), None, "not UTF-8")


def test_missing_file_and_folder(tmp_path):
    assert_error(error_of(path=tmp_path / "nope.toml"), str(tmp_path / "nope.toml"), None, "no such config file")
    assert_error(error_of(path=tmp_path), str(tmp_path), None, "is a folder")


def test_missing_file_named_by_env_says_so(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(PipelineConfigError) as info:
        load_pipeline_config(env={"LLVC_PIPELINE_CONFIG": str(missing)})
    assert str(info.value) == f"{missing}: no such config file (from env LLVC_PIPELINE_CONFIG)"


def test_error_is_a_value_error():
    assert issubclass(PipelineConfigError, ValueError)


# ------------------------------------------------------------------------------------ argparse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svc")
    add_config_arguments(p)
    return p


def test_config_from_args_layers_file_env_and_set(tmp_path, monkeypatch):
    path = write(tmp_path, edited("# send_hwm = 8 ", "send_hwm = 5 "))
    monkeypatch.setenv("LLVC__BUS__SEND_HWM", "6")
    monkeypatch.setenv("LLVC__BUS__LINGER_MS", "10")
    args = parser().parse_args(["--pipeline-config", str(path), "--set", "bus.send_hwm=7",
                                "--set", "security.curve=true"])
    cfg = config_from_args(args)
    assert (cfg.bus.send_hwm, cfg.bus.linger_ms, cfg.security.curve) == (7, 10, True)
    assert cfg.source.startswith(str(path))


def test_config_from_args_defaults(tmp_path, monkeypatch):
    p = parser()
    args = p.parse_args([])
    assert args.pipeline_config is None and args.set is None
    assert config_from_args(args).source == str(DEFAULT_PIPELINE_CONFIG)
    # The file named by the environment, when no flag names one.
    path = write(tmp_path, edited("# recv_hwm = 8", "recv_hwm = 2"))
    monkeypatch.setenv("LLVC_PIPELINE_CONFIG", str(path))
    assert config_from_args(p.parse_args([])).bus.recv_hwm == 2
    # Parsing twice must not share the --set list.
    p.parse_args(["--set", "bus.send_hwm=3"])
    assert p.parse_args([]).set is None


def test_config_from_args_error_is_one_line(monkeypatch):
    monkeypatch.setenv("LLVC__SECURITY__CURVE", "maybe")
    with pytest.raises(PipelineConfigError) as info:
        config_from_args(parser().parse_args([]))
    assert str(info.value) == ("env LLVC__SECURITY__CURVE: security.curve: must be true or false, "
                               "got a string 'maybe'")


def test_readme_lan_example_is_a_valid_config(tmp_path):
    """The README's two-host example must keep loading as the config evolves."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("[endpoints]\naudio_in            = { connect = \"tcp://10.0.0.2")
    (tmp_path / "lan.toml").write_text(readme[start:readme.index("```", start)])
    cfg = load_pipeline_config(tmp_path / "lan.toml", env={})
    assert cfg.security.curve
    assert cfg.endpoint("audio_in").address_for("inference") == ("tcp://*:5550", True)
    assert cfg.endpoint("audio_in").address_for("capture") == ("tcp://10.0.0.2:5550", False)


@pytest.mark.parametrize("name", ["lan-gpu-host.toml", "lan-capture-host.toml"])
def test_lan_example_configs_load_with_curve_on(name):
    cfg = load_pipeline_config(Path(__file__).resolve().parent.parent / "config" / name, env={})
    assert cfg.security.curve
    assert cfg.endpoint("audio_in").address_for("inference") == ("tcp://*:5550", True)
    assert cfg.endpoint("audio_in").address_for("capture") == ("tcp://10.0.0.2:5550", False)
