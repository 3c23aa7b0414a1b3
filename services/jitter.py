"""The playback jitter buffer: samples keyed by stream offset, played on a fixed timeline.

Pure logic: no sockets, no clocks. Times come in as arguments (``CLOCK_MONOTONIC`` ns), so the
tests drive it sample by sample. One writer (the service's socket loop, :meth:`JitterBuffer.put`)
and one reader (the sink, :meth:`JitterBuffer.read`) may live on different threads; each call
holds a short lock and does a bounded amount of numpy work, nothing that blocks.

Timeline (see ``services/__init__.py``): the first chunk of a stream sets the read position to
its offset and the stream starts playing ``target_ms`` after that chunk arrived. From then on
every read consumes exactly ``n`` positions, whatever is there, so output sample ``k`` after the
start is always stream sample ``first_offset + k``: missing audio becomes silence in its place,
and audio that arrives after its place was played is dropped as late. That is what keeps e2e
latency constant and a file sink aligned with the source.

Overflow: right after a chunk arrives, the buffered-ahead audio is normally that chunk plus
``target_ms``. Slack beyond that which every one of the last ``TRIM_WINDOW`` arrivals had, when
it exceeds ``max(target_ms, 3 ms)``, means the timeline sits later than the arrivals need (a
slow first chunk set it): the oldest audio is dropped to pull the timeline earlier by exactly
that slack, so latency converges instead of keeping a bad start for the whole run. When what is
buffered beyond the chunk just arrived exceeds ``max_ms`` (the sink stalled, a burst) it trims
at once so that this chunk plus ``target_ms`` remain. ``max_ms``, like ``target_ms``, counts
beyond the chunk: a limit on the whole fill would leave a 52 ms chunk (chunk factor 4) 2 ms of
jitter under the default 60 ms before every early arrival was trimmed.

Growth: when chunks keep arriving after their place was played (at least ``GROW_LATE`` of the
last ``GROW_WINDOW`` arrivals, spread over at least ``GROW_SPAN_MS`` of arrival time: an
inference that cannot keep up, a congested link), the timeline moves later: reads pause for the
median lateness of those arrivals plus ``target_ms`` (silence, counted as ``grown_samples``),
capped so that neither the buffer's fill (beyond a chunk) nor the timeline's total growth
exceeds ``max_ms``.
Without it a fixed timeline set while things were fast drops everything once they are slow.
One late burst (a stall: its chunks arrive together) does not grow it. Once the
lateness is over, slack that persists over ``TRIM_WINDOW`` arrivals is given back, down to
1 ms and at most what was grown, so latency returns to where it was.

Adaptive playout (``adaptive`` given, :mod:`services.playout`): the timeline follows the
arrivals instead of the two rules above. Every fresh chunk's headroom (how far ahead of the
read position it arrived; negative when late) goes to the controller; a late chunk grows the
timeline at once (a pause, as above), and when every recent arrival had more headroom than it
needed the timeline shrinks by a fraction of a millisecond at a time: that many samples are
skipped at the start of a read, under a crossfade from the audio they replace. ``target_ms``
is then only where a stream starts, and :attr:`JitterBuffer.target_ms` reports the current
margin. The ``max_ms`` overflow rule applies either way. A shrink changes what is heard, not the
stream: the read says what it skipped and what the crossfade covered (:class:`ReadResult`), so
a recording aligned to the stream keeps every sample as converted.

Storage is a ring of ``max_ms`` plus a second (a chunk, and headroom for reads; chunks are
far shorter than a second) with a validity mask:
position ``p`` lives at ``p % capacity``. The overflow rule is applied *before* a chunk is
stored, so stored positions never alias.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from common.audio import SAMPLE_RATE, ms_to_samples

from .playout import AdaptivePlayout

#: After this long with nothing to play a stream counts as stalled (a live capture that went
#: away): its silence is no longer counted as underrun samples, which would otherwise grow
#: without bound and drown the real glitches in the monitor's figures.
STALL_MS = 500.0
#: Arrivals over which unused slack must persist before the timeline is pulled earlier: about
#: 200 ms at 13 ms chunks, so one early chunk after a slow start cannot cause a trim.
TRIM_WINDOW = 16
#: Arrivals over which lateness is judged, how many of them must have been late for the
#: timeline to grow, and over how much arrival time those late ones must spread: a stall's
#: chunks arrive together, however many they are, and must not grow it.
GROW_WINDOW = 16
GROW_LATE = 12
GROW_SPAN_MS = 80.0
#: A stream whose chunk arrives more than max_ms late before this many of its chunks were played
#: restarts its playout at that chunk (see ``_put``) instead of dropping everything that follows.
RESTART_WITHIN = 8
#: Length of the crossfade over an adaptive shrink's cut: long against the cut (a quarter of a
#: millisecond), so the waveform bends rather than jumps.
XFADE_MS = 2.0
#: Stream ids remembered after they were replaced or drained, so stragglers are ignored
#: instead of switching the output back to an old stream.
RETIRED_STREAMS = 8


@dataclass
class JitterStats:
    """Cumulative counts (the service reports them as its counters under these names)."""

    streams: int = 0             # streams started
    chunks_played: int = 0       # chunks whose first sample reached the output
    dropped_late: int = 0        # chunks wholly or partly dropped because their place was played
    late_samples: int = 0        # samples those drops removed
    dropped_overflow: int = 0    # overflow corrections (fill beyond the chunk above max_ms)
    overflow_samples: int = 0    # buffered samples they discarded
    dropped_old_stream: int = 0  # chunks of a stream already replaced or drained
    underruns: int = 0           # runs of invented samples inside an active stream
    underrun_samples: int = 0    # samples invented inside an active stream
    lost_samples: int = 0        # of those, samples no chunk was ever sent for (offset gaps)
    drained: int = 0             # streams whose source_end was played
    timeline_grows: int = 0      # times persistent lateness moved the timeline later
    grown_samples: int = 0       # silence those moves inserted
    timeline_restarts: int = 0   # streams whose playout restarted before anything played
    timeline_shrinks: int = 0    # adaptive playout: times the timeline moved earlier
    shrunk_samples: int = 0      # samples those moves skipped


@dataclass(frozen=True)
class ChunkStart:
    """A chunk whose first sample is in a read block, at ``index`` within the block."""

    index: int
    stream_id: str
    seq: int
    offset: int
    t_capture_ns: int
    wait_ns: int = 0   # from the chunk's arrival until this sample left the buffer


@dataclass(frozen=True)
class PutResult:
    """What :meth:`JitterBuffer.put` did with a chunk."""

    new_stream: bool = False
    stored: int = 0      # samples kept
    late: int = 0        # samples dropped as late
    overflow: int = 0    # buffered samples dropped by an overflow correction this put caused
    ignored: bool = False  # a chunk of an old stream, or entirely past the stream's end


@dataclass
class ReadResult:
    """What one :meth:`JitterBuffer.read` block holds.

    ``out[stream_index : stream_index + stream_samples]`` are stream positions
    ``stream_offset ...`` of ``stream_id`` (real or invented); the rest of the block is silence
    outside any stream (before playout start, after ``source_end``, no stream).

    After an adaptive shrink, ``skipped`` holds the stream positions it skipped (those just
    before ``stream_offset``, never played) and ``unfaded`` the stream's own samples where
    ``out`` begins with the crossfade over the cut: the stream as converted is ``skipped``,
    then ``unfaded``, then the rest of the stream part of ``out``.
    """

    stream_id: str | None = None
    stream_index: int = 0
    stream_offset: int = 0
    stream_samples: int = 0
    starts: list[ChunkStart] = field(default_factory=list)
    t_ns: int = 0              # the buffer's clock for out[0] (read()'s t_out_ns)
    underruns: int = 0         # underrun events that began in this block
    invented: int = 0          # underrun samples in this block
    started: bool = False      # the stream's playout began in this block
    drained: tuple[str, int] | None = None  # (stream_id, source_end) once, when it was passed
    skipped: np.ndarray | None = None  # an adaptive shrink's skipped samples (see above)
    unfaded: np.ndarray | None = None  # the stream's samples under that shrink's crossfade


class JitterBuffer:
    """See the module docstring. All positions are stream sample offsets."""

    def __init__(self, target_ms: float, max_ms: float, fade_ms: float, sample_rate: int = SAMPLE_RATE,
                 adaptive: AdaptivePlayout | None = None):
        if not 0 <= target_ms < max_ms:
            raise ValueError(f"need 0 <= target_ms < max_ms, got {target_ms} and {max_ms}")
        self.sr = sample_rate
        self.adaptive = adaptive
        # A shrink's crossfade, from the audio skipped to the audio after it.
        self.xfade = max(1, ms_to_samples(XFADE_MS, sample_rate))
        self.target = ms_to_samples(target_ms, sample_rate)
        self.target_ns = int(target_ms * 1e6)
        self.max = max(ms_to_samples(max_ms, sample_rate), self.target + 1)
        self.stall = ms_to_samples(STALL_MS, sample_rate)
        # The fade is a gain that moves by `step` per sample: fade_ms 0 means an immediate cut.
        self.step = 1.0 / max(1, ms_to_samples(fade_ms, sample_rate))
        self.capacity = self.max + sample_rate
        self._data = np.zeros(self.capacity, np.float32)
        self._valid = np.zeros(self.capacity, bool)
        self._lock = threading.Lock()
        self.stats = JitterStats()
        self._retired: dict[str, bool] = {}  # stream id -> drained (else replaced)
        self._gain = 1.0      # output gain: 1 while audio flows, fades on invented samples
        self._hold = 0.0      # last real sample, what a fade-out starts from
        self._inventing = False
        self._dry = 0         # invented samples in a row
        self._clear_stream()

    # ------------------------------------------------------------------ state
    def _clear_stream(self) -> None:
        self.stream_id: str | None = None
        self.read_pos = 0
        self.newest_end = 0
        self.source_end: int | None = None
        self.playing = False
        self._start_ns = 0
        # offset -> (stream, seq, t_capture, arrival)
        self._starts: dict[int, tuple[str, int, int, int]] = {}
        self._slack: deque[int] = deque(maxlen=TRIM_WINDOW)  # unused slack at recent arrivals
        # (arrival ns, samples late) of recent arrivals
        self._lateness: deque[tuple[int, int]] = deque(maxlen=GROW_WINDOW)
        self._pause = 0       # reads still to pause for (silence before the timeline goes on)
        self._grown = 0       # how much later than its start the timeline runs now (growth - trims)
        self._skip = 0        # adaptive shrink still to apply at a read
        if self.adaptive is not None:
            self.adaptive.reset()
        self._stream_played = 0  # chunk starts of this stream played so far
        self._valid[:] = False

    def _retire(self, drained: bool = False) -> None:
        if self.stream_id is not None:
            self._retired[self.stream_id] = drained
            while len(self._retired) > RETIRED_STREAMS:
                del self._retired[next(iter(self._retired))]
        self._clear_stream()

    @property
    def fill(self) -> int:
        """Buffered-ahead samples: newest data's end minus the read position (0 if none)."""
        return max(0, self.newest_end - self.read_pos) if self.stream_id is not None else 0

    @property
    def target_ms(self) -> float:
        """The playout margin: ``target_ms`` as configured, or with adaptive playout the headroom
        the median recent arrival had (the configured one until a stream plays)."""
        margin = self.adaptive.margin if self.adaptive is not None else None
        return (self.target if margin is None else margin) * 1000.0 / self.sr

    @property
    def fill_ms(self) -> float:
        """:attr:`fill` in milliseconds."""
        return self.fill * 1000.0 / self.sr

    def _slots(self, start: int, n: int) -> np.ndarray:
        return (start + np.arange(n)) % self.capacity

    def _discard(self, start: int, stop: int) -> int:
        """Forget positions [start, stop); returns how many of them held data."""
        if stop <= start:
            return 0
        if stop - start >= self.capacity:
            had = int(self._valid.sum())
            self._valid[:] = False
        else:
            idx = self._slots(start, stop - start)
            had = int(self._valid[idx].sum())
            self._valid[idx] = False
        for off in [o for o in self._starts if o < stop]:
            del self._starts[off]
        return had

    # ------------------------------------------------------------------ writer
    def put(self, stream_id: str, offset: int, samples: np.ndarray, arrival_ns: int, *, seq: int = 0,
            t_capture_ns: int = 0, source_end: int | None = None) -> PutResult:
        """Store a chunk that arrived at ``arrival_ns``; see the module docstring for the rules."""
        with self._lock:
            return self._put(stream_id, int(offset), samples, arrival_ns, seq, t_capture_ns, source_end)

    def _put(self, stream_id, offset, samples, arrival_ns, seq, t_capture_ns, source_end) -> PutResult:
        new = False
        if stream_id != self.stream_id:
            if stream_id in self._retired:
                # After a drain the capture's padding chunks still come: expected, not a drop.
                if not self._retired[stream_id]:
                    self.stats.dropped_old_stream += 1
                return PutResult(ignored=True)
            self._retire()  # the old stream's remaining audio goes with it
            self.stream_id = stream_id
            self.read_pos = self.newest_end = offset
            self._start_ns = arrival_ns + self.target_ns
            self.stats.streams += 1
            new = True
        if source_end is not None and self.source_end is None:
            self.source_end = int(source_end)
        end = offset + len(samples)
        if self.source_end is not None:
            end = min(end, self.source_end)  # what lies past the source's end is never played
        if end <= offset:
            return PutResult(new_stream=new, ignored=True)

        if (self.playing and self._stream_played < RESTART_WITHIN
                and self.read_pos - offset > self.max):
            # Late by more than max_ms within the stream's first chunks: the output ran ahead of
            # the start it was given (a device that drains a deep buffer as it starts reads far
            # ahead at once), further than growth may ever make up, so everything that follows
            # would be dropped. No latency has been established yet: start the playout again at
            # this chunk. Later, lateness is bounded by growth and max_ms instead (a link that
            # keeps falling behind must not raise latency).
            self._restart_timeline(offset, arrival_ns)
        if offset > self.newest_end and self.playing:
            # An offset gap: whatever of it was already played as silence was lost upstream
            # (the rest is counted when it is played, see _play).
            self.stats.lost_samples += max(0, min(offset, self.read_pos) - self.newest_end)
        fresh = offset >= self.newest_end  # new audio, not a retransmission or a duplicate
        self.newest_end = max(self.newest_end, end)  # late data still shows what was sent
        late = 0
        if self.playing and self.adaptive is not None:
            if fresh:
                self._adapt(offset - self.read_pos + self._pause, arrival_ns)
        elif self.playing:
            self._lateness.append((arrival_ns, max(0, self.read_pos - offset)))
        if offset < self.read_pos:
            late = min(end, self.read_pos) - offset
            self.stats.dropped_late += 1
            self.stats.late_samples += late
            if self.adaptive is None:
                self._grow_if_persistently_late()
            if end <= self.read_pos:
                return PutResult(new_stream=new, late=late)

        overflow = 0
        # Right after an in-order chunk arrives the buffered-ahead audio is normally that chunk
        # plus target. What every one of the last TRIM_WINDOW arrivals had beyond that, when
        # it is more than max(target, 3 ms), is slack nobody needed: the timeline sits later
        # than the arrivals require (a slow first chunk set it). Pull the timeline earlier by
        # exactly that much, so latency converges instead of keeping a bad start for the whole
        # run. Above max_ms, trim at once. Either way this chunk plus target remain at least.
        n_new = end - offset
        new_pos = None
        if self.playing and end == self.newest_end and offset >= self.read_pos and self.adaptive is None:
            self._slack.append(self.newest_end - self.read_pos + self._pause - (n_new + self.target))
            spare = min(self._slack) if len(self._slack) == TRIM_WINDOW else 0
            if spare > max(self.target, ms_to_samples(3.0, self.sr)):
                new_pos = self.read_pos + spare
            elif self._grown and spare > ms_to_samples(1.0, self.sr):
                # Lateness made the timeline grow and is over: give the growth back, down to
                # a millisecond, so that latency returns to where it was before.
                new_pos = self.read_pos + min(spare, self._grown)
        if self.newest_end - self.read_pos > n_new + self.max:  # max_ms beyond the chunk, as target_ms
            new_pos = self.newest_end - (n_new + self.target)
        if new_pos is not None:
            self._slack.clear()
            # Dropped: what was buffered below the new position, and this chunk's part below it.
            overflow = (self._discard(self.read_pos, new_pos)
                        + max(0, min(end, new_pos) - max(offset, self.read_pos)))
            self._grown = max(0, self._grown - (new_pos - self.read_pos))
            if self.adaptive is not None:
                self.adaptive.moved(self.read_pos - new_pos)
            self.read_pos = new_pos
            self.stats.dropped_overflow += 1
            self.stats.overflow_samples += overflow

        first = max(offset, self.read_pos)
        if first < end:
            idx = self._slots(first, end - first)
            self._data[idx] = samples[first - offset:end - offset]
            self._valid[idx] = True
            if first == offset:
                self._starts[offset] = (stream_id, seq, t_capture_ns, arrival_ns)
        return PutResult(new_stream=new, stored=max(0, end - first), late=late, overflow=overflow)

    def _growth_room(self) -> int:
        """How far the timeline may grow now: what is buffered ahead plus the pause stays within
        ``max_ms``, a chunk's worth below the overflow limit (the chunk plus ``max_ms``), so that
        the next arrival does not trim what it grew."""
        return self.max - max(0, self.newest_end - self.read_pos) - self._pause

    def _restart_timeline(self, offset: int, arrival_ns: int) -> None:
        self.read_pos = self.newest_end = offset
        self._start_ns = arrival_ns + self.target_ns
        self.playing = False
        self._starts.clear()
        self._slack.clear()
        self._lateness.clear()
        self._pause = self._grown = 0
        self._valid[:] = False
        self.stats.timeline_restarts += 1

    def _adapt(self, headroom: int, arrival_ns: int) -> None:
        """Adaptive playout: let the controller see this arrival and apply its move."""
        move = self.adaptive.arrived(headroom, arrival_ns, max(0, self._growth_room()))
        if move > 0:
            self._pause += move
            self.stats.timeline_grows += 1
            self.stats.grown_samples += move
        elif move < 0:
            self._skip += -move

    def _grow_if_persistently_late(self) -> None:
        """Move the timeline later when most recent arrivals were late (see the module docstring)."""
        late = [(t, x) for t, x in self._lateness if x > 0]
        if len(late) < GROW_LATE or late[-1][0] - late[0][0] < GROW_SPAN_MS * 1e6:
            return
        # Bounded twice by max_ms: the buffer's fill, and the timeline's total growth (after a
        # long stall the read position runs ahead of the data, and growth after growth would
        # otherwise follow every retransmission stall of a lossy link).
        room = min(self._growth_room(), self.max - self.target - self._grown)
        grow = min(int(np.median([x for _, x in late])) + self.target, room)
        if grow <= 0:
            return  # already as late as max_ms allows: drops are the only way to stay bounded
        self._pause += grow
        self._grown += grow
        self._lateness.clear()
        self._slack.clear()
        self.stats.timeline_grows += 1
        self.stats.grown_samples += grow

    # ------------------------------------------------------------------ reader
    def read(self, n: int, out: np.ndarray, t_out_ns: int) -> ReadResult:
        """Fill ``out[:n]`` with the next ``n`` output samples; ``out[0]`` plays at ``t_out_ns``.

        Always consumes ``n`` positions of a playing stream (the timeline never stalls), except
        while a growth pause lasts (those reads are silence in front of the stream).
        """
        if not 0 < n <= self.capacity - self.max:
            raise ValueError(f"read size must be 1..{self.capacity - self.max}, got {n}")
        with self._lock:
            res = ReadResult(t_ns=t_out_ns)
            k = 0  # where this block's stream samples begin
            if self.stream_id is not None and not self.playing:
                # Playout starts at the first sample whose output time is >= start time.
                wait = math.ceil((self._start_ns - t_out_ns) * self.sr / 1e9)
                if wait < n:
                    k = max(0, wait)
                    self._fade(out[:k])  # whatever played before still fades out
                    self.playing, res.started = True, True
                    self._gain, self._hold = 1.0, 0.0  # a stream starts as it is, no fade-in
                    self._inventing, self._dry = False, 0
            if not self.playing:
                self._fade(out[:n])
                return res
            if self._pause:  # the timeline grew: silence here, the stream goes on after it
                p = min(self._pause, n - k)
                self._fade(out[k:k + p])
                self._pause -= p
                k += p
            # (Not in a read the pause filled: the skip waits for one that plays the stream.)
            skipped = self._shrink() if self._skip and not self._pause and k < n else None
            m = n - k
            pos = self.read_pos
            in_stream = m if self.source_end is None else max(0, min(m, self.source_end - pos))
            res.stream_id, res.stream_offset = self.stream_id, pos
            res.stream_index, res.stream_samples = k, in_stream
            if in_stream:
                self._play(out[k:k + in_stream], pos, res)
                if skipped is not None:  # fade from the audio the shrink skipped into what follows
                    res.skipped, replaced = skipped
                    f = min(len(replaced), in_stream)
                    res.unfaded = out[k:k + f].copy()
                    w = np.arange(1, f + 1, dtype=np.float32) / (len(replaced) + 1)
                    out[k:k + f] = replaced[:f] * (1 - w) + out[k:k + f] * w
                for off in [o for o in self._starts if o < pos + in_stream]:
                    sid, seq, t_cap, arrival = self._starts.pop(off)
                    index = k + off - pos
                    res.starts.append(ChunkStart(index, sid, seq, off, t_cap,
                                                 round(t_out_ns + index * 1e9 / self.sr) - arrival))
                self.stats.chunks_played += len(res.starts)
                self._stream_played += len(res.starts)
            self._fade(out[k + in_stream:n])
            self.read_pos = pos + m
            if self.source_end is not None and self.read_pos >= self.source_end:
                res.drained = (self.stream_id, self.source_end)
                self.stats.drained += 1
                self._retire(drained=True)
            return res

    def _shrink(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Apply a pending adaptive shrink at the read position: skip those samples and return
        them and the ones the skip replaces, to fade from. Only inside continuous audio: if any
        of it is missing, wait (a gap's own fade is there, and skipping into it would hide
        nothing)."""
        pos, s = self.read_pos, self._skip
        if (self.source_end is not None and pos + s + self.xfade > self.source_end) or \
                not self._valid[self._slots(pos, s + self.xfade)].all():
            return None
        replaced = self._data[self._slots(pos, self.xfade)].copy()
        skipped = self._data[self._slots(pos, s)].copy()
        self._discard(pos, pos + s)
        self.read_pos = pos + s
        self._skip = 0
        self.stats.timeline_shrinks += 1
        self.stats.shrunk_samples += s
        return skipped, replaced

    def _play(self, out: np.ndarray, pos: int, res: ReadResult) -> None:
        """Stream positions [pos, pos + len(out)): real samples, or a fade over the gaps."""
        m = len(out)
        idx = self._slots(pos, m)
        valid = self._valid[idx]
        out[:] = self._data[idx]
        self._valid[idx] = False
        if self._gain == 1.0 and valid.all():  # the common case: a plain copy
            self._hold = float(out[-1])
            self._inventing, self._dry = False, 0
            return
        # Walk the runs of real and missing samples, moving the gain by `step` per sample.
        edges = np.flatnonzero(valid[1:] != valid[:-1]) + 1
        bounds = [0, *edges.tolist(), m]
        for a, b in zip(bounds[:-1], bounds[1:]):
            ramp = np.arange(1, b - a + 1, dtype=np.float64) * self.step
            if valid[a]:
                if self._gain < 1.0:
                    out[a:b] *= np.minimum(1.0, self._gain + ramp).astype(np.float32)
                    self._gain = min(1.0, self._gain + ramp[-1])
                self._hold = float(self._data[idx[b - 1]])
                self._inventing, self._dry = False, 0
                continue
            self._fade(out[a:b])
            if not self._inventing:
                self._inventing = True
                self.stats.underruns += 1
                res.underruns += 1
            counted = max(0, min(b - a, self.stall - self._dry))
            self._dry += b - a
            self.stats.underrun_samples += counted
            res.invented += counted
            # Positions below the newest data are holes: their chunks never came.
            self.stats.lost_samples += max(0, min(pos + b, self.newest_end) - (pos + a))

    def _fade(self, out: np.ndarray) -> None:
        """Invented output: a linear fade from the last real sample down to silence."""
        n = len(out)
        if n == 0:
            return
        if self._gain <= 0.0 or self._hold == 0.0:
            out[:] = 0.0
            self._gain = 0.0
            return
        ramp = self._gain - np.arange(1, n + 1, dtype=np.float64) * self.step
        np.maximum(ramp, 0.0, out=ramp)
        out[:] = (self._hold * ramp).astype(np.float32)
        self._gain = float(ramp[-1])
