"""Inference's side of the control endpoint: answers ``llvc ctl`` and dashboards between chunks.

Requests (:mod:`common.control`) are served in the audio loop's own thread, a few per turn,
so a change lands between two engine steps and never races one. Reading (``status``,
``voices``) is open to every client that connects; changing (``set``, ``voice``) only to those
:class:`services.controls.Access` lets. Every accepted change is published as an event
(:class:`~common.telemetry.ControlChanged`, :class:`~common.telemetry.VoiceSwitch`) and logged.

A voice switch: the request is checked (file, config, geometry) and answered at once; the model
loads in :class:`services.voices.VoiceLoader`'s thread while the current voice keeps converting;
the loop swaps it in at the next chunk boundary (:meth:`ready_voice`) or, when no stream is
flowing, at once.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.control import ControlReply, ControlRequest, Incoming
from common.security import authorized_names
from common.settings import SettingsError
from common.telemetry import ControlChanged, VoiceSwitch
from models.config import ConfigError
from models.spec import ModelSpec

from .controls import Access, changed
from .voices import Voice, VoiceLoader, list_voices, load_voice, resolve_voice

if TYPE_CHECKING:
    from common.bus import Bus

#: Requests answered per loop turn at most (the rest wait for the next turn, ~13 ms later).
REQUESTS_PER_TURN = 8


class ControlPlane:
    """The control endpoint of one inference service (see the module docstring)."""

    def __init__(self, service: Any, bus: Bus):
        """``service``: the :class:`services.inference.InferenceService` whose live settings,
        audio path and voice this serves (not imported: inference imports this module)."""
        self.service = service
        self.server = bus.control_server()
        sec = service.cfg.security
        keys = bus.curve_keys
        names = authorized_names(keys) if keys is not None else {}
        endpoint = service.cfg.endpoint("control")
        self.access = Access(endpoint.is_local, keys is not None and endpoint.is_tcp, names, sec.controller_names)
        missing = [n for n in sec.controller_names if n not in names.values()]
        if self.access.curve and missing:
            service.log("warning", "security.controllers names keys that are not authorized: nobody by that "
                        "name can change live settings", missing=",".join(missing))
        self.voices_dir = Path(service.settings.voices_dir).expanduser()
        self.loader = VoiceLoader()
        self.last_switch: dict[str, Any] | None = None   # the outcome of the latest voice switch
        self._taken: tuple[str, float] = ("", 0.0)         # who asked for the voice ready_voice gave, load ms

    # ------------------------------------------------------------------ requests
    def serve(self) -> None:
        """Answer the requests waiting (at most :data:`REQUESTS_PER_TURN`), then collect a
        finished voice load that failed (a successful one waits for :meth:`ready_voice`)."""
        for _ in range(REQUESTS_PER_TURN):
            incoming = self.server.poll()
            if incoming is None:
                break
            self.server.reply(self._answer(incoming))
        if self.loader.busy and self.service.next_offset() is None:
            # No stream flowing: nothing to crossfade, swap now.
            voice = self.ready_voice()
            if voice is not None:
                self.service._use(voice)
                self.swapped(voice, None)

    def state(self) -> dict[str, Any]:
        """What a reply carries: the live settings, the voice, a load under way, the last switch."""
        s = self.service
        loading = self.loader.asked
        return {"controls": s.live.as_dict(), "voice": s.voice, "model": s.model_id, "backend": s.backend,
                "kind": s.kind, "stream_id": s.stream_id,
                "loading": loading["checkpoint"] if loading else None,
                "last_switch": self.last_switch, "voices_dir": str(self.voices_dir)}

    def _answer(self, incoming: Incoming) -> ControlReply:
        if incoming.request is None:
            return ControlReply(False, incoming.error, self.state())
        req = incoming.request
        if req.cmd == "status":
            return ControlReply(True, None, self.state())
        if req.cmd == "voices":
            return ControlReply(True, None, {**self.state(), "voices": list_voices(self.voices_dir)})
        refusal = self.access.refusal(incoming.peer_key)
        if refusal is not None:
            self.service.notice("control_refused", "refused a control request", {"requests": 1},
                                who=self.access.who(incoming.peer_key), reason=refusal)
            return ControlReply(False, refusal, self.state())
        by = self.access.who(incoming.peer_key)
        if req.cmd == "set":
            return self._set(req, by)
        return self._voice(req, by, local=incoming.peer_key is None or self.access.local)

    def _set(self, req: ControlRequest, by: str) -> ControlReply:
        s = self.service
        try:
            new, diff = changed(s.live, req.values)
        except SettingsError as exc:
            return ControlReply(False, str(exc), self.state())
        if diff:
            s.configure(new)
            s.publish(ControlChanged(diff, by, s.stream_id, s.next_offset()))
            s.log("info", "live settings changed", by=by, **diff)
        return ControlReply(True, None, self.state())

    def _voice(self, req: ControlRequest, by: str, local: bool) -> ControlReply:
        s = self.service
        if s.kind != "llvc":
            return ControlReply(False, f"model.kind is {s.kind}: there are no voices to switch", self.state())
        if self.loader.busy:
            return ControlReply(False, f"a voice is already loading ({self.loader.asked['checkpoint']})", self.state())
        try:
            path = resolve_voice(self.voices_dir, req.checkpoint or "", local)
            spec = ModelSpec.resolve(path, req.config, s.engine.geometry.chunk_factor)
            self._check_geometry(spec)
        except (ValueError, ConfigError, OSError) as exc:
            reason = " ".join(str(exc).split())
            self._failed(str(req.checkpoint), reason, by)
            return ControlReply(False, reason, self.state())
        checkpoint = str(path)
        st = s.settings
        s.publish(VoiceSwitch("loading", checkpoint, by=by, stream_id=s.stream_id))
        s.log("info", "loading a voice (the current one keeps converting)", voice=checkpoint, by=by)
        self.loader.start(spec, checkpoint, by, lambda sp, ck: s.with_pool(load_voice(
            sp, st.backend, st.device, "", st.threads, ck, export=True)))
        return ControlReply(True, None, self.state())

    def _check_geometry(self, spec: ModelSpec) -> None:
        new, cur = spec.geometry, self.service.engine.geometry
        for what in ("sample_rate", "chunk_len", "head_len"):
            if getattr(new, what) != getattr(cur, what):
                raise ValueError(f"{spec.files.config}: {what} {getattr(new, what)} differs from the running "
                                 f"voice's {getattr(cur, what)} (capture frames for it): restart to change it")

    def _failed(self, checkpoint: str, reason: str, by: str) -> None:
        s = self.service
        self.last_switch = {"voice": checkpoint, "ok": False, "reason": reason}
        s.publish(VoiceSwitch("failed", checkpoint, by=by, stream_id=s.stream_id, reason=reason))
        s.log("warning", f"voice switch failed, the current voice stays: {reason}", voice=checkpoint)

    # ------------------------------------------------------------------ the swap
    def ready_voice(self) -> Voice | None:
        """A loaded voice to swap in now, if one is ready (a failed load is reported here)."""
        if not self.loader.busy:
            return None
        done = self.loader.take()
        if done is None:
            return None
        voice, error, asked = done
        if voice is None:
            self._failed(asked["checkpoint"], error or "unknown error", asked["by"])
            return None
        self._taken = (asked["by"], 1000 * (time.monotonic() - asked["since"]))
        return voice

    def swapped(self, voice: Voice, offset: int | None) -> None:
        """Report a swap that just happened (the loop made ``voice`` current at ``offset``)."""
        s = self.service
        by, load_ms = self._taken[0], round(self._taken[1], 1)
        for line in voice.notes:
            s.log("warning", line, model=voice.model_id)
        self.last_switch = {"voice": voice.checkpoint, "ok": True, "model": voice.model_id,
                            "load_ms": load_ms, "offset": offset}
        s.publish(VoiceSwitch("swapped", voice.checkpoint, voice.model_id, by, s.stream_id, offset, load_ms))
        s.log("info", "voice switched", voice=voice.checkpoint, model=voice.model_id, backend=voice.backend,
              load_ms=load_ms, offset=offset)
