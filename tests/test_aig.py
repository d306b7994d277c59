"""Annealed importance guidance: schedules, the library mix, and the AIG Sampler node against the DRaFT DDIM Sampler
through the real ComfyUI (base MODEL and LoraLoader's MODEL)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_draft.guidance import Mixed, aig_weight, aig_weights, sample_aig
from comfy_draft.sampling import sample_ddim


def test_schedules():
    assert aig_weights(4, "linear") == [0, 0.25, 0.5, 0.75]
    assert aig_weights(4, "power_p", p=2) == [0, 0.0625, 0.25, 0.5625]
    assert aig_weights(4, "power_p", p=0) == [1, 1, 1, 1]
    assert aig_weights(4, "step_f", f=0.5) == [0, 0, 1, 1]
    assert aig_weights(4, "step_f", f=0) == [1] * 4 and aig_weights(4, "step_f", f=1) == [0] * 4
    with pytest.raises(ValueError, match="unknown AIG schedule"):
        aig_weight(0, 4, "cosine")


def test_mixed_prediction_is_the_schedules_mix_at_each_step():
    """Against a loop written out by hand: x0 = (1 - w_i) base + w_i lora at step i, then the DDIM step. In
    float64: the loop and the sampler may group the same arithmetic differently."""
    sigmas = torch.tensor([14.6, 5.0, 1.2, 0.3, 0.0], dtype=torch.float64)
    base = lambda x, s: torch.tanh(x) * 0.9  # noqa: E731
    lora = lambda x, s: torch.sin(x) + 0.05 * s[:, None]  # noqa: E731
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    weights = aig_weights(4, "power_p", p=2)
    ref = x.clone()
    for i in range(4):
        s = sigmas[i].expand(2)
        x0 = (1 - weights[i]) * base(ref, s) + weights[i] * lora(ref, s)
        ref = x0 if sigmas[i + 1] == 0 else x0 + sigmas[i + 1] * (ref - x0) / sigmas[i]
    torch.testing.assert_close(sample_aig(base, lora, x, sigmas, weights), ref, rtol=1e-12, atol=1e-12)
    # w = 0 or 1 calls one model only: the very ops of sample_ddim on the same inputs, bit for bit
    assert torch.equal(sample_aig(base, lora, x, sigmas, [0] * 4), sample_ddim(base, x, sigmas))
    assert torch.equal(sample_aig(base, lora, x, sigmas, [1] * 4), sample_ddim(lora, x, sigmas))
    with pytest.raises(ValueError, match="one weight per step"):
        Mixed(base, lora, sigmas, [0.5])


def random_lora_file(comfyui, name, seed=0, rank=4):
    """A kohya LoRA (ldm module names) on every attention projection of the tiny SD1.5 UNet, random up and down."""
    import comfy.sd
    from tiny_models import tiny_sd15_checkpoint

    path = comfyui.base_dir / "models" / "loras" / name
    if path.exists():
        return name
    model = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_checkpoint(seed=0)), output_vae=False,
                                                  output_clip=False)[0]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, module in model.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(key.endswith(k) for k in ("to_q", "to_k", "to_v", "to_out.0")):
            stem = "lora_unet_" + key.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.2
            tensors[f"{stem}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.2
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return name


def aig_prompt(ckpt, lora, steps=5):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor fox in the snow", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                                "strength_model": 1.0}},
    }
    common = {"positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 7, "steps": steps,
              "cfg": 5.0}
    nodes = {
        "base": ("DRaFTDDIMSampler", {"model": ["1", 0]}),
        "lora": ("DRaFTDDIMSampler", {"model": ["5", 0]}),
        "aig_w0": ("DRaFTAIGSampler", {"schedule": "step_f", "p": 1.0, "f": 1.0}),
        "aig_w1": ("DRaFTAIGSampler", {"schedule": "step_f", "p": 1.0, "f": 0.0}),
        "aig_linear": ("DRaFTAIGSampler", {"schedule": "linear", "p": 1.0, "f": 0.5}),
    }
    for i, (name, (cls, extra)) in enumerate(nodes.items()):
        if cls == "DRaFTAIGSampler":
            extra = dict(extra, base_model=["1", 0], model=["5", 0])
        prompt[str(10 + i)] = {"class_type": cls, "inputs": dict(common, **extra)}
        prompt[str(20 + i)] = {"class_type": "SaveLatent", "inputs": {"samples": [str(10 + i), 0],
                                                                       "filename_prefix": f"aig/{name}"}}
    return prompt, list(nodes)


def test_aig_sampler_node_equals_the_ddim_sampler_at_w0_and_w1(comfyui, tiny_sd15):
    lora = random_lora_file(comfyui, "aig_random_lora.safetensors")
    prompt, names = aig_prompt(tiny_sd15, lora)
    history = comfyui.run(prompt)
    out = {}
    for i, name in enumerate(names):
        (info,) = history["outputs"][str(20 + i)]["latents"]
        out[name] = load_file(str(comfyui.output_path(info)))["latent_tensor"]
    gap = (out["lora"] - out["base"]).abs().max().item()
    print(f"max |LoRA - base| = {gap:.3g}; linear AIG - base {(out['aig_linear'] - out['base']).abs().max():.3g}, "
          f"- LoRA {(out['aig_linear'] - out['lora']).abs().max():.3g}")
    assert gap > 0.05  # the LoRA changes the sample
    assert torch.equal(out["aig_w0"], out["base"])  # w = 0 throughout: the base model's DDIM, bit for bit
    assert torch.equal(out["aig_w1"], out["lora"])  # w = 1 throughout: LoraLoader's MODEL's DDIM, bit for bit
    for other in ("base", "lora"):  # a real mix lies strictly apart from both
        assert (out["aig_linear"] - out[other]).abs().max() > 1e-3 * gap
    assert torch.isfinite(out["aig_linear"]).all()


@pytest.mark.slow
def test_aig_sweep_node_rows_match_the_strength_sweep_at_the_ends(comfyui, tiny_sd15):
    """step_f with f = 0 is the LoRA throughout and f = 1 the base model: the AIG sweep's rows equal the LoRA strength
    sweep's rows at strength 1 and 0 (same prompts, seeds, reward)."""
    lora = random_lora_file(comfyui, "aig_random_lora.safetensors")
    common = {"clip": ["1", 1], "vae": ["1", 2], "reward": ["2", 0], "prompts": "a watercolor fox",
              "negative_prompt": "", "seeds": 2, "first_seed": 5, "steps": 3, "cfg": 5.0, "width": 64, "height": 64}
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15}},
        "2": {"class_type": "DRaFTBuiltinReward", "inputs": {"kind": "brightness"}},
        "3": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                                "strength_model": 1.0}},
        "4": {"class_type": "DRaFTLoRAStrengthSweep", "inputs": dict(common, model=["1", 0], lora_name=lora,
                                                                       strengths="1, 0")},
        "5": {"class_type": "DRaFTAIGSweep", "inputs": dict(common, base_model=["1", 0], model=["3", 0],
                                                              schedule="step_f", values="0, 1")},
    }
    history = comfyui.run(prompt)
    strength_rows, aig_rows = history["outputs"]["4"]["rows"], history["outputs"]["5"]["rows"]
    assert [r["f"] for r in aig_rows] == [0.0, 1.0]
    for ours, theirs in zip(aig_rows, strength_rows):
        assert ours["reward"] == pytest.approx(theirs["reward"], rel=1e-6, abs=1e-7)
        assert ours["diversity"] == pytest.approx(theirs["diversity"], rel=1e-5)
    assert strength_rows[0]["reward"] != pytest.approx(strength_rows[1]["reward"], rel=1e-4)
