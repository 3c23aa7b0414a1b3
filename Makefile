.PHONY: setup demo test clean

DEMO_CLIP := tests/data/174-50561-0000.wav

setup:
	bash scripts/setup.sh

# The main job on the embedded default: stream-convert the bundled clip chunk by chunk.
demo: setup
	.venv/bin/llvc convert --stream --chunk-factor 1 -f $(DEMO_CLIP) -o out/demo
	@echo "demo: converted $(DEMO_CLIP) -> out/demo/$(notdir $(DEMO_CLIP))"

test: setup
	.venv/bin/python -m pytest -q

clean:
	rm -rf out/
