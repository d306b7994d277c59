"""Smoke test of the speed benchmark (bench/speed.py): its smallest configuration runs on the tiny
checkpoint and reports positive, finite timings in the expected JSON and Markdown. And the shape of bench/: the
scripts import the shared fixtures (bench/fixtures.py), never each other, and measure one table of setups."""
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
SPEED = BENCH / "speed.py"
SCRIPTS = ("speed", "accounting", "gpu_check", "channels_last")


def positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_speed_benchmark_smallest_configuration(comfyui, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_speed", SPEED)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    threads = torch.get_num_threads()
    try:  # one thread: steady on a shared machine, where busy-waiting threads slow each other down
        speed.main(["--device", "cpu", "--size", "tiny", "--models", "sd15", "--variants", "draft-lv (n=2)",
                    "--steps", "2", "--resolution", "16", "--warmup", "0", "--repeats", "1", "--sampling-repeats", "1",
                    "--threads", "1",
                    "--out", str(tmp_path), "--name", "speed"])
    finally:
        torch.set_num_threads(threads)

    results = json.loads((tmp_path / "speed.json").read_text())
    assert results["env"]["device"] == "cpu" and results["args"]["size"] == "tiny"
    model = results["models"]["sd15"]
    sampling = model["sampling"]
    assert all(positive(sampling[k]) for k in ("ksampler_s", "ours_s", "ratio", "training_chain_s", "ratio_training_chain"))
    assert sampling["max_abs_diff"] < 1e-4  # KSampler and the library's DDIM give the same latents
    step = model["variants"]["draft-lv (n=2)"]
    assert positive(step["step_s"]) and positive(step["unavoidable_total_s"]) and positive(step["overhead_ratio"])
    assert set(step["units_s"]) == {"sampling_chain", "differentiated_call", "decode", "reward", "optimizer"}
    assert all(positive(v) for v in step["units_s"].values()) and step["sampling_steps"] == 2
    assert {"sampling", "differentiated", "decode", "reward", "backward", "optimizer"} <= set(step["phases_s"])
    assert all(positive(step["phases_s"][p]) for p in ("sampling", "differentiated", "decode", "reward", "backward"))
    assert "| draft-lv (n=2) |" in (tmp_path / "speed.md").read_text()


def test_bench_scripts_import_the_fixtures_and_not_each_other():
    """No import cycle: each script, imported alone in a fresh interpreter, brings in bench/fixtures.py at most; the
    fixtures import no script."""
    code = f"""
import sys
sys.path.insert(0, {str(BENCH)!r})
scripts = set({SCRIPTS!r})
import fixtures
assert not scripts & set(sys.modules), sorted(scripts & set(sys.modules))
for name in sorted(scripts):
    __import__(name)
    others = (scripts - {{name}}) & set(sys.modules)
    assert not others, (name, sorted(others))
    del sys.modules[name]
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_speed_and_accounting_measure_one_table_of_setups():
    """speed.py --accounting and accounting.py --configs name the rows of fixtures.SETUPS (accounting.py's short names
    are aliases of them); "no checkpointing" means none anywhere, the decoder blocks included, as the trainer runs
    without checkpointing; the committed accounting rows carry the settings the table gives their names."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import accounting
    import fixtures
    import speed

    assert speed.SETUPS is fixtures.SETUPS and speed.RUNS_AS is fixtures.RUNS_AS
    no_checkpointing = fixtures.SETUPS[fixtures.setup_name("after, no checkpointing")]
    assert no_checkpointing == fixtures.SETUPS[fixtures.RUNS_AS[False]]
    assert no_checkpointing["decode"] == no_checkpointing["unet_checkpoint"] == "off" and no_checkpointing["lv_batched"]
    configs = accounting.parser().parse_args(["--configs", *fixtures.SETUP_ALIASES, *fixtures.SETUPS]).configs
    assert {fixtures.setup_name(c) for c in configs} == set(fixtures.SETUPS)
    assert [fixtures.setup_name(c) for c in accounting.parser().parse_args([]).configs] == [
        "before (W + delta, whole decoder)", "after: bypass, decoder blocks"]
    rows = json.loads((BENCH / "results" / "speed_real_cpu.json").read_text())["accounting"]
    for row in rows:
        setup = {"lv_batched": False, **fixtures.SETUPS[row["config"]]}
        assert {k: row[k] for k in setup} == setup, row["config"]
