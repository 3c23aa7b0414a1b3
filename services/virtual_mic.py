"""``virtual-mic[:NAME]``: the converted voice as a microphone other programs can pick.

Made through the running sound server with ``pactl``: PulseAudio, or PipeWire's
PulseAudio-compatible server (``pipewire-pulse``), which takes the same commands. Two modules:

* a null sink ``NAME_feed`` (mono, 48 kHz) that playback plays into, like any output device;
* a remap source ``NAME`` of that sink's monitor, described "LLVC voice". Programs list it as a
  microphone: many hide monitor sources from their microphone menus, not a remapped source.

Creation is idempotent: what already exists under these names is used as it is (a playback
process killed and restarted finds the source a call is still recording from, and keeps feeding
it). :meth:`VirtualMic.remove` unloads every module of ours that the server lists, whoever loaded
it. Who removes it: ``llvc run`` when the run ends (it sets :data:`OWNER_ENV` for its services,
so a playback restarted within the run leaves the microphone in place for the programs using
it); a playback run on its own, when it exits.

PortAudio reaches the feed sink through ALSA's ``pulse`` plugin (``libasound2-plugins``): an ALSA
configuration file of our own names a pcm ``NAME_feed`` bound to the sink, added to
``ALSA_CONFIG_PATH`` before PortAudio starts (:func:`alsa_config_path`). ``PULSE_SINK`` stays
untouched, so a monitor output on ``pulse`` or ``default`` still goes where the user's sound goes.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.settings import parsed_by

PREFIX = "virtual-mic"
DEFAULT_NAME = "llvc_voice"
DESCRIPTION = "LLVC voice"
FEED_SUFFIX = "_feed"
RATE = 48000
#: Set (to anything) in a playback's environment when another process removes the microphone at
#: the end (``llvc run`` does, for the services it starts).
OWNER_ENV = "LLVC_VIRTUAL_MIC_OWNER"
#: The system's ALSA configuration; ``ALSA_CONFIG_PATH`` must name it first when extended.
ALSA_CONF = Path("/usr/share/alsa/alsa.conf")
_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
PACTL_TIMEOUT_S = 5.0


class VirtualMicError(RuntimeError):
    """The virtual microphone cannot be made or used; the message is one line saying why."""


def parse_spec(spec: str) -> str | None:
    """The source name of ``virtual-mic[:NAME]``, ``None`` for another sink spec.

    Raises :class:`VirtualMicError` for a name PulseAudio or ALSA would not take."""
    kind, sep, name = spec.partition(":")
    if kind != PREFIX:
        return None
    if not sep:
        return DEFAULT_NAME
    if not _NAME.fullmatch(name):
        raise VirtualMicError(f"virtual-mic: name {name!r} must be 1-64 letters, digits or '_'")
    return name


#: What is wrong with a ``virtual-mic`` spec (``None`` if fine or not one): for settings checks.
spec_problem = parsed_by(parse_spec, VirtualMicError)


def session_spec(spec: str, session: str) -> str:
    """The sink ``spec`` of client ``session`` of a shared server (``llvc run --session``): an
    unnamed microphone (``virtual-mic``) becomes the session's own, ``llvc_voice_<session>`` with
    '-' and '.' as '_', so that two clients on one host neither share a microphone nor remove each
    other's when they end; any other spec is returned as it is.

    Raises :class:`VirtualMicError` when that name is too long to be a microphone's."""
    if spec != PREFIX:
        return spec
    name = f"{DEFAULT_NAME}_{re.sub(r'[^A-Za-z0-9_]', '_', session)}"
    if not _NAME.fullmatch(name):
        raise VirtualMicError(f"virtual-mic: {name!r}, the session's microphone name, is over 64 characters: "
                              f"name one, virtual-mic:NAME")
    return f"{PREFIX}:{name}"


def pactl(*args: str, env: dict[str, str] | None = None) -> str:
    """``pactl ARGS``: its stdout, or :class:`VirtualMicError` with one line saying what failed."""
    if shutil.which("pactl") is None:
        raise VirtualMicError("virtual-mic: pactl not found: install pulseaudio-utils, and run PulseAudio "
                              "or PipeWire with pipewire-pulse")
    try:
        out = subprocess.run(["pactl", *args], capture_output=True, text=True, timeout=PACTL_TIMEOUT_S,
                             stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        raise VirtualMicError(f"virtual-mic: pactl {args[0]} did not answer within {PACTL_TIMEOUT_S:g} s") from None
    if out.returncode != 0:
        why = " ".join((out.stderr or out.stdout).split()) or f"exit status {out.returncode}"
        if args[0] == "info":
            raise VirtualMicError(f"virtual-mic: no sound server ({why}): start PulseAudio "
                                  "(pulseaudio --start) or PipeWire (pipewire, pipewire-pulse, wireplumber)")
        raise VirtualMicError(f"virtual-mic: pactl {' '.join(args[:2])}: {why}")
    return out.stdout


def _properties(kind: str, description: str) -> str:
    """A module argument naming the device's description: the argument's value in double
    quotes, the property's in single ones (PulseAudio's module argument syntax)."""
    return f"{kind}_properties=\"device.description='{description}'\""


def _short_list(what: str) -> list[list[str]]:
    """``pactl list short WHAT`` as rows of tab-separated fields."""
    return [line.split("\t") for line in pactl("list", "short", what).splitlines() if line.strip()]


@dataclass
class VirtualMic:
    """One virtual microphone ``name`` on the running sound server."""

    name: str = DEFAULT_NAME
    loaded: list[int] = field(default_factory=list)  # modules this object loaded

    @property
    def feed(self) -> str:
        """The null sink playback plays into (and the ALSA pcm of the same name)."""
        return self.name + FEED_SUFFIX

    @classmethod
    def ensure(cls, name: str = DEFAULT_NAME) -> VirtualMic:
        """The microphone ``name``, made unless it exists; :class:`VirtualMicError` if there is
        no server or it refuses."""
        mic = cls(name)
        server = pactl("info")
        if "Server Name" not in server:
            raise VirtualMicError(f"virtual-mic: pactl info does not describe a sound server: {server[:80]!r}")
        sinks = {row[1] for row in _short_list("sinks") if len(row) > 1}
        # float32 all the way: the server would otherwise store the voice as 16-bit samples.
        spec = (f"rate={RATE}", "channels=1", "format=float32le")
        if mic.feed not in sinks:
            mic._load("module-null-sink", f"sink_name={mic.feed}", *spec,
                      _properties("sink", f"{DESCRIPTION} (feed)"))
        sources = {row[1] for row in _short_list("sources") if len(row) > 1}
        if name not in sources:
            mic._load("module-remap-source", f"master={mic.feed}.monitor", f"source_name={name}", *spec,
                      _properties("source", DESCRIPTION))
        return mic

    def _load(self, module: str, *args: str) -> None:
        out = pactl("load-module", module, *args).strip()
        if out.isdigit():
            self.loaded.append(int(out))

    def modules(self) -> list[int]:
        """Indices of the server's modules that make this microphone (the source's first)."""
        ours = []
        for row in _short_list("modules"):
            if len(row) < 3 or not row[0].isdigit():
                continue
            args = row[2].split()
            if (row[1] == "module-remap-source" and f"source_name={self.name}" in args) or \
                    (row[1] == "module-null-sink" and f"sink_name={self.feed}" in args):
                ours.append((row[1] != "module-remap-source", int(row[0])))
        return [index for _, index in sorted(ours)]

    def remove(self) -> list[int]:
        """Unload every module of this microphone (source first); the indices unloaded."""
        gone = []
        for index in self.modules():
            pactl("unload-module", str(index))
            gone.append(index)
        return gone

    def source_latency_ms(self) -> float:
        """The source's own latency as the server reports it (0 where it reports none)."""
        block = _block(pactl("list", "sources"), "Name: " + self.name)
        m = re.search(r"Latency:\s*(\d+)\s*usec", block)
        return int(m[1]) / 1000 if m else 0.0


def _block(listing: str, marker: str) -> str:
    """The paragraph of a ``pactl list`` listing that holds the line ``marker``."""
    for part in re.split(r"\n(?=\S)", listing):
        if any(line.strip() == marker for line in part.splitlines()):
            return part
    return ""


def alsa_config_path(extra: Path) -> str | None:
    """``ALSA_CONFIG_PATH`` with ``extra`` after the existing path (or after the system's
    alsa.conf); ``None`` where there is neither (ALSA would then read ``extra`` alone)."""
    base = os.environ.get("ALSA_CONFIG_PATH") or (str(ALSA_CONF) if ALSA_CONF.is_file() else "")
    parts = [p for p in base.split(":") if p]
    if not parts:
        return None
    return ":".join(parts if str(extra) in parts else [*parts, str(extra)])


def pulse_pcm(name: str, device: str, description: str) -> str:
    """An ALSA pcm ``name`` that plays into PulseAudio sink ``device`` (the ``pulse`` plugin)."""
    return (f'pcm.{name} {{ type pulse; device "{device}" '
            f'hint {{ show on; description "{description}" }} }}\n')


def route_alsa_to(mic: VirtualMic) -> Path:
    """Name the ALSA pcm :attr:`VirtualMic.feed` in this process (before PortAudio starts): an
    ALSA configuration file of ours, added to ``ALSA_CONFIG_PATH``. Returns the file (delete it
    at exit)."""
    fd, name = tempfile.mkstemp(prefix="llvc-alsa-", suffix=".conf")
    path = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(pulse_pcm(mic.feed, mic.feed, f"{DESCRIPTION} (feed)"))
    config_path = alsa_config_path(path)
    if config_path is None:
        path.unlink()
        raise VirtualMicError(f"virtual-mic: no ALSA configuration ({ALSA_CONF}): install libasound2-data")
    os.environ["ALSA_CONFIG_PATH"] = config_path
    return path
