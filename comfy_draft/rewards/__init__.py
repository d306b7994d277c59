"""Differentiable rewards: `reward(images in [0, 1] of shape (B, 3, H, W), prompts) -> (B,) scores`."""
import os

from .base import Reward, WeightedSum, frozen  # noqa: F401
from .builtin import BUILTIN_REWARDS, builtin_reward  # noqa: F401

FAMILIES = ("aesthetic", "hpsv2", "pickscore", "clip_similarity", "imagenet_classifier", "imagereward")


def hf_folder(path):
    """A Hugging Face model folder given as the folder or any file inside it (as ComfyUI lists files)."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.isfile(os.path.join(os.path.dirname(path), "config.json")):
        return os.path.dirname(path)
    return path


def load_reward(family, path, clip_path=None, text="", maximize=True, allow_unsafe_pickle=False):
    """The one entry point from a family name and local file(s) to a Reward.

    aesthetic: `path` = the LAION MLP `.pth`, `clip_path` = its CLIP ViT-L/14 tower;
    clip_similarity: `text` = the target text; imagenet_classifier: `text` = class names or indices
    (comma separated), `maximize` False to push images away from them; imagereward: `path` = ImageReward.pt with
    med_config.json beside it, `clip_path` = BERT's vocab.txt (default: beside it too).
    """
    if family == "imagenet_classifier":
        from .imagenet import load_imagenet_classifier
        return load_imagenet_classifier(path, text, maximize, allow_unsafe_pickle)
    if family == "imagereward":
        from .imagereward import load_imagereward
        return load_imagereward(path, vocab=clip_path, allow_unsafe_pickle=allow_unsafe_pickle)
    from . import clip
    if family == "aesthetic":
        if not clip_path:
            raise ValueError("the aesthetic reward needs its CLIP ViT-L/14 image tower file (clip_path)")
        return clip.load_aesthetic(path, hf_folder(clip_path), allow_unsafe_pickle=allow_unsafe_pickle)
    if family == "hpsv2":
        return clip.load_hpsv2(path, allow_unsafe_pickle)
    if family == "pickscore":
        return clip.load_pickscore(hf_folder(path))
    if family == "clip_similarity":
        if not text.strip():
            raise ValueError("the clip_similarity reward needs a target text (e.g. 'a pencil sketch')")
        return clip.load_clip_similarity(hf_folder(path), text, allow_unsafe_pickle)
    raise ValueError(f"unknown reward family {family!r}; choose from {', '.join(FAMILIES)}")
