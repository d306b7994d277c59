"""Robust reward wrappers (EOT, ensembles) against explicit loops and independent references; the trainer's seeds.

Comparisons of two computations that sum in different orders (a batched EOT against a loop, our transforms against
torchvision's) run in float64: float32 rounding there depends on the kernels and the CPU's SIMD width."""
import copy

import pytest
import torch
import torchvision

from comfy_draft import digits, rewards
from comfy_draft.rewards.robust import (TRANSFORMS, Ensemble, ExpectationOverTransforms, apply_transforms,
                                        draw_params, seeded)


def digit_images(batch=3, seed=0):
    """Grey 16 x 16 images that look like strokes (a classifier's gradient is not trivial on them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 16, 16, generator=g)
    x = torchvision.transforms.functional.gaussian_blur(x, 5, 1.5)
    return ((x - x.mean()) * 6 + 0.3).clamp(0, 1).repeat(1, 3, 1, 1)


def grad_of(fn, images):
    images = images.clone().requires_grad_(True)
    fn(images).sum().backward()
    return images.grad


@pytest.fixture(scope="module")
def classifier_reward():
    return digits.DigitReward(digits.load_classifier("reward_classifier"), target=8)


def test_eot_gradient_is_the_mean_of_per_transform_gradients(classifier_reward):
    images, reward = digit_images().double(), copy.deepcopy(classifier_reward).double()  # float64: see the top
    eot = ExpectationOverTransforms(reward, TRANSFORMS, strength=1.0, draws=5, seed=3)
    params = eot.draw(len(images))  # unseeded: the same draws on every call
    expected_value = torch.stack([reward(apply_transforms(images, p)) for p in params]).mean(0)
    expected_grad = torch.stack([grad_of(lambda x, p=p: reward(apply_transforms(x, p)), images)
                                 for p in params]).mean(0)
    torch.testing.assert_close(eot(images), expected_value, rtol=1e-10, atol=1e-10 * expected_value.abs().max().item())
    grad = grad_of(eot, images)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-10 * expected_grad.abs().max().item())
    assert grad.abs().sum() > 0
    plain = grad_of(reward, images)
    assert (grad - plain).abs().max() > 1e-3 * plain.abs().max()  # the transforms change the gradient


def test_transforms_match_independent_references():
    # float64 (see the top): interpolation weights off by rounding only, 1e-16, where a wrong pixel or sigma is 1e-2
    images = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)  # float64 parameters too: 2 / 24 in float32 is a shift off by 1e-8
    torch.testing.assert_close(apply_transforms(images, {"flip": ones}), images.flip(-1), atol=1e-12, rtol=0)
    # a shift by exactly 2 pixels to the right: the interior is torch.roll's (borders are reflected)
    shifted = apply_transforms(images, {"shift_x": 2 / 24 * ones, "shift_y": 0 * ones})
    torch.testing.assert_close(shifted[..., 2:], images[..., :-2], atol=1e-12, rtol=0)
    # blur: torchvision's Gaussian blur (reflect padding) with the same sigma and kernel size
    # sigmas in pixels at this size (max(1, 20 / 256) = 1 px per unit)
    sigma = torch.tensor([0.8, 1.3], dtype=torch.float64)
    blurred = apply_transforms(images, {"blur": sigma})
    for i in range(2):
        size = 2 * max(1, int(torch.ceil(3 * sigma.max()))) + 1
        ref = torchvision.transforms.functional.gaussian_blur(images[i:i + 1], size, float(sigma[i]))
        torch.testing.assert_close(blurred[i:i + 1], ref, atol=1e-12, rtol=0)
    # colour: brightness alone is a product; zoom 1 and no shift is the identity
    same = {"brightness": 1.1 * ones, "contrast": ones, "saturation": ones}
    torch.testing.assert_close(apply_transforms(images, same), images * 1.1, atol=1e-12, rtol=0)
    torch.testing.assert_close(apply_transforms(images, {"zoom": ones}), images, atol=1e-12, rtol=0)


def test_transforms_are_reproducible_per_seed(classifier_reward):
    images = digit_images()
    a = ExpectationOverTransforms(classifier_reward, "all", draws=3, seed=7)
    b = ExpectationOverTransforms(classifier_reward, "all", draws=3, seed=7)
    c = ExpectationOverTransforms(classifier_reward, "all", draws=3, seed=8)
    assert torch.equal(a(images), b(images)) and torch.equal(a(images), a(images))  # unseeded: fixed per call
    assert not torch.equal(a(images), c(images))
    # a step seed: draws differ from the unseeded ones and between steps, and repeat for the same step
    with seeded(a, 100):
        step100 = [a(images), a(images)]  # consecutive calls (DRaFT-LV's n rewards) draw anew
    with seeded(a, 100):
        again = [a(images), a(images)]
    with seeded(a, 101):
        step101 = a(images)
    assert torch.equal(step100[0], again[0]) and torch.equal(step100[1], again[1])
    assert not torch.equal(step100[0], step100[1]) and not torch.equal(step100[0], step101)
    assert not torch.equal(step100[0], a(images))
    assert torch.equal(a(images), b(images))  # back to the fixed seed after the context
    # reached inside sums and ensembles, without the images' content playing any part
    nested = rewards.WeightedSum([Ensemble([b, classifier_reward]), rewards.builtin_reward("brightness")], [1, 0])
    with seeded(nested, 100):
        assert torch.equal(nested(images), (step100[0] + classifier_reward(images)) / 2)
    p1, p2 = (draw_params(TRANSFORMS, 1.0, 4, torch.Generator().manual_seed(5)) for _ in range(2))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_min_ensemble_routes_gradient_to_the_worst_reward():
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # see the top
    images[:2] *= 0.3  # dark images: brightness is their worst reward; bright ones: 0.5 - brightness is
    bright = rewards.builtin_reward("brightness")
    dark = rewards.WeightedSum([rewards.builtin_reward("brightness")], [-1.0])
    members = [bright, dark]
    scores = torch.stack([r(images) for r in members])
    for t in (1.0, 0.05):
        ensemble = Ensemble(members, "min", temperature=t)
        value = ensemble(images)
        assert (value <= scores.mean(0) + 1e-6).all() and (value >= scores.min(0).values - t * 0.7).all()
        weights = torch.softmax(-scores / t, 0)  # d softmin / d r_i
        expected = sum(weights[i][:, None, None, None] * grad_of(r, images) for i, r in enumerate(members))
        torch.testing.assert_close(grad_of(ensemble, images), expected, rtol=1e-9, atol=1e-14)
    worst = scores.argmin(0)
    grad = grad_of(Ensemble(members, "min", temperature=1e-3), images)
    for i in range(4):  # softmin at t = 1e-3 is the hard min up to exp(-gap / t): an approximation, not rounding
        torch.testing.assert_close(grad[i], grad_of(members[int(worst[i])], images)[i], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(Ensemble(members, "mean")(images), scores.mean(0))


def test_wrappers_leave_their_rewards_alone_and_carry_differentiable(classifier_reward):
    class NotDifferentiable(rewards.Reward):
        differentiable = False
        name = "counted"

        def score(self, images, prompts):
            return images.detach().mean((1, 2, 3))

    before = {k: v.clone() for k, v in classifier_reward.state_dict().items()}
    eot = ExpectationOverTransforms(classifier_reward, "translate, blur", draws=2)
    assert eot.differentiable and Ensemble([eot, classifier_reward]).differentiable
    assert not Ensemble([eot, NotDifferentiable()]).differentiable
    assert not ExpectationOverTransforms(NotDifferentiable(), "noise").differentiable
    with seeded(eot, 5):
        eot(digit_images())
    assert all(torch.equal(v, before[k]) for k, v in classifier_reward.state_dict().items())
    assert not hasattr(classifier_reward, "_generator") and eot.transforms == ("translate", "blur")
    for bad in (dict(transforms="rotate"), dict(draws=0), dict(strength=-1)):
        with pytest.raises(ValueError):
            ExpectationOverTransforms(classifier_reward, **{"transforms": "blur", **bad})
    with pytest.raises(ValueError, match="temperature"):
        Ensemble([eot], "min", temperature=0)


def test_trainer_seeds_eot_per_micro_batch(classifier_reward):
    """The trainer's reward copy draws from each micro-batch's (seed, step, micro-batch) generator's seed."""
    from comfy_draft.trainer import TrainConfig, Trainer, step_generator

    class Recording(ExpectationOverTransforms):
        def draw(self, batch):
            self.seen.append(None if self._generator is None else self._generator.initial_seed())
            return super().draw(batch)

    def run():
        eot = Recording(classifier_reward, "translate, noise", draws=2, seed=9)
        config = TrainConfig(prompts=["a 3"], steps=2, sampling_steps=2, batch_size=1, accumulation=2, width=16,
                             height=16, cfg=3.0, lr=1e-3, lv_samples=1, gradient_checkpointing=False)
        trainer = Trainer(digits.load_backend(), eot, config)  # checkpointing set: no memory probe draws
        trainer.reward.seen = []
        trainer.train()
        return trainer.reward.seen

    seen = run()
    expected = ExpectationOverTransforms(classifier_reward, "noise", seed=9)
    wanted = []
    for step in range(2):
        for m in range(2):
            expected.set_step_seed(step_generator(0, step, m).initial_seed())
            wanted.append(expected._generator.initial_seed())
    assert seen == wanted
