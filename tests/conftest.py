import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental hub call fails fast
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from comfyui_harness import PACK_NAME, ComfyServer, InProcessComfy, make_base_dir  # noqa: E402
from tiny_models import tiny_sd15_small_decoder_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """The real ComfyUI, booted in-process once per test run, with this pack loaded by its own loader."""
    app = InProcessComfy(tmp_path_factory.mktemp("comfy_base"))
    failed = [line for line in app.import_log if "IMPORT FAILED" in line and PACK_NAME in line]
    assert not failed, "\n".join(app.import_log)
    return app


@pytest.fixture(scope="session")
def tiny_sd15(comfyui):
    """File name (in ComfyUI's checkpoints folder) of a tiny random SD1.5-architecture checkpoint: a tiny UNet,
    full-size CLIP-L, and a VAE decoder at a quarter of SD's width (16x cheaper per pixel: the full-width decoder was
    most of every node test's time, and no test here is about its width)."""
    path = tiny_sd15_small_decoder_checkpoint(seed=0)
    link = comfyui.base_dir / "models" / "checkpoints" / path.name
    if not link.exists():
        link.symlink_to(path)
    return path.name


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_sd15):
    """The real ComfyUI server on 127.0.0.1 (started on first use), sharing the tiny checkpoint."""
    base = make_base_dir(tmp_path_factory.mktemp("server_base"))
    (base / "models" / "checkpoints" / tiny_sd15).symlink_to(tiny_sd15_small_decoder_checkpoint(seed=0))
    server = ComfyServer(base).wait_ready()
    yield server
    server.stop()



# ----- the suite's time budget (README: Tests) ------------------------------------------------------------------------
# The whole suite must stay under SUITE_BUDGET_S cold on 2 cores of either kind of CI processor (with or without
# AVX-512; bf16/fp16 convolutions are emulated without it). The slowest tests are always listed (--durations in
# pyproject.toml), every test over TEST_BUDGET_S is named, and a session over FAIL_AFTER_S fails: twice the budget and
# more is a regression, not a slow machine.
SUITE_BUDGET_S = 25 * 60
TEST_BUDGET_S = 120
FAIL_AFTER_S = float(os.environ.get("COMFY_DRAFT_FAIL_AFTER_S", 2 * SUITE_BUDGET_S))
_session = {}


def pytest_sessionstart(session):
    _session["start"] = time.monotonic()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if "start" not in _session:
        return
    elapsed = time.monotonic() - _session["start"]
    durations = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "nodeid", None) and hasattr(report, "duration"):
                durations[report.nodeid] = durations.get(report.nodeid, 0.0) + report.duration
    over = sorted(((d, n) for n, d in durations.items() if d > TEST_BUDGET_S), reverse=True)
    terminalreporter.section("time budget")
    terminalreporter.write_line(f"suite: {elapsed / 60:.1f} min of a {SUITE_BUDGET_S / 60:.0f}-minute budget "
                                f"(fails above {FAIL_AFTER_S / 60:.0f}); processor: {processor()}")
    for d, n in over:
        terminalreporter.write_line(f"over {TEST_BUDGET_S} s: {d:.0f} s {n}")
    if elapsed > FAIL_AFTER_S:
        terminalreporter.write_line(f"FAILED: the suite took {elapsed / 60:.1f} min, over {FAIL_AFTER_S / 60:.0f}")


def pytest_sessionfinish(session, exitstatus):  # runs before the summary above is printed
    if "start" in _session and time.monotonic() - _session["start"] > FAIL_AFTER_S and exitstatus == 0:
        session.exitstatus = 1


def processor():
    """The CPU's model name and the flags that decide half-precision speed (lscpu's, from /proc/cpuinfo)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(wanted) or 'no AVX-512'}), {os.cpu_count()} cores"
