"""Flow-matching models (Flux.1 dev and schnell, SD3.5, Z-Image) through the real ComfyUI: loaded by its own loaders
and model detection (`tiny_flow`), sampled, trained through the node, their LoRAs loaded by LoraLoaderModelOnly."""
import json
import logging
import math
import os

import pytest
import torch
from tiny_flow import FlowTextStandIn, tiny_flow_vae_file, tiny_flux_file, tiny_sd35_file, tiny_zimage

from comfy_draft import policy, rewards
from comfy_draft.lora import load_kohya_file

# family -> (the file's loader, ComfyUI's config class, kohya's ss_base_model_version, the LoRA's module names, cfg)
FAMILIES = {
    "flux_dev": (lambda: tiny_flux_file(guidance=True), "Flux", "flux1", ("double_blocks", "single_blocks"), 1.0),
    "flux_schnell": (lambda: tiny_flux_file(guidance=False), "FluxSchnell", "flux1", ("double_blocks", "single_blocks"),
                     1.0),
    "sd35": (tiny_sd35_file, "SD3", "sd3", ("joint_blocks",), 2.0),  # real CFG: the negative pass runs too
    "zimage": (None, "ZImage", "z_image", ("layers", "noise_refiner", "context_refiner"), 1.0),
}
TEXT = {"flux_dev": "flux", "flux_schnell": "flux", "sd35": "sd3", "zimage": "zimage"}
PROMPTS = ["a lighthouse at dusk", "a bowl of ramen"]


def link(comfyui, folder, path):
    """`path` in ComfyUI's models folder `folder`, by its file name there."""
    import pathlib
    target = pathlib.Path(comfyui.folder_paths.get_folder_paths(folder)[0]) / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(path)
    return path.name


@pytest.fixture(scope="module")
def flow_objects(comfyui):
    """family -> (MODEL, CLIP stand-in, VAE) as UNETLoader and VAELoader make them."""
    import nodes
    vae_name = link(comfyui, "vae", tiny_flow_vae_file())
    cache = {}

    def objects(family):
        if family not in cache:
            with torch.inference_mode():  # as ComfyUI runs its loader nodes
                writer = FAMILIES[family][0]
                model = (nodes.UNETLoader().load_unet(link(comfyui, "diffusion_models", writer()), "default")[0]
                         if writer else tiny_zimage())
                cache[family] = (model, FlowTextStandIn(TEXT[family]), nodes.VAELoader().load_vae(vae_name)[0])
        return cache[family]
    return objects


def conditioning(clip, prompts):
    conds = [clip.encode_from_tokens_scheduled(p) for p in prompts]
    extra = {k: torch.cat([c[0][1][k] for c in conds]) for k in conds[0][0][1]}
    return [[torch.cat([c[0][0] for c in conds]), extra]]


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_sampler_matches_ksampler_euler_simple(comfyui, flow_objects, family):
    import nodes
    model, clip, _ = flow_objects(family)
    assert type(model.model.model_config).__name__ == FAMILIES[family][1]  # ComfyUI's own detection
    positive, negative = conditioning(clip, PROMPTS), conditioning(clip, ["", ""])
    latent = {"samples": torch.zeros(2, 16, 8, 8)}
    cfg = FAMILIES[family][4]
    with torch.inference_mode():
        (ref,) = nodes.KSampler().sample(model, 7, 4, cfg, "euler", "simple", positive, negative, latent)
        (ours,) = comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTDDIMSampler"]().sample(model, positive, negative, latent,
                                                                                  7, 4, cfg)
    ref, ours = ref["samples"], ours["samples"]
    print(f"{family}: max |KSampler euler - DRaFT| = {(ref - ours).abs().max():.2e}")
    assert ref.std() > 0.05
    # The same ops in the same order: only summation-order noise, far below the sample's own scale.
    assert (ref - ours).abs().max() <= 1e-5 * ref.abs().max()


def test_flow_noising_is_the_models_own(comfyui, flow_objects):
    """DRaFT-LV's re-noising and P-GRAFT's training targets use ComfyUI's `noise_scaling` for the model:
    (1 - sigma) x0 + sigma eps on a flow model, not the eps models' x0 + sigma eps."""
    from comfy_draft.backends.comfyui import SamplingBackend
    from comfy_draft.sampling import denoise_renoised
    model, clip, vae = flow_objects("flux_dev")
    backend = SamplingBackend(model, clip, vae)
    assert backend.flow
    g = torch.Generator().manual_seed(0)
    x0, eps, sigma = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g), torch.tensor(0.3)
    expected = model.get_model_object("model_sampling").noise_scaling(sigma, eps, x0)
    torch.testing.assert_close(expected, 0.7 * x0 + 0.3 * eps)
    seen = []
    denoise_renoised(lambda x, s: seen.append(x) or x, x0, sigma, [eps], recompute=False, noised=backend.noised)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)

    # P-GRAFT's loss vanishes at the exact score of one accepted point x_t under the flow's forward process:
    # from x_t at sigma_t, x_s = r x_t + delta eps with r = (1 - s) / (1 - s_t), delta^2 = s^2 - r^2 s_t^2.
    x_t = torch.randn(4, 16, 3, 3, generator=g, dtype=torch.float64).float()
    sigma_t, sigma = 0.4, torch.tensor([0.5, 0.7, 0.9, 0.45])
    s = sigma.view(-1, 1, 1, 1)
    r = (1 - s) / (1 - sigma_t)
    delta2 = s ** 2 - (r * sigma_t) ** 2

    def score_model(x_s, _):  # (1 - s) x0_hat = x_s + s^2 * score, score = (r x_t - x_s) / delta^2
        return (x_s + s ** 2 * (r * x_t - x_s) / delta2) / (1 - s)
    noise = torch.randn(x_t.shape, generator=g)
    assert policy.shaped_denoising_loss(score_model, x_t, sigma_t, sigma, noise, backend.noised) < 1e-9
    # ... and does not with the eps models' noising (the loss is not the same whatever the process)
    assert policy.shaped_denoising_loss(score_model, x_t, sigma_t, sigma, noise) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_flow_family_trains_through_the_node_and_its_lora_loads_in_comfyui_with_every_key(comfyui, flow_objects,
                                                                                          family, caplog):
    import nodes
    from comfy_draft.backends.comfyui import TrainingBackend
    model, clip, vae = flow_objects(family)
    cfg = FAMILIES[family][4]
    node = comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTTrainLoRA"]()
    usual = family == "flux_schnell"  # sampling_steps and cfg 0: the family's usual (schnell: 4 steps, cfg 1)
    with torch.inference_mode():
        out = node.train(model, clip, vae, rewards.builtin_reward("saturation"), "\n".join(PROMPTS), "",
                         variant="draft-lv", training_steps=2, sampling_steps=0 if usual else 2,
                         cfg=0.0 if usual else cfg, width=64, height=64, batch_size=1, learning_rate=0.05, rank=4,
                         seed=0, lora_name=f"draft_{family}")
    patched, path, _, final_reward = out["result"]
    assert math.isfinite(final_reward)
    # ComfyUI's Flux blocks add into tensors their backward needs (`img += ...`): "auto" recomputes each call there,
    # found by the memory probe; SD3.5 and Z-Image train without recomputation when memory allows.
    in_place = "changes tensors in place that its backward needs: it trains only recomputed"
    assert (in_place in out["ui"]["text"][0]) == family.startswith("flux"), out["ui"]["text"][0]
    state_dict, metadata = load_kohya_file(path)
    assert metadata["ss_base_model_version"] == FAMILIES[family][2]
    config = json.loads(metadata["comfy_draft_config"])
    assert (config["sampling_steps"], config["cfg"]) == ((4, 1.0) if usual else (2, cfg))
    modules = {k.rsplit(".", 2)[0] for k in state_dict}
    assert all(m.startswith(tuple("lora_unet_" + p for p in FAMILIES[family][3])) for m in modules), sorted(modules)

    name = os.path.relpath(path, comfyui.folder_paths.get_folder_paths("loras")[0])
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        (theirs,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(theirs.patches) == len(modules)  # every module of the file patched a weight

    # The trained LoRA as training ran it (bypass hooks) samples what ComfyUI's loader (merged weights) samples.
    backend = TrainingBackend(model, clip, vae)
    backend.add_loras(rank=4).load_kohya_state_dict(state_dict)
    positive, negative = conditioning(clip, PROMPTS), conditioning(clip, ["", ""])
    latent = {"samples": torch.zeros(2, 16, 8, 8)}
    sampler = comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTDDIMSampler"]()
    with torch.inference_mode():
        ours, merged, base = (sampler.sample(m, positive, negative, latent, 3, 2, cfg)[0]["samples"]
                              for m in (backend.model, theirs, model))
    scale = base.abs().max()
    print(f"{family}: LoRA effect {(ours - base).abs().max() / scale:.2e}, "
          f"|LoraLoader - trained| {(merged - ours).abs().max() / scale:.2e} (relative)")
    assert (ours - base).abs().max() > 1e-3 * scale
    assert (merged - ours).abs().max() <= 1e-3 * scale


def test_unsupported_models_and_ddpo_on_flow_are_refused_before_any_work(comfyui, flow_objects):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from tiny_flow import TINY_ZIMAGE

    from comfy_draft.backends.comfyui import SUPPORTED, TrainingBackend, check_model
    from comfy_draft.trainer import TrainConfig, Trainer

    def patcher(config):
        config.set_inference_dtype(torch.float32, None)
        return comfy.model_patcher.ModelPatcher(config.get_model({}), load_device=torch.device("cpu"),
                                                offload_device=torch.device("cpu"))
    video = patcher(comfy.supported_models.WAN21_T2V(dict(image_model="wan2.1", model_type="t2v", dim=64, ffn_dim=128,
                                                           num_heads=2, num_layers=1, text_dim=64)))
    lumina2 = patcher(comfy.supported_models.Lumina2(dict(TINY_ZIMAGE, z_image_modulation=False)))
    for model in (video, lumina2):
        with pytest.raises(ValueError, match="DRaFT trains and samples SD1.x, SD2.x, SDXL, SD3") as e:
            check_model(model)
        assert SUPPORTED in str(e.value)

    model, clip, vae = flow_objects("flux_schnell")
    config = TrainConfig(prompts=PROMPTS, variant="ddpo", steps=1, sampling_steps=2, width=64, height=64)
    with pytest.raises(ValueError, match="DDPO needs a stochastic sampling step"):
        Trainer(TrainingBackend(model, clip, vae), rewards.builtin_reward("saturation"), config)


def test_flow_prompts_batch_only_at_equal_token_length(comfyui, flow_objects):
    """A flow model's text tokens share one attention with its image tokens: repeating tokens to a common length
    (ComfyUI's way, exact for SD's cross-attention) would change the samples, so such prompts batch only when their
    lengths match; SD's still repeat."""
    from comfy_draft.backends.comfyui import SamplingBackend, batch_conditioning

    def cond(tokens):
        return [[torch.randn(1, tokens, 8), {"attention_mask": torch.ones(1, tokens)}]]
    batched = batch_conditioning([cond(5), cond(5)], repeat=False)
    assert batched[0][0].shape == (2, 5, 8) and batched[0][1]["attention_mask"].shape == (2, 5)
    sd = [[[torch.randn(1, n, 8), {}]] for n in (2, 3)]  # SD's cross-attention: repeated to 6 tokens
    assert batch_conditioning(sd)[0][0].shape == (2, 6, 8)
    model, clip, vae = flow_objects("zimage")
    backend = SamplingBackend(model, clip, vae)
    backend._prompt_cache.update({"short": cond(5), "long": cond(7)})
    with pytest.raises(ValueError, match="batch_size 1"):
        backend.encode(["short", "long"])


def test_training_through_fp8_stored_weights_gives_the_gradient_of_their_values(comfyui, flow_objects):
    """UNETLoader's fp8_e4m3fn storage (ComfyUI casts each weight to the compute dtype as it is used): the LoRA's
    gradient equals that of the same values held in float32, bit for bit (the same float32 ops on the same numbers:
    on the CPU both compute in float32)."""
    import nodes
    from tiny_flow import tiny_flux_fp8_values_file

    from comfy_draft.backends.comfyui import TrainingBackend
    _, clip, vae = flow_objects("flux_dev")
    name = link(comfyui, "diffusion_models", tiny_flux_fp8_values_file())
    grads = {}
    for storage in ("fp8_e4m3fn", "default"):
        with torch.inference_mode():
            model = nodes.UNETLoader().load_unet(name, storage)[0]
        assert {p.dtype for p in model.model.diffusion_model.parameters()} == (
            {torch.float8_e4m3fn} if storage != "default" else {torch.float32})
        backend = TrainingBackend(model, clip, vae)
        torch.manual_seed(0)  # the same random down weights
        loras = backend.add_loras(rank=4)
        with torch.no_grad():
            for lora in loras.values():  # non-zero up weights: both factors get a gradient
                lora.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))

        def fn(m, x, sigmas):
            m(x, sigmas[1] * x.new_ones(x.shape[0])).float().square().sum().backward()
            return x
        noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode(False), torch.enable_grad():
            backend.run(fn, [PROMPTS[0]], "", 1.0, noise, 4, recompute=True)
        grads[storage] = torch.cat([torch.cat([lo.up.grad.flatten(), lo.down.grad.flatten()]) for lo in loras.values()])
    assert grads["default"].abs().max() > 0
    torch.testing.assert_close(grads["fp8_e4m3fn"], grads["default"], rtol=0, atol=0)


def test_flux_lora_loads_in_diffusers_with_every_module_converted(comfyui, tmp_path):
    """diffusers' converter for kohya Flux LoRAs (`FluxPipeline.lora_state_dict`) maps every module of a LoRA file
    the pack writes for Flux.1 dev onto diffusers' Flux transformer: the fused qkv split into to_q/k/v, the single
    blocks' linear1 into q/k/v and the MLP, every converted key a Linear of the transformer. At real size (the
    converter's splits assume Flux's widths): both models on the meta device, the LoRA at rank 1."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from tiny_flow import TINY_FLUX

    from comfy_draft.backends.comfyui import FLUX_TARGETS
    from comfy_draft.lora import LoRASet, kohya_name
    real = dict(TINY_FLUX, hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38)
    with torch.device("meta"):
        flux = Flux(**real, guidance_embed=True, operations=comfy.ops.disable_weight_init)
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # Flux.1 dev's defaults
    suffixes = tuple("." + t for t in FLUX_TARGETS)
    shapes = {kohya_name(n): m.weight.shape for n, m in flux.named_modules() if n.endswith(suffixes)}
    path = LoRASet(shapes, rank=1).save(tmp_path / "flux.safetensors")
    converted = {k.split(".lora_")[0].removeprefix("transformer.") for k in FluxPipeline.lora_state_dict(str(path))}
    linears = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert converted <= linears, sorted(converted - linears)
    # image and text streams of each double block: q, k, v, out, 2 MLP; each single block: q, k, v, MLP in, out
    assert len(converted) == 19 * 12 + 38 * 5, len(converted)


def test_zimage_lora_loads_in_diffusers_with_every_module_converted(comfyui, tmp_path):
    """diffusers' converter for non-diffusers Z-Image LoRAs (`ZImagePipeline.lora_state_dict`) maps every module of
    a LoRA file the pack writes for Z-Image onto a Linear of diffusers' Z-Image transformer of the same shape, and
    the converted LoRA is the same weight change: the fused qkv split into to_q/k/v, alpha / rank folded in. At real
    size (Z-Image's 30 layers and 2 + 2 refiners, width 3840), rank 2 with alpha 1, random up and down."""
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from safetensors.torch import load_file
    from tiny_flow import TINY_ZIMAGE

    from comfy_draft.backends.comfyui import FLOW_FAMILIES
    from comfy_draft.lora import LoRASet, kohya_name
    targets = next(f.targets for f in FLOW_FAMILIES if f.version == "z_image")
    real = dict(TINY_ZIMAGE, dim=3840, n_heads=30, n_kv_heads=30, n_layers=30, n_refiner_layers=2)
    with torch.device("meta"):
        comfy_model = NextDiT(**real, operations=comfy.ops.disable_weight_init)
        transformer = ZImageTransformer2DModel()  # Z-Image's defaults
    suffixes = tuple("." + t for t in targets)
    paths = {n: m.weight.shape for n, m in comfy_model.named_modules() if n.endswith(suffixes)}
    assert len(paths) == 34 * 5
    loras = LoRASet({kohya_name(n): shape for n, shape in paths.items()}, rank=2, alpha=1.0)
    with torch.no_grad():
        for lora in loras.values():
            lora.up.normal_()
    path = loras.save(tmp_path / "zimage.safetensors")
    written = {k: v.double() for k, v in load_file(path).items()}
    converted = ZImagePipeline.lora_state_dict(str(path))
    converted = {k.removeprefix("transformer."): v.double() for k, v in converted.items()}
    linears = {n: m.weight.shape for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len({k.split(".lora_")[0] for k in converted}) == 34 * 7  # per block: to_q, to_k, to_v, to_out.0, w1-w3

    def diffusers_delta(module, x):
        """The converted LoRA's weight change on x (a random projection of the matrix: no 3840^2 products)."""
        b, a = converted.pop(module + ".lora_B.weight"), converted.pop(module + ".lora_A.weight")
        assert (b.shape[0], a.shape[1]) == linears[module], module
        return b @ (a @ x)

    for module in paths:  # ComfyUI's module path -> diffusers' (the original repository's names -> diffusers')
        name = kohya_name(module)
        up, down = written[name + ".lora_up.weight"], written[name + ".lora_down.weight"]
        x = torch.randn(down.shape[1], 4, dtype=torch.float64)
        delta = written[name + ".alpha"] / 2 * up @ (down @ x)
        if module.endswith("attention.qkv"):
            split = torch.cat([diffusers_delta(module.replace(".qkv", ".to_" + p), x) for p in "qkv"])
        else:
            split = diffusers_delta(module.replace("attention.out", "attention.to_out.0"), x)
        # diffusers folds alpha / rank = 1/2 into the fp16 down: halving an fp16 subnormal rounds it by <= 2^-25
        bound = 2 ** -25 * up.abs().sum(1, keepdim=True) * x.abs().sum(0) + 1e-12 * delta.abs().max()
        assert ((split - delta).abs() <= bound).all(), module
    assert not converted, sorted(converted)  # every converted key was one of the file's modules


def test_flow_inversion_returns_the_latents_through_sampler_custom_advanced(comfyui, flow_objects):
    """Inverse noise correction on a flow model: the noise DRaFT Invert To Noise finds for Flux.1 schnell latents,
    sampled by ComfyUI's own CFGGuider with the `euler` sampler on the node's sigmas (what SamplerCustomAdvanced
    runs), gives the latents back. (16 steps: at schnell's usual 4 the random tiny model is too steep for the
    fixed-point iteration.)"""
    import comfy.samplers

    from comfy_draft.correction import relative_error
    model, clip, _ = flow_objects("flux_schnell")
    positive, negative = conditioning(clip, PROMPTS[:1]), conditioning(clip, [""])
    latent = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5}
    with torch.inference_mode():
        out = comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTInvertToNoise"]().invert(
            [model], [positive], [negative], [latent], [16], [0.0], [30], [1e-6], [2])
        noise, sigmas, info = out["result"][0]
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(1.0)
        returned = guider.sample(noise, torch.zeros_like(latent["samples"]), comfy.samplers.sampler_object("euler"),
                                 sigmas, seed=0)
    print(out["ui"]["text"][0])
    assert info["cfg"] == 1.0 and len(sigmas) == 17 and sigmas[0] == 1  # cfg 0: schnell's usual, 1
    assert info["round_trip_error"] < 1e-3 and relative_error(returned, latent["samples"]) < 1e-3
