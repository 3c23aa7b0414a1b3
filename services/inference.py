"""``llvc inference``: convert the clients' chunks with LLVC, one exact streaming state per session.

Binds ``audio_in`` (PULL: every client's capture pushes into it) and ``audio_out`` (ROUTER:
each session's converted chunks go to its own playback only, :class:`common.bus.AudioRouter`);
the contract it keeps is in :mod:`services` (offsets, the head message, gaps, resets, telemetry
names). Sessions, admission (``max_streams``), idle eviction and CURVE binding are
:mod:`services.sessions`'; every rule below applies per session, so nothing one client does
(restart, burst, silence, a bad stream) changes another's output.

How a turn of the loop works, and why:

* **Receive**: drain every valid chunk already waiting (non-blocking); only when there is
  nothing to do, wait up to 50 ms for one. Malformed input never gets this far: the bus's
  receiver rejects and counts it (``Service.watch_rejects``: counter ``rejected``, event
  ``reject`` at most twice a second). Playbacks' listen requests are read too.
* **Streams** (per session): chunks of the session's current stream id join its work queue. A
  stream id never seen before takes over (reset, reason ``new_stream``) only when it looks like
  a capture (re)start: there is no current stream yet, or its chunk is a stream start (offset 0:
  capture begins every stream with its head there), or the current stream has been silent for
  longer than max(4 chunks, 250 ms) (a restarted capture whose head was lost while inference was
  briefly unreachable). Otherwise it is dropped (``dropped_unknown_stream``) and not
  remembered, so a flood of valid chunks from a stranger mid-stream can neither hijack the
  conversion nor get the real stream's chunks dropped as stale. An id seen before that is not
  current belongs to a replaced stream: dropped (``dropped_stale_stream``), so a flood from a
  stale sender can neither reset the state nor cost compute. "Silent" counts from the newest
  chunk of the current stream received, a whole received batch at a time: a turn that took long
  (this process was not scheduled) does not make a live stream look silent.
* **Backlog** (per session): the newest chunk is the present; what still waits before it is how
  far behind live the output runs. Above ``max_backlog_ms`` the oldest queued chunks are dropped
  until the rest fits (reset, reason ``backlog``): a client whose audio fell behind jumps back to
  live audio instead of staying late for good, and one client's burst costs the others nothing.
* **Work**, for at most ~60 ms per turn so that SIGTERM is noticed promptly: every session feeds
  queued chunks into its current *segment* (one continuous run of engine state) until its next
  step's input is complete, and every session whose step is complete is converted in **one**
  batched call of the voice's stream pool (:mod:`models.pool`), oldest chunk first. When some
  sessions are ready and others are about to be, the turn waits for them up to
  ``batch_wait_ms`` after the oldest ready chunk arrived (never when one session is open). A
  session is fed its next chunk only once the previous one's complete steps are done, so the
  chunk that completed a step is always the segment's newest one: its receive time and stages
  go into the output.

Segments. A segment has an ``origin``: engine output step ``j`` covers stream samples
``[origin + j*C, origin + (j+1)*C)``. A segment that starts at offset 0 is primed with the
stream's true head; one that starts at offset ``O > 0`` (after a reset, or a stream joined
late) gets a silent head: ``origin = O - head_len``, so output stays on the chunk grid and each
chunk is converted the moment it arrives. Priming with zeros equals the engine's
``prime(None)``. Within a segment, a chunk that jumps ahead by at most ``max_gap_ms`` is
preceded by zeros (``zero_filled_samples``); a longer jump resets (``gap``); a chunk that starts
before the expected offset is a duplicate or overlap and is dropped whole
(``dropped_duplicate``): capture's grid never overlaps, so such a chunk is a replay.
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from collections import Counter as Tally
from dataclasses import dataclass

import numpy as np
import zmq

from common.config import PipelineConfigError
from common.protocol import MAX_NAME_LEN, MAX_STAGES, AudioChunk, ProtocolError, StageRecord
from common.settings import at_least, non_negative, one_of, positive, setting
from common.telemetry import Counter, InferenceChunk, InferenceStatus, Reset, ResetReason, SessionChange
from models.backends import BACKENDS
from models.config import CHECKPOINT_DEFAULT_HELP, CONFIG_DEFAULT_HELP
from models.passthrough import PassthroughEngine
from models.pool import pool_for

from .base import ModelSettings, Service, add_service_arguments, model_spec, service_main
from .control_plane import ControlPlane
from .controls import AudioPath, LiveSettings
from .sessions import Input, Segment, Session
from .shaping import crossfade
from .voices import Voice, load_voice, warm_up


@dataclass(frozen=True)
class InferenceSettings:
    """The ``[inference]`` table (config/pipeline.toml documents each key)."""

    device: str = setting("cpu", one_of("cpu", "cuda", "auto"))
    threads: int = setting(1, at_least(1))
    # auto: the fastest valid one (models/backends.py): onnx on CPU when an artifact is at hand,
    # else eager, saying why. eager: PyTorch (CPU or CUDA). onnx: ONNX Runtime on `artifact`
    # (empty: the cached one) made by `llvc export` (CPU; torch is never imported).
    backend: str = setting("auto", one_of(*BACKENDS))
    artifact: str = setting("")
    max_backlog_ms: float = setting(40.0, positive)
    max_gap_ms: float = setting(100.0, non_negative)
    # The folder `llvc ctl voices` and the dashboard's voice picker list (*.pth, each with its
    # NAME.json config beside it, or the default one).
    voices_dir: str = setting("models")
    # Sessions (services/sessions.py): how many clients are converted at once (one more is
    # refused), how long a silent one keeps its slot, and how long a ready chunk may wait for
    # other sessions' chunks to be converted in the same batched call.
    max_streams: int = setting(8, at_least(1))
    idle_s: float = setting(30.0, positive)
    batch_wait_ms: float = setting(1.0, non_negative)


#: Environment, for tests only (never a setting): ``MS`` or ``MS:SECONDS``. Every step takes
#: ``MS`` longer (counted in ``proc_ms``, as a slow step would be), for ``SECONDS`` after the
#: first step (for good without it): a machine too slow for the model, and its recovery
#: (tests/test_faults.py). The service says so in a warning line when it is set.
SLOW_STEP_ENV = "LLVC_TEST_SLOW_STEP"


def slow_step_from_env() -> tuple[float, float]:
    """``(seconds per step, for how many seconds; 0 = for good)`` from :data:`SLOW_STEP_ENV`."""
    text = os.environ.get(SLOW_STEP_ENV, "")
    if not text:
        return 0.0, 0.0
    try:
        ms, _, seconds = text.partition(":")
        delay, span = float(ms) / 1000, float(seconds or 0)
    except ValueError:
        raise PipelineConfigError(f"env {SLOW_STEP_ENV}: expected MS or MS:SECONDS, got {text!r}") from None
    if not (delay >= 0 and span >= 0):
        raise PipelineConfigError(f"env {SLOW_STEP_ENV}: expected MS or MS:SECONDS >= 0, got {text!r}")
    return delay, span


#: Counters reported from the first heartbeat on (zeros included, so dashboards see them).
COUNTERS = ("chunks_in", "chunks_out", Counter.RESETS, Counter.DROPPED_INFERENCE_BACKLOG, "dropped_inference_send",
            "dropped_stale_stream", "dropped_unknown_stream", "dropped_duplicate", Counter.REJECTED,
            "zero_filled_samples", "dropped_refused_session", "dropped_foreign_session", "sessions_opened",
            "sessions_evicted", "rejected_listen")

NS_PER_S = 1_000_000_000
RECV_WAIT_MS = 50        # how long an idle turn waits for input
WORK_BUDGET_S = 0.06     # compute per turn, so a turn stays well inside ~100 ms
STATE_CHECK_EVERY = 64   # engine steps between full state checks (the output is checked every step)
EVICT_CHECK_S = 0.5      # how often idle sessions are looked for
REFUSAL_KEYS = 32        # sessions refused that get their own rate-limited report (then one for the rest)
# A never-seen stream id mid-stream replaces the current one only after the current stream has
# been silent this long: max(TAKEOVER_SILENCE_CHUNKS chunks, TAKEOVER_SILENCE_MS).
# Long enough that a live stream never looks silent: capture sends a chunk every 13 ms per unit
# of chunk factor, and network jitter or a capture process not scheduled for a while (100 ms
# stalls happen on a busy small machine) delay a few chunks. Short enough to cost nothing where
# it is needed: a restarted capture whose head was lost is a new process that started, imported
# its modules and waited for a readiness heartbeat (0.25 s apart), so its first chunk comes well
# over 250 ms after the old stream's last one, and it takes over at once.
TAKEOVER_SILENCE_CHUNKS = 4
TAKEOVER_SILENCE_MS = 250.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``llvc inference``'s flags: the pipeline config, plus shortcuts for its settings."""
    add_service_arguments(p)
    g = p.add_argument_group("model and inference settings (override [model] / [inference])")
    g.add_argument("-p", "--checkpoint", help=f"LLVC checkpoint (model.checkpoint; {CHECKPOINT_DEFAULT_HELP})")
    g.add_argument("-c", "--config", help=f"model config JSON (model.config; {CONFIG_DEFAULT_HELP})")
    g.add_argument("-n", "--chunk-factor", type=int, help="chunk = 13*16*N samples (model.chunk_factor)")
    g.add_argument("--model-kind", help="llvc or passthrough (model.kind)")
    g.add_argument("--device", help="cpu, cuda or auto (inference.device)")
    g.add_argument("--threads", type=int, help="torch threads (inference.threads)")
    g.add_argument("--max-streams", type=int, help="client sessions converted at once (inference.max_streams)")


def run(args: argparse.Namespace) -> int:
    """Run the inference service until SIGTERM/SIGINT; returns the exit status."""
    return service_main(InferenceService, args)


class InferenceService(Service):
    """Receives the clients' chunks, converts them per session, sends each to its playback."""

    name = "inference"
    audio_path = True

    def __init__(self, cfg, args=None):
        super().__init__(cfg, args)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.engine = self.pool = self._old_pool = None
        self.receiver = self.router = None
        self.kind, self.model_id, self.trained = "llvc", "", False
        self.device, self.threads, self.backend = "cpu", 1, "eager"
        self.host = (socket.gethostname() or "unknown")[:MAX_NAME_LEN]
        self.sessions: dict[str, Session] = {}
        self.batch_sizes: Tally[int] = Tally()
        self._refused: set[str] = set()
        self._next_evict_check = 0
        self._curve = False

    # ------------------------------------------------------------------ lifetime
    def setup(self) -> None:
        a = self.args or argparse.Namespace()
        m, spec = model_spec(self.cfg, {
            "checkpoint": getattr(a, "checkpoint", None), "config": getattr(a, "config", None),
            "chunk_factor": getattr(a, "chunk_factor", None), "kind": getattr(a, "model_kind", None)})
        s = self.cfg.settings("inference", InferenceSettings, {
            "device": getattr(a, "device", None), "threads": getattr(a, "threads", None),
            "max_streams": getattr(a, "max_streams", None)})
        self._slow_step, self._slow_for = slow_step_from_env()
        self.kind, self.threads, self.settings = m.kind, s.threads, s
        self.max_streams = s.max_streams
        self.live = self.cfg.settings("control", LiveSettings)
        t0 = time.perf_counter()
        if m.kind == "passthrough":
            engine = PassthroughEngine(spec.geometry)  # the LLVC model's chunking
            step_s = warm_up(engine)
            self._use(Voice(engine, "passthrough", "passthrough", True, "cpu", ""))
        else:
            voice = load_voice(spec, s.backend, s.device, s.artifact, s.threads, str(spec.checkpoint or ""))
            for line in voice.notes:
                self.log("warning", line, model=voice.model_id)
            self._use(voice)
            step_s = voice.warm_step_s
        load_s = time.perf_counter() - t0
        table = self.cfg.settings("model", ModelSettings)
        if (table.chunk_factor, table.config) != (m.chunk_factor, m.config):
            self.log("warning", "-n/-c differ from the pipeline config's [model] table, which capture "
                     "reads: chunks will be re-framed, at a latency cost; prefer --set model.*",
                     chunk_factor=m.chunk_factor, config=m.config)
        g = self.engine.geometry
        self.max_backlog = max(1, g.samples(s.max_backlog_ms))
        self.max_gap = g.samples(s.max_gap_ms)
        self.takeover_silence_ns = int(max(TAKEOVER_SILENCE_CHUNKS * g.chunk_s,
                                           TAKEOVER_SILENCE_MS / 1000) * NS_PER_S)
        self.idle_ns = int(s.idle_s * NS_PER_S)
        self.batch_wait_ns = int(s.batch_wait_ms * 1e6)
        self._slow_until = None
        if self._slow_step:
            self.log("warning", f"{SLOW_STEP_ENV} is set: every step is slowed down (a test hook)",
                     slow_step_ms=1000 * self._slow_step, for_s=self._slow_for or "ever")
        # Bind last: while the model loads, capture's sends fail (counted there) instead of
        # piling up stale audio in our queue.
        bus = self.open_bus()
        self.receiver = bus.audio_receiver("audio_in", expect_rate=g.sample_rate)
        self._curve = bus.curve_keys is not None and self.cfg.endpoint("audio_in").is_tcp
        self.watch_rejects(self.receiver)
        self.router = bus.audio_router("audio_out")
        self.watch_rejects(self.router, "rejected_listen")
        self.control = ControlPlane(self, bus)
        self._poller = zmq.Poller()
        for sock in (self.receiver.socket, self.control.server.socket):
            self._poller.register(sock, zmq.POLLIN)
        self.ready = True
        self.log("info", "ready", model=self.model_id, kind=self.kind, backend=self.backend, device=self.device,
                 threads=self.threads, chunk_len=g.chunk_len, latency_ms=1000 * g.latency_s, load_s=load_s,
                 warm_step_ms=1000 * step_s, max_streams=self.max_streams, batched=self.pool.batched)

    def _use(self, voice: Voice) -> None:
        """Make ``voice`` the one that converts (at start-up, or at a swap's chunk boundary).

        Every session moves to a slot of the new voice's pool. One whose stream is under way is
        primed there with the head its next chunk follows, and keeps its old slot until its next
        step, which both voices convert and which crossfades from the old to the new
        (:meth:`_step_batch`): from then on its output is exactly the new voice's streamed
        conversion.
        """
        old = self.pool
        new = voice.pool if voice.pool is not None else pool_for(voice.engine, self.max_streams)
        for sess in self.sessions.values():
            slot = new.open()
            live = old is not None and sess.seg is not None and old.primed(sess.slot)
            if live:
                new.prime(slot, sess.seg.model_tail)
            sess.slot, sess.fading = slot, sess.slot if live else None
        self._old_pool = old if any(sess.fading is not None for sess in self.sessions.values()) else None
        self.pool = new
        self.engine, self.backend, self.voice = voice.engine, voice.backend, voice.checkpoint
        self.model_id, self.trained, self.device = voice.model_id, voice.trained, voice.device

    def with_pool(self, voice: Voice) -> Voice:
        """``voice`` with its stream pool made (the voice loader's thread calls this, so that the
        swap in the loop costs no build)."""
        voice.pool = pool_for(voice.engine, self.max_streams)
        return voice

    def teardown(self) -> None:
        self.close_bus()
        self.receiver = self.router = None

    def _latest(self) -> Session | None:
        """The session a chunk arrived for most recently (what single-stream views show)."""
        return max(self.sessions.values(), key=lambda s: s.active_ns, default=None)

    @property
    def stream_id(self) -> str | None:
        """The latest session's current stream id."""
        sess = self._latest()
        return sess.stream_id if sess is not None else None

    def status(self) -> InferenceStatus:
        g = self.engine.geometry if self.engine is not None else None
        return InferenceStatus(
            self.backend, self.model_id, not self.trained, self.kind, self.device, self.threads, self.stream_id,
            chunk_len=g.chunk_len if g else None, chunk_ms=g.chunk_ms if g else None,
            algorithmic_latency_ms=1000 * g.algorithmic_latency_s if g else None,
            latency_ms=1000 * g.latency_s if g else None, chunk_factor=g.chunk_factor if g else None,
            controls=self.live.as_dict(), voice=self.voice,
            sessions=[s.describe() for s in self.sessions.values()], max_streams=getattr(self, "max_streams", None),
            batch_sizes={str(k): v for k, v in sorted(self.batch_sizes.items())},
            scheduling=self.scheduling_status)

    def next_offset(self) -> int | None:
        """The stream sample the latest flowing session's next output starts at (where a change
        applies from); ``None`` while no session's stream is flowing."""
        flowing = [s for s in self.sessions.values() if s.seg is not None]
        if not flowing:
            return None
        sess = max(flowing, key=lambda s: s.active_ns)
        return sess.seg.origin + sess.seg.steps * self.engine.chunk_len

    def configure(self, live: LiveSettings) -> None:
        """New live settings for every session (from the next chunk on) and for sessions to come."""
        self.live = live
        for sess in self.sessions.values():
            sess.path.configure(live)

    # ------------------------------------------------------------------ the loop
    def loop_once(self) -> None:
        start = time.monotonic()
        self.control.serve()
        self.router.poll_listeners()
        batch = self.receiver.drain_from()
        if not batch and not self._has_work():
            # Idle: wait for audio or a control request, whichever comes first.
            if self._poller.poll(RECV_WAIT_MS):
                self.control.serve()
                batch = self.receiver.drain_from()
        self._receive(batch)
        deadline = start + WORK_BUDGET_S
        while self._work_batch() and time.monotonic() < deadline:
            pass
        self._evict_idle(time.monotonic_ns())

    def _receive(self, batch: list[tuple[AudioChunk, str | None]]) -> None:
        recv_ns = time.monotonic_ns()
        for c, _ in batch:  # before anything else in the batch is judged
            sess = self.sessions.get(c.session or "")
            if sess is not None and c.stream_id == sess.stream_id:
                sess.heard_ns = recv_ns
        for c, key in batch:
            self._accept(c, key, recv_ns)
        for sess in self.sessions.values():
            self._limit_backlog(sess)

    def _has_work(self) -> bool:
        C = self.engine.chunk_len
        return any(s.queue or s.pending() >= C for s in self.sessions.values())

    # ------------------------------------------------------------------ sessions
    def _session_of(self, c: AudioChunk, key: str | None, recv_ns: int) -> Session | None:
        """The chunk's session: opened if new and a slot is free; ``None`` (counted, reported)
        when refused or when it belongs to another CURVE key."""
        name = c.session or ""
        sess = self.sessions.get(name)
        if sess is not None:
            if self._curve and key != sess.key:
                self.count("dropped_foreign_session")
                self._refusal(name, "the session belongs to another client key")
                return None
            return sess
        if len(self.sessions) >= self.max_streams:
            self.count("dropped_refused_session")
            self._refusal(name, f"all {self.max_streams} stream slots are in use (inference.max_streams)")
            return None
        sess = Session(name, self.pool.open(), key if self._curve else None, AudioPath(self.live, c.sample_rate),
                       recv_ns)
        self.sessions[name] = sess
        self.count("sessions_opened")
        self.log("info", "session opened", session=name, sessions=len(self.sessions), max_streams=self.max_streams)
        self.publish(SessionChange("opened", name, len(self.sessions), self.max_streams))
        return sess

    def _count(self, sess: Session, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``, the service's and the session's (its heartbeat line)."""
        self.count(name, n)
        sess.counts[name] = sess.counts.get(name, 0) + n

    def _refusal(self, name: str, reason: str) -> None:
        if name in self._refused or len(self._refused) < REFUSAL_KEYS:
            self._refused.add(name)
            report = f"session_refused:{name}"
        else:
            report = "session_refused:*"
        self.notice(report, "refused a session's chunks", {"chunks": 1}, SessionChange, action="refused",
                    session=name, sessions=len(self.sessions), max_streams=self.max_streams, reason=reason)

    def _evict_idle(self, now_ns: int) -> None:
        """Free the slots of sessions silent for ``idle_s``."""
        if now_ns < self._next_evict_check:
            return
        self._next_evict_check = now_ns + int(EVICT_CHECK_S * NS_PER_S)
        for name, sess in list(self.sessions.items()):
            if now_ns - sess.active_ns > self.idle_ns:
                self.pool.close(sess.slot)
                del self.sessions[name]
                self.count("sessions_evicted")
                self.log("info", "session evicted (silent)", session=name, idle_s=self.settings.idle_s)
                self.publish(SessionChange("evicted", name, len(self.sessions), self.max_streams))
        if self._old_pool is not None and not any(s.fading is not None for s in self.sessions.values()):
            self._old_pool = None

    # ------------------------------------------------------------------ streams, per session
    def _accept(self, c: AudioChunk, key: str | None, recv_ns: int) -> None:
        """Queue a chunk of its session's current stream, switch to a new stream, or drop a stale
        or unknown one (the rules are in the module docstring)."""
        self.count("chunks_in")
        sess = self._session_of(c, key, recv_ns)
        if sess is None:
            return
        sess.counts["chunks_in"] = sess.counts.get("chunks_in", 0) + 1
        sess.active_ns = recv_ns
        if c.stream_id != sess.stream_id:
            if c.stream_id in sess.seen:
                self._count(sess, "dropped_stale_stream")
                return
            if not self._may_take_over(sess, c, recv_ns):
                self._count(sess, "dropped_unknown_stream")
                self.notice("unknown_stream", "dropped chunks of an unknown stream mid-stream", {"chunks": 1},
                            stream_id=c.stream_id, offset=c.offset, current=sess.stream_id, session=sess.name)
                return
            self._switch_stream(sess, c)
        sess.heard_ns = recv_ns
        sess.queue.append(Input(c, recv_ns))

    def _may_take_over(self, sess: Session, c: AudioChunk, recv_ns: int) -> bool:
        """Whether a never-seen stream id may become current: no current stream, a stream start
        (offset 0), or a current stream silent for longer than ``takeover_silence_ns``."""
        return (sess.stream_id is None or c.offset == 0
                or recv_ns - sess.heard_ns > self.takeover_silence_ns)

    def _switch_stream(self, sess: Session, c: AudioChunk) -> None:
        if sess.queue:  # the replaced stream's unprocessed chunks are stale now
            self._count(sess, "dropped_stale_stream", len(sess.queue))
            sess.queue.clear()
        sess.remember(c.stream_id)
        previous, sess.stream_id = sess.stream_id, c.stream_id
        sess.out_seq, sess.source_end = 0, None
        self.log("info", "new stream", stream_id=c.stream_id, previous=previous, offset=c.offset, session=sess.name)
        self._reset(sess, ResetReason.NEW_STREAM, c.offset)

    def _reset(self, sess: Session, reason: ResetReason, offset: int) -> None:
        """Forget the session's engine state; the next chunk fed starts a new segment."""
        sess.seg = None
        self.pool.reset(sess.slot)
        sess.fading = None
        if reason == ResetReason.NEW_STREAM:
            sess.path.reset()
        sess.fresh = True
        self._count(sess, Counter.RESETS)
        self.publish(Reset(sess.stream_id, reason, offset, sess.name))
        if reason != ResetReason.NEW_STREAM:
            self.notice(f"reset_{reason}", "stream state reset", reason=reason, stream_id=sess.stream_id,
                        offset=offset, session=sess.name)

    def _limit_backlog(self, sess: Session) -> None:
        """Jump back to live audio when the work waiting before the newest chunk is too much.

        The newest chunk is the present; everything still unprocessed before it (the segment's
        pending samples and older queued chunks) is how far behind live the output runs. Above
        ``max_backlog`` the oldest queued chunks are dropped until what is left before the
        newest fits, and the state is reset (any pending samples go with it).
        """
        if not sess.queue:
            return
        sizes = [i.chunk.n_samples for i in sess.queue]
        if sess.pending() + sum(sizes[:-1]) <= self.max_backlog:
            return
        keep, kept = 1, 0
        for n in reversed(sizes[:-1]):
            if kept + n > self.max_backlog:
                break
            keep, kept = keep + 1, kept + n
        drop = len(sizes) - keep
        for _ in range(drop):
            sess.queue.popleft()
        self._count(sess, Counter.DROPPED_INFERENCE_BACKLOG, drop)
        self._reset(sess, ResetReason.BACKLOG, sess.queue[0].chunk.offset)

    # ------------------------------------------------------------------ segments
    def _start_segment(self, sess: Session, offset: int) -> Segment:
        origin = max(0, offset - self.engine.head_len)
        # Samples between origin and offset are the silent head (none at offset 0).
        sess.seg = Segment(origin, offset, np.zeros(offset - origin, np.float32))
        return sess.seg

    def _feed(self, sess: Session, item: Input) -> None:
        """Append a chunk to the session's segment (zero-filling a short gap), priming if due."""
        c = item.chunk
        seg = sess.seg if sess.seg is not None else self._start_segment(sess, c.offset)
        gap = c.offset - seg.expected
        if gap < 0:
            self._count(sess, "dropped_duplicate")
            return
        if gap > self.max_gap:
            self._reset(sess, ResetReason.GAP, c.offset)
            seg, gap = self._start_segment(sess, c.offset), 0
        if gap:
            self._count(sess, "zero_filled_samples", gap)
        seg.buf = np.concatenate([seg.buf, np.zeros(gap, np.float32), c.samples])
        seg.expected = c.end
        seg.inputs.append(item)
        if c.source_end is not None:
            sess.source_end = c.source_end
        H = self.engine.head_len
        if not self.pool.primed(sess.slot) and len(seg.buf) >= H:
            seg.raw_tail = seg.buf[:H].copy()
            seg.model_tail = sess.path.shape_input(seg.raw_tail)
            self.pool.prime(sess.slot, seg.model_tail)
            seg.buf = seg.buf[H:]

    def _slow_down(self) -> None:
        """The test hook :data:`SLOW_STEP_ENV`: sleep, for its span after the first step."""
        now = time.monotonic()
        if self._slow_until is None:
            self._slow_until = now + self._slow_for if self._slow_for else float("inf")
        if now < self._slow_until:
            time.sleep(self._slow_step)

    # ------------------------------------------------------------------ the batched step
    def _ready(self) -> list[Session]:
        """Sessions whose next step's input is complete (fed up to it), oldest chunk first."""
        C = self.engine.chunk_len
        ready = []
        for sess in self.sessions.values():
            while sess.pending() < C and sess.queue:
                self._feed(sess, sess.queue.popleft())
            if sess.pending() >= C:
                ready.append(sess)
        return sorted(ready, key=lambda s: s.seg.inputs[-1].recv_ns)

    def _work_batch(self) -> bool:
        """One batched step of every ready session; False when none is ready."""
        ready = self._ready()
        if not ready:
            return False
        if self.batch_wait_ns and len(ready) < len(self.sessions):
            ready = self._wait_for_more(ready)
        self._step_batch(ready)
        return True

    def _wait_for_more(self, ready: list[Session]) -> list[Session]:
        """Receive for up to ``batch_wait_ms`` after the oldest ready chunk arrived, so sessions
        about to be ready join this call."""
        until = ready[0].seg.inputs[-1].recv_ns + self.batch_wait_ns
        while (left := until - time.monotonic_ns()) > 0 and len(ready) < len(self.sessions):
            if not self.receiver.socket.poll(max(1, left // 1_000_000)):
                break
            self._receive(self.receiver.drain_from())
            ready = self._ready()
        return ready

    def _step_batch(self, ready: list[Session]) -> None:
        """Convert the next ``chunk_len`` samples of every session in ``ready`` in one call, and
        send each output to its session."""
        voice = self.control.ready_voice()
        if voice is not None:
            self._use(voice)
        C, H = self.engine.chunk_len, self.engine.head_len
        jobs = []
        for sess in ready:
            seg = sess.seg
            offset = seg.origin + seg.steps * C
            x, seg.buf = seg.buf[:C], seg.buf[C:]
            seg.steps += 1
            shaped = sess.path.shape_input(x)
            raw_before = seg.raw_tail
            seg.raw_tail, seg.model_tail = x[C - H:], shaped[C - H:]
            jobs.append((sess, offset, x, shaped, raw_before))
        t0 = time.perf_counter_ns()
        outs = self.pool.step({sess.slot: shaped for sess, _, _, shaped, _ in jobs})
        fading = {sess.fading: shaped for sess, _, _, shaped, _ in jobs if sess.fading is not None}
        olds = self._old_pool.step(fading) if fading else {}
        if self._slow_step:
            self._slow_down()
        proc_ns = time.perf_counter_ns() - t0
        self.batch_sizes[len(jobs)] += 1
        swapped_at = None
        for sess, offset, x, _, raw_before in jobs:
            y = outs[sess.slot]
            if sess.fading is not None:
                y = crossfade(olds[sess.fading], y, 0, sess.path.fade)
                sess.fading, sess.fresh = None, True
                self._count(sess, Counter.RESETS)
                self.publish(Reset(sess.stream_id, ResetReason.VOICE, offset, sess.name))
                swapped_at = offset if swapped_at is None else swapped_at
            # Output [offset, offset + C) is the model's answer to input [offset + H, offset + H + C);
            # bypass plays input [offset, offset + C) itself (the same timeline), built only when played.
            raw = np.concatenate([raw_before, x[:C - H]]) if sess.path.plays_raw else None
            self._send(sess, offset, sess.path.finish(y, raw), proc_ns, len(jobs))
        if voice is not None:
            self.control.swapped(voice, swapped_at)
        if self._old_pool is not None and not any(s.fading is not None for s in self.sessions.values()):
            self._old_pool = None

    def _send(self, sess: Session, offset: int, y: np.ndarray, proc_ns: int, batch: int) -> None:
        """Check one session's output and send it to the session's listeners."""
        e = self.engine
        sess.steps_unchecked += 1
        check_state = sess.steps_unchecked >= STATE_CHECK_EVERY
        if check_state:
            sess.steps_unchecked = 0
        if not np.isfinite(y).all() or (check_state and not self.pool.state_is_finite(sess.slot)):
            self._reset(sess, ResetReason.NON_FINITE, offset)
            return
        seg = sess.seg
        last = seg.inputs[-1]  # the chunk that completed this step (see the module docstring)
        t_capture, t_wall = seg.times_of(offset, e.sample_rate)
        fresh, sess.fresh = sess.fresh, False
        stage = StageRecord("inference", self.host, last.recv_ns, time.monotonic_ns(), proc_ns,
                            self.model_id, fresh)
        out = AudioChunk(sess.stream_id, sess.out_seq, t_capture, t_wall, y, e.sample_rate, "f32le",
                         last.chunk.stages[-(MAX_STAGES - 1):] + (stage,), offset, sess.source_end, sess.name)
        try:
            sent = self.router.send(out, sess.name, sess.key)
        except ProtocolError as exc:  # a header from the wire that cannot go back out (offset near 2**63)
            sent = False
            self.notice("unsendable", "cannot send output", {"chunks": 1}, error=str(exc))
        self._count(sess, "chunks_out" if sent else "dropped_inference_send")
        self.publish(InferenceChunk(sess.stream_id, sess.out_seq, offset, proc_ns / 1e6,
                                    e.chunk_s * NS_PER_S / max(proc_ns, 1), sess.waiting_samples() / e.chunk_len,
                                    fresh, sess.name, batch))
        sess.out_seq += 1
