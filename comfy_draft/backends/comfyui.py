"""ComfyUI MODEL / CONDITIONING / LATENT -> the library's sampler, through ComfyUI's own CFGGuider.

Running `sample_ddim` as a `comfy.samplers.KSAMPLER` gives classifier-free guidance, SDXL's extra
conds, hooks, other LoRAs and inpainting masks from ComfyUI itself, exactly as its KSampler does.
"""
import copy
import functools
import math

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.supported_models
import comfy.utils
import torch

from ..sampling import checkpointed, sample_ddim


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


def base_model_version(model):
    """kohya's `ss_base_model_version` for a ComfyUI model (its distilled and variant families included)."""
    config = model.model.model_config
    if isinstance(config, comfy.supported_models.SDXL):  # also SSD-1B, Segmind Vega, KOALA
        return "sdxl_base_v1-0"
    return "sd_v2" if isinstance(config, comfy.supported_models.SD20) else "sd_v1"


def batch_conditioning(conds):
    """One CONDITIONING for a batch from per-prompt ones; token lengths are brought to their least
    common multiple by repetition, as ComfyUI batches conds (attention is unchanged by it)."""
    tensors = [c[0][0] for c in conds]
    length = math.lcm(*(t.shape[1] for t in tensors))
    extra = dict(conds[0][0][1])
    if "pooled_output" in extra:
        extra["pooled_output"] = torch.cat([c[0][1]["pooled_output"] for c in conds])
    return [[torch.cat([t.repeat(1, length // t.shape[1], 1) for t in tensors]), extra]]


class SamplingBackend:
    """A ComfyUI MODEL + CLIP + VAE as used as they are, without gradients (held-out samples, sweeps):
    prompts encoded by the CLIP, DDIM through ComfyUI's guider, images decoded by ComfyUI's VAE."""

    def __init__(self, model, clip, vae):
        check_model(model)
        self.model, self.clip, self.vae = model, clip, vae
        self.latent_format = model.get_model_object("latent_format")
        self.device = torch.device(model.load_device)
        self._prompt_cache = {}

    def encode(self, prompts):
        for p in dict.fromkeys(prompts):
            if p not in self._prompt_cache:
                with torch.inference_mode(False), torch.no_grad():
                    cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(p))
                    # normal (non-inference) copies: to_k/to_v save their input for backward
                    self._prompt_cache[p] = [[cond[0][0].clone(),
                                              {k: v.clone() if torch.is_tensor(v) else v for k, v in cond[0][1].items()}]]
        return batch_conditioning([self._prompt_cache[p] for p in prompts])

    def latent_shape(self, batch, height, width):
        f = self.latent_format.spacial_downscale_ratio
        return (batch, self.latent_format.latent_channels, height // f, width // f)

    def run(self, fn, prompts, negative_prompt, cfg, noise, steps):
        """`fn(model, x_T, sigmas)` inside ComfyUI's sampling context, with the CFG-guided x0 predictor."""
        sigmas = ddim_sigmas(self.model, steps)
        positive, negative = self.encode(prompts), self.encode([negative_prompt] * len(prompts))
        return run_guided(self.model, positive, negative, cfg, sigmas, lambda m, x, s, callback: fn(m, x, s),
                          torch.zeros(noise.shape), noise)

    def decode(self, x0, checkpoint=False):
        """Images (B, 3, H, W) in [0, 1] from ComfyUI's VAE decode (no gradient)."""
        return self.vae.decode(self.latent_format.process_out(x0)).movedim(-1, 1).to(x0.device)


def trainable_copy(model):
    """A clone of a MODEL (same patches, hooks, options) with its own weights made outside inference mode.

    Reloaded from its file when the loader recorded one, as ComfyUI's TrainLoraNode does; otherwise
    (custom loaders) deep-copied from the unpatched weights in memory, as ComfyUI's multi-GPU cloning
    does, so that the clone's patches are applied once, not on top of already patched weights.
    """
    if model.cached_patcher_init is not None:
        return model.clone(force_deepcopy=True)
    comfy.model_management.unload_model_and_clones(model)  # puts the unpatched weights back
    config = model.model.model_config  # shared: ComfyUI's config objects answer None to any attribute, deepcopy's too
    clone = model.clone(model_override=(copy.deepcopy(model.model, {id(config): config}), ({}, {}, {}, set())))
    clone.hook_backup = {}
    return clone


class TrainingBackend(SamplingBackend):
    """A ComfyUI MODEL + CLIP + VAE for `Trainer`.

    ComfyUI made these inside `torch.inference_mode`, and inference tensors cannot be saved for
    backward, so training uses a fresh copy of the model (as ComfyUI's own TrainLoraNode does), a copy
    of the VAE decoder and cloned text conditioning. LoRAs attach as ModelPatcher weight wrappers,
    ComfyUI's own mechanism, so guidance, SDXL conds and other patches keep working.
    `copy_model=False` trains `model` itself, for a caller that loaded it outside inference mode and
    uses it for nothing else (the command line): one copy of the weights instead of two.
    """

    def __init__(self, model, clip, vae, copy_model=True):
        check_model(model)
        if not copy_model and any(p.is_inference() for p in model.model.parameters()):
            raise ValueError("copy_model=False needs a model loaded outside torch.inference_mode")
        with torch.inference_mode(False):
            if copy_model:
                model = trainable_copy(model)
            model.model.requires_grad_(False)
            vae_model = vae.first_stage_model  # copied without its encoder, which training never runs
            self.vae_model = copy.deepcopy(vae_model, {id(getattr(vae_model, "encoder", None)): None})
            self.vae_model.requires_grad_(False).eval()
        super().__init__(model, clip, vae)
        self.vae_dtype = vae.vae_dtype
        self.base_model_version = base_model_version(self.model)
        self.loras = None

    def add_loras(self, rank, alpha=None, resnets=False):
        from ..lora import LoRASet, is_target, kohya_name

        unet = self.model.model.diffusion_model
        targets = [n for n, m in unet.named_modules() if is_target(n, resnets) and hasattr(m, "weight_function")]
        # kohya's names: diffusers-style module paths for SD1.x/SD2.x, ldm paths for SDXL.
        to_diffusers = {v[:-len(".weight")]: k[:-len(".weight")]
                        for k, v in comfy.utils.unet_to_diffusers(self.model.model.model_config.unet_config).items()}
        use_ldm = self.base_model_version.startswith("sdxl")
        names = {n: kohya_name(n if use_ldm else to_diffusers.get(n, n)) for n in targets}
        with torch.inference_mode(False):
            self.loras = LoRASet({names[n]: unet.get_submodule(n).weight.shape for n in targets}, rank, alpha)
            self.loras.to(self.device)
        for n in targets:
            self.model.add_weight_wrapper(f"diffusion_model.{n}.weight", self.loras[names[n]])
        return self.loras

    def modules(self):
        """The modules whose weights sit on the device while training (for memory estimates)."""
        return [self.model.model.diffusion_model, self.vae_model]

    def decode(self, x0, checkpoint=True):
        """Images (B, 3, H, W) in [0, 1], differentiable; the decoder is recomputed in backward."""
        self.vae_model.to(self.device)

        def decode(latent):
            # In ComfyUI's dtype for this VAE (never fp16 for SD VAEs, which overflow in it), whatever the autocast.
            with torch.autocast(self.device.type, enabled=False):
                return self.vae_model.decode(self.latent_format.process_out(latent).to(self.vae_dtype)).float()
        return ((checkpointed(decode, x0, enabled=checkpoint) + 1) / 2).clamp(0, 1)
