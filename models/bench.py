"""``llvc bench``: how fast is the streaming step, per backend, chunk factor and thread count.

For every setting (chunk factor x threads) each backend's engine is built, warmed up, and then
a real clip is streamed through all of them **interleaved** in blocks of about
:data:`BLOCK_S` seconds of audio: every backend converts block ``b`` (in an order rotated by one
each block) before any backend sees block ``b + 1``. Each ``process()`` call is timed with
``perf_counter_ns``. The machine's speed drifts by 30-40% between runs minutes apart, so only
numbers measured side by side like this are compared: the ratio against the ``reference``
backend is taken within one setting of one run. Blocks rather than single chunks, and the first
chunk of each block untimed, because a service runs one backend alone: switching backends every
chunk made each one start from caches the others had just filled with their own weights
(measurements in docs/performance.md).

``reference`` is the plain eager module code with upstream's math
(``GroupedPointwise.upstream_math`` set on its own copy of the model); ``eager`` is
:class:`~models.streaming.StreamingEngine` as services run it (:class:`~models.fast_step.FastStep`
in PyTorch); ``onnx`` (the same FastStep exported, on ONNX Runtime) is used when
:mod:`models.export` and :mod:`models.onnx_engine` import and export. A backend whose whole-clip
output differs from reference's by more than :data:`TOLERANCE` is invalid and
:func:`choose_backend` never picks it.

RTF here is ``chunk duration / median processing time`` (above 1: faster than real time);
``rtf_mean`` (upstream ``infer.py``'s definition, chunk duration / mean) is in the JSON too.
Speed is measured, never asserted.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.config import CHECKPOINT_DEFAULT_HELP, CONFIG_DEFAULT_HELP
from models.geometry import check_chunk_factor
from models.spec import demo_model_line

from .benchkit import BLOCK_S, DEFAULT_CLIP, TOLERANCE, load_clip, machine_info

DEFAULT_CHUNK_FACTORS = (1, 2, 4, 8)
DEFAULT_THREADS = (1, 2)
QUICK_SECONDS = 3.0
RTF_DEFINITION = "chunk duration / median processing time per chunk (>1: faster than real time)"


# --------------------------------------------------------------------------- backends
def _reference(model, info, chunk_factor, threads, workdir):
    """Eager streaming of the module code on a private copy of the model with upstream's
    grouped-conv math: upstream's model as written, streamed exactly."""
    from models.llvc import GroupedPointwise
    from models.streaming import StreamingEngine

    ref = copy.deepcopy(model)
    for mod in ref.modules():
        if isinstance(mod, GroupedPointwise):
            mod.upstream_math = True  # instance attribute: the shared class default is untouched
    return StreamingEngine(ref, chunk_factor, restructured=False)


def _eager(model, info, chunk_factor, threads, workdir):
    """Our StreamingEngine as services run it (FastStep's restructured math in PyTorch)."""
    from models.streaming import StreamingEngine

    return StreamingEngine(model, chunk_factor)


def _onnx(model, info, chunk_factor, threads, workdir):
    """ONNX Runtime on a model exported for this chunk factor."""
    from models.export import export_onnx
    from models.onnx_engine import OnnxEngine

    path = Path(workdir) / f"llvc-cf{chunk_factor}.onnx"
    if not path.exists():  # one export per chunk factor, shared by the thread settings
        path = export_onnx(model, info, chunk_factor, path)
    return OnnxEngine.load(path, threads=threads)


#: name -> factory(model, info, chunk_factor, threads, workdir) -> engine (prime/process/reset,
#: chunk_len, head_len). ``reference`` must stay: every ratio and diff is taken against it.
BACKENDS: dict[str, Callable] = {"reference": _reference, "eager": _eager, "onnx": _onnx}
REFERENCE = "reference"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- the benchmark
def _stats(times_ns: list[int], chunk_s: float) -> dict:
    t = np.asarray(times_ns, dtype=np.float64) / 1e6
    med, mean = float(np.median(t)), float(t.mean())
    return {"median_ms": med, "p95_ms": float(np.percentile(t, 95)), "p99_ms": float(np.percentile(t, 99)),
            "mean_ms": mean, "max_ms": float(t.max()), "chunks": len(t),
            "rtf": 1000 * chunk_s / med, "rtf_mean": 1000 * chunk_s / mean}


def _bench_setting(model, info, names, chunk_factor, threads, x, warmup, repeats, workdir) -> dict:
    """One (chunk factor, threads) setting: build every engine, warm up, stream interleaved."""
    import torch

    torch.set_num_threads(threads)
    engines, build_ms, unavailable = {}, {}, {}
    for name in names:
        t0 = time.perf_counter_ns()
        try:
            engines[name] = BACKENDS[name](model, info, chunk_factor, threads, workdir)
        except Exception as exc:  # a backend that cannot be built is reported, not fatal
            if name == REFERENCE:
                raise
            unavailable[name] = _one_line(exc)
            continue
        build_ms[name] = (time.perf_counter_ns() - t0) / 1e6
    order = list(engines)
    geometry = engines[REFERENCE].geometry
    C, H, chunk_s = geometry.chunk_len, geometry.head_len, geometry.chunk_s

    # Warm-up on low noise: the first call is timed on its own (first-chunk time).
    noise = (np.random.default_rng(0).standard_normal(C) * 0.01).astype(np.float32)
    first_ms = {}
    for name in order:
        engines[name].reset()
        engines[name].prime(None)
    for k in range(max(1, warmup)):
        for name in order:
            t0 = time.perf_counter_ns()
            engines[name].process(noise)
            if k == 0:
                first_ms[name] = (time.perf_counter_ns() - t0) / 1e6

    # The clip, laid out as StreamingEngine.convert does: head via prime(), then whole chunks.
    body = x[H:]
    n_chunks = max(1, -(-len(body) // C))
    padded = np.zeros(n_chunks * C, np.float32)
    padded[: len(body)] = body
    head = x[:H] if len(x) >= H else np.pad(x, (0, H - len(x)))
    chunks = [padded[k * C:(k + 1) * C] for k in range(n_chunks)]
    times = {name: [] for name in order}
    outputs = {name: np.empty(n_chunks * C, np.float32) for name in order}
    for rep in range(repeats):
        for name in order:
            engines[name].reset()
            engines[name].prime(head)
        block = max(2, round(BLOCK_S / chunk_s))
        for b, start in enumerate(range(0, n_chunks, block)):
            r = (b + rep) % len(order)
            for name in order[r:] + order[:r]:
                for k in range(start, min(start + block, n_chunks)):
                    t0 = time.perf_counter_ns()
                    y = engines[name].process(chunks[k])
                    if k != start or n_chunks <= block:  # the first after a switch starts cold
                        times[name].append(time.perf_counter_ns() - t0)
                    if rep == 0:
                        outputs[name][k * C:(k + 1) * C] = y

    ref_stats = _stats(times[REFERENCE], chunk_s)
    backends = {}
    for name in order:
        s = _stats(times[name], chunk_s)
        diff = float(np.max(np.abs(outputs[name] - outputs[REFERENCE])))
        s.update(ratio_vs_reference=ref_stats["median_ms"] / s["median_ms"], max_abs_diff=diff,
                 valid=bool(math.isfinite(diff) and diff <= TOLERANCE and np.isfinite(outputs[name]).all()),
                 first_chunk_ms=first_ms[name], build_ms=build_ms[name],
                 times_ms=[round(v / 1e6, 4) for v in times[name]])
        backends[name] = s
    return {"chunk_factor": chunk_factor, "threads": threads, "chunk_len": C, "chunk_ms": 1000 * chunk_s,
            "chunks": n_chunks, "backends": backends, "unavailable": unavailable}


def run_bench(backends=("reference", "eager", "onnx"), chunk_factors=DEFAULT_CHUNK_FACTORS,
              threads_list=DEFAULT_THREADS, clip=DEFAULT_CLIP, warmup: int = 20, repeats: int = 1,
              checkpoint=None, config=None, seconds: float | None = None, log=None) -> dict:
    """Benchmark ``backends`` on every (chunk factor, threads) setting; returns the report dict.

    ``reference`` is always run (first) even if not named. ``clip`` is a path or a 1-D array;
    ``seconds`` keeps only its beginning. ``warmup`` chunks per engine are run before the
    measured pass(es) and excluded; ``repeats`` whole-clip passes are pooled. ``log(str)``
    gets progress lines. Raises ``ValueError`` for an unknown backend name.
    """
    import torch

    from models.checkpoint import load_model

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend {unknown[0]!r} (known: {', '.join(BACKENDS)})")
    names = [REFERENCE] + [b for b in dict.fromkeys(backends) if b != REFERENCE]
    if warmup < 0 or repeats < 1:
        raise ValueError("warmup must be >= 0 and repeats >= 1")
    log = log or (lambda msg: None)
    warnings: list[str] = []
    threads_before = torch.get_num_threads()
    t0 = time.perf_counter()
    model, info = load_model(checkpoint, config, warn=warnings.append)
    load_s = time.perf_counter() - t0
    x, clip_name = load_clip(clip, model.cfg.sample_rate, seconds)
    report = {"machine": machine_info(),
              "model": {"id": info.model_id, "trained": info.trained, "demo": info.demo, "load_s": load_s},
              "clip": {"path": clip_name, "samples": len(x), "seconds": len(x) / model.cfg.sample_rate},
              "backends": names, "warmup": warmup, "repeats": repeats, "tolerance": TOLERANCE,
              "rtf_definition": RTF_DEFINITION, "settings": []}
    try:
        with tempfile.TemporaryDirectory(prefix="llvc-bench-") as workdir:
            for cf in chunk_factors:
                for th in threads_list:
                    log(f"chunk factor {cf}, {th} thread(s): {', '.join(names)}")
                    report["settings"].append(
                        _bench_setting(model, info, names, cf, th, x, warmup, repeats, workdir))
    finally:
        torch.set_num_threads(threads_before)
    return report


def choose_backend(results: dict, chunk_factor: int | None = None, threads: int | None = None) -> str:
    """The fastest valid backend (highest geometric-mean speed ratio vs reference).

    Only settings matching ``chunk_factor``/``threads`` (when given) count; a backend invalid or
    unavailable in any of them is never chosen. ``reference`` is always valid, so there is an
    answer whenever a setting matches; otherwise ``ValueError``.
    """
    settings = [s for s in results["settings"]
                if (chunk_factor is None or s["chunk_factor"] == chunk_factor)
                and (threads is None or s["threads"] == threads)]
    if not settings:
        raise ValueError(f"no benchmarked setting matches chunk factor {chunk_factor}, threads {threads}")
    candidates = set.intersection(*({n for n, b in s["backends"].items() if b["valid"]} for s in settings))
    if not candidates:
        raise ValueError("no backend is valid in every matching setting")

    def score(name: str) -> float:
        return sum(math.log(s["backends"][name]["ratio_vs_reference"]) for s in settings)

    return max(sorted(candidates), key=score)


# --------------------------------------------------------------------------- output
def format_table(report: dict) -> str:
    """An aligned terminal table: one row per setting and backend."""
    head = ("cf", "thr", "backend", "median ms", "p95 ms", "p99 ms", "RTF", "x ref", "max|diff|",
            "valid", "first ms")
    rows = []
    for s in report["settings"]:
        for name, b in s["backends"].items():
            rows.append((str(s["chunk_factor"]), str(s["threads"]), name, f"{b['median_ms']:.3f}",
                         f"{b['p95_ms']:.3f}", f"{b['p99_ms']:.3f}", f"{b['rtf']:.2f}",
                         f"{b['ratio_vs_reference']:.2f}", f"{b['max_abs_diff']:.1e}",
                         "yes" if b["valid"] else "NO", f"{b['first_chunk_ms']:.1f}"))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    left = {2}
    def fmt(r):
        return "  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))

    lines = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)]
    unavailable = {n: r for s in report["settings"] for n, r in s["unavailable"].items()}
    lines += [f"{n}: unavailable ({r})" for n, r in unavailable.items()]
    m, c = report["model"], report["clip"]
    lines.append(f"model {m['id']} loaded in {1000 * m['load_s']:.0f} ms; clip {c['seconds']:.2f} s; "
                 f"RTF = {RTF_DEFINITION}; x ref = reference median / backend median (same run, interleaved)")
    return "\n".join(lines)


def write_plot(report: dict, out: str | Path) -> str | None:
    """Box plots of per-chunk latency per backend, one panel per setting; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    settings = report["settings"]
    cols = min(4, len(settings))
    rows = -(-len(settings) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, s in zip(axes.flat, settings):
        names = list(s["backends"])
        ax.boxplot([s["backends"][n]["times_ms"] for n in names], showfliers=True, whis=(5, 95))
        ax.set_xticks(range(1, len(names) + 1), names)
        ax.axhline(s["chunk_ms"], color="red", lw=0.8, ls="--")
        ax.set_title(f"cf {s['chunk_factor']}, {s['threads']} thread(s)")
        ax.set_ylabel("ms per chunk")
        ax.set_yscale("log")  # a 1 ms backend beside a 10 ms one and the chunk duration
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    fig.suptitle("per-chunk processing time (whiskers p5-p95; red: chunk duration)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out)


# --------------------------------------------------------------------------- command
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``llvc bench``'s flags on ``p``."""
    p.add_argument("--backend", action="extend", nargs="+", metavar="NAME",
                   help=f"backends to run (default all: {', '.join(BACKENDS)}; reference always runs)")
    p.add_argument("-n", "--chunk-factor", action="extend", nargs="+", type=int, metavar="N",
                   help="chunk factors (default 1 2 4 8)")
    p.add_argument("--threads", action="extend", nargs="+", type=int, metavar="N",
                   help="thread counts (default 1 2)")
    p.add_argument("--clip", default=str(DEFAULT_CLIP), help="WAV clip streamed chunk by chunk")
    p.add_argument("--warmup", type=int, default=20, help="warm-up chunks per engine (default 20)")
    p.add_argument("--repeats", type=int, default=1, help="whole-clip passes pooled (default 1)")
    p.add_argument("--json", metavar="OUT", help="write the full report (with per-chunk times) as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="per-chunk latency box plots (needs matplotlib)")
    p.add_argument("-p", "--checkpoint", help=f"LLVC checkpoint ({CHECKPOINT_DEFAULT_HELP})")
    p.add_argument("-c", "--config", help=f"model config JSON ({CONFIG_DEFAULT_HELP})")
    p.add_argument("--streams", action="extend", nargs="+", type=int, metavar="N",
                   help="instead: one batched step for N streams against N single-stream steps "
                        "(e.g. --streams 1 2 4 8 16 32 64; chunk factors default 1 4)")
    p.add_argument("--quick", action="store_true",
                   help=f"chunk factor 1, 1 thread, first {QUICK_SECONDS:g} s of the clip, 5 warm-up chunks")


def run(args: argparse.Namespace) -> int:
    """Execute ``llvc bench``; returns the exit status."""
    from common.audio import AudioError

    def fail(msg: str) -> int:
        print(f"llvc bench: error: {msg}", file=sys.stderr)
        return 2

    backends = args.backend or list(BACKENDS)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        return fail(f"unknown backend {unknown[0]!r} (known: {', '.join(BACKENDS)})")
    cfs = args.chunk_factor or ([1] if args.quick else list(DEFAULT_CHUNK_FACTORS))
    threads = args.threads or ([1] if args.quick else list(DEFAULT_THREADS))
    try:
        for cf in cfs:
            check_chunk_factor(cf)
    except ValueError as exc:
        return fail(f"--chunk-factor: {exc}")
    if any(v < 1 for v in threads) or args.repeats < 1 or args.warmup < 0:
        return fail("--threads and --repeats must be >= 1, --warmup >= 0")
    if args.streams:
        return _run_streams(args, cfs if args.chunk_factor else None, threads[0], fail)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("matplotlib not installed: pip install '.[plot]'", file=sys.stderr)
    try:
        report = run_bench(backends, cfs, threads, args.clip, warmup=5 if args.quick else args.warmup,
                           repeats=args.repeats, checkpoint=args.checkpoint, config=args.config,
                           seconds=QUICK_SECONDS if args.quick else None,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ValueError, OSError, AudioError) as exc:  # config, checkpoint, clip: one line
        return fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    print(format_table(report))
    print(f"fastest valid backend: {choose_backend(report)}")
    _say_model_and_save(report, args.json)
    if args.plot and write_plot(report, args.plot):
        print(f"wrote {args.plot}")
    return 0


def _say_model_and_save(report: dict, json_out: str | None) -> None:
    """The one line naming the model benchmarked, and the JSON report if asked for."""
    if report["model"]["demo"]:
        print(demo_model_line("llvc bench", report["model"]["id"]), file=sys.stderr)
    elif not report["model"]["trained"]:
        print("NOTE: benchmarked an UNTRAINED seeded model (-c without -p)", file=sys.stderr)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {json_out}")


def _run_streams(args: argparse.Namespace, cfs: list[int] | None, threads: int, fail) -> int:
    """``llvc bench --streams``: :mod:`models.bench_streams`."""
    from common.audio import AudioError
    from models.bench_streams import DEFAULT_CHUNK_FACTORS as STREAM_CFS
    from models.bench_streams import DEFAULT_SECONDS, format_streams_table, run_streams_bench

    if any(n < 1 for n in args.streams):
        return fail("--streams must be >= 1")
    try:
        report = run_streams_bench(args.streams, cfs or STREAM_CFS, threads, args.clip,
                                   seconds=QUICK_SECONDS / 6 if args.quick else DEFAULT_SECONDS,
                                   checkpoint=args.checkpoint, config=args.config,
                                   log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ValueError, OSError, AudioError) as exc:
        return fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    print(format_streams_table(report))
    _say_model_and_save(report, args.json)
    return 0
