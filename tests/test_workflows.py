"""The example workflows in workflows/: their nodes exist, and the training one runs on the tiny checkpoint."""
import json
import pathlib

import pytest
import torch
from tiny_clip import OPEN_CLIP, aesthetic_mlp, open_clip_model, write_aesthetic_mlp
from ui_workflows import EXAMPLES, REPO, api_to_ui, ui_to_api

WORKFLOWS = REPO / "workflows"


def load(name):
    return json.loads((WORKFLOWS / name).read_text())


def random_lora_file(comfyui, ckpt, name, metadata=None):
    """A LoRA for the checkpoint with random (non-zero) up weights, saved as loras/draft/<name>."""
    import comfy.sd

    from comfy_draft.backends.comfyui import TrainingBackend
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(comfyui.folder_paths.get_full_path("checkpoints", ckpt)))[:3]
    loras = TrainingBackend(model, clip, vae).add_loras(rank=4)
    with torch.no_grad():
        for lora in loras.values():
            lora.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    folder = pathlib.Path(comfyui.folder_paths.get_folder_paths("loras")[0]) / "draft"
    loras.save(folder / name, metadata, overwrite=True)


def install_tiny_aesthetic_files(comfyui):
    """Tiny stand-ins under the real file names, in the real layouts (MLP .pth + open_clip tower)."""
    folder = pathlib.Path(comfyui.folder_paths.get_folder_paths("reward_models")[0])
    folder.mkdir(parents=True, exist_ok=True)
    write_aesthetic_mlp(folder / "sac+logos+ava1-l14-linearMSE.pth", aesthetic_mlp(OPEN_CLIP["embed_dim"]))
    torch.save(open_clip_model(OPEN_CLIP, quick_gelu=True).state_dict(), folder / "ViT-L-14.pt")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_is_current_and_uses_known_nodes(comfyui, name):
    classes = comfyui.nodes.NODE_CLASS_MAPPINGS
    workflow = load(name)
    prompt, positions, *titles = EXAMPLES[name]()
    assert workflow == json.loads(json.dumps(api_to_ui(prompt, classes, positions, *titles))), \
        "regenerate with: .venv/bin/python tests/ui_workflows.py"
    assert all(node["type"] in classes for node in workflow["nodes"])
    assert ui_to_api(workflow, classes) == json.loads(json.dumps(prompt))


@pytest.mark.slow
def test_training_example_runs_on_the_tiny_checkpoint(comfyui, tiny_sd15):
    install_tiny_aesthetic_files(comfyui)
    prompt = ui_to_api(load("train_aesthetic_lora_draft_lv.json"), comfyui.nodes.NODE_CLASS_MAPPINGS)
    prompt["1"]["inputs"]["ckpt_name"] = tiny_sd15
    prompt["3"]["inputs"].update(training_steps=2, sampling_steps=4, width=64, height=64)
    prompt["13"]["inputs"]["save_every"] = 0
    prompt["7"]["inputs"].update(width=64, height=64)
    prompt["8"]["inputs"]["steps"] = 4
    outputs = comfyui.run(prompt)["outputs"]
    assert outputs["4"]["images"] and outputs["10"]["images"]
    assert "reward" in outputs["3"]["text"][0]
    assert any(n.startswith("draft/aesthetic_") for n in comfyui.folder_paths.get_filename_list("loras"))


@pytest.mark.slow
def test_annealed_lora_strength_lies_between_base_and_full_strength(comfyui, tiny_sd15):
    """The hook-keyframe workflow runs, and its samples differ from both the base model's and the LoRA's."""
    random_lora_file(comfyui, tiny_sd15, "annealed.safetensors")

    def latent(start, end):
        prompt = ui_to_api(load("anneal_lora_strength.json"), comfyui.nodes.NODE_CLASS_MAPPINGS)
        prompt["1"]["inputs"]["ckpt_name"] = tiny_sd15
        prompt["2"]["inputs"]["lora_name"] = "draft/annealed.safetensors"
        prompt["3"]["inputs"].update(strength_start=start, strength_end=end)
        prompt["7"]["inputs"].update(width=64, height=64)
        prompt["8"]["inputs"]["steps"] = 5
        prompt["99"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"anneal_{start}_{end}"}}
        (saved,) = comfyui.run(prompt)["outputs"]["99"]["latents"]
        from safetensors.torch import load_file
        return load_file(comfyui.output_path(saved))["latent_tensor"]

    base, full, annealed = latent(0.0, 0.0), latent(1.0, 1.0), latent(0.0, 1.0)
    assert (full - base).abs().max() > 1e-3
    assert (annealed - base).abs().max() > 1e-4 and (annealed - full).abs().max() > 1e-4
