"""Independent validation against reward hacking: held-out samples, judges, diversity, keep-best, sweeps.

A rising training reward says little on its own: the LoRA may be exploiting the reward model (white
blobs a classifier reads as the target digit, oversaturated "aesthetic" images, one style for every
seed). So every few steps the trainer samples a fixed held-out set (prompts and seeds never used in
training, no gradient) and records the training reward on it, any number of judge rewards, and sample
diversity (mean pairwise distance between samples of the same prompt, relative to the base model).
The LoRA kept at the end can be the best one by a chosen criterion, and training can stop early.
"""
import dataclasses

import torch

from . import distributed, memory, policy
from .rewards.base import Reward
from .sampling import sample_ddim

FIRST_HELD_OUT_SEED = 1_000_000_000  # far from any training step's seed


@dataclasses.dataclass
class ValidationConfig:
    prompts: list                   # held-out prompts (not among the training prompts)
    seeds: list = dataclasses.field(default_factory=lambda: [FIRST_HELD_OUT_SEED + i for i in range(4)])
    every: int = 10                 # validate every N training steps (also before the first and after the last)
    criterion: str = "reward"       # "reward" (held-out training reward) or the name of a judge
    diversity_floor: float = 0.0    # a validation only counts as best if pixel diversity >= floor x the base's
    patience: int = 0               # stop after this many validations without a new best (0: never stop early)
    keep_best: bool = True          # the final LoRA is the best validated one, not the last

    def validate(self, judges):
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError("validation prompts: give at least one non-empty held-out prompt")
        if not self.seeds:
            raise ValueError("validation seeds: give at least one seed")
        if self.every < 1 or self.patience < 0 or not 0 <= self.diversity_floor:
            raise ValueError("validation: every must be >= 1, patience >= 0 and diversity_floor >= 0")
        if self.criterion != "reward" and self.criterion not in judges:
            raise ValueError(f"validation criterion {self.criterion!r} is neither 'reward' nor a judge "
                             f"({', '.join(judges) or 'no judges given'})")
        if self.diversity_floor and len(self.seeds) < 2:
            raise ValueError("a diversity floor needs at least two validation seeds per prompt")


def held_out_images(backend, prompts, seeds, negative_prompt, cfg, steps, width, height, sampler=sample_ddim,
                    batch=None):
    """No-gradient DDIM samples for every prompt x seed (prompt-major), as images in [0, 1] on the CPU, sampled and
    decoded `batch` images at a time (None: all seeds of a prompt at once).

    The start noise of each image depends only on its seed, so any model sees the same noise at any batch.
    `sampler(model, x, sigmas)`: how the LoRA samples (P-GRAFT's switch to the base model below t:
    `policy.sampler_for`)."""
    images = []

    def fn(model, x, sigmas):
        x0 = sampler(model, x, sigmas)
        images.append(backend.decode(x0, recompute=False).float().cpu())
        return x0

    batch = batch or len(seeds)
    with torch.no_grad():
        for prompt in prompts:
            for i in range(0, len(seeds), batch):
                noise = torch.cat([torch.randn(backend.latent_shape(1, height, width),
                                               generator=torch.Generator().manual_seed(s)) for s in seeds[i:i + batch]])
                backend.run(fn, [prompt] * len(noise), negative_prompt, cfg, noise, steps)
    return torch.cat(images)


def mean_pairwise_distance(x, groups):
    """Mean distance between distinct rows of each consecutive group of x (N, D), averaged over groups."""
    x = x.flatten(1).float().reshape(-1, groups, x[0].numel())
    if groups < 2:
        return float("nan")
    d = torch.cdist(x, x)
    return (d.sum((1, 2)) / (groups * (groups - 1))).mean().item()


def score_images(images, prompts, n_seeds, reward, judges, feature_model=None, device="cpu"):
    """Mean training reward and judge scores of prompt-major `images`; same-prompt diversity in pixel space
    (RMS distance) and in `feature_model`'s feature space (distance of L2-normalised features)."""
    expanded = [p for p in prompts for _ in range(n_seeds)]
    with torch.no_grad():
        x = images.to(device)
        out = {"reward": reward(x, expanded).float().mean().item()}
        for name, judge in judges.items():
            out[name] = judge(x, expanded).float().mean().item()
        out["diversity"] = mean_pairwise_distance(images, n_seeds) / images[0].numel() ** 0.5
        if feature_model is not None:
            features = torch.nn.functional.normalize(feature_model.features(x).float(), dim=-1)
            out["feature_diversity"] = mean_pairwise_distance(features, n_seeds)
    return out


def feature_model_of(judges, reward):
    """The first judge (else the training reward) with image features, for diversity; or None."""
    return next((m for m in [*judges.values(), reward] if type(m).features is not Reward.features), None)


class Validator:
    """Runs validations during training and keeps the best LoRA. Metrics use the prefix `val_`:
    val_reward, val_<judge>, val_diversity and val_feature_diversity (both relative to the base model).

    Under torch.distributed the held-out samples are drawn and scored on rank 0 alone and its scores sent to every
    process, which then takes the same keep-best and early-stopping decisions from the same numbers."""

    def __init__(self, config, judges=None):
        self.config = config
        self.judges = dict(judges or {})
        self.on_device = None   # the judges as validation runs them (`__call__`)
        config.validate(self.judges)
        self.history = []       # one metrics dict per validation, with its "step"
        self.base = None        # absolute scores of the base model (LoRA at strength 0)
        self.best = None        # {"step", "score", "lora"}: the best validated LoRA so far

    def evaluate(self, loras, backend, reward, c, dtype):
        # Within a training step's memory: as many images at a time as one step scores.
        batch = c.batch_size * (c.lv_samples if c.variant == "draft-lv" else 1)
        images = held_out_images(backend, self.config.prompts, self.config.seeds, c.negative_prompt, c.cfg,
                                 c.sampling_steps, c.width, c.height, policy.sampler_for(c, loras), batch)
        with memory.autocast(backend.device, dtype):  # the reward and the judges may be in half precision
            return score_images(images, self.config.prompts, len(self.config.seeds), reward, self.on_device,
                                feature_model_of(self.on_device, reward), backend.device)

    def __call__(self, step, loras, backend, reward, c, dtype=None):
        """Validate training step `step`: `loras` on `backend`, sampled as `TrainConfig` `c` samples, scored by
        `reward` and the judges under autocast `dtype`; returns the `val_*` metrics."""
        if self.on_device is None:  # private copies in the training dtype (counted by `memory.estimate`)
            from .trainer import cast_copy
            with torch.inference_mode(False):
                self.on_device = {name: cast_copy(judge, backend.device, dtype) for name, judge in self.judges.items()}
        scores = distributed.from_main(lambda: self.evaluate(loras, backend, reward, c, dtype))
        if self.base is None:
            if any(lora.up.any() for lora in loras.values()):  # e.g. resumed from a LoRA file
                with loras.disabled():
                    self.base = distributed.from_main(lambda: self.evaluate(loras, backend, reward, c, dtype))
            else:
                self.base = scores
        metrics = {f"val_{k}": v for k, v in scores.items() if "diversity" not in k}
        for key in ("diversity", "feature_diversity"):
            if key in scores:
                metrics[f"val_{key}"] = scores[key] / self.base[key] if self.base[key] else float("nan")
        score = metrics["val_" + self.config.criterion]
        eligible = metrics["val_diversity"] >= self.config.diversity_floor if self.config.diversity_floor else True
        if eligible and (self.best is None or score > self.best["score"]):
            self.best = {"step": step, "score": score,
                         "lora": {k: v.detach().cpu().clone() for k, v in loras.state_dict().items()}}
        self.history.append(dict(metrics, step=step))
        return metrics

    def due(self, step, last_step):
        return step % self.config.every == 0 or step == last_step

    def should_stop(self):
        """True when `patience` validations have passed since the best one."""
        if not self.config.patience or self.best is None:
            return False
        return sum(1 for m in self.history if m["step"] > self.best["step"]) >= self.config.patience

    def restore_best(self, loras):
        """Load the best validated LoRA into `loras` (when keeping the best); returns its step or None."""
        if not self.config.keep_best or self.best is None:
            return None
        loras.load_state_dict(self.best["lora"])
        return self.best["step"]

    def state_dict(self):
        return {"history": self.history, "base": self.base, "best": self.best}

    def load_state_dict(self, state):
        self.history, self.base, self.best = list(state["history"]), state["base"], state["best"]


def scaled(backend, loras, strengths):
    """(strength, backend) with the backend's LoRA at each strength in turn, for `strength_sweep`."""
    for strength in strengths:
        with loras.scaled(strength):
            yield strength, backend


def strength_sweep(backends, reward, prompts, seeds, negative_prompt="", cfg=7.5, steps=50, width=512, height=512,
                   judges=None):
    """The paper's LoRA scaling with evidence: held-out scores of a LoRA at several strengths.

    `backends` yields (strength, backend with the LoRA at that strength), e.g. `scaled(backend, loras,
    [0, 0.5, 1])`. Returns (rows, images): one dict per strength (strength, reward, each judge, diversity,
    feature_diversity) and the samples, strength-major then prompt-major."""
    judges = dict(judges or {})
    rows, images = [], []
    for strength, backend in backends:
        for model in [reward, *judges.values()]:
            model.to(backend.device)
        batch = held_out_images(backend, prompts, seeds, negative_prompt, cfg, steps, width, height)
        rows.append(dict(strength=float(strength), **score_images(
            batch, prompts, len(seeds), reward, judges, feature_model_of(judges, reward), backend.device)))
        images.append(batch)
    return rows, torch.cat(images)


def sweep_table(rows):
    """A Markdown table of `strength_sweep` rows."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |" for r in rows]
    return "\n".join(lines)
