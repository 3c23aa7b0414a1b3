"""``llvc bench``: report structure, exactness checks, backend choice and the command.

Speed is benchmarked, never asserted: these tests check what is measured and how it is judged.
"""
from __future__ import annotations

import copy
import json

import pytest

from models import bench
from models.bench import BACKENDS, TOLERANCE, choose_backend, run_bench
from models.llvc import GroupedPointwise
from models.spec import demo_model_line
from models.streaming import StreamingEngine
from services.cli import main

QUICK = dict(chunk_factors=(1,), threads_list=(1,), seconds=1.0, warmup=2)


class _Off(StreamingEngine):
    """A wrong backend: the right output plus an offset above the tolerance."""

    def process(self, chunk):
        return super().process(chunk) + 10 * TOLERANCE


@pytest.fixture(scope="module")
def report():
    return run_bench(("reference", "eager"), **QUICK)


def test_report_structure_and_eager_matches_reference(report):
    assert {"machine", "model", "clip", "settings", "tolerance", "rtf_definition"} <= set(report)
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"]
    assert report["model"]["load_s"] > 0 and report["clip"]["seconds"] == pytest.approx(1.0)
    [s] = report["settings"]
    assert (s["chunk_factor"], s["threads"], s["chunk_len"]) == (1, 1, 208)
    assert list(s["backends"]) == ["reference", "eager"] and s["unavailable"] == {}
    for b in s["backends"].values():
        assert len(b["times_ms"]) == b["chunks"] == s["chunks"]
        assert b["ratio_vs_reference"] > 0 and b["rtf"] > 0 and b["first_chunk_ms"] > 0
        assert b["median_ms"] <= b["p95_ms"] <= b["p99_ms"] <= b["max_ms"]
    assert s["backends"]["reference"]["max_abs_diff"] == 0 and s["backends"]["reference"]["ratio_vs_reference"] == 1
    eager = s["backends"]["eager"]
    assert eager["max_abs_diff"] <= TOLERANCE and eager["valid"]
    assert choose_backend(report) in ("reference", "eager")
    json.dumps(report)  # the report is JSON as it is


def test_reference_math_stays_on_its_own_copy(report):
    from models.checkpoint import load_model

    assert GroupedPointwise.upstream_math is False
    model, info = load_model(None, None, warn=lambda msg: None)
    ref = BACKENDS["reference"](model, info, 1, 1, None)
    flags = [m.upstream_math for m in ref.model.modules() if isinstance(m, GroupedPointwise)]
    assert flags and all(flags)
    assert not any(m.upstream_math for m in model.modules() if isinstance(m, GroupedPointwise))


def test_broken_and_wrong_backends_are_reported_not_fatal(monkeypatch):
    def broken(*a):
        raise RuntimeError("no such runtime\nsecond line")

    monkeypatch.setitem(BACKENDS, "broken", broken)
    monkeypatch.setitem(BACKENDS, "wrong", lambda model, info, cf, th, wd: _Off(copy.deepcopy(model), cf))
    r = run_bench(("eager", "broken", "wrong"), **QUICK)
    [s] = r["settings"]
    assert s["unavailable"] == {"broken": "RuntimeError: no such runtime"}
    wrong = s["backends"]["wrong"]
    assert not wrong["valid"] and wrong["max_abs_diff"] == pytest.approx(10 * TOLERANCE, rel=1e-2)
    assert s["backends"]["eager"]["valid"]
    assert choose_backend(r) != "wrong"


def test_choose_backend_never_picks_an_invalid_backend():
    def b(ratio, valid):
        return {"ratio_vs_reference": ratio, "valid": valid}

    r = {"settings": [
        {"chunk_factor": 1, "threads": 1, "backends": {"reference": b(1, True), "eager": b(1.4, True),
                                                       "fast": b(9, False)}},
        {"chunk_factor": 2, "threads": 1, "backends": {"reference": b(1, True), "eager": b(1.2, True),
                                                       "fast": b(9, True), "slow": b(0.5, True)}},
    ]}
    assert choose_backend(r) == "eager"                   # fast is invalid at cf 1
    assert choose_backend(r, chunk_factor=2) == "fast"
    r["settings"][0]["backends"]["eager"]["valid"] = False
    assert choose_backend(r, chunk_factor=1) == "reference"
    with pytest.raises(ValueError):
        choose_backend(r, threads=4)


def test_command_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--backend", "reference", "eager", "--warmup", "2",
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    header = stdout.splitlines()[0].split()
    assert header[:3] == ["cf", "thr", "backend"] and "median" in header
    assert "fastest valid backend:" in stdout
    data = json.loads(out.read_text())
    assert [s["chunk_factor"] for s in data["settings"]] == [1]
    assert set(data["settings"][0]["backends"]) == {"reference", "eager"}
    assert data["clip"]["seconds"] == pytest.approx(bench.QUICK_SECONDS)
    # No -p/-c: the embedded demo voice, named in one line.
    assert data["model"]["trained"] and demo_model_line("llvc bench", data["model"]["id"]) in captured.err.splitlines()
    assert "UNTRAINED" not in captured.err


def test_unknown_backend_is_one_line_and_exit_2(capsys):
    assert main(["bench", "--quick", "--backend", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown backend 'bogus'" in err[0] and "reference" in err[0]


def test_without_matplotlib_the_plot_is_skipped(report, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert bench.write_plot(report, tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()


def test_plot_is_a_png_with_a_panel_per_setting(report, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    import matplotlib.image

    out = bench.write_plot(report, tmp_path / "p.png")
    assert out == str(tmp_path / "p.png")
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(tmp_path / "p.png").shape[:2]
    assert width >= 300 and height >= 200


def test_cold_start_times_the_service_to_its_first_output():
    from services.lab.coldstart import cold_start

    r = cold_start(chunk_factor=1, threads=1, timeout=60)
    assert "error" not in r, r
    assert r["first_output_s"] > 0 and r["rss_mib"] > 0 and r["output_offset"] == 0
