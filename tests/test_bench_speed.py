"""Smoke test of the speed benchmark (bench/speed.py): its smallest configuration runs on the tiny
checkpoint and reports positive, finite timings in the expected JSON and Markdown."""
import importlib.util
import json
import math
import pathlib

import pytest
import torch

SPEED = pathlib.Path(__file__).resolve().parents[1] / "bench" / "speed.py"


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
