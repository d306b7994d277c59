"""ComfyUI MODEL / CONDITIONING / LATENT -> the library's sampler, through ComfyUI's own CFGGuider.

Running `sample_ddim` as a `comfy.samplers.KSAMPLER` gives classifier-free guidance, SDXL's extra
conds, hooks, other LoRAs and inpainting masks from ComfyUI itself, exactly as its KSampler does.
"""
import contextlib
import copy
import dataclasses
import functools
import math

import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.supported_models
import comfy.utils
import torch

from .. import blockwise
from ..sampling import recomputed, sample_ddim


@dataclasses.dataclass(frozen=True)
class FlowFamily:
    """A flow-matching model family DRaFT trains, with the defaults of ComfyUI's templates for it."""
    name: str
    configs: tuple   # its comfy.supported_models classes (exactly these: inpainting or pixel-space variants differ)
    version: str     # kohya's ss_base_model_version
    steps: int       # sampling steps of the usual workflow (the distilled variant's in its own entry)
    cfg: float       # 1.0: guidance-distilled, no negative pass
    targets: tuple   # module path suffixes that get LoRAs: attention and MLP linears. Not the modulation layers
                     # (adaLN: the largest linears of each block, 6 x hidden^2, driven by the timestep, not the image)


FLUX_TARGETS = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")  # double blocks' image and text streams, single blocks
FLOW_FAMILIES = (
    FlowFamily("SD3 / SD3.5", (comfy.supported_models.SD3,), "sd3", 28, 4.5,
               ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2")),
    FlowFamily("Flux.1 dev", (comfy.supported_models.Flux,), "flux1", 20, 1.0, FLUX_TARGETS),
    FlowFamily("Flux.1 schnell", (comfy.supported_models.FluxSchnell,), "flux1", 4, 1.0, FLUX_TARGETS),
    FlowFamily("Z-Image", (comfy.supported_models.ZImage,), "z_image", 8, 1.0,
               ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")),
)
SUPPORTED = "SD1.x, SD2.x, SDXL, " + ", ".join(f.name for f in FLOW_FAMILIES)


def flow_family(model):
    """The model's `FlowFamily`, or None for a discrete-time (SD) model."""
    return next((f for f in FLOW_FAMILIES if type(model.model.model_config) in f.configs), None)


def check_model(model):
    """Raise unless `model` (a ModelPatcher) is a discrete-time eps- or v-prediction diffusion model (SD1.x, SD2.x,
    SDXL) or a flow model of a supported family (`FLOW_FAMILIES`)."""
    ms = model.get_model_object("model_sampling")
    discrete = (
        isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete)
        and isinstance(ms, comfy.model_sampling.EPS)  # V_PREDICTION is a subclass
        and not isinstance(ms, (comfy.model_sampling.EDM, comfy.model_sampling.X0,
                                comfy.model_sampling.ModelSamplingDiscreteEDM))
    )
    flow = isinstance(ms, comfy.model_sampling.CONST) and flow_family(model) is not None
    if not (discrete or flow):
        raise ValueError(f"DRaFT trains and samples {SUPPORTED} image models (SD models with their discrete eps or "
                         f"v-prediction sampling); got {type(model.model).__name__} "
                         f"({type(model.model.model_config).__name__}) with {type(ms).__name__} sampling")


def sampling_sigmas(model, steps):
    """The deterministic sampler's sigmas: ComfyUI's 'ddim_uniform' for discrete models (timesteps 1 + k * (1000 //
    steps), then sigma = 0; like ComfyUI's KSampler it yields one extra step when 1000 % steps leaves room, e.g. 7 ->
    8), 'simple' with the model's own shift for flow models (where the DDIM step is the Euler step, KSampler's
    'euler')."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    name = "simple" if flow_family(model) else "ddim_uniform"
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), name, steps)


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
    anything that re-runs the model (a recomputing backward pass, DRaFT-LV's extra denoising) happens
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
    sigmas = sampling_sigmas(model, steps)
    latent_image = prepare_latent(model, latent)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    with torch.no_grad():
        return run_guided(model, positive, negative, cfg, sigmas,
                          lambda m, x, s, cb: sample_ddim(m, x, s, callback=cb), latent_image, noise, seed,
                          latent.get("noise_mask"), callback, disable_pbar)


def sample_lora_then_base(lora_model, base_model, positive, negative, latent, seed, steps, cfg, fraction, callback=None,
                    disable_pbar=True):
    """P-GRAFT's inference: DDIM (eta = 0) with `lora_model` for the first `policy.lora_steps(fraction, T)` steps
    (T -> t), then `base_model` from t to 0 (as KSamplerAdvanced continues a latent: no noise added). Noise is
    drawn as KSampler draws it, so fraction -> 0 or 1 approaches plain sampling with either model."""
    from ..policy import lora_steps

    check_model(base_model)
    sigmas = sampling_sigmas(base_model, steps)
    total = len(sigmas) - 1
    switch = lora_steps(fraction, total)
    latent_image = prepare_latent(base_model, latent)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    mask = latent.get("noise_mask")

    def ddim(m, x, s, cb):
        return sample_ddim(m, x, s, callback=cb)

    def later(step, x0, x, _):  # progress and previews count the second part's steps after the first's
        return callback(step + switch, x0, x, total)
    with torch.no_grad():
        x_t = run_guided(lora_model, positive, negative, cfg, sigmas[:switch + 1], ddim, latent_image, noise, seed,
                         mask, callback, disable_pbar)
        return run_guided(base_model, positive, negative, cfg, sigmas[switch:], ddim, x_t.to(latent_image),
                          torch.zeros_like(noise), seed, mask, later if callback else None, disable_pbar)


def base_model_version(model):
    """kohya's `ss_base_model_version` for a ComfyUI model (its distilled and variant families included)."""
    config = model.model.model_config
    if flow_family(model):
        return flow_family(model).version
    if isinstance(config, comfy.supported_models.SDXL):  # also SSD-1B, Segmind Vega, KOALA
        return "sdxl_base_v1-0"
    return "sd_v2" if isinstance(config, comfy.supported_models.SD20) else "sd_v1"


def native_size(model):
    """The side in pixels a model was trained at: SDXL and the flow families 1024, SD2.x v-prediction (768-v) 768,
    otherwise 512."""
    if isinstance(model.model.model_config, comfy.supported_models.SDXL) or flow_family(model):
        return 1024
    return 768 if isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION) else 512


def usual_steps_and_cfg(model):
    """The sampling steps and cfg of the family's usual workflow: the flow families' (`FLOW_FAMILIES`), else the
    trainer's defaults (SD: 50 and 7.5, as in the DRaFT paper)."""
    from ..trainer import TrainConfig

    family = flow_family(model)
    return (family.steps, family.cfg) if family else (TrainConfig.sampling_steps, TrainConfig.cfg)


def with_size(cond, height, width):
    """SDXL's size conditioning: original and target size = the image size, no crop (as CLIPTextEncodeSDXL sets
    it; without it ComfyUI assumes 768). Other models ignore these fields."""
    cond[0][1].update(height=height, width=width, target_height=height, target_width=width, crop_h=0, crop_w=0)
    return cond


def batch_conditioning(conds, repeat=True):
    """One CONDITIONING for a batch from per-prompt ones. Token lengths are brought to their least common multiple by
    repetition, as ComfyUI batches conds: exact for cross-attention (SD), not for the flow models, whose text tokens
    share one attention with the image's (a repeated token weighs more there); for them (`repeat` False) prompts of
    different token lengths are an error."""
    tensors = [c[0][0] for c in conds]
    if not repeat and len({t.shape[1] for t in tensors}) > 1:
        raise ValueError("prompts of different token lengths cannot share a batch on this model (its text and image "
                         "tokens share one attention): train with batch_size 1, held-out prompts of one length")
    length = math.lcm(*(t.shape[1] for t in tensors))
    extra = dict(conds[0][0][1])
    for key in ("pooled_output", "attention_mask"):
        if key in extra:
            extra[key] = torch.cat([c[0][1][key] for c in conds])
    return [[torch.cat([t.repeat(1, length // t.shape[1], 1) for t in tensors]), extra]]


class SamplingBackend:
    """A ComfyUI MODEL + CLIP + VAE as used as they are, without gradients (held-out samples, sweeps):
    prompts encoded by the CLIP, DDIM through ComfyUI's guider, images decoded by ComfyUI's VAE."""

    def __init__(self, model, clip, vae):
        check_model(model)
        self.model, self.clip, self.vae = model, clip, vae
        self.latent_format = model.get_model_object("latent_format")
        self.model_sampling = model.get_model_object("model_sampling")
        self.flow = flow_family(model) is not None
        self.device = torch.device(model.load_device)
        self._prompt_cache = {}

    def noised(self, x0, sigma, eps):
        """x0 at noise level `sigma` by the model's own forward process (`model_sampling.noise_scaling`)."""
        return self.model_sampling.noise_scaling(sigma, eps, x0).to(x0.dtype)

    def encode(self, prompts):
        for p in dict.fromkeys(prompts):
            if p not in self._prompt_cache:
                with torch.inference_mode(False), torch.no_grad():
                    cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(p))
                    # normal (non-inference) copies: to_k/to_v save their input for backward
                    self._prompt_cache[p] = [[cond[0][0].clone(),
                                              {k: v.clone() if torch.is_tensor(v) else v for k, v in cond[0][1].items()}]]
        return batch_conditioning([self._prompt_cache[p] for p in prompts], repeat=not self.flow)

    def latents_of(self, images):
        """The model-space latents of images (B, 3, H, W) in [0, 1], by ComfyUI's VAE encode."""
        return self.latent_format.process_in(self.vae.encode(images.movedim(1, -1)).float()).to(self.device)

    def latent_shape(self, batch, height, width):
        f = self.latent_format.spacial_downscale_ratio
        return (batch, self.latent_format.latent_channels, height // f, width // f)

    def run(self, fn, prompts, negative_prompt, cfg, noise, steps):
        """`fn(model, x_T, sigmas)` inside ComfyUI's sampling context, with the CFG-guided x0 predictor."""
        sigmas = sampling_sigmas(self.model, steps)
        height, width = (n * self.latent_format.spacial_downscale_ratio for n in noise.shape[-2:])
        positive = with_size(self.encode(prompts), height, width)
        negative = with_size(self.encode([negative_prompt] * len(prompts)), height, width)
        return run_guided(self.model, positive, negative, cfg, sigmas, lambda m, x, s, callback: fn(m, x, s),
                          torch.zeros(noise.shape), noise)

    def decode(self, x0, recompute=False):
        """Images (B, 3, H, W) in [0, 1] from ComfyUI's VAE decode (no gradient)."""
        return self.vae.decode(self.latent_format.process_out(x0)).movedim(-1, 1).to(x0.device)


# What ComfyUI attaches to a module it has loaded for inference (model_patcher.py, ops.py): DynamicVRAM's native
# handles and pins (raw pointers: a deepcopy would duplicate them and its finaliser free the original's memory),
# lowvram bookkeeping and weight functions. A copy for training starts unloaded, without them.
RUNTIME_STATE = {"dynamic_pins", "dynamic_vbars", "dynamic_patchers", "_pin_state", "_prefetch", "seed_key",
                 "comfy_cast_weights", "prev_comfy_cast_weights", "comfy_patched_weights", "comfy_force_cast_weights",
                 "model_lowvram", "lowvram_patch_counter", "model_loaded_weight_memory", "model_offload_buffer_memory",
                 "current_weight_patches_uuid"}


def is_runtime_state(name):
    return name in RUNTIME_STATE or name == "_v" or name.startswith("_v_") or name.endswith("_function")


def plain_copy(module, dtype=None, leave_out=(), memo=None):
    """A copy of `module` for training, made from its tensors rather than by `copy.deepcopy`: parameters and
    buffers cloned outside inference mode (floating-point ones cast to `dtype`, if given), submodules copied the
    same way (those in `leave_out` become None), hooks and ComfyUI's runtime state left behind, any other
    attribute (configs, latent formats) shared. Nothing native is duplicated, so the original stays intact."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]

    def tensor(t):
        if t is None:
            return None
        if id(t) not in memo:
            if t.device.type == "meta":
                raise ValueError(f"{type(module).__name__} holds weights ComfyUI has not loaded (meta tensors); "
                                 "load the model with a core loader or start ComfyUI with --disable-dynamic-vram")
            cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
            new = t.detach().to(dtype=cast, copy=True)
            memo[id(t)] = torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new
        return memo[id(t)]

    clone = object.__new__(type(module))
    memo[id(module)] = clone
    for name, value in vars(module).items():
        if is_runtime_state(name):
            continue
        if name in ("_parameters", "_buffers"):
            value = type(value)((k, tensor(t)) for k, t in value.items())
        elif name == "_modules":
            value = type(value)((k, None if m is None or m in leave_out else plain_copy(m, dtype, leave_out, memo))
                                for k, m in value.items())
        elif "hooks" in name and isinstance(value, dict):
            value = type(value)()
        elif isinstance(value, (dict, list, set)):
            value = copy.copy(value)
        clone.__dict__[name] = value
    return clone


def trainable_copy(model):
    """A plain (non-dynamic) clone of a MODEL (same patches, hooks, options) with weights of its own, made outside
    inference mode and free of DynamicVRAM's native handles.

    Reloaded from its file when the loader recorded how (`clone(disable_dynamic=True)`, ComfyUI's own non-dynamic
    delegate); otherwise (custom loaders) a `plain_copy` of the unpatched weights in memory, so that the clone's
    patches are applied once, not on top of already patched weights.
    """
    if model.cached_patcher_init is not None:
        clone = model.clone(disable_dynamic=True, force_deepcopy=True)
    else:
        comfy.model_management.unload_model_and_clones(model)  # puts the unpatched weights back
        clone = model.clone(disable_dynamic=True, model_override=(plain_copy(model.model), ({}, {}, {}, set())))
        clone.hook_backup = {}
    # The copy's weights in the model's own dtype, whatever loader made them: under DynamicVRAM (comfy-aimdo) the
    # reload's lazily built Linear/Embedding ops keep the file's dtype (comfy.ops.disable_weight_init.
    # _lazy_load_from_state_dict), so an fp32 file on an fp16 model (or the reverse) came out mixed. Only the copy
    # (a fresh module of its own) is cast; the MODEL the node was handed is left as it is. Quantized weights (tensor
    # subclasses) stay as they are.
    dtype = model.model.get_dtype()
    for p in clone.model.diffusion_model.parameters():
        if type(p.data) is torch.Tensor and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return clone


# Where ComfyUI lets other nodes wrap the sampling or the UNet call (comfy/patcher_extension.py).
SAMPLING_WRAPPERS = ("outer_sample", "sampler_sample", "predict_noise", "calc_cond_batch", "apply_model",
                     "diffusion_model")
OWN_WRAPPER = "comfy_draft.training"


def check_trainable(model):
    """Raise, before any work, unless DRaFT can train LoRAs on `model` and differentiate its UNet calls."""
    check_model(model)
    stores = (model.wrappers, model.model_options.get("transformer_options", {}).get("wrappers", {}))
    wrapped = sorted({f"{key} ({kind})" for store in stores for kind, by_key in store.items()
                      if kind in SAMPLING_WRAPPERS for key, fns in by_key.items() if fns and key != OWN_WRAPPER})
    # the older ways to do the same: a function around every UNet call, or a replaced (e.g. compiled) UNet module
    wrapped += ["model_function_wrapper"] if "model_function_wrapper" in model.model_options else []
    wrapped += ["diffusion_model (object patch)"] if "diffusion_model" in model.object_patches else []
    if wrapped:
        raise ValueError(f"this MODEL carries sampling wrappers that compile, cache or replace the UNet call "
                         f"({', '.join(wrapped)}: TorchCompileModel, EasyCache, LazyCache, context windows and the "
                         f"like), which training cannot differentiate; connect the MODEL from before those nodes")
    if model.get_additional_models_with_key("multigpu"):
        raise ValueError("this MODEL is set up for multi-GPU sampling; DRaFT trains on one device: connect the MODEL "
                         "from before the multi-GPU node")
    if not lora_targets(model):
        raise ValueError(f"{type(model.model).__name__} has no attention projections ({', '.join(targets_of(model))}) "
                         f"to attach LoRAs to; DRaFT trains {SUPPORTED}")


def targets_of(model, resnets=False):
    """The module path suffixes that get LoRAs on this model's family."""
    from ..lora import ATTENTION_TARGETS, RESNET_TARGETS

    family = flow_family(model)
    return family.targets if family else ATTENTION_TARGETS + (RESNET_TARGETS if resnets else ())


def lora_targets(model, resnets=False):
    """The paths of the diffusion model's modules that get LoRAs: ComfyUI's weight-casting Linear (and with
    `resnets`, on SD, Conv2d) layers whose path ends in one of the family's targets."""
    suffixes = tuple("." + t for t in targets_of(model, resnets))
    return [n for n, m in model.model.diffusion_model.named_modules() if n.endswith(suffixes)
            and hasattr(m, "weight_function") and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def decode_dtype(vae):
    """ComfyUI's dtype for this VAE, except fp16, in which SD and SDXL VAEs overflow (also under --fp16-vae)."""
    return torch.float32 if vae.vae_dtype == torch.float16 else vae.vae_dtype


def recompute_each_op(module):
    """Checkpoint each of ComfyUI's weight-casting ops (Linear, Conv, norms: `comfy.ops`) of `module` on its own:
    with offloaded weights ComfyUI casts each into a shared buffer that the next op overwrites, so backward must
    re-fetch a weight right before using it (the recipe of ComfyUI's OffloadCheckpointFunction). Returns the ops,
    whose `forward` attribute is to be deleted afterwards."""
    ops = [m for m in module.modules() if hasattr(m, "comfy_cast_weights")]
    for m in ops:
        m.forward = functools.partial(recomputed, type(m).forward.__get__(m))
    return ops


@contextlib.contextmanager
def in_training(on=True):
    """ComfyUI's `in_training` flag (its trainer sets it): the flow models then run their eager RoPE and q/k norms
    instead of fused comfy_kitchen kernels, which have no backward."""
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = on
    try:
        yield
    finally:
        comfy.model_management.in_training = previous


def differentiable_call(executor, *args, **kwargs):
    """One model call, in training mode only with gradient: the no-grad part of sampling keeps the fast kernels.
    (Backward's recomputations, of a call or of its blocks, run under `TrainingBackend.run`'s flag.)"""
    with in_training(torch.is_grad_enabled()):
        return executor(*args, **kwargs)


class TrainingBackend(SamplingBackend):
    """A ComfyUI MODEL + CLIP + VAE for `Trainer` (see `backends.Backend`), on the contract of ComfyUI's own
    trainer (comfy_extras/nodes_train.py):

    - ComfyUI made these inside `torch.inference_mode`, and inference tensors cannot be saved for backward, so
      training uses a trainable copy of the model (`trainable_copy`: a plain, non-dynamic ModelPatcher) and a
      `plain_copy` of the VAE decoder; text conditioning is cloned.
    - LoRAs attach as bypass forward hooks on the copy's projections (`lora.attach`); guidance, SDXL conds and
      other patches keep working through ComfyUI.
    - `session()` loads the UNet once for the whole run: fully when it fits, else offloaded with every
      weight-casting op recomputed on its own and each UNet call recomputed whatever the checkpointing (`offload`:
      None decides by free device memory). Each sampling call
      prepares the model the same way (a prepare-sampling wrapper, as ComfyUI's TrainGuider does), so ComfyUI
      never partially unloads it between steps.
    - Gradient checkpointing wraps each UNet call inside the guided call (an apply-model wrapper), not the guided
      call: ComfyUI batches cond and uncond by the free memory of the moment, and a recompute must see the shapes
      of its forward. `recompute="blocks"` also recomputes each UNet block inside it (`blockwise.within`).

    `copy_model=False` trains `model` itself, for a caller that loaded it outside inference mode and uses it for
    nothing else (the command line): one copy of the weights instead of two.
    """

    def __init__(self, model, clip, vae, copy_model=True, offload=None):
        check_trainable(model)
        if not copy_model and any(p.is_inference() for p in model.model.parameters()):
            raise ValueError("copy_model=False needs a model loaded outside torch.inference_mode")
        with torch.inference_mode(False):
            if copy_model:
                model = trainable_copy(model)
            model.model.requires_grad_(False)
            vae_model = vae.first_stage_model  # copied without its encoder, which training never runs
            self.vae_dtype = decode_dtype(vae)
            self.vae_model = plain_copy(vae_model, self.vae_dtype, leave_out={getattr(vae_model, "encoder", None)})
            self.vae_model.requires_grad_(False).eval()
        super().__init__(model, clip, vae)
        self.base_model_version = base_model_version(self.model)
        self.compute_dtype = self.model.model.get_dtype_inference()
        self.loras = None
        self.offload, self.offloaded, self.recompute = offload, False, False
        self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, OWN_WRAPPER, self._prepare)
        self.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, OWN_WRAPPER, self._apply_model)

    def _prepare(self, executor, model, noise_shape, conds, model_options=None, **kwargs):
        return executor(model, noise_shape, conds, model_options=model_options,
                        force_full_load=not self.offloaded, force_offload=self.offloaded)

    def _apply_model(self, executor, *args, **kwargs):
        if self.recompute == "blocks":  # each UNet block too, inside the call's recomputation
            executor = blockwise.within(executor, blockwise.blocks(self.model.model.diffusion_model,
                                                                           blockwise.UNET_BLOCKS))
        return recomputed(functools.partial(differentiable_call, executor), *args, enabled=bool(self.recompute),
                          **kwargs)

    @contextlib.contextmanager
    def session(self):
        self.offloaded = bool(self.offload)
        if self.offload is None and self.device.type == "cuda":
            size = self.model.model_size()
            comfy.model_management.free_memory(size, self.device)  # evict cached models first
            self.offloaded = size > comfy.model_management.get_free_memory(self.device)
        comfy.model_management.load_models_gpu([self.model], memory_required=1e20 if self.offloaded else 0,
                                               force_full_load=not self.offloaded)
        ops = recompute_each_op(self.model.model.diffusion_model) if self.offloaded else []
        try:
            yield self
        finally:
            for m in ops:
                del m.forward

    def run(self, fn, prompts, negative_prompt, cfg, noise, steps, recompute=False):
        # Offloaded, the weight casts share buffers that later casts overwrite: only a recomputed call reads its own.
        self.recompute = recompute or self.offloaded
        try:
            with in_training():  # `fn` runs backward in it
                return super().run(fn, prompts, negative_prompt, cfg, noise, steps)
        finally:
            self.recompute = False

    def add_loras(self, rank, alpha=None, resnets=False):
        from ..lora import LoRASet, attach, kohya_name

        unet = self.model.model.diffusion_model
        targets = lora_targets(self.model, resnets)
        # kohya's names: diffusers-style module paths for SD1.x/SD2.x, ComfyUI's module paths for the others (ldm
        # paths for SDXL, the original repositories' for the flow models, as kohya and ComfyUI name them).
        to_diffusers = {}
        if self.base_model_version in ("sd_v1", "sd_v2"):
            to_diffusers = {v[:-len(".weight")]: k[:-len(".weight")]
                            for k, v in comfy.utils.unet_to_diffusers(self.model.model.model_config.unet_config).items()}
        names = {n: kohya_name(to_diffusers.get(n, n)) for n in targets}
        with torch.inference_mode(False):
            self.loras = LoRASet({names[n]: unet.get_submodule(n).weight.shape for n in targets}, rank, alpha)
            self.loras.to(self.device)
        # Bypass hooks on this backend's own copy of the UNet (as ComfyUI's trainer in bypass mode): no W + delta
        # rebuilt in every op's weight cast, so the no-grad prefix runs at KSampler's speed.
        self.lora_modules = names  # UNet module path -> kohya name
        self.lora_hooks = [attach(unet.get_submodule(n), self.loras[names[n]]) for n in targets]
        return self.loras

    def modules(self):
        return [self.model.model.diffusion_model, self.vae_model]

    def decode(self, x0, recompute=True):
        """Images (B, 3, H, W) in [0, 1], differentiable; with `recompute`, one image at a time and each decoder
        block recomputed in backward (`blockwise.per_image`)."""
        self.vae_model.to(self.device)

        def decode(latent):
            # In the VAE's own dtype (never fp16, see `decode_dtype`), whatever the autocast.
            with torch.autocast(self.device.type, enabled=False):
                return self.vae_model.decode(self.latent_format.process_out(latent).to(self.vae_dtype)).float()
        blocks = blockwise.blocks(self.vae_model.decoder, blockwise.DECODER_BLOCKS) if recompute else []
        return ((blockwise.per_image(decode, x0, blocks) + 1) / 2).clamp(0, 1)


# ----- annealed importance guidance (guidance.py) over two MODELs ----------------------------------------------------

def own_weights(model, other):
    """`model`, or when it shares its UNet module with `other` (a LoraLoader output and its input do: ComfyUI merges
    a LoRA into the shared weights in place, so two clones of one model cannot be loaded at once) a clone with
    weights of its own and the same patches (`trainable_copy`: reloaded from its file, or copied in memory)."""
    return trainable_copy(model) if model.is_clone(other) else model


def run_aig(base_model, lora_model, positive, negative, cfg, sigmas, fn, latent_image, noise, seed=0,
            denoise_mask=None, callback=None, disable_pbar=True):
    """`fn(base, lora, x, sigmas, callback) -> latent` with both CFG-guided x0 predictors at hand: the base MODEL's
    guider runs outside, the LoRA MODEL's (`own_weights`) inside it, each with the same conds, latent and noise, so
    each predictor is exactly what ComfyUI's sampling of that MODEL alone would call. Returns the outer guider's
    latent (ComfyUI's output processing)."""
    check_model(lora_model)
    lora_model = own_weights(lora_model, base_model)

    def outer(base, x, s, cb):
        result = {}

        def inner(lora, _x, _s, _cb):
            result["x0"] = fn(base, lora, x, s, cb)
            return result["x0"]
        run_guided(lora_model, positive, negative, cfg, sigmas, inner, latent_image, noise, seed, denoise_mask)
        return result["x0"]
    return run_guided(base_model, positive, negative, cfg, sigmas, outer, latent_image, noise, seed, denoise_mask,
                      callback, disable_pbar)


def sample_mixed(base_model, lora_model, positive, negative, latent, seed, steps, cfg, schedule, p=1.0, f=0.5,
               callback=None, disable_pbar=True):
    """DDIM as `sample`, with the base and LoRA MODELs mixed by an AIG schedule (`guidance`)."""
    from ..guidance import aig_weights, sample_aig

    check_model(base_model)
    sigmas = sampling_sigmas(base_model, steps)
    weights = aig_weights(len(sigmas) - 1, schedule, p, f)
    latent_image = prepare_latent(base_model, latent)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    with torch.no_grad():
        return run_aig(base_model, lora_model, positive, negative, cfg, sigmas,
                       lambda b, m, x, s, cb: sample_aig(b, m, x, s, weights, callback=cb), latent_image, noise, seed,
                       latent.get("noise_mask"), callback, disable_pbar)


class AIGSamplingBackend(SamplingBackend):
    """A `SamplingBackend` whose samples mix `model` (the base) and `lora_model` by an AIG schedule: its `run`
    hands `fn` the mixed x0 predictor (`guidance.Mixed`), so held-out samples and sweeps use it unchanged."""

    def __init__(self, model, lora_model, clip, vae, schedule="power_p", p=1.0, f=0.5):
        super().__init__(model, clip, vae)
        check_model(lora_model)
        self.lora_model = own_weights(lora_model, model)  # once, not per batch
        self.schedule, self.p, self.f = schedule, p, f

    def run(self, fn, prompts, negative_prompt, cfg, noise, steps):
        from ..guidance import Mixed, aig_weights

        sigmas = sampling_sigmas(self.model, steps)
        weights = aig_weights(len(sigmas) - 1, self.schedule, self.p, self.f)
        height, width = (n * self.latent_format.spacial_downscale_ratio for n in noise.shape[-2:])
        positive = with_size(self.encode(prompts), height, width)
        negative = with_size(self.encode([negative_prompt] * len(prompts)), height, width)
        return run_aig(self.model, self.lora_model, positive, negative, cfg, sigmas,
                       lambda b, m, x, s, cb: fn(Mixed(b, m, s, weights), x, s), torch.zeros(noise.shape), noise)


# ----- inverse noise correction (correction.py) over a MODEL and its CONDITIONING -------------------------------------

class ConditionedSampler:
    """A MODEL with given CONDITIONING as `correction.invert_latents` and `sample_latents` run it: `run` as the
    backends' (see `backends.Backend`), the prompts ignored. (ComfyUI repeats a cond of batch 1 to the batch.)"""

    def __init__(self, model, positive, negative):
        check_model(model)
        self.model, self.positive, self.negative = model, positive, negative
        self.latent_format = model.get_model_object("latent_format")

    def run(self, fn, prompts, negative_prompt, cfg, noise, steps):
        zero = self.latent_format.process_out(torch.zeros(noise.shape))  # an empty latent in the model's space
        return run_guided(self.model, self.positive, self.negative, cfg, sampling_sigmas(self.model, steps),
                          lambda m, x, s, callback: fn(m, x, s), zero, noise)


class CorrectedNoise:
    """A ComfyUI NOISE (what RandomNoise gives SamplerCustomAdvanced): the seed's Gaussian noise, drawn as KSampler
    draws it, carried through a `correction.Corrector` in `steps` Euler steps."""

    def __init__(self, corrector, seed, steps):
        self.corrector, self.seed, self.steps = corrector, seed, steps

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        if tuple(samples.shape[1:]) != self.corrector.shape:
            raise ValueError(f"this noise corrector was trained on noise of shape {self.corrector.shape}; the latent is "
                             f"{tuple(samples.shape[1:])}: sample at the size it was inverted at")
        z = comfy.sample.prepare_noise(samples, self.seed, input_latent.get("batch_index"))
        device = comfy.model_management.get_torch_device()
        corrector = copy.deepcopy(self.corrector).to(device)  # the node's output stays as it was (on the CPU)
        return corrector.sample(z.to(device), self.steps).cpu()
