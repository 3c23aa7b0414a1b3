"""The device resamplers' latency and CPU: soxr (as capture and playback used it) against the FIR.

Feeds 20 s of noise in device-sized blocks and, after each block, notes how far the resampled
output trails the input: the input time consumed minus the input time the output released so
far covers (both resamplers' outputs counted time-aligned: soxr aligns itself; the FIR's group
delay is counted in, as capture drops it). A sample's capture-to-release time is that lag plus
its wait for the end of its block, the same for both; the lag is what the resampler adds.
Prints the lag's median, min and max, the median capture-to-release time over all samples, and
the mean CPU time per block (soxr does its work in bursts: most calls only buffer).

    .venv/bin/python scripts/bench_resample.py            # 10 ms blocks
    .venv/bin/python scripts/bench_resample.py --block-ms 2
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import soxr

from services.resample import StreamResampler
from services.sinks import PLAYBACK_STOPBAND


def run(make, delay: int, rate_in: int, rate_out: int, block: int, seconds: float = 20.0):
    x = np.random.default_rng(0).standard_normal(int(rate_in * seconds)).astype(np.float32) * 0.1
    r = make()
    lags, waits, cpu = [], [], []
    out = -delay  # aligned outputs released so far (the FIR's first `delay` are the silence before)
    for i in range(0, len(x) - block + 1, block):
        t = time.perf_counter_ns()
        y = r.resample_chunk(x[i:i + block])
        cpu.append(time.perf_counter_ns() - t)
        end = (i + block) / rate_in                       # input time consumed
        j = np.arange(max(out, 0), out + len(y))          # aligned indices released now
        waits.append(end - j / rate_out)                  # each one's capture-to-release time
        out += len(y)
        lags.append(end - out / rate_out)
    lags, waits = np.array(lags[50:]) * 1e3, np.concatenate(waits[50:]) * 1e3
    return np.median(lags), lags.min(), lags.max(), np.median(waits), np.mean(cpu) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block-ms", type=float, default=10.0)
    args = ap.parse_args()
    print(f"{'path':<28} {'resampler':<10} {'lag p50':>8} {'min':>6} {'max':>6} {'sample p50':>10} {'cpu/block':>10}")
    for rate_in, rate_out in [(48000, 16000), (44100, 16000), (16000, 48000), (16000, 44100)]:
        block = round(rate_in * args.block_ms / 1000)
        kinds = ["HQ", "LQ", "QQ"] if rate_out == 16000 else ["HQ", "QQ"]
        rows = [(f"soxr {q}", lambda q=q: soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality=q), 0)
                for q in kinds]
        stop = 0.5 if rate_out == 16000 else PLAYBACK_STOPBAND
        fir = StreamResampler(rate_in, rate_out, stop)
        rows.append(("FIR", lambda: StreamResampler(rate_in, rate_out, stop), fir.delay_out))
        for name, make, delay in rows:
            lag, lo, hi, wait, cpu = run(make, delay, rate_in, rate_out, block)
            print(f"{rate_in} -> {rate_out}, {block:>4}-frame blocks  {name:<10} {lag:7.2f}  {lo:6.2f} {hi:6.2f} "
                  f"{wait:9.2f}  {cpu:7.1f} us")


if __name__ == "__main__":
    main()
