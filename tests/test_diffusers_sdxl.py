"""SDXL outside ComfyUI: the diffusers backend against diffusers' own SDXL pipeline, LoRA names against
ComfyUI's ldm mapping, and LoRA files through diffusers' own loader."""
import json
import os

import pytest
import torch
from tiny_diffusers import TINY_SDXL_LAYERS, TINY_SDXL_TRANSFORMERS, sd_scheduler, tiny_sdxl_pipeline

from comfy_draft import rewards
from comfy_draft.backends.diffusers import TrainingBackend
from comfy_draft.lora import kohya_name, load_kohya_file
from comfy_draft.sampling import sample_ddim
from comfy_draft.trainer import TrainConfig, Trainer

PROMPTS = ["a lighthouse at dusk", "a bowl of ramen"]


def test_sdxl_sampling_matches_the_diffusers_sdxl_pipeline(tmp_path):
    """Prompt encoding (both encoders, pooled text, zeros for the empty negative prompt), size
    conditioning, guidance and DDIM, all against StableDiffusionXLPipeline itself."""
    pipe = tiny_sdxl_pipeline(tmp_path, scheduler=sd_scheduler(set_alpha_to_one=True))  # its DDIM ends at sigma 0
    # float64 (both run the same modules): diffusers' loop and ours group the arithmetic differently, which in
    # float32 left 1.4e-5 on 25.6 (of atol 1e-4 + rtol 1e-4), more with other CPUs' kernels. What float64 leaves,
    # 9e-7, is both schedules' float32 sigmas and alphas (elementwise roundings, the same on every CPU).
    pipe.to(dtype=torch.float64)
    backend = TrainingBackend.from_pipeline(pipe, device="cpu")
    assert backend.base_model_version.startswith("sdxl")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ours = backend.run(lambda model, x, sigmas: sample_ddim(model, x, sigmas), PROMPTS, "", 5.0, noise, 6)
        ref = pipe(PROMPTS, height=16, width=16, num_inference_steps=6, guidance_scale=5.0, latents=noise,
                   output_type="latent").images
    print(f"SDXL: max |diffusers pipeline - ours| = {(ref - ours).abs().max():.2e}")
    assert ref.std() > 0.05 and ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sdxl_lora_names_are_comfyuis_ldm_paths_and_load_in_diffusers(tmp_path, comfyui):
    import comfy.utils

    backend = TrainingBackend.from_pipeline(tiny_sdxl_pipeline(tmp_path), device="cpu")
    config = TrainConfig(prompts=PROMPTS, steps=2, sampling_steps=4, cfg=5.0, width=16, height=16, batch_size=2,
                         lr=5e-2, seed=0, resnet_loras=True)
    trainer = Trainer(backend, rewards.builtin_reward("saturation"), config)
    trainer.train()
    path = trainer.save_lora(tmp_path / "sdxl.safetensors")
    state_dict, metadata = load_kohya_file(path)
    assert metadata["ss_base_model_version"].startswith("sdxl")

    # Reference: ComfyUI's own diffusers -> ldm map for this layout (two ResNets per level, no attention
    # at the first level, TINY_SDXL_TRANSFORMERS transformer blocks at the second and in the middle).
    t = TINY_SDXL_TRANSFORMERS
    comfy_map = comfy.utils.unet_to_diffusers({
        "num_res_blocks": [TINY_SDXL_LAYERS] * 2, "channel_mult": [1, 2], "transformer_depth": [0, 0, t, t],
        "transformer_depth_output": [0, 0, 0, t, t, t], "transformer_depth_middle": t})
    diffusers_names = [n for n, m in backend.unet.named_modules() if m._forward_hooks]  # lora.attach's bypass
    expected = {kohya_name(comfy_map[n + ".weight"][:-len(".weight")]) for n in diffusers_names}
    assert set(trainer.loras) == expected
    assert any("output_blocks" in k and "out_layers_3" in k for k in expected)  # ResNets of the up path too

    pipe = tiny_sdxl_pipeline(tmp_path)
    pipe.load_lora_weights(str(path))  # diffusers' kohya SDXL conversion; raises on keys it cannot place
    g = torch.Generator().manual_seed(1)
    x, step = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 500])
    cond = backend.encode(PROMPTS)
    cond["added_cond_kwargs"]["time_ids"] = torch.tensor([[16, 16, 0, 0, 16, 16]] * 2)
    with torch.no_grad():
        ours, theirs = backend.unet(x, step, **cond).sample, pipe.unet(x, step, **cond).sample
        base = tiny_sdxl_pipeline(tmp_path).unet(x, step, **cond).sample
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3 * ours.abs().max().item())


@pytest.mark.slow
def test_cli_trains_an_sdxl_pipeline_folder(tmp_path):
    from test_cli import run_cli

    tiny_sdxl_pipeline(tmp_path).save_pretrained(tmp_path / "sdxl")
    out = tmp_path / "lora.safetensors"
    result = run_cli("train", "--model", str(tmp_path / "sdxl"), "--reward", "brightness", "--prompts", "a cat",
                     "--steps", "1", "--sampling-steps", "3", "--out", str(out))
    assert "step 1/1" in result.stdout and os.path.exists(out)
    state_dict, metadata = load_kohya_file(out)
    assert any(k.startswith("lora_unet_input_blocks_") for k in state_dict)
    # No --width/--height: the model's own resolution, UNet sample size 8 x the VAE's factor 2.
    assert json.loads(metadata["comfy_draft_config"])["width"] == 16


def test_single_file_checkpoints_are_told_apart_by_their_second_text_encoder(tmp_path):
    from safetensors.torch import save_file

    from comfy_draft.loading import is_sdxl_checkpoint

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(4),
               "model.diffusion_model.out.2.weight": torch.ones(4)}, str(tmp_path / "sdxl.safetensors"))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4),
               "model.diffusion_model.out.2.weight": torch.ones(4)}, str(tmp_path / "sd15.safetensors"))
    assert is_sdxl_checkpoint(str(tmp_path / "sdxl.safetensors"))
    assert not is_sdxl_checkpoint(str(tmp_path / "sd15.safetensors"))


def test_sdxl_vae_decodes_in_float32_under_fp16_autocast(tmp_path):
    """SDXL's VAE (force_upcast) overflows in fp16; diffusers decodes it in float32, and so does training."""
    backend = TrainingBackend.from_pipeline(tiny_sdxl_pipeline(tmp_path), device="cpu")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = backend.decode(z)
        with torch.autocast("cpu", dtype=torch.float16):
            ours = backend.decode(z)
            half = ((backend.vae.decode(z / backend.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert (half.float() - exact).abs().max() > 1e-4  # what fp16 would have given
    assert torch.equal(ours, exact)  # the same float32 modules and ops on the same input: bit for bit
