"""WAV recording of what playback plays: the ``file:`` sink and ``record`` (:class:`WavRecorder`).

``record = "PATH"`` puts the same kind of :class:`WavRecorder` beside any sink: it gets every
16 kHz block right after the sink reads it from the jitter buffer (for a device, before
resampling), so it holds exactly what the sink plays, with the same alignment rules. It may
not name the ``file:`` sink's own file.

Files on a failing disk. The WAV header is rewritten after every write, so the file is a valid
WAV of everything written at any moment. A write that fails (disk full, read-only, I/O error)
is reported once (an error line, ``event.playback {"event": "sink_error", "path", "error",
"samples"}``, counter ``file_errors`` or ``record_errors``), the file is closed with what it
holds and nothing more is written to it; the clock, the telemetry and any other output go on.
A file that cannot be opened at start is a one-line exit 2.

Restarts. Under ``llvc run`` (``LLVC_RUN_DIR`` set) each file keeps a small state file in the
run folder (``playback-file.json``, ``playback-record.json``): its path, the stream it records
and whether it is complete. A playback process restarted by the same supervisor (same parent
process) reopens the file for appending and goes on with that stream, the restart's gap
becoming zeros; a complete file is left as it is. Without ``LLVC_RUN_DIR`` every start writes a
fresh file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import soundfile as sf

from common import telemetry
from common.audio import SAMPLE_RATE
from common.files import write_atomic
from services.jitter import ReadResult

MAX_FILE_GAP_S = 600           # a timeline jump larger than this ends the file instead of padding it
#: libsndfile's sf_command that rewrites the header for the data written so far. soundfile has
#: no public call for it, and its flush() (sf_write_sync) only fsyncs: the header would say
#: 0 frames until close, and only libsndfile's "not closed properly" guess could read the file.
SFC_UPDATE_HEADER_NOW = 0x1060
_sf_command = getattr(getattr(sf, "_snd", None), "sf_command", None)


class SinkError(RuntimeError):
    """A sink or recorder cannot be opened (one line; the service exits 2)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class WavRecorder:
    """The first stream a sink plays, as a 32-bit float WAV aligned to the source.

    ``setting`` names the key it comes from (``playback.sink`` or ``playback.record``) in
    errors; ``prefix`` (``file`` or ``record``) names its heartbeat fields and counter and its
    state file. See the module docstring for failing disks and restarts.
    """

    def __init__(self, path: str, setting: str, prefix: str, log: Callable[..., None],
                 publish: Callable[..., None]):
        self.path = os.path.abspath(path)
        self.setting = setting
        self.prefix = prefix
        self.label = "file sink" if prefix == "file" else f"{prefix} file"  # in log lines
        self.log = log
        self.publish = publish
        self.file: sf.SoundFile | None = None
        self.stream: str | None = None
        self.written = 0
        self.errors = 0
        run_dir = os.environ.get("LLVC_RUN_DIR")
        self.state_path = os.path.join(run_dir, f"playback-{prefix}.json") if run_dir else None

    # ------------------------------------------------------------------ opening
    def _previous(self) -> dict[str, Any]:
        """This file's state from an earlier process under the same supervisor, else ``{}``."""
        if self.state_path is None:
            return {}
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            return {}
        mine = isinstance(state, dict) and state.get("path") == self.path and state.get("parent") == os.getppid()
        return state if mine else {}

    def _resumable(self) -> bool:
        try:
            info = sf.info(self.path)
        except (RuntimeError, OSError):
            return False
        return (info.format, info.subtype, info.channels, info.samplerate) == ("WAV", "FLOAT", 1, SAMPLE_RATE)

    def open(self) -> None:
        """Open the file; raise :class:`SinkError` if it cannot be written.

        After a restart within the same run the file is reopened for appending (or left alone
        if it was complete); otherwise it starts empty.
        """
        state = self._previous()
        if state.get("done"):
            self.log("info", f"{self.setting}: the file was finished before this restart; left as it is",
                     path=self.path, stream_id=state.get("stream_id"))
            return
        resume = bool(state) and self._resumable()
        if state and not resume:
            self.log("warning", f"{self.setting}: the file from before this restart is not a readable "
                     "float WAV; starting it afresh", path=self.path)
        try:
            if resume:
                self.file = sf.SoundFile(os.open(self.path, os.O_RDWR), "r+", closefd=True)
                self.written = self.file.seek(0, sf.SEEK_END)
            else:
                # Opened here, not by libsndfile, so a failure says why ("Read-only file system").
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self.file = sf.SoundFile(fd, "w", samplerate=SAMPLE_RATE, channels=1, subtype="FLOAT",
                                         format="WAV", closefd=True)
        except OSError as exc:
            raise SinkError(f"{self.setting}: cannot write {self.path}: {exc.strerror or exc}") from None
        except (RuntimeError, ValueError) as exc:
            raise SinkError(f"{self.setting}: cannot write {self.path} ({_one_line(exc)})") from None
        if resume:
            self.stream = state.get("stream_id")
            self.log("info", f"{self.setting}: resuming the file after a restart", path=self.path,
                     stream_id=self.stream, samples=self.written)
        self._save_state()

    def _save_state(self, done: bool = False) -> None:
        """Write the state file (atomically); a failure is reported once and stops it."""
        if self.state_path is None:
            return
        state = {"path": self.path, "parent": os.getppid(), "stream_id": self.stream, "done": done}
        try:
            write_atomic(self.state_path, json.dumps(state))
        except OSError as exc:
            self.log("warning", f"{self.setting}: cannot keep the restart state; a restart will start "
                     "the file afresh", state=self.state_path, error=exc.strerror or str(exc))
            self.state_path = None

    # ------------------------------------------------------------------ writing
    def consume(self, res: ReadResult, block: np.ndarray) -> None:
        """Record the stream's part of a block just read from the jitter buffer."""
        if self.file is None:
            return
        try:
            self._consume(res, block)
        except (RuntimeError, OSError, AssertionError) as exc:  # disk full, read-only, I/O error
            self._fail(exc)

    def _consume(self, res: ReadResult, block: np.ndarray) -> None:
        if res.stream_samples:
            if self.stream is None:
                self.stream = res.stream_id
                self._save_state()
            elif res.stream_id != self.stream:
                return self.finish("another stream started before the first one drained")
            # The stream as converted: an adaptive shrink changed what was heard, not the stream,
            # so what it skipped and the samples under its crossfade are written as they were.
            samples = block[res.stream_index:res.stream_index + res.stream_samples]
            start = res.stream_offset
            if res.unfaded is not None:
                samples = np.concatenate([res.unfaded, samples[len(res.unfaded):]])
            if res.skipped is not None:
                samples = np.concatenate([res.skipped, samples])
                start -= len(res.skipped)
            gap = start - self.written  # overflow skips, silence before the first chunk, a restart
            if gap > MAX_FILE_GAP_S * SAMPLE_RATE:
                return self.finish(f"the stream's timeline jumped {gap} samples ahead")
            self._pad(gap)
            self._write(samples[max(0, -gap):])  # before the file's end: already in it
        if res.drained and res.drained[0] == self.stream:
            self._pad(res.drained[1] - self.written)
            self.finish("stream drained")

    def _pad(self, n: int) -> None:
        for a in range(0, n, SAMPLE_RATE):
            self._write(np.zeros(min(SAMPLE_RATE, n - a), np.float32))

    def _write(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        self.file.write(samples)
        self.written += len(samples)
        # The header after every write (a few µs): a killed process, a full disk or a disk gone
        # read-only then leaves a WAV that says exactly what it holds. No fsync: a kill does not
        # lose the page cache, and an fsync can stall this loop for long on slow storage.
        if _sf_command is not None:
            _sf_command(self.file._file, SFC_UPDATE_HEADER_NOW, sf._ffi.NULL, 0)
        elif self.written % SAMPLE_RATE < len(samples):  # a soundfile without it: fsync once a second
            self.file.flush()

    def _fail(self, exc: Exception) -> None:
        """A write failed: keep what the file holds, report once, write no more."""
        error = self._error_text(exc)
        self.errors += 1
        self._close_file()
        try:
            # What the header counts: part of the failed block on a full disk; on a disk that went
            # read-only under a write, possibly one block less than was written.
            self.written = sf.info(self.path).frames
        except (RuntimeError, OSError):
            pass
        self._save_state(done=True)
        self.log("error", f"{self.setting}: writing the file failed; it keeps what it holds and gets "
                 "nothing more (playback goes on)", path=self.path, error=error, samples=self.written)
        self.publish(telemetry.SinkError(self.path, error, self.written))

    def _error_text(self, exc: Exception) -> str:
        """libsndfile's own message names the system error ("No space left on device")."""
        try:
            text = sf._ffi.string(sf._snd.sf_strerror(self.file._file)).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - soundfile internals: fall back to the exception's text
            text = ""
        text = text.removeprefix("System error : ").rstrip(".")
        return _one_line(text or str(exc) or type(exc).__name__)

    def _close_file(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            try:
                file.close()  # the header again; on a read-only disk it keeps the last one written
            except (RuntimeError, OSError):
                pass

    def finish(self, why: str, done: bool = True) -> None:
        """Close the file and write nothing more; ``done``: a restart leaves it as it is."""
        if self.file is not None:
            self._close_file()
            if done:
                self._save_state(done=True)
            self.log("info", f"{self.label} closed: {why}", path=self.path, stream_id=self.stream,
                     samples=self.written)

    def close(self) -> None:
        """Close on shutdown (idempotent): a restart under the same supervisor goes on with it."""
        self.finish("shutdown", done=False)

    def describe(self) -> dict[str, Any]:
        return {self.prefix: self.path}

    def counters(self) -> dict[str, int]:
        return {f"{self.prefix}_errors": self.errors}

    def status(self) -> dict[str, Any]:
        return {f"{self.prefix}_samples": self.written, f"{self.prefix}_open": self.file is not None}


def make_recorders(settings, log: Callable[..., None], publish: Callable[..., None]) -> list[WavRecorder]:
    """The WAV recorders ``settings`` ask for: the ``file:`` sink's and ``record``'s."""
    out = []
    if settings.sink.startswith("file:"):
        out.append(WavRecorder(settings.sink.partition(":")[2], "playback.sink", "file", log, publish))
    if settings.record:
        out.append(WavRecorder(settings.record, "playback.record", "record", log, publish))
    return out
