"""Fine-tuning without reward gradients, beside DRaFT: DDPO (reinforcement learning) and GRAFT / P-GRAFT
(rejection sampling). Each trainer step's micro-batch becomes a loss here (`micro_batch`); the trainer's loop,
optimizer, clipping, training states and validation are DRaFT's own. The reward is only ever called without
gradient, so it may be any scorer (`Reward.differentiable = False`: JPEG size, a 0/1 detector).

A *round* is one batch of samples with its rewards; it is reused for `inner_epochs` consecutive trainer steps
(one optimizer update each), then a new round is sampled. Rounds are part of the training state, so a run
resumed mid-round continues exactly.

DDPO (Black et al. 2023). DDIM with eta = 1 turns each sampling step into a Gaussian policy step. In ComfyUI's
sigma parameterisation (x = x0 + sigma * eps, x = x_vp / sqrt(a) with a = alpha_bar = 1 / (1 + sigma^2)) the
DDPM-space step std s = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) becomes, divided by sqrt(a_prev),

    tau = s / sqrt(a_prev) = eta * sigma_next * sqrt(sigma^2 - sigma_next^2) / sigma

(k-diffusion's ancestral `sigma_up`), and the step is x_next ~ N(x0_hat + sqrt(sigma_next^2 - tau^2) * eps_hat,
tau^2 I) with eps_hat = (x - x0_hat) / sigma. Log-densities differ from DDPM space's by a constant (the
Jacobian sqrt(a_prev)), which cancels in the PPO ratio. The last step (to sigma 0) is deterministic and is not a
policy step, so a chain of T steps has T - 1 of them. Advantages are the rewards normalised per prompt
(`StatTracker`) and clipped; the loss is PPO-clip. A round's trained timesteps are a random subset
(`timestep_fraction`) chosen once, so that its first update's log-probabilities are the "old" ones of the later
inner epochs: the first update's ratio is exactly 1 by construction.

GRAFT / P-GRAFT (Anil et al., "Fine-Tuning Diffusion Models via Intermediate Distribution Shaping"). Sample N
images per prompt with the current model, accept the top K by reward, fine-tune with a denoising loss on the
accepted samples. P-GRAFT accepts at an intermediate step t (by the finished sample's reward) and trains only
the chain above t on the accepted x_t; at inference the LoRA runs the first `lora_steps` sampling steps
(T -> t) and the base model finishes (`sample_switched`). GRAFT is the case t = 0 (sigma_t = 0, x_t = x0).
See `shaped_denoising_loss` for the loss above t.
"""
import math

import numpy as np
import torch

from .guidance import Mixed, lora_toggled
from .sampling import noised, sample_ddim

VARIANTS = ("ddpo", "graft", "pgraft")
TIMESTEPS_PER_CALL = 4  # DDPO's update; on bench/peer.py's model 4-5 per call were fastest on the CPU (1.7x one)


# ----- DDPO ----------------------------------------------------------------------------------------------------
def ddpo_step(x, denoised, sigma, sigma_next, eta=1.0):
    """Mean and std (tau) of the DDIM-eta Gaussian step from `x` at `sigma` to `sigma_next` (see the module
    docstring); sigma_next = 0 gives (denoised, 0)."""
    tau = eta * sigma_next * (sigma ** 2 - sigma_next ** 2).clamp(min=0).sqrt() / sigma
    eps = (x - denoised) / sigma
    return denoised + (sigma_next ** 2 - tau ** 2).clamp(min=0).sqrt() * eps, tau


def gaussian_log_prob(sample, mean, std):
    """log N(sample; mean, std^2 I) per element, averaged over all but the batch dimension (DDPO's convention),
    in float32."""
    sample, mean, std = sample.float(), mean.float(), torch.as_tensor(std, dtype=torch.float32, device=sample.device)
    log_density = -(sample - mean) ** 2 / (2 * std ** 2) - std.log() - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(1)


def sample_stochastic(model, x, sigmas, g, eta=1.0):
    """DDIM with eta (no gradient): returns the final x0 and the chain (x_0 = x_T, ..., x_{T-1}), each the input of
    a step. Step noise comes from the CPU generator `g`."""
    chain = []
    for i in range(len(sigmas) - 1):
        chain.append(x)
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        if sigmas[i + 1] == 0:
            return denoised, torch.stack(chain)
        mean, tau = ddpo_step(x, denoised, sigmas[i], sigmas[i + 1], eta)
        x = mean + tau * torch.randn(x.shape, generator=g).to(x)
    return x, torch.stack(chain)


def policy_steps(sigmas):
    """Indices of the stochastic steps of a schedule (those not ending at sigma 0)."""
    return [i for i in range(len(sigmas) - 1) if sigmas[i + 1] > 0]


class StatTracker:
    """Per-prompt reward statistics over the last `buffer` rewards of each prompt (ddpo-pytorch's
    PerPromptStatTracker): advantages (r - mean) / (std + 1e-8); a prompt with fewer than `min_count` rewards
    is normalised by the whole batch's statistics instead."""

    def __init__(self, buffer=16, min_count=16):
        self.buffer, self.min_count, self.stats = buffer, min_count, {}

    def update(self, prompts, rewards):
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            mine = np.array([p == prompt for p in prompts])
            history = (self.stats.get(prompt, []) + rewards[mine].tolist())[-self.buffer:]
            self.stats[prompt] = history
            pool = rewards if len(history) < self.min_count else np.array(history)
            advantages[mine] = (rewards[mine] - pool.mean()) / (pool.std() + 1e-8)
        return advantages

    def state_dict(self):
        return {"buffer": self.buffer, "min_count": self.min_count,
                "stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state):
        self.buffer, self.min_count, self.stats = state["buffer"], state["min_count"], dict(state["stats"])


class Rounds(dict):
    """What ddpo, graft and pgraft carry from step to step, saved in the training state: each micro-batch's current
    round of samples (micro-batch index -> round) and DDPO's per-prompt reward statistics (`stats`)."""

    def __init__(self, config):
        super().__init__()
        self.stats = StatTracker(config.stat_buffer, config.stat_min_count)

    def state_dict(self):
        return {"rounds": to_cpu(dict(self)), "stat_tracker": self.stats.state_dict()}

    def load_state_dict(self, state, device):
        self.clear()
        self.update(to_device(state.get("rounds", {}), device))
        if "stat_tracker" in state:
            self.stats.load_state_dict(state["stat_tracker"])


def ppo_loss(log_prob, old_log_prob, advantages, clip_range):
    """PPO's clipped surrogate (to minimise) and the ratio exp(log_prob - old_log_prob)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


# ----- GRAFT / P-GRAFT -------------------------------------------------------------------------------------------
def top_k_per_group(rewards, k):
    """Flat indices of the `k` highest rewards in each row of `rewards` (groups, N), row by row."""
    n = rewards.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"accept between 1 and {n} samples per prompt, got {k}")
    best = rewards.float().topk(k, dim=1).indices
    return (best + n * torch.arange(rewards.shape[0], device=rewards.device)[:, None]).flatten()


def lora_steps(fraction, steps):
    """P-GRAFT's t as a step index: the first round(fraction * steps) sampling steps are the LoRA's (at least 1,
    at most steps - 1)."""
    return min(max(1, round(fraction * steps)), steps - 1)


def sample_switched(model, x, sigmas, loras, switch_step, callback=None):
    """DDIM (eta 0, no gradient) with the LoRA on for steps 0 .. switch_step - 1 (sigmas > sigma_t) and the base
    model (LoRA at strength 0) from step `switch_step` on: P-GRAFT's sampler. switch_step = T is plain sampling."""
    weights = [1.0] * switch_step + [0.0] * (len(sigmas) - 1 - switch_step)  # AIG's mix, all or nothing per step
    return sample_ddim(Mixed(*lora_toggled(model, loras), sigmas, weights), x, sigmas, callback=callback)


def shaped_denoising_loss(model, x_t, sigma_t, sigma, noise, noised=noised):
    """Denoising score matching from accepted intermediate latents x_t (at sigma_t) to a higher noise level sigma.

    The model's forward process is x = a x0 + b eps (`noised`: a = 1, b = sigma for eps/v models in sigma space;
    a = 1 - sigma, b = sigma for flow models). From x_t it continues as
        x_s = r x_t + delta * eps,  r = a / a_t,  delta = sqrt(b^2 - r^2 b_t^2),  eps ~ N(0, I),
    and the score of the accepted x_t's noised marginal is E[(r x_t - x_s) / delta^2 | x_s] (Vincent 2011). The
    model's score is (a x0_hat(x_s, sigma) - x_s) / b^2; matching the two in L2, weighted by delta^2 so that the
    target has unit variance, gives

        loss = E || (delta / b^2) * (x_s - a x0_hat(x_s, sigma)) - eps ||^2

    (for eps models E || (delta / sigma) * eps_hat(x_s, sigma) - eps ||^2), whose minimiser is the score of the
    accepted distribution at every sigma > sigma_t (what the LoRA needs to sample x_t from it). With sigma_t = 0
    (GRAFT) it is the ordinary denoising loss (eps models: ||eps_hat - eps||^2). At sigma = sigma_t the target is
    undefined, so P-GRAFT trains at sigmas strictly above sigma_t.

    sigma: (B,) noise levels, all > sigma_t; noise: eps, like x_t. Returns the mean over elements (float32).
    """
    one = torch.ones((len(sigma),) + (1,) * (x_t.ndim - 1))
    s, s_t = sigma.float().cpu(), torch.full_like(sigma, float(sigma_t), dtype=torch.float32, device="cpu")
    a, b = noised(one, s, 0 * one), noised(0 * one, s, one)
    a_t, b_t = noised(one, s_t, 0 * one), noised(0 * one, s_t, one)
    a, b, r = a.to(x_t.device), b.to(x_t.device), (a / a_t).to(x_t.device)
    delta = (b ** 2 - (r * b_t.to(x_t.device)) ** 2).sqrt()
    x_s = r * x_t.float() + delta * noise.float()
    x0_hat = model(x_s.to(x_t.dtype), sigma.to(x_t.dtype))
    return ((delta / b ** 2) * (x_s - a * x0_hat.float()) - noise.float()).square().mean()


# ----- the trainer's micro-batch for these variants ------------------------------------------------------------
def micro_batch(trainer, g, index):
    """One micro-batch of a `ddpo`, `graft` or `pgraft` step: a new round every `inner_epochs` steps, then the
    variant's loss on it, backpropagated. Returns the trainer's micro-batch dict (rewards (1, n), loss, images;
    for ddpo also policy_shift)."""
    c = trainer.config
    epoch = trainer.step % c.inner_epochs
    round_ = trainer.rounds.get(index) if epoch else None
    if round_ is None:
        round_ = (ddpo_round if c.variant == "ddpo" else graft_round)(trainer, g)
        trainer.rounds[index] = round_
    out = (ddpo_update if c.variant == "ddpo" else graft_update)(trainer, round_, g)
    return dict(out, rewards=round_["rewards"][None].float(), images=round_["images"])


def ddpo_round(trainer, g):
    c, backend = trainer.config, trainer.backend
    prompts, noise = trainer.draw(g)
    out = {}

    def fn(model, x, sigmas):
        with torch.no_grad(), trainer.autocast():
            x0, chain = sample_stochastic(model, x, sigmas, g)
            images = backend.decode(trainer.for_reward(x0), False).float()
            rewards = trainer.reward(images, prompts).float()
        steps = policy_steps(sigmas)
        count = trained_timesteps(c, len(steps))
        chosen = [steps[i] for i in torch.randperm(len(steps), generator=g)[:count].tolist()]
        out.update(chain=chain, chosen=chosen, rewards=rewards, images=images.clamp(0, 1))
        return x0

    backend.run(fn, prompts, c.negative_prompt, c.cfg, noise, c.sampling_steps, recompute=False)
    advantages = trainer.rounds.stats.update(prompts, out["rewards"].cpu().numpy())
    advantages = torch.as_tensor(advantages, dtype=torch.float32).clamp(-c.adv_clip_max, c.adv_clip_max)
    return dict(out, prompts=prompts, noise=noise, advantages=advantages, old_log_probs=None)


def ddpo_update(trainer, round_, g):
    """PPO-clip over the round's chosen timesteps, one backward per model call; the first update's old
    log-probabilities are its own (same weights, same inputs). Each call holds `timesteps_per_call` timesteps
    as one batch (per-sample sigmas), which on small models is much faster than a call per timestep."""
    c, backend = trainer.config, trainer.backend
    chosen, chain = round_["chosen"], round_["chain"]
    advantages = round_["advantages"].to(chain.device)
    first = round_["old_log_probs"] is None
    old_all, losses, shifts, ratios = [], [], [], []
    per_call = timesteps_per_call(trainer.gradient_checkpointing)

    def fn(model, x, sigmas):
        for start in range(0, len(chosen), per_call):
            steps = chosen[start:start + per_call]
            x_in = torch.cat([chain[step] for step in steps])
            with trainer.autocast():
                denoised = model(x_in, torch.cat([sigmas[step] * chain[step].new_ones(len(chain[step]))
                                                  for step in steps]))
            loss = 0
            for step, x_j, d_j in zip(steps, x_in.chunk(len(steps)), denoised.chunk(len(steps))):
                mean, tau = ddpo_step(x_j.float(), d_j.float(), sigmas[step], sigmas[step + 1])
                log_prob = gaussian_log_prob(chain[step + 1], mean, tau)
                old = log_prob.detach() if first else round_["old_log_probs"][len(old_all)].to(log_prob.device)
                step_loss, ratio = ppo_loss(log_prob, old, advantages, c.clip_range)
                loss = loss + step_loss
                old_all.append(old)
                losses.append(step_loss.detach())
                shifts.append(0.5 * (log_prob.detach() - old).square().mean())  # PPO's approximate KL
                ratios.append(ratio.detach())
            trainer.scaler.scale(loss / (len(chosen) * c.accumulation)).backward()
        return x

    backend.run(fn, round_["prompts"], c.negative_prompt, c.cfg, round_["noise"], c.sampling_steps,
                recompute=recomputation(trainer))
    if first:
        round_["old_log_probs"] = torch.stack(old_all)
    round_["last_ratios"] = torch.stack(ratios)
    return {"loss": torch.stack(losses).mean().float(), "policy_shift": torch.stack(shifts).mean().float()}


def recomputation(trainer):
    """What an update recomputes: each model call's activations are all it holds at once, so recomputing the call
    saves nothing (`memory.estimate`); only "blocks" (each UNet block inside it) lowers the peak."""
    return "blocks" if trainer.gradient_checkpointing == "blocks" else False


def timesteps_per_call(gradient_checkpointing):
    """DDPO's update: TIMESTEPS_PER_CALL timesteps per model call where memory allows (gradient checkpointing off),
    else one."""
    return TIMESTEPS_PER_CALL if gradient_checkpointing is False else 1


def trained_timesteps(c, stochastic):
    """How many of a chain's `stochastic` steps a DDPO round trains: `timestep_fraction` of them, at least one."""
    return max(1, round(c.timestep_fraction * stochastic))


def graft_round(trainer, g):
    """N samples per prompt with the current model (P-GRAFT: LoRA above t, base below), top K accepted by the
    finished sample's reward; keeps the accepted x_t (GRAFT: x0) and their prompts."""
    c, backend = trainer.config, trainer.backend
    n = c.samples_per_prompt
    prompts, noise = trainer.draw(g, per_prompt=n)
    out = {}

    def fn(model, x, sigmas):
        steps = len(sigmas) - 1
        switch = lora_steps(c.pgraft_fraction, steps) if c.variant == "pgraft" else steps
        kept = {}

        def keep_x_t(d):
            if d["i"] == switch:
                kept["x_t"] = d["x"]
        with torch.no_grad(), trainer.autocast():
            x0 = sample_switched(model, x, sigmas, trainer.loras, switch, keep_x_t)
            images = backend.decode(trainer.for_reward(x0), False).float()
            rewards = trainer.reward(images, prompts).float()
        accepted = top_k_per_group(rewards.view(-1, n), c.accepted_per_prompt)
        x_t = kept.get("x_t", x0)
        out.update(x_t=x_t[accepted.to(x_t.device)], switch=switch, sigma_t=float(sigmas[switch]), rewards=rewards,
                   accepted=accepted.cpu(), images=images[accepted.to(images.device)].clamp(0, 1))
        return x0

    backend.run(fn, prompts, c.negative_prompt, c.cfg, noise, c.sampling_steps, recompute=False)
    out["prompts"] = [prompts[i] for i in out["accepted"].tolist()]
    return out


def graft_update(trainer, round_, g):
    """The shaped denoising loss on the accepted samples, each at a sigma drawn uniformly among the schedule's
    sigmas above sigma_t (the ones the LoRA samples at), on the guided model at the sampling cfg: the predictor
    the sampler uses is the one fitted to the accepted samples. (Fitting the conditional model alone, cfg 1, leaves
    a sampler at another cfg short: at cfg 0.5 it must learn to outweigh the unconditional half. Measured on the
    digit model's argmax task: 0.05 -> 0.41 at cfg 1 against 0.05 -> 1.00 at the sampling cfg, 256 steps.)"""
    c, backend = trainer.config, trainer.backend
    x_t, switch = round_["x_t"], round_["switch"]
    picks = torch.randint(switch, (len(x_t),), generator=g)
    noise = torch.randn(x_t.shape, generator=g)
    out = {}

    def fn(model, x, sigmas):
        with trainer.autocast():
            loss = shaped_denoising_loss(model, x_t, round_["sigma_t"], sigmas[picks.to(sigmas.device)],
                                         noise.to(x_t.device), backend.noised)
        trainer.scaler.scale(loss / c.accumulation).backward()
        out["loss"] = loss.detach().float()
        return x

    backend.run(fn, round_["prompts"], c.negative_prompt, c.cfg, torch.zeros(x_t.shape), c.sampling_steps,
                recompute=recomputation(trainer))
    return out


def to_cpu(value):
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value


def to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


def sampler_for(config, loras):
    """The sampler `fn(model, x, sigmas) -> x0` that inference with this variant's LoRA uses: P-GRAFT's switch
    to the base model below t, else plain DDIM."""
    if config.variant != "pgraft":
        return sample_ddim
    return lambda model, x, sigmas: sample_switched(model, x, sigmas, loras,
                                                    lora_steps(config.pgraft_fraction, len(sigmas) - 1))


def comfy_start_percent(fraction, steps, timesteps=1000):
    """ComfyUI's hook-keyframe `start_percent` at which a LoRA hook should drop to strength 0 to reproduce P-GRAFT's
    switch on the 'ddim_uniform' schedule of `steps` steps: halfway (in timesteps) between the last LoRA step's
    timestep and t's (ComfyUI compares a keyframe's sigma with each step's sigma)."""
    k = lora_steps(fraction, steps)
    stride = timesteps // steps
    t_last_lora, t_switch = 1 + (steps - k) * stride, 1 + (steps - 1 - k) * stride
    return 1 - (t_last_lora + t_switch) / 2 / (timesteps - 1)

