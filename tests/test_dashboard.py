"""The dashboard's parts: where the latency goes, the state document and its updates, level
frames, auth; and the real ``llvc dashboard`` process behind a non-loopback bind (401 without its
token). The page in a real browser over a real pipeline: tests/test_dashboard_browser.py."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from common import telemetry as T
from common.levels import BANDS, FLOOR_DB, LevelMeter, band_centres_hz, measure
from common.protocol import StageRecord, make_telemetry
from common.tap import topics_for
from services.dashboard import DashboardSettings, dashboard_url, is_loopback, parse_bind
from services.dashboard.server import Hub, authorized
from services.dashboard.state import PARTS, DashboardState, breakdown
from services.lab.endpoints import endpoint_overrides, free_port

LLVC = Path(sys.executable).parent / "llvc"
MS = 1_000_000


def origin(service: str, host: str = "h", pid: int = 1, wall: float = 1000.0) -> T.Origin:
    """Who published, and when by its wall clock (what the page's points are stamped with)."""
    return T.Origin(service, host, pid, 0, int(wall * 1e9))


def chunk_records(seq: int, t_capture: int, inf_host: str = "h", fill_ms: float = 14.0, wall: float = 1000.0):
    """A played chunk's header and timing, with known parts: capture→inference 0.9, queue 0.2,
    compute 1.3, inference→playback 0.4, wait 5.0, device 2.5 (ms)."""
    recv = t_capture + int((fill_ms + 0.9) * MS)
    proc = int(1.3 * MS)
    send = recv + int(0.2 * MS) + proc
    arrival = send + int(0.4 * MS)
    stage = StageRecord("inference", inf_host, recv, send, proc, "m")
    header = T.AudioHeader("s", seq, t_capture, 0, 16000, 208, "f32le", seq * 208, None, [stage], arrival,
                           origin=origin("playback", wall=wall))
    e2e = (arrival - t_capture) / MS + 5.0 + 2.5
    played = T.PlaybackChunk("s", seq, seq * 208, round(e2e, 3), 6.0, 5.0, 2.5, origin=origin("playback", wall=wall))
    return header, played


def test_the_parts_of_e2e_add_up_and_each_is_where_it_happened():
    header, played = chunk_records(3, 10**12)
    parts = breakdown(header, played, 14.0, same_clock=True)
    assert [round(p, 6) for p in parts] == [14.0, 0.9, 0.2, 1.3, 0.4, 5.0, 2.5]
    assert sum(parts) == pytest.approx(played.e2e_ms, abs=1e-3)
    # Inference on another host: its clock means nothing here, only its durations; the two
    # transits are what is left of e2e, halved.
    split = breakdown(header, played, 14.0, same_clock=False)
    assert split[2:4] == parts[2:4] and split[5:] == parts[5:]
    assert split[1] == split[4] == pytest.approx((0.9 + 0.4) / 2, abs=1e-3)
    assert sum(split) == pytest.approx(played.e2e_ms, abs=1e-3)
    # A chunk without an inference stage, or a playback that did not say, has no breakdown.
    bare = T.AudioHeader("s", 3, 0, 0, 16000, 208, "f32le", 0, None, [], 5)
    assert breakdown(bare, played, 14.0, True) is None
    assert breakdown(header, T.PlaybackChunk("s", 3, 0, 20.0, 6.0), 14.0, True) is None


def inference_beat(latency_ms: float = 14.0) -> T.Heartbeat:
    status = T.InferenceStatus("onnx", "model-x", False, "llvc", "cpu", 1, "s", 208, 13.0, 15.0, latency_ms, 1)
    return T.Heartbeat(True, 1.0, {"resets": 0}, status, origin=origin("inference"))


def test_updates_carry_what_is_new_and_the_document_everything():
    st = DashboardState(10.0, 3, 0.25, history_s=60)
    st.add(inference_beat(), 0.0, 1000.0)
    for seq in range(5):
        header, played = chunk_records(seq, 10**12 + seq * 13 * MS, wall=1000.1 + seq * 0.013)
        st.add(header, 0.1 + seq * 0.013, 1000.1 + seq * 0.013)
        st.add(played, 0.1 + seq * 0.013, 1000.1 + seq * 0.013)
    st.add(T.Reset("s", "gap", 416, origin=origin("inference", wall=1000.2)), 0.2, 1000.2)
    first, full = st.update(0.25, 1000.25, full=True)
    assert first["n"] == full["n"] == 1
    assert len(first["latency"]["chunks"]) == len(full["latency"]["chunks"]) == 5
    assert len(first["breakdown"]["chunks"]) == 5 and full["breakdown"]["clock"] == "shared"
    assert all(abs(sum(c[2:]) - c[1]) < 0.01 for c in full["breakdown"]["chunks"])
    assert [p["key"] for p in full["breakdown"]["parts"]] == [k for k, _ in PARTS]
    assert full["latency"]["floor_ms"] == 14.0 and full["health"]["model"]["chunk_factor"] == 1
    assert full["losses"]["resets"] == {"gap": 1}
    assert first["events"][0]["event"] == "reset" and "reason=gap" in first["events"][0]["text"]
    header, played = chunk_records(5, 10**12 + 5 * 13 * MS, wall=1000.4)
    st.add(header, 0.4, 1000.4)
    st.add(played, 0.4, 1000.4)
    second, _ = st.update(0.45, 1000.45)
    assert second["n"] == 2
    assert len(second["latency"]["chunks"]) == 1 and len(second["breakdown"]["chunks"]) == 1
    assert second["events"] == []  # nothing new
    _, whole = st.update(0.65, 1000.65, full=True)
    assert len(whole["latency"]["chunks"]) == 6 and len(whole["events"]) == 1
    # Points older than history_s leave the document.
    _, later = st.update(61.0, 1061.0, full=True)
    assert later["latency"]["chunks"] == [] and later["breakdown"]["chunks"] == []
    json.dumps(later, allow_nan=False)  # JSON as it is: no NaN or infinity anywhere


def test_a_fresh_state_is_a_valid_document():
    st = DashboardState(10.0, 3, 0.25)
    _, doc = st.update(0.0, 1000.0, full=True)
    json.dumps(doc, allow_nan=False)
    assert doc["latency"]["p50_ms"] is None and doc["health"]["model"] is None
    assert {s["name"]: s["state"] for s in doc["health"]["services"]} == {
        "capture": "unseen", "inference": "unseen", "playback": "unseen"}
    assert doc["sound"]["input"] is None and len(doc["sound"]["bands_hz"]) == BANDS


def test_a_dropped_publisher_is_down_at_once_until_its_next_heartbeat():
    st = DashboardState(10.0, 3, 0.25)
    beat = T.Heartbeat(True, 1.0, {}, None, origin=origin("playback", pid=7))
    st.add(beat, 0.0, 1000.0)
    st.lost("playback")
    states = {s["name"]: s["state"] for s in st.update(0.01, 1000.01)[0]["health"]["services"]}
    assert states["playback"] == "down"  # long before three heartbeats are missed
    st.add(T.Heartbeat(True, 0.1, {}, None, origin=origin("playback", pid=8)), 0.5, 1000.5)
    svc = {s["name"]: s for s in st.update(0.6, 1000.6)[0]["health"]["services"]}["playback"]
    assert svc["state"] == "ok" and svc["pid"] == 8 and svc["restarts"] == 1


def test_sound_frames_measure_level_and_where_the_energy_is():
    sr = 16000
    t = np.arange(sr) / sr
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    levels = measure(tone[:1600], sr)
    assert levels.rms_dbfs == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=0.05)
    assert levels.peak_dbfs == pytest.approx(20 * np.log10(0.5), abs=0.05)
    centres = band_centres_hz(sr)
    loudest = int(np.argmax(levels.spectrum_db))
    edges = np.geomspace(80, 8000, BANDS + 1)
    assert edges[loudest] <= 1000 < edges[loudest + 1], (centres[loudest], levels.spectrum_db)
    assert max(v for i, v in enumerate(levels.spectrum_db) if abs(i - loudest) > 2) < levels.spectrum_db[loudest] - 40
    assert measure(np.zeros(1600, np.float32), sr) == measure(np.zeros(1600, np.float32), sr)
    assert measure(np.zeros(1600, np.float32), sr).rms_dbfs == FLOOR_DB
    # The meter cuts whatever blocks it is given into frames, keeping the rest for later.
    meter = LevelMeter(sr, 0.1)
    for block in np.split(tone[:3 * 1600 + 100], [208 * k for k in range(1, 24)]):
        meter.feed(block)
    frames = meter.frames()
    assert len(frames) == 3 and frames[0] == measure(tone[:1600], sr)
    meter.feed(tone[4900:6400])
    assert len(meter.frames()) == 1


def test_a_sound_frame_round_trips_and_only_asking_taps_get_them():
    frame = T.SoundFrame(100.0, -20.0, -6.0, [-50.0] * BANDS)
    got = T.decode(make_telemetry("capture", "sound", frame.to_data()))
    assert got == frame and got.service == "capture"
    with pytest.raises(T.TelemetryError, match=r"sound\.capture\.spectrum_db\[1\]: expected a number"):
        T.decode(make_telemetry("capture", "sound", dict(frame.to_data(), spectrum_db=[1.0, "x"])))
    assert "sound." not in topics_for([], audio=False)  # the monitor does not want them
    assert "sound." in topics_for([], audio=True, sound=True)


def test_bind_auth_and_the_url():
    assert parse_bind("127.0.0.1:8770") == ("127.0.0.1", 8770)
    assert parse_bind("[::1]:9") == ("::1", 9)
    for bad in ("8770", "host:", "host:99999", ":80"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_bind(bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.2") and not is_loopback("box.lan")
    assert not DashboardSettings().needs_token()
    assert DashboardSettings(bind="0.0.0.0:8770").needs_token()
    assert DashboardSettings(token="t").needs_token()
    assert dashboard_url(DashboardSettings()) == "http://127.0.0.1:8770/"
    assert dashboard_url(DashboardSettings(bind="[::1]:1"), "tok") == "http://[::1]:1/?token=tok"
    assert authorized("", "", {})
    assert authorized("s3cret", "token=s3cret", {}) and authorized("s3cret", "", {"Authorization": "Bearer s3cret"})
    assert authorized("s3cret", "", {"X-LLVC-Token": "s3cret"})
    assert not authorized("s3cret", "", {}) and not authorized("s3cret", "token=s3cre", {})
    assert not authorized("s3cret", "", {"Authorization": "Basic s3cret"})


def test_a_slow_client_loses_its_oldest_updates_not_the_loop_time():
    hub = Hub(max_clients=2, queue_len=3)
    a, b = hub.join(), hub.join()
    assert hub.join() is None  # max_clients
    for n in range(5):
        hub.broadcast(b"%d" % n)
    assert list(a.queue) == [b"2", b"3", b"4"] and a.dropped == 2 and hub.dropped() == 4
    hub.leave(b)
    assert hub.count == 1 and hub.join() is not None


# --------------------------------------------------------------------------- the real process
def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_dashboard(bind: str, tmp_path: Path, *extra: str) -> subprocess.Popen:
    sets = [a for s in endpoint_overrides("tcp") for a in ("--set", s)]
    log = open(tmp_path / "dashboard.log", "w")
    return subprocess.Popen([str(LLVC), "dashboard", "--bind", bind, *sets, *extra], stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def wait_log(tmp_path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 20) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, (tmp_path / "dashboard.log").read_text())
        if m:
            return m
        assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
        time.sleep(0.05)
    raise AssertionError((tmp_path / "dashboard.log").read_text())


def test_bound_beyond_loopback_it_serves_nothing_without_its_token(tmp_path):
    port = free_port()
    proc = start_dashboard(f"0.0.0.0:{port}", tmp_path)
    try:
        token = wait_log(tmp_path, rf"serving url=http://\S+:{port}/\?token=(\S+)", proc).group(1)
        base = f"http://127.0.0.1:{port}"
        for path in ("/", "/api/state", "/api/stream", "/static/app.js", "/nothing"):
            status, body = http_get(base + path)
            assert status == 401 and b"token" in body and b"<html" not in body, (path, status, body[:100])
            assert http_get(base + path + "?token=" + token[:-1])[0] == 401
        status, body = http_get(f"{base}/?token={token}")
        assert status == 200 and b"<html" in body.lower()
        status, body = http_get(f"{base}/api/state", {"Authorization": f"Bearer {token}"})
        doc = json.loads(body)
        assert status == 200 and doc["version"] == 1 and doc["n"] >= 1, body[:200]
        assert http_get(f"{base}/static/../../common/config.py?token={token}")[0] == 404
        assert http_get(f"{base}/static/%2e%2e/__init__.py?token={token}")[0] == 404
        # The stream: one update per update_interval_s (0.2 s), counted over 2 s with a wide margin.
        req = urllib.request.Request(f"{base}/api/stream?token={token}")
        with urllib.request.urlopen(req, timeout=5) as r:
            ids, t0 = [], time.monotonic()
            while time.monotonic() - t0 < 2.0:
                line = r.readline()
                if line.startswith(b"id: "):
                    ids.append(int(line[4:]))
        rate = len(ids) / 2.0
        print(f"stream: {len(ids)} updates in 2 s ({rate:.1f}/s), ids {ids[:3]}...")
        assert rate >= 3 and ids == list(range(ids[0], ids[0] + len(ids)))
        assert "unauthorized=" not in (tmp_path / "dashboard.log").read_text()  # not one line per request
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_bad_binds_are_one_line_and_exit_2(tmp_path):
    out = subprocess.run([str(LLVC), "dashboard", "--bind", "nowhere"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "dashboard.bind: expected HOST:PORT" in out.stderr, out.stderr
    port = free_port()
    proc = start_dashboard(f"127.0.0.1:{port}", tmp_path)
    try:
        wait_log(tmp_path, "serving", proc)
        sets = [a for s in endpoint_overrides("tcp") for a in ("--set", s)]
        out = subprocess.run([str(LLVC), "dashboard", "--bind", f"127.0.0.1:{port}", *sets], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr
        assert len([x for x in out.stderr.splitlines() if "ERROR" in x]) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_a_dashboard_that_cannot_start_costs_the_pipeline_nothing(tmp_path):
    import socket

    from services.lab.endpoints import private_sets

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sets = [s for s in private_sets() if not s.startswith("dashboard.bind=")]
        sets.append(f'dashboard.bind="127.0.0.1:{port}"')
        out = subprocess.run([str(LLVC), "run", "--source", "tone", "--sink", "null", "--passthrough",
                              "--duration", "5", "--run-dir", str(tmp_path / "run"),
                              *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=90)
    print(out.stderr[-500:])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    warning = [x for x in out.stderr.splitlines() if "dashboard cannot start" in x]
    assert len(warning) == 1 and f"cannot listen on 127.0.0.1:{port}" in warning[0]
    assert "the pipeline runs without it" in warning[0]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["chunks"] > 20  # it ran, and played


# --------------------------------------------------------------------------- /api/control
class FakeLink:
    """Stands in for :class:`ControlLink`: records requests, answers like inference would."""

    def __init__(self):
        self.requests: list = []
        self.controls = {"bypass": False, "input_gain_db": 0.0}
        self.down = False

    def request(self, req):
        from common.control import ControlError, ControlReply

        self.requests.append(req)
        if self.down:
            raise ControlError("no reply from tcp://127.0.0.1:1 within 2 s")
        state = {"controls": dict(self.controls), "voice": "", "loading": None, "last_switch": None}
        if req.cmd == "voices":
            return ControlReply(True, None, {**state, "voices": [{"name": "v", "checkpoint": "/x/v.pth"}]})
        if req.cmd == "set":
            bad = [k for k, v in req.values.items() if k == "input_gain_db" and not -40 <= v <= 40]
            if bad:
                return ControlReply(False, "input_gain_db: must be in [-40, 40]", state)
            self.controls.update(req.values)
            return ControlReply(True, None, {**state, "controls": dict(self.controls)})
        return ControlReply(True, None, {**state, "loading": req.checkpoint})

    def close(self):
        pass


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode()


@pytest.fixture
def control_server():
    from services.dashboard.server import DashboardServer, FullState

    link = FakeLink()
    srv = DashboardServer("127.0.0.1", 0, "", Hub(2, 2), FullState(), link)
    srv.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/api/control", link, srv
    srv.stop()


JSON = {"Content-Type": "application/json"}


def test_the_control_endpoint_forwards_and_answers_in_one_line(control_server):
    url, link, srv = control_server
    status, doc = http("GET", url)
    assert status == 200 and doc["ok"] and doc["state"]["voices"][0]["name"] == "v"
    assert link.requests[-1].cmd == "voices"
    status, doc = http("POST", url, b'{"cmd": "set", "values": {"bypass": true}}', JSON)
    assert status == 200 and doc["ok"] and doc["state"]["controls"]["bypass"] is True
    assert link.requests[-1].values == {"bypass": True}
    # Refused by inference: 200, ok false, its one line.
    status, doc = http("POST", url, b'{"cmd": "set", "values": {"input_gain_db": 999}}', JSON)
    assert status == 200 and doc["ok"] is False and doc["error"].startswith("input_gain_db:")
    status, doc = http("POST", url, b'{"cmd": "voice", "checkpoint": "v"}', {**JSON, "Origin": url[:-12]})
    assert status == 200 and doc["state"]["loading"] == "v"
    # Inference not answering: 502, one line.
    link.down = True
    status, doc = http("GET", url)
    assert status == 502 and doc["ok"] is False and "no reply" in doc["error"] and "\n" not in doc["error"]


@pytest.mark.parametrize("body, why", [
    (b"{nope", "not JSON"), (b"[1]", "expected a JSON object"), (b'{"cmd": "status"}', "cmd:"),
    (b'{"cmd": "set", "values": {}}', "values:"), (b'{"cmd": "set", "values": {"a": [1]}}', "values.a"),
    (b'{"cmd": "set", "values": {"a": NaN}}', "NaN"), (b'{"cmd": "set", "values": {"a": 1e999}}', "values.a"),
    (b'{"cmd": "set", "values": {"a": 123456789012345678901234567890}}', "values.a"),
    (b'{"cmd": "set", "values": {"a": 1}, "x": 1}', "x: not a field"), (b'{"cmd": "voice"}', "checkpoint"),
    (b'{"cmd": "voice", "checkpoint": "v", "config": 3}', "config"), (b"\xff\xfe", "not JSON"),
])
def test_a_malformed_control_body_is_400_and_never_reaches_inference(control_server, body, why):
    url, link, _ = control_server
    status, doc = http("POST", url, body, JSON)
    assert status == 400 and why in doc["error"] and "\n" not in doc["error"], doc
    assert link.requests == []


def test_a_foreign_page_cannot_post_and_a_huge_body_is_not_read(control_server):
    url, link, srv = control_server
    body = b'{"cmd": "set", "values": {"bypass": true}}'
    port = url.split(":")[2].split("/")[0]
    for headers in ({"Content-Type": "text/plain"}, {},                         # a "simple" request
                    {**JSON, "Origin": "http://evil.example"},                  # another origin
                    {**JSON, "Origin": "null"},
                    {**JSON, "Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}):  # rebinding
        status, doc = http("POST", url, body, headers)
        assert status == 403 and "\n" not in doc["error"], (headers, doc)
    assert link.requests == [] and srv.refused == 5
    status, doc = http("POST", url, b" " * 5000, JSON)
    assert status == 413 and "4096" in doc["error"]
    # The same origin, by name or number, is fine.
    for host in ("localhost", "127.0.0.1"):
        status, doc = http("POST", url, body, {**JSON, "Host": f"{host}:{port}", "Origin": f"http://{host}:{port}"})
        assert status == 200 and doc["ok"], doc


def test_the_control_link_reconnects_after_a_request_times_out():
    from common.control import ControlError, ControlReply, ControlRequest
    from services.dashboard.server import ControlLink

    made, discarded = [], []

    class Client:
        def __init__(self, fail):
            self.fail = fail

        def request(self, req, timeout_ms):
            if self.fail:
                raise ControlError("no reply within 2 s")
            return ControlReply(True, None, {"n": len(made)})

    link = ControlLink(lambda: made.append(Client(fail=not made)) or made[-1], discarded.append)
    with pytest.raises(ControlError):
        link.request(ControlRequest("status"))
    assert discarded == [made[0]]
    assert link.request(ControlRequest("status")).state == {"n": 2} and len(made) == 2
    assert link.request(ControlRequest("status")).ok and len(made) == 2  # kept while it answers
    link.close()
    assert discarded == made
    with pytest.raises(ControlError, match="stopping"):
        link.request(ControlRequest("status"))


def test_the_state_carries_the_live_settings_from_heartbeats_and_events():
    st = DashboardState(10.0, 3, 0.25)
    assert st.update(0.0, 1000.0)[0]["control"]["controls"] is None
    status = T.InferenceStatus("onnx", "m", False, "llvc", "cpu", 1, "s", 208, 13.0, 15.0, 14.0, 1,
                               controls={"bypass": False, "input_gain_db": 0.0}, voice="")
    st.add(T.Heartbeat(True, 1.0, {}, status, origin=origin("inference")), 0.1, 1000.1)
    st.add(T.ControlChanged({"bypass": True}, "local", "s", 24960, origin=origin("inference")), 0.2, 1000.2)
    st.add(T.VoiceSwitch("loading", "/v/a.pth", by="local", origin=origin("inference")), 0.3, 1000.3)
    delta, full = st.update(0.4, 1000.4, full=True)
    assert delta["control"] == full["control"] == {"controls": {"bypass": True, "input_gain_db": 0.0}, "voice": "",
                                                   "loading": "/v/a.pth", "last_switch": None}
    st.add(T.VoiceSwitch("swapped", "/v/a.pth", "a@1", "local", "s", 30000, 812.5, origin=origin("inference")),
           0.5, 1000.5)
    c = st.update(0.6, 1000.6)[0]["control"]
    assert c["voice"] == "/v/a.pth" and c["loading"] is None and c["last_switch"]["ok"] is True
    texts = [e["text"] for e in full["events"]]
    assert "bypass=on (by local from sample 24960)" in texts
    assert any(t.startswith("loading /v/a.pth") for t in texts)
    json.dumps(full, allow_nan=False)


def test_the_sessions_table_shows_each_sessions_own_figures():
    st = DashboardState(10.0, 3, 0.25)
    status = T.InferenceStatus("eager", "model-x", False, "llvc", "cpu", 1, "s", 208, 13.0, 15.0, 14.0, 1,
                               sessions=[{"name": "alice", "stream_id": "a", "slot": 0,
                                          "counters": {"chunks_in": 10, "dropped_inference_backlog": 2, "resets": 1}},
                                         {"name": "bob", "stream_id": "b", "slot": 1, "counters": {"resets": 1}}],
                               max_streams=4, batch_sizes={"1": 5, "2": 7})
    st.add(T.Heartbeat(True, 1.0, {"resets": 2}, status, origin=origin("inference")), 0.0, 1000.0)
    for k, e2e in enumerate((20.0, 22.0, 24.0)):  # alice's playback on this host
        st.add(T.PlaybackChunk("a", k, k * 208, e2e, 6.0, session="alice", origin=origin("playback")), 0.1, 1000.1)
    pb = T.PlaybackStatus("null", 6.0, 5.0, "a", session="alice")
    st.add(T.Heartbeat(True, 1.0, {"underruns": 3, "dropped_late": 1}, pb, origin=origin("playback")), 0.2, 1000.2)
    _, doc = st.update(0.3, 1000.3, full=True)
    json.dumps(doc, allow_nan=False)
    rows = {r["name"]: r for r in doc["compute"]["sessions"]}
    assert list(rows) == ["alice", "bob"]
    assert rows["alice"]["chunks"] == 3 and 21.0 <= rows["alice"]["e2e_p50_ms"] <= 23.0
    assert (rows["alice"]["underruns"], rows["alice"]["dropped"], rows["alice"]["resets"]) == (3, 3, 1)
    assert rows["bob"]["chunks"] == 0 and rows["bob"]["e2e_p50_ms"] is None and rows["bob"]["underruns"] is None
    assert doc["compute"]["max_streams"] == 4 and doc["compute"]["batch_sizes"] == {"1": 5, "2": 7}
