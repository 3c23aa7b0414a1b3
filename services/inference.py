"""``llvc inference``: convert the capture's chunks with LLVC, one streaming state per stream.

Binds ``audio_in`` (PULL) and ``audio_out`` (PUSH); the contract it keeps is in
:mod:`services` (offsets, the head message, gaps, resets, telemetry names).

How a turn of the loop works, and why:

* **Receive**: drain every valid chunk already waiting (non-blocking); only when there is
  nothing to do, wait up to 50 ms for one. Malformed input never gets this far: the bus's
  receiver rejects and counts it (``Service.watch_rejects``: counter ``rejected``, event
  ``reject`` at most twice a second).
* **Streams**: chunks of the current stream id join a work queue. A stream id never seen
  before takes over (reset, reason ``new_stream``) only when it looks like a capture (re)start:
  there is no current stream yet, or its chunk is a stream start (offset 0: capture begins
  every stream with its head there), or the current stream has been silent for longer than
  max(4 chunks, 250 ms) (a restarted capture whose head was lost while inference was briefly
  unreachable). Otherwise it is dropped (``dropped_unknown_stream``) and not remembered, so a
  flood of valid chunks from a stranger mid-stream can neither hijack the conversion nor get
  the real stream's chunks dropped as stale. An id seen before that is not current belongs to
  a replaced stream: dropped (``dropped_stale_stream``), so a flood from a stale sender can
  neither reset the state nor cost compute. "Silent" counts from the newest chunk of the
  current stream received, a whole received batch at a time: a turn that took long (this
  process was not scheduled) does not make a live stream look silent.
* **Backlog**: the newest chunk is the present; what still waits before it is how far behind
  live the output runs. Above ``max_backlog_ms`` the oldest queued chunks are dropped until the
  rest fits (reset, reason ``backlog``): a pipeline that fell behind jumps back to live audio
  instead of staying late for good.
* **Work**, for at most ~60 ms per turn so that SIGTERM is noticed promptly: feed queued chunks
  into the current *segment* (one continuous run of engine state) and run every engine step
  whose input is complete. The next chunk is fed only once the previous one's complete steps
  are done, so the chunk that completed a step is always the segment's newest one: its
  receive time and stages go into the output.

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
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import zmq

from common.config import PipelineConfigError
from common.protocol import MAX_NAME_LEN, MAX_STAGES, AudioChunk, ProtocolError, StageRecord
from common.settings import at_least, non_negative, one_of, positive, setting
from common.telemetry import Counter, InferenceChunk, InferenceStatus, Reset, ResetReason
from models.backends import BACKENDS
from models.config import CHECKPOINT_DEFAULT_HELP, CONFIG_DEFAULT_HELP
from models.passthrough import PassthroughEngine

from .base import ModelSettings, Service, add_service_arguments, model_spec, service_main
from .control_plane import ControlPlane
from .controls import AudioPath, LiveSettings
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
            "zero_filled_samples")

NS_PER_S = 1_000_000_000
RECV_WAIT_MS = 50        # how long an idle turn waits for input
WORK_BUDGET_S = 0.06     # compute per turn, so a turn stays well inside ~100 ms
STATE_CHECK_EVERY = 64   # engine steps between full state checks (the output is checked every step)
SEEN_STREAMS = 1024      # stream ids remembered as replaced
RECENT_INPUTS = 256      # input chunks kept per segment for timestamps
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


def run(args: argparse.Namespace) -> int:
    """Run the inference service until SIGTERM/SIGINT; returns the exit status."""
    return service_main(InferenceService, args)


@dataclass
class _Input:
    """A received chunk and when this process pulled it off the socket (monotonic ns)."""

    chunk: AudioChunk
    recv_ns: int


@dataclass
class _Segment:
    """One continuous run of engine state within a stream."""

    origin: int                   # stream index of the engine's first output sample
    expected: int                 # offset the next input chunk should have
    buf: np.ndarray               # fed samples not yet consumed by prime()/process()
    steps: int = 0                # engine steps done
    # The head_len raw (un-shaped) samples just before buf, and the same as the model got them
    # (shaped): bypass plays the first, a voice switch primes the new engine with the second.
    raw_tail: np.ndarray | None = None
    model_tail: np.ndarray | None = None
    inputs: deque = field(default_factory=lambda: deque(maxlen=RECENT_INPUTS))

    def times_of(self, index: int, sample_rate: int) -> tuple[int, int]:
        """``(t_capture_ns, t_wall_ns)`` of stream sample ``index``.

        From the newest input chunk that starts at or before it, at ``sample_rate``; before the
        segment's first chunk (a silent head), extrapolated back from that chunk.
        """
        ref = next((i.chunk for i in reversed(self.inputs) if i.chunk.offset <= index),
                   self.inputs[0].chunk)
        delta = (index - ref.offset) * NS_PER_S // sample_rate
        return max(0, ref.t_capture_ns + delta), max(0, ref.t_wall_ns + delta)


class InferenceService(Service):
    """Receives capture chunks, converts them per stream, sends them on to playback."""

    name = "inference"

    def __init__(self, cfg, args=None):
        super().__init__(cfg, args)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.engine = None
        self.receiver = self.sender = None
        self.kind, self.model_id, self.trained = "llvc", "", False
        self.device, self.threads, self.backend = "cpu", 1, "eager"
        self.host = (socket.gethostname() or "unknown")[:MAX_NAME_LEN]
        self.stream_id: str | None = None
        self._current_heard_ns = 0          # when the current stream's newest chunk was received
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._queue: deque[_Input] = deque()
        self._seg: _Segment | None = None
        self._out_seq = 0
        self._source_end: int | None = None
        self._fresh = False                 # the next output is the first after a reset
        self._steps_unchecked = 0

    # ------------------------------------------------------------------ lifetime
    def setup(self) -> None:
        a = self.args or argparse.Namespace()
        m, spec = model_spec(self.cfg, {
            "checkpoint": getattr(a, "checkpoint", None), "config": getattr(a, "config", None),
            "chunk_factor": getattr(a, "chunk_factor", None), "kind": getattr(a, "model_kind", None)})
        s = self.cfg.settings("inference", InferenceSettings, {
            "device": getattr(a, "device", None), "threads": getattr(a, "threads", None)})
        self._slow_step, self._slow_for = slow_step_from_env()
        self.kind, self.threads, self.settings = m.kind, s.threads, s
        self.live = self.cfg.settings("control", LiveSettings)
        t0 = time.perf_counter()
        if m.kind == "passthrough":
            self.backend, self.model_id, self.trained = "passthrough", "passthrough", True
            self.engine = PassthroughEngine(spec.geometry)  # the LLVC model's chunking
            self.voice = ""
            step_s = warm_up(self.engine)
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
        self.path = AudioPath(self.live, g.sample_rate)
        self.max_backlog = max(1, g.samples(s.max_backlog_ms))
        self.max_gap = g.samples(s.max_gap_ms)
        self.takeover_silence_ns = int(max(TAKEOVER_SILENCE_CHUNKS * g.chunk_s,
                                           TAKEOVER_SILENCE_MS / 1000) * NS_PER_S)
        self._slow_until = None
        if self._slow_step:
            self.log("warning", f"{SLOW_STEP_ENV} is set: every step is slowed down (a test hook)",
                     slow_step_ms=1000 * self._slow_step, for_s=self._slow_for or "ever")
        # Bind last: while the model loads, capture's sends fail (counted there) instead of
        # piling up stale audio in our queue.
        bus = self.open_bus()
        self.receiver = bus.audio_receiver("audio_in", expect_rate=g.sample_rate)
        self.watch_rejects(self.receiver)
        self.sender = bus.audio_sender("audio_out")
        self.control = ControlPlane(self, bus)
        self._poller = zmq.Poller()
        for sock in (self.receiver.socket, self.control.server.socket):
            self._poller.register(sock, zmq.POLLIN)
        self.ready = True
        self.log("info", "ready", model=self.model_id, kind=self.kind, backend=self.backend, device=self.device,
                 threads=self.threads, chunk_len=g.chunk_len, latency_ms=1000 * g.latency_s, load_s=load_s,
                 warm_step_ms=1000 * step_s)

    def _use(self, voice: Voice) -> None:
        """Make ``voice`` the one that converts (at start-up, or at a swap's chunk boundary)."""
        self.engine, self.backend, self.voice = voice.engine, voice.backend, voice.checkpoint
        self.model_id, self.trained, self.device = voice.model_id, voice.trained, voice.device

    def teardown(self) -> None:
        self.close_bus()
        self.receiver = self.sender = None

    def status(self) -> InferenceStatus:
        g = self.engine.geometry if self.engine is not None else None
        return InferenceStatus(
            self.backend, self.model_id, not self.trained, self.kind, self.device, self.threads, self.stream_id,
            chunk_len=g.chunk_len if g else None, chunk_ms=g.chunk_ms if g else None,
            algorithmic_latency_ms=1000 * g.algorithmic_latency_s if g else None,
            latency_ms=1000 * g.latency_s if g else None, chunk_factor=g.chunk_factor if g else None,
            controls=self.live.as_dict(), voice=self.voice)

    def next_offset(self) -> int | None:
        """The stream sample the next output chunk starts at (where a change applies from)."""
        seg = self._seg
        return seg.origin + seg.steps * self.engine.chunk_len if seg is not None else None

    # ------------------------------------------------------------------ the loop
    def loop_once(self) -> None:
        start = time.monotonic()
        self.control.serve()
        batch = self.receiver.drain()
        if not batch and not self._has_work():
            # Idle: wait for audio or a control request, whichever comes first.
            if self._poller.poll(RECV_WAIT_MS):
                self.control.serve()
                batch = self.receiver.drain()
        recv_ns = time.monotonic_ns()
        if any(c.stream_id == self.stream_id for c in batch):
            self._current_heard_ns = recv_ns  # before anything else in the batch is judged
        for c in batch:
            self._accept(c, recv_ns)
        self._limit_backlog()
        deadline = start + WORK_BUDGET_S
        while self._work_one() and time.monotonic() < deadline:
            pass

    def _has_work(self) -> bool:
        return bool(self._queue) or self._pending() >= self.engine.chunk_len

    def _accept(self, c: AudioChunk, recv_ns: int) -> None:
        """Queue a chunk of the current stream, switch to a new stream, or drop a stale or
        unknown one (the rules are in the module docstring)."""
        self.count("chunks_in")
        if c.stream_id != self.stream_id:
            if c.stream_id in self._seen:
                self.count("dropped_stale_stream")
                return
            if not self._may_take_over(c, recv_ns):
                self.count("dropped_unknown_stream")
                self.notice("unknown_stream", "dropped chunks of an unknown stream mid-stream", {"chunks": 1},
                            stream_id=c.stream_id, offset=c.offset, current=self.stream_id)
                return
            self._switch_stream(c)
        self._current_heard_ns = recv_ns
        self._queue.append(_Input(c, recv_ns))

    def _may_take_over(self, c: AudioChunk, recv_ns: int) -> bool:
        """Whether a never-seen stream id may become current: no current stream, a stream start
        (offset 0), or a current stream silent for longer than ``takeover_silence_ns``."""
        return (self.stream_id is None or c.offset == 0
                or recv_ns - self._current_heard_ns > self.takeover_silence_ns)

    def _switch_stream(self, c: AudioChunk) -> None:
        if self._queue:  # the replaced stream's unprocessed chunks are stale now
            self.count("dropped_stale_stream", len(self._queue))
            self._queue.clear()
        self._seen[c.stream_id] = None
        while len(self._seen) > SEEN_STREAMS:
            self._seen.popitem(last=False)
        previous, self.stream_id = self.stream_id, c.stream_id
        self._out_seq, self._source_end = 0, None
        self.log("info", "new stream", stream_id=c.stream_id, previous=previous, offset=c.offset)
        self._reset(ResetReason.NEW_STREAM, c.offset)

    def _reset(self, reason: ResetReason, offset: int) -> None:
        """Forget the engine state; the next chunk fed starts a new segment."""
        self._seg = None
        self.engine.reset()
        if reason == ResetReason.NEW_STREAM:
            self.path.reset()
        self._fresh = True
        self.count(Counter.RESETS)
        self.publish(Reset(self.stream_id, reason, offset))
        if reason != ResetReason.NEW_STREAM:
            self.notice(f"reset_{reason}", "stream state reset", reason=reason, stream_id=self.stream_id,
                        offset=offset)

    def _pending(self) -> int:
        """Samples fed into the current segment and not yet converted."""
        return len(self._seg.buf) if self._seg is not None else 0

    def _waiting_samples(self) -> int:
        return self._pending() + sum(i.chunk.n_samples for i in self._queue)

    def _limit_backlog(self) -> None:
        """Jump back to live audio when the work waiting before the newest chunk is too much.

        The newest chunk is the present; everything still unprocessed before it (the segment's
        pending samples and older queued chunks) is how far behind live the output runs. Above
        ``max_backlog`` the oldest queued chunks are dropped until what is left before the
        newest fits, and the state is reset (any pending samples go with it).
        """
        if not self._queue:
            return
        sizes = [i.chunk.n_samples for i in self._queue]
        if self._pending() + sum(sizes[:-1]) <= self.max_backlog:
            return
        keep, kept = 1, 0
        for n in reversed(sizes[:-1]):
            if kept + n > self.max_backlog:
                break
            keep, kept = keep + 1, kept + n
        drop = len(sizes) - keep
        for _ in range(drop):
            self._queue.popleft()
        self.count(Counter.DROPPED_INFERENCE_BACKLOG, drop)
        self._reset(ResetReason.BACKLOG, self._queue[0].chunk.offset)

    def _work_one(self) -> bool:
        """One engine step, or feeding one queued chunk; False when there is nothing to do."""
        if self._pending() >= self.engine.chunk_len:
            self._step()
        elif self._queue:
            self._feed(self._queue.popleft())
        else:
            return False
        return True

    # ------------------------------------------------------------------ segments
    def _start_segment(self, offset: int) -> _Segment:
        origin = max(0, offset - self.engine.head_len)
        # Samples between origin and offset are the silent head (none at offset 0).
        self._seg = _Segment(origin, offset, np.zeros(offset - origin, np.float32))
        return self._seg

    def _feed(self, item: _Input) -> None:
        """Append a chunk to the current segment (zero-filling a short gap), priming if due."""
        c = item.chunk
        seg = self._seg if self._seg is not None else self._start_segment(c.offset)
        gap = c.offset - seg.expected
        if gap < 0:
            self.count("dropped_duplicate")
            return
        if gap > self.max_gap:
            self._reset(ResetReason.GAP, c.offset)
            seg, gap = self._start_segment(c.offset), 0
        if gap:
            self.count("zero_filled_samples", gap)
        seg.buf = np.concatenate([seg.buf, np.zeros(gap, np.float32), c.samples])
        seg.expected = c.end
        seg.inputs.append(item)
        if c.source_end is not None:
            self._source_end = c.source_end
        e = self.engine
        if not e.primed and len(seg.buf) >= e.head_len:
            seg.raw_tail = seg.buf[:e.head_len].copy()
            seg.model_tail = self.path.shape_input(seg.raw_tail)
            e.prime(seg.model_tail)
            seg.buf = seg.buf[e.head_len:]

    def _slow_down(self) -> None:
        """The test hook :data:`SLOW_STEP_ENV`: sleep, for its span after the first step."""
        now = time.monotonic()
        if self._slow_until is None:
            self._slow_until = now + self._slow_for if self._slow_for else float("inf")
        if now < self._slow_until:
            time.sleep(self._slow_step)

    def _convert(self, x: np.ndarray, head: np.ndarray, offset: int) -> np.ndarray:
        """One engine step; at a voice swap, the new voice's first step too, crossfaded in.

        The new engine starts afresh (a state reset, reason ``voice``) primed with the ``head``
        samples before ``x``: from the crossfade's end on, the output is exactly the new voice's
        streamed conversion from ``offset``.
        """
        voice = self.control.ready_voice()
        if voice is None:
            return self.engine.process(x)
        old = self.engine.process(x)
        voice.engine.reset()
        voice.engine.prime(head)
        new = voice.engine.process(x)
        self._use(voice)
        self._fresh = True
        self.count(Counter.RESETS)
        self.publish(Reset(self.stream_id, ResetReason.VOICE, offset))
        self.control.swapped(voice, offset)
        return crossfade(old, new, 0, self.path.fade)

    def _step(self) -> None:
        """Convert the segment's next ``chunk_len`` samples and send them."""
        seg = self._seg
        C, H = self.engine.chunk_len, self.engine.head_len
        offset = self.next_offset()
        x, seg.buf = seg.buf[:C], seg.buf[C:]
        seg.steps += 1
        t0 = time.perf_counter_ns()
        shaped = self.path.shape_input(x)
        head, raw_before = seg.model_tail, seg.raw_tail
        seg.raw_tail, seg.model_tail = x[C - H:], shaped[C - H:]
        y = self._convert(shaped, head, offset)
        # Output [offset, offset + C) is the model's answer to input [offset + H, offset + H + C);
        # bypass plays input [offset, offset + C) itself (the same timeline), built only when played.
        raw = np.concatenate([raw_before, x[:C - H]]) if self.path.plays_raw else None
        y = self.path.finish(y, raw)
        if self._slow_step:
            self._slow_down()
        proc_ns = time.perf_counter_ns() - t0
        e = self.engine
        self._steps_unchecked += 1
        check_state = self._steps_unchecked >= STATE_CHECK_EVERY
        if check_state:
            self._steps_unchecked = 0
        if not np.isfinite(y).all() or (check_state and not e.state_is_finite()):
            self._reset(ResetReason.NON_FINITE, offset)
            return
        last = seg.inputs[-1]  # the chunk that completed this step (see the module docstring)
        t_capture, t_wall = seg.times_of(offset, e.sample_rate)
        fresh, self._fresh = self._fresh, False
        stage = StageRecord("inference", self.host, last.recv_ns, time.monotonic_ns(), proc_ns,
                            self.model_id, fresh)
        out = AudioChunk(self.stream_id, self._out_seq, t_capture, t_wall, y, e.sample_rate, "f32le",
                         last.chunk.stages[-(MAX_STAGES - 1):] + (stage,), offset, self._source_end)
        try:
            sent = self.sender.send(out)
        except ProtocolError as exc:  # a header from the wire that cannot go back out (offset near 2**63)
            sent = False
            self.notice("unsendable", "cannot send output", {"chunks": 1}, error=str(exc))
        self.count("chunks_out" if sent else "dropped_inference_send")
        self.publish(InferenceChunk(self.stream_id, self._out_seq, offset, proc_ns / 1e6,
                                    e.chunk_s * NS_PER_S / max(proc_ns, 1), self._waiting_samples() / C, fresh))
        self._out_seq += 1
