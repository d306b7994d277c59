"""A diffusers UNet + its noise schedule -> the library's `model(x, sigma) -> x0_hat` interface.

Used outside ComfyUI (Python, the command line) with the same sampler as the ComfyUI backend. Sigma
space follows k-diffusion / ComfyUI: for a DDPM schedule x = x_vp / sqrt(alpha_bar) = x0 + sigma * eps,
sigma = sqrt((1 - alpha_bar) / alpha_bar); for a rectified flow (`FlowDenoiser`) x = (1 - sigma) x0 + sigma * eps.
"""
import contextlib
import functools

import torch

from .. import blockwise
from ..sampling import check_grad_steps, noised, recomputed, sample_ddim


class DiffusersDenoiser(torch.nn.Module):
    """Wraps a diffusers `UNet2DConditionModel` (eps- or v-prediction) as an x0 predictor in sigma space."""

    def __init__(self, unet, alphas_cumprod, prediction_type="epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        # float64 and not a buffer, so module-wide dtype casts (.half()) leave the schedule exact
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()

    @classmethod
    def from_scheduler(cls, unet, scheduler):
        """From any diffusers DDPM-family scheduler (its `alphas_cumprod` and `prediction_type`)."""
        return cls(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type)

    def sigma_to_t(self, sigma):
        """Fractional timestep of `sigma`, by linear interpolation in log sigma (exact on the table)."""
        log_sigmas = self.sigmas.to(sigma.device, sigma.dtype).log()
        dists = sigma.log() - log_sigmas[:, None]
        low = dists.ge(0).cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
        w = ((log_sigmas[low] - sigma.log()) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def sampling_sigmas(self, steps):
        """diffusers' DDIM 'leading' schedule with steps_offset 1 (ComfyUI's 'ddim_uniform'), then 0."""
        check_grad_steps(0, steps)
        timesteps = torch.arange(steps - 1, -1, -1) * (len(self.sigmas) // steps) + 1
        return torch.cat([self.sigmas[timesteps], self.sigmas.new_zeros(1)])

    @staticmethod
    def start(noise, sigmas):
        """x_T for unit Gaussian `noise` as diffusers starts DDIM (x_T = noise in DDPM space)."""
        return noise * (1 + sigmas[0] ** 2).sqrt()

    noised = staticmethod(noised)

    def forward(self, x, sigma, encoder_hidden_states, **unet_kwargs):
        s = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        scale = (s ** 2 + 1).rsqrt()
        out = self.unet(x * scale, self.sigma_to_t(sigma.to(x.dtype)), encoder_hidden_states=encoder_hidden_states,
                        **unet_kwargs).sample
        if self.prediction_type == "epsilon":
            return x - s * out
        return x * scale ** 2 - out * s * scale  # v-prediction


class FlowDenoiser(torch.nn.Module):
    """Wraps a diffusers UNet that predicts a rectified flow's velocity v = eps - x0 at timestep 1000 sigma (as
    diffusers' FlowMatchEulerDiscreteScheduler and SD3 feed it) as an x0 predictor: x0_hat = x - sigma v."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    @classmethod
    def from_scheduler(cls, unet, scheduler):
        if scheduler.config.shift != 1.0 or scheduler.config.use_dynamic_shifting:
            raise ValueError("FlowDenoiser samples the unshifted rectified flow (shift 1, no dynamic shifting)")
        return cls(unet)

    def forward(self, x, sigma, encoder_hidden_states, **unet_kwargs):
        s = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return x - s * self.unet(x, sigma.to(x.dtype) * 1000, encoder_hidden_states=encoder_hidden_states,
                                 **unet_kwargs).sample

    @staticmethod
    def sampling_sigmas(steps):
        """The uniform grid 1 -> 0 (ComfyUI's 'simple' at shift 1): the Euler sampler of the flow's ODE."""
        check_grad_steps(0, steps)
        return torch.linspace(1, 0, steps + 1, dtype=torch.float64)

    @staticmethod
    def start(noise, sigmas):
        return noise * sigmas[0]

    @staticmethod
    def noised(x0, sigma, eps):
        """x0 at noise level `sigma` on the flow's straight path: (1 - sigma) x0 + sigma eps."""
        if sigma.ndim:
            sigma = sigma.reshape(-1, *[1] * (eps.ndim - 1))
        return (1 - sigma) * x0 + sigma * eps


def denoiser_for(unet, scheduler):
    """The x0 predictor for a UNet trained with `scheduler`: a rectified flow for diffusers' flow-matching
    schedulers, else the DDPM family's eps or v prediction."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowDenoiser.from_scheduler(unet, scheduler)
    return DiffusersDenoiser.from_scheduler(unet, scheduler)


def guided(denoiser, cond, uncond, cfg):
    """Classifier-free guidance inside the graph: uncond + cfg * (cond - uncond) on x0, one batched call.

    cond, uncond: the UNet's text conditioning as keyword arguments (`encoder_hidden_states`, for SDXL
    also `added_cond_kwargs`), or just the `encoder_hidden_states` tensor.
    """
    cond, uncond = as_kwargs(cond), as_kwargs(uncond)

    def model(x, sigma):
        c, u = cond, uncond
        copies = x.shape[0] // c["encoder_hidden_states"].shape[0]
        if copies > 1:  # several copies of the batch in one call (DRaFT-LV), repeated as ComfyUI repeats conds
            c, u = cat_conditioning([c] * copies), cat_conditioning([u] * copies)
        if cfg == 1:
            return denoiser(x, sigma, **c)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **cat_conditioning([u, c]))
        x0_uncond, x0_cond = both.chunk(2)
        return x0_uncond + cfg * (x0_cond - x0_uncond)
    return model


def as_kwargs(cond):
    return cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}


def cat_conditioning(conds):
    """Batch conditioning dicts (tensors, nested dicts) along the batch dimension."""
    return {k: cat_conditioning([c[k] for c in conds]) if isinstance(v, dict) else torch.cat([c[k] for c in conds])
            for k, v in conds[0].items()}


def sample(denoiser, cond, uncond, cfg, noise, steps, grad_steps=0, recompute=True, callback=None):
    """DDIM (eta = 0) from unit Gaussian `noise`, started as diffusers does (x_T = noise in DDPM
    space); returns x0 of the last step, differentiable in its last `grad_steps` steps."""
    sigmas = denoiser.sampling_sigmas(steps).to(noise.device, noise.dtype)
    check_grad_steps(grad_steps, steps)
    return sample_ddim(guided(denoiser, cond, uncond, cfg), denoiser.start(noise, sigmas), sigmas, callback=callback,
                       grad_steps=grad_steps, recompute=recompute)


def base_model_version(unet_config):
    """kohya's `ss_base_model_version`: SDXL by its pooled-text and size conditioning, SD1.x/SD2.x by
    their text-conditioning width."""
    if unet_config.addition_embed_type == "text_time":
        return "sdxl_base_v1-0"
    return {768: "sd_v1", 1024: "sd_v2"}.get(unet_config.cross_attention_dim, "custom")


class TrainingBackend:
    """A diffusers UNet (+ optional VAE, text encoder and tokenizer) for `Trainer` (see `backends.Backend`).

    Without a VAE the UNet works in pixel space ([-1, 1] images). `encode_prompts(list of str)`
    replaces the text encoder when given (e.g. class embeddings, SDXL's two encoders); it returns
    the `encoder_hidden_states` (B, tokens, dim) or a dict of the UNet's conditioning arguments.
    """

    def __init__(self, unet, scheduler, vae=None, text_encoder=None, tokenizer=None, encode_prompts=None, device=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.unet = unet.to(self.device).requires_grad_(False)
        self.denoiser = denoiser_for(self.unet, scheduler)
        self.flow = isinstance(self.denoiser, FlowDenoiser)
        self.noised = self.denoiser.noised
        self.vae = vae.to(self.device).requires_grad_(False) if vae is not None else None
        self.text_encoder = text_encoder.to(self.device).requires_grad_(False) if text_encoder is not None else None
        self.text_encoders = [self.text_encoder] if text_encoder is not None else []  # on the device, for estimates
        self.tokenizer = tokenizer
        self.encode_prompts = encode_prompts
        self.base_model_version = base_model_version(unet.config)
        self._prompt_cache = {}
        self.loras = None

    @classmethod
    def from_pipeline(cls, pipe, device=None):
        """From a StableDiffusionPipeline (SD1.x, SD2.x) or a StableDiffusionXLPipeline."""
        if getattr(pipe, "text_encoder_2", None) is None:
            return cls(pipe.unet, pipe.scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer, device=device)
        backend = cls(pipe.unet, pipe.scheduler, pipe.vae, device=device)
        backend.text_encoders = [e.to(backend.device).requires_grad_(False) for e in (pipe.text_encoder, pipe.text_encoder_2)]

        def encode_sdxl(prompts):
            """Both encoders' context and the pooled text, by diffusers' own SDXL prompt encoding; with
            `force_zeros_for_empty_prompt` an empty prompt is zeros, as diffusers' default negative prompt."""
            context, _, pooled, _ = pipe.encode_prompt(prompts, device=backend.device, do_classifier_free_guidance=False)
            if pipe.config.force_zeros_for_empty_prompt:
                keep = torch.tensor([p != "" for p in prompts], device=backend.device)
                context, pooled = context * keep[:, None, None], pooled * keep[:, None]
            return {"encoder_hidden_states": context, "added_cond_kwargs": {"text_embeds": pooled}}
        backend.encode_prompts = encode_sdxl
        return backend

    def add_loras(self, rank, alpha=None, resnets=False):
        from ..lora import LoRASet, attach, is_target, kohya_name, ldm_module_path

        modules = {n: m for n, m in self.unet.named_modules()
                   if is_target(n, resnets) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        # kohya's names: diffusers-style module paths for SD1.x/SD2.x, ldm paths for SDXL.
        if self.base_model_version.startswith("sdxl"):
            names = {n: kohya_name(ldm_module_path(n, self.unet.config.layers_per_block)) for n in modules}
        else:
            names = {n: kohya_name(n) for n in modules}
        self.loras = LoRASet({names[n]: m.weight.shape for n, m in modules.items()}, rank, alpha).to(self.device)
        self._lora_hooks = [attach(module, self.loras[names[n]]) for n, module in modules.items()]  # bypass
        return self.loras

    def modules(self):
        """The modules whose weights sit on the device while training (for memory estimates)."""
        extra = [self.encode_prompts] if isinstance(self.encode_prompts, torch.nn.Module) else []
        return [m for m in (self.unet, self.vae, *self.text_encoders, *extra) if m is not None]

    def encode(self, prompts):
        """The UNet's text conditioning for `prompts`, as keyword arguments (see `guided`)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                if self.encode_prompts is not None:
                    cond = as_kwargs(self.encode_prompts(missing))
                else:
                    length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
                    ids = self.tokenizer(missing, padding="max_length", max_length=length, truncation=True,
                                         return_tensors="pt").input_ids
                    cond = {"encoder_hidden_states": self.text_encoder(ids.to(self.device))[0]}
            for i, p in enumerate(missing):
                self._prompt_cache[p] = select(cond, i, self.device)
        return cat_conditioning([self._prompt_cache[p] for p in prompts])

    def latents_of(self, images):
        """The model-space latents of images (B, 3, H, W) in [0, 1]: the VAE's mean, or in pixel space the
        images in [-1, 1] (grey for a one-channel model)."""
        x = images.to(self.device) * 2 - 1
        if self.vae is None:
            return x.mean(1, keepdim=True) if self.unet.config.in_channels == 1 else x
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float() * self.vae.config.scaling_factor

    def latent_shape(self, batch, height, width):
        f = self.vae_scale_factor
        return (batch, self.unet.config.in_channels, height // f, width // f)

    @property
    def vae_scale_factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def compute_dtype(self):
        return self.unet.dtype

    def session(self):
        return contextlib.nullcontext(self)  # the models sit on the device from the start

    def run(self, fn, prompts, negative_prompt, cfg, noise, steps, recompute=False):
        """`fn(model, x_T, sigmas)` with the CFG-guided x0 predictor, as diffusers starts DDIM; with `recompute`
        each guided call made with gradient is recomputed in backward (cond and uncond are always one batch)."""
        cond, uncond = self.encode(prompts), self.encode([negative_prompt] * len(prompts))
        if "added_cond_kwargs" in cond:  # SDXL's size conditioning: original size, crop (0, 0), target size
            h, w = (n * self.vae_scale_factor for n in noise.shape[-2:])
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device).expand(len(prompts), -1)
            for c in (cond, uncond):
                c["added_cond_kwargs"]["time_ids"] = time_ids
        model = guided(self.denoiser, cond, uncond, cfg)
        if recompute == "blocks":  # each UNet block too, inside the call's recomputation
            model = blockwise.within(model, blockwise.blocks(self.unet, blockwise.UNET_BLOCKS))
        if recompute:
            model = functools.partial(recomputed, model)
        sigmas = self.denoiser.sampling_sigmas(steps).to(self.device, torch.float32)
        return fn(model, self.denoiser.start(noise.to(self.device), sigmas), sigmas)

    def decode(self, x0, recompute=True):
        """Images in [0, 1]; with `recompute` the VAE decoder's blocks are recomputed in the backward pass."""
        if self.vae is None:  # pixel space; grey images become RGB for the rewards
            images = x0.expand(-1, 3, -1, -1) if x0.shape[1] == 1 else x0
        else:  # one image at a time, each decoder block recomputed in backward
            blocks = blockwise.blocks(self.vae.decoder, blockwise.DECODER_BLOCKS) if recompute else []
            images = blockwise.per_image(self.vae_decode, x0, blocks)
        return ((images + 1) / 2).clamp(0, 1)

    def vae_decode(self, latent):
        z = latent / self.vae.config.scaling_factor
        device = z.device.type
        if (self.vae.config.force_upcast and torch.is_autocast_enabled(device)
                and torch.get_autocast_dtype(device) == torch.float16):
            # VAEs marked force_upcast (SDXL's) overflow in fp16: decode in float32, as diffusers does.
            with torch.autocast(device, enabled=False):
                return self.vae.float().decode(z.float()).sample
        return self.vae.decode(z).sample


def select(cond, i, device):
    """Item `i` of batched conditioning (keeping a batch dimension of 1)."""
    return {k: select(v, i, device) if isinstance(v, dict) else v[i:i + 1].to(device) for k, v in cond.items()}
