.PHONY: test setup

# One command for a fresh Linux machine with Python 3.11 (no GPU needed): creates or reuses .venv and
# the ComfyUI tree under .cache/, then runs the whole suite. Extra pytest arguments: make test ARGS="-k sampler".
test: setup
	.venv/bin/python -m pytest $(ARGS)

setup:
	scripts/bootstrap.sh
