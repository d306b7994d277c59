"""pytest plugin (loaded with -p from pyproject.toml): collect the repository root as a plain
directory, not a Python package. Its __init__.py is ComfyUI's entry point for this pack and imports
ComfyUI's modules, so only ComfyUI's own loader may import it (the harness does, after booting)."""
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_collect_directory(path, parent):
    if path == REPO:
        return pytest.Dir.from_parent(parent, path=path)
