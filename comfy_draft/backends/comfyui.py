"""ComfyUI MODEL / CONDITIONING / LATENT -> the library's sampler, through ComfyUI's own CFGGuider.

Running `sample_ddim` as a `comfy.samplers.KSAMPLER` gives classifier-free guidance, SDXL's extra
conds, hooks, other LoRAs and inpainting masks from ComfyUI itself, exactly as its KSampler does.
"""
import functools

import comfy.model_sampling
import comfy.sample
import comfy.samplers

from ..sampling import check_grad_steps, sample_ddim


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


def ddim_sampler(grad_steps=0, checkpoint=True, within=None):
    """`sample_ddim` as a ComfyUI SAMPLER object (with the 'ddim' sampler's inpainting-noise convention).

    within: called with the final latent (model space, before `process_latent_out`) while ComfyUI's
        sampling context is still alive (models loaded and patched, conds prepared). Differentiated
        steps can only be recomputed (gradient checkpointing) or replayed there, so a training step
        computes its loss and calls `backward()` inside `within`.
    """
    def run(model, x, sigmas, **kwargs):
        x = sample_ddim(model, x, sigmas, grad_steps=grad_steps, checkpoint=checkpoint, **kwargs)
        if within is not None:
            within(x)
        return x

    return comfy.samplers.KSAMPLER(run, inpaint_options={"random": True})


def sample(model, positive, negative, latent, seed, steps, cfg, grad_steps=0, checkpoint=True, within=None,
           noise=None, callback=None, disable_pbar=True):
    """DDIM (eta = 0) from a ComfyUI LATENT dict through ComfyUI's CFGGuider; returns the denoised
    latent on the model's load device. `noise` defaults to ComfyUI's seeded noise (as KSampler's).

    With `grad_steps` K > 0 the last K steps are differentiated; the backward pass must run in
    `within` (see `ddim_sampler`), because ComfyUI releases its sampling state when sampling returns.
    """
    check_model(model)
    sigmas = ddim_sigmas(model, steps)
    check_grad_steps(grad_steps, len(sigmas) - 1)
    if grad_steps and within is None:
        raise ValueError("grad_steps > 0 needs `within`: run the loss and backward() inside ComfyUI's sampling context")
    latent_image = prepare_latent(model, latent)
    if noise is None:
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    return comfy.samplers.sample(
        model, noise, positive, negative, cfg, model.load_device, ddim_sampler(grad_steps, checkpoint, within),
        sigmas, model_options=model.model_options, latent_image=latent_image,
        denoise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=disable_pbar, seed=seed)
