"""Take the README's dashboard screenshot (docs/dashboard.png) from a real run.

Runs ``llvc run`` with the demo clip looped through the default model into a null sink, opens the
dashboard in headless Chromium at 1280x900, lets ``--seconds`` of history build up, and writes the
screenshot. Not a test.

    .venv/bin/python scripts/dashboard_screenshot.py                 # 30 s, docs/dashboard.png
    .venv/bin/python scripts/dashboard_screenshot.py --seconds 60 --out /tmp/page.png
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.lab.endpoints import private_sets  # noqa: E402
from services.lab.harness import RunningPipeline  # noqa: E402

CLIP = REPO / "tests" / "data" / "174-50561-0000.wav"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--out", default=str(REPO / "docs" / "dashboard.png"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    sets = private_sets("capture.loop=true")
    port = int(next(s for s in sets if s.startswith("dashboard.bind=")).rsplit(":", 1)[1].rstrip('"'))
    with tempfile.TemporaryDirectory(prefix="llvc-shot-") as tmp, \
            RunningPipeline(Path(tmp) / "run", ["--source", f"file:{CLIP}", "--sink", "null"], sets) as p, \
            sync_playwright() as pw:
        p.wait_streaming(1)
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        time.sleep(args.seconds)
        page.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
