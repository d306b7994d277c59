"""ComfyUI nodes: thin declarations that hand off to the comfy_draft library."""
import os

import comfy.model_management
import comfy.utils
import folder_paths
import latent_preview
import torch

from .comfy_draft import rewards
from .comfy_draft.backends import comfyui as backend

# models/reward_models: reward weights (files, or Hugging Face folders picked by any file inside).
REWARD_EXTENSIONS = {".pt", ".pth", ".bin", ".safetensors"}
if "reward_models" not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths["reward_models"] = (
        [os.path.join(folder_paths.models_dir, "reward_models")], REWARD_EXTENSIONS)


class DRaFTDDIMSampler:
    """DDIM (eta = 0) with classifier-free guidance: the exact sampling path DRaFT differentiates."""

    DESCRIPTION = ("Deterministic DDIM sampling (eta 0, 'ddim_uniform' timesteps) with classifier-free guidance. "
                   "It is the sampler DRaFT training backpropagates through; here it runs without gradients.")
    CATEGORY = "DRaFT"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.x, SD2.x or SDXL model (eps or v-prediction)."}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        }}

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg):
        callback = latent_preview.prepare_callback(model, steps)
        samples = backend.sample(model, positive, negative, latent_image, seed, steps, cfg,
                                 callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        out = {k: v for k, v in latent_image.items() if not k.startswith("downscale_ratio")}
        out["samples"] = samples.to(device=comfy.model_management.intermediate_device(),
                                    dtype=comfy.model_management.intermediate_dtype())
        return (out,)


def reward_files():
    return folder_paths.get_filename_list("reward_models")


class DRaFTRewardLoader:
    DESCRIPTION = ("Loads a differentiable reward from models/reward_models. aesthetic: the LAION MLP .pth plus "
                   "its CLIP ViT-L/14 tower (clip_file); hpsv2: HPS_v2(.1)_compressed.pt; pickscore: any file of "
                   "the PickScore_v1 folder; clip_similarity: a CLIP checkpoint, target text in `text`; "
                   "imagenet_classifier: a torchvision ResNet/MobileNetV2 .pth, class names in `text`.")
    CATEGORY = "DRaFT"
    FUNCTION = "load"
    RETURN_TYPES = ("DRAFT_REWARD",)

    @classmethod
    def INPUT_TYPES(cls):
        files = reward_files()
        return {"required": {
            "family": (list(rewards.FAMILIES),),
            "file": (files,),
            "clip_file": (["none"] + files, {"tooltip": "aesthetic only: the CLIP ViT-L/14 image tower."}),
            "text": ("STRING", {"default": "", "multiline": False,
                                "tooltip": "clip_similarity: target text. imagenet_classifier: class names or indices, comma separated."}),
            "maximize": ("BOOLEAN", {"default": True, "tooltip": "imagenet_classifier: False pushes images away from the classes."}),
        }}

    def load(self, family, file, clip_file, text, maximize):
        clip_path = None if clip_file == "none" else folder_paths.get_full_path_or_raise("reward_models", clip_file)
        path = folder_paths.get_full_path_or_raise("reward_models", file)
        return (rewards.load_reward(family, path, clip_path, text, maximize),)


class DRaFTBuiltinReward:
    DESCRIPTION = "A reward that needs no files: an image statistic (brightness, saturation, contrast, sharpness, compressibility)."
    CATEGORY = "DRaFT"
    FUNCTION = "load"
    RETURN_TYPES = ("DRAFT_REWARD",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (list(rewards.BUILTIN_REWARDS),)}}

    def load(self, kind):
        return (rewards.builtin_reward(kind),)


class DRaFTRewardCombine:
    DESCRIPTION = "weight_a * reward_a + weight_b * reward_b (+ weight_c * reward_c); weights may be negative."
    CATEGORY = "DRaFT"
    FUNCTION = "combine"
    RETURN_TYPES = ("DRAFT_REWARD",)

    @classmethod
    def INPUT_TYPES(cls):
        weight = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})
        return {"required": {"reward_a": ("DRAFT_REWARD",), "weight_a": weight,
                             "reward_b": ("DRAFT_REWARD",), "weight_b": weight},
                "optional": {"reward_c": ("DRAFT_REWARD",), "weight_c": weight}}

    def combine(self, reward_a, weight_a, reward_b, weight_b, reward_c=None, weight_c=1.0):
        pairs = [(reward_a, weight_a), (reward_b, weight_b)] + ([(reward_c, weight_c)] if reward_c is not None else [])
        return (rewards.WeightedSum([r for r, _ in pairs], [w for _, w in pairs]),)


class DRaFTScoreImages:
    DESCRIPTION = "Scores images with a reward (the prompt is used by prompt-aware rewards such as HPSv2 and PickScore)."
    CATEGORY = "DRaFT"
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("mean_score", "scores")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "reward": ("DRAFT_REWARD",),
                             "prompt": ("STRING", {"default": "", "multiline": True})}}

    def score(self, images, reward, prompt):
        device = comfy.model_management.get_torch_device()
        with torch.inference_mode():
            scores = reward.to(device)(images.movedim(-1, 1).to(device, torch.float32), prompt).float().cpu()
        text = "\n".join(f"image {i}: {s:.4f}" for i, s in enumerate(scores.tolist()))
        text = f"{reward.name}\n{text}\nmean: {scores.mean().item():.4f}"
        return {"ui": {"text": [text], "scores": scores.tolist()}, "result": (scores.mean().item(), text)}


NODE_CLASS_MAPPINGS = {
    "DRaFTDDIMSampler": DRaFTDDIMSampler,
    "DRaFTRewardLoader": DRaFTRewardLoader,
    "DRaFTBuiltinReward": DRaFTBuiltinReward,
    "DRaFTRewardCombine": DRaFTRewardCombine,
    "DRaFTScoreImages": DRaFTScoreImages,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DRaFTDDIMSampler": "DRaFT DDIM Sampler",
    "DRaFTRewardLoader": "DRaFT Reward Loader",
    "DRaFTBuiltinReward": "DRaFT Built-in Reward",
    "DRaFTRewardCombine": "DRaFT Combine Rewards",
    "DRaFTScoreImages": "DRaFT Score Images",
}
