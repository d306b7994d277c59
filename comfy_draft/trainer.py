"""The DRaFT training loop: one readable loop over a backend (ComfyUI or diffusers) and a reward.

Per training step, for each micro-batch: draw prompts and start noise from a generator seeded by
(seed, step, micro-batch), sample with the variant's gradient policy, decode, score, and backpropagate
-reward into the LoRA weights; then clip the gradient norm and take an AdamW step. Deriving all
randomness from (seed, step, micro-batch) is what makes a resumed run identical to an uninterrupted one,
and lets N processes (`distributed`) split a step's micro-batches exactly as one process would draw them.

Variants (Clark et al. 2024, and the neighbours the paper unifies):
  draft      backpropagate through all T sampling steps
  draft-k    through the last K steps only (K = 1 is the paper's best per unit of compute)
  draft-lv   K = 1 with n re-noised copies of the final latent, rewards summed (lower variance)
  alignprop  K drawn uniformly from 1..T every step
  refl       stop at a random step among the last quarter, one differentiated step, reward on x0_hat
and, without reward gradients (any reward; `policy`):
  ddpo       reinforcement learning: PPO on the DDIM (eta = 1) chain's Gaussian steps (Black et al. 2023)
  graft      rejection sampling: the top K of N samples per prompt, denoising loss on them (Anil et al.)
  pgraft     GRAFT at an intermediate step t: the LoRA learns the chain above t, the base model finishes
"""
import copy
import dataclasses
import logging
import math
import random
import time

import torch

from . import distributed, memory, policy
from .lora import atomic_write, digest
from .rewards.robust import seeded
from .sampling import check_grad_steps, denoise_renoised, noised, sample_ddim

DRAFT_VARIANTS = ("draft", "draft-k", "draft-lv", "alignprop", "refl")  # differentiate the reward
VARIANTS = DRAFT_VARIANTS + policy.VARIANTS
MAX_SKIPPED = 20          # fp16 overflows in a row before training stops (the scale then fell by 2^20)
ZERO_GRADIENT_STEPS = 3   # steps without any gradient before the trainer warns
RENAMED = {"checkpointing": "gradient_checkpointing"}  # TrainConfig fields of 0.1, for its training states


@dataclasses.dataclass
class TrainConfig:
    prompts: list
    negative_prompt: str = ""
    variant: str = "draft-lv"
    grad_steps: int = 1          # K, for draft-k
    lv_samples: int = 2          # n, for draft-lv
    steps: int = 2000            # training steps (optimizer updates)
    sampling_steps: int = 50
    cfg: float = 7.5
    width: int = 512
    height: int = 512
    batch_size: int = 4
    accumulation: int = 1        # micro-batches per optimizer step
    lr: float = 4e-4
    weight_decay: float = 0.1
    rank: int = 8
    alpha: float = None          # LoRA alpha; None = rank (scale 1)
    resnet_loras: bool = False   # also adapt ResNet convolutions
    max_grad_norm: float = 1.0   # 0 disables clipping
    kl_coef: float = 0.0         # DRaFT+ regulariser: coef * ||eps_LoRA - eps_base||^2 on differentiated steps
    precision: str = "auto"      # auto | fp32 | bf16 | fp16 (autocast; LoRA weights stay fp32)
    # Gradient checkpointing (recompute in the backward pass): True (each differentiated UNet call, each decoder
    # block; on CUDA also each UNet block when a call does not fit), "blocks" (always each UNet block too), False
    # (nothing), "auto" (the least recomputation that fits the GPU, or the CPU's free RAM, by the memory estimate):
    # `memory.choose_gradient_checkpointing`.
    gradient_checkpointing: bool | str = "auto"
    reward_resolution: int = 0   # decode for the reward at this size (latents resized first; 0: full size)
    seed: int = 0
    save_every: int = 0          # training state and a LoRA snapshot every N steps (0: the state at the end only)
    # ddpo, graft, pgraft (policy.py): a round of samples serves `inner_epochs` steps (one update each)
    inner_epochs: int = 1
    samples_per_prompt: int = 4  # N, graft/pgraft: samples drawn per prompt of the batch
    accepted_per_prompt: int = 1  # K, graft/pgraft: the top K of them are trained on
    pgraft_fraction: float = 0.5  # pgraft: fraction of the sampling steps (T -> t) the LoRA runs; base below t
    timestep_fraction: float = 1.0  # ddpo: fraction of the chain's Gaussian steps trained per round
    clip_range: float = 1e-4     # ddpo: PPO ratio clip
    adv_clip_max: float = 5.0    # ddpo: advantages clipped to +/- this
    stat_buffer: int = 16        # ddpo: rewards kept per prompt for its advantage statistics
    stat_min_count: int = 16     # ddpo: below this many, a prompt is normalised by the batch statistics

    def check(self):
        """Raise ValueError naming the first setting out of range."""
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError("prompts: give at least one non-empty prompt")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.variant == "draft-k":
            check_grad_steps(self.grad_steps, self.sampling_steps)
            if self.grad_steps < 1:
                raise ValueError("draft-k needs K >= 1")
        if self.reward_resolution < 0:
            raise ValueError(f"reward_resolution must be 0 (full size) or a size in pixels, got {self.reward_resolution}")
        for name in ("lv_samples", "steps", "sampling_steps", "batch_size", "accumulation", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gradient_checkpointing not in (True, False, "auto", "blocks"):
            raise ValueError(f"gradient_checkpointing must be True, False, 'auto' or 'blocks', got "
                             f"{self.gradient_checkpointing!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        for name in ("inner_epochs", "samples_per_prompt", "accepted_per_prompt", "stat_buffer", "stat_min_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.accepted_per_prompt > self.samples_per_prompt:
            raise ValueError(f"accepted_per_prompt (K = {self.accepted_per_prompt}) must not exceed "
                             f"samples_per_prompt (N = {self.samples_per_prompt})")
        if self.variant == "ddpo" and self.sampling_steps < 2:
            raise ValueError("ddpo needs sampling_steps >= 2 (the last step, to sigma 0, is deterministic)")
        if self.variant == "pgraft" and (not 0 < self.pgraft_fraction < 1 or self.sampling_steps < 2):
            raise ValueError(f"pgraft needs 0 < pgraft_fraction < 1 and sampling_steps >= 2, got "
                             f"{self.pgraft_fraction} and {self.sampling_steps}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.clip_range <= 0 or self.adv_clip_max <= 0:
            raise ValueError(f"clip_range and adv_clip_max must be > 0, got {self.clip_range} and {self.adv_clip_max}")


def check_reward(reward, config):
    """Raise unless the variant can train on `reward`: the DRaFT family backpropagates its gradient."""
    if config.variant in DRAFT_VARIANTS and not getattr(reward, "differentiable", True):
        raise ValueError(f"the reward {reward.name!r} has no gradient, which {config.variant} backpropagates; "
                         f"train it with {', '.join(policy.VARIANTS)} (no reward gradient needed)")


def check_processes(config):
    """Raise if the variant cannot train in this many processes: DDPO's per-prompt statistics and (P-)GRAFT's stored
    rounds are per process, so N processes would not be the one-process run."""
    if distributed.world_size() > 1 and config.variant in policy.VARIANTS:
        raise ValueError(f"variant {config.variant!r} trains in one process only; under torchrun use one of "
                         f"{', '.join(DRAFT_VARIANTS)}, or run {config.variant} without torchrun")


class NonFiniteError(FloatingPointError):
    pass


def step_generator(seed, step, index=0):
    """The CPU generator of micro-batch `index` of a training step (prompts, noise and variant choices). Process r of
    N draws indices r * accumulation .. r * accumulation + accumulation - 1, so one process with N times the
    accumulation draws the same samples. Index 0 keeps the (seed, step) stream of earlier versions; other indices
    move it by a golden-ratio multiple in the high bits, far from any (seed, step)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) ^ (index * 0x9E3779B97F4A7C15 % 2 ** 64))


def autocast_dtype(precision, device, native=torch.float32):
    """The autocast dtype of `precision` (None: fp32). `auto` is fp32 off CUDA; on CUDA, as ComfyUI's trainer
    decides, the model's native compute dtype when that is fp16 (autocasting fp16 weights to bf16 re-casts every
    weight on every op), else bf16 where the card runs it natively, else fp16 (T4, V100 and RTX 20xx only
    emulate bf16, slowly, though `torch.cuda.is_bf16_supported()` says yes)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if native == torch.float16 or not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def cast_copy(module, device, dtype=None):
    """A copy of a frozen module on `device`, floating-point weights in `dtype`; the original is left as it is
    (ComfyUI hands one reward object to every node that uses it)."""
    tensors = [*module.parameters(), *module.buffers()]
    memo = {}
    for t in tensors:
        new = t.detach().to(device, dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)
        memo[id(t)] = torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new
    return copy.deepcopy(module, memo)


def differentiable_samples(model, x, sigmas, config, g, batched=False, noised=noised):
    """The variant's final predictions x0, each differentiable in the LoRA weights, and the
    differentiated model calls as (input, sigma, prediction) for the regulariser. (The backend recomputes
    the model calls: `Backend.run`.) `batched`: DRaFT-LV's n copies in one model call; `noised`: the model's forward
    process (`Backend.noised`)."""
    steps = len(sigmas) - 1
    k = {"draft": steps, "draft-k": config.grad_steps}.get(config.variant, 1)
    if config.variant == "alignprop":
        k = int(torch.randint(1, steps + 1, (), generator=g))
    if config.variant == "refl":
        window = max(1, steps // 4)
        stop = int(torch.randint(steps - window, steps, (), generator=g))  # index of the differentiated step
        sigmas = torch.cat([sigmas[:stop + 1], sigmas.new_zeros(1)])
    if config.variant == "draft-lv":
        with torch.no_grad():
            x0 = sample_ddim(model, x, sigmas)
        noises = [torch.randn(x0.shape, generator=g).to(x0) for _ in range(config.lv_samples)]
        x0s = denoise_renoised(model, x0, sigmas[-2], noises, recompute=False, batched=batched, noised=noised)
        return x0s, [(noised(x0, sigmas[-2], eps), sigmas[-2], pred) for eps, pred in zip(noises, x0s)]
    calls = []

    def record(d):
        if d["denoised"].requires_grad:
            calls.append((d["x"].detach(), d["sigma"], d["denoised"]))
    x0 = sample_ddim(model, x, sigmas, grad_steps=k, recompute=False, callback=record)
    return [x0], calls


def base_model_penalty(model, calls, loras):
    """Mean ||eps_LoRA - eps_base||^2 over differentiated calls; the base prediction at the same input
    is computed without gradient and with the LoRA disabled (DRaFT+'s KL term for Gaussian steps). On a flow model
    (x0_LoRA - x0_base) / sigma is the difference of the velocities, the drift of its Euler step."""
    terms = []
    for x, sigma, prediction in calls:
        with torch.no_grad(), loras.disabled():
            base = model(x, sigma * x.new_ones(x.shape[0]))
        terms.append(((prediction - base) / sigma).float().square().mean())
    return torch.stack(terms).mean()


class Trainer:
    """DRaFT on `backend` (see backends.*.TrainingBackend) with `reward` (rewards.Reward).

    callbacks: functions called as `fn(metrics, images)` after every step (images: the step's decoded
    samples, detached, in [0, 1]); raising from one stops training after saving the training state.
    Precision: autocast to `autocast_dtype`; LoRA weights, their gradients and the optimizer stay float32; the
    reward is scored by a private copy in that dtype. In fp16 a GradScaler skips steps whose gradient overflows
    and lowers its scale (metrics["skipped"]); only a non-finite reward or MAX_SKIPPED skips in a row stop.
    validator: a `validation.Validator`; its `val_*` metrics join the metrics of the steps it validates,
    it may stop training early, and with keep-best the LoRA left at the end is the best validated one.
    Under torch.distributed (`distributed`) every process runs this loop on its own micro-batches, with gradients
    averaged and metrics computed from every process's rewards; only rank 0 writes the LoRA and the training
    state. Callbacks run wherever they are given: the CLI gives its log and progress to rank 0 only.
    """

    def __init__(self, backend, reward, config, callbacks=(), state_path=None, validator=None):
        config.check()
        check_reward(reward, config)
        if config.variant == "ddpo" and backend.flow:
            raise ValueError("DDPO needs a stochastic sampling step with a log-probability, which flow models do not "
                             "have here; train a flow model with draft, draft-k, draft-lv, refl, alignprop, graft or "
                             "pgraft")
        self.backend, self.reward, self.config = backend, reward, config
        self.validator = validator
        self.kept_step = None  # the step of the LoRA left by `train` (the best validated one, or the last)
        self.callbacks = list(callbacks)
        self.state_path = state_path
        check_processes(config)
        self.processes = distributed.world_size()
        with torch.random.fork_rng(devices=[]):  # the LoRAs' random init (on the CPU) follows the seed too
            torch.manual_seed(config.seed)
            self.loras = backend.add_loras(config.rank, config.alpha, config.resnet_loras)
        self.params = list(self.loras.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.dtype = autocast_dtype(config.precision, backend.device, backend.compute_dtype)
        self.scaler = torch.amp.GradScaler(backend.device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.history = []
        self.warnings = []  # said once each, also to the log
        self.skipped_in_a_row = 0
        self.rounds = policy.Rounds(config)  # ddpo/graft/pgraft: each micro-batch's round of samples, DDPO's statistics
        self.gradient_checkpointing = None  # False, True or "blocks": chosen once, before the first step
        self.gradient_checkpointing_reason = None
        self._probed = None
        with torch.inference_mode(False):  # frozen: no float32 master copy needed, half the memory in bf16/fp16
            self.reward = cast_copy(reward, backend.device, self.dtype)

    # ----- one step -----------------------------------------------------------------------------------
    def micro_batch(self, g, index=0):
        """Micro-batch `index` of the step: samples, their loss, backward. Returns rewards (n, B), loss, kl, images."""
        c = self.config
        self.choose_gradient_checkpointing()
        if c.variant in policy.VARIANTS:  # no reward gradient: the variant's round of samples and its loss
            return policy.micro_batch(self, g, index)
        prompts, noise = self.draw(g)
        out = {}

        def fn(model, x, sigmas):
            # EOT rewards draw this micro-batch's transformations from its seed (rewards.robust)
            with self.autocast(), seeded(self.reward, g.initial_seed()):
                x0s, calls = differentiable_samples(model, x, sigmas, c, g, self.batches_copies, self.backend.noised)
                images = [self.backend.decode(self.for_reward(x0), bool(self.gradient_checkpointing)) for x0 in x0s]
                rewards = torch.stack([self.reward(im.float(), prompts).float() for im in images])  # (n, B)
                penalty = base_model_penalty(model, calls, self.loras) if c.kl_coef else rewards.new_zeros(())
            # DRaFT-LV sums the n rewards; the batch (and accumulation) are averaged.
            loss = (-rewards.sum(0).mean() + c.kl_coef * penalty) / c.accumulation
            self.scaler.scale(loss).backward()
            out.update(rewards=rewards.detach().float(), loss=loss.detach().float() * c.accumulation,
                       kl_penalty=penalty.detach().float(), images=images[0].detach().float().clamp(0, 1))
            return x0s[0].detach()

        self.backend.run(fn, prompts, c.negative_prompt, c.cfg, noise, c.sampling_steps,
                         recompute=self.gradient_checkpointing)
        return out

    def draw(self, g, per_prompt=1):
        """A micro-batch's prompts (each repeated `per_prompt` times) and start noise, from `g`."""
        c = self.config
        prompts = [c.prompts[i] for i in torch.randint(len(c.prompts), (c.batch_size,), generator=g)]
        prompts = [p for p in prompts for _ in range(per_prompt)]
        return prompts, torch.randn(self.backend.latent_shape(len(prompts), c.height, c.width), generator=g)

    def for_reward(self, x0):
        """x0, resized so that it decodes to `reward_resolution` pixels on its shorter side (if set)."""
        size = self.config.reward_resolution
        if not size or size >= min(self.config.width, self.config.height):
            return x0
        factor = size / min(self.config.width, self.config.height)
        target = (max(1, round(x0.shape[-2] * factor)), max(1, round(x0.shape[-1] * factor)))
        return torch.nn.functional.interpolate(x0, size=target, mode="bilinear", antialias=True, align_corners=False)

    def autocast(self):
        return memory.autocast(self.backend.device, self.dtype)

    def train_step(self):
        # Normal tensors and autograd even when called in inference mode (ComfyUI runs nodes in it).
        with torch.inference_mode(False), torch.enable_grad():
            return self._train_step()

    def _train_step(self):
        c = self.config
        started = time.perf_counter()
        first = distributed.rank() * c.accumulation  # this process's micro-batches of the step
        self.optimizer.zero_grad(set_to_none=True)
        try:
            outs = [self.micro_batch(step_generator(c.seed, self.step, first + m), m) for m in range(c.accumulation)]
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(f"{e}\n\nDRaFT ran out of device memory at step {self.step + 1} (batch "
                                         f"{c.batch_size}, {c.width}x{c.height}); to fit: {memory.ADVICE}") from e
        except RuntimeError as e:
            if self.gradient_checkpointing is False and "modified by an inplace operation" in str(e):
                raise RuntimeError(f"{e}\n\nThis model changes tensors in place that its backward needs (ComfyUI's "
                                   f"Flux and SD3 blocks do): train it with gradient checkpointing on or auto") from e
            raise
        # Averaged while still scaled, so an fp16 overflow on any process makes every process skip the step.
        distributed.average_gradients(self.params)
        rewards = distributed.gather(torch.cat([o["rewards"].flatten() for o in outs]))
        losses = distributed.gather(torch.stack([o["loss"] for o in outs]))
        penalties = distributed.gather(torch.stack([o.get("kl_penalty", torch.zeros(())) for o in outs]))
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm if c.max_grad_norm > 0 else math.inf)
        # An fp16 overflow is the GradScaler's normal signal: it skips the step and lowers its scale.
        skipped = self.scaler.is_enabled() and not torch.isfinite(grad_norm)
        if not torch.isfinite(rewards).all() or not (torch.isfinite(grad_norm) or skipped):
            what = "reward" if not torch.isfinite(rewards).all() else "gradient"
            raise NonFiniteError(f"step {self.step + 1}: non-finite {what} ({rewards.tolist()[:4]}, grad norm "
                                 f"{grad_norm.item()}); the LoRA was not updated")
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if self.skipped_in_a_row > MAX_SKIPPED:
            raise NonFiniteError(f"step {self.step + 1}: the fp16 gradient overflowed {self.skipped_in_a_row} steps in "
                                 f"a row (scale {self.scaler.get_scale():g}); train in bf16 or fp32 (precision)")
        self.scaler.step(self.optimizer)  # a no-op when skipped
        self.scaler.update()
        self.step += 1
        if skipped:
            logging.warning("DRaFT: step %d skipped: the fp16 gradient overflowed; loss scale lowered to %g",
                            self.step, self.scaler.get_scale())
        metrics = {"step": self.step, "reward": rewards.mean().item(),
                   "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0, "loss": losses.mean().item(),
                   "grad_norm": grad_norm.item(), "kl": penalties.mean().item(), "skipped": int(skipped),
                   "seconds": time.perf_counter() - started}
        if c.variant == "ddpo":  # how far an update moved the policy from the round's (PPO's approximate KL)
            metrics["policy_shift"] = distributed.gather(torch.stack([o["policy_shift"] for o in outs])).mean().item()
        self.history.append(metrics)
        self.check_gradient_reaches_loras()
        return metrics, outs[-1]["images"]

    def check_gradient_reaches_loras(self):
        """Warn once when the first steps' gradients are all exactly zero: nothing would ever train."""
        if len(self.history) == min(ZERO_GRADIENT_STEPS, self.config.steps) and \
                all(m["grad_norm"] == 0 for m in self.history):
            if self.config.variant == "ddpo":
                return self.warn(f"DDPO's gradient was exactly zero in the first {len(self.history)} steps: every "
                                 f"sample of a prompt scored the same, so all advantages were zero (a 0/1 reward "
                                 f"that never or always fires teaches nothing: make it fire sometimes)")
            self.warn(f"the reward's gradient was exactly zero in the first {len(self.history)} steps, so the LoRA "
                      f"does not change: the decoded images may be saturated (all black or white: check the VAE and "
                      f"cfg) or the reward is not differentiable")

    def warn(self, message):
        if message not in self.warnings:
            self.warnings.append(message)
            logging.warning("DRaFT: %s", message)

    def validate(self):
        with torch.inference_mode(False):
            return self.validator(self.step, self.loras, self.backend, self.reward, self.config, self.dtype)

    def train(self):
        """Run to `config.steps` (or an early stop); saves the training state every `save_every` steps, at the end, and on
        any error or interruption (holding the last good state), then re-raises. With a keep-best validator
        the LoRA is then set to the best validated one (`self.kept_step`)."""
        v = self.validator
        try:
            with self.backend.session():
                if v is not None and not v.history:
                    self.validate()  # the starting point (and the base model's diversity)
                while self.step < self.config.steps and not (v is not None and v.should_stop()):
                    metrics, images = self.train_step()
                    if v is not None and v.due(self.step, self.config.steps):
                        metrics.update(self.validate())
                    for callback in self.callbacks:
                        callback(metrics, images)
                    if self.config.save_every and self.step % self.config.save_every == 0:
                        self.save_state()
        except BaseException:
            self.save_state()
            raise
        self.save_state()
        self.kept_step = self.step
        if v is not None and v.restore_best(self.loras) is not None:
            self.kept_step = v.best["step"]
        return self.history

    @property
    def batches_copies(self):
        """Whether DRaFT-LV's n re-noised copies run as one model call: without gradient checkpointing n copies in one
        call hold what n calls would, so batch them."""
        return self.gradient_checkpointing is False

    def choose_gradient_checkpointing(self):
        """The gradient checkpointing steps run with (False, True or "blocks"): the config's, chosen once by the
        memory estimate where it leaves the choice open (`memory.choose_gradient_checkpointing`); the choice and its
        reason are logged and kept in `gradient_checkpointing_reason`."""
        if self.gradient_checkpointing is None:
            choice, why = memory.choose_gradient_checkpointing(**self.memory_inputs(), probed=self.probed)
            name = {False: "off", True: "on"}.get(choice, choice)
            self.gradient_checkpointing = choice
            self.gradient_checkpointing_reason = f"gradient checkpointing {name}: {why}"
            logging.info("DRaFT: %s", self.gradient_checkpointing_reason)
        return self.gradient_checkpointing

    def probed(self):
        """`memory.probe` of this configuration, run once."""
        if self._probed is None:
            self._probed = memory.probe(self.config, self.backend, self.reward, self.dtype)
        return self._probed

    def memory_inputs(self):
        """What a step's memory depends on, as `memory.estimate` takes it."""
        judges = self.validator.judges.values() if self.validator is not None else ()
        return dict(c=self.config, backend=self.backend, reward=self.reward, params=self.params, dtype=self.dtype,
                    judges=judges)

    def memory_estimate(self):
        """Estimated peak device memory of a step (see `memory`), with the gradient checkpointing it runs with
        (`choose_gradient_checkpointing`); raises MemoryError if it cannot fit."""
        estimate = memory.estimate(**self.memory_inputs(), gradient_checkpointing=self.choose_gradient_checkpointing(),
                                   probed=self.probed())
        memory.check_fits(estimate, self.backend.device)
        return estimate

    # ----- files --------------------------------------------------------------------------------------
    def lora_metadata(self):
        c = self.config
        meta = {"ss_base_model_version": self.backend.base_model_version, "comfy_draft_reward": self.reward.name,
                "comfy_draft_variant": c.variant, "comfy_draft_steps": str(self.step if self.kept_step is None else self.kept_step),
                "comfy_draft_prompts_sha256": digest(c.prompts), "comfy_draft_config": dataclasses.asdict(c)}
        if self.validator is not None and self.validator.best:
            best = {k: v for k, v in self.validator.best.items() if k != "lora"}
            meta["comfy_draft_validation"] = {"config": dataclasses.asdict(self.validator.config), "best": best}
        if self.processes > 1:
            meta["comfy_draft_processes"] = str(self.processes)
        if c.variant == "pgraft":  # inference: LoRA from T down to t, base model below (policy.sample_switched)
            k = policy.lora_steps(c.pgraft_fraction, c.sampling_steps)
            meta["comfy_draft_pgraft_fraction"] = str(k / c.sampling_steps)
            percent = policy.comfy_start_percent(c.pgraft_fraction, c.sampling_steps)
            meta["comfy_draft_pgraft_start_percent"] = f"{percent:.4f}"
        return meta

    def save_lora(self, path, overwrite=False):
        """Write the LoRA file (rank 0 only under torch.distributed; the others return None)."""
        if not distributed.is_main():
            return None
        return self.loras.save(path, self.lora_metadata(), overwrite)

    def save_state(self, path=None):
        """Everything needed to resume exactly: LoRA (fp32), optimizer, scaler, RNG, step, history, the number of
        processes. Rank 0 writes it (every process holds the same state); the others return None."""
        path = path or self.state_path
        if path is None or not distributed.is_main():
            return None
        state = {"lora": {k: v.detach().cpu() for k, v in self.loras.state_dict().items()},
                 "lora_alpha": {k: m.alpha for k, m in self.loras.items()},
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                 "step": self.step, "history": self.history, "config": dataclasses.asdict(self.config),
                 "processes": self.processes,
                 "validator": self.validator.state_dict() if self.validator is not None else None,
                 **self.rounds.state_dict()}
        atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)
        return path

    def load_state(self, path):
        with torch.inference_mode(False):  # normal tensors: the optimizer state is updated in place by each step
            return self._load_state(path)

    def _load_state(self, path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        processes = state.get("processes", 1)
        if processes != self.processes:  # the samples of a step depend on the number of processes
            raise ValueError(f"{path} was written by a run with {processes} process(es); resume it with the same "
                             f"number (torchrun --nproc_per_node {processes}), not {self.processes}")
        saved = {RENAMED.get(k, k): v for k, v in state["config"].items() if k not in ("steps", "save_every")}
        current = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in ("steps", "save_every")}
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise ValueError(f"{path} was made with a different configuration ({', '.join(changed)}); "
                             f"resume with the same settings (only steps and save_every may change)")
        self.loras.load_state_dict(state["lora"])
        for name, alpha in state["lora_alpha"].items():
            self.loras[name].alpha = alpha
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.history = state["step"], list(state["history"])
        if self.validator is not None and state.get("validator"):
            self.validator.load_state_dict(state["validator"])
        self.rounds.load_state_dict(state, self.backend.device)
        return self
