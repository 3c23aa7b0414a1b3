"""What every pipeline service shares: the model settings, logging, the run loop, heartbeats, and
the bookkeeping of counters and rate-limited reports.

A service is a small class with :meth:`Service.setup`, :meth:`Service.loop_once` and
:meth:`Service.teardown`. :func:`run_service` installs signal handlers that only set a flag,
publishes a :class:`~common.telemetry.Heartbeat` (readiness, counters, the service's status)
every ``bus.heartbeat_interval_s``, flushes rate-limited reports after every turn, and stops
within a second of SIGTERM/SIGINT because ``loop_once`` never blocks for more than ~100 ms.
What services publish is :mod:`common.telemetry`'s records, nothing else.

Logs: one line per record on stderr, ``<iso time> <service> <LEVEL> <message> key=value ...``.
Under ``llvc run`` (``LLVC_RUN_DIR`` set) a process also leaves ``<service>.exit.json`` in the
run folder when it ends: its pid, exit status and, for a failed setup (status 2), the one-line
reason; ``llvc run`` reads it to tell a configuration error from a crash.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.config import PipelineConfig, PipelineConfigError, add_config_arguments, config_from_args
from common.files import write_atomic
from common.realtime import MAX_PRIORITY, Scheduling, freeze_garbage, request_fifo
from common.settings import at_least, one_of, setting
from common.telemetry import Counter, Event, Heartbeat, Record, Reject, SoundFrame

from . import early_stop

#: Exit status of a service whose setup failed (bad config, missing file, port in use).
SETUP_FAILED = 2
#: Exit status after too many consecutive loop errors (supervisord starts it again).
LOOP_FAILED = 1
#: Consecutive loop errors that end the process.
MAX_LOOP_ERRORS = 100
#: Frequent trouble (underruns, drops, rejects, resets) is reported at most this often per kind.
REPORT_INTERVAL_S = 0.5


# --------------------------------------------------------------------------- logging
def _fmt_value(v: Any) -> str:
    text = f"{v:.3f}" if isinstance(v, float) else str(v)
    text = " ".join(text.split())  # one line, whatever the value holds
    return f'"{text}"' if (" " in text or not text) else text


def log(service: str, level: str, message: str, **fields: Any) -> None:
    """Write one structured log line to stderr."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    extra = "".join(f" {k}={_fmt_value(v)}" for k, v in fields.items())
    sys.stderr.write(f"{now} {service} {level.upper()} {' '.join(message.split())}{extra}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelSettings:
    """The shared ``[model]`` table: capture needs the chunk geometry, inference the model."""

    checkpoint: str = setting("")
    config: str = setting("")
    chunk_factor: int = setting(1, at_least(1))
    kind: str = setting("llvc", one_of("llvc", "passthrough"))


def model_spec(cfg: PipelineConfig, overrides: Mapping[str, Any] | None = None):
    """``(settings, spec)``: the validated ``[model]`` table (plus a command's own flags) and the
    :class:`~models.spec.ModelSpec` it names. A bad model config is one
    :class:`PipelineConfigError` line."""
    from models.config import ConfigError
    from models.spec import ModelSpec

    m = cfg.settings("model", ModelSettings, overrides)
    try:
        return m, ModelSpec.resolve(m.checkpoint, m.config, m.chunk_factor)
    except ConfigError as exc:
        raise PipelineConfigError(f"{cfg.origin('model', 'config')}: model.config: {exc}") from None


# --------------------------------------------------------------------------- reports
class RateLimited:
    """Frequent happenings of one kind, let out at most once per ``interval_s``.

    :meth:`add` sums the counts and keeps the latest fields; :meth:`take` hands them over when
    one is due (the first at once, later ones no sooner than ``interval_s`` after the last), with
    ``times`` when more than one happening went into it.
    """

    def __init__(self, interval_s: float = REPORT_INTERVAL_S):
        self.interval_s = interval_s
        self._counts: dict[str, int] = {}
        self._fields: dict[str, Any] = {}
        self._times = 0
        self._next = 0.0

    def add(self, counts: Mapping[str, int], fields: Mapping[str, Any]) -> None:
        """One happening: ``counts`` are summed, ``fields`` replace the previous ones."""
        for k, v in counts.items():
            self._counts[k] = self._counts.get(k, 0) + v
        self._fields.update(fields)
        self._times += 1

    def take(self, now: float) -> tuple[dict[str, Any], int] | None:
        """``(fields and summed counts, happenings)`` if any are pending and one is due now."""
        if not self._times or now < self._next:
            return None
        out, times = {**self._counts, **self._fields}, self._times
        self._counts, self._fields, self._times = {}, {}, 0
        self._next = now + self.interval_s
        return out, times


# --------------------------------------------------------------------------- services
@dataclass(frozen=True)
class RealtimeSettings:
    """The ``[realtime]`` table: how the audio path's processes (capture, inference, playback)
    are scheduled once set up (:mod:`common.realtime`); the monitor and dashboard never change."""

    # Off by default for now; 10 (JACK's default) measured 3-13x fewer underruns here, and what
    # keeps it off is in README "Real-time scheduling".
    priority: int = setting(0, lambda v: None if 0 <= v <= MAX_PRIORITY else
                            f"must be 0 (normal scheduling) or 1..{MAX_PRIORITY} (SCHED_FIFO)")


class Service:
    """Base class: subclasses set :attr:`name` and implement setup / loop_once / teardown."""

    name = "service"
    #: On the audio path: scheduled by ``[realtime]`` (see :func:`run_service`).
    audio_path = False

    def __init__(self, cfg: PipelineConfig, args: argparse.Namespace | None = None):
        self.cfg = cfg
        self.args = args
        self.stop_requested = False
        self.ready = False
        self.counters: dict[str, int] = {}
        self.started = time.monotonic()
        self.bus = None
        self.telemetry = None
        self._mirrors: list[Callable[[], Mapping[str, int]]] = []
        self._reports: dict[str, tuple[RateLimited, str, str, type[Event] | None]] = {}
        self._receivers: list[tuple[Any, list[int]]] = []
        #: How this process is scheduled, once set up (a status field of the audio services).
        self.scheduling: Scheduling | None = None

    @property
    def scheduling_status(self) -> str | None:
        """:attr:`scheduling` as the audio services' status field says it."""
        return str(self.scheduling) if self.scheduling is not None else None

    # ------------------------------------------------------------------ to override
    def setup(self) -> None:
        """Open sockets, load what is needed; raise on bad config (the process exits 2)."""

    def loop_once(self) -> None:
        """Do one bounded slice of work (return within ~100 ms so shutdown stays prompt)."""
        time.sleep(0.1)

    def teardown(self) -> None:
        """Release everything; called once, also after a failed setup."""

    def status(self) -> Any:
        """The heartbeat's status: this service's record from :mod:`common.telemetry`."""
        return None

    # ------------------------------------------------------------------ counters
    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (reported in every heartbeat)."""
        self.counters[name] = self.counters.get(name, 0) + n

    def mirror(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Report counters another object keeps: ``source()`` is copied into :attr:`counters`
        before every heartbeat (and by :meth:`refresh_counters`)."""
        self._mirrors.append(source)

    def refresh_counters(self) -> dict[str, int]:
        """:attr:`counters` with every mirrored source copied in."""
        for source in self._mirrors:
            self.counters.update(source())
        return self.counters

    # ------------------------------------------------------------------ telemetry
    def log(self, level: str, message: str, **fields: Any) -> None:
        """One structured log line from this service."""
        log(self.name, level, message, **fields)

    def publish(self, record: Record) -> None:
        """Publish a telemetry record (if telemetry is up)."""
        if self.telemetry is not None:
            self.telemetry.publish(record)

    def level_meter(self):
        """A :class:`~common.levels.LevelMeter` whose frames :meth:`publish_levels` publishes as
        :class:`~common.telemetry.SoundFrame`\\ s, or ``None`` when ``bus.sound_frame_s`` is 0."""
        from common.audio import SAMPLE_RATE
        from common.levels import LevelMeter

        frame_s = self.cfg.bus.sound_frame_s
        return LevelMeter(SAMPLE_RATE, frame_s) if frame_s else None

    def publish_levels(self, meter) -> None:
        """Measure and publish every frame ``meter`` has completed (in the loop thread)."""
        if meter is not None:
            frame_ms = meter.frame_len * 1000 / meter.sample_rate
            for f in meter.frames():
                self.publish(SoundFrame(frame_ms, f.rms_dbfs, f.peak_dbfs, f.spectrum_db))

    def notice(self, key: str, message: str, counts: Mapping[str, int] | None = None,
               event: type[Event] | None = None, level: str = "warning", **fields: Any) -> None:
        """Something that may happen often: a ``level`` log line and, with ``event``, an event
        made from the fields and counts, both at most once per :data:`REPORT_INTERVAL_S` per
        ``key``. In between, ``counts`` are summed and the latest ``fields`` kept."""
        entry = self._reports.get(key)
        if entry is None:
            entry = self._reports[key] = (RateLimited(), message, level, event)
        entry[0].add(counts or {}, fields)

    def flush_reports(self, now: float | None = None) -> None:
        """Let out every report that is due (:func:`run_service` calls it after every turn)."""
        now = time.monotonic() if now is None else now
        self._watch_receivers()
        for limiter, message, level, event in self._reports.values():
            taken = limiter.take(now)
            if taken is None:
                continue
            values, times = taken
            if event is not None:
                self.publish(event(**values))
            self.log(level, message, **values, **({"times": times} if times > 1 else {}))

    def watch_rejects(self, receiver: Any, counter: str = Counter.REJECTED) -> None:
        """Mirror ``receiver.rejected`` as ``counter`` and report new rejects (event ``reject``,
        with the receiver's last reason) at most twice a second."""
        self._receivers.append((receiver, [0]))
        self.mirror(lambda: {counter: receiver.rejected})

    def _watch_receivers(self) -> None:
        for receiver, seen in self._receivers:
            new = receiver.rejected - seen[0]
            if new > 0:
                seen[0] = receiver.rejected
                self.notice("reject", "rejected malformed input", {"count": new}, Reject,
                            total=receiver.rejected, reason=receiver.last_reject)

    # ------------------------------------------------------------------ the bus
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

    def heartbeat(self) -> dict[str, int]:
        """Publish a :class:`~common.telemetry.Heartbeat`: readiness, counters and :meth:`status`;
        returns the counters it carries."""
        counters = dict(self.refresh_counters())
        if self.telemetry is not None:
            self.telemetry.publish(Heartbeat(self.ready, round(time.monotonic() - self.started, 3),
                                             counters, self.status()))
        return counters

    def request_stop(self, *_: Any) -> None:
        """Signal handler: only sets a flag; the loop notices it within ~100 ms."""
        self.stop_requested = True


def _exit_record_path(name: str) -> Path | None:
    run_dir = os.environ.get("LLVC_RUN_DIR")
    return Path(run_dir) / f"{name}.exit.json" if run_dir else None


def _record_exit(name: str, status: int, error: str | None = None) -> None:
    """Leave ``<service>.exit.json`` in the run folder (see the module docstring)."""
    path = _exit_record_path(name)
    if path is not None:
        try:
            write_atomic(path, json.dumps({"pid": os.getpid(), "status": status, "error": error}) + "\n")
        except OSError:
            pass  # a run folder that is gone: nobody is left to read it


def read_exit_record(run_dir: Path, name: str) -> dict | None:
    """What the newest process of service ``name`` recorded when it ended (``None``: nothing,
    or it is still running)."""
    try:
        record = json.loads((Path(run_dir) / f"{name}.exit.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run_service(service: Service) -> int:
    """Run ``service`` until SIGTERM/SIGINT; returns the process exit status.

    Setup failures are one log line and status :data:`SETUP_FAILED` (supervisord shows it). An
    exception inside the loop is logged and the loop goes on: input from the wire must never
    kill a service; a persistent failure (:data:`MAX_LOOP_ERRORS` in a row) exits
    :data:`LOOP_FAILED` so supervisord restarts the process.
    """
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    if early_stop.asked():
        service.request_stop()  # asked while the process was still importing: stop at once
    record = _exit_record_path(service.name)
    if record is not None:
        record.unlink(missing_ok=True)  # an earlier process's: this one is running now
    try:
        service.setup()
        _schedule(service)
    except Exception as exc:  # noqa: BLE001 - any setup failure ends the process with one line
        error = " ".join(str(exc).split()) or type(exc).__name__
        service.log("error", f"cannot start: {error}", error=type(exc).__name__)
        service.teardown()
        _record_exit(service.name, SETUP_FAILED, error)
        return SETUP_FAILED
    service.log("info", "started", pid=os.getpid())
    status, error = 0, None
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
            service.flush_reports()
            failures = 0
        except Exception as exc:  # noqa: BLE001 - log, count, keep serving
            failures += 1
            service.count("loop_errors")
            service.log("error", f"loop error: {exc!r}", consecutive=failures)
            if failures >= MAX_LOOP_ERRORS:
                status, error = LOOP_FAILED, f"{MAX_LOOP_ERRORS} loop errors in a row, the last: {exc!r}"
                break
    service.log("info", "stopping")
    try:
        service.flush_reports(float("inf"))  # what was held back is said before the last heartbeat
    except Exception as exc:  # noqa: BLE001 - stopping anyway: say so and go on
        service.log("error", f"cannot report on stopping: {exc!r}")
    final = service.heartbeat()
    # What the final heartbeat carried, in the log too: a subscriber that missed that heartbeat
    # (or was not there) still learns what this process counted in all.
    service.log("info", "final counters", pid=os.getpid(),
                counters=",".join(f"{k}:{v}" for k, v in sorted(final.items())))
    service.teardown()
    service.log("info", "stopped")
    _record_exit(service.name, status, error)
    return status


def _schedule(service: Service) -> None:
    """After set-up, before the loop: freeze what set-up built out of the garbage collector's
    sight, and move an audio-path service to SCHED_FIFO if ``realtime.priority`` asks for it
    (its threads now; what starts later runs at normal priority). A refusal is one warning
    line and the service runs on; the status says either way."""
    freeze_garbage()
    if not service.audio_path:
        return
    priority = service.cfg.settings("realtime", RealtimeSettings).priority
    service.scheduling = request_fifo(priority) if priority else Scheduling("normal")
    refused = service.scheduling.refused is not None
    service.log("warning" if refused else "info", f"scheduling: {service.scheduling}")


def add_service_arguments(p: argparse.ArgumentParser) -> None:
    """Flags every service takes: the pipeline config and ``--set`` overrides."""
    add_config_arguments(p)


def service_main(cls: type[Service], args: argparse.Namespace) -> int:
    """Build ``cls`` from the parsed arguments and run it (the ``run()`` of each service's CLI)."""
    try:
        cfg = config_from_args(args)
    except PipelineConfigError as exc:
        log(cls.name, "error", f"cannot start: {exc}")
        _record_exit(cls.name, SETUP_FAILED, str(exc))
        return SETUP_FAILED
    return run_service(cls(cfg, args))
