"""Differentiable image preprocessing for reward models (no PIL, no rounding: the graph stays intact)."""
import torch
import torch.nn.functional as F

# OpenAI CLIP normalisation (open_clip's OPENAI_DATASET_MEAN / STD), used by CLIP, HPSv2, PickScore.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(images, height, width, mode="bicubic"):
    """Antialiased resize (PIL's behaviour when shrinking); identity at the same size."""
    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode=mode, antialias=True, align_corners=False)


def resize_center_crop(images, size, mode="bicubic"):
    """Shortest side to `size`, then a centred `size` x `size` crop (CLIP / torchvision eval transform)."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    images = resize(images, nh, nw, mode)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def resize_longest_pad(images, size, fill=0.0):
    """Longest side to `size`, then pad the short side symmetrically with `fill` (HPSv2's transform)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    images = resize(images, nh, nw)
    pad_h, pad_w = size - nh, size - nw
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images, mean, std):
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std
