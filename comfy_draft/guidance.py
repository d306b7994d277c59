"""Annealed importance guidance (AIG, NeMo-Aligner's DRaFT+ `annealed_guidance`): sample with a mix of the base
model and the fine-tuned (LoRA) model whose weight grows along the chain.

At step i of N (i = 0 is the first, noisiest step) the prediction is eps = (1 - w_i) eps_base + w_i eps_LoRA with
  linear   w_i = i / N
  power_p  w_i = (i / N) ** p           (p = 1 is linear; larger p hands over later; p = 0 is the LoRA throughout)
  step_f   w_i = 1 once i / N >= f, else 0  (f = 0: the LoRA throughout; f = 1: the base model throughout)
so the base model lays out the image (composition, which digit, which object) and the LoRA adds what it learned
late in the chain. A trade of reward for fidelity at inference, without touching the LoRA's strength.

With x = x0 + sigma * eps at the same x and sigma, a mix of eps is the same mix of the x0 predictions, so the
samplers here, which work with x0 predictors (`sampling`), mix those (`Mixed`). Steps with w = 0 or 1 call one
model only, so w = 0 throughout is the base model's DDIM sample exactly and w = 1 throughout the LoRA model's.
"""
import torch

from .sampling import sample_ddim

SCHEDULES = ("linear", "power_p", "step_f")


def aig_weight(i, steps, schedule="linear", p=1.0, f=0.5):
    """w_i, the LoRA model's share at step i (0-based) of `steps`."""
    t = i / steps
    if schedule == "linear":
        return t
    if schedule == "power_p":
        if p < 0:
            raise ValueError(f"power_p needs p >= 0, got {p}")
        return t ** p  # 0 ** 0 == 1: p = 0 is the LoRA throughout
    if schedule == "step_f":
        return 1.0 if t >= f else 0.0
    raise ValueError(f"unknown AIG schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


def aig_weights(steps, schedule="linear", p=1.0, f=0.5):
    return [aig_weight(i, steps, schedule, p, f) for i in range(steps)]


class Mixed:
    """The x0 predictor (1 - w_i) * base + w_i * lora, where i is the step whose sigma it is called at (so any
    sampler over `sigmas`, e.g. `sampling.sample_ddim`, runs AIG). Only models with a non-zero share are called."""

    def __init__(self, base, lora, sigmas, weights):
        if len(weights) != len(sigmas) - 1:
            raise ValueError(f"AIG needs one weight per step ({len(sigmas) - 1}), got {len(weights)}")
        self.base, self.lora, self.weights = base, lora, list(weights)
        self.sigmas = sigmas.detach().float().cpu()

    def weight_at(self, sigma):
        s = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else float(sigma)
        return self.weights[int((self.sigmas[:-1] - s).abs().argmin())]

    def __call__(self, x, sigma, **kwargs):
        w = self.weight_at(sigma)
        if w <= 0:
            return self.base(x, sigma, **kwargs)
        if w >= 1:
            return self.lora(x, sigma, **kwargs)
        return (1 - w) * self.base(x, sigma, **kwargs) + w * self.lora(x, sigma, **kwargs)


@torch.no_grad()
def sample_aig(base, lora, x, sigmas, weights, extra_args=None, callback=None):
    """DDIM (eta = 0) from `x` down `sigmas` with x0 predictors `base` and `lora` mixed by `weights` (one per
    step, e.g. `aig_weights(len(sigmas) - 1, ...)`); conventions of `sampling.sample_ddim`."""
    return sample_ddim(Mixed(base, lora, sigmas, weights), x, sigmas, extra_args, callback)


def lora_toggled(model, loras):
    """(base, lora) x0 predictors from one model whose LoRAs (`lora.LoRAs`) can be disabled (the library's
    backends): the base prediction runs with the LoRAs at strength 0."""
    def base(x, sigma, **kwargs):
        with loras.disabled():
            return model(x, sigma, **kwargs)
    return base, model


class AIGBackend:
    """A library training backend (`backends.diffusers.TrainingBackend`) whose `run` hands `fn` the AIG mix of the
    base model (its LoRAs disabled) and the LoRA model, so held-out samples (`validation.held_out_images`) and
    sweeps sample with AIG unchanged. Everything else is the wrapped backend's."""

    def __init__(self, backend, loras, schedule="power_p", p=1.0, f=0.5):
        aig_weight(0, 1, schedule, p, f)  # refuses unknown schedules now
        self.backend, self.loras, self.schedule, self.p, self.f = backend, loras, schedule, p, f

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, fn, prompts, negative_prompt, cfg, noise, steps, recompute=False):
        def mixed(model, x, sigmas):
            weights = aig_weights(len(sigmas) - 1, self.schedule, self.p, self.f)
            return fn(Mixed(*lora_toggled(model, self.loras), sigmas, weights), x, sigmas)
        return self.backend.run(mixed, prompts, negative_prompt, cfg, noise, steps, recompute)
