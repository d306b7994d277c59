"""`python -m comfy_draft train` end to end on a tiny diffusers pipeline folder."""
import json
import os
import subprocess
import sys

import pytest
from tiny_diffusers import tiny_pipeline

from comfy_draft.lora import load_kohya_file


def run_cli(*args, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "comfy_draft", *args], capture_output=True, text=True, env=env)
    if check and result.returncode:
        raise AssertionError(result.stdout + result.stderr)
    return result


@pytest.mark.slow
def test_cli_trains_writes_lora_log_checkpoint_and_resumes(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "bright.safetensors"
    common = ["train", "--model", str(tmp_path / "pipe"), "--out", str(out), "--reward", "brightness",
              "--prompts", "a red square", "a blue circle", "--sampling-steps", "4", "--width", "32", "--height", "32",
              "--batch-size", "1", "--cfg", "3", "--device", "cpu"]
    result = run_cli(*common, "--steps", "2")
    assert "step 2/2" in result.stdout and out.exists()
    log = [json.loads(line) for line in (tmp_path / "bright.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [1, 2] and all("reward" in m and "grad_norm" in m for m in log)
    state_dict, metadata = load_kohya_file(out)
    assert metadata["comfy_draft_variant"] == "draft-lv" and metadata["comfy_draft_steps"] == "2"
    pipe.load_lora_weights(str(out))  # diffusers' own loader converts every key

    refused = run_cli(*common, "--steps", "3", check=False)
    assert refused.returncode and "exists: pass --overwrite" in refused.stderr
    result = run_cli(*common, "--steps", "3", "--resume")
    assert "step 3/3" in result.stdout and "step 1/" not in result.stdout
    assert len((tmp_path / "bright.jsonl").read_text().splitlines()) == 3
    assert load_kohya_file(out)[1]["comfy_draft_steps"] == "3"
