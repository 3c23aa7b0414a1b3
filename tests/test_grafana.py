"""The monitor's Prometheus histograms over real HTTP, and the Grafana dashboard against what the
exporter really serves (config/grafana-llvc.json).

A real monitor :class:`~services.monitor.ingest.Stats` is fed typed records, a real snapshot is
taken, and the real ``/metrics`` server (:func:`~services.monitor.metrics.start_metrics`) is
scraped and parsed with prometheus_client's own parser.
"""
from __future__ import annotations

import json
import math
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.telemetry import Heartbeat, InferenceChunk, InferenceStatus, Origin, PlaybackChunk
from services.lab.endpoints import free_port
from services.monitor.health import DeviceFlags, Liveness, Overload
from services.monitor.ingest import E2E_BUCKETS_MS, INFERENCE_BUCKETS_MS, Buckets, Stats
from services.monitor.metrics import start_metrics, stop_metrics
from services.monitor.report import take_snapshot

DASHBOARD = Path(__file__).resolve().parent.parent / "config" / "grafana-llvc.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
NOW = 100.0

#: End-to-end latencies fed (ms): below the first bound, exactly at bounds (5, 22 and 1000 ms,
#: to show ``le`` is inclusive), a hair either side of 22 ms, and beyond the last bound.
E2E_MS = [4.0, 5.0, 5.001, 21.999, 22.0, 22.0, 22.001, 24.1, 30.0, 999.0, 1000.0, 1500.0]
#: Inference step times fed (ms): the same around 0.1 ms (not exact in binary: the edge must hold
#: all the same), 13 ms (the chunk duration at chunk factor 1) and past 100 ms.
PROC_MS = [0.05, 0.1, 0.1000001, 2.2, 12.999, 13.0, 13.0001, 100.0, 150.0]


def origin(service: str, pid: int) -> Origin:
    return Origin(service, "host-a", pid, 0, 0)


def feed_monitor() -> tuple[Stats, object]:
    """A Stats fed every kind of record the exporter turns into a series, and its snapshot."""
    stats = Stats(window_s=10.0)
    liveness, overload, flags = Liveness(3, 1.0), Overload(), DeviceFlags()
    status = InferenceStatus("onnx", "llvc-test", True, "llvc", "cpu", 1, "s", chunk_len=208, chunk_ms=13.0,
                             algorithmic_latency_ms=14.0, latency_ms=14.0)
    records = [
        Heartbeat(True, 5.0, {"input_overflows": 1}, origin=origin("capture", 10)),
        Heartbeat(True, 5.0, {"resets": 1, "rejected": 2}, status=status, origin=origin("inference", 11)),
        Heartbeat(True, 5.0, {"underruns": 2, "dropped_late": 3, "device_underflows": 1},
                  origin=origin("playback", 12)),
        # A second inference process: a restart the exporter counts.
        Heartbeat(True, 0.5, {"resets": 0}, status=status, origin=origin("inference", 13)),
    ]
    records += [PlaybackChunk(stream_id="s", seq=i, offset=16 + 208 * i, e2e_ms=ms, fill_ms=4.0,
                              origin=origin("playback", 12)) for i, ms in enumerate(E2E_MS)]
    records += [InferenceChunk(stream_id="s", seq=i, offset=16 + 208 * i, proc_ms=ms, rtf=13.0 / ms,
                               queue_chunks=0.0, reset=False, origin=origin("inference", 13))
                for i, ms in enumerate(PROC_MS)]
    for record in records:
        stats.add(record, NOW)
        overload.add(record)
        liveness.add(record, NOW)
    flags.check(stats.ledger)
    snap = take_snapshot(NOW, stats, liveness, overload, flags, own=("monitor", 0), default_kind="llvc",
                         status="", t0=0.0, started_wall="2025-01-01T00:00:00Z")
    return stats, snap


@pytest.fixture(scope="module")
def scraped():
    """The exposition the real /metrics server serves for :func:`feed_monitor`'s snapshot, parsed:
    ``{family name: family}``."""
    stats, snap = feed_monitor()
    # Records that arrive after the snapshot must not show: /metrics reads the snapshot's copies,
    # never the loop thread's live counts.
    stats.add(PlaybackChunk(stream_id="s", seq=99, offset=0, e2e_ms=22.0, fill_ms=4.0,
                            origin=origin("playback", 12)), NOW)
    stats.add(InferenceChunk(stream_id="s", seq=99, offset=0, proc_ms=0.1, rtf=1.0, queue_chunks=0.0,
                             reset=False, origin=origin("inference", 13)), NOW)
    port = free_port()
    server = start_metrics("127.0.0.1", port, lambda: snap)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        stop_metrics(server)
    return {fam.name: fam for fam in text_string_to_metric_families(text)}


def histogram(families, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """``([(le, cumulative count) ...], count, sum)`` of histogram ``name``, in exposition order."""
    fam = families[name]
    assert fam.type == "histogram"
    buckets = [(float(s.labels["le"]), s.value) for s in fam.samples if s.name == f"{name}_bucket"]
    (count,) = [s.value for s in fam.samples if s.name == f"{name}_count"]
    (total,) = [s.value for s in fam.samples if s.name == f"{name}_sum"]
    return buckets, count, total


@pytest.mark.parametrize("name, bounds_ms, values_ms", [
    ("llvc_e2e_latency_seconds", E2E_BUCKETS_MS, E2E_MS),
    ("llvc_inference_seconds", INFERENCE_BUCKETS_MS, PROC_MS),
])
def test_histogram_counts_every_record_in_inclusive_buckets(scraped, name, bounds_ms, values_ms):
    buckets, count, total = histogram(scraped, name)
    assert count == len(values_ms)
    assert total == pytest.approx(sum(values_ms) / 1000, rel=1e-9)
    # The bounds, in seconds and in order, then +Inf holding every value.
    assert [le for le, _ in buckets] == [b / 1000 for b in bounds_ms] + [math.inf]
    assert buckets[-1][1] == count
    counts = [n for _, n in buckets]
    assert counts == sorted(counts)  # cumulative
    # Each bucket counts the values at or below its bound, compared in ms as they were measured.
    assert counts[:-1] == [sum(v <= b for v in values_ms) for b in bounds_ms]


def test_histogram_edges_by_hand(scraped):
    e2e = dict(histogram(scraped, "llvc_e2e_latency_seconds")[0])
    assert e2e[0.005] == 2           # 4.0 and 5.0: a value at the bound is in its bucket
    assert e2e[0.0075] == 3          # and 5.001 only in the next
    assert e2e[0.021] == 3           # 21.999 is above 21 ms
    assert e2e[0.022] == 6           # 21.999 and both 22.0
    assert e2e[0.023] == 7           # 22.001
    assert e2e[1.0] == 11            # 1000.0 at the last bound; 1500.0 only in +Inf
    assert e2e[math.inf] == 12
    inf = dict(histogram(scraped, "llvc_inference_seconds")[0])
    assert inf[0.0001] == 2          # 0.05 and 0.1 (0.1 ms is not exact in binary; still at its edge)
    assert inf[0.0002] == 3          # 0.1000001
    assert inf[0.013] == 6           # 12.999 and 13.0 at the chunk duration
    assert inf[0.02] == 7            # 13.0001
    assert inf[0.1] == 8 and inf[math.inf] == 9


def test_existing_series_still_served(scraped):
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in scraped.values() for s in fam.samples}
    assert scraped["llvc_e2e_latency_ms"].type == "gauge"
    assert samples[("llvc_e2e_latency_ms", (("quantile", "1"),))] == 1500.0
    assert samples[("llvc_e2e_latency_ms", (("quantile", "0.5"),))] == pytest.approx(float(np.median(E2E_MS)))
    assert {q for (n, labels) in samples if n == "llvc_e2e_latency_ms" for _, q in labels} == {"0.5", "0.95",
                                                                                              "0.99", "1"}
    assert {q for (n, labels) in samples if n == "llvc_inference_ms" for _, q in labels} == {"0.5", "0.95"}
    assert samples[("llvc_chunks_total", ())] == len(E2E_MS)
    assert samples[("llvc_underruns_total", ())] == 2
    assert samples[("llvc_dropped_total", (("cause", "late"),))] == 3
    assert samples[("llvc_rejected_total", (("service", "inference"),))] == 2
    assert samples[("llvc_service_restarts_total", (("service", "inference"),))] == 1
    assert samples[("llvc_device_flags_total", (("flag", "input_overflow"),))] == 1
    assert samples[("llvc_service_up", (("service", "playback"),))] == 1
    assert samples[("llvc_model_info", (("device", "cpu"), ("model", "llvc-test"), ("untrained", "true")))] == 1
    assert ("llvc_inference_rtf", ()) in samples and ("llvc_overloaded", ()) in samples
    for name in ("llvc_inference_queue_chunks", "llvc_playback_fill_ms", "llvc_model_latency_ms",
                 "llvc_model_algorithmic_latency_ms", "llvc_resets_total"):
        assert any(n == name for n, _ in samples), name


def test_buckets_skip_non_finite_and_count_negative_as_zero():
    b = Buckets((1, 2))
    for v in (math.nan, math.inf, -3.0, 1.0, 1.5, 9.0):
        b.add(v)
    counts = b.snapshot()
    assert (counts.cumulative, counts.count, counts.sum_ms) == ((2, 3), 4, 11.5)  # -3 counts as 0
    with pytest.raises(ValueError):
        Buckets((2, 1))


# ------------------------------------------------------------------------------ the dashboard
def walk_panels(panels: list[dict]):
    """Every panel, the ones inside (collapsed) rows included."""
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression: panel targets and query variables."""
    out = [t["expr"] for p in walk_panels(dashboard["panels"]) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out += [query["query"] if isinstance(query, dict) else query, var.get("definition", "")]
    return [e for e in out if e]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def served_names(families) -> set[str]:
    """The series names a scrape holds: a histogram's _bucket/_sum/_count, a counter's _total."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}
    return {fam.name + sfx for fam in families.values() for sfx in suffixes.get(fam.type, ("",))}


def test_dashboard_queries_only_served_metrics(scraped, dashboard):
    exprs = expressions(dashboard)
    used = {m for e in exprs for m in re.findall(r"\bllvc_[A-Za-z0-9_]+", e)}
    served = served_names(scraped)
    assert used - served == set()
    # With every kind of record fed, each one also has samples: no panel stays empty for want of a series.
    sampled = {s.name for fam in scraped.values() for s in fam.samples}
    assert used - sampled == set()
    assert {"llvc_e2e_latency_seconds_bucket", "llvc_inference_seconds_bucket", "llvc_e2e_latency_ms",
            "llvc_inference_ms", "llvc_inference_rtf", "llvc_underruns_total", "llvc_dropped_total",
            "llvc_resets_total", "llvc_rejected_total", "llvc_device_flags_total", "llvc_service_up",
            "llvc_overloaded", "llvc_model_info", "llvc_service_restarts_total"} <= used
    for e in exprs:
        assert all(e.count(a) == e.count(b) for a, b in ("()", "{}", "[]")), e
        if "histogram_quantile" in e:
            assert "by (le)" in e and "_bucket" in e, e  # summed over hosts, le kept


def test_dashboard_datasource_is_a_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE
    for panel in walk_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
    # Importable as is: no export-time inputs to fill in.
    assert "__inputs" not in dashboard and "${DS_" not in DASHBOARD.read_text()


def test_dashboard_has_what_grafana_imports(dashboard):
    assert dashboard["title"] == "llvc pipeline"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(walk_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids))
    boxes = []
    for p in panels:
        assert p["type"] in ("row", "timeseries", "stat") and p["title"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["x"] + g["w"] <= 24 and g["h"] > 0
        boxes.append((p["title"], g))
        if p["type"] == "row":
            assert "panels" in p and (p["collapsed"] or not p["panels"])  # an open row holds none
            continue
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(t["expr"] for t in p["targets"])
    # No two panels overlap (rows' panels sit below their row when it opens).
    for i, (a, ga) in enumerate(boxes):
        for b, gb in boxes[i + 1:]:
            apart = (ga["x"] + ga["w"] <= gb["x"] or gb["x"] + gb["w"] <= ga["x"]
                     or ga["y"] + ga["h"] <= gb["y"] or gb["y"] + gb["h"] <= ga["y"])
            assert apart, (a, b)
