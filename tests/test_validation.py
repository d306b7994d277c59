"""Held-out validation, keep-best, early stopping and strength sweeps, on a tiny diffusers model."""
import itertools

import pytest
import torch
from test_trainer import HELD_OUT_PROMPTS, config
from tiny_diffusers import tiny_pixel_backend
from tolerance import float32_atol

from comfy_draft import rewards
from comfy_draft.lora import load_kohya_file
from comfy_draft.trainer import Trainer
from comfy_draft.validation import (ValidationConfig, Validator, held_out_images, mean_pairwise_distance, scaled,
                                    strength_sweep)

BRIGHTNESS = rewards.builtin_reward("brightness")
# A judge that disagrees with the training reward, so "best by the judge" is the start.
DARKNESS = rewards.WeightedSum([rewards.builtin_reward("brightness")], [-1.0])


def validator(**overrides):
    base = dict(prompts=HELD_OUT_PROMPTS, seeds=[7, 8, 9], every=2)
    return Validator(ValidationConfig(**{**base, **overrides}), {"darkness": DARKNESS})


def lora_state(loras):
    return {k: v.detach().clone() for k, v in loras.state_dict().items()}


def test_mean_pairwise_distance_against_brute_force():
    x = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = []
    for group in (x[:3], x[3:]):
        expected.append(sum((a - b).norm() for a, b in itertools.permutations(group, 2)) / 6)
    assert mean_pairwise_distance(x, 3) == pytest.approx(float(sum(expected) / 2), rel=1e-5)


def test_validation_schedule_metrics_and_keep_best_by_reward(tmp_path):
    backend = tiny_pixel_backend(tmp_path)
    v = validator()
    trainer = Trainer(backend, BRIGHTNESS, config(steps=5, lr=3e-2), validator=v)
    states = {}
    trainer.callbacks.append(lambda m, images: states.__setitem__(m["step"], lora_state(trainer.loras)))
    trainer.train()
    assert [m["step"] for m in v.history] == [0, 2, 4, 5]  # before training, every 2 steps and the last
    validated = [m for m in trainer.history if "val_reward" in m]
    assert [m["step"] for m in validated] == [2, 4, 5]
    assert {"val_reward", "val_darkness", "val_diversity"} <= set(validated[0])
    assert v.history[0]["val_diversity"] == 1.0 and v.history[0]["val_darkness"] == -v.history[0]["val_reward"]
    # the held-out reward is the reward of the held-out samples, recomputed independently
    images = held_out_images(backend, HELD_OUT_PROMPTS, [7, 8, 9], "", 3.0, 6, 16, 16)
    assert BRIGHTNESS(images).mean().item() == pytest.approx(v.history[-1]["val_reward"], rel=1e-5)
    best = max(v.history, key=lambda m: m["val_reward"])
    assert best["step"] > 0 and trainer.kept_step == best["step"]
    assert all(torch.equal(a, b) for a, b in zip(lora_state(trainer.loras).values(), states[best["step"]].values()))
    path = trainer.save_lora(tmp_path / "best.safetensors")
    assert load_kohya_file(path)[1]["comfy_draft_steps"] == str(best["step"])


def test_keep_best_by_a_disagreeing_judge_keeps_the_start_and_stops_early(tmp_path):
    v = validator(criterion="darkness", patience=2)
    trainer = Trainer(tiny_pixel_backend(tmp_path), BRIGHTNESS, config(steps=20, lr=3e-2), validator=v)
    trainer.train()
    assert v.history[-1]["val_reward"] > v.history[0]["val_reward"]  # brightness was learned ...
    assert trainer.step == 4 and v.best["step"] == 0  # ... so darkness peaked at the start: stop after 2 more
    assert trainer.kept_step == 0 and all(not lora.up.any() for lora in trainer.loras.values())


def test_diversity_floor_and_keep_last(tmp_path):
    v = validator(diversity_floor=100.0)  # nothing is that diverse: no best, the last LoRA stays
    trainer = Trainer(tiny_pixel_backend(tmp_path), BRIGHTNESS, config(steps=2, lr=3e-2), validator=v)
    last = {}
    trainer.callbacks.append(lambda m, images: last.update(lora_state(trainer.loras)))
    trainer.train()
    assert v.best is None and trainer.kept_step == 2
    assert all(torch.equal(a, b) for a, b in zip(lora_state(trainer.loras).values(), last.values()))
    with pytest.raises(ValueError, match="criterion"):
        validator(criterion="nope")
    with pytest.raises(ValueError, match="held-out prompt"):
        validator(prompts=[])


def test_validator_state_resumes(tmp_path):
    trainer = Trainer(tiny_pixel_backend(tmp_path), BRIGHTNESS, config(steps=3, lr=3e-2), validator=validator(),
                      state_path=tmp_path / "ckpt.pt")
    trainer.train()
    resumed = Trainer(tiny_pixel_backend(tmp_path), BRIGHTNESS, config(steps=3, lr=3e-2), validator=validator())
    resumed.load_state(tmp_path / "ckpt.pt")
    assert resumed.validator.history == trainer.validator.history
    assert resumed.validator.best["step"] == trainer.validator.best["step"]


def test_strength_sweep_scales_the_lora_delta(tmp_path):
    backend = tiny_pixel_backend(tmp_path)
    loras = backend.add_loras(rank=4)
    with torch.no_grad():
        for lora in loras.values():
            lora.up.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    module = backend.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    base, delta = module.weight.detach(), next(iter(loras.values())).delta().detach()
    x = torch.randn(2, 5, module.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), loras.scaled(0.5):
        # float32 bypass (x W^T + 0.5 (x D^T) U^T) vs the merged weight: other summation orders. Tolerance
        # (tests/tolerance.py): the layer's reduction (16), k = 8: 5.5e-6; measured 3e-7; strength 0.45 gives 4e-2.
        merged = torch.nn.functional.linear(x, base + 0.5 * delta, module.bias)
        torch.testing.assert_close(module(x), merged, rtol=0,
                                   atol=float32_atol(merged.abs().max(), reduction=module.in_features, k=8))
    with torch.no_grad(), loras.disabled():
        assert torch.equal(module(x), torch.nn.functional.linear(x, base, module.bias))
    rows, images = strength_sweep(scaled(backend, loras, [0.0, 1.0]), BRIGHTNESS, HELD_OUT_PROMPTS, [7, 8],
                                  cfg=3.0, steps=6, width=16, height=16, judges={"darkness": DARKNESS})
    assert [r["strength"] for r in rows] == [0.0, 1.0] and images.shape == (2 * 2 * 2, 3, 16, 16)
    with loras.disabled():
        base_images = held_out_images(backend, HELD_OUT_PROMPTS, [7, 8], "", 3.0, 6, 16, 16)
    assert torch.equal(images[:4], base_images) and not torch.equal(images[4:], base_images)
    assert rows[0]["reward"] == pytest.approx(BRIGHTNESS(base_images).mean().item(), rel=1e-6)
    assert rows[1]["darkness"] == pytest.approx(-rows[1]["reward"])


def test_held_out_samples_do_not_depend_on_the_batch_they_are_drawn_in(tmp_path):
    # validation samples `batch_size` images at a time (a step's memory); each image's noise follows its seed only.
    # In float64 (the model `.double()`d, each seed's float32 noise widened exactly): kernels batched otherwise sum
    # in other orders, which in float32 left images 5.5e-6 apart against an atol of 1e-5. held_out_images hands back
    # float32 images, float64 ones rounded once: an ulp of 1 apart at most.
    backend = tiny_pixel_backend(tmp_path)
    backend.unet.double(), backend.text_encoder.double()
    run = backend.run
    backend.run = lambda fn, prompts, negative, cfg, noise, steps: run(fn, prompts, negative, cfg, noise.double(),
                                                                       steps)
    whole = held_out_images(backend, HELD_OUT_PROMPTS, [7, 8, 9], "", 3.0, 6, 16, 16)
    for batch in (1, 2):
        torch.testing.assert_close(held_out_images(backend, HELD_OUT_PROMPTS, [7, 8, 9], "", 3.0, 6, 16, 16,
                                                   batch=batch), whole, rtol=0, atol=2 * torch.finfo(torch.float32).eps)


class ConvJudge(rewards.Reward):
    name = "conv"

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Conv2d(3, 4, 3).requires_grad_(False)

    def score(self, images, prompts=None):
        return self.net(images).mean((1, 2, 3))


def test_judges_run_as_private_copies_in_the_training_dtype_and_the_estimate_counts_them(tmp_path):
    from comfy_draft import memory
    judge = ConvJudge()
    v = Validator(ValidationConfig(prompts=HELD_OUT_PROMPTS, seeds=[7], every=2), {"conv": judge})
    # two sampling steps: bf16 is emulated on CPUs without AVX-512, and the dtypes are the point, not the samples
    trainer = Trainer(tiny_pixel_backend(tmp_path), BRIGHTNESS, config(precision="bf16", sampling_steps=2), validator=v)
    assert "val_conv" in v(0, trainer.loras, trainer.backend, trainer.reward, trainer.config, trainer.dtype)
    assert all(t.dtype == torch.bfloat16 for t in v.on_device["conv"].parameters())
    assert all(t.dtype == torch.float32 for t in judge.parameters())  # the shared judge is left as it was
    without = Trainer(tiny_pixel_backend(tmp_path), BRIGHTNESS, config(precision="bf16", sampling_steps=2))
    judge_bytes = sum(t.numel() * 2 for t in judge.parameters())
    assert memory.estimate(**trainer.memory_inputs())["weights"] - memory.estimate(**without.memory_inputs())["weights"] == judge_bytes
