"""Inverse noise correction, the P-GRAFT paper's second method (PAPER.md): better samples from a model without a
reward and without touching it, by correcting the noise its deterministic sampler starts from.

The base sampler (`sampling.sample_ddim`: the Euler step of a flow model's ODE, DDIM on eps/v models) is an
invertible map T from noise to images. Real images are inverted through T on its own step grid (`invert`); the
inverted noises are not N(0, I) where the model is imperfect, and T carries their distribution exactly to the
images. A small flow model in noise space, the `Corrector`, learns to carry N(0, I) to the inverted noises; sampling
is z ~ N(0, I) -> corrector ODE -> base ODE -> image. One corrector belongs to one base sampler: the model, its
conditioning and cfg, and the step grid it was inverted on (kept in the corrector's file).
"""
import json

import torch
import torch.nn.functional as F

from .sampling import sample_ddim


def invert(model, x0, sigmas, iterations=30, tolerance=1e-5, callback=None):
    """The x_T that `sample_ddim(model, x_T, sigmas)` maps to x0, and the largest fixed-point residual left.

    Each sampler step x_{i+1} = x_i + (s_{i+1} - s_i) d(x_i), d(x) = (x - model(x, s_i)) / s_i (the velocity of
    a flow model, eps of an eps model), is inverted in turn from the last one by backward Euler on the same grid:
    x_i = x_{i+1} - (s_{i+1} - s_i) d(x_i), solved by fixed-point iteration from x_i = x_{i+1}. The iteration is a
    contraction, and its solution unique, where |s_{i+1} - s_i| times d's Lipschitz constant is below 1 (many small
    steps, not a few large ones). It stops at `iterations` or when no sample changes by more than `tolerance`
    relative to its norm. `callback({"i", "total", "sigma", "iterations", "residual"})` after each step (it may
    raise to interrupt).
    """
    steps = len(sigmas) - 1
    x, worst = x0, 0.0
    for n, i in enumerate(reversed(range(steps))):
        sigma, h = sigmas[i], sigmas[i + 1] - sigmas[i]
        scale = x.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
        guess, residual = x, float("inf")
        for k in range(iterations):
            velocity = (guess - model(guess, sigma * guess.new_ones(guess.shape[0]))) / sigma
            new = x - h * velocity
            residual = ((new - guess).flatten(1).norm(dim=1) / scale).max().item()
            guess = new
            if residual <= tolerance:
                break
        x, worst = guess, max(worst, residual)
        if callback is not None:
            callback({"i": n, "total": steps, "sigma": float(sigma), "iterations": k + 1, "residual": residual})
    return x, worst


def invert_latents(backend, latents, prompts, negative_prompt="", cfg=1.0, steps=20, batch_size=64, iterations=30,
                   tolerance=1e-5, callback=None):
    """Unit noises (on the CPU) that `backend`'s deterministic sampler (`backend.run` + `sample_ddim`: `steps` steps
    at `cfg`) maps to `latents` (the model's latent space, as `backend.decode` takes it: pixels in [-1, 1] for the
    digit models), `batch_size` at a time, one prompt per latent; with the sampler's sigmas and the largest
    fixed-point residual (see `invert`). `callback` as `invert`'s, with "batch" and "batches" added."""
    noises, out = [], {"residual": 0.0}
    batches = -(-len(latents) // batch_size)

    def fn(model, x, sigmas):  # x: the start latent of unit noise, that is the sampler's start scale
        step = (lambda d: callback(dict(d, batch=out["batch"], batches=batches))) if callback else None
        x_T, residual = invert(model, latents[out["at"]:out["at"] + len(x)].to(x), sigmas, iterations, tolerance, step)
        noises.append((x_T / x).float().cpu())
        out.update(residual=max(out["residual"], residual), sigmas=sigmas.cpu())
        return x
    with torch.no_grad():
        for out["batch"], out["at"] in enumerate(range(0, len(latents), batch_size)):
            at = out["at"]
            backend.run(fn, prompts[at:at + batch_size], negative_prompt, cfg,
                        torch.ones(latents[at:at + batch_size].shape), steps)
    return torch.cat(noises), out["sigmas"], out["residual"]


def sample_latents(backend, noises, prompts, negative_prompt="", cfg=1.0, steps=20, batch_size=64, grid=None):
    """The deterministic sampler's x0 (on the CPU) from unit `noises`, `batch_size` at a time; with `grid`, the
    sigmas the noises belong to, checked against the sampler's."""
    latents = []

    def fn(model, x, sigmas):
        if grid is not None and (sigmas.shape != grid.shape
                                 or not torch.allclose(sigmas.double().cpu(), grid.double(), rtol=1e-4, atol=1e-6)):
            raise ValueError(f"these noises belong to another step grid ({len(grid) - 1} steps of "
                             f"{[round(float(s), 4) for s in grid[:3]]}...) than this model's sampler at {steps} steps")
        x0 = sample_ddim(model, x, sigmas)
        latents.append(x0.float().cpu())
        return x0
    with torch.no_grad():
        for at in range(0, len(noises), batch_size):
            backend.run(fn, prompts[at:at + batch_size], negative_prompt, cfg, noises[at:at + batch_size], steps)
    return torch.cat(latents)


def relative_error(x, reference):
    """The largest per-sample error norm relative to the reference's norm."""
    return ((x - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).max().item()


class Corrector(torch.nn.Module):
    """A small flow model in noise space: a UNet of two levels predicts the velocity z - q of the straight path from
    a corrected noise q (sigma 0) to z ~ N(0, I) (sigma 1); called as an x0 predictor (`model(x, sigma)`), so that
    `sampling.sample_ddim` is its Euler sampler."""

    def __init__(self, shape, width=32):
        from diffusers import UNet2DModel
        super().__init__()
        channels, height, width_px = shape
        if height % 2 or width_px % 2:
            raise ValueError(f"a corrector needs even noise sides (its UNet halves them once), got {tuple(shape)}")
        self.shape, self.width = tuple(shape), width
        self.unet = UNet2DModel(sample_size=(height, width_px), in_channels=channels, out_channels=channels,
                                block_out_channels=(width, 2 * width), layers_per_block=1,
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=min(8, width))

    def velocity(self, x, sigma):
        return self.unet(x, sigma.to(x.dtype) * 1000).sample

    def forward(self, x, sigma):
        return x - sigma.to(x.dtype).view(-1, 1, 1, 1) * self.velocity(x, sigma)

    def sample(self, z, steps):
        """Corrected noises from unit Gaussian `z` by `steps` Euler steps of the corrector's ODE."""
        with torch.no_grad():
            return sample_ddim(self, z, torch.linspace(1, 0, steps + 1, device=z.device, dtype=z.dtype))


def train_corrector(noises, width=32, steps=2000, batch_size=64, lr=1e-3, seed=0, callback=None):
    """A `Corrector` fitted to `noises` (N, C, H, W) by the flow-matching loss on independent pairs: q from
    `noises`, z ~ N(0, I), s ~ U(0, 1), x_s = (1 - s) q + s z, velocity target z - q; AdamW with cosine decay.
    `callback(step, loss)` after each step (it may raise to interrupt)."""
    if len(noises) < 2:
        raise ValueError("a corrector learns a distribution: give it at least two inverted noises")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        corrector = Corrector(noises.shape[1:], width).to(noises.device)
    opt = torch.optim.AdamW(corrector.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        q = noises[torch.randint(len(noises), (batch_size,), generator=g)]
        z = torch.randn(q.shape, generator=g).to(q)
        s = torch.rand(batch_size, generator=g).to(q)
        x = q + s.view(-1, 1, 1, 1) * (z - q)
        loss = F.mse_loss(corrector.velocity(x, s), z - q)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(corrector.parameters(), 1.0)
        opt.step()
        schedule.step()
        if callback is not None:
            callback(step, loss.item())
    return corrector.eval().requires_grad_(False)


def save(path, tensors, sigmas, info):
    """A safetensors file of `tensors`, the base sampler's `sigmas` they belong to, and `info` (what the noises were
    inverted with: model, steps, cfg, ...) as JSON metadata; written whole or not at all."""
    from safetensors.torch import save_file

    from .lora import atomic_write
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tensors["sigmas"] = sigmas.detach().double().cpu()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"comfy_draft_correction": json.dumps(info)}),
                 overwrite=True)


def load(path, kind):
    """(tensors, sigmas, info) of `save`'s file holding a `kind` ("noise" or "corrector"); a clear error otherwise."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = (f.metadata() or {}).get("comfy_draft_correction")
            tensors = {k: f.get_tensor(k) for k in f.keys()} if meta else {}
    except Exception as e:  # not a safetensors file at all
        raise ValueError(f"{path} is not a safetensors file ({e})") from None
    if not meta or json.loads(meta).get("kind") != kind:
        raise ValueError(f"{path} is not a comfy-draft {kind} file")
    return tensors, tensors.pop("sigmas"), json.loads(meta)


def save_noise(path, noise, sigmas, info):
    save(path, {"noise": noise}, sigmas, dict(info, kind="noise"))


def load_noise(path):
    tensors, sigmas, info = load(path, "noise")
    return tensors["noise"], sigmas, info


def save_corrector(path, corrector, sigmas, info):
    tensors = {f"unet.{k}": v for k, v in corrector.unet.state_dict().items()}
    save(path, tensors, sigmas, dict(info, kind="corrector", shape=list(corrector.shape), width=corrector.width))


def load_corrector(path):
    """(corrector, sigmas, info) from `save_corrector`'s file."""
    tensors, sigmas, info = load(path, "corrector")
    corrector = Corrector(info["shape"], info["width"])
    corrector.unet.load_state_dict({k[len("unet."):]: v for k, v in tensors.items()})
    return corrector.eval().requires_grad_(False), sigmas, info


def flops_per_call(module, *args):
    """Floating-point operations of one call (torch's FLOP counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args)
    return counter.get_total_flops()
