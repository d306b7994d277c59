.PHONY: test setup demo bench

# One command for a fresh Linux machine with Python 3.11 (no GPU needed): creates or reuses .venv and
# the ComfyUI tree under .cache/, then runs the whole suite. Extra pytest arguments: make test ARGS="-k sampler".
test: setup
	.venv/bin/python -m pytest $(ARGS)

setup:
	scripts/bootstrap.sh

# DRaFT-LV on the bundled digit model: a few minutes on 2 CPU cores; writes demo_output/.
demo: setup
	.venv/bin/python -m comfy_draft demo --out demo_output

# The paper's comparisons in miniature (tens of minutes on a CPU); writes bench/results/.
bench: setup
	.venv/bin/python bench/quality.py
