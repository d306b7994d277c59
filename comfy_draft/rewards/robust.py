"""Rewards that are harder to hack: expectation over random transformations (EOT) and ensembles.

An adversarial pattern that fools one classifier on one exact pixel grid rarely survives a shift, a blur
or a second classifier; a change that survives them is more likely one that other models (a held-out
judge, people) also see. Both are the classic levers that make adversarial examples transfer:
expectation over transformation (Athalye et al. 2018) and ensemble attacks (Liu et al. 2017).

Step seeds. EOT's transformations are random but reproducible: `ExpectationOverTransforms(seed=...)`
draws them from a CPU generator that is reset from that seed on every call, unless a step seed is set
with `seeded(reward, step_seed)`: inside that context every EOT wrapper found in the reward (also inside
sums and ensembles) draws from a generator seeded by (its seed, the step seed), consumed call after call
(DRaFT-LV's n rewards of a step get different draws). The trainer enters it once per micro-batch with the
micro-batch's own seed (`trainer.step_generator(...).initial_seed()`), so a resumed run draws what the
uninterrupted run drew; validation and judging outside it score deterministically with the wrapper's seed.
The transforms never depend on the images' content.

The wrappers offer no image features of their own (`Reward.features`): validation measures feature diversity with a
judge's features (or, without judges, in pixels only).
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from .base import Reward

TRANSFORMS = ("translate", "flip", "scale", "blur", "noise", "color")
# At strength 1: shifts up to 12.5% of the side, zoom 0.8-1.25x, Gaussian blur up to sigma = max(1 px, side/256),
# noise std up to 0.05, brightness/contrast/saturation factors in [0.8, 1.2]. Strength scales each range.
MAX_SHIFT, MAX_LOG_ZOOM, MAX_NOISE, MAX_COLOR = 0.125, math.log(1.25), 0.05, 0.2


def draw_params(transforms, strength, batch, generator):
    """The random parameters of one draw for `batch` images: a dict of (batch,) CPU tensors."""
    def uniform(low=-1.0, high=1.0):
        return low + (high - low) * torch.rand(batch, generator=generator)

    p = {}
    if "translate" in transforms:
        p["shift_x"], p["shift_y"] = uniform() * MAX_SHIFT * strength, uniform() * MAX_SHIFT * strength
    if "flip" in transforms:
        p["flip"] = (torch.rand(batch, generator=generator) < 0.5).float()
    if "scale" in transforms:
        p["zoom"] = torch.exp(uniform() * MAX_LOG_ZOOM * strength)
    if "blur" in transforms:
        p["blur"] = uniform(0, 1) * strength  # fraction of the largest blur sigma
    if "color" in transforms:
        for key in ("brightness", "contrast", "saturation"):
            p[key] = 1 + uniform() * MAX_COLOR * strength
    if "noise" in transforms:
        p["noise_std"] = uniform(0, 1) * MAX_NOISE * strength
        p["noise_seed"] = torch.randint(2 ** 62, (batch,), generator=generator)
    return p


def apply_transforms(images, p):
    """Images (B, 3, H, W) transformed by the parameters `p` of `draw_params`; differentiable in the images.

    Order: flip, zoom and shift as one bilinear resampling (reflected borders), blur, colour, noise. Values are
    not clamped (a clamp would cut the gradient of every pixel it touches)."""
    b, _, h, w = images.shape
    device, dtype = images.device, images.dtype

    def param(key):
        return p[key].to(device, dtype)

    if {"shift_x", "flip", "zoom"} & p.keys():
        ones, zeros = torch.ones(b, device=device, dtype=dtype), torch.zeros(b, device=device, dtype=dtype)
        sx = (1 - 2 * param("flip") if "flip" in p else ones) / (param("zoom") if "zoom" in p else ones)
        sy = ones / (param("zoom") if "zoom" in p else ones)
        tx = -2 * param("shift_x") if "shift_x" in p else zeros  # grid units span 2: shift by a fraction of the side
        ty = -2 * param("shift_y") if "shift_y" in p else zeros
        theta = torch.stack([torch.stack([sx, zeros, tx], 1), torch.stack([zeros, sy, ty], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if "blur" in p:
        images = gaussian_blur(images, param("blur") * max(1.0, min(h, w) / 256))
    if "brightness" in p:
        def grey(x):
            return (x * x.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)

        images = images * param("brightness")[:, None, None, None]
        mean = grey(images).mean((2, 3), keepdim=True)
        images = mean + (images - mean) * param("contrast")[:, None, None, None]
        luma = grey(images)
        images = luma + (images - luma) * param("saturation")[:, None, None, None]
    if "noise_std" in p:
        noise = torch.stack([torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in p["noise_seed"]]).to(device, dtype)
        images = images + noise * param("noise_std")[:, None, None, None]
    return images


def gaussian_blur(images, sigmas):
    """Each image blurred by its own Gaussian (sigma in pixels, (B,); 0 leaves it as it is), reflected borders."""
    b, c, h, w = images.shape
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-x.square() / (2 * sigmas.clamp_min(1e-3)[:, None].square()))
    kernels = kernels / kernels.sum(1, keepdim=True)  # (B, K); sigma -> 0 gives a unit impulse
    kernels = kernels.repeat_interleave(c, 0)  # one kernel per (image, channel) group
    flat = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernels[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, kernels[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def parse_transforms(text):
    """'translate, blur' -> ('translate', 'blur'); 'all' -> every transform."""
    names = [t.strip().lower() for t in text.replace(",", " ").split() if t.strip()]
    if names == ["all"]:
        return TRANSFORMS
    unknown = [t for t in names if t not in TRANSFORMS]
    if unknown or not names:
        raise ValueError(f"transforms: choose from {', '.join(TRANSFORMS)} (or 'all'), got {text!r}")
    return tuple(t for t in TRANSFORMS if t in names)


class ExpectationOverTransforms(Reward):
    """mean over `draws` random transformations T_d of reward(T_d(images)): a reward that a pattern tied to exact
    pixel positions, one orientation or one level of sharpness cannot raise. The draws run as one batch of
    draws x B images. See the module docstring for how the per-step seed is set."""

    def __init__(self, reward, transforms=("translate", "scale", "blur", "noise"), strength=1.0, draws=4, seed=0):
        super().__init__()
        transforms = parse_transforms(transforms) if isinstance(transforms, str) else tuple(transforms)
        if not transforms or any(t not in TRANSFORMS for t in transforms):
            raise ValueError(f"transforms: choose from {', '.join(TRANSFORMS)}, got {transforms}")
        if draws < 1 or not strength >= 0:
            raise ValueError(f"EOT needs draws >= 1 and strength >= 0, got {draws} and {strength}")
        self.reward, self.transforms, self.strength, self.draws, self.seed = reward, transforms, float(strength), \
            int(draws), int(seed)
        self.differentiable = getattr(reward, "differentiable", True)
        self.name = f"EOT[{'+'.join(transforms)} x{draws}, strength {strength:g}]({reward.name})"
        self._generator = None  # set inside `seeded`

    def set_step_seed(self, step_seed):
        """Draw from (seed, step_seed) until the next call of this (None: back to the fixed seed per call)."""
        self._generator = None if step_seed is None else \
            torch.Generator().manual_seed((self.seed * 1_000_003 + int(step_seed)) % 2 ** 63)

    def draw(self, batch):
        """The parameters of the next `draws` transformations, one dict per draw."""
        g = self._generator if self._generator is not None else torch.Generator().manual_seed(self.seed)
        return [draw_params(self.transforms, self.strength, batch, g) for _ in range(self.draws)]

    def score(self, images, prompts):
        params = self.draw(images.shape[0])
        transformed = torch.cat([apply_transforms(images, p) for p in params])
        scores = self.reward(transformed, prompts * self.draws)
        return scores.reshape(self.draws, images.shape[0]).mean(0)


@contextlib.contextmanager
def seeded(reward, step_seed):
    """Every EOT wrapper inside `reward` draws from `step_seed` (see the module docstring) for the duration."""
    modules = reward.modules() if isinstance(reward, torch.nn.Module) else ()  # any callable scores too
    wrappers = [m for m in modules if isinstance(m, ExpectationOverTransforms)]
    for m in wrappers:
        m.set_step_seed(step_seed)
    try:
        yield reward
    finally:
        for m in wrappers:
            m.set_step_seed(None)


class Ensemble(Reward):
    """Several rewards as one, so that a LoRA must satisfy all of them.

    mean: the average. min: the soft minimum -T log mean_i exp(-r_i / T) per image, which is between min_i r_i
    (T -> 0) and the mean (T -> inf); its gradient is sum_i softmax(-r / T)_i grad r_i, so it flows mostly to the
    reward that is currently worst. The rewards should be on comparable scales (e.g. two log-probabilities)."""

    MODES = ("mean", "min")

    def __init__(self, rewards, mode="mean", temperature=1.0):
        super().__init__()
        if len(rewards) < 1:
            raise ValueError("an ensemble needs at least one reward")
        if mode not in self.MODES:
            raise ValueError(f"ensemble mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if mode == "min" and not temperature > 0:
            raise ValueError(f"the soft minimum needs a temperature > 0, got {temperature}")
        self.rewards = torch.nn.ModuleList(rewards)
        self.mode, self.temperature = mode, float(temperature)
        self.differentiable = all(getattr(r, "differentiable", True) for r in rewards)
        inner = ", ".join(r.name for r in rewards)
        self.name = f"mean({inner})" if mode == "mean" else f"softmin[T={temperature:g}]({inner})"

    def score(self, images, prompts):
        scores = torch.stack([r(images, prompts) for r in self.rewards])  # (n, B)
        if self.mode == "mean":
            return scores.mean(0)
        t = self.temperature
        return -t * (torch.logsumexp(-scores / t, 0) - math.log(len(self.rewards)))
