"""scripts/replay_playout.py: a recorded arrival trace through the jitter buffer, per setting."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
C, NS = 208, 1e9 / 16000


def write_trace(path: Path, n: int = 2000, late: tuple[int, ...] = (500, 1200, 1600)) -> None:
    """Chunks of cf 1, each arriving 15 ms after its capture (chunk + L + 1 ms), but ``late``
    ones 9 ms later still, in arrival order, as bench_pipeline.py --trace saves them."""
    k = np.arange(n)
    t_capture = (1_000_000_000 + k * C * NS).astype(np.int64)
    t_recv = t_capture + 15_000_000
    t_recv[list(late)] += 9_000_000
    np.savez(path, offset=k * C, n_samples=np.full(n, C), t_capture_ns=t_capture, t_recv_ns=t_recv)


def replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "replay_playout.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_each_setting_replays_the_same_arrivals(tmp_path):
    trace = tmp_path / "cf1-test-0.npz"
    write_trace(trace)
    out = replay(str(trace), "--variant", "fixed=adaptive=false", "--variant", "fixed12=adaptive=false,target_ms=12",
                 "--variant", "adaptive=adaptive=true")
    print(out.stdout, out.stderr)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[1]: line.split() for line in out.stdout.splitlines()[2:]}
    # columns: trace variant chunks p50 p95 p99 max underruns under% late grows shrinks
    fixed, fixed12, adaptive = rows["fixed"], rows["fixed12"], rows["adaptive"]
    assert fixed[2] == fixed12[2] == adaptive[2] == "2000"
    assert int(fixed[7]) == 3 and int(fixed[9]) == 3      # 9 ms late against 6 ms of margin, each time
    assert int(fixed12[7]) == 0 and float(fixed12[3]) > float(fixed[3]) + 5.5
    assert int(adaptive[7]) == 1 and int(adaptive[10]) == 1  # the first grew the margin for the rest


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path):
    trace = tmp_path / "t.npz"
    write_trace(trace, n=100, late=())
    out = replay(str(trace), "--variant", "bad=target_ms=-1")
    assert out.returncode == 2 and out.stdout.count("\n") <= 2
    assert "playback.target_ms: must be >= 0" in out.stderr and out.stderr.count("\n") == 1
