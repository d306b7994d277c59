"""Smoke test of the speed benchmark (bench/speed.py): its smallest configuration runs on the tiny
checkpoint and reports positive, finite timings in the expected JSON and Markdown."""
import importlib.util
import json
import math
import pathlib

import pytest

SPEED = pathlib.Path(__file__).resolve().parents[1] / "bench" / "speed.py"


def positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_speed_benchmark_smallest_configuration(comfyui, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_speed", SPEED)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    speed.main(["--device", "cpu", "--size", "tiny", "--models", "sd15", "--variants", "draft-lv (n=2)",
                "--steps", "2", "--resolution", "16", "--warmup", "0", "--repeats", "1",
                "--out", str(tmp_path), "--name", "speed"])

    results = json.loads((tmp_path / "speed.json").read_text())
    assert results["env"]["device"] == "cpu" and results["args"]["size"] == "tiny"
    model = results["models"]["sd15"]
    sampling = model["sampling"]
    assert positive(sampling["ksampler_s"]) and positive(sampling["ours_s"]) and positive(sampling["ratio"])
    assert sampling["max_abs_diff"] < 1e-4  # KSampler and the library's DDIM give the same latents
    assert set(model["units"]) == {"sampling_chain", "sampling_call", "differentiated_call", "decode", "reward", "optimizer"}
    assert all(positive(v) for v in model["units"].values())
    step = model["variants"]["draft-lv (n=2)"]
    assert positive(step["step_s"]) and positive(step["unavoidable_total_s"]) and positive(step["overhead_ratio"])
    assert {"sampling", "differentiated", "decode", "reward", "backward", "optimizer"} <= set(step["phases_s"])
    assert all(positive(step["phases_s"][p]) for p in ("sampling", "differentiated", "decode", "reward", "backward"))
    assert "| draft-lv (n=2) |" in (tmp_path / "speed.md").read_text()
