"""DRaFT training on a tiny text-conditioned pixel-space diffusers model: variant semantics, learning,
resume, non-finite handling, and kohya files that diffusers' own LoRA loader reads back."""
import pytest
import torch
from tiny_diffusers import sd_scheduler, tiny_pixel_backend

from comfy_draft import rewards
from comfy_draft.backends.diffusers import guided, sample
from comfy_draft.lora import load_kohya_file
from comfy_draft.sampling import denoise_renoised
from comfy_draft.trainer import NonFiniteError, TrainConfig, Trainer

TRAIN_PROMPTS = ["a red square", "a blue circle", "a green triangle"]
HELD_OUT_PROMPTS = ["a yellow star", "a purple heart"]


def config(**overrides):
    base = dict(prompts=TRAIN_PROMPTS, variant="draft-lv", steps=3, sampling_steps=6, cfg=3.0, width=16, height=16,
                batch_size=2, lr=1e-2, seed=0)
    return TrainConfig(**{**base, **overrides})


class CountingUNet:
    """Counts the UNet's forward calls made with autograd recording, during the forward phase."""

    def __init__(self, unet):
        self.grad_calls = self.calls = 0
        self.original = unet.forward
        unet.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.grad_calls += torch.is_grad_enabled()
        return self.original(*args, **kwargs)


@pytest.mark.parametrize("variant,k,expected", [
    ("draft", 1, 6), ("draft-k", 1, 1), ("draft-k", 3, 3), ("draft-lv", 1, 1), ("refl", 1, 1), ("alignprop", 1, None)])
def test_variant_semantics_and_lora_gradients(tmp_path, variant, k, expected):
    backend = tiny_pixel_backend(tmp_path)
    trainer = Trainer(backend, rewards.builtin_reward("brightness"),
                      config(variant=variant, grad_steps=k, lv_samples=2, gradient_checkpointing=False))
    counter = CountingUNet(backend.unet)
    trainer.micro_batch(torch.Generator().manual_seed(0))
    if expected is None:  # alignprop draws K in 1..T
        assert 1 <= counter.grad_calls <= 6
    else:
        assert counter.grad_calls == expected  # cond and uncond share one batched UNet call
    if variant == "draft-lv":
        # the no-grad chain, then the n re-noised copies in one differentiated call (batched without checkpointing)
        assert counter.calls == 6 + 1
    ups = [lora.up.grad for lora in trainer.loras.values()]
    downs = [lora.down.grad for lora in trainer.loras.values()]
    assert all(g is not None and torch.isfinite(g).all() for g in ups + downs)
    assert sum(g.abs().sum() for g in ups) > 0  # (down's gradient is zero while up is at its zero init)


@pytest.mark.parametrize("rank", [4, 16])
def test_lora_initialisation_is_peft_gaussian(rank):
    """The scale of the LoRA's start (which sets how far each Adam step moves the model): down as peft's
    init_lora_weights="gaussian" draws lora_A (TRL's AlignProp and DDPO), up zero; not kaiming-uniform, whose
    standard deviation on this 640-wide layer would be a quarter of it at rank 4."""
    import peft
    from comfy_draft.lora import LoRA

    torch.manual_seed(0)
    ours = LoRA((320, 640), rank)
    layer = torch.nn.Sequential(torch.nn.Linear(640, 320))
    theirs = peft.get_peft_model(layer, peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                        target_modules=["0"])).base_model.model[0]
    expected = theirs.lora_A["default"].weight.std().item()
    samples = rank * 640
    tolerance = 5 / (2 * samples) ** 0.5  # five standard errors of a sample standard deviation
    assert abs(ours.down.std().item() / expected - 1) < 2 * tolerance
    assert abs(ours.down.std().item() * rank - 1) < tolerance
    assert abs(ours.down.mean().item()) * rank < 5 / samples ** 0.5
    assert not ours.up.any() and not theirs.lora_B["default"].weight.any()


def test_lv_renoised_inputs_are_detached_x0_plus_sigma_eps():
    seen, w = [], torch.tensor(0.5, requires_grad=True)

    def model(x, sigma):
        seen.append((x, sigma))
        return w * x

    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    noises = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    outs = denoise_renoised(model, x0 * 2, torch.tensor(0.3), noises, recompute=False)
    assert len(outs) == 3
    for (x, sigma), eps in zip(seen, noises):
        torch.testing.assert_close(x, (x0 * 2).detach() + 0.3 * eps)
        assert torch.all(sigma == 0.3) and x.grad_fn is None
    sum(o.sum() for o in outs).backward()
    assert x0.grad is None and w.grad is not None  # stop-gradient on x0, gradient to the model


def held_out_reward(trainer, seeds=range(8)):
    """Mean brightness of held-out prompts x seeds (no gradients), and per-sample values."""
    backend, values = trainer.backend, []
    with torch.no_grad():
        for prompt in HELD_OUT_PROMPTS:
            for seed in seeds:
                noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1000 + seed))
                x0 = sample(backend.denoiser, backend.encode([prompt]), backend.encode([""]), 3.0, noise, 6)
                values.append(trainer.reward(backend.decode(x0)).item())
    values = torch.tensor(values)
    return values.mean().item(), values


@pytest.mark.slow
def test_draft_lv_raises_held_out_reward_and_lr_zero_does_not(tmp_path):
    results = {}
    for lr in (1e-2, 0.0):
        trainer = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"),
                          config(steps=30, lr=lr, batch_size=2))
        before, samples = held_out_reward(trainer)
        trainer.train()
        after, _ = held_out_reward(trainer)
        stderr = samples.std().item() / len(samples) ** 0.5  # seed-to-seed noise of the held-out mean
        results[lr] = (before, after, stderr)
        print(f"lr={lr}: held-out brightness {before:.4f} -> {after:.4f} (standard error {stderr:.4f})")
    before, after, stderr = results[1e-2]
    assert after - before > 5 * stderr
    before0, after0, _ = results[0.0]
    assert after0 == before0


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    reward = rewards.builtin_reward("brightness")
    full = Trainer(tiny_pixel_backend(tmp_path), reward, config(steps=4, variant="alignprop"))
    full.train()

    def interrupt_at_2(metrics, images):
        assert images.shape == (2, 3, 16, 16) and 0 <= images.min() <= images.max() <= 1  # previews
        if metrics["step"] == 2:
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.state.pt"
    first = Trainer(tiny_pixel_backend(tmp_path), reward, config(steps=4, variant="alignprop"), [interrupt_at_2], ckpt)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = Trainer(tiny_pixel_backend(tmp_path), reward, config(steps=4, variant="alignprop"), state_path=ckpt)
    resumed.load_state(ckpt)
    assert resumed.step == 2
    resumed.train()
    assert resumed.step == 4 and [m["step"] for m in resumed.history] == [1, 2, 3, 4]
    for name in full.loras:
        torch.testing.assert_close(resumed.loras[name].up, full.loras[name].up, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(resumed.loras[name].down, full.loras[name].down, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="different configuration.*lr"):
        Trainer(tiny_pixel_backend(tmp_path), reward, config(steps=4, lr=0.5, variant="alignprop")).load_state(ckpt)
    # a state written by 0.1, which called the gradient checkpointing setting `checkpointing`, resumes too
    state = torch.load(ckpt, weights_only=True)
    state["config"]["checkpointing"] = state["config"].pop("gradient_checkpointing")
    torch.save(state, tmp_path / "old.ckpt")
    old = Trainer(tiny_pixel_backend(tmp_path), reward, config(steps=4, variant="alignprop")).load_state(tmp_path / "old.ckpt")
    assert old.step == 4


def test_bf16_autocast_step(tmp_path):
    trainer = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"),  # bf16 is emulated on
                      config(steps=1, sampling_steps=2, batch_size=1, precision="bf16"))  # CPUs without AVX-512
    assert trainer.dtype == torch.bfloat16
    metrics, _ = trainer.train_step()
    assert torch.isfinite(torch.tensor([metrics["reward"], metrics["grad_norm"]])).all() and metrics["grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in trainer.params)  # fp32 master LoRA weights


class NaNAfter(rewards.Reward):
    name = "nan after step 2"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def score(self, images, prompts):
        self.calls += 1
        value = images.mean((1, 2, 3))
        return value * float("nan") if self.calls > 2 else value


def test_non_finite_reward_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    trainer = Trainer(tiny_pixel_backend(tmp_path), NaNAfter(),  # set: no memory probe calls the reward
                      config(steps=5, variant="draft-k", gradient_checkpointing=False), state_path=ckpt)
    with pytest.raises(NonFiniteError, match="step 3: non-finite reward"):
        trainer.train()
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2
    good = {k: v.clone() for k, v in trainer.loras.state_dict().items()}
    for k, v in state["lora"].items():
        torch.testing.assert_close(v, good[k])
        assert torch.isfinite(v).all()


@pytest.mark.parametrize("resnets", [False, True])
def test_kohya_file_loads_in_diffusers_and_reproduces_the_trained_model(tmp_path, resnets):
    from diffusers import StableDiffusionPipeline
    from tiny_diffusers import tiny_text_encoder, tiny_unet

    trainer = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"),
                      config(steps=3, lr=5e-2, resnet_loras=resnets))
    trainer.train()
    path = trainer.save_lora(tmp_path / "bright.safetensors")
    with pytest.raises(FileExistsError):
        trainer.save_lora(path)
    state_dict, metadata = load_kohya_file(path)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in state_dict)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state_dict
    assert ("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in state_dict) == resnets
    if resnets:  # kohya conv LoRA: down (r, in, 3, 3), up (out, r, 1, 1)
        assert state_dict["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)
    assert {v.dtype for v in state_dict.values()} == {torch.float16}
    assert metadata["ss_network_dim"] == "8" and metadata["comfy_draft_variant"] == "draft-lv"
    assert metadata["comfy_draft_reward"] == "brightness" and metadata["comfy_draft_steps"] == "3"

    encoder, tokenizer = tiny_text_encoder(tmp_path / "tok")
    pipe = StableDiffusionPipeline(unet=tiny_unet(channels=3), vae=None, text_encoder=encoder, tokenizer=tokenizer,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(path))  # raises on any key it cannot convert
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([500, 500]), trainer.backend.encode(["a red square", "a blue circle"])
    with torch.no_grad():
        ours = trainer.backend.unet(x, t, **cond).sample
        theirs = pipe.unet(x, t, **cond).sample
        base = tiny_unet(channels=3)(x, t, **cond).sample
    assert (ours - base).abs().max() > 1e-3  # the LoRA changed the model...
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3 * ours.abs().max().item())  # ...and diffusers agrees

    fresh = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"), config(resnet_loras=resnets))
    fresh.loras.load_kohya_state_dict(state_dict, str(path))  # continue training from the file
    with torch.no_grad():
        again = fresh.backend.unet(x, t, **cond).sample
    torch.testing.assert_close(again, ours, rtol=1e-3, atol=1e-3 * ours.abs().max().item())


def test_config_errors():
    with pytest.raises(ValueError, match="unknown variant 'draft-x'"):
        config(variant="draft-x").check()
    with pytest.raises(ValueError, match=r"grad_steps \(K\) must be between 0 and the number of sampling steps \(6\)"):
        config(variant="draft-k", grad_steps=7).check()
    with pytest.raises(ValueError, match="at least one non-empty prompt"):
        config(prompts=[" "]).check()


def test_base_model_penalty_against_a_separate_base_model(tmp_path):
    """The regulariser's reference is the frozen base: a fresh copy of the UNet without LoRA."""
    from tiny_diffusers import tiny_unet

    from comfy_draft.backends.diffusers import DiffusersDenoiser
    from comfy_draft.trainer import base_model_penalty

    trainer = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"), config(steps=2, lr=5e-2))
    trainer.train()
    backend = trainer.backend
    cond, uncond = backend.encode(["a red square"]), backend.encode([""])
    x, sigma = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(2.0)
    with torch.no_grad():
        tuned = guided(backend.denoiser, cond, uncond, 3.0)(x, sigma[None])
        base = guided(DiffusersDenoiser.from_scheduler(tiny_unet(channels=3), sd_scheduler()), cond, uncond, 3.0)(
            x, sigma[None])
        penalty = base_model_penalty(guided(backend.denoiser, cond, uncond, 3.0), [(x, sigma, tuned)], trainer.loras)
    expected = ((tuned - base) / sigma).square().mean()
    assert expected > 0
    torch.testing.assert_close(penalty, expected, rtol=1e-4, atol=0)
    assert all(lora.strength == 1.0 for lora in trainer.loras.values())  # restored after the reference call


def test_kl_regulariser_keeps_the_lora_closer_to_the_base(tmp_path):
    sizes, kls = {}, {}
    for coef in (0.0, 50.0):
        trainer = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"),
                          config(steps=6, lr=2e-2, variant="draft-k", kl_coef=coef))
        history = trainer.train()
        sizes[coef] = sum(lora.delta().square().sum() for lora in trainer.loras.values()).sqrt().item()
        kls[coef] = [m["kl"] for m in history]
    print(f"||LoRA delta||: no regulariser {sizes[0.0]:.4f}, kl_coef 50: {sizes[50.0]:.4f}")
    assert kls[0.0] == [0.0] * 6 and kls[50.0][0] == 0.0 and kls[50.0][-1] > 0  # starts at the base model
    assert sizes[50.0] < 0.8 * sizes[0.0]


def test_gradient_accumulation_scores_every_micro_batch(tmp_path):
    seen = []
    trainer = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"),
                      config(steps=1, accumulation=3, batch_size=1, variant="draft-k"),
                      [lambda metrics, images: seen.append(metrics)])
    trainer.train()
    assert len(seen) == 1 and seen[0]["step"] == 1 and trainer.optimizer.state  # one optimizer step
    assert seen[0]["reward_std"] > 0  # three different micro-batches were scored
