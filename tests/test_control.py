"""The control plane's parts, each on its own: the protocol, who may change what, the live
settings' checks, the voice folder, and the audio path's exactness (bypass, gains, neutral)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from common.control import (
    CONTROL_VERSION,
    ControlError,
    ControlReply,
    ControlRequest,
    ControlServer,
    decode_reply,
    decode_request,
)
from common.settings import SettingsError
from services.controls import FADE_MS, Access, AudioPath, LiveSettings, changed, parse_value
from services.voices import list_voices, resolve_voice

LLVC = Path(sys.executable).parent / "llvc"
SR = 16000
FADE = round(FADE_MS * SR / 1000)
C, H = 208, 16


# --------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("req", [
    ControlRequest("status"), ControlRequest("voices"),
    ControlRequest("set", {"input_gain_db": -6.0, "gate": True, "bypass": "on"}),
    ControlRequest("voice", checkpoint="models/demo_voice.pth"),
    ControlRequest("voice", checkpoint="v.pth", config="v.json"),
])
def test_requests_round_trip(req):
    assert decode_request(req.encode()) == req


def test_replies_round_trip():
    rep = ControlReply(False, "input_gain_db: must be in [-40, 40], got a float 99.0", {"controls": {"bypass": True}})
    assert decode_reply(rep.encode()) == rep


def _packed(m) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


V = list(CONTROL_VERSION)


@pytest.mark.parametrize("data, words", [
    (b"\xc1garbage", ["not msgpack"]),
    (_packed([1, 2]), ["expected a map"]),
    (_packed({"cmd": "status"}), ["request.v"]),
    (_packed({"v": [9, 0], "cmd": "status"}), ["version 9.0"]),
    (_packed({"v": V, "cmd": "reboot"}), ["request.cmd", "reboot", "one of"]),
    (_packed({"v": V, "cmd": "set"}), ["request.values"]),
    (_packed({"v": V, "cmd": "set", "values": {}}), ["request.values", "non-empty"]),
    (_packed({"v": V, "cmd": "set", "values": {"a": [1]}}), ["request.values.a"]),
    (_packed({"v": V, "cmd": "set", "values": {str(i): 1 for i in range(40)}}), ["at most"]),
    (_packed({"v": V, "cmd": "voice"}), ["request.checkpoint"]),
    (_packed({"v": V, "cmd": "voice", "checkpoint": ""}), ["request.checkpoint"]),
    (b"\x00" * 70000, ["bytes"]),
])
def test_unusable_requests_are_one_line_errors(data, words):
    with pytest.raises(ControlError) as info:
        decode_request(data)
    text = str(info.value)
    assert "\n" not in text and all(w in text for w in words), text


def test_a_server_answers_garbage_and_keeps_serving():
    ctx = zmq.Context.instance()
    rep, req = ctx.socket(zmq.REP), ctx.socket(zmq.REQ)
    try:
        rep.bind("inproc://control-test")
        req.connect("inproc://control-test")
        server = ControlServer(rep)
        for data in (b"junk", ControlRequest("status").encode()):
            req.send(data)
            assert rep.poll(2000)
            incoming = server.poll()
            assert incoming.peer_key is None
            server.reply(ControlReply(incoming.request is not None, incoming.error))
            reply = decode_reply(req.recv())
            assert reply.ok == (data != b"junk")
        assert (server.received, server.rejected) == (2, 1)
    finally:
        rep.close(0)
        req.close(0)


# --------------------------------------------------------------------------- the settings
def test_changes_are_checked_all_or_nothing():
    cur = LiveSettings()
    new, diff = changed(cur, {"input_gain_db": -6, "gate": "on", "bypass": False})
    assert diff == {"input_gain_db": -6.0, "gate": True} and new.input_gain_db == -6.0 and new.gate
    for values, words in [({"input_gain_db": "loud"}, ["input_gain_db", "number"]),
                          ({"input_gain_db": 99}, ["input_gain_db", "[-40, 40]"]),
                          ({"gate": 1}, ["gate", "true or false"]),
                          ({"volume": 3}, ["volume", "unknown key"]),
                          ({"output_gain_db": 3.0, "gate_threshold_db": 5}, ["gate_threshold_db", "[-100, 0]"]),
                          ({"agc_target_dbfs": math.nan}, ["agc_target_dbfs"])]:
        with pytest.raises(SettingsError) as info:
            changed(cur, values)
        assert all(w in str(info.value) for w in words), str(info.value)


def test_command_line_values():
    assert [parse_value(t) for t in ("on", "OFF", "true", "3", "-6.5", "x")] == [True, False, True, 3, -6.5, "x"]


def test_defaults_are_neutral_and_agc_aims_at_the_training_level():
    s = LiveSettings()
    assert not (s.bypass or s.gate or s.agc) and s.input_gain_db == s.output_gain_db == 0.0
    assert s.agc_target_dbfs == pytest.approx(20 * math.log10(0.06), abs=0.05)


# --------------------------------------------------------------------------- who may change
def test_access_rules():
    names = {"KEYCLIENT": "client", "KEYDASH": "dashboard"}
    local = Access(local=True, curve=False, names={}, controllers=("client",))
    assert local.refusal(None) is None and local.who(None) == "local"
    lan_plain = Access(local=False, curve=False, names={}, controllers=("client",))
    assert "curve" in lan_plain.refusal(None)
    curve = Access(local=False, curve=True, names=names, controllers=("client",))
    assert curve.refusal("KEYCLIENT") is None and curve.who("KEYCLIENT") == "client"
    assert "dashboard may read status only" in curve.refusal("KEYDASH")
    assert "read status only" in curve.refusal("UNKNOWNKEY123")
    nobody = Access(local=False, curve=True, names=names, controllers=())
    assert "none" in nobody.refusal("KEYCLIENT")


# --------------------------------------------------------------------------- the voice folder
def test_voice_folder(tmp_path):
    (tmp_path / "b.pth").write_bytes(b"x")
    (tmp_path / "a.pth").write_bytes(b"x")
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("")
    assert [v["name"] for v in list_voices(tmp_path)] == ["a", "b", "demo_voice"]  # the embedded one too
    assert resolve_voice(tmp_path, "demo_voice", local=False).name == "demo_voice.pth"
    assert resolve_voice(tmp_path, "a", local=False) == tmp_path / "a.pth"
    assert resolve_voice(tmp_path, "b.pth", local=False) == tmp_path / "b.pth"
    assert resolve_voice(tmp_path, str(tmp_path / "a.pth"), local=False) == tmp_path / "a.pth"
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    (elsewhere / "c.pth").write_bytes(b"x")
    assert resolve_voice(tmp_path, str(elsewhere / "c.pth"), local=True) == elsewhere / "c.pth"
    with pytest.raises(ValueError, match="remote controller may pick only"):
        resolve_voice(tmp_path, str(elsewhere / "c.pth"), local=False)
    with pytest.raises(ValueError, match="no such checkpoint.*a, b, demo_voice"):
        resolve_voice(tmp_path, "zzz", local=True)
    assert [v["name"] for v in list_voices(tmp_path / "missing")] == ["demo_voice"]


def test_a_checkpoint_is_read_with_the_config_beside_it(tmp_path):
    from models.config import DEFAULT_CONFIG_PATH, DEMO_CHECKPOINT, DEMO_CONFIG, resolve_model_files

    (tmp_path / "v.pth").write_bytes(b"x")
    assert resolve_model_files(tmp_path / "v.pth", None).config == DEFAULT_CONFIG_PATH
    (tmp_path / "v.json").write_text("{}")
    assert resolve_model_files(tmp_path / "v.pth", None).config == tmp_path / "v.json"
    assert resolve_model_files(tmp_path / "v.pth", "other.json").config == Path("other.json")
    assert resolve_model_files(DEMO_CHECKPOINT, None).config == DEMO_CONFIG


# --------------------------------------------------------------------------- the audio path
def _chunks(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(C) * 0.1).astype(np.float32) for _ in range(n)]


def test_at_neutral_the_path_hands_the_model_output_on_untouched():
    path = AudioPath(LiveSettings(), SR)
    for x, y in zip(_chunks(20), _chunks(20, 1)):
        assert path.shape_input(x) is x
        assert path.finish(y, x) is y


def test_bypass_is_the_input_exactly_after_a_crossfade_of_at_most_5_ms_both_ways():
    path = AudioPath(LiveSettings(), SR)
    raw, model = np.concatenate(_chunks(12)), np.concatenate(_chunks(12, 1))
    out = []
    for k in range(12):
        if k == 3:
            path.configure(changed(path.settings, {"bypass": True})[0])
        if k == 8:
            path.configure(changed(path.settings, {"bypass": False})[0])
        out.append(path.finish(model[k * C:(k + 1) * C], raw[k * C:(k + 1) * C]))
    y = np.concatenate(out)
    on, off = 3 * C, 8 * C
    assert FADE <= 80
    assert np.array_equal(y[:on], model[:on])
    assert np.array_equal(y[on + FADE:off], raw[on + FADE:off])        # bypass: the input itself
    assert np.array_equal(y[off + FADE:], model[off + FADE:])
    for start, a, b in ((on, model, raw), (off, raw, model)):          # the fades: a convex mix, no jump
        seg = slice(start, start + FADE)
        lo, hi = np.minimum(a[seg], b[seg]), np.maximum(a[seg], b[seg])
        assert np.all(y[seg] >= lo - 1e-7) and np.all(y[seg] <= hi + 1e-7)
        w = (y[seg] - a[seg]) / np.where(np.abs(b[seg] - a[seg]) > 1e-3, b[seg] - a[seg], np.nan)
        w = w[np.isfinite(w)]
        assert np.all(np.diff(w) > -1e-4) and w[0] < 0.1 and w[-1] > 0.9


def test_output_gain_of_6_db_doubles_the_output_and_input_gain_scales_what_the_model_gets():
    path = AudioPath(LiveSettings(), SR)
    six = 20 * math.log10(2)
    path.configure(changed(path.settings, {"output_gain_db": six, "input_gain_db": -six})[0])
    xs, ys = _chunks(6), _chunks(6, 1)
    outs = [(path.shape_input(x), path.finish(y, x)) for x, y in zip(xs, ys)]
    # After the 5 ms ramp (first chunk), exact within 1e-5 (relative to full scale).
    for (shaped, out), x, y in list(zip(outs, xs, ys))[1:]:
        assert np.abs(out - 2 * y).max() < 1e-5
        assert np.abs(shaped - x / 2).max() < 1e-5
    first = outs[0][1]
    assert np.abs(first[FADE:] - 2 * ys[0][FADE:]).max() < 1e-5  # the ramp is within the first 5 ms


def test_ctl_without_a_pipeline_is_one_line_and_a_bad_request_changes_nothing(tmp_path):
    from services.lab.endpoints import private_sets

    sets = [a for s in private_sets() for a in ("--set", s)]
    for args, code, words in [(["status", "--timeout", "0.3"], 2, ["cannot reach"]),
                              (["set"], 2, ["KEY=VALUE"]),
                              (["set", "gain"], 2, ["expected KEY=VALUE"]),
                              (["bypass", "maybe"], 2, ["on or off"]),
                              (["set", "input_gain_db=" + "9" * 40], 2, ["cannot be encoded"]),
                              (["voice"], 2, ["-p CHECKPOINT"])]:
        proc = subprocess.run([str(LLVC), "ctl", *args, *sets], capture_output=True, text=True, timeout=60)
        assert proc.returncode == code and proc.stdout == "", proc
        assert len(proc.stderr.strip().splitlines()) == 1 and all(w in proc.stderr for w in words), proc.stderr


def test_ctl_voice_asks_again_when_a_status_poll_goes_unanswered_during_the_load():
    """While a voice loads, inference may not answer a status poll in time (a loaded machine):
    the switch was accepted, so ``llvc ctl voice`` asks again until ``--wait`` is up. A stand-in
    server on the real socket: it accepts the switch, lets the first poll go unanswered, then
    reports the voice swapped in."""
    import threading

    from common.config import load_pipeline_config
    from services.lab.endpoints import private_sets

    sets = private_sets()
    address = load_pipeline_config(env={}, overrides=sets).endpoint("control").connect
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.bind(address)
    polls: list[str] = []

    def serve():
        while server.poll(20_000):
            *envelope, body = server.recv_multipart()
            req = decode_request(body)
            if req.cmd == "voice":
                reply = ControlReply(True, state={"loading": req.checkpoint, "last_switch": None})
            else:
                polls.append("unanswered" if not polls else "answered")
                if polls[-1] == "unanswered":
                    continue
                reply = ControlReply(True, state={"loading": None, "last_switch": {
                    "voice": "v.pth", "ok": True, "model": "llvc-v-1234", "load_ms": 1500.0}})
                server.send_multipart([*envelope, reply.encode()])
                return
            server.send_multipart([*envelope, reply.encode()])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        proc = subprocess.run([str(LLVC), "ctl", "voice", "-p", "v.pth", "--timeout", "0.5", "--wait", "20",
                               *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=60)
    finally:
        t.join(timeout=25)
        server.close(0)
        ctx.term()
    print(proc.stdout, proc.stderr, polls)
    assert proc.returncode == 0 and "switched to v.pth" in proc.stdout, proc
    assert polls == ["unanswered", "answered"]
