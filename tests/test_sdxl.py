"""SDXL through the same ComfyUI machinery: ComfyUI's own SDXL model class (pooled text and size
conditioning through the ADM input, SDXL latent format, ldm module names) with a tiny UNet."""
import json
import logging
import math

import pytest
import torch
from comfyui_harness import assert_loraloader_reproduces, model_outputs
from tiny_models import SDXLTextStandIn, tiny_sdxl

from comfy_draft import rewards
from comfy_draft.lora import load_kohya_file
from comfy_draft.trainer import TrainConfig, Trainer

PROMPTS = ["a lighthouse at dusk", "a bowl of ramen"]


@pytest.fixture(scope="module")
def sdxl_objects(comfyui, tiny_sd15):
    """MODEL, CLIP, VAE: SDXL's VAE has SD's architecture, so the tiny checkpoint's VAE serves."""
    import comfy.sd
    path = str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15))
    with torch.inference_mode():  # as ComfyUI's loader nodes run
        return tiny_sdxl(seed=0), SDXLTextStandIn(), comfy.sd.load_checkpoint_guess_config(path, output_clip=False)[2]


def conditioning(clip, prompts, size):
    """As CLIPTextEncode + ComfyUI's batching: one cond per prompt, with SDXL's size fields."""
    conds = [clip.encode_from_tokens_scheduled(p) for p in prompts]
    extra = {"pooled_output": torch.cat([c[0][1]["pooled_output"] for c in conds]), "width": size, "height": size}
    return [[torch.cat([c[0][0] for c in conds]), extra]]


def test_sdxl_sampler_matches_ksampler_ddim_uniform(comfyui, sdxl_objects):
    import nodes
    model, clip, _ = sdxl_objects
    positive, negative = conditioning(clip, PROMPTS, 64), conditioning(clip, ["", ""], 64)
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    with torch.inference_mode():  # as ComfyUI runs nodes
        (ref,) = nodes.KSampler().sample(model, 7, 8, 6.0, "ddim", "ddim_uniform", positive, negative, latent)
        (ours,) = comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTDDIMSampler"]().sample(model, positive, negative, latent,
                                                                                  7, 8, 6.0)
    ref, ours = ref["samples"], ours["samples"]
    assert ref.std() > 0.05
    # The pooled text reaches the UNet: other pooled vectors give another sample.
    other = [[positive[0][0], dict(positive[0][1], pooled_output=torch.zeros(2, 1280))]]
    with torch.inference_mode():
        (changed,) = nodes.KSampler().sample(model, 7, 8, 6.0, "ddim", "ddim_uniform", other, negative, latent)
    print(f"SDXL: max |KSampler - DRaFT| = {(ref - ours).abs().max():.2e}")
    assert (ref - ours).abs().max() < 1e-4
    assert (changed["samples"] - ref).abs().max() > 1e-3


@pytest.mark.slow
def test_sdxl_lora_has_kohya_ldm_names_and_loads_in_comfyui(comfyui, sdxl_objects, caplog):
    import comfy.model_management

    import nodes
    from comfy_draft.backends.comfyui import TrainingBackend

    model, clip, vae = sdxl_objects
    backend = TrainingBackend(model, clip, vae)
    config = TrainConfig(prompts=PROMPTS, variant="draft-lv", steps=2, sampling_steps=4, cfg=5.0, width=64, height=64,
                         batch_size=2, lr=0.05, seed=1)
    trainer = Trainer(backend, rewards.builtin_reward("saturation"), config)
    with torch.inference_mode():
        trainer.train()
    assert all(lora.up.abs().sum() > 0 for lora in trainer.loras.values())

    lora_dir = comfyui.folder_paths.get_folder_paths("loras")[0]
    path = trainer.save_lora(f"{lora_dir}/draft_tiny_sdxl.safetensors", overwrite=True)
    state_dict, metadata = load_kohya_file(path)
    assert metadata["ss_base_model_version"].startswith("sdxl")
    # kohya's SDXL names are ldm paths (input_blocks / middle_block / output_blocks), as sd-scripts writes them.
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in state_dict
    assert not [k for k in state_dict if "down_blocks" in k or "up_blocks" in k]

    with caplog.at_level(logging.WARNING), torch.inference_mode():
        (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "draft_tiny_sdxl.safetensors", 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched.patches) == len(trainer.loras)

    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 3.0])
    cond, y = torch.randn(2, 77, 2048, generator=g), torch.randn(2, 2816, generator=g)
    with torch.inference_mode():
        ours, theirs, base = (model_outputs(m, x, sigma, cond, y=y) for m in (backend.model, patched, model))
    comfy.model_management.unload_all_models()
    assert_loraloader_reproduces(ours, theirs, base, "SDXL: ")


@pytest.mark.slow
def test_sdxl_through_the_train_node(comfyui, sdxl_objects):
    """The node's own path on SDXL: prompts encoded up front, memory freed, an SDXL LoRA file, the
    returned MODEL patched by ComfyUI's loader."""
    model, clip, vae = sdxl_objects
    node = comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTTrainLoRA"]()
    with torch.inference_mode():
        out = node.train(model, clip, vae, rewards.builtin_reward("saturation"), "\n".join(PROMPTS), "",
                         variant="draft-lv", training_steps=2, sampling_steps=3, cfg=5.0, width=64, height=64,
                         batch_size=1, learning_rate=0.05, rank=4, seed=0, lora_name="draft_sdxl_node")
    patched, path, curve, final_reward = out["result"]
    state_dict, metadata = load_kohya_file(path)
    assert metadata["ss_base_model_version"].startswith("sdxl") and metadata["comfy_draft_steps"] == "2"
    assert all(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"))
               for k in state_dict)
    assert len(patched.patches) == len({k.rsplit(".", 2)[0] for k in state_dict})
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and math.isfinite(final_reward)


@pytest.mark.slow
def test_the_train_node_trains_sdxl_at_its_native_size_with_matching_size_conditioning(comfyui, sdxl_objects,
                                                                                       monkeypatch):
    """width = height = 0 (the default): 1024 for SDXL, passed to the UNet as original and target size."""
    import comfy.model_base
    model, clip, vae = sdxl_objects
    seen, encode_adm = [], comfy.model_base.SDXL.encode_adm

    def recording_encode_adm(self, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("width", "height", "target_width", "target_height")})
        return encode_adm(self, **kwargs)
    monkeypatch.setattr(comfy.model_base.SDXL, "encode_adm", recording_encode_adm)
    node = comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTTrainLoRA"]()
    with torch.inference_mode():
        out = node.train(model, clip, vae, rewards.builtin_reward("saturation"), PROMPTS[0], "", variant="draft-k",
                         training_steps=1, sampling_steps=2, cfg=5.0, width=0, height=0, batch_size=1,
                         learning_rate=0.05, rank=2, seed=0, lora_name="draft_sdxl_size",
                         options={"lv_samples": 1, "reward_resolution": 64})
    config = json.loads(load_kohya_file(out["result"][1])[1]["comfy_draft_config"])
    assert (config["width"], config["height"]) == (1024, 1024)
    # Training at 1024; the memory estimate's probe runs at its own 128 px.
    assert {tuple(s.values()) for s in seen} == {(1024,) * 4, (128,) * 4}
