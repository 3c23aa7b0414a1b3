"""The live settings inference applies on the audio path, who may change them, and how.

``[control]`` in the pipeline config holds their values at start; ``llvc ctl set KEY=VALUE``
and the dashboard change them while the pipeline runs (:mod:`common.control` carries the
requests; :class:`services.inference.InferenceService` owns the values and serves them).

The path, per chunk (:class:`AudioPath`)::

    input ─► input gain ─► noise gate ─► AGC ─► model ─► output gain ─┬─► output
      └────────────────────────── bypass (raw input, same timeline) ──┘  (crossfaded, 5 ms)

At the defaults every stage is neutral and hands its input on untouched, so the output is
exactly the model's (both contracts in ``shared/checks`` hold). A change applies from the next
chunk boundary; gains ramp and bypass crossfades over :data:`FADE_MS`, so nothing clicks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.settings import parse_table, setting

from .shaping import Agc, Gain, NoiseGate, crossfade

#: Bypass crossfade and gain ramps, in ms (the issue: "no click", at most 5 ms).
FADE_MS = 5.0
#: The level the embedded demo voice was trained at (models/dataset.py scales every training
#: input to RMS 0.06): what AGC aims for unless told otherwise.
TRAINED_RMS = 0.06
TRAINED_DBFS = round(20 * math.log10(TRAINED_RMS), 1)


def _within(low: float, high: float):
    return lambda v: None if low <= v <= high and math.isfinite(v) else f"must be in [{low:g}, {high:g}]"


@dataclass(frozen=True)
class LiveSettings:
    """``[control]``: the values inference starts with; each may be changed live
    (``config/pipeline.toml`` documents each). The defaults are neutral."""

    bypass: bool = setting(False)
    input_gain_db: float = setting(0.0, _within(-40, 40))
    output_gain_db: float = setting(0.0, _within(-40, 40))
    gate: bool = setting(False)
    gate_threshold_db: float = setting(-50.0, _within(-100, 0))
    gate_attack_ms: float = setting(1.0, _within(0, 100))
    gate_hold_ms: float = setting(100.0, _within(0, 2000))
    gate_release_ms: float = setting(50.0, _within(1, 2000))
    agc: bool = setting(False)
    agc_target_dbfs: float = setting(TRAINED_DBFS, _within(-60, -3))
    agc_max_gain_db: float = setting(24.0, _within(0, 40))

    def as_dict(self) -> dict[str, Any]:
        """The values by key (what status replies and heartbeats carry)."""
        return dataclasses.asdict(self)


def parse_value(text: str) -> bool | int | float | str:
    """A value as typed on a command line: ``on``/``off``/``true``/``false``, a number, or text."""
    low = text.strip().lower()
    if low in ("on", "true", "yes"):
        return True
    if low in ("off", "false", "no"):
        return False
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        return text


def changed(current: LiveSettings, values: dict[str, Any]) -> tuple[LiveSettings, dict[str, Any]]:
    """``(new settings, what differs)`` after ``values``; all of them or none: the first bad key
    raises :class:`~common.settings.SettingsError` (``str()``: ``key: why``). ``on``/``off``
    strings are accepted for switches (the dashboard and scripts may send them)."""
    fixed = {}
    for key, v in values.items():
        if isinstance(v, str) and isinstance(getattr(current, key, None), bool):
            parsed = parse_value(v)
            v = parsed if isinstance(parsed, bool) else v
        fixed[key] = v
    new = parse_table(LiveSettings, {**current.as_dict(), **fixed})
    diff = {k: v for k, v in new.as_dict().items() if getattr(current, k) != v}
    return new, diff


class Access:
    """Who may change the live settings (reading them is open to every client that connects).

    * A local endpoint (``ipc://``, or ``tcp://`` bound to loopback) without CURVE: everyone on
      the host, as for the rest of the local pipeline.
    * With CURVE: only peers whose key is named in ``security.controllers`` (a key the server
      admits but does not list, e.g. a dashboard's, may read status only).
    * A LAN endpoint without CURVE: nobody: anyone on the network could steer the voice.
    """

    def __init__(self, local: bool, curve: bool, names: dict[str, str], controllers: tuple[str, ...]):
        self.local, self.curve, self.names = local, curve, names
        self.controllers = set(controllers)

    def who(self, peer_key: str | None) -> str:
        """How a peer is named in events and logs."""
        if peer_key is None:
            return "local"
        return self.names.get(peer_key, f"key {peer_key[:8]}")

    def refusal(self, peer_key: str | None) -> str | None:
        """Why ``peer_key`` may not change anything, or ``None`` if it may."""
        if peer_key is None:
            if self.local:
                return None
            return "changes over a LAN need [security] curve = true (this endpoint is reachable without a key)"
        name = self.names.get(peer_key)
        if name in self.controllers:
            return None
        return (f"{self.who(peer_key)} may read status only (security.controllers: "
                f"{', '.join(sorted(self.controllers)) or 'none'})")


class AudioPath:
    """The live settings applied to one stream's audio (see the module docstring).

    :meth:`shape_input` takes the samples on their way into the model, in stream order;
    :meth:`finish` takes the model's output chunk and the raw input on the same timeline.
    """

    def __init__(self, settings: LiveSettings, sample_rate: int):
        self.sample_rate = sample_rate
        self.fade = max(1, round(FADE_MS * sample_rate / 1000))
        self.input_gain = Gain(settings.input_gain_db, FADE_MS, sample_rate)
        self.output_gain = Gain(settings.output_gain_db, FADE_MS, sample_rate)
        self.gate = NoiseGate(settings.gate_threshold_db, settings.gate_attack_ms, settings.gate_hold_ms,
                              settings.gate_release_ms, sample_rate)
        self.agc = Agc(settings.agc_target_dbfs, settings.agc_max_gain_db, sample_rate=sample_rate)
        self.settings = settings
        self._bypass_fade: int | None = None  # samples of the current bypass crossfade done

    def configure(self, s: LiveSettings) -> None:
        """Take new values; they apply from the next chunk (gains ramp, bypass crossfades)."""
        old = self.settings
        self.input_gain.set_db(s.input_gain_db)
        self.output_gain.set_db(s.output_gain_db)
        self.gate.configure(s.gate_threshold_db, s.gate_attack_ms, s.gate_hold_ms, s.gate_release_ms)
        if s.gate and not old.gate:
            self.gate.reset()
        self.agc.configure(s.agc_target_dbfs, s.agc_max_gain_db)
        if s.agc and not old.agc:
            self.agc.reset()
        if s.bypass != old.bypass:
            done = self._bypass_fade
            # Reversing a crossfade half-way starts the new one from where the old one stood.
            self._bypass_fade = self.fade - done if done is not None else 0
        self.settings = s

    def reset(self) -> None:
        """A new stream: the gate and AGC forget the old one's level."""
        self.gate.reset()
        self.agc.reset()

    def shape_input(self, x: np.ndarray) -> np.ndarray:
        """Input gain, gate and AGC, as switched on; ``x`` itself when all are neutral."""
        s = self.settings
        if not self.input_gain.neutral:
            x = self.input_gain.process(x)
        if s.gate:
            x = self.gate.process(x)
        if s.agc:
            x = self.agc.process(x)
        return x

    @property
    def plays_raw(self) -> bool:
        """Whether :meth:`finish` needs the raw input (bypass on, or crossfading either way)."""
        return self.settings.bypass or self._bypass_fade is not None

    def finish(self, model_out: np.ndarray, raw: np.ndarray | None) -> np.ndarray:
        """Output gain on the model's output, then bypass: ``raw`` (a new array of its own,
        needed only when :attr:`plays_raw`) exactly when it is on."""
        y = model_out if self.output_gain.neutral else self.output_gain.process(model_out)
        done = self._bypass_fade
        if done is None:
            return raw if self.settings.bypass else y
        old, new = (y, raw) if self.settings.bypass else (raw, y)
        out = crossfade(old, new, -done, self.fade)
        done += len(y)
        self._bypass_fade = None if done >= self.fade else done
        return out

