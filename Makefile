.PHONY: setup demo test clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/llvc convert -f tests/data/174-50561-0000.wav -o out/demo
	@echo "demo output written to out/demo/"

test: setup
	.venv/bin/python -m pytest -q

clean:
	rm -rf out/
