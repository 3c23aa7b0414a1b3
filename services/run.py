"""``llvc run``: the whole pipeline under supervisord, its status lines, and its report.

1. Validates the pipeline config and the options, and turns the options into the
   ``LLVC__SECTION__KEY`` environment overrides every service reads (paths made absolute, since
   the services run from the repository root). Prints the dashboard's URL; when it needs a
   token and none is set, makes one and hands it to the dashboard in the environment. With
   ``--session NAME`` (a client of a shared inference server) it adds the overrides that give
   this run's own binds their own addresses (:mod:`services.run_session`).
2. Starts ``supervisord -c supervisord.conf`` in its own session (so a terminal's Ctrl-C reaches
   only this process, which then shuts everything down in order), then starts the programs:
   monitor, dashboard, inference, playback, capture.
3. Prints the monitor's status lines (``event.monitor`` on the telemetry bus) and watches the
   programs: one that cannot start is reported with its own error line instead of a hang.
4. Stops on ``--until-eof`` (playback reports the file stream drained), ``--duration``, Ctrl-C
   or SIGTERM: capture first and monitor last, so the monitor sees everything before it writes
   its report; then supervisord itself. No process is left behind.
5. Prints the report and writes it to ``--report``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path

from common.config import PipelineConfig, PipelineConfigError, add_config_arguments, env_name
from common.files import write_atomic
from common.telemetry import Drained, Status
from models.config import CHECKPOINT_DEFAULT_HELP, CONFIG_DEFAULT_HELP
from services.base import SETUP_FAILED, read_exit_record
from services.run_session import SessionError, session_line, session_problem, session_settings
from services.virtual_mic import OWNER_ENV

REPO = Path(__file__).resolve().parent.parent
SUPERVISORD_CONF = REPO / "supervisord.conf"
START_ORDER = ("monitor", "dashboard", "inference", "playback", "capture")
#: Programs the audio does not need: one that cannot start is a warning, and the rest go on.
OPTIONAL = ("dashboard",)


class RunError(RuntimeError):
    """The pipeline could not run (one line)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc run``'s flags on ``p``."""
    add_config_arguments(p)
    p.add_argument("--source", help="file:PATH | device:NAME | tone | clicks | silence (capture.source)")
    p.add_argument("--sink", help="file:PATH | device:NAME | virtual-mic[:NAME] | null (playback.sink)")
    p.add_argument("--monitor", metavar="SPEC", help="device:NAME: also play the converted voice to this device, "
                   "e.g. headphones (playback.monitor)")
    p.add_argument("--record", metavar="PATH", help="also write what is played to this WAV, beside any sink "
                   "(playback.record)")
    p.add_argument("-p", "--checkpoint", help=f"LLVC checkpoint (model.checkpoint); {CHECKPOINT_DEFAULT_HELP}")
    p.add_argument("-c", "--config", dest="model_config",
                   help=f"model config JSON (model.config); {CONFIG_DEFAULT_HELP}")
    p.add_argument("-n", "--chunk-factor", type=int, help="chunk = 13*16*N samples (model.chunk_factor)")
    p.add_argument("--passthrough", action="store_true", help="identity model with the same chunking (model.kind)")
    p.add_argument("--max-streams", type=int, metavar="N",
                   help="client sessions the inference server converts at once (inference.max_streams)")
    p.add_argument("--report", help="write the final JSON report here")
    p.add_argument("--until-eof", action="store_true", help="stop once a file source is played out")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--services", default=",".join(START_ORDER),
                   help=f"comma-separated subset to run on this host (default: all: {','.join(START_ORDER)})")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the web dashboard")
    p.add_argument("--run-dir", help="folder for logs and the control socket (default: a new temp folder)")
    p.add_argument("--session", metavar="NAME",
                   help="run as client NAME of a shared inference server (capture.session; 1-64 letters, digits, "
                        "'-', '_', '.'), so that several clients run on one host from one config: the local "
                        "telemetry endpoints this run's capture, playback and monitor bind move to "
                        "ipc://RUN_DIR/telemetry_SERVICE.sock, its monitor's /metrics and its dashboard (when "
                        "started) get free ports (printed), and a bare --sink virtual-mic becomes "
                        "virtual-mic:llvc_voice_NAME; keys given with --set here are kept as given, and the "
                        "server's endpoints are never changed")


def _abs_path_spec(spec: str | None, prefix: str = "file:") -> str | None:
    """``file:rel/path`` → ``file:/abs/path`` (services run from the repository root)."""
    if spec and spec.startswith(prefix):
        return prefix + str(Path(spec[len(prefix):]).expanduser().resolve())
    return spec


def build_environment(args: argparse.Namespace, run_dir: Path) -> dict[str, str]:
    """The environment the services get: settings as ``LLVC__`` overrides, plus the run folder."""
    env = dict(os.environ)
    env["LLVC_RUN_DIR"] = str(run_dir)
    env[OWNER_ENV] = "llvc run"  # a playback restarted within the run keeps its virtual microphone
    config_file = args.pipeline_config or os.environ.get("LLVC_PIPELINE_CONFIG")
    if config_file:
        env["LLVC_PIPELINE_CONFIG"] = str(Path(config_file).resolve())
    for item in args.set or []:  # --set wins over the caller's environment, as on the command line
        key, _, value = item.partition("=")
        env[env_name(key)] = value  # verbatim: services parse it exactly as --set would
    settings: dict[str, object] = {}
    if args.source:
        settings["capture.source"] = _abs_path_spec(args.source)
    if args.sink:
        settings["playback.sink"] = _abs_path_spec(args.sink)
    if args.record:
        settings["playback.record"] = str(Path(args.record).expanduser().resolve())
    if args.monitor:
        settings["playback.monitor"] = args.monitor
    if args.checkpoint:
        settings["model.checkpoint"] = str(Path(args.checkpoint).resolve())
    if args.model_config:
        settings["model.config"] = str(Path(args.model_config).resolve())
    if args.chunk_factor is not None:
        settings["model.chunk_factor"] = args.chunk_factor
    if args.max_streams is not None:
        settings["inference.max_streams"] = args.max_streams
    if args.passthrough:
        settings["model.kind"] = "passthrough"
    if args.session is not None:
        settings["capture.session"] = args.session
    settings["monitor.report"] = str(run_dir / "report.json")
    env.update(settings_env(settings))
    return env


def settings_env(settings: dict[str, object]) -> dict[str, str]:
    """The ``LLVC__`` variables that set each dotted key to its value, spelled so that the
    services read back exactly that value."""
    return {env_name(key): json.dumps(value) if isinstance(value, str) and _needs_quotes(value) else str(value)
            for key, value in settings.items()}


def load_environment(args: argparse.Namespace, services: list[str],
                     run_dir: Path) -> tuple[dict[str, str], PipelineConfig, list[str]]:
    """The services' environment, the config they will load from it, and lines to print.

    :func:`build_environment`, then with ``--session`` the settings that make this run's binds
    its own (:func:`services.run_session.session_settings`), computed from the config the
    services would load otherwise and added as overrides. :class:`PipelineConfigError` or
    :class:`SessionError` (one line) when that cannot be done.
    """
    from common.config import load_pipeline_config

    env = build_environment(args, run_dir)
    cfg = load_pipeline_config(env.get("LLVC_PIPELINE_CONFIG"), env=env)
    if args.session is None:
        return env, cfg, []
    own, notes = session_settings(cfg, services, args.session, run_dir, args.set or ())
    env.update(settings_env(own))
    cfg = load_pipeline_config(env.get("LLVC_PIPELINE_CONFIG"), env=env)
    return env, cfg, [session_line(args.session, own), *(f"llvc run: note: {n}" for n in notes)]


def remove_virtual_mic(cfg) -> None:
    """Remove the run's virtual microphone, if its playback plays into one: the run has ended
    (its playback processes leave that to the run, :data:`services.virtual_mic.OWNER_ENV`)."""
    from services.playback import playback_settings
    from services.virtual_mic import VirtualMic, VirtualMicError, parse_spec

    name = parse_spec(playback_settings(cfg).sink)
    if name is None:
        return
    try:
        gone = VirtualMic(name).remove()
    except VirtualMicError as exc:
        print(f"llvc run: warning: {exc}", file=sys.stderr, flush=True)
        return
    if gone:
        print(f"llvc run: virtual microphone {name} removed", flush=True)


def _needs_quotes(value: str) -> bool:
    # Values are read as TOML when they parse as TOML; quote strings that would parse as
    # something else (a path never does, but "1" or "true" as a device name would).
    import tomllib

    try:
        tomllib.loads(f"v = {value}")
    except tomllib.TOMLDecodeError:
        return False
    return not (value.startswith('"') and value.endswith('"'))


def prepare_artifact(cfg, services: list[str]) -> None:
    """Fill the ONNX artifact cache before inference starts, so that its backend auto finds the
    fast path (the service itself never exports: a restart must be quick).

    Only when inference is among ``services``, runs the LLVC model with backend ``auto`` (on
    CPU) or ``onnx`` without an artifact, this process can export (torch, onnxruntime,
    onnxscript), and ``$LLVC_NO_EXPORT`` is unset. Prints one line when it exports (~10 s, once
    per checkpoint, config and chunk factor); a failed export is one line too, and inference
    then falls back to eager PyTorch. Bad settings are left for the service to report.
    """
    from models.backends import NO_EXPORT_ENV, ensure_artifact, export_possible, gpu_wanted
    from models.spec import ModelSpec
    from services.base import model_spec
    from services.inference import InferenceSettings

    if "inference" not in services or os.environ.get(NO_EXPORT_ENV, "") not in ("", "0"):
        return
    try:
        m, _ = model_spec(cfg)
        s = cfg.settings("inference", InferenceSettings)
    except PipelineConfigError:
        return
    wanted = (s.backend == "auto" and not gpu_wanted(s.device)) or (s.backend == "onnx" and not s.artifact)
    if m.kind != "llvc" or not wanted or not export_possible():
        return
    try:
        # Relative paths are relative to the repository root, where the services run.
        spec = ModelSpec.resolve(REPO / m.checkpoint if m.checkpoint else "", REPO / m.config if m.config else "",
                                 m.chunk_factor)
        ensure_artifact(spec, threads=s.threads, log=lambda line: print(f"llvc run: {line}", flush=True))
    except Exception as exc:  # noqa: BLE001 - whatever failed, the pipeline still runs (on eager)
        why = " ".join(str(exc).split())[:300] or type(exc).__name__
        print(f"llvc run: warning: could not export the ONNX step ({why}); inference falls back to eager PyTorch",
              file=sys.stderr, flush=True)


def dashboard_line(cfg, env: dict[str, str]) -> str:
    """``llvc run: dashboard URL``. A dashboard that needs a token gets one: the configured one,
    or one made here and put in ``env`` (so a restarted dashboard keeps it); either way the URL
    carries it, printed this once."""
    import secrets

    from services.dashboard import DashboardSettings, dashboard_url

    s = cfg.settings("dashboard", DashboardSettings)
    token = s.token
    if s.needs_token() and not token:
        token = env["LLVC__DASHBOARD__TOKEN"] = secrets.token_urlsafe(18)
    return f"llvc run: dashboard {dashboard_url(s, token)}"


def say_default_model(cfg, services: list[str]) -> None:
    """One line naming the embedded demo voice when inference runs here on it (no checkpoint or
    config given); bad settings are left for the service to report."""
    from models.spec import demo_model_line
    from services.base import model_spec

    if "inference" not in services:
        return
    try:
        m, spec = model_spec(cfg)
    except PipelineConfigError:
        return
    if m.kind == "llvc" and spec.demo:
        print(demo_model_line("llvc run"), flush=True)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if ``llvc run`` itself dies (even by SIGKILL), so that
    supervisord then stops the services instead of running on unattended (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    """A supervisord child process and its XML-RPC control interface."""

    def __init__(self, run_dir: Path, env: dict[str, str]):
        self.run_dir = run_dir
        self.socket = run_dir / "supervisor.sock"
        supervisord = Path(sys.executable).parent / "supervisord"
        self.proc = subprocess.Popen(
            [str(supervisord), "-c", str(SUPERVISORD_CONF)], env=env, cwd=REPO,
            stdout=open(run_dir / "supervisord.out", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: a terminal Ctrl-C reaches only us
            preexec_fn=_die_with_parent)
        self.rpc = self._connect()

    def _connect(self):
        from supervisor.xmlrpc import SupervisorTransport

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.run_dir / "supervisord.out").read_text(errors="replace").strip().splitlines()
                raise RunError(f"supervisord exited at start: {tail[-1] if tail else 'no output'}")
            if self.socket.exists():
                proxy = xmlrpc.client.ServerProxy(
                    "http://127.0.0.1", transport=SupervisorTransport(None, None, f"unix://{self.socket}"))
                try:
                    if proxy.supervisor.getState()["statename"] == "RUNNING":
                        return proxy
                except (OSError, xmlrpc.client.Fault):
                    pass
            time.sleep(0.05)
        raise RunError("supervisord did not come up within 15 s")

    def start(self, name: str) -> None:
        """Start a program without waiting for it to be up (we watch its state instead)."""
        self.rpc.supervisor.startProcess(name, False)

    def states(self) -> dict[str, dict]:
        """Program name → supervisord's process info."""
        return {p["name"]: p for p in self.rpc.supervisor.getAllProcessInfo()}

    def stop(self, name: str) -> None:
        """Stop a program and wait for it (no-op if it is not running)."""
        try:
            self.rpc.supervisor.stopProcess(name, True)
        except xmlrpc.client.Fault:
            pass  # NOT_RUNNING

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop supervisord; make sure nothing it started survives."""
        pids = set()
        try:
            pids = {p["pid"] for p in self.states().values() if p["pid"]}
            self.rpc.supervisor.shutdown()
        except (OSError, xmlrpc.client.Fault, ConnectionError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for pid in pids:  # belt and braces: a program's group must not outlive its supervisor
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _last_error(run_dir: Path, name: str) -> str:
    """What a failed program said last: its exit record's error, else its log's last error line."""
    record = read_exit_record(run_dir, name)
    if record and record.get("error"):
        return str(record["error"])
    log = run_dir / f"{name}.log"
    if not log.exists():
        return "no log"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if " ERROR " in line]
    return (errors or lines or ["no output"])[-1]


def check_program(run_dir: Path, name: str, info: dict) -> None:
    """Raise :class:`RunError` if program ``name`` cannot run, judged by its supervisord state and
    the exit status its process recorded (``services.base.read_exit_record``).

    A setup failure (exit status ``SETUP_FAILED``: bad config, missing file, port in use) cannot
    be helped by retrying: it is reported at once, whatever supervisord would do next (it may
    have outlived ``startsecs`` while importing torch, or be in BACKOFF before its retries). A
    program supervisord gave up on (FATAL) is reported with its last error.
    """
    state = info["statename"]
    if state in ("BACKOFF", "EXITED", "FATAL"):
        record = read_exit_record(run_dir, name)
        if record is not None and record.get("status") == SETUP_FAILED:
            raise RunError(f"{name} cannot start: {record.get('error')}")
    if state == "FATAL":
        raise RunError(f"{name} failed: {_last_error(run_dir, name)}")


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc run``."""
    from common.bus import Bus, BusError

    stop = {"signal": None}

    def on_signal(signum, frame):  # only sets a flag; the loop below acts on it
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def fail(msg: str) -> int:
        print(f"llvc run: error: {msg}", file=sys.stderr)
        return 2

    services = [s.strip() for s in args.services.split(",") if s.strip()]
    if args.no_dashboard:
        services = [s for s in services if s != "dashboard"]
    unknown = [s for s in services if s not in START_ORDER]
    if unknown or not services:
        return fail(f"--services: unknown service {unknown[0] if unknown else '(none)'} "
                    f"(known: {', '.join(START_ORDER)})")
    if args.session is not None and (problem := session_problem(args.session)):
        return fail(problem)
    if args.until_eof and not (args.source or "").startswith("file:"):
        return fail("--until-eof needs --source file:PATH")
    if args.source and args.source.startswith("file:") and not Path(args.source[5:]).is_file():
        return fail(f"{args.source[5:]}: no such source file")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        return fail(f"{args.checkpoint}: no such checkpoint file")
    run_dir = Path(args.run_dir).resolve() if args.run_dir else Path(tempfile.mkdtemp(prefix="llvc-run-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        # Validate with exactly what the services will see.
        from common.security import SecurityError, load_keys
        from services.base import model_spec

        env, cfg, session_lines = load_environment(args, services, run_dir)
        model_spec(cfg)
        dashboard = dashboard_line(cfg, env) if "dashboard" in services else None
        if cfg.security.curve:  # our own telemetry tap needs them too: say so before starting anything
            load_keys(cfg.security.keys_dir, cfg.security.client_key)
    except (PipelineConfigError, SecurityError, SessionError) as exc:
        return fail(str(exc))
    print(f"llvc run: run folder {run_dir} (logs), services: {', '.join(services)}", flush=True)
    for line in session_lines:
        print(line, flush=True)
    if dashboard:
        print(dashboard, flush=True)
    say_default_model(cfg, services)
    prepare_artifact(cfg, services)
    if stop["signal"] is not None:  # interrupted while exporting: nothing was started yet
        return 130 if stop["signal"] == signal.SIGINT else 143

    status = 0
    sup = None
    bus = None
    try:
        sup = Supervisor(run_dir, env)
        bus = Bus(cfg, "tap")
        events = bus.subscriber(["event."])
        for name in START_ORDER:
            if name in services:
                sup.start(name)
        started = time.monotonic()
        deadline = started + args.duration if args.duration else None
        last_states: dict[str, str] = {}
        next_check = 0.0
        while stop["signal"] is None:
            msg = events.recv(timeout_ms=100)
            if isinstance(msg, Status) and msg.service == "monitor":
                print(msg.line, flush=True)
            elif args.until_eof and isinstance(msg, Drained) and msg.service == "playback":
                print("llvc run: source played out", flush=True)
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if now >= next_check:
                next_check = now + 0.5
                for name, info in sup.states().items():
                    if name not in services:
                        continue
                    state = info["statename"]
                    if state != last_states.get(name):
                        last_states[name] = state
                        if state in ("RUNNING", "BACKOFF", "FATAL", "EXITED"):
                            print(f"llvc run: {name} {state.lower()} (pid {info['pid'] or '-'})", flush=True)
                    try:
                        check_program(run_dir, name, info)
                    except RunError as exc:
                        if name not in OPTIONAL:
                            raise
                        # A tap that cannot start (its port taken, say) is no reason to stop the audio.
                        print(f"llvc run: warning: {exc}; the pipeline runs without it", file=sys.stderr, flush=True)
                        sup.stop(name)
                        services.remove(name)
        if stop["signal"] is not None:
            print("llvc run: interrupted, shutting down", flush=True)
            status = 130 if stop["signal"] == signal.SIGINT else 143
    except (RunError, BusError) as exc:
        print(f"llvc run: error: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        if bus is not None:
            bus.close()
        if sup is not None:
            for name in reversed(START_ORDER):  # capture first, monitor last
                sup.stop(name)
            sup.shutdown()
        if "playback" in services:
            remove_virtual_mic(cfg)
    report_path = run_dir / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        text = json.dumps(report, indent=2)
        print(text)
        if (report.get("model") or {}).get("untrained"):
            print("llvc run: NOTE: this ran an UNTRAINED seeded model (a model config without a checkpoint): "
                  "the output is not a converted voice; see README 'Models'", file=sys.stderr)
        if args.report:
            out = Path(args.report)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, text + "\n")
    elif status == 0 and "monitor" in services:
        print("llvc run: error: the monitor wrote no report", file=sys.stderr)
        status = 1
    return status
