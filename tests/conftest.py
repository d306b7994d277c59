import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental hub call fails fast
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from comfyui_harness import PACK_NAME, ComfyServer, InProcessComfy, make_base_dir  # noqa: E402
from tiny_models import tiny_sd15_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """The real ComfyUI, booted in-process once per test run, with this pack loaded by its own loader."""
    app = InProcessComfy(tmp_path_factory.mktemp("comfy_base"))
    failed = [line for line in app.import_log if "IMPORT FAILED" in line and PACK_NAME in line]
    assert not failed, "\n".join(app.import_log)
    return app


@pytest.fixture(scope="session")
def tiny_sd15(comfyui):
    """File name (in ComfyUI's checkpoints folder) of a tiny random SD1.5-architecture checkpoint."""
    path = tiny_sd15_checkpoint(seed=0)
    link = comfyui.base_dir / "models" / "checkpoints" / path.name
    if not link.exists():
        link.symlink_to(path)
    return path.name


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_sd15):
    """The real ComfyUI server on 127.0.0.1 (started on first use), sharing the tiny checkpoint."""
    base = make_base_dir(tmp_path_factory.mktemp("server_base"))
    from tiny_models import tiny_sd15_checkpoint as ckpt
    (base / "models" / "checkpoints" / tiny_sd15).symlink_to(ckpt(seed=0))
    server = ComfyServer(base).wait_ready()
    yield server
    server.stop()

