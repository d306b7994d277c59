"""Peak device memory of a training step, estimated before training, and what to change when it will not fit.

weights      every parameter and buffer of the UNet, VAE, text encoder and reward (exact, in their dtypes)
training     LoRA weights, gradients and AdamW's two moments (exact, float32)
activations  what autograd keeps, counted by a probe: one UNet call, one VAE decode and one reward call run
             with gradient at a small latent size, their saved tensors measured and scaled to the real
             batch and area. With checkpointing only one UNet call or decode is expanded at a time during
             backward, but every reward call of the step (n for DRaFT-LV) holds its activations.
"""
import collections

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PROBE_LATENT = 16  # latent side of the probe (128 px for SD); activations scale with the area beyond it

ADVICE = ("lower batch_size (use accumulation for the same effective batch), keep checkpointing on, train in "
          "bf16/fp16 (precision), decode for the reward at a lower resolution (reward_resolution, e.g. 256), "
          "use fewer lv_samples or a smaller K")


def tensor_bytes(modules):
    seen, total = set(), 0
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
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
    of `tags` (pushed by `bench/accounting.tagging` per model) when the storage was made, else `phase`."""

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


def estimate(trainer):
    """{"weights", "training", "activations", "total"} in bytes for one step of `trainer`."""
    c, backend = trainer.config, trainer.backend
    shape = backend.latent_shape(c.batch_size, c.height, c.width)
    side = min(PROBE_LATENT, shape[-1], shape[-2])
    area = shape[-2] * shape[-1] / side ** 2

    def probe(batch):
        """Saved bytes of one UNet call, decode and reward call at `batch` images of the probe size."""
        sizes = {}

        def fn(model, x, sigmas):
            with trainer.autocast():
                sizes["unet"] = saved_bytes(lambda: model(x, sigmas[-2] * x.new_ones(batch)))
                latent = x.detach().requires_grad_(True)
                sizes["decode"] = saved_bytes(lambda: backend.decode(latent, checkpoint=False))
                full = torch.full((batch, 3, c.height, c.width), 0.5, device=latent.device, requires_grad=True)
                sizes["reward"] = saved_bytes(lambda: trainer.reward(full, c.prompts[:1] * batch))
            return x

        noise = torch.randn(batch, *shape[1:-2], side, side)
        backend.run(fn, c.prompts[:1] * batch, c.negative_prompt, c.cfg, noise, 2)
        return sizes

    with torch.inference_mode(False), torch.enable_grad():
        one, two = probe(1), probe(2)
    # Per call: the weights autograd keeps (LoRA-patched weights); per image: activations, which grow with area.
    def cost(key, scales=True):
        per_image = two[key] - one[key]
        return one[key] - per_image + c.batch_size * per_image * (area if scales else 1)

    rewards_per_step = c.lv_samples if c.variant == "draft-lv" else 1
    differentiated = {"draft": c.sampling_steps, "draft-k": c.grad_steps, "alignprop": c.sampling_steps}.get(c.variant, 1)
    if c.checkpointing:  # inputs are kept; one call or decode at a time is expanded during backward
        expanded = max(cost("unet"), cost("decode"))
    else:
        expanded = rewards_per_step * (differentiated * cost("unet") + cost("decode"))
    activations = expanded + rewards_per_step * cost("reward", scales=False)
    weights = tensor_bytes([*backend.modules(), trainer.reward])
    training = 4 * sum(p.numel() * 4 for p in trainer.params)
    return {"weights": weights, "training": training, "activations": int(activations),
            "total": int(weights + training + activations)}


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
