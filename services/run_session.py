"""``llvc run --session NAME``: what one client of a shared inference server makes its own.

A client is a capture + playback pair (with its monitor, and a dashboard if asked for) under a
session name, ``capture.session``, by which the server keeps its stream apart. Several clients
must run on one host against one server from the same config, and the config names one fixed
place for everything each of them binds, so :func:`session_settings` gives the run its own:

* each local ``telemetry_*`` endpoint (``ipc://``, or ``tcp://`` bound to loopback) bound by a
  capture, playback or monitor this run starts moves to ``ipc://<run folder>/<endpoint>.sock``
  (connect and bind). The run folder is this run's alone, so two runs never meet and no port is
  guessed; every process of the run, its monitor and ``llvc run``'s own tap included, reads the
  same ``LLVC__ENDPOINTS__...`` overrides. A LAN endpoint stays as configured (other hosts
  connect to it; only the config can tell them where), with a note.
* the monitor's ``/metrics`` and the dashboard, when this run starts them, get a free port on
  their configured host (the URL and the port are printed);
* an unnamed virtual microphone (``virtual-mic``) becomes the session's
  (:func:`services.virtual_mic.session_spec`): the run removes its microphone when it ends.

Keys given with ``--set`` on the same command line are the user's and kept as given. What the
server binds (``audio_in``, ``audio_out``, ``control``, ``telemetry_inference``) is never touched:
every client must find the server at the same addresses. The supervisord socket, the logs and
the report are in the run folder already.
"""
from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path

from common.config import IPC_MAX_BYTES, PipelineConfig

from .sessions import check_session_name

__all__ = ["CLIENT_SERVICES", "SessionError", "session_problem", "session_settings", "session_line",
           "free_port"]

#: The services a client runs (dashboard binds no endpoint; inference is the server).
CLIENT_SERVICES = ("capture", "playback", "monitor", "dashboard")


class SessionError(ValueError):
    """A session that cannot be set up as asked (one line)."""


def session_problem(name: str) -> str | None:
    """Why ``name`` is not a session name (``--session: ...``, one line), or ``None``."""
    problem = check_session_name(name) if name else f"expected 1-64 letters, digits, '.', '-' or '_', got {name!r}"
    return f"--session: {problem}" if problem else None


def free_port(host: str) -> int:
    """A TCP port on ``host`` that was free a moment ago (the system's pick)."""
    family, kind, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind) as s:
        s.bind(address)
        return s.getsockname()[1]


def _given(keys: Iterable[str], *path: str) -> bool:
    """Whether one of the ``--set`` ``keys`` sets ``path``, a table above it or a key below it."""
    for key in keys:
        parts = tuple(p.strip() for p in key.partition("=")[0].split("."))
        n = min(len(parts), len(path))
        if parts[:n] == path[:n]:
            return True
    return False


def _port_for(host: str, what: str) -> int:
    try:
        return free_port(host)
    except OSError as exc:
        raise SessionError(f"--session: no free port for {what} on {host} ({exc.strerror or exc})") from None


def session_settings(cfg: PipelineConfig, services: Iterable[str], session: str, run_dir: Path,
                     given: Iterable[str] = ()) -> tuple[dict[str, object], list[str]]:
    """The settings (dotted key → value) that make this run's binds its own, and notes (one line
    each) on what stays shared; ``cfg`` is the config the run's services would load otherwise,
    ``given`` the run's ``--set KEY=VALUE`` items. :class:`SessionError` when it cannot be done:
    a run folder too long for its sockets, CURVE with links it would mix, no free port."""
    from services.dashboard import DashboardSettings, parse_bind
    from services.monitor import MonitorSettings
    from services.playback import playback_settings
    from services.virtual_mic import VirtualMicError, session_spec

    services = [s for s in services if s in CLIENT_SERVICES]
    given = list(given)
    out: dict[str, object] = {}
    notes: list[str] = []
    for ep in cfg.telemetry_endpoints():
        if ep.binder not in services or _given(given, "endpoints", ep.name):
            continue
        if not ep.is_local:
            notes.append(f"session {session}: {ep.name} stays at {ep.bind} (other hosts connect to it): another "
                         f"session on this host needs its own, --set endpoints.{ep.name}.connect=...")
            continue
        path = run_dir / f"{ep.name}.sock"
        size = len(str(path).encode())
        if size > IPC_MAX_BYTES:
            raise SessionError(f"--session: {path} is {size} bytes, at most {IPC_MAX_BYTES} for a socket path: "
                               f"give a shorter --run-dir")
        out[f"endpoints.{ep.name}.connect"] = out[f"endpoints.{ep.name}.bind"] = f"ipc://{path}"
    if cfg.security.curve:
        tcp = [ep.name for ep in cfg.telemetry_endpoints() if ep.is_tcp and f"endpoints.{ep.name}.connect" not in out]
        if out and tcp:
            # CURVE is a property of a whole subscriber socket: it cannot reach plain ipc:// too.
            raise SessionError(f"--session: security.curve is on and {', '.join(tcp)} stay tcp://, so this run's "
                               f"telemetry cannot move to ipc://: give it its own tcp:// endpoints with --set")
    if "monitor" in services and not _given(given, "monitor", "metrics_port"):
        m = cfg.settings("monitor", MonitorSettings)
        if m.metrics_port:  # 0: off, nothing to collide
            out["monitor.metrics_port"] = _port_for(m.metrics_host, "the monitor's /metrics")
    if "dashboard" in services and not _given(given, "dashboard", "bind"):
        host, _ = parse_bind(cfg.settings("dashboard", DashboardSettings).bind)
        shown = f"[{host}]" if ":" in host else host
        out["dashboard.bind"] = f"{shown}:{_port_for(host, 'the dashboard')}"
    if "playback" in services:
        sink = playback_settings(cfg).sink
        try:
            own_sink = session_spec(sink, session)
        except VirtualMicError as exc:
            raise SessionError(str(exc)) from None
        if own_sink != sink:
            out["playback.sink"] = own_sink
    return out, notes


def session_line(session: str, settings: dict[str, object]) -> str:
    """``llvc run: session NAME: key=value, ...``: where this run's own things are (binds left out:
    each equals its connect)."""
    own = ", ".join(f"{k}={v}" for k, v in settings.items() if not k.endswith(".bind") or k == "dashboard.bind")
    return f"llvc run: session {session}" + (f": {own}" if own else "")
