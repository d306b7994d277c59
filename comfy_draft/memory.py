"""Peak device memory of a training step, estimated before training, and what to change when it will not fit.

weights      every parameter and buffer of the UNet, VAE, text encoder and reward (exact, in their dtypes) and of
             the validation judges (in the training dtype, as validation copies them)
training     LoRA weights, gradients and AdamW's two moments (exact, float32)
activations  what autograd keeps, counted by a probe: one UNet call, one VAE decode and one reward call run
             with gradient at a small latent size, their saved tensors (or, recomputed, the peak of their
             forward + backward) measured and scaled to the real batch and area. With gradient checkpointing only one
             UNet call (or, with "blocks", one UNet block) or one image's decode is expanded at a time during
             backward, but every reward call of the step (n for DRaFT-LV) holds its activations.

`choose_gradient_checkpointing` picks the checkpointing of TrainConfig's "auto" from these estimates and the device's
`budget` (a GPU's memory, the CPU's available RAM).
"""
import collections
import os

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .policy import timesteps_per_call, trained_timesteps
from .policy import VARIANTS as ONE_CALL_VARIANTS  # they differentiate one model call at a time

PROBE_LATENT = 16  # latent side of the probe (128 px for SD); activations scale with the area beyond it

ADVICE = ("lower batch_size (use accumulation for the same effective batch), keep gradient checkpointing on, train in "
          "bf16/fp16 (precision), decode for the reward at a lower resolution (reward_resolution, e.g. 256), "
          "use fewer lv_samples or a smaller K")


def tensor_bytes(modules, dtype=None):
    """Bytes of the modules' parameters and buffers (floating-point ones counted in `dtype`, if given)."""
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                size = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
                total += t.numel() * size
    return total


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while running fn() (each storage counted once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        # Detached: an op that saves its own output would otherwise hold its graph in a reference cycle the
        # garbage collector cannot see, keeping the probe's weights alive (the probe never runs backward).
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


class LiveBytes(TorchDispatchMode):
    """Tensor accounting: the peak bytes of live tensor storages allocated while active (forward and backward,
    recomputation included), a device-independent stand-in for a GPU's max_memory_allocated that also runs on
    the meta device (shapes only, no storage). Views and in-place results of tensors made before (weights) are
    not allocations and are not counted. At the peak, `at_peak` splits the bytes by `tag`: the innermost entry
    of `tags` (pushed by `bench/fixtures.tagging` per model) when the storage was made, else `phase`."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage id -> (weak ref, bytes, tag)
        self.tags = []
        self.phase = "other"
        self.total = self.peak = 0
        self.at_peak = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        tag = self.tags[-1] if self.tags else self.phase
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in inputs:
                    self.live[ref.cdata] = (ref, storage.nbytes(), tag)
                    self.total += storage.nbytes()
        for key in [k for k, v in self.live.items() if v[0].expired()]:
            self.total -= self.live.pop(key)[1]
        if self.total > self.peak:
            self.peak = self.total
            split = collections.Counter()
            for _, n, t in self.live.values():
                split[t] += n
            self.at_peak = dict(split)
        return out


def peak_bytes(fn):
    """Peak live tensor bytes of fn() (`LiveBytes`)."""
    with LiveBytes() as live:
        fn()
    return live.peak


def autocast(device, dtype):
    """The training step's autocast: `dtype` (None: float32, no autocast) on `device`."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def probe(c, backend, reward, dtype=None):
    """What the pieces of one step of `TrainConfig` `c` hold at the probe size, for 1 and 2 images: saved bytes of one
    UNet call, decode and reward call without recomputation, and the peak of forward + backward of one UNet call with
    its blocks recomputed ("unet_blocks") and of one recomputed decode ("decode_recomputed"); whether the model
    trains without recomputation at all ("changes_saved", `changes_saved_tensors`); `dtype`: the autocast dtype."""
    shape = backend.latent_shape(c.batch_size, c.height, c.width)
    side = min(PROBE_LATENT, shape[-1], shape[-2])

    def at(batch):
        sizes = {}

        def fn(model, x, sigmas):
            with autocast(backend.device, dtype):
                sigma = sigmas[-2] * x.new_ones(batch)
                sizes["unet"] = saved_bytes(lambda: model(x, sigma))
                if batch == 1:  # (saved_bytes's hooks skip autograd's version check: a plain call)
                    x_in = x.detach().requires_grad_(True)
                    sizes["changes_saved"] = changes_saved_tensors(model(x_in, sigma), x_in)
                latent = x.detach().requires_grad_(True)
                sizes["decode"] = saved_bytes(lambda: backend.decode(latent, recompute=False))
                sizes["decode_recomputed"] = peak_bytes(
                    lambda: torch.autograd.grad(backend.decode(latent[:1], recompute=True).sum(), latent))
                full = torch.full((batch, 3, c.height, c.width), 0.5, device=latent.device, requires_grad=True)
                sizes["reward"] = saved_bytes(lambda: reward(full, c.prompts[:1] * batch))
            return x

        def blocks(model, x, sigmas):
            with autocast(backend.device, dtype):
                x = x.detach().requires_grad_(True)  # gradient to the input only: the LoRA's stays untouched
                sizes["unet_blocks"] = peak_bytes(
                    lambda: torch.autograd.grad(model(x, sigmas[-2] * x.new_ones(batch)).sum(), x))
            return x

        noise = torch.randn(batch, *shape[1:-2], side, side, generator=torch.Generator().manual_seed(0))  # not the run's RNG
        backend.run(fn, c.prompts[:1] * batch, c.negative_prompt, c.cfg, noise, 2)
        backend.run(blocks, c.prompts[:1] * batch, c.negative_prompt, c.cfg, noise, 2, recompute="blocks")
        return sizes

    with torch.inference_mode(False), torch.enable_grad():
        return at(1), at(2), shape[-2] * shape[-1] / side ** 2


def changes_saved_tensors(output, x):
    """Whether backward from `output` to `x` finds a tensor it saved changed in place since (ComfyUI's Flux and SD3
    blocks add into their input, `img += ...`): such a model trains only with its calls recomputed, whose
    recomputed tensors are not checked."""
    try:
        torch.autograd.grad(output.sum(), x)
    except RuntimeError as e:
        if "modified by an inplace operation" not in str(e):
            raise
        return True
    return False


def estimate(c, backend, reward, params, dtype=None, judges=(), gradient_checkpointing=True, probed=None):
    """{"weights", "training", "activations", "total"} in bytes for one step of `TrainConfig` `c` that trains `params`
    with `gradient_checkpointing` (False, True or "blocks"), validation judges `judges` held in `dtype` (the autocast
    dtype); `probed`: the `probe` to reuse."""
    one, two, area = probed or probe(c, backend, reward, dtype)

    # Per call: the weights autograd keeps; per image: activations, which grow with area.
    def cost(key, scales=True, images=c.batch_size):
        per_image = two[key] - one[key]
        return one[key] - per_image + images * per_image * (area if scales else 1)

    if c.variant in ONE_CALL_VARIANTS:  # one model call with gradient at a time; samples, decode, reward without
        images = c.batch_size * (c.accepted_per_prompt if c.variant != "ddpo" else 1)
        if c.variant == "ddpo":  # its update batches timesteps per call (the chain's last step, to sigma 0, is not one)
            images *= min(timesteps_per_call(gradient_checkpointing), trained_timesteps(c, c.sampling_steps - 1))
        activations = cost("unet_blocks" if gradient_checkpointing == "blocks" else "unet", images=images)
    else:
        rewards_per_step = c.lv_samples if c.variant == "draft-lv" else 1
        differentiated = {"draft": c.sampling_steps, "draft-k": c.grad_steps,
                          "alignprop": c.sampling_steps}.get(c.variant, 1)
        if gradient_checkpointing:  # inputs are kept; during backward one call is expanded, or one image's decode
            unet = cost("unet_blocks") if gradient_checkpointing == "blocks" else cost("unet")
            expanded = max(unet, cost("decode_recomputed", images=1))
        else:
            expanded = rewards_per_step * (differentiated * cost("unet") + cost("decode"))
        activations = expanded + rewards_per_step * cost("reward", scales=False)
    weights = tensor_bytes([*backend.modules(), reward]) + tensor_bytes(judges, dtype)
    training = 4 * sum(p.numel() * 4 for p in params)
    return {"weights": weights, "training": training, "activations": int(activations),
            "total": int(weights + training + activations), "gradient_checkpointing": gradient_checkpointing}


def budget(device):
    """(bytes, counts_weights, words): what a step may hold on `device`. A GPU: 90% of its memory, the weights
    included (ComfyUI may have them elsewhere until the step loads them). The CPU: 90% of the RAM available now,
    beside the weights, which are in RAM already."""
    gib = 1024 ** 3
    if device.type == "cuda":
        total = torch.cuda.mem_get_info(device)[1]
        return 0.9 * total, True, f"90% of the GPU's {total / gib:.1f} GiB"
    available = available_ram()
    return 0.9 * available, False, f"90% of the {available / gib:.1f} GiB of RAM available"


def available_ram():
    """Bytes of RAM the system can give without swapping (Linux's MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_gradient_checkpointing(c, backend, reward, params, dtype=None, judges=(), limit=None, probed=None):
    """(choice, reason): the gradient checkpointing a step runs with and why. `TrainConfig.gradient_checkpointing`
    when it is False or "blocks"; otherwise the least recomputation whose estimate fits the device's `budget`
    (`limit`: that budget given instead, as `budget` returns it), from False ("auto" only) to True to "blocks";
    `probed`: the `probe` to reuse, or a function that returns it (called only when the choice is open).
    ddpo, graft and pgraft differentiate one model call at a time, which they never recompute (only "blocks" does):
    for graft and pgraft False and True are the same; for ddpo, True is one timestep per call instead of
    `policy.TIMESTEPS_PER_CALL`. So "auto" never recomputes for nothing."""
    forced = c.gradient_checkpointing
    if forced is False or forced == "blocks":
        return forced, "as set"
    gib = 1024 ** 3
    limit, counts_weights, words = limit or budget(backend.device)
    probed = (probed() if callable(probed) else probed) or probe(c, backend, reward, dtype)
    needed = {}
    changes_saved = probed[0]["changes_saved"]
    for choice in ([False] if forced == "auto" and not changes_saved else []) + [True]:
        e = estimate(c, backend, reward, params, dtype, judges, choice, probed)
        needed[choice] = e["total"] - (0 if counts_weights else e["weights"])
        if needed[choice] <= limit:
            if choice is True and forced is True:
                return True, "as set"
            why = f"the step's estimated {needed[choice] / gib:.2f} GiB fits in {words}"
            if choice is True and changes_saved:
                why += " (the model changes tensors in place that its backward needs: it trains only recomputed)"
            elif choice is True:
                why += f" (without recomputation {needed[False] / gib:.2f} GiB would not)"
            return choice, why
    return "blocks", f"each UNet call would hold {needed[True] / gib:.2f} GiB, over {words}"


def describe(e):
    gib = 1024 ** 3
    return (f"estimated peak memory {e['total'] / gib:.2f} GiB (weights {e['weights'] / gib:.2f}, LoRA and optimizer "
            f"{e['training'] / gib:.3f}, activations {e['activations'] / gib:.2f})")


def check_fits(e, device):
    """Raise MemoryError with the settings to change when the estimate exceeds the device's memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if e["total"] > total:
        raise MemoryError(f"{describe(e)}, but {device} has {total / 1024 ** 3:.1f} GiB: {ADVICE}")
