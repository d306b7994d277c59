"""ComfyUI MODEL / CONDITIONING / LATENT -> the library's sampler, through ComfyUI's own CFGGuider.

Running `sample_ddim` as a `comfy.samplers.KSAMPLER` gives classifier-free guidance, SDXL's extra
conds, hooks, other LoRAs and inpainting masks from ComfyUI itself, exactly as its KSampler does.
"""
import functools

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import torch

from ..sampling import sample_ddim


def check_model(model):
    """Raise unless `model` (a ModelPatcher) is a discrete-time eps- or v-prediction diffusion model."""
    ms = model.get_model_object("model_sampling")
    ok = (
        isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete)
        and isinstance(ms, comfy.model_sampling.EPS)  # V_PREDICTION is a subclass
        and not isinstance(ms, (comfy.model_sampling.EDM, comfy.model_sampling.X0,
                                comfy.model_sampling.ModelSamplingDiscreteEDM))
    )
    if not ok:
        raise ValueError(
            f"DRaFT's DDIM sampler needs a discrete-time eps- or v-prediction model (SD1.x, SD2.x, SDXL); "
            f"got {type(model.model).__name__} with {type(ms).__name__} sampling")


def ddim_sigmas(model, steps):
    """ComfyUI's 'ddim_uniform' schedule: timesteps 1 + k * (1000 // steps), then sigma = 0.

    Like ComfyUI's KSampler it yields one extra step when 1000 % steps leaves room (e.g. 7 -> 8).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)


def prepare_latent(model, latent):
    """The LATENT's samples with empty latents fixed up as ComfyUI's KSampler does, channels checked."""
    latent_image = comfy.sample.fix_empty_latent_channels(
        model, latent["samples"], latent.get("downscale_ratio_spacial"), latent.get("downscale_ratio_temporal"))
    latent_format = model.get_model_object("latent_format")
    if latent_image.shape[1] != latent_format.latent_channels:
        raise ValueError(
            f"the latent has {latent_image.shape[1]} channels but {type(model.model).__name__} expects "
            f"{latent_format.latent_channels} ({type(latent_format).__name__}); make the latent for this model")
    return latent_image


def function_sampler(fn):
    """A ComfyUI SAMPLER that runs `fn(model, x, sigmas, callback) -> latent` inside ComfyUI's sampling
    context, where `model(x, sigma)` is the CFG-guided x0 predictor (with ComfyUI's 'ddim' sampler's
    inpainting-noise convention).

    ComfyUI loads and patches the models and prepares the conds for the duration of sampling only, so
    anything that re-runs the model (a checkpointed backward pass, DRaFT-LV's extra denoising) happens
    inside `fn`.
    """
    def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return fn(functools.partial(model, **(extra_args or {})), x, sigmas, callback)

    return comfy.samplers.KSAMPLER(sampler_function, inpaint_options={"random": True})


def run_guided(model, positive, negative, cfg, sigmas, fn, latent_image, noise, seed=0, denoise_mask=None,
               callback=None, disable_pbar=True):
    """`fn` (see `function_sampler`) through ComfyUI's CFGGuider; returns its latent after ComfyUI's
    output processing, on the model's load device."""
    return comfy.samplers.sample(
        model, noise, positive, negative, cfg, model.load_device, function_sampler(fn), sigmas,
        model_options=model.model_options, latent_image=latent_image, denoise_mask=denoise_mask,
        callback=callback, disable_pbar=disable_pbar, seed=seed)


def sample(model, positive, negative, latent, seed, steps, cfg, callback=None, disable_pbar=True):
    """DDIM (eta = 0) from a ComfyUI LATENT dict, noise drawn as KSampler draws it, without gradients."""
    check_model(model)
    sigmas = ddim_sigmas(model, steps)
    latent_image = prepare_latent(model, latent)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    with torch.no_grad():
        return run_guided(model, positive, negative, cfg, sigmas,
                          lambda m, x, s, cb: sample_ddim(m, x, s, callback=cb), latent_image, noise, seed,
                          latent.get("noise_mask"), callback, disable_pbar)
