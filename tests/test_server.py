"""The pack inside the real ComfyUI server, over HTTP on 127.0.0.1."""
import pytest
from test_comfyui_sampler import sampling_prompt

pytestmark = pytest.mark.slow


def test_object_info_lists_the_sampler(comfy_server):
    info = comfy_server.get("/object_info/DRaFTDDIMSampler")["DRaFTDDIMSampler"]
    assert info["category"] == "DRaFT"
    assert info["output"] == ["LATENT"]
    assert set(info["input"]["required"]) == {"model", "positive", "negative", "latent_image", "seed", "steps", "cfg"}
    assert "IMPORT FAILED" not in comfy_server.log()


def test_post_prompt_runs_and_history_reports_outputs(comfy_server, tiny_sd15):
    prompt = sampling_prompt(tiny_sd15, steps=4, batch=1)
    del prompt["5"], prompt["7"]  # only the DRaFT sampler
    entry = comfy_server.wait_history(comfy_server.queue(prompt))
    assert entry["status"]["status_str"] == "success", entry["status"]
    (latent,) = entry["outputs"]["8"]["latents"]
    assert (comfy_server.base_dir / "output" / latent["subfolder"] / latent["filename"]).stat().st_size > 0


def test_post_prompt_with_an_sd_model_patched_to_flow_sampling_reports_the_error(comfy_server, tiny_sd15):
    prompt = sampling_prompt(tiny_sd15, steps=4, batch=1)
    prompt["9"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}
    prompt["6"]["inputs"]["model"] = ["9", 0]
    del prompt["5"], prompt["7"]
    entry = comfy_server.wait_history(comfy_server.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert "discrete eps or v-prediction" in errors[0]["exception_message"]
