"""DDPO, GRAFT and P-GRAFT (comfy_draft.policy) against independent references: DDPM-space DDIM and scipy's
Gaussian densities, numpy per-prompt statistics, sorted top-K, counted model calls with the LoRA on and off."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from tiny_diffusers import tiny_pixel_backend

from comfy_draft import digits, policy, rewards
from comfy_draft.lora import load_kohya_file
from comfy_draft.sampling import sample_ddim
from comfy_draft.trainer import TrainConfig, Trainer

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


def config(**overrides):
    base = dict(prompts=PROMPTS, variant="ddpo", steps=2, sampling_steps=4, cfg=3.0, width=16, height=16,
                batch_size=2, lr=1e-2, seed=0, gradient_checkpointing=False)
    return TrainConfig(**{**base, **overrides})


def ddpm_space_step(x, denoised, sigma, sigma_next):
    """DDIM eta = 1 as DDPO writes it, in DDPM (variance-preserving) space: returns the mean and std of x_prev_vp
    and the scale sqrt(a_prev) that maps sigma space to it."""
    a, a_prev = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    std = np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    eps = (x - denoised) / sigma  # the same eps in both spaces: x_vp = sqrt(a) x0 + sqrt(1 - a) eps
    mean = np.sqrt(a_prev) * denoised + np.sqrt(1 - a_prev - std ** 2) * eps
    return mean, std, np.sqrt(a_prev)


def test_ddpo_step_is_ddpm_space_ddim_eta_1_and_its_log_prob_is_the_gaussian_density():
    g = torch.Generator().manual_seed(0)
    x, denoised = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 3, torch.randn(3, 2, 4, 4, generator=g,
                                                                                              dtype=torch.float64)
    sigma, sigma_next = torch.tensor(2.5, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)
    mean, tau = policy.ddpo_step(x, denoised, sigma, sigma_next)
    mean_vp, std_vp, scale = ddpm_space_step(x.numpy(), denoised.numpy(), 2.5, 0.9)
    np.testing.assert_allclose(mean.numpy() * scale, mean_vp, rtol=1e-10)
    np.testing.assert_allclose(float(tau) * scale, std_vp, rtol=1e-10)

    sample = mean + tau * torch.randn(x.shape, generator=g, dtype=torch.float64)
    log_prob = policy.gaussian_log_prob(sample, mean, tau)
    reference = stats.norm.logpdf(sample.numpy(), mean.numpy(), float(tau)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(log_prob.numpy(), reference, rtol=1e-5)
    # DDPM space's density differs by the Jacobian's constant only, which cancels in PPO's ratio
    in_vp = stats.norm.logpdf(sample.numpy() * scale, mean_vp, std_vp).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(in_vp - reference, np.full(3, -np.log(scale)), rtol=1e-5)
    # the last step, to sigma 0, is deterministic
    final, zero = policy.ddpo_step(x, denoised, sigma, torch.tensor(0.0, dtype=torch.float64))
    assert float(zero) == 0 and torch.equal(final, denoised)


def test_stochastic_sampler_takes_exactly_those_gaussian_steps():
    sigmas = torch.tensor([3.0, 1.5, 0.5, 0.0])

    def model(x, sigma):  # any x0 predictor
        return 0.3 * x / (1 + sigma.view(-1, 1, 1, 1))
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1)) * 3
    x0, chain = policy.sample_stochastic(model, x, sigmas, torch.Generator().manual_seed(7))
    draws = torch.Generator().manual_seed(7)
    assert chain.shape == (3, 2, 1, 3, 3) and torch.equal(chain[0], x)
    for i in range(2):
        mean, tau = policy.ddpo_step(chain[i], model(chain[i], sigmas[i].expand(2)), sigmas[i], sigmas[i + 1])
        torch.testing.assert_close(chain[i + 1], mean + tau * torch.randn(x.shape, generator=draws))
    torch.testing.assert_close(x0, model(chain[2], sigmas[2].expand(2)))
    assert policy.policy_steps(sigmas) == [0, 1]


def test_ppo_loss_is_the_clipped_surrogate():
    # float64 against numpy's float64: in float32 the loss was within 4x of rtol 1e-6 (2 eps) with AVX2 kernels
    log_prob = torch.tensor([0.0, 0.3, -0.3, 0.3, -0.3], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    loss, ratio = policy.ppo_loss(log_prob, torch.zeros(5, dtype=torch.float64), advantages, 0.1)
    assert loss.dtype == torch.float64
    r = np.exp(log_prob.detach().numpy())
    expected = np.mean(-np.minimum(r * advantages.numpy(), np.clip(r, 0.9, 1.1) * advantages.numpy()))
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-12)
    loss.backward()
    # no gradient where the ratio already moved past the range in the direction its advantage rewards (up for
    # A > 0, down for A < 0); the full gradient -A * ratio / n elsewhere
    np.testing.assert_allclose(log_prob.grad.numpy(), [-0.2, 0, -0.2 * r[2], 0.2 * r[3], 0], rtol=1e-12, atol=1e-15)


def test_advantages_are_normalised_per_prompt():
    tracker = policy.StatTracker(buffer=3, min_count=2)
    prompts = ["a", "b", "a", "b", "c"]
    first = tracker.update(prompts, [1.0, 10.0, 3.0, 30.0, 5.0])
    batch = np.array([1.0, 10.0, 3.0, 30.0, 5.0])
    np.testing.assert_allclose(first[[0, 2]], (np.array([1, 3]) - 2) / 1.0)      # a: its own mean 2, std 1
    np.testing.assert_allclose(first[[1, 3]], (np.array([10, 30]) - 20) / 10.0)  # b: mean 20, std 10
    np.testing.assert_allclose(first[4], (5 - batch.mean()) / batch.std())        # c: one reward < min_count
    second = tracker.update(["a", "a"], [5.0, 7.0])  # a's buffer keeps its last 3: 3, 5, 7
    np.testing.assert_allclose(second, (np.array([5.0, 7.0]) - 5) / np.std([3, 5, 7]))
    assert tracker.stats["a"] == [3.0, 5.0, 7.0]


def test_ppo_ratio_is_exactly_one_on_the_first_inner_epoch_and_a_round_serves_inner_epochs_steps(tmp_path):
    backend = tiny_pixel_backend(tmp_path)
    trainer = Trainer(backend, rewards.builtin_reward("brightness"),
                      config(prompts=PROMPTS[:1], inner_epochs=2, steps=3, timestep_fraction=0.5, stat_min_count=1))
    first, _ = trainer.train_step()
    round_ = trainer.rounds[0]
    assert len(round_["chosen"]) == round(0.5 * 3) and set(round_["chosen"]) <= set(range(3))  # 3 Gaussian steps
    assert torch.equal(round_["last_ratios"], torch.ones_like(round_["last_ratios"]))
    assert first["grad_norm"] > 0 and first["kl"] == 0
    second, _ = trainer.train_step()
    assert trainer.rounds[0] is round_ and second["reward"] == first["reward"]  # the same samples, a second update
    assert not torch.equal(round_["last_ratios"], torch.ones_like(round_["last_ratios"]))
    assert (round_["last_ratios"] - 1).abs().max() < 0.5
    trainer.train_step()
    assert trainer.rounds[0] is not round_  # a new round every inner_epochs steps


def test_ddpo_update_with_timesteps_batched_per_call_equals_one_call_per_timestep(tmp_path):
    """Off (memory allows), the update runs TIMESTEPS_PER_CALL timesteps per model call with per-sample sigmas; on,
    one per call: the same samples, losses and LoRA gradients (float32 summation order aside), two updates (the
    second with old log-probabilities of its own)."""
    def gradients(checkpointing):
        trainer = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"),
                          config(prompts=PROMPTS[:1], sampling_steps=7, inner_epochs=2,
                                 gradient_checkpointing=checkpointing,
                                 stat_min_count=1, max_grad_norm=0))
        out = []
        for _ in range(2):
            metrics, _ = trainer.train_step()
            out.append((metrics, torch.cat([p.grad.flatten() for p in trainer.params])))
        assert policy.timesteps_per_call(trainer.gradient_checkpointing) == (
            policy.TIMESTEPS_PER_CALL if checkpointing is False else 1)
        return out
    for (batched, g), (single, e) in zip(gradients(False), gradients(True)):
        assert batched["reward"] == single["reward"]
        assert abs(batched["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"]) + 1e-7
        assert (g - e).norm() <= 1e-4 * e.norm() and e.norm() > 0


def test_ddpo_run_resumed_mid_round_equals_an_uninterrupted_one(tmp_path):
    reward = rewards.builtin_reward("brightness")
    settings = dict(steps=3, inner_epochs=2, stat_min_count=2, timestep_fraction=0.3)
    full = Trainer(tiny_pixel_backend(tmp_path), reward, config(**settings))
    full.train()

    def stop_at_1(metrics, images):
        if metrics["step"] == 1:
            raise KeyboardInterrupt
    ckpt = tmp_path / "ddpo.ckpt"
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_pixel_backend(tmp_path), reward, config(**settings), [stop_at_1], ckpt).train()
    resumed = Trainer(tiny_pixel_backend(tmp_path), reward, config(**settings), state_path=ckpt)
    resumed.load_state(ckpt)
    resumed.train()
    assert [m["reward"] for m in resumed.history] == [m["reward"] for m in full.history]
    for name in full.loras:
        torch.testing.assert_close(resumed.loras[name].up, full.loras[name].up, rtol=1e-5, atol=1e-7)


def test_top_k_per_group_is_exactly_the_k_best_of_each_group():
    rewards_ = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    for k in (1, 3, 7):
        chosen = policy.top_k_per_group(rewards_, k)
        reference = np.concatenate([7 * g + np.argsort(-row)[:k] for g, row in enumerate(rewards_.numpy())])
        assert sorted(chosen.tolist()) == sorted(reference.tolist())
    with pytest.raises(ValueError, match="accept between 1 and 7"):
        policy.top_k_per_group(rewards_, 8)


def test_graft_round_trains_on_exactly_the_top_k_samples_of_each_prompt(tmp_path):
    trainer = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"),
                      config(variant="graft", samples_per_prompt=3, accepted_per_prompt=2, batch_size=2,
                             sampling_steps=3))
    metrics, images = trainer.train_step()
    round_ = trainer.rounds[0]
    scores = round_["rewards"].view(2, 3)
    assert sorted(round_["accepted"].tolist()) == sorted(
        (3 * g + i) for g, row in enumerate(scores.tolist()) for i in np.argsort(row)[::-1][:2])
    assert round_["x_t"].shape == (4, 3, 16, 16) and round_["sigma_t"] == 0.0  # GRAFT: t = 0, x_t = x0
    assert images.shape == (4, 3, 16, 16) and metrics["grad_norm"] > 0
    # the accepted images are the accepted samples: re-scoring them gives the top-K rewards
    np.testing.assert_allclose(trainer.reward(images).numpy(), round_["rewards"][round_["accepted"]].numpy(), rtol=1e-5)


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_graft_fits_the_guided_predictor_the_sampler_uses(tmp_path, cfg):
    """The update differentiates the model at the sampling cfg: at cfg 3 each trained call is the batched cond and
    uncond pair (the guided x0 = u + 3 (c - u)), at cfg 1 the conditional model alone."""
    backend = tiny_pixel_backend(tmp_path)
    trainer = Trainer(backend, rewards.builtin_reward("brightness"),
                      config(variant="graft", samples_per_prompt=3, accepted_per_prompt=2, batch_size=2, cfg=cfg))
    batches = []
    backend.denoiser.register_forward_pre_hook(
        lambda module, args: batches.append(args[0].shape[0]) if torch.is_grad_enabled() else None)
    trainer.train_step()
    assert batches == [(2 if cfg != 1 else 1) * 2 * 2]  # one update: 2 prompts x K = 2 accepted


class CallLog:
    """Records every denoiser call: its sigmas and whether the LoRA was on."""

    def __init__(self, backend, loras):
        self.calls, self.loras = [], loras
        backend.denoiser.register_forward_pre_hook(self.record)

    def record(self, module, args):
        strength = next(iter(self.loras.values())).strength
        self.calls.append((args[1].detach().clone(), strength != 0, torch.is_grad_enabled()))


def test_pgraft_trains_the_lora_only_above_t_and_samples_with_the_base_model_below(tmp_path):
    backend = tiny_pixel_backend(tmp_path)
    trainer = Trainer(backend, rewards.builtin_reward("brightness"),
                      config(variant="pgraft", pgraft_fraction=0.5, samples_per_prompt=2, inner_epochs=2, steps=2))
    sigmas = backend.denoiser.sampling_sigmas(4)
    switch = policy.lora_steps(0.5, 4)
    sigma_t = float(sigmas[switch])
    log = CallLog(backend, trainer.loras)
    trainer.train()
    with_lora = [sigma for sigma, on, _ in log.calls if on]
    without = [sigma for sigma, on, _ in log.calls if not on]
    assert switch == 2 and all(float(s.min()) > sigma_t for s in with_lora)  # never at or below sigma_t
    assert all(float(s.max()) <= sigma_t for s in without)
    assert all(not grad for _, on, grad in log.calls if not on)
    # one round: 2 sampling calls with the LoRA and 2 without; two updates, one LoRA call each
    assert (len(with_lora), len(without)) == (2 + 2, 2)
    trained = torch.cat([s for s, _, grad in log.calls if grad])
    assert set(trained.tolist()) <= set(sigmas[:switch].float().tolist())
    assert trainer.rounds[0]["sigma_t"] == pytest.approx(sigma_t, rel=1e-6)
    meta = trainer.lora_metadata()
    assert meta["comfy_draft_variant"] == "pgraft" and float(meta["comfy_draft_pgraft_fraction"]) == 0.5


def test_pgraft_sampler_switches_to_the_base_model_at_t(tmp_path):
    backend = tiny_pixel_backend(tmp_path)
    loras = backend.add_loras(4)
    with torch.no_grad():
        for lora in loras.values():
            lora.up.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    log = CallLog(backend, loras)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = {}

    def fn(model, x, sigmas):
        with torch.no_grad():
            out["switched"] = policy.sample_switched(model, x, sigmas, loras, 2)
            n = len(log.calls)
            x_t = sample_ddim(model, x, sigmas[:3])  # the reference: LoRA down to sigmas[2], then the base model
            with loras.disabled():
                out["reference"] = sample_ddim(model, x_t, sigmas[2:])
            out["calls"] = log.calls[:n]
        return x
    backend.run(fn, ["a red square"] * 2, "", 3.0, noise, 5)
    assert [on for _, on, _ in out["calls"]] == [True, True, False, False, False]
    torch.testing.assert_close(out["switched"], out["reference"], rtol=0, atol=0)


def test_shaped_denoising_loss_vanishes_at_the_score_of_the_accepted_points_and_is_eps_mse_at_t_0():
    x_t = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    sigma_t, sigma = 0.7, torch.tensor([1.0, 2.0, 5.0, 0.8])
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))
    s = sigma.view(-1, 1, 1, 1)

    def score_model(x_s, sigma_):  # x0 whose score is that of N(x_t, (sigma^2 - sigma_t^2) I): one accepted point
        return x_s + s ** 2 * (x_t - x_s) / (s ** 2 - sigma_t ** 2)
    assert policy.shaped_denoising_loss(score_model, x_t, sigma_t, sigma, noise) < 1e-10

    def some_model(x_s, sigma_):
        return 0.5 * x_s
    eps_hat = (x_t + s * noise - some_model(x_t + s * noise, sigma)) / s
    torch.testing.assert_close(policy.shaped_denoising_loss(some_model, x_t, 0.0, sigma, noise),
                               (eps_hat - noise).square().mean())


def test_rewards_without_gradient():
    smooth = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    jpeg = rewards.builtin_reward("jpeg_compressibility")
    buffer = io.BytesIO()
    Image.fromarray((noisy[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=95)
    assert jpeg(noisy).item() == pytest.approx(-len(buffer.getvalue()) / 1000)
    assert jpeg(smooth).item() > jpeg(noisy).item()
    assert not jpeg.differentiable and rewards.builtin_reward("brightness").differentiable
    assert not rewards.WeightedSum([jpeg, rewards.builtin_reward("brightness")], [1, 1]).differentiable

    classifier = digits.load_classifier()
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    hit = digits.DigitHit(classifier, target=None)
    prompts = [f"a {d}" for d in range(6)]
    with torch.no_grad():
        expected = (classifier(images).argmax(-1) == torch.arange(6)).float()
    assert torch.equal(hit(images, prompts), expected) and not hit.differentiable


def test_draft_refuses_a_reward_without_gradient_and_the_others_accept_it(tmp_path):
    jpeg = rewards.builtin_reward("jpeg_compressibility")
    for variant in ("draft", "draft-k", "draft-lv", "alignprop", "refl"):
        with pytest.raises(ValueError, match="has no gradient.*ddpo, graft, pgraft"):
            Trainer(tiny_pixel_backend(tmp_path), jpeg, config(variant=variant))
    for variant in ("ddpo", "graft", "pgraft"):
        Trainer(tiny_pixel_backend(tmp_path), jpeg, config(variant=variant))


@pytest.mark.parametrize("variant", policy.VARIANTS)
def test_policy_variants_refuse_several_processes(tmp_path, monkeypatch, variant):
    # their per-prompt statistics and stored rounds live in each process: N processes would not be one run
    from comfy_draft import distributed
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match=f"'{variant}' trains in one process only"):
        Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"), config(variant=variant))
    from comfy_draft import cli
    monkeypatch.setattr(cli, "load_backend", lambda args: pytest.fail("the model loaded before the refusal"))
    with pytest.raises(SystemExit, match=f"error: variant '{variant}' trains in one process only"):
        cli.main(["train", "--model", "digits", "--reward", "brightness", "--prompts", "a 1", "--variant", variant,
                  "--out", str(tmp_path / "refused.safetensors"), "--device", "cpu"])


@pytest.mark.parametrize("overrides,message", [
    (dict(variant="graft", samples_per_prompt=2, accepted_per_prompt=3), "must not exceed"),
    (dict(variant="pgraft", pgraft_fraction=1.0), "0 < pgraft_fraction < 1"),
    (dict(variant="ddpo", sampling_steps=1), "sampling_steps >= 2"),
    (dict(timestep_fraction=0.0), "timestep_fraction"),
    (dict(inner_epochs=0), "inner_epochs"),
    (dict(clip_range=0.0), "clip_range"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides).check()


def test_cli_trains_pgraft_on_a_reward_without_gradient_and_refuses_it_for_draft(tmp_path, capsys):
    from comfy_draft import cli

    out = tmp_path / "hit.safetensors"
    common = ["train", "--model", "digits", "--reward", "digit_hit", "--reward-text", "prompted", "--prompts", "a 3",
              "a 5", "--sampling-steps", "4", "--batch-size", "2", "--cfg", "0.5", "--device", "cpu", "--out", str(out)]
    cli.main([*common, "--variant", "pgraft", "--steps", "2", "--samples-per-prompt", "2", "--pgraft-fraction", "0.75",
              "--inner-epochs", "2"])
    assert "step 2/2" in capsys.readouterr().out
    metadata = load_kohya_file(out)[1]
    assert metadata["comfy_draft_variant"] == "pgraft" and metadata["comfy_draft_pgraft_fraction"] == "0.75"
    with pytest.raises(SystemExit, match="error: the reward 'argmax = prompted digit' has no gradient"):
        cli.main([*common, "--variant", "draft-lv", "--steps", "1", "--overwrite"])


def test_pgraft_validation_samples_as_pgraft_infers_and_keeps_the_best(tmp_path):
    from comfy_draft.validation import ValidationConfig, Validator

    backend = tiny_pixel_backend(tmp_path)
    validator = Validator(ValidationConfig(prompts=["a yellow star"], seeds=[1, 2], every=1))
    trainer = Trainer(backend, rewards.builtin_reward("brightness"),
                      config(variant="pgraft", samples_per_prompt=2, steps=1), validator=validator)
    sigma_t = float(backend.denoiser.sampling_sigmas(4)[policy.lora_steps(0.5, 4)])
    log = CallLog(backend, trainer.loras)
    trainer.train()
    assert [m["step"] for m in validator.history] == [0, 1] and "val_reward" in trainer.history[-1]
    assert all(float(s.min()) > sigma_t for s, on, _ in log.calls if on)
    assert sum(1 for s, on, grad in log.calls if not on and not grad) == 2 + 2 * 2  # round, then two validations
    assert trainer.kept_step in (0, 1)
