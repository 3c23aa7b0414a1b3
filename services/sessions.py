"""Sessions: the clients one inference server converts for, and what it keeps for each.

A **session** is a client: a capture and a playback that share a name (``capture.session``; by
default the host's name, so the two services of one host pair up without configuration, and a
second capture of the same host takes over from the first, as before sessions existed). The name
survives restarts of either service; stream ids stay per capture start, and inference's stream
rules (take-over, stale and unknown streams, gaps, backlog: :mod:`services.inference`) apply
within each session, so one client's restart, burst or silence never touches another's.

Each session holds one slot of the voice's stream pool (:mod:`models.pool`): its exact model
state. Inference admits at most ``inference.max_streams`` sessions (a session beyond that is
refused with an event its capture logs), frees the slot of a session silent for
``inference.idle_s``, and with CURVE binds a session to the client key that opened it: chunks
from another key are dropped, and its audio goes only to listeners with that key.
"""
from __future__ import annotations

import re
import socket
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from common.protocol import MAX_NAME_LEN, AudioChunk

from .controls import AudioPath

NS_PER_S = 1_000_000_000
RECENT_INPUTS = 256      # input chunks kept per segment for timestamps
SEEN_STREAMS = 1024      # stream ids remembered per session as replaced
_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_NAME_LEN}}}")


def check_session_name(name: str) -> str | None:
    """Why ``name`` cannot name a session (``None`` if it can): 1-64 letters, digits, ``.-_``."""
    if name == "" or _NAME.fullmatch(name):
        return None
    return f"expected 1-{MAX_NAME_LEN} letters, digits, '.', '-' or '_', got {name!r}"


def session_name(setting: str) -> str:
    """The session a client runs as: ``setting``, or (empty) derived from the host's name."""
    if setting:
        return setting
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname() or "")[:MAX_NAME_LEN]
    return host or "default"


@dataclass
class Input:
    """A received chunk and when this process pulled it off the socket (monotonic ns)."""

    chunk: AudioChunk
    recv_ns: int


@dataclass
class Segment:
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


@dataclass
class Session:
    """What inference keeps for one client (see the module docstring)."""

    name: str
    slot: int                            # its place in the voice's stream pool
    key: str | None                      # the CURVE key that opened it (None without CURVE)
    path: AudioPath                      # the live settings applied to its audio (gain, AGC state, ...)
    active_ns: int                       # when a chunk of it was received last (idle eviction)
    stream_id: str | None = None
    heard_ns: int = 0                    # when its current stream's newest chunk was received
    seen: OrderedDict = field(default_factory=OrderedDict)   # replaced stream ids
    queue: deque = field(default_factory=deque)              # Inputs not fed yet
    seg: Segment | None = None
    out_seq: int = 0
    source_end: int | None = None
    fresh: bool = False                  # the next output is the first after a reset
    fading: int | None = None            # during a voice swap: its slot in the old voice's pool
    steps_unchecked: int = 0
    counts: dict = field(default_factory=dict)  # its share of the service's counters

    def pending(self) -> int:
        """Samples fed into the current segment and not yet converted."""
        return len(self.seg.buf) if self.seg is not None else 0

    def waiting_samples(self) -> int:
        """Samples received and not yet converted (pending and queued)."""
        return self.pending() + sum(i.chunk.n_samples for i in self.queue)

    def remember(self, stream_id: str) -> None:
        """Remember ``stream_id`` as one of this session's (a later replaced one is stale)."""
        self.seen[stream_id] = None
        while len(self.seen) > SEEN_STREAMS:
            self.seen.popitem(last=False)

    def describe(self) -> dict:
        """What the heartbeat says about the session: name, stream, slot and its counters."""
        return {"name": self.name, "stream_id": self.stream_id, "slot": self.slot, "counters": dict(self.counts)}
