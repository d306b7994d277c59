"""DDPO and P-GRAFT through the real ComfyUI on the tiny checkpoint with a reward without gradient (JPEG size),
and the P-GRAFT sampler's switch from the LoRA to the base model, counted on ComfyUI's own UNet calls."""
import pytest
import torch
from comfyui_harness import PromptError
from test_train_node import train_prompt

from comfy_draft.lora import load_kohya_file

pytestmark = pytest.mark.slow


def policy_prompt(ckpt, variant, lora_name, **options):
    prompt = train_prompt(ckpt, steps=2, lora_name=lora_name, sampling_steps=4, **options)
    prompt["2"]["inputs"]["kind"] = "jpeg_compressibility"
    prompt["3"]["inputs"].update(variant=variant, batch_size=2)
    return prompt


def lora_file(comfyui, history):
    name = history["outputs"]["3"]["text"][0].split(":")[0]
    return comfyui.folder_paths.get_full_path("loras", name), name


def test_ddpo_trains_on_jpeg_size_and_draft_refuses_it(comfyui, tiny_sd15):
    history = comfyui.run(policy_prompt(tiny_sd15, "ddpo", "draft/ddpo_jpeg", inner_epochs=2,
                                        ddpo_timestep_fraction=0.5))
    path, _ = lora_file(comfyui, history)
    state, metadata = load_kohya_file(path)
    assert metadata["comfy_draft_variant"] == "ddpo" and metadata["comfy_draft_reward"] == "jpeg_compressibility"
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_up.weight"))  # it was updated
    assert history["outputs"]["10"]["images"]  # the reward curve
    with pytest.raises(PromptError, match="has no gradient.*ddpo, graft, pgraft"):
        comfyui.run(policy_prompt(tiny_sd15, "draft-lv", "draft/refused"))


def test_pgraft_trains_and_its_sampler_reads_t_from_the_file(comfyui, tiny_sd15):
    history = comfyui.run(policy_prompt(tiny_sd15, "pgraft", "draft/pgraft_jpeg", pgraft_fraction=0.5,
                                        graft_samples_per_prompt=2, graft_accepted_per_prompt=1))
    path, name = lora_file(comfyui, history)
    _, metadata = load_kohya_file(path)
    assert metadata["comfy_draft_variant"] == "pgraft" and float(metadata["comfy_draft_pgraft_fraction"]) == 0.5
    assert 0 < float(metadata["comfy_draft_pgraft_start_percent"]) < 1
    assert "P-GRAFT Sampler" in history["outputs"]["3"]["text"][0]
    prompt = policy_prompt(tiny_sd15, "pgraft", "unused")
    del prompt["2"], prompt["3"], prompt["10"]
    prompt["7"] = {"class_type": "DRaFTPGRAFTSampler", "inputs": {
        "model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "seed": 1,
        "steps": 4, "cfg": 5.0, "lora_name": name, "strength": 1.0, "lora_fraction": 0.0}}
    assert comfyui.run(prompt)["outputs"]["9"]["images"]


def test_pgraft_sampler_runs_the_lora_above_t_and_the_base_model_below(comfyui, tiny_sd15):
    import comfy.sd

    from comfy_draft.backends import comfyui as backend
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15)))[:3]
    loras = backend.TrainingBackend(model, clip, vae).add_loras(rank=4)
    with torch.no_grad():
        for lora in loras.values():
            lora.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        lora = loras.kohya_state_dict(torch.float32)
        lora_model = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0]
        calls = []

        def counting(name):
            def wrapper(apply_model, args):
                calls.append((name, float(args["timestep"].max())))
                return apply_model(args["input"], args["timestep"], **args["c"])
            return wrapper
        lora_model.set_model_unet_function_wrapper(counting("lora"))
        base = model.clone()
        base.set_model_unet_function_wrapper(counting("base"))
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red apple"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        switched = backend.sample_lora_then_base(lora_model, base, positive, negative, latent, 1, 5, 5.0, 0.6)
        sigmas = backend.sampling_sigmas(model, 5)
        sigma_t = float(sigmas[3])  # round(0.6 * 5) = 3 LoRA steps
        assert [name for name, _ in calls] == ["lora"] * 3 + ["base"] * 2  # cond and uncond batched: one call a step
        assert all(sigma > sigma_t for name, sigma in calls if name == "lora")
        assert all(sigma <= sigma_t * (1 + 1e-6) for name, sigma in calls if name == "base")
        assert lora_model.model_options is not model.model_options  # the node's input is left as it was
        with_lora = backend.sample(lora_model, positive, negative, latent, 1, 5, 5.0)
        plain = backend.sample(base, positive, negative, latent, 1, 5, 5.0)
    assert (switched - with_lora).abs().max() > 1e-4 and (switched - plain).abs().max() > 1e-4


def test_pgraft_example_workflow_with_hook_keyframes_samples_as_the_pgraft_sampler(comfyui, tiny_sd15):
    """The example's ordinary KSampler with a LoRA hook dropping to 0 at the file's start_percent gives the DRaFT
    P-GRAFT Sampler's latent (LoRA above t, base below), which differs from the LoRA's and the base model's."""
    import json

    from safetensors.torch import load_file
    from test_workflows import random_lora_file
    from ui_workflows import REPO, ui_to_api

    from comfy_draft.policy import comfy_start_percent
    random_lora_file(comfyui, tiny_sd15, "pgraft_example.safetensors",
                     {"comfy_draft_variant": "pgraft", "comfy_draft_pgraft_fraction": "0.6"})

    def latent(prompt, node, name):
        prompt["99"] = {"class_type": "SaveLatent", "inputs": {"samples": [node, 0], "filename_prefix": name}}
        (saved,) = comfyui.run(prompt)["outputs"]["99"]["latents"]
        return load_file(comfyui.output_path(saved))["latent_tensor"]

    def workflow(start_percent):
        prompt = ui_to_api(json.loads((REPO / "workflows" / "pgraft_lora_above_t.json").read_text()),
                           comfyui.nodes.NODE_CLASS_MAPPINGS)
        prompt["1"]["inputs"]["ckpt_name"] = tiny_sd15
        prompt["2"]["inputs"]["lora_name"] = "draft/pgraft_example.safetensors"
        prompt["12"]["inputs"]["start_percent"] = start_percent
        prompt["7"]["inputs"].update(width=64, height=64)
        prompt["8"]["inputs"]["steps"] = 5
        return prompt

    hooked = latent(workflow(comfy_start_percent(0.6, 5)), "8", "hooked")
    full = latent(workflow(1.0), "8", "full")  # the LoRA at every step
    prompt = workflow(0.0)
    prompt["20"] = {"class_type": "DRaFTPGRAFTSampler", "inputs": {
        "model": ["1", 0], "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "seed": 1,
        "steps": 5, "cfg": 7.5, "lora_name": "draft/pgraft_example.safetensors", "strength": 1.0,
        "lora_fraction": 0.0}}
    switched = latent(prompt, "20", "switched")
    torch.testing.assert_close(hooked, switched, rtol=1e-3, atol=1e-3)
    assert (full - switched).abs().max() > 1e-2
