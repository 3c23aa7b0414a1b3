.PHONY: setup demo test lint bench clean

DEMO_CLIP := tests/data/174-50561-0000.wav

setup:
	bash scripts/setup.sh

# The main job on the embedded default: the bundled clip through the whole pipeline
# (capture -> inference -> playback, + monitor, under supervisord) into a file; prints the report.
demo: setup
	mkdir -p out/demo
	.venv/bin/llvc run --source file:$(DEMO_CLIP) --sink file:out/demo/converted.wav \
		--until-eof --report out/demo/report.json
	@echo "demo: converted $(DEMO_CLIP) -> out/demo/converted.wav (report: out/demo/report.json)"

test: setup
	.venv/bin/python -m pytest -q

# ruff, configured in pyproject.toml (.ci/run runs it before the tests).
lint: setup
	.venv/bin/ruff check .

# Speed and latency live here, not in tests: prints tables.
bench: setup
	mkdir -p out/bench
	.venv/bin/llvc bench --json out/bench/step.json --plot out/bench/step.png
	.venv/bin/python scripts/bench_cold_start.py
	.venv/bin/python scripts/bench_protocol.py
	.venv/bin/python scripts/bench_pipeline.py
	.venv/bin/python scripts/bench_quality.py --json out/bench/quality.json

clean:
	rm -rf out/
