"""The pipeline's processes: capture → inference → playback, plus monitor; ``llvc run``.

How a stream flows (the contract between the services)
=======================================================

What each service publishes on its telemetry PUB is :mod:`common.telemetry`'s records (typed,
versioned, one decode path); the names below are theirs.

Timeline. Every audio chunk carries ``offset``: the stream sample index of its first sample.
Output sample ``i`` of the pipeline is the conversion of source sample ``i`` (the same offset),
so playback can place converted audio on the source's timeline and a file sink is aligned to
the source.

capture (``services/capture.py``)
  * A new ``stream_id`` (uuid4 hex) every time a source starts; ``seq`` counts messages from 0.
  * The **first message of a stream is the head**: ``head_len`` (= L = 16) samples at offset 0.
    Every later message is exactly ``chunk_len`` samples at offsets ``head_len + k*chunk_len``.
    Why: the model needs L samples of lookahead (see ``models/streaming.py``). With the chunk
    grid shifted by L, inference can convert chunk k the moment it arrives, and each sample
    waits chunk + L (14 ms at chunk factor 1) instead of two chunks (26 ms).
  * ``t_capture_ns`` is the ``CLOCK_MONOTONIC`` time of the chunk's first sample (device:
    PortAudio's ADC time mapped to monotonic; file/test sources: the paced schedule
    ``t0 + offset / sr``).
  * A file source that ends sets ``source_end`` (total source samples) on its last chunk, pads
    that chunk with zeros, then sends 2 more chunks of zeros (so the last samples get their
    lookahead) carrying ``source_end`` too, publishes ``event.capture``
    (:class:`~common.telemetry.Eof`: ``stream_id``, ``source_end``) and then sends nothing (it
    does not exit: supervisord would restart it). With ``loop = true`` the file starts over
    inside the same stream instead.
  * A failed send (no peer, queue full) is a drop: counter ``dropped_capture_send``; ``seq`` and
    ``offset`` advance anyway, so downstream sees the gap.

inference (``services/inference.py``)
  * Sessions (``services/sessions.py``): every chunk names its client session (``session``,
    protocol 1.1; absent: the unnamed one). Up to ``max_streams`` sessions are converted at
    once, each with its own state, stream rules and listeners; one more is refused (event
    ``session``, action ``refused``, counter ``dropped_refused_session``), one silent for
    ``idle_s`` is evicted. Every rule below applies within a session. Output goes on the
    ``audio_out`` ROUTER to the playbacks that asked for the session (``listen``); with CURVE a
    session is bound to the key that opened it (``dropped_foreign_session``).
  * One engine state per stream id; a new stream id resets it (event ``reset``, reason
    ``new_stream``). A message at offset 0 primes the engine with its first ``head_len``
    samples (the stream's true head).
  * Which stream is current: a never-seen stream id takes over only if there is no current
    stream, or its chunk is at offset 0 (a stream start: capture's head), or the current stream
    has sent nothing for max(4 chunks, 250 ms) (a restarted capture whose head was lost);
    otherwise its chunks are dropped (``dropped_unknown_stream``), so a stranger's flood of
    valid chunks mid-stream cannot hijack or disturb the real stream. Chunks of a stream that
    was current before are dropped (``dropped_stale_stream``). Nothing but CURVE (see
    ``common/security.py``) stops a sender that starts a stream at offset 0: that is exactly
    what a capture restart looks like.
  * Re-frames whatever arrives into ``chunk_len`` steps; output chunk ``j`` of a segment covers
    source samples ``[origin + j*chunk_len, ... + chunk_len)`` and is sent with that ``offset``,
    the interpolated ``t_capture_ns``/``t_wall_ns`` of that source sample, ``source_end`` copied
    from the input, and a ``StageRecord("inference", ...)`` appended.
  * Sequence gap (offset jumps ahead): up to ``max_gap_ms`` is zero-filled (the timeline and
    the decoder's window grid stay intact, the state stays warm, and a short burst of silence
    is the honest stand-in for lost audio); a longer gap (or a stream that fell behind and had
    its backlog dropped) resets the state (reason ``gap``/``backlog``) and starts a new segment
    whose head is silence: origin = offset - head_len, so output stays on the chunk grid and
    is produced as soon as each chunk arrives. Zero-filling a long gap would cost compute for
    audio nobody hears and add latency right when the pipeline is recovering.
  * Backlog above ``max_backlog_ms`` → drop the oldest input, counter
    ``dropped_inference_backlog`` (in chunks), reset. Non-finite output → reset (``non_finite``).
  * Publishes ``chunk.inference`` (:class:`~common.telemetry.InferenceChunk`: ``stream_id``,
    ``seq``, ``offset``, ``proc_ms``, ``rtf``, ``queue_chunks``, ``reset``) per output chunk; its
    heartbeat status (:class:`~common.telemetry.InferenceStatus`) carries ``model``,
    ``untrained``, ``chunk_len``, ``algorithmic_latency_ms``, ``latency_ms``, ``device``.

playback (``services/playback.py``)
  * Jitter buffer keyed by offset; fixed playout timeline per stream: the first chunk of a
    stream plays ``target_ms`` after it arrives; from then on the read position advances with
    the sink's clock. Missing audio at the read position → silence (underrun, counted, short
    fade); a chunk whose samples' play slot has passed → dropped (``dropped_late``, the late
    part only); overflow → drop oldest so that the newest chunk plus ``target_ms`` remain
    (``dropped_overflow``). Overflow is a fill above ``max_ms``, or slack beyond chunk +
    ``target_ms`` that the last 16 arrivals all had, above max(``target_ms``, 3 ms): then the
    timeline sits later than the arrivals need (a slow first chunk set it) and latency would
    otherwise stay high for the whole run; the timeline moves earlier by that slack. The
    opposite: when at least 12 of the last 16 arrivals were late, spread over 80 ms or more
    (inference overloaded, a congested link), the timeline moves later by their median
    lateness plus ``target_ms`` (silence inserted, ``timeline_grows``), within ``max_ms``; once
    arrivals are early again the growth is given back, down to 1 ms. Within a stream's first 8
    chunks, a chunk later than ``max_ms`` (a device that drained a deep buffer as it started
    ran the output far ahead) restarts the playout at that chunk (``timeline_restarts``)
    instead of every later chunk being dropped. For a device sink
    ``target_ms`` counts from when audio leaves the buffer; the device's own output latency
    comes on top (e2e includes it).
  * e2e latency of a chunk = time its first sample reaches the output − its ``t_capture_ns``
    (same host clock; on different hosts this is meaningless, so the monitor must run the
    latency figures from playback on the capture host). Published as
    ``chunk.playback`` (:class:`~common.telemetry.PlaybackChunk`: ``stream_id``, ``seq``,
    ``offset``, ``e2e_ms``, ``fill_ms``), and each chunk's header as received
    (``audio.playback``, :class:`~common.telemetry.AudioHeader`: every stage record).
  * When the read position passes a stream's ``source_end``: ``event.playback {"event":
    "drained", "stream_id", "source_end"}``; a file sink then has exactly ``source_end``
    samples for that stream.

monitor (``services/monitor/``)
  * Subscribes to all telemetry; status line every few seconds (also published as
    ``event.monitor {"event": "status", "line"}``); Prometheus ``/metrics``; a JSON report on
    shutdown.
"""
