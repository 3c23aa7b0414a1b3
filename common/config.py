"""Pipeline config: endpoints, bind/connect roles, socket options and security, validated.

The pipeline's services (capture, inference, playback, monitor) find each other through one
TOML file, ``config/pipeline.toml`` by default, which documents every key. Values are taken
from three layers, each overriding the one before:

1. the file: the ``path`` argument, else the environment variable ``LLVC_PIPELINE_CONFIG``,
   else :data:`DEFAULT_PIPELINE_CONFIG`;
2. the environment: ``LLVC__<SECTION>__<KEY>[__<SUBKEY>]=value``. Double underscores separate
   levels, and names are case-insensitive (lower-cased), e.g. ``LLVC__BUS__SEND_HWM=8`` or
   ``LLVC__ENDPOINTS__AUDIO_IN__CONNECT=tcp://10.0.0.2:5550``;
3. the command line: ``--set section.key=value``, repeatable, applied in order.

An override value is read as a TOML value when it parses as one (``8`` is an int, ``true`` a
bool, ``1.5`` a float, ``"x"`` a string, ``{ connect = "...", binder = "..." }`` a table),
and otherwise taken as a bare string (so ``tcp://10.0.0.2:5550`` needs no quotes). An override
may set a whole table, which replaces the table, or add a new endpoint, which then needs
``connect`` and ``binder`` like any other.

Every problem raises :class:`PipelineConfigError`, whose message is one line:
``"<source>: <dotted.key>: what is wrong (why)"``, where the source is the file's path,
``env LLVC__BUS__SEND_HWM`` or ``--set bus.send_hwm``: whichever layer gave the bad value.

This module imports neither zmq nor torch, so every process and tool can read the config.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .settings import Check, SettingsError, describe_value, kind_of, parse_table, positive, setting

__all__ = [
    "DEFAULT_PIPELINE_CONFIG",
    "CONFIG_ENV_VAR",
    "ENV_PREFIX",
    "env_name",
    "IPC_MAX_BYTES",
    "SERVICES",
    "REQUIRED_ENDPOINTS",
    "PipelineConfigError",
    "Endpoint",
    "is_loopback",
    "BusOptions",
    "SecurityOptions",
    "PipelineConfig",
    "load_pipeline_config",
    "add_config_arguments",
    "config_from_args",
]

#: The default pipeline config, ``config/pipeline.toml`` in the repository.
DEFAULT_PIPELINE_CONFIG = Path(__file__).resolve().parent.parent / "config" / "pipeline.toml"

#: Environment variable naming the config file when no path is given.
CONFIG_ENV_VAR = "LLVC_PIPELINE_CONFIG"

#: Prefix of the environment variables that override single keys.
ENV_PREFIX = "LLVC__"

#: The pipeline's services: the only valid ``binder`` values and the per-service tables.
SERVICES = ("capture", "inference", "playback", "monitor")

#: Endpoints the pipeline cannot run without -> the services allowed to bind each. An audio link
#: must be bound by one of its two ends or nobody would bind it. Telemetry subscribers always
#: connect, so each telemetry PUB is bound by the service that publishes on it.
REQUIRED_ENDPOINTS: dict[str, tuple[str, ...]] = {
    "audio_in": ("capture", "inference"),
    "audio_out": ("inference", "playback"),
    "control": ("inference",),
    "telemetry_capture": ("capture",),
    "telemetry_inference": ("inference",),
    "telemetry_playback": ("playback",),
    "telemetry_monitor": ("monitor",),
}

#: Services that only tap telemetry: they bind no endpoint and publish nothing.
TAPS = ("dashboard",)
#: Tables of settings that their users validate: the shared ``[model]``, ``[control]`` (the
#: live settings' starting values), ``[realtime]`` (the audio services' scheduling) and one per
#: service.
SETTINGS_TABLES = ("model", "control", "realtime") + SERVICES + TAPS
_TABLES = ("endpoints", "bus", "security") + SETTINGS_TABLES
_ENDPOINT_KEYS = ("connect", "bind", "binder")
# Env names are lower-cased and split on "__", so only such names can be reached from the env.
_ENDPOINT_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
# Hostnames, IPv4 addresses and (in bind) interface names such as eth0 all match this.
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\Z")
_WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]")
#: Longest ``ipc://`` path, in bytes: it must fit in sockaddr_un.sun_path (108 bytes on Linux, 104 on
#: macOS/BSD).
IPC_MAX_BYTES = 100
# HWMs, timeouts and intervals are C ints in ZeroMQ's setsockopt.
_C_INT_MAX = 2**31 - 1


class PipelineConfigError(ValueError):
    """A pipeline config that cannot be used; ``str()`` is one line: source, dotted key, why."""


# ------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Endpoint:
    """One ZeroMQ link: the address its binder binds and the address everyone else connects to."""

    name: str
    connect: str
    bind: str
    binder: str

    def address_for(self, service: str) -> tuple[str, bool]:
        """``(address, is_bind)`` for ``service``: ``(bind, True)`` for the binder, else ``(connect, False)``.

        Any name is accepted: tools such as ``llvc tap`` are not services and always connect.
        """
        if service == self.binder:
            return self.bind, True
        return self.connect, False

    @property
    def is_tcp(self) -> bool:
        """Whether this is a ``tcp://`` link, the only kind that CURVE security applies to."""
        return self.connect.startswith("tcp://")

    @property
    def is_local(self) -> bool:
        """Whether no other host can reach it: ``ipc://``, ``inproc://``, or ``tcp://`` bound to
        a loopback address."""
        if not self.is_tcp:
            return True
        return is_loopback(self.bind.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]"))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``localhost``, 127.0.0.0/8, ::1);
    a name other than ``localhost`` may resolve to any interface, so it is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _c_int(low: int, why_low: str = "") -> Check:
    """Check for ZeroMQ's C-int options: at least ``low`` and at most a C int."""
    def check(v: int) -> str | None:
        if v > _C_INT_MAX:
            return f"must be at most {_C_INT_MAX} (ZeroMQ takes a C int)"
        if v == -1 and low == 0:
            return "must be 0 or positive (-1 waits forever: it would block shutdown)"
        if v < low:
            return ("must be 0 or positive" if low == 0 else "must be positive") + why_low
        return None
    return check


_HWM = _c_int(1, " (0 is unlimited in ZeroMQ: a stalled peer would cost memory and latency)")


@dataclass(frozen=True)
class BusOptions:
    """``[bus]``: socket options for every socket (``config/pipeline.toml`` documents each)."""

    send_hwm: int = setting(8, _HWM)
    recv_hwm: int = setting(8, _HWM)
    linger_ms: int = setting(0, _c_int(0))
    telemetry_linger_ms: int = setting(250, _c_int(0))
    heartbeat_ivl_ms: int = setting(1000, _c_int(1))
    heartbeat_timeout_ms: int = setting(3000, _c_int(1))
    reconnect_ivl_ms: int = setting(100, _c_int(1))
    reconnect_ivl_max_ms: int = setting(250, _c_int(1))
    max_samples: int = setting(16000, _c_int(1))
    telemetry_hwm: int = setting(1000, _HWM)
    heartbeat_interval_s: float = setting(0.25, positive)
    sound_frame_s: float = setting(0.1, lambda v: None if v == 0 or 0.02 <= v <= 10
                                   else "must be 0 (off) or in [0.02, 10]")

    def problems(self):
        """Checks across keys."""
        if self.heartbeat_timeout_ms < self.heartbeat_ivl_ms:
            yield ("heartbeat_timeout_ms", f"{self.heartbeat_timeout_ms} is below heartbeat_ivl_ms "
                   f"{self.heartbeat_ivl_ms} (a live peer would time out between two heartbeats)")
        if self.reconnect_ivl_max_ms < self.reconnect_ivl_ms:
            yield ("reconnect_ivl_max_ms", f"{self.reconnect_ivl_max_ms} is below reconnect_ivl_ms "
                   f"{self.reconnect_ivl_ms} (the back-off cap cannot be shorter than the first interval)")


@dataclass(frozen=True)
class SecurityOptions:
    """``[security]``: CURVE on every ``tcp://`` link when ``curve``; ``keys_dir`` is made absolute."""

    curve: bool = setting(False)
    keys_dir: Path = setting(Path("keys"))
    controllers: str = setting("client", lambda v: None if not v.strip() or all(n.strip() for n in v.split(","))
                               else "must be comma-separated key names")
    # The key pair this host's connecting sockets use (KEYS_DIR/NAME.key_secret): "client", or a
    # pair made by `llvc keys add-client`, so a shared inference server tells the clients apart.
    client_key: str = setting("client", lambda v: None if v and "/" not in v and not v.startswith(".")
                              else "must be a key name in keys_dir")

    @property
    def controller_names(self) -> tuple[str, ...]:
        """:attr:`controllers` as names."""
        return tuple(n.strip() for n in self.controllers.split(",") if n.strip())


@dataclass(frozen=True)
class PipelineConfig:
    """The validated pipeline config.

    ``services`` maps every name in :data:`SETTINGS_TABLES` (``model`` and each service) to its
    raw table (empty when the file has none); each user validates its own table
    (:func:`services.base.parse_settings`). ``source`` says where the config came from:
    the file, then each override applied, for messages.
    """

    endpoints: dict[str, Endpoint]
    bus: BusOptions
    security: SecurityOptions
    services: dict[str, dict]
    source: str
    sources: _Sources | None = field(default=None, compare=False, repr=False)

    def origin(self, *path: str) -> str:
        """Which layer set the key at ``path`` (the file, ``env NAME`` or ``--set key``)."""
        return self.sources.of(tuple(path)) if self.sources is not None else self.source

    def settings(self, table: str, cls: type, overrides: Mapping[str, Any] | None = None) -> Any:
        """The ``[table]`` settings as an instance of the settings class ``cls``.

        ``overrides`` are values from a command's own flags (``None``: not given), which win
        over every layer. Any mistake is one :class:`PipelineConfigError` line naming the key
        and where its value came from ("command line" for a flag).
        """
        flags = {k: v for k, v in (overrides or {}).items() if v is not None}
        try:
            return parse_table(cls, {**self.services.get(table, {}), **flags})
        except SettingsError as exc:
            where = "command line" if exc.key in flags else self.origin(table, exc.key)
            raise PipelineConfigError(_one_line(f"{where}: {table}.{exc.key}: {exc.why}")) from None

    def endpoint(self, name: str) -> Endpoint:
        """The endpoint called ``name``; :class:`PipelineConfigError` if there is none."""
        try:
            return self.endpoints[name]
        except KeyError:
            known = ", ".join(self.endpoints)
            raise PipelineConfigError(
                _one_line(f"{self.source}: endpoints.{name}: no such endpoint (known: {known})")
            ) from None

    def telemetry_endpoints(self) -> list[Endpoint]:
        """Every endpoint whose name starts with ``telemetry_``, in config order."""
        return [ep for name, ep in self.endpoints.items() if name.startswith("telemetry_")]


# -------------------------------------------------------------------------- layering & sources


def _one_line(text: str) -> str:
    """Escape line breaks (a quoted TOML key may hold one) so that a message stays on one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _dotted(path: Sequence[str]) -> str:
    return ".".join(path)


class _Sources:
    """Which layer set each key, so that an error names the file, env variable or ``--set``."""

    def __init__(self, file_source: str):
        self.file = file_source
        # path -> (source, n): n counts overrides applied so far; the file is 0.
        self._by_path: dict[tuple[str, ...], tuple[str, int]] = {}
        self._count = 0

    def record(self, path: tuple[str, ...], source: str) -> None:
        # A key set again forgets whatever was recorded below it: the old table is gone.
        for p in [p for p in self._by_path if p[: len(path)] == path]:
            del self._by_path[p]
        self._count += 1
        self._by_path[path] = (source, self._count)

    def _lookup(self, path: tuple[str, ...]) -> tuple[str, int]:
        for n in range(len(path), 0, -1):
            if path[:n] in self._by_path:
                return self._by_path[path[:n]]
        return self.file, 0

    def of(self, path: tuple[str, ...]) -> str:
        """The layer that set ``path`` or, failing that, the nearest table above it."""
        return self._lookup(path)[0]

    def rank(self, path: tuple[str, ...]) -> int:
        """How late ``path`` was set: 0 for the file, higher for each later override."""
        return self._lookup(path)[1]

    def error(self, path: tuple[str, ...], problem: str) -> PipelineConfigError:
        """A :class:`PipelineConfigError` for ``path``, attributed to the layer that set it."""
        return PipelineConfigError(_one_line(f"{self.of(path)}: {_dotted(path)}: {problem}"))


def _parse_value(text: str) -> Any:
    """An override's value: a TOML value when ``text`` is one, else ``text`` as a bare string."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    # A value with a line break could smuggle in more keys ("1\nx = 2"): then it is not one value.
    return doc["v"] if list(doc) == ["v"] else text


def _apply(raw: dict, sources: _Sources, path: tuple[str, ...], value: Any, source: str) -> None:
    """Set ``path`` in ``raw`` to ``value``, creating tables on the way; a table value replaces."""
    table = raw
    for n, key in enumerate(path[:-1], start=1):
        if key not in table:
            table[key] = {}
            sources.record(path[:n], source)
        elif not isinstance(table[key], dict):
            raise PipelineConfigError(_one_line(
                f"{source}: {_dotted(path)}: {_dotted(path[:n])} is {kind_of(table[key])}, "
                f"not a table, so it has no key {path[n]!r}"
            ))
        table = table[key]
    table[path[-1]] = value
    sources.record(path, source)


def env_name(key: str) -> str:
    """The environment variable that overrides the dotted ``key``: ``bus.send_hwm`` →
    ``LLVC__BUS__SEND_HWM`` (the inverse of how :func:`load_pipeline_config` reads them)."""
    return ENV_PREFIX + "__".join(part.upper() for part in key.strip().split("."))


def _env_overrides(env: Mapping[str, str]) -> list[tuple[tuple[str, ...], Any, str]]:
    """``(path, value, source)`` for every ``LLVC__...`` variable, tables before their keys."""
    found: dict[tuple[str, ...], str] = {}
    result = []
    for name, text in env.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        source = f"env {name}"
        parts = name[len(ENV_PREFIX):].split("__")
        if not all(parts):
            raise PipelineConfigError(_one_line(
                f"{source}: cannot tell which key this sets "
                f"(expected {ENV_PREFIX}<SECTION>[__<KEY>[__<SUBKEY>]], levels separated by '__')"
            ))
        path = tuple(p.lower() for p in parts)
        if path in found:
            # Names differ only in case: which one wins would depend on the environment's order.
            raise PipelineConfigError(_one_line(
                f"{source}: {_dotted(path)}: also set by env {found[path]} (names are case-insensitive)"
            ))
        found[path] = name
        result.append((path, _parse_value(text), source))
    # A whole table (LLVC__ENDPOINTS__X={...}) first, so that a variable for one of its keys wins.
    result.sort(key=lambda item: (len(item[0]), item[0]))
    return result


def _cli_overrides(overrides: Sequence[str]) -> list[tuple[tuple[str, ...], Any, str]]:
    """``(path, value, source)`` for every ``KEY=VALUE`` of ``--set``, in the order given."""
    result = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        source = f"--set {key}"
        if not sep or not key:
            raise PipelineConfigError(_one_line(f"--set {item}: expected KEY=VALUE, e.g. bus.send_hwm=8"))
        path = tuple(part.strip() for part in key.split("."))
        if not all(path):
            raise PipelineConfigError(_one_line(
                f"{source}: cannot tell which key this sets (expected section.key or section.key.subkey)"
            ))
        result.append((path, _parse_value(text), source))
    return result


# ---------------------------------------------------------------------------------- validation


def _got(v: Any) -> str:
    """``"got <kind> <value>"`` with the value spelled as in TOML (true, not True)."""
    return f"got {describe_value(v)}"


def _check_keys(table: dict, known: Sequence[str], where: tuple[str, ...], sources: _Sources) -> None:
    for key in table:
        if key not in known:
            raise sources.error(where + (key,), f"unknown key (known: {', '.join(known)})")


def _table(raw: dict, name: str, sources: _Sources) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise sources.error((name,), f"must be a table, got {kind_of(value)}")
    return value


def _address_problem(addr: str, *, bind: bool) -> str | None:
    """Why ``addr`` is not a usable address (``bind``: for binding), or None if it is."""
    scheme, sep, rest = addr.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc"):
        return f"{addr!r} must start with tcp://, ipc:// or inproc://"
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            return f"{addr!r} must be tcp://HOST:PORT"
        if not re.fullmatch(r"[0-9]+", port) or not 1 <= int(port) <= 65535:
            # "*" (an ephemeral port) is refused too: the connecting side must know the port.
            return f"{addr!r}: port {port!r} must be an integer from 1 to 65535"
        if host == "*":
            if not bind:
                return f"{addr!r}: host * is valid in bind only (connect needs the binder's address)"
        elif host.startswith("["):
            try:
                if not host.endswith("]"):
                    raise ValueError
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                return f"{addr!r}: {host!r} is not a bracketed IPv6 address"
        elif ":" in host:
            return f"{addr!r}: an IPv6 host goes in brackets, e.g. tcp://[::1]:{port}"
        elif not _HOSTNAME.match(host) or len(host) > 253:
            return f"{addr!r}: {host!r} is not a valid host name or IP address"
        elif re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                return f"{addr!r}: {host!r} is not a valid IPv4 address"
        return None
    if not rest:
        return f"{addr!r}: empty {'path' if scheme == 'ipc' else 'name'}"
    if scheme == "ipc":
        if rest == "*":
            return f"{addr!r}: ipc://* binds a random path that the other side cannot know"
        size = len(rest.encode("utf-8"))
        if size > IPC_MAX_BYTES:
            return f"{addr!r}: path is {size} bytes, at most {IPC_MAX_BYTES} (it must fit in sun_path)"
    return None


def _tcp_host_port(addr: str) -> tuple[str, str]:
    host, _, port = addr[len("tcp://"):].rpartition(":")
    return host, port


def _binds_overlap(a: str, b: str) -> bool:
    """Whether binding both ``a`` and ``b`` on one host fails (a wildcard covers every host)."""
    if a == b:
        return True
    if not (a.startswith("tcp://") and b.startswith("tcp://")):
        return False
    (host_a, port_a), (host_b, port_b) = _tcp_host_port(a), _tcp_host_port(b)
    return port_a == port_b and (host_a in _WILDCARD_HOSTS or host_b in _WILDCARD_HOSTS)


def _parse_endpoint(name: str, raw: Any, sources: _Sources) -> Endpoint:
    where = ("endpoints", name)
    if not _ENDPOINT_NAME.match(name) or "__" in name:
        raise sources.error(where, "endpoint names are lower-case letters, digits and single '_' "
                                   "(environment overrides lower-case names and split them on '__')")
    if not isinstance(raw, dict):
        raise sources.error(where, f"must be a table like {{ connect = \"...\", binder = \"...\" }}, "
                                   f"got {kind_of(raw)}")
    _check_keys(raw, _ENDPOINT_KEYS, where, sources)
    for key in ("connect", "binder"):
        if key not in raw:
            raise sources.error(where + (key,), "missing (every endpoint needs connect and binder)")
    for key in _ENDPOINT_KEYS:
        if key in raw and not isinstance(raw[key], str):
            raise sources.error(where + (key,), f"must be a string, {_got(raw[key])}")
    binder = raw["binder"]
    if binder not in SERVICES:
        raise sources.error(where + ("binder",), f"{binder!r} is not a service (one of: {', '.join(SERVICES)})")
    allowed = REQUIRED_ENDPOINTS.get(name)
    if allowed is not None and binder not in allowed:
        if len(allowed) == 1:
            why = f"subscribers always connect, so {allowed[0]} must bind its own telemetry"
        else:
            why = f"it links {allowed[0]} and {allowed[1]}, so one of them must bind it"
        raise sources.error(where + ("binder",), f"{binder!r} cannot bind {name} ({why})")
    connect = raw["connect"]
    bind = raw.get("bind", connect)
    problem = _address_problem(connect, bind=False)
    if problem:
        raise sources.error(where + ("connect",), problem)
    # A bind left out is the connect address, so its problems are reported as connect's.
    bind_key = where + (("bind",) if "bind" in raw else ("connect",))
    problem = _address_problem(bind, bind=True)
    if problem:
        raise sources.error(bind_key, problem)
    if bind.partition("://")[0] != connect.partition("://")[0]:
        raise sources.error(bind_key, f"bind {bind!r} and connect {connect!r} must use the same transport")
    if connect.startswith("inproc://") and bind != connect:
        raise sources.error(bind_key, "inproc has no separate bind address: bind must equal connect")
    return Endpoint(name=name, connect=connect, bind=bind, binder=binder)


def _parse_endpoints(raw: dict, sources: _Sources) -> dict[str, Endpoint]:
    if "endpoints" not in raw:
        raise sources.error(("endpoints",), f"missing table (required: {', '.join(REQUIRED_ENDPOINTS)})")
    table = _table(raw, "endpoints", sources)
    endpoints = {name: _parse_endpoint(name, value, sources) for name, value in table.items()}
    for name in REQUIRED_ENDPOINTS:
        if name not in endpoints:
            raise sources.error(("endpoints", name), f"missing (required: {', '.join(REQUIRED_ENDPOINTS)})")

    def key_of(ep: Endpoint, field: str) -> tuple[str, ...]:
        # Blame the key that was actually written: a bind left out is the connect address.
        written = field if field in table[ep.name] else "connect"
        return ("endpoints", ep.name, written)

    def blame(a: Endpoint, b: Endpoint, field: str) -> tuple[Endpoint, Endpoint]:
        # Of a clashing pair, report the one set last (an override, not the file it collides
        # with), else one whose key is written out, else the later one (a).
        def weight(ep: Endpoint) -> tuple[int, bool]:
            return sources.rank(key_of(ep, field)), field in table[ep.name]
        return (b, a) if weight(b) > weight(a) else (a, b)

    def same_host(a: Endpoint, b: Endpoint) -> bool:
        # Bind clashes are only certain on one host: the same binder, the same connect address,
        # or one specific bind address. Services on different LAN hosts may each bind tcp://*:5560.
        if a.binder == b.binder or a.connect == b.connect:
            return True
        return a.bind == b.bind and not (a.is_tcp and _tcp_host_port(a.bind)[0] in _WILDCARD_HOSTS)

    seen: list[Endpoint] = []
    for ep in endpoints.values():
        for other in seen:
            if _binds_overlap(ep.bind, other.bind) and same_host(ep, other):
                bad, first = blame(ep, other, "bind")
                if ep.binder == other.binder:
                    why = f"both bound by {ep.binder}"
                elif ep.connect == other.connect:
                    why = "the same connect address too, so the second bind fails"
                else:
                    why = "the same address: the second bind fails"
                raise sources.error(key_of(bad, "bind"),
                                    f"bind {bad.bind!r} clashes with endpoints.{first.name} ({why})")
            if ep.connect == other.connect:
                bad, first = blame(ep, other, "connect")
                raise sources.error(key_of(bad, "connect"),
                                    f"same address as endpoints.{first.name}.connect "
                                    f"(peers of one would reach the other's socket)")
        seen.append(ep)
    return endpoints


def _parse_options(raw: dict, name: str, cls: type, sources: _Sources) -> Any:
    try:
        return parse_table(cls, _table(raw, name, sources))
    except SettingsError as exc:
        raise sources.error((name, exc.key), exc.why) from None


def _validate(raw: dict, sources: _Sources, source: str) -> PipelineConfig:
    for key in raw:
        if key not in _TABLES:
            raise sources.error((key,), f"unknown table (known: {', '.join(_TABLES)})")
    endpoints = _parse_endpoints(raw, sources)
    bus = _parse_options(raw, "bus", BusOptions, sources)
    security = _parse_options(raw, "security", SecurityOptions, sources)
    # Made absolute now, relative to the working directory, so a later chdir cannot move it.
    security = replace(security, keys_dir=security.keys_dir.absolute())
    services = {name: dict(_table(raw, name, sources)) for name in SETTINGS_TABLES}
    return PipelineConfig(endpoints=endpoints, bus=bus, security=security, services=services, source=source,
                          sources=sources)


# ------------------------------------------------------------------------------------- loading


def _read_toml(path: Path, source: str, origin: str = "") -> dict:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PipelineConfigError(_one_line(f"{source}: no such config file{origin}")) from None
    except IsADirectoryError:
        raise PipelineConfigError(_one_line(f"{source}: is a folder, not a config file{origin}")) from None
    except OSError as exc:
        raise PipelineConfigError(_one_line(f"{source}: cannot read{origin} ({exc.strerror or exc})")) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineConfigError(_one_line(
            f"{source}: not valid TOML (not UTF-8: byte {data[exc.start]:#04x} at offset {exc.start})"
        )) from None
    try:
        # tomllib's message ends with "(at line L, column C)".
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineConfigError(_one_line(f"{source}: not valid TOML ({exc})")) from None


def load_pipeline_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> PipelineConfig:
    """Read, layer and validate the pipeline config.

    Args:
        path: the TOML file; None means ``$LLVC_PIPELINE_CONFIG`` if set and non-empty, else
            :data:`DEFAULT_PIPELINE_CONFIG`.
        env: the environment to read ``LLVC_PIPELINE_CONFIG`` and ``LLVC__*`` overrides from;
            None means ``os.environ``. Pass ``{}`` to ignore the environment.
        overrides: ``"section.key=value"`` strings (``--set``), applied last, in order.

    Returns:
        The validated :class:`PipelineConfig`.

    Raises:
        PipelineConfigError: the file is missing, unreadable or not TOML, or a key is unknown,
            of the wrong type or impossible. The message names the layer and the dotted key.
    """
    env = os.environ if env is None else env
    origin = ""
    if path is not None:
        file_path = Path(path)
    elif env.get(CONFIG_ENV_VAR):
        file_path = Path(env[CONFIG_ENV_VAR])
        # A bad path there is reported with its origin: nothing on the command line shows it.
        origin = f" (from env {CONFIG_ENV_VAR})"
    else:
        file_path = DEFAULT_PIPELINE_CONFIG
    file_source = str(file_path)
    raw = _read_toml(file_path, file_source, origin)

    sources = _Sources(file_source)
    applied = []
    for override_path, value, source in _env_overrides(env) + _cli_overrides(overrides):
        _apply(raw, sources, override_path, value, source)
        applied.append(source)
    source = file_source if not applied else f"{file_source} + " + " + ".join(applied)
    return _validate(raw, sources, source)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--pipeline-config PATH`` and repeatable ``--set KEY=VALUE`` to ``parser``."""
    group = parser.add_argument_group("pipeline config")
    group.add_argument(
        "--pipeline-config",
        metavar="PATH",
        default=None,
        help=f"pipeline config file (default: ${CONFIG_ENV_VAR}, else config/pipeline.toml)",
    )
    group.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=None,  # not []: argparse would append to the shared default list
        help="override one config key, e.g. --set bus.send_hwm=8; repeatable; "
             f"wins over the file and {ENV_PREFIX}* environment variables",
    )


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The pipeline config for parsed ``args`` (see :func:`add_config_arguments`), with ``os.environ``."""
    return load_pipeline_config(
        getattr(args, "pipeline_config", None),
        env=os.environ,
        overrides=getattr(args, "set", None) or (),
    )
