"""The monitor's Prometheus ``/metrics``: a private registry whose one collector reads the latest
:class:`~services.monitor.report.Snapshot`.

Rolling figures are gauges with a ``quantile`` label (the maximum as quantile ``"1"``), totals are
counters. End-to-end latency and inference step time are also histograms over the whole time the
monitor has run, in seconds (Prometheus's base unit), with the fixed buckets of
:data:`~.ingest.E2E_BUCKETS_MS` and :data:`~.ingest.INFERENCE_BUCKETS_MS`:
``llvc_e2e_latency_seconds`` and ``llvc_inference_seconds`` (``_bucket{le}``, ``_sum``, ``_count``).
Unlike the rolling quantiles, which cannot be averaged, these aggregate across hosts and over any
range, e.g. ``histogram_quantile(0.99, sum by (le) (rate(llvc_e2e_latency_seconds_bucket[5m])))``.

Per client session (issue 18; :attr:`~.report.Snapshot.sessions`, from
:meth:`~.ingest.Stats.sessions`), with a ``session`` label: ``llvc_session_chunks``,
``llvc_session_underruns``, ``llvc_session_resets``, ``llvc_session_dropped{cause}`` (counters)
and ``llvc_session_e2e_latency_ms{quantile}`` (0.5/0.95/0.99 since the monitor started: there is
no per-session window); and ``llvc_inference_batches{size}``, inference's steps by how many
sessions each converted in one call. The monitor follows at most :data:`~.ingest.MAX_SESSIONS`
names, so the ``session`` label's values are bounded. Inference's per-session counts and its
batch sizes are its own process's, read from its latest heartbeat: they start again from zero
when it restarts or a session is evicted and comes back, which ``rate()`` takes as a counter reset.

A scrape runs in the HTTP server's thread and only takes the snapshot reference the loop thread
last published, so it never waits for the loop, nor the loop for it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from common.telemetry import Counter

from .ingest import BucketCounts, session_dropped
from .report import Snapshot

__all__ = ["MetricsError", "SnapshotCollector", "HISTOGRAM_METRICS", "histogram_family", "session_families",
           "start_metrics", "stop_metrics"]

#: Series (:data:`~.ingest.HISTOGRAMS`) served as histograms: ``series: (metric name, help)``.
HISTOGRAM_METRICS = {
    "e2e_ms": ("llvc_e2e_latency_seconds",
               "End-to-end latency (capture to output), seconds, since the monitor started"),
    "proc_ms": ("llvc_inference_seconds", "Inference time per chunk, seconds, since the monitor started"),
}


class MetricsError(RuntimeError):
    """The /metrics server could not start (one line)."""


def histogram_family(name: str, doc: str, counts: BucketCounts):
    """A ``HistogramMetricFamily`` of ``counts``, converted from ms to seconds: bound ``b`` ms
    becomes ``le="<b/1000>"`` in the form prometheus_client's own histograms write."""
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    buckets = [(floatToGoString(b / 1000), n) for b, n in zip(counts.bounds_ms, counts.cumulative)]
    buckets.append(("+Inf", counts.count))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=counts.sum_ms / 1000)


def session_families(snap: Snapshot) -> Iterator:
    """The per-session metric families and the batch-size counter of ``snap`` (see the module
    docstring); a figure not measured (no chunk, no playback heartbeat) has no sample."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    chunks = CounterMetricFamily("llvc_session_chunks", "Chunks played per client session", labels=["session"])
    underruns = CounterMetricFamily("llvc_session_underruns", "Playback underruns per client session",
                                    labels=["session"])
    resets = CounterMetricFamily("llvc_session_resets", "Inference state resets per client session",
                                 labels=["session"])
    dropped = CounterMetricFamily("llvc_session_dropped", "Dropped audio per client session by cause "
                                  "(its playback's drops and inference's for it)", labels=["session", "cause"])
    e2e = GaugeMetricFamily("llvc_session_e2e_latency_ms", "End-to-end latency (capture to output) per "
                            "client session, ms, since the monitor started", labels=["session", "quantile"])
    for name, s in snap.sessions.items():
        chunks.add_metric([name], s["chunks"])
        if s.get("underruns") is not None:
            underruns.add_metric([name], s["underruns"])
        if (n := (s.get("inference") or {}).get(Counter.RESETS)) is not None:
            resets.add_metric([name], n)
        for cause, n in session_dropped(s).items():
            dropped.add_metric([name, cause], n)
        for key, q in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")):
            if (v := (s.get("e2e_latency_ms") or {}).get(key)) is not None:
                e2e.add_metric([name, q], v)
    yield from (chunks, underruns, resets, dropped, e2e)
    batches = CounterMetricFamily("llvc_inference_batches", "Inference steps by how many client sessions "
                                  "each converted in one call", labels=["size"])
    for size, n in snap.batch_sizes.items():
        batches.add_metric([size], n)
    yield batches


class SnapshotCollector:
    """Prometheus collector of the monitor's figures; ``latest()`` returns the current snapshot."""

    def __init__(self, latest: Callable[[], Snapshot]):
        self.latest = latest

    def collect(self) -> Iterator:
        """The metric families of the latest snapshot (prometheus_client's collector protocol)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.latest()  # once: every family below shows the same moment
        f, model = snap.window, snap.model
        window = f"over the last {snap.window_s:g} s"

        def quantile_gauge(name: str, doc: str, values: dict[str, float | None]) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, f"{doc} {window}", labels=["quantile"])
            for q, v in values.items():
                if v is not None:  # no data: no sample, rather than a made-up number
                    g.add_metric([q], v)
            return g

        e2e, inf, queue = f["e2e_latency_ms"], f["inference_ms"], f["queue"]
        yield quantile_gauge("llvc_e2e_latency_ms", "End-to-end latency (capture to output), ms,",
                             {"0.5": e2e["p50"], "0.95": e2e["p95"], "0.99": e2e["p99"], "1": e2e["max"]})
        yield quantile_gauge("llvc_inference_ms", "Inference time per chunk, ms,",
                             {"0.5": inf["p50"], "0.95": inf["p95"]})
        for series, (name, doc) in HISTOGRAM_METRICS.items():
            yield histogram_family(name, doc, snap.histograms[series])
        yield quantile_gauge("llvc_inference_queue_chunks", "Inference input queue, chunks,",
                             {"0.95": queue["inference_chunks_p95"]})
        yield quantile_gauge("llvc_playback_fill_ms", "Playback buffer fill, ms,",
                             {"0.5": queue["playback_fill_ms_p50"]})
        rtf = GaugeMetricFamily("llvc_inference_rtf", f"Chunk duration / mean inference time {window}")
        if f["rtf"] is not None:
            rtf.add_metric([], f["rtf"])
        yield rtf
        for name, doc in (("chunks", "Chunks played (chunk.playback messages)"),
                          ("underruns", "Playback underruns"), ("resets", "Inference state resets")):
            yield CounterMetricFamily(f"llvc_{name}", doc, value=snap.totals[name])
        for name, doc, label, values in (
                ("dropped", "Dropped audio by cause", "cause", snap.dropped),
                ("rejected", "Rejected input messages by service", "service", snap.rejected),
                ("service_restarts", "Service process restarts", "service", snap.restarts),
                ("device_flags", "Sound device input overflows and output underflows (PortAudio)", "flag",
                 snap.flags)):
            c = CounterMetricFamily(f"llvc_{name}", doc, labels=[label])
            for key, n in values.items():
                c.add_metric([key], n)
            yield c
        yield GaugeMetricFamily("llvc_overloaded", "1 while inference cannot keep up with real time",
                                value=1.0 if snap.overloaded else 0.0)
        up = GaugeMetricFamily("llvc_service_up", "1 while the service's heartbeats arrive", labels=["service"])
        for name, state in snap.states.items():
            up.add_metric([name], 1.0 if state in ("ok", "starting") else 0.0)
        yield up
        if model is not None:
            for key, value in (("algorithmic_latency_ms", model.algorithmic_latency_ms),
                               ("latency_ms", model.latency_ms)):
                if value is not None:
                    yield GaugeMetricFamily(f"llvc_model_{key}", f"Model {key.replace('_', ' ')}", value=value)
            info = GaugeMetricFamily("llvc_model_info", "The model inference runs",
                                     labels=["model", "untrained", "device"])
            info.add_metric([model.model, str(model.untrained).lower(), model.device], 1)
            yield info
        yield from session_families(snap)


def start_metrics(host: str, port: int, latest: Callable[[], Snapshot]):
    """Serve ``/metrics`` on ``host:port`` from a private registry (only the monitor's metrics,
    not the process and GC ones of the global registry); returns ``(server, thread)``.
    Raises :class:`MetricsError` when it cannot listen."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(latest))
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise MetricsError(f"metrics: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def stop_metrics(server_thread) -> None:
    """Stop what :func:`start_metrics` started (waits up to 2 s for its thread)."""
    server, thread = server_thread
    server.shutdown()
    server.server_close()
    thread.join(2)
