"""``llvc dashboard``: a live web page of the pipeline, tapped off the telemetry bus.

A tap like the monitor, never on the audio path: it subscribes to every service's telemetry
(level frames and chunk headers included), publishes nothing, and serves
``http://<[dashboard] bind>/`` (default ``127.0.0.1:8770``): the page (``static/``, every asset
in the package), ``GET /api/state`` (everything the page shows, one JSON document) and
``GET /api/stream`` (server-sent events, one update every ``update_interval_s``), and
``GET``/``POST /api/control`` (inference's live settings and voice, read and changed through
its control endpoint, as ``llvc ctl`` does). ``docs/dashboard-api.md`` is the contract;
:mod:`.state` builds the documents, :mod:`.server` serves them.

Bound to a loopback address it asks nothing. Bound to any other address it requires a token
(``[dashboard] token``; when empty one is generated and its URL printed once). ``llvc run``
starts it unless ``--no-dashboard`` and prints its URL.

**Threads.** The loop thread owns :class:`~.state.DashboardState`: it takes records in, and every
``update_interval_s`` encodes an update and hands the bytes to the HTTP threads
(:class:`~.server.Hub`, :class:`~.server.FullState`). A slow or vanished browser costs only its
own bounded queue; nothing the HTTP side does can make the loop wait. ``/api/control`` requests
are the HTTP threads' own: they share one REQ socket (:class:`~.server.ControlLink`, on the
bus's context, never touched by the loop thread).
"""
from __future__ import annotations

import argparse
import json
import secrets
import socket
import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from common.config import PipelineConfigError, is_loopback
from common.settings import at_least, parsed_by, setting
from common.tap import topics_for
from services.base import Service, add_service_arguments, service_main

from .server import ControlLink, DashboardServer, FullState, Hub, encode_update
from .state import DashboardState

__all__ = ["DashboardService", "DashboardSettings", "parse_bind", "is_loopback", "dashboard_url",
           "add_arguments", "run"]

MAX_BATCH = 5000         # records taken per update, so a flood cannot hold the updates back


def parse_bind(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``) → ``(host, port)``; ValueError (one line) otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT with PORT in 1..65535, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port)


@dataclass(frozen=True)
class DashboardSettings:
    """The ``[dashboard]`` table (config/pipeline.toml documents each key)."""

    bind: str = setting("127.0.0.1:8770", parsed_by(parse_bind, ValueError))
    token: str = setting("")
    update_interval_s: float = setting(0.2, lambda v: None if 0.05 <= v <= 0.25 else "must be in [0.05, 0.25]")
    history_s: float = setting(60.0, lambda v: None if 10 <= v <= 600 else "must be in [10, 600]")
    max_clients: int = setting(16, at_least(1))
    client_queue: int = setting(25, at_least(1))

    def needs_token(self) -> bool:
        """Bound to anything but loopback, or given a token: every request must carry it."""
        return bool(self.token) or not is_loopback(parse_bind(self.bind)[0])


def dashboard_url(settings: DashboardSettings, token: str = "") -> str:
    """The page's URL (with ``?token=`` when one is needed); a wildcard bind names this host."""
    host, port = parse_bind(settings.bind)
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


class DashboardService(Service):
    """Subscribes to all telemetry, serves the page and its live updates."""

    name = "dashboard"

    def __init__(self, cfg, args: argparse.Namespace | None = None):
        super().__init__(cfg, args)
        self.settings: DashboardSettings | None = None
        self.state: DashboardState | None = None
        self.http: DashboardServer | None = None
        self._sub = None
        self._conn_events = None
        self.control: ControlLink | None = None

    def setup(self) -> None:
        """Validate settings, listen, subscribe."""
        from services.monitor import MonitorSettings

        flags = {"bind": getattr(self.args, "bind", None)}
        s = self.settings = self.cfg.settings("dashboard", DashboardSettings, flags)
        monitor = self.cfg.settings("monitor", MonitorSettings)  # its window: the same p50/p99
        token = s.token
        generated = s.needs_token() and not token
        if generated:
            token = secrets.token_urlsafe(18)
        self.state = DashboardState(monitor.window_s, monitor.stale_heartbeats, self.cfg.bus.heartbeat_interval_s,
                                    s.history_s, s.update_interval_s, socket.gethostname())
        self.hub = Hub(s.max_clients, s.client_queue)
        self.full_state = FullState()
        host, port = parse_bind(s.bind)
        self.control = ControlLink(self._control_client, self._discard_control)
        try:
            self.http = DashboardServer(host, port, token, self.hub, self.full_state, self.control)
        except OSError as exc:
            where = "command line" if flags["bind"] is not None else self.cfg.origin("dashboard", "bind")
            raise PipelineConfigError(f"{where}: dashboard.bind: cannot listen on {s.bind} "
                                      f"({exc.strerror or exc})") from None
        self.http.start()
        self.bus = self._open_tap()
        self._sub = self.bus.subscriber(topics_for([], audio=True, sound=True))
        self.watch_rejects(self._sub)
        # A publisher's connection dropping is the quickest sign of a process gone (kill -9
        # included): the page shows it down at once rather than after missed heartbeats.
        self._publishers = {ep.connect: ep.name.removeprefix("telemetry_") for ep in self.cfg.telemetry_endpoints()}
        self._conn_events = self._sub.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.mirror(lambda: {"clients": self.hub.count, "client_updates_dropped": self.hub.dropped(),
                             "unauthorized": self.http.unauthorized if self.http else 0,
                             "control_refused": self.http.refused if self.http else 0,
                             "control_requests": self.control.requests if self.control else 0,
                             "control_failures": self.control.failures if self.control else 0})
        # The token is said once, by whoever made it (llvc run passes its own and prints it).
        self.log("info", "serving", url=dashboard_url(s, token if generated else ""),
                 auth="token" if token else "none (loopback)")
        self._next_update = time.monotonic()
        self.ready = True

    def _open_tap(self):
        """A bus with no publisher: the dashboard only listens (heartbeats go nowhere)."""
        from common.bus import Bus

        return Bus(self.cfg, self.name)

    def _control_client(self):
        """A fresh REQ client to inference's control endpoint (called by :class:`ControlLink`,
        in an HTTP thread). It gets a bus of its own on the tap's context, so that a client
        given up on can be closed alone, without touching the sockets of the loop thread."""
        from common.bus import Bus
        from common.control import ControlError

        tap = self.bus
        if tap is None:
            raise ControlError("the dashboard is starting or stopping")
        bus = Bus(self.cfg, self.name, context=tap.context)
        try:
            client = bus.control_client()
        except Exception:
            bus.close()
            raise
        client.bus = bus  # closed with it (_discard_control)
        return client

    @staticmethod
    def _discard_control(client) -> None:
        # LINGER 0: a request nobody answered must not hold the context's termination.
        client.socket.setsockopt(zmq.LINGER, 0)
        client.bus.close()  # its own context is the tap's: close() leaves that running

    def loop_once(self) -> None:
        """Sleep until the next update is due, take in everything that arrived meanwhile, and send
        the update (with a whole document when a request waits for one). Taking records in
        batches, not one wake-up per message, is what keeps this process cheap (~250 records a
        second at chunk factor 1)."""
        now = time.monotonic()
        if now < self._next_update:
            time.sleep(min(self._next_update - now, 0.1))
            return
        sub, state = self._sub, self.state
        taken = 0
        now, wall = time.monotonic(), time.time()
        record = sub.recv(0)
        while record is not None:
            state.add(record, now, wall)
            taken += 1
            if taken >= MAX_BATCH:
                break
            record = sub.recv(0)
        self.count("messages", taken)
        self._watch_publishers()
        self._next_update = max(self._next_update + self.settings.update_interval_s, now)
        wanted = self.full_state.wanted
        delta, full = state.update(now, wall, full=wanted)
        if self.hub.count:
            self.hub.broadcast(encode_update(delta["n"], delta))
        if full is not None:
            self.full_state.offer(json.dumps(full, separators=(",", ":"), allow_nan=False).encode())

    def _watch_publishers(self) -> None:
        while True:
            try:
                ev = recv_monitor_message(self._conn_events, zmq.NOBLOCK)
            except zmq.Again:
                return
            service = self._publishers.get(ev["endpoint"].decode(errors="replace"))
            if service is not None:
                self.state.lost(service)

    def teardown(self) -> None:
        """Stop serving, close the bus."""
        if self.http is not None:
            self.http.stop()  # closes the control link too: before the bus ends the shared context
            self.http = None
        if self._conn_events is not None:
            self._sub.socket.disable_monitor()
            self._conn_events.close(0)  # before the bus ends its context, or term() would wait
            self._conn_events = None
        self._sub = None
        self.close_bus()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc dashboard``'s flags on ``p``."""
    add_service_arguments(p)
    p.add_argument("--bind", metavar="HOST:PORT", default=None,
                   help="serve the page here (dashboard.bind; default 127.0.0.1:8770; any address but "
                        "loopback requires a token)")


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc dashboard``."""
    return service_main(DashboardService, args)
