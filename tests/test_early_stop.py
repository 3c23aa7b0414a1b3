"""A service asked to stop while it is still importing stops cleanly instead of dying of SIGTERM.

``llvc run`` stopped a moment after it started (Ctrl-C) once lost the monitor's report this way:
SIGTERM's default action ended the monitor in the middle of its imports. The signal is sent
here from inside the service's import (``importlib.import_module`` of its module), so it lands
exactly in that window every time; a real process, real sockets.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.lab.endpoints import private_sets

ROOT = Path(__file__).resolve().parents[1]

# The service's module is imported by `llvc`; SIGTERM arrives just before that import.
SIGNAL_DURING_IMPORT = """
import importlib, os, signal, sys
real = importlib.import_module
def import_module(name, *a, **k):
    if name.startswith("services.") and not getattr(import_module, "sent", False):
        import_module.sent = True
        os.kill(os.getpid(), signal.SIGTERM)
    return real(name, *a, **k)
importlib.import_module = import_module
from services.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
def test_a_monitor_stopped_during_its_imports_still_writes_its_report(tmp_path):
    report = tmp_path / "report.json"
    args = ["monitor"] + [a for s in private_sets(f'monitor.report="{report}"') for a in ("--set", s)]
    env = {**os.environ, "LLVC_RUN_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", SIGNAL_DURING_IMPORT, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=100)
    print(done.stderr[-2000:])
    assert done.returncode == 0, f"status {done.returncode}: {done.stderr[-2000:]}"
    assert "stopped" in done.stderr and "loop error" not in done.stderr
    assert json.loads(report.read_text())["chunks"] == 0  # a report, of nothing yet
    assert json.loads((tmp_path / "monitor.exit.json").read_text())["status"] == 0
