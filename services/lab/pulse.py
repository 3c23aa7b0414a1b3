"""A real PulseAudio server with null sinks: sound devices for tests on machines without a sound card.

The recipe is /work/shared/notes/virtual-audio.md (scripts/virtual-audio.sh does the same by
hand). :meth:`PulseServer.start` runs ``pulseaudio`` with one mono ``module-null-sink`` per
name, its socket under ``root``, the first sink as default sink and its monitor as default
source, and a silent ``pacat`` keepalive per sink (without one, recording an idle null sink's
monitor starts 0.5-1.8 s late). No mocks: clients talk to the server through libpulse.

How PortAudio (python-sounddevice) sees it. PortAudio has no PulseAudio host API here; it goes
through ALSA, and the ALSA ``pulse`` plugin connects to ``PULSE_SERVER``. Measured:

* With only ``PULSE_SERVER`` set, PortAudio lists exactly two devices, ``pulse`` and
  ``default`` (host API ``ALSA``, 32 in / 32 out channels, default rate 44100 Hz whatever the
  sink's rate; PulseAudio resamples). Not one device per sink. They play to the server's default
  sink and record from its default source (here ``sinks[0]`` and ``sinks[0].monitor``).
* A process picks another sink/source with ``PULSE_SINK`` / ``PULSE_SOURCE`` in its
  environment: libpulse honours them for streams opened without a device, which is what the
  ALSA plugin opens for ``pulse`` and ``default``. :meth:`PulseServer.client_env` builds that.
* Named devices: :attr:`PulseServer.env` also sets ``ALSA_CONFIG_PATH`` to the system's
  ``alsa.conf`` plus a file under ``root`` that defines, per sink, an ALSA pcm of the sink's
  name (``type asym``: playback → the sink, capture → its monitor). PortAudio then also lists
  ``llvc_in`` and ``llvc_out``: output to ``llvc_in`` plays into that sink, input from
  ``llvc_in`` records what was played into it (``llvc_in.monitor``). ALSA pcm names cannot
  contain dots, so there is no device called ``llvc_in.monitor``; this plugin version has no
  separate ``playback_device``/``capture_device`` options (a pcm using them does not open),
  and a sink name given as a capture device is refused ("No such entity"), hence ``asym``.
* Clients need nothing else (no HOME, cookie or D-Bus): the server takes anonymous clients.
  A client whose ``PULSE_SERVER`` points to a dead socket sees no ``pulse``/``default``
  devices at all (and libpulse does not autospawn a server when ``PULSE_SERVER`` is set).
* PortAudio reads the device list once, when it initialises (``import sounddevice``). A
  process that imported it before its environment had :attr:`PulseServer.env` sees no pulse
  devices until ``sd._terminate(); sd._initialize()``; subprocesses started with the env are
  simplest.
* Open devices at the sink's rate (or the device's default) with ``latency="low"`` or ≥ 20 ms;
  16 kHz with ``latency="low"`` fails silently (garbage), per the notes.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from services.virtual_mic import alsa_config_path

#: ``sun_path`` holds 108 bytes; longer socket paths go to a short temporary folder.
MAX_SOCKET_PATH = 100


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGTERM ``proc``, SIGKILL it if it lingers; reap it. Harmless if already gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class PulseServer:
    """One running PulseAudio server with null sinks; stop it with :meth:`stop` or ``with``."""

    def __init__(self, root: Path, sinks: tuple[str, ...], rate: int, socket: Path):
        self.root, self.sinks, self.rate, self.socket = root, tuple(sinks), rate, socket
        self.log = root / "pulseaudio.log"
        self.proc: subprocess.Popen | None = None
        self.keepalives: list[subprocess.Popen] = []
        self._socket_dir: Path | None = None  # our own short folder for the socket, if any

    # ------------------------------------------------------------------ start / stop
    @staticmethod
    def available() -> bool:
        """Whether the binaries are installed (``pulseaudio``, and ``pacat``/``pactl`` from pulseaudio-utils)."""
        return all(shutil.which(b) for b in ("pulseaudio", "pacat", "pactl"))

    @classmethod
    def start(cls, root: Path, sinks=("llvc_in", "llvc_out"), rate: int = 48000, keepalive: bool = True,
              timeout: float = 10.0) -> PulseServer:
        """Start a server under ``root`` and wait until ``pactl`` lists every sink.

        Raises ``RuntimeError`` (with the server's stderr tail) if it does not come up within
        ``timeout`` seconds or dies; nothing is left running then.
        """
        if not sinks:
            raise ValueError("need at least one sink")
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        socket, socket_dir = root / "native", None
        if len(str(socket)) > MAX_SOCKET_PATH:
            socket_dir = Path(tempfile.mkdtemp(prefix="pulse-"))
            socket = socket_dir / "native"
        srv = cls(root, sinks, rate, socket)
        srv._socket_dir = socket_dir
        try:
            srv._start_server()
            srv._wait_ready(timeout)
            if keepalive:
                srv._start_keepalives()
        except BaseException:
            srv.stop()
            raise
        return srv

    def _server_env(self) -> dict[str, str]:
        """The daemon's own environment: HOME and XDG folders under ``root``, nothing of the user's."""
        env = dict(os.environ)
        for var, sub in (("HOME", "home"), ("XDG_RUNTIME_DIR", "run"), ("XDG_CONFIG_HOME", "config")):
            (self.root / sub).mkdir(mode=0o700, exist_ok=True)
            env[var] = str(self.root / sub)
        for var in ("PULSE_SERVER", "PULSE_SINK", "PULSE_SOURCE", "DBUS_SESSION_BUS_ADDRESS"):
            env.pop(var, None)
        return env

    def _start_server(self) -> None:
        script = [f"load-module module-native-protocol-unix socket={self.socket} auth-anonymous=1"]
        script += [f"load-module module-null-sink sink_name={name} rate={self.rate} channels=1" for name in self.sinks]
        script += [f"set-default-sink {self.sinks[0]}", f"set-default-source {self.sinks[0]}.monitor"]
        pa = self.root / "server.pa"
        pa.write_text("\n".join(script) + "\n")
        # type asym: ALSA pcms named after the sinks, playback → sink, capture → its monitor.
        pcms = [f'pcm.{n} {{ type asym; playback.pcm {{ type pulse; device "{n}" }} '
                f'capture.pcm {{ type pulse; device "{n}.monitor" }} '
                f'hint {{ show on; description "PulseAudio null sink {n}" }} }}' for n in self.sinks]
        (self.root / "asound.conf").write_text("\n".join(pcms) + "\n")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--system=false",
                 "--use-pid-file=no", "--disable-shm=yes", "--log-target=stderr", "-F", str(pa)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self._server_env(),
                start_new_session=True)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pulseaudio exited with status {self.proc.returncode}:\n{_tail(self.log)}")
            listed = self.pactl("list", "short", "sinks", check=False)
            if listed is not None and set(self.sinks) <= {line.split("\t")[1] for line in listed.splitlines()
                                                           if line.count("\t") >= 1}:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"pulseaudio did not list sinks {list(self.sinks)} within {timeout:g} s:\n"
                                   f"{_tail(self.log)}")
            time.sleep(0.05)

    def _start_keepalives(self) -> None:
        for name in self.sinks:
            self.keepalives.append(subprocess.Popen(
                ["pacat", "--playback", "-d", name, "--latency-msec=20", f"--rate={self.rate}", "--channels=1",
                 "--format=s16le", "/dev/zero"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True))

    def stop(self) -> None:
        """Stop the keepalives and the server (idempotent)."""
        while self.keepalives:
            _kill(self.keepalives.pop())
        _kill(self.proc)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> PulseServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs: ``PULSE_SERVER``, and ``ALSA_CONFIG_PATH`` for the named devices."""
        env = {"PULSE_SERVER": f"unix:{self.socket}"}
        path = alsa_config_path(self.root / "asound.conf")
        if path is not None:  # None: no system alsa.conf to extend, so leave ALSA alone
            env["ALSA_CONFIG_PATH"] = path
        return env

    def client_env(self, sink: str | None = None, source: str | None = None) -> dict[str, str]:
        """:attr:`env` plus ``PULSE_SINK``/``PULSE_SOURCE``: where ``pulse``/``default`` play and record.

        ``source`` is a source name, e.g. ``"llvc_in.monitor"`` (what was played into ``llvc_in``).
        """
        env = self.env
        if sink is not None:
            env["PULSE_SINK"] = sink
        if source is not None:
            env["PULSE_SOURCE"] = source
        return env

    def pactl(self, *args: str, check: bool = True, timeout: float = 5.0) -> str | None:
        """``pactl ARGS`` against this server: its stdout; ``None`` on failure unless ``check``."""
        try:
            out = subprocess.run(["pactl", *args], env={**os.environ, **self.env}, capture_output=True,
                                 text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            if check:
                raise
            return None
        if out.returncode != 0:
            if check:
                raise RuntimeError(f"pactl {' '.join(args)}: {out.stderr.strip()}")
            return None
        return out.stdout
