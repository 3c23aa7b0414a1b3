.PHONY: setup demo test clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/llvc convert -f tests/data/2412-153947-0000.wav -o out/demo
	@echo "demo output written to out/demo/"

test: setup
	.venv/bin/python -m pytest -q

clean:
	rm -rf out/
