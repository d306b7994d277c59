"""Rewards that need no files: simple, differentiable image statistics, and the true JPEG size (no gradient)."""
import io

import numpy as np
import torch
import torch.nn.functional as F

from .base import Reward

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def luminance(images):
    return (images * images.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1)


class Brightness(Reward):
    """Mean luminance, in [0, 1]."""
    name = "brightness"

    def score(self, images, prompts):
        return luminance(images).mean((1, 2))


class Saturation(Reward):
    """Mean HSV saturation (max - min) / max of the RGB channels, in [0, 1]."""
    name = "saturation"

    def score(self, images, prompts):
        high, low = images.amax(1), images.amin(1)
        return ((high - low) / (high + 1e-3)).mean((1, 2))


class Contrast(Reward):
    """Standard deviation of luminance (RMS contrast)."""
    name = "contrast"

    def score(self, images, prompts):
        return luminance(images).flatten(1).std(1)


class Sharpness(Reward):
    """Mean absolute Laplacian of luminance: rises with fine detail and crisp edges."""
    name = "sharpness"

    def score(self, images, prompts):
        kernel = images.new_tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
        return F.conv2d(luminance(images).unsqueeze(1), kernel).abs().mean((1, 2, 3))


class Compressibility(Reward):
    """Minus the mean absolute gradient (total variation) in RGB: a differentiable stand-in for JPEG
    file size (the paper's compressibility reward), since smooth images compress well."""
    name = "compressibility"

    def score(self, images, prompts):
        dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean((1, 2, 3))
        dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean((1, 2, 3))
        return -(dx + dy)


class JPEGCompressibility(Reward):
    """Minus the JPEG file size in kilobytes (Pillow, quality 95, as DDPO's compressibility reward): encoded
    bytes have no gradient, so only DDPO, GRAFT and P-GRAFT can train on it."""
    name = "jpeg_compressibility"
    differentiable = False
    quality = 95

    def score(self, images, prompts):
        from PIL import Image

        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device)


BUILTIN_REWARDS = {cls.name: cls for cls in (Brightness, Saturation, Contrast, Sharpness, Compressibility,
                                             JPEGCompressibility)}


def builtin_reward(name):
    if name not in BUILTIN_REWARDS:
        raise ValueError(f"unknown built-in reward {name!r}; choose from {', '.join(BUILTIN_REWARDS)}")
    return BUILTIN_REWARDS[name]()
