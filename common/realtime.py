"""Real-time scheduling for a process on the audio path, as JACK and PipeWire ask for it.

A chunk every 13 ms leaves little room for the scheduler to run something else first: on a busy
machine a normal-priority audio thread waits behind whatever else is runnable. Under
``SCHED_FIFO`` it runs as soon as it is woken, ahead of every normal thread.

:func:`request_fifo` moves *every thread the process has now* (the main loop, ZeroMQ's I/O
thread, a sound device's callback thread, a sender thread) to ``SCHED_FIFO``, with
``SCHED_RESET_ON_FORK``: threads and processes started later begin at normal priority, so a
background loader or an export child never competes with the audio. Linux's real-time
throttling (95 % of each second, ``kernel.sched_rt_runtime_us``) keeps a runaway thread from
freezing the machine. Where it is not permitted (no ``CAP_SYS_NICE`` and ``RLIMIT_RTPRIO`` below
the priority; rtkit is not used) nothing changes and the result says why, in one line.

Linux only; elsewhere the request is refused with that reason. The standard library only.
"""
from __future__ import annotations

import errno
import gc
import os
import time
from dataclasses import dataclass

#: SCHED_FIFO's priority range on Linux.
MIN_PRIORITY, MAX_PRIORITY = 1, 99


@dataclass(frozen=True)
class Scheduling:
    """What a request achieved: ``policy`` ``"fifo"`` at ``priority`` for ``threads`` threads, or
    ``"normal"``, with ``refused`` saying why when real-time was asked for."""

    policy: str
    priority: int = 0
    threads: int = 0
    refused: str | None = None

    def __str__(self) -> str:
        if self.policy == "fifo":
            return f"SCHED_FIFO {self.priority} ({self.threads} threads)"
        return "normal" if self.refused is None else f"normal (SCHED_FIFO refused: {self.refused})"


def _thread_ids() -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        return [0]  # no /proc: this thread only


#: How long :func:`request_fifo` waits for a thread that has just started to reach its first wait.
SETTLE_S = 0.5


def _has_waited(tid: int) -> bool:
    """Whether thread ``tid`` has blocked at least once (so it is past its start-up code)."""
    try:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1]) > 0
    except (OSError, ValueError):
        pass
    return True  # gone, or nothing to tell: nothing to wait for


def _wait_until_started(tids: list[int], timeout: float = SETTLE_S) -> None:
    """Wait (up to ``timeout``) until every thread in ``tids`` has blocked once.

    libzmq's I/O threads read their own scheduling as they start (``pthread_getschedparam``:
    glibc asks the kernel for the priority, then for the policy) and write it straight back. A
    thread moved to SCHED_FIFO between those two reads writes back SCHED_FIFO at priority 0,
    which the kernel refuses, and libzmq aborts the process (``Invalid argument
    (src/thread.cpp:315)``: 13 of 30 processes that moved their threads right after creating a
    socket, and 37 aborts in one suite run). A thread that has blocked once is past that.
    """
    deadline = time.monotonic() + timeout
    pending = [t for t in tids if t]
    while pending and time.monotonic() < deadline:
        pending = [t for t in pending if not _has_waited(t)]
        if pending:
            time.sleep(0.001)


def request_fifo(priority: int) -> Scheduling:
    """Move every thread of this process to ``SCHED_FIFO`` at ``priority`` (1-99), new threads
    and children excepted; on refusal change nothing and say why."""
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"SCHED_FIFO priority must be {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority}")
    if not hasattr(os, "sched_setscheduler") or not hasattr(os, "SCHED_FIFO"):
        return Scheduling("normal", refused="not supported on this system")
    policy = os.SCHED_FIFO | getattr(os, "SCHED_RESET_ON_FORK", 0)
    done: list[tuple[int, int, int]] = []  # (thread, its policy and priority before)
    tids = _thread_ids()
    _wait_until_started(tids)
    for tid in tids:
        try:
            before = (tid, os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority)
            os.sched_setscheduler(tid, policy, os.sched_param(priority))
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as exc:
            for moved, was, was_priority in done:  # all or nothing: half a process helps nobody
                try:
                    os.sched_setscheduler(moved, was, os.sched_param(was_priority))
                except OSError:
                    pass
            why = ("not permitted (no CAP_SYS_NICE, and RLIMIT_RTPRIO below the priority)"
                   if exc.errno == errno.EPERM else exc.strerror)
            return Scheduling("normal", refused=why)
        done.append(before)
    return Scheduling("fifo", priority, len(done))


def runs_realtime() -> bool:
    """Whether the calling thread runs under a real-time policy (``SCHED_FIFO`` or ``SCHED_RR``)."""
    try:
        policy = os.sched_getscheduler(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
    except (AttributeError, OSError):
        return False
    return policy in (getattr(os, "SCHED_FIFO", -1), getattr(os, "SCHED_RR", -1))


def freeze_garbage() -> None:
    """Move every object alive now out of the collector's sight (``gc.freeze``): what set-up
    built (modules, the model, buffers) is never traversed again, so a collection in the hot
    loop looks at the few young objects only. No collection first: with torch loaded one takes
    ~110 ms, during which a service that has just bound its sockets would leave its first chunks
    waiting (a cold-start test saw its first two dropped as backlog); freezing takes microseconds,
    and what little garbage it keeps is kept once."""
    gc.freeze()
