"""What every pipeline service shares: settings, logging, the run loop, heartbeats.

A service is a small class with :meth:`Service.setup`, :meth:`Service.loop_once` and
:meth:`Service.teardown`. :func:`run_service` installs signal handlers that only set a flag,
publishes a heartbeat (with the service's cumulative counters) every
``bus.heartbeat_interval_s``, and stops within a second of SIGTERM/SIGINT because
``loop_once`` never blocks for more than ~100 ms.

Telemetry conventions (the monitor and ``llvc run`` rely on them):

* ``heartbeat.<service>``: ``{"ready": bool, "counters": {name: int}, ...status}``; counters are
  cumulative since this process started (the monitor adds up across restarts by pid). Counter
  names ``dropped_<cause>`` are drops by cause.
* ``event.<service>``: ``{"event": name, ...}`` for things that happen (``stream_start``,
  ``reset``, ``underrun``, ``eof``, ``drained``, ``reject``, ``status``, ...).
* ``chunk.<service>``: per-chunk timing (inference: ``proc_ms``; playback: ``e2e_ms``).

Logs: one line per record on stderr, ``<iso time> <service> <LEVEL> <message> key=value ...``.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, Callable

from common.config import PipelineConfig, PipelineConfigError, add_config_arguments, config_from_args


# --------------------------------------------------------------------------- logging
def _fmt_value(v: Any) -> str:
    text = f"{v:.3f}" if isinstance(v, float) else str(v)
    text = " ".join(text.split())  # one line, whatever the value holds
    return f'"{text}"' if (" " in text or not text) else text


def log(service: str, level: str, message: str, **fields: Any) -> None:
    """Write one structured log line to stderr."""
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    extra = "".join(f" {k}={_fmt_value(v)}" for k, v in fields.items())
    sys.stderr.write(f"{now} {service} {level.upper()} {' '.join(message.split())}{extra}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One key of a settings table: its type, default, and an optional check.

    ``check(value)`` returns ``None`` when the value is fine, else the reason it is not.
    """

    kind: type | tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] | None = None


def positive(v) -> str | None:
    """Check: a number > 0."""
    return None if v > 0 and math.isfinite(v) else "must be > 0"


def non_negative(v) -> str | None:
    """Check: a number >= 0."""
    return None if v >= 0 and math.isfinite(v) else "must be >= 0"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    """Check: one of ``choices``."""
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def parse_settings(cfg: PipelineConfig, table: str, schema: dict[str, Setting],
                   overrides: dict[str, Any] | None = None) -> SimpleNamespace:
    """Validate ``cfg.services[table]`` (plus CLI ``overrides``) against ``schema``.

    Unknown keys, wrong types (a bool is not a number) and failed checks raise one-line
    :class:`PipelineConfigError` naming ``table.key`` and where the value came from: the
    config's layers, or "command line" for a value given by a service's own flag.
    Missing keys take the default.
    """
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    raw = {**cfg.services.get(table, {}), **flags}

    def error(key: str, why: str) -> PipelineConfigError:
        where = "command line" if key in flags else cfg.source
        return PipelineConfigError(f"{where}: {table}.{key}: {why}")

    for key in raw:
        if key not in schema:
            raise error(key, f"unknown key (known: {', '.join(sorted(schema))})")
    values = {}
    for key, spec in schema.items():
        v = raw.get(key, spec.default)
        kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
        if float in kinds and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise error(key, f"must be {names}, got {v!r}")
        reason = spec.check(v) if spec.check else None
        if reason:
            raise error(key, f"{reason}, got {v!r}")
        values[key] = v
    return SimpleNamespace(**values)


#: The shared ``[model]`` table: capture needs the chunk geometry, inference the model.
MODEL_SCHEMA = {
    "checkpoint": Setting(str, ""),
    "config": Setting(str, ""),
    "chunk_factor": Setting(int, 1, lambda v: None if v >= 1 else "must be >= 1"),
    "kind": Setting(str, "llvc", one_of("llvc", "passthrough")),
}


def model_settings(cfg: PipelineConfig) -> SimpleNamespace:
    """The validated ``[model]`` table."""
    return parse_settings(cfg, "model", MODEL_SCHEMA)


@dataclass(frozen=True)
class ChunkGeometry:
    """Chunking that capture and inference agree on, from the model config (no torch needed)."""

    chunk_len: int   # samples per chunk: dec_chunk_size * L * chunk_factor
    head_len: int    # samples of lookahead head that start a stream (L with lookahead, else 0)
    sample_rate: int

    @property
    def chunk_s(self) -> float:
        """Chunk duration in seconds."""
        return self.chunk_len / self.sample_rate


def chunk_geometry(cfg: PipelineConfig) -> ChunkGeometry:
    """The chunk geometry for this pipeline config's ``[model]`` table."""
    from models.config import ConfigError, load_config, resolve_model_files

    m = model_settings(cfg)
    try:
        mc = load_config(resolve_model_files(m.checkpoint, m.config).config)
    except ConfigError as exc:
        raise PipelineConfigError(f"{cfg.source}: model.config: {exc}") from None
    return ChunkGeometry(mc.window_samples * m.chunk_factor, mc.L if mc.lookahead else 0, mc.sample_rate)


# --------------------------------------------------------------------------- services
class Service:
    """Base class: subclasses set :attr:`name` and implement setup / loop_once / teardown."""

    name = "service"

    def __init__(self, cfg: PipelineConfig, args: argparse.Namespace | None = None):
        self.cfg = cfg
        self.args = args
        self.stop_requested = False
        self.ready = False
        self.counters: dict[str, int] = {}
        self.started = time.monotonic()
        self.bus = None
        self.telemetry = None

    # ------------------------------------------------------------------ to override
    def setup(self) -> None:
        """Open sockets, load what is needed; raise on bad config (the process exits 2)."""

    def loop_once(self) -> None:
        """Do one bounded slice of work (return within ~100 ms so shutdown stays prompt)."""
        time.sleep(0.1)

    def teardown(self) -> None:
        """Release everything; called once, also after a failed setup."""

    def status(self) -> dict[str, Any]:
        """Extra fields for the heartbeat."""
        return {}

    # ------------------------------------------------------------------ helpers
    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (reported in every heartbeat)."""
        self.counters[name] = self.counters.get(name, 0) + n

    def log(self, level: str, message: str, **fields: Any) -> None:
        """One structured log line from this service."""
        log(self.name, level, message, **fields)

    def event(self, name: str, **fields: Any) -> None:
        """Publish ``event.<service>`` (if telemetry is up)."""
        if self.telemetry is not None:
            self.telemetry.event(name, **fields)

    def open_bus(self):
        """Create :attr:`bus` and this service's telemetry publisher; returns the bus."""
        from common.bus import Bus

        self.bus = Bus(self.cfg, self.name)
        self.telemetry = self.bus.publisher()
        return self.bus

    def close_bus(self) -> None:
        """Close the bus (idempotent; for teardown)."""
        if self.bus is not None:
            self.bus.close()
            self.bus = None
            self.telemetry = None

    def heartbeat(self) -> None:
        """Publish ``heartbeat.<service>`` with readiness, counters and :meth:`status`."""
        if self.telemetry is not None:
            self.telemetry.heartbeat(ready=self.ready, uptime_s=round(time.monotonic() - self.started, 3),
                                     counters=dict(self.counters), **self.status())

    def request_stop(self, *_: Any) -> None:
        """Signal handler: only sets a flag; the loop notices it within ~100 ms."""
        self.stop_requested = True


def run_service(service: Service) -> int:
    """Run ``service`` until SIGTERM/SIGINT; returns the process exit status.

    Setup failures are one log line and status 2 (supervisord shows it). An exception inside
    the loop is logged and the loop goes on: input from the wire must never kill a service;
    a persistent failure (100 in a row) exits 1 so supervisord restarts the process.
    """
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    status = 0
    try:
        service.setup()
    except Exception as exc:  # noqa: BLE001 - any setup failure ends the process with one line
        service.log("error", f"cannot start: {exc}", error=type(exc).__name__)
        service.teardown()
        return 2
    service.log("info", "started", pid=os.getpid())
    interval = service.cfg.bus.heartbeat_interval_s
    next_beat = time.monotonic()
    failures = 0
    while not service.stop_requested:
        now = time.monotonic()
        if now >= next_beat:
            service.heartbeat()
            next_beat = now + interval
        try:
            service.loop_once()
            failures = 0
        except Exception as exc:  # noqa: BLE001 - log, count, keep serving
            failures += 1
            service.count("loop_errors")
            service.log("error", f"loop error: {exc!r}", consecutive=failures)
            if failures >= 100:
                status = 1
                break
    service.log("info", "stopping")
    service.heartbeat()
    service.teardown()
    service.log("info", "stopped")
    return status


def add_service_arguments(p: argparse.ArgumentParser) -> None:
    """Flags every service takes: the pipeline config and ``--set`` overrides."""
    add_config_arguments(p)


def service_main(cls: type[Service], args: argparse.Namespace) -> int:
    """Build ``cls`` from the parsed arguments and run it (the ``run()`` of each service's CLI)."""
    try:
        cfg = config_from_args(args)
    except PipelineConfigError as exc:
        log(cls.name, "error", f"cannot start: {exc}")
        return 2
    return run_service(cls(cfg, args))
