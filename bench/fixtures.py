"""What the benchmarks share (imported by speed.py, accounting.py, gpu_check.py, channels_last.py; imports none of
them, so there is no import cycle):

- the setups: the timed training variants (`VARIANTS`) and ONE table of the step configurations that tensor
  accounting measures and the CUDA comparison looks up (`SETUPS`, `RUNS_AS`);
- model builders: random real-size checkpoints in ComfyUI's layout, the tests' tiny checkpoint, the aesthetic
  reward at its real or a tiny size, the same models on the meta device, the LoRA paths before and after issue 14;
- timing helpers: device-synchronised timers, the per-phase clock of a training step, OOM guard, release;
- the tensor-accounting harness (`account`): peak live tensor bytes of one DRaFT-LV step on the meta device.

Importing it puts this checkout's comfy_draft and the tests' helpers (tiny_models) on sys.path; ComfyUI is
imported by `boot_comfyui`.
"""
import collections
import contextlib
import gc
import os
import pathlib
import platform
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
COMFY_DIR = pathlib.Path(os.environ.get("COMFYUI_DIR", REPO / ".cache" / "comfyui" / "ComfyUI"))
CACHE = REPO / ".cache" / "bench"
sys.path.insert(0, str(REPO))  # this checkout's comfy_draft, before any installed copy
sys.path.insert(0, str(REPO / "tests"))  # tiny_models: the tiny checkpoint the tests use (and cache)

GIB = 1024 ** 3
PROMPTS = ["a lighthouse on a cliff at dusk, oil painting", "a red fox in fresh snow, photograph"]
SEED = 0
CFG = 7.5
RESOLUTION = {"real": {"sd15": 512, "sd2": 768, "sdxl": 1024}, "tiny": {"sd15": 64}}


# ----- setups ---------------------------------------------------------------------------------------
# The training variants speed.py times (TrainConfig fields).
VARIANTS = {
    "draft-lv (n=2)": dict(variant="draft-lv", lv_samples=2),
    "draft-k (K=1)": dict(variant="draft-k", grad_steps=1),
    "draft-k (K=5)": dict(variant="draft-k", grad_steps=5),
    "draft (full)": dict(variant="draft"),
}
# The step configurations of tensor accounting (`account`; accounting.py and speed.py --accounting), the paths
# before issue 14 and after it: how the LoRA is applied (`weights`: W + delta rebuilt in every call, `bypass`:
# lora.attach), how the decoder (`whole`, per image and `blocks`, `off`) and the guided UNet calls (`call`,
# `blocks`, `off`) are checkpointed, and whether the n DRaFT-LV copies go through the UNet as one call.
SETUPS = {
    "before (W + delta, whole decoder)": dict(lora="weights", decode="whole", unet_checkpoint="call"),
    "bypass LoRA, whole decoder": dict(lora="bypass", decode="whole", unet_checkpoint="call"),
    "after: bypass, decoder blocks": dict(lora="bypass", decode="blocks", unet_checkpoint="call"),
    "after, UNet blocks": dict(lora="bypass", decode="blocks", unet_checkpoint="blocks"),
    # No gradient checkpointing anywhere, the decoder's blocks included: what the trainer runs with
    # gradient_checkpointing=False (`Trainer.batches_copies`: it then also batches the n copies). accounting.py's own
    # "after, no checkpointing" used to keep the decoder blocks checkpointed; the committed figures
    # (bench/results/speed_real_cpu.*, docs/speed.md) are of this one.
    "after, no checkpointing (n copies batched)": dict(lora="bypass", decode="off", unet_checkpoint="off",
                                                       lv_batched=True),
}
# accounting.py's short --configs names for the same rows.
SETUP_ALIASES = {"before": "before (W + delta, whole decoder)", "bypass": "bypass LoRA, whole decoder",
                 "after": "after: bypass, decoder blocks",
                 "after, no checkpointing": "after, no checkpointing (n copies batched)"}
# The configuration a Trainer runs with, by its resolved checkpointing (for the CUDA comparison).
RUNS_AS = {True: "after: bypass, decoder blocks", "blocks": "after, UNet blocks",
           False: "after, no checkpointing (n copies batched)"}
assert set(SETUP_ALIASES.values()) | set(RUNS_AS.values()) <= set(SETUPS)


def setup_name(name):
    """The SETUPS name of `name`, a SETUPS name or one of accounting.py's short names."""
    return SETUP_ALIASES.get(name, name)


# ----- architectures --------------------------------------------------------------------------------
# Full UNet configs as ComfyUI's model detection produces them (comfy/model_detection.py); the
# supported_models class named alongside matches them to SD1.5, SD2.x and SDXL.
_SD_UNET = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
                use_spatial_transformer=True, legacy=False, adm_in_channels=None, use_temporal_attention=False,
                use_temporal_resblock=False, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
ARCHITECTURES = {
    "sd15": ("SD15", dict(_SD_UNET, context_dim=768, num_heads=8, use_linear_in_transformer=False)),
    "sd2": ("SD20", dict(_SD_UNET, context_dim=1024, num_head_channels=64, use_linear_in_transformer=True)),
    "sdxl": ("SDXL", dict(_SD_UNET, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                          channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                          transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], context_dim=2048,
                          num_head_channels=64, use_linear_in_transformer=True)),
}
# ComfyUI tells SD2 v-prediction (768-v) from eps (512-base) by the spread of this bias (supported_models.SD20).
SD2_V_PRED_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"

# CLIP towers of the aesthetic reward as open_clip configs: OpenAI ViT-L/14 (what the LAION predictor
# was trained on, QuickGELU, 224 px) and, for CPU runs, a small ViT.
REWARD_CLIP = {
    "real": dict(embed_dim=768, vision_cfg=dict(layers=24, width=1024, head_width=64, patch_size=14, image_size=224),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12)),
    "tiny": dict(embed_dim=32, vision_cfg=dict(layers=2, width=128, patch_size=8, image_size=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)),
}


# ----- models ---------------------------------------------------------------------------------------
def boot_comfyui(device):
    """Import ComfyUI as a library, its command line parsed as `main.py [--cpu]` would (once per process;
    the tests boot it themselves)."""
    if "comfy.cli_args" in sys.modules:
        return
    if not (COMFY_DIR / "comfy").is_dir():
        raise SystemExit(f"no ComfyUI at {COMFY_DIR}: run scripts/bootstrap.sh (or set COMFYUI_DIR)")
    sys.path.insert(0, str(COMFY_DIR))
    argv, sys.argv = sys.argv, ["main.py", "--disable-api-nodes"] + (["--cpu"] if device.type == "cpu" else [])
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  parses sys.argv, once
    finally:
        sys.argv = argv


def random_tensor(name, like, generator):
    """Seeded noise scaled like tests/tiny_models.reinit_ (unit-variance activations at any depth, so
    nothing overflows in fp16): weights ~ N(0, 1 / fan_in), biases ~ N(0, 0.02^2), norm scales 1."""
    if like.device.type != "meta":  # real buffers such as CLIP's position ids
        return like
    if like.ndim > 1:
        std = like[0].numel() ** -0.5
    elif name.endswith("bias"):
        std = 0.02
    else:
        return torch.ones(like.shape, dtype=torch.float16)
    return (torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float16) * std).cpu()


def random_checkpoint(name, device):
    """A cached single-file checkpoint of architecture `name` with random weights, in exactly the layout
    ComfyUI saves (BaseModel.state_dict_for_saving), so its loader detects the real model."""
    path = CACHE / f"{name}_random.safetensors"
    if path.exists():
        return path
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file
    from tiny_models import SD_VAE

    class_name, unet = ARCHITECTURES[name]
    config = getattr(comfy.supported_models, class_name)(dict(unet))
    with torch.device("meta"):  # names and shapes only
        model = config.get_model({}, device="meta")
        clip = config.clip_target().clip(device="meta")
        vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    shapes = model.state_dict_for_saving(model.diffusion_model.state_dict(), clip.state_dict(), vae.state_dict())
    print(f"  writing {path.name} ({sum(v.numel() for v in shapes.values()) / 1e9:.2f}B parameters, random)", flush=True)
    # Noise on the GPU when there is one: much faster for SDXL's 3.5B weights.
    generator = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(SEED)
    sd = {k: random_tensor(k, v, generator).contiguous() for k, v in shapes.items()}
    if name == "sd2":  # SD2.x 768-v: v-prediction
        sd[SD2_V_PRED_KEY] *= 10
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)
    return path


def load_models(name, size, device):
    """MODEL, CLIP, VAE as ComfyUI's CheckpointLoaderSimple makes them (inside inference mode)."""
    import comfy.sd
    if size == "tiny":
        from tiny_models import tiny_sd15_checkpoint
        path = tiny_sd15_checkpoint(seed=0)
    else:
        path = random_checkpoint(name, device)
    with torch.inference_mode():
        return comfy.sd.load_checkpoint_guess_config(str(path))[:3]


def aesthetic_reward(size):
    """The LAION aesthetic reward as `rewards.load_aesthetic` builds it (open_clip CLIP image tower + the
    predictor's MLP), with random weights instead of the published files."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from comfy_draft.rewards.base import frozen
    from comfy_draft.rewards.clip import AestheticMLP, AestheticReward, OpenClipTowers
    cfg = REWARD_CLIP[size]
    torch.manual_seed(SEED)
    clip = CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=True)
    mlp = AestheticMLP([cfg["embed_dim"], 1024, 128, 64, 16, 1])
    return frozen(AestheticReward(OpenClipTowers(clip, cfg["vision_cfg"]["image_size"]).drop_text(), mlp))


def meta_models(name, dtype=torch.bfloat16):
    """UNet, VAE (first stage model, encoder dropped) and aesthetic reward of architecture `name` on meta."""
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from tiny_models import SD_VAE

    class_name, unet_config = ARCHITECTURES[name]
    config = getattr(comfy.supported_models, class_name)(dict(unet_config))
    with torch.device("meta"):
        unet = config.get_model({}, device="meta").diffusion_model
        vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
        reward = aesthetic_reward("real")
    vae.encoder = None
    for m in (unet, vae, reward):
        m.to(dtype).requires_grad_(False).eval()
    return unet, vae, reward, unet_config


def lora_targets(unet):
    from comfy_draft.lora import is_target
    return {n: m for n, m in unet.named_modules() if is_target(n) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def add_loras(unet, rank, path):
    """The pack's LoRAs on a bare `unet`: `bypass` (lora.attach) or `weights` (the previous path: ComfyUI's weight
    wrappers, W + delta rebuilt inside every op's weight cast)."""
    from comfy_draft.lora import LoRASet, attach
    targets = lora_targets(unet)
    with torch.device("meta"):
        loras = LoRASet({n.replace(".", "_"): m.weight.shape for n, m in targets.items()}, rank)
    for n, m in targets.items():
        lora = loras[n.replace(".", "_")]
        if path == "bypass":
            attach(m, lora)
        else:
            m.weight_function = [lora]  # what ModelPatcher.add_weight_wrapper installs at load
    return loras


@contextlib.contextmanager
def previous_lora_path(backend):
    """A TrainingBackend's LoRAs as the pack applied them before issue 14, for side-by-side timing: ComfyUI weight
    wrappers, W + delta rebuilt inside every op's weight cast, instead of the bypass hooks."""
    import comfy.model_management

    from comfy_draft.lora import attach
    unet = backend.model.model.diffusion_model
    for hook in backend.lora_hooks:
        hook.remove()
    keys = {f"diffusion_model.{path}.weight": backend.loras[name] for path, name in backend.lora_modules.items()}
    for key, lora in keys.items():
        backend.model.add_weight_wrapper(key, lora)
    comfy.model_management.unload_model_and_clones(backend.model)  # the next run loads with the wrappers
    try:
        yield
    finally:
        for key in keys:
            del backend.model.weight_wrapper_patches[key]
        comfy.model_management.unload_model_and_clones(backend.model)
        backend.lora_hooks = [attach(unet.get_submodule(path), backend.loras[name])
                              for path, name in backend.lora_modules.items()]


# ----- timing ---------------------------------------------------------------------------------------
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def release():
    """Give back everything ComfyUI and the allocator hold, between configurations."""
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(fn, *args):
    """fn(*args), or "OOM" when the device runs out of memory (the frames holding its tensors are gone
    once this returns, so the next configuration starts clean)."""
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        return "OOM"
    finally:
        release()


class PhaseClock:
    """Wall time per phase of a step. The device is synchronised only when the phase changes (a few
    times per step), so the clock barely slows the step it measures."""

    def __init__(self, device):
        self.device = device
        self.phase = None

    def enter(self, phase):
        if phase == self.phase:
            return
        synchronize(self.device)
        now = time.perf_counter()
        if self.phase is not None:
            self.totals[self.phase] += now - self.since
        self.phase, self.since = phase, now

    def measure(self, fn):
        self.totals = collections.defaultdict(float)
        self.enter("setup")
        fn()
        self.enter(None)
        return dict(self.totals)


@contextlib.contextmanager
def instrumented(trainer, clock):
    """Wrap the trainer's guided model, decoder and reward so that `clock` sees the phases of its steps:
    setup (prompts, noise, ComfyUI's sampling setup) -> sampling (no-grad calls) -> differentiated
    (forward of the differentiated calls) -> decode -> reward -> backward (including the recomputation of
    checkpointed calls) -> other (ComfyUI's cleanup) -> optimizer (clipping, AdamW, metrics)."""
    trainer.choose_gradient_checkpointing()  # by the memory estimate, which needs the reward itself
    backend, run, decode, reward = trainer.backend, trainer.backend.run, trainer.backend.decode, trainer.reward

    def timed_run(fn, *args, **kwargs):
        def timed_fn(model, x, sigmas):
            def timed_model(x, sigma, **kwargs):
                if clock.phase != "backward":  # calls during backward are checkpoint recomputation
                    clock.enter("differentiated" if torch.is_grad_enabled() else "sampling")
                return model(x, sigma, **kwargs)
            out = fn(timed_model, x, sigmas)
            clock.enter("other")
            return out
        out = run(timed_fn, *args, **kwargs)
        clock.enter("optimizer")
        return out

    def timed_decode(x0, recompute=True):
        clock.enter("decode")
        return decode(x0, recompute)

    def timed_reward(images, prompts):
        clock.enter("reward")
        scores = reward(images, prompts)
        clock.enter("backward")  # the trainer forms the loss and backpropagates next
        return scores

    backend.run, backend.decode, trainer.reward = timed_run, timed_decode, timed_reward
    try:
        yield
    finally:
        del backend.run, backend.decode  # back to the class's methods
        trainer.reward = reward


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


# ----- tensor accounting ----------------------------------------------------------------------------
# Peak bytes of one DRaFT-LV step on the meta device (accounting.py's docstring has the method): ComfyUI's own
# model classes in bf16, every op running its shape function only, `comfy_draft.memory.LiveBytes` tracking the
# bytes of every live tensor storage, attention counted as CUDA's memory-efficient SDPA kernel saves it.
@contextlib.contextmanager
def tagging(mode, **models):
    """Tag what each model's forward (and its checkpoint recomputes, which re-run its submodules) creates."""
    handles = []
    for name, model in models.items():
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(lambda m, a, name=name: mode.tags.append(name)))
            handles.append(m.register_forward_hook(lambda m, a, o: mode.tags.pop() and None))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class EfficientAttention(torch.autograd.Function):
    """SDPA as CUDA's memory-efficient kernel runs it (what the meta device cannot pick by itself)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
        ctx.save_for_backward(q, k, v, out, lse, seed, offset)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, seed, offset = ctx.saved_tensors
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False])
        return dq, dk, dv


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
    if attn_mask is not None or is_causal:
        raise NotImplementedError("masked attention is not used by these models")
    return EfficientAttention.apply(q, k, v)


@contextlib.contextmanager
def gpu_attention():
    """ComfyUI's attention as on CUDA (`attention_pytorch`, VAE `pytorch_attention`) through `sdpa`."""
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.model as vae_model
    saved = attention.optimized_attention, vae_model.vae_attention, torch.nn.functional.scaled_dot_product_attention
    attention.optimized_attention = attention.attention_pytorch
    vae_model.vae_attention = lambda: vae_model.pytorch_attention
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        attention.optimized_attention, vae_model.vae_attention, torch.nn.functional.scaled_dot_product_attention = saved


def tensor_bytes(*modules):
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def account(name, resolution, lora="bypass", decode="blocks", unet_checkpoint="call", lv_samples=2, lv_batched=False,
            rank=8, dtype=torch.bfloat16, reward_resolution=None):
    """Peak bytes of one DRaFT-LV step (batch 1): a dict of its parts (see accounting.py's docstring).

    decode: "blocks" (per image, each decoder block checkpointed), "whole" (the decoder as one checkpoint, the
    previous path) or "off". unet_checkpoint: "call" (each guided call), "blocks" (each UNet block inside each
    call) or "off".
    lv_batched: the n re-noised copies as one guided call of batch n. reward_resolution: the reward's image decoded
    at this side (the latent resized first, as `Trainer.for_reward` does); None: at `resolution`.
    """
    from comfy_draft import blockwise
    from comfy_draft.memory import LiveBytes
    from comfy_draft.sampling import recomputed

    with gpu_attention():
        unet, vae, reward, unet_config = meta_models(name, dtype)
        loras = add_loras(unet, rank, lora)
        f = 8
        latent = (1, 4, resolution // f, resolution // f)
        context_dim = unet_config["context_dim"]

        def guided(x, sigma):
            """CFG: uncond and cond in one batch, x0 = x - sigma * eps."""
            b = x.shape[0]
            context = torch.empty(2 * b, 77, context_dim, device="meta", dtype=dtype)
            extra = {"y": torch.empty(2 * b, unet_config["adm_in_channels"], device="meta", dtype=dtype)} \
                if unet_config.get("adm_in_channels") else {}
            eps = unet(torch.cat([x, x]).to(dtype), torch.empty(2 * b, device="meta"), context=context, **extra).float()
            uncond, cond = eps.chunk(2)
            return x - sigma * (uncond + 7.5 * (cond - uncond))

        # As the backends run them: "blocks" nests each UNet block's checkpoint inside the call's.
        call = blockwise.within(guided, blockwise.blocks(unet, blockwise.UNET_BLOCKS)) \
            if unet_checkpoint == "blocks" else guided

        def model(x, sigma):
            return recomputed(call, x, sigma, enabled=unet_checkpoint != "off")

        def decode_one(z):
            return vae.decode(z.to(dtype)).float()

        def decode_images(x0):
            if reward_resolution:
                side = reward_resolution // f
                x0 = torch.nn.functional.interpolate(x0, size=(side, side), mode="bilinear", antialias=True)
            if decode == "blocks":
                blocks = blockwise.blocks(vae.decoder, blockwise.DECODER_BLOCKS)
                images = blockwise.per_image(decode_one, x0, blocks)
            else:
                images = recomputed(decode_one, x0, enabled=decode == "whole")
            return ((images + 1) / 2).clamp(0, 1)

        sigma = torch.tensor(0.03)
        x0 = torch.empty(latent, device="meta")

        prefix = LiveBytes()
        with torch.no_grad(), prefix, tagging(prefix, unet=unet):
            model(torch.empty(latent, device="meta"), sigma)

        step = LiveBytes()
        with torch.enable_grad(), step, tagging(step, unet=unet, decode=vae, reward=reward):
            noises = [torch.empty(latent, device="meta") for _ in range(lv_samples)]
            if lv_batched:
                x0s = model(torch.cat([x0 + sigma * eps for eps in noises]), sigma).chunk(lv_samples)
            else:
                x0s = [model(x0 + sigma * eps, sigma) for eps in noises]
            images = [decode_images(x) for x in x0s]
            rewards = torch.stack([reward(im, ["a prompt"]).float() for im in images])
            step.phase = "backward"
            (-rewards.sum()).backward()

        decoder = LiveBytes()  # one decode's forward + backward alone: the decoder's share
        with torch.enable_grad(), decoder, tagging(decoder, decode=vae):
            x = torch.empty(latent, device="meta", requires_grad=True)
            decode_images(x).sum().backward()

    weights = tensor_bytes(unet, vae, reward)
    lora_bytes = sum(p.numel() * 4 for p in loras.parameters())
    training = 4 * lora_bytes  # fp32 weights, gradients, AdamW's two moments
    peak = max(prefix.peak, step.peak)
    split = {k: int(v) for k, v in step.at_peak.items()}
    return {"model": name, "resolution": resolution, "reward_resolution": reward_resolution or resolution,
            "dtype": str(dtype).replace("torch.", ""), "lora": lora,
            "decode": decode, "unet_checkpoint": unet_checkpoint, "lv_samples": lv_samples, "lv_batched": lv_batched,
            "weights": weights, "training": training, "prefix_transient": prefix.peak, "step_live_peak": step.peak,
            "step_split_at_peak": split, "decoder_alone": decoder.peak, "total": weights + training + peak}


def describe(r):
    split = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(r["step_split_at_peak"].items()))
    return (f"{r['model']} {r['resolution']} lora={r['lora']} decode={r['decode']} unet={r['unet_checkpoint']} "
            f"lv_batched={r['lv_batched']}: total {r['total'] / GIB:.2f} GiB = weights {r['weights'] / GIB:.2f} + "
            f"LoRA/optimizer {r['training'] / GIB:.3f} + step live {r['step_live_peak'] / GIB:.2f} (at peak: {split}); "
            f"prefix transient {r['prefix_transient'] / GIB:.2f}; decoder alone {r['decoder_alone'] / GIB:.2f}")


def account_setup(model, setup, reward_resolution=None):
    """`account` of architecture `model` at its real resolution in the SETUPS configuration `setup` (a SETUPS name
    or a short alias), printed; the row carries the SETUPS name as "config"."""
    setup = setup_name(setup)
    r = account(model, RESOLUTION["real"][model], **SETUPS[setup], reward_resolution=reward_resolution)
    r["config"] = setup
    print(describe(r), flush=True)
    return r


# ----- flow models by tensor accounting ---------------------------------------------------------------
# Real-size configs as ComfyUI's model detection reads the published files, with each family's text tokens (what its
# encoders hand the model: T5's 512 for Flux dev, CLIP-L/G 77 + T5 77 for SD3.5, a typical Qwen3 prompt for Z-Image).
FLOW_ARCHITECTURES = {
    "flux-dev": ("Flux", dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768,
                              context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
                              depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                              qkv_bias=True, guidance_embed=True, txt_ids_dims=[]), (512, 4096, 768), 1.0),
    "sd3.5-medium": ("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=24, adm_in_channels=2048,
                                 input_size=None, num_patches=147456, pos_embed_max_size=384, qk_norm="rms",
                                 x_block_self_attn_layers=list(range(13)), pos_embed_scaling_factor=None,
                                 context_embedder_config={"target": "torch.nn.Linear",
                                                          "params": {"in_features": 4096, "out_features": 1536}}),
                     (154, 4096, 2048), 4.5),
    "z-image": ("ZImage", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560,
                               n_layers=30, n_refiner_layers=2, qk_norm=True, n_heads=30, n_kv_heads=30,
                               axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
                               ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
                               pad_tokens_multiple=32), (128, 2560, None), 1.0),
}


@contextlib.contextmanager
def flow_gpu_attention():
    """`gpu_attention`, also for the flow models' own imports of ComfyUI's attention, under ComfyUI's in_training
    flag (the eager RoPE and q/k norms training runs: `backends.comfyui.in_training`)."""
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.lumina.model as lumina
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    from comfy_draft.backends.comfyui import in_training

    def unmasked(q, k, v, heads, mask=None, **kwargs):  # no padding in these prompts: the mask is all ones
        return attention.attention_pytorch(q, k, v, heads, **kwargs)
    saved = flux_math.optimized_attention, mmdit.optimized_attention, lumina.optimized_attention_masked
    flux_math.optimized_attention = mmdit.optimized_attention = attention.attention_pytorch
    lumina.optimized_attention_masked = unmasked
    try:
        with gpu_attention(), in_training():
            yield
    finally:
        flux_math.optimized_attention, mmdit.optimized_attention, lumina.optimized_attention_masked = saved


def account_flow(name, resolution=1024, reward_resolution=512, fp8=False, unet_checkpoint="blocks", lv_samples=2,
                 rank=8, dtype=torch.bfloat16):
    """Peak bytes of one DRaFT-LV step (batch 1) of flow model `name` (FLOW_ARCHITECTURES), as `account` counts an SD
    step: bf16 compute, weights in bf16 or (fp8) float8 e4m3fn cast per op as ComfyUI's manual-cast ops do, the
    reward's image decoded at `reward_resolution` (the latent resized first, as `Trainer.for_reward` does), each
    decoder block recomputed, the guided calls recomputed per call or per transformer block."""
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from tiny_models import SD_VAE

    from comfy_draft import blockwise
    from comfy_draft.backends.comfyui import FLOW_FAMILIES
    from comfy_draft.lora import LoRASet, attach
    from comfy_draft.memory import LiveBytes
    from comfy_draft.sampling import recomputed

    class_name, unet_config, (tokens, width, pooled), cfg = FLOW_ARCHITECTURES[name]
    config = getattr(comfy.supported_models, class_name)(dict(unet_config))
    config.set_inference_dtype(torch.float8_e4m3fn if fp8 else dtype, dtype if fp8 else None)
    with flow_gpu_attention():
        with torch.device("meta"):
            unet = config.get_model({}, device="meta").diffusion_model
            vae = AutoencoderKL(ddconfig=dict(SD_VAE, z_channels=16), embed_dim=16)
            reward = aesthetic_reward("real")
        vae.encoder = None
        for m in (vae, reward):
            m.to(dtype)
        for m in (unet, vae, reward):
            m.requires_grad_(False).eval()
        family = next(f for f in FLOW_FAMILIES if class_name in (c.__name__ for c in f.configs))
        suffixes = tuple("." + t for t in family.targets)
        targets = {n: m for n, m in unet.named_modules() if n.endswith(suffixes) and isinstance(m, torch.nn.Linear)}
        with torch.device("meta"):
            loras = LoRASet({n.replace(".", "_"): m.weight.shape for n, m in targets.items()}, rank)
        for n, m in targets.items():
            attach(m, loras[n.replace(".", "_")])
        latent = (1, 16, resolution // 8, resolution // 8)
        calls = 2 if cfg != 1.0 else 1  # cond and uncond in one batch; guidance-distilled: one pass

        def guided(x, sigma):
            b = x.shape[0] * calls
            context = torch.empty(b, tokens, width, device="meta", dtype=dtype)
            extra = {"y": torch.empty(b, pooled, device="meta", dtype=dtype)} if pooled else {}
            if class_name == "Flux":
                extra["guidance"] = torch.empty(b, device="meta")
            if class_name == "ZImage":
                extra["num_tokens"] = tokens
            v = unet(torch.cat([x] * calls).to(dtype), torch.empty(b, device="meta"), context, **extra).float()
            v = v if calls == 1 else v.chunk(2)[0] + cfg * (v.chunk(2)[1] - v.chunk(2)[0])
            return x - sigma * v

        call = blockwise.within(guided, blockwise.blocks(unet, blockwise.UNET_BLOCKS)) \
            if unet_checkpoint == "blocks" else guided

        def model(x, sigma):
            return recomputed(call, x, sigma, enabled=unet_checkpoint != "off")

        side = reward_resolution // 8
        decoder_blocks = blockwise.blocks(vae.decoder, blockwise.DECODER_BLOCKS)

        def decode_images(x0):
            x0 = torch.nn.functional.interpolate(x0, size=(side, side), mode="bilinear", antialias=True)
            images = blockwise.per_image(lambda z: vae.decode(z.to(dtype)).float(), x0, decoder_blocks)
            return ((images + 1) / 2).clamp(0, 1)

        sigma = torch.tensor(0.05)
        prefix = LiveBytes()
        with torch.no_grad(), prefix:
            model(torch.empty(latent, device="meta"), sigma)
        step = LiveBytes()
        with torch.enable_grad(), step, tagging(step, unet=unet, decode=vae, reward=reward):
            x0 = torch.empty(latent, device="meta")
            x0s = [model((1 - sigma) * x0 + sigma * torch.empty(latent, device="meta"), sigma)
                   for _ in range(lv_samples)]
            rewards = torch.stack([reward(decode_images(x), ["a prompt"]).float() for x in x0s])
            step.phase = "backward"
            (-rewards.sum()).backward()
    weights = tensor_bytes(unet, vae, reward)
    training = 4 * sum(p.numel() * 4 for p in loras.parameters())
    return {"model": name, "resolution": resolution, "reward_resolution": reward_resolution,
            "storage": "fp8_e4m3fn" if fp8 else str(dtype).replace("torch.", ""), "unet_checkpoint": unet_checkpoint,
            "lv_samples": lv_samples, "weights": weights, "training": training, "prefix_transient": prefix.peak,
            "step_live_peak": step.peak, "step_split_at_peak": {k: int(v) for k, v in step.at_peak.items()},
            "total": weights + training + max(prefix.peak, step.peak)}
