"""ComfyUI nodes: thin declarations that hand off to the comfy_draft library."""
import logging
import os

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import latent_preview
import torch

from .comfy_draft import memory, rewards
from .comfy_draft.backends import comfyui as backend
from .comfy_draft.lora import load_kohya_file
from .comfy_draft.plotting import curve_image, image_grid
from .comfy_draft.trainer import VARIANTS, TrainConfig, Trainer
from .comfy_draft.validation import (FIRST_HELD_OUT_SEED, ValidationConfig, Validator, strength_sweep,
                                     sweep_table)

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


# 0 = the model's own training size (SD1.x 512, SD2.x 768-v 768, SDXL 1024).
SIZE_INPUT = ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                      "tooltip": "Image size in pixels; 0: the model's native size "
                                 "(SD1.x 512, SD2 768-v 768, SDXL 1024)."})


def training_states():
    """Resumable training states under output/draft_training/, as paths relative to it."""
    root = os.path.join(folder_paths.get_output_directory(), "draft_training")
    return sorted(os.path.relpath(os.path.join(folder, f), root)
                  for folder, _, files in os.walk(root) for f in files if f.endswith(".state.pt"))


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


JUDGES = ("judge_1", "judge_2", "judge_3")


def lines(text):
    return [line.strip() for line in text.splitlines() if line.strip()]


def seed_list(first_seed, seeds):
    return list(range(first_seed, first_seed + seeds))


def judge_inputs(count):
    return {name: ("DRAFT_REWARD", {"tooltip": "An independent reward to watch (not trained on)."})
            for name in JUDGES[:count]}


class DRaFTValidation:
    DESCRIPTION = ("Held-out validation for DRaFT Train LoRA, against reward hacking: every N steps it samples "
                   "held-out prompts and seeds and records the training reward, judge rewards and same-prompt "
                   "diversity (relative to the base model); it can keep the best LoRA and stop early.")
    CATEGORY = "DRaFT"
    FUNCTION = "build"
    RETURN_TYPES = ("DRAFT_VALIDATION",)

    @classmethod
    def INPUT_TYPES(cls):
        d = ValidationConfig(prompts=[""])
        return {"required": {
            "prompts": ("STRING", {"multiline": True, "default": "a portrait of an old sailor\na bowl of fruit",
                                   "tooltip": "Held-out prompts, one per line: not among the training prompts."}),
            "seeds": ("INT", {"default": len(d.seeds), "min": 1, "max": 64, "tooltip": "Samples per prompt."}),
            "first_seed": ("INT", {"default": FIRST_HELD_OUT_SEED, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "every": ("INT", {"default": d.every, "min": 1, "max": 100000, "tooltip": "Validate every N steps."}),
            "keep": (["best", "last"], {"tooltip": "Save the best validated LoRA, or the last one."}),
            "criterion": (["reward", *JUDGES], {"tooltip": "What 'best' means: the held-out training reward or a judge."}),
            "diversity_floor": ("FLOAT", {"default": d.diversity_floor, "min": 0.0, "max": 10.0, "step": 0.05,
                                          "tooltip": "Only LoRAs whose sample diversity is at least this fraction "
                                                     "of the base model's can be kept as best (0: off)."}),
            "patience": ("INT", {"default": d.patience, "min": 0, "max": 10000,
                                 "tooltip": "Stop after this many validations without a new best (0: never)."}),
        }, "optional": judge_inputs(3)}

    def build(self, prompts, seeds, first_seed, every, keep, criterion, diversity_floor, patience, **judges):
        config = ValidationConfig(prompts=lines(prompts), seeds=seed_list(first_seed, seeds), every=every,
                                  criterion=criterion, diversity_floor=diversity_floor, patience=patience,
                                  keep_best=keep == "best")
        config.validate(judges)
        return ((config, judges),)


class DRaFTLoRAStrengthSweep:
    DESCRIPTION = ("Evaluates a LoRA at several strengths (through ComfyUI's LoRA loader) on held-out prompts and "
                   "seeds: reward, judges and diversity per strength, and a grid (one row per strength).")
    CATEGORY = "DRaFT"
    FUNCTION = "sweep"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("table", "grid")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",),
            "lora_name": (folder_paths.get_filename_list("loras"),),
            "reward": ("DRAFT_REWARD",),
            "prompts": ("STRING", {"multiline": True, "default": "a portrait of an old sailor\na bowl of fruit"}),
            "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
            "strengths": ("STRING", {"default": "0, 0.25, 0.5, 0.75, 1, 1.5"}),
            "seeds": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Samples per prompt."}),
            "first_seed": ("INT", {"default": FIRST_HELD_OUT_SEED, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1}),
            "width": SIZE_INPUT,
            "height": SIZE_INPUT,
        }, "optional": judge_inputs(2)}

    def sweep(self, model, clip, vae, lora_name, reward, prompts, negative_prompt, strengths, seeds, first_seed,
              steps, cfg, width, height, **judges):
        try:
            values = [float(v) for v in strengths.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"strengths: give numbers separated by commas, got {strengths!r}") from None
        if not values or not lines(prompts):
            raise ValueError("give at least one strength and one prompt")
        lora = load_kohya_file(folder_paths.get_full_path_or_raise("loras", lora_name))[0]
        backends = ((s, backend.SamplingBackend(comfy.sd.load_lora_for_models(model, None, lora, s, 0)[0], clip, vae))
                    for s in values)
        size = backend.native_size(model)
        rows, images = strength_sweep(backends, reward, lines(prompts), seed_list(first_seed, seeds), negative_prompt,
                                      cfg, steps, width or size, height or size, judges)
        table = sweep_table(rows)
        grid = torch.from_numpy(image_grid(images, len(images) // len(values))).float().div(255)[None]
        return {"ui": {"text": [f"{lora_name}\n{table}"], "rows": rows}, "result": (table, grid)}


# node id -> its latest run's chart data ({"total", "diversity_floor", "kept_step", "steps": [metrics]}), so the
# canvas can redraw the chart after a page reload or when the workflow is reopened (while the server runs).
CHART_HISTORY = {}


def register_chart_history_route():
    import server
    from aiohttp import web

    instance = getattr(server.PromptServer, "instance", None)
    if instance is None:  # imported without a server (library tests)
        return

    @instance.routes.get("/comfy_draft/history")
    async def chart_history(request):
        # copies: the training thread appends while this serialises
        return web.json_response({k: dict(v, steps=list(v["steps"])) for k, v in list(CHART_HISTORY.items())})


register_chart_history_route()


class DRaFTTrainLoRA:
    DESCRIPTION = ("Trains a LoRA on the UNet with DRaFT so that sampled images score higher on the reward. Saves it "
                   "into the loras folder (LoraLoader lists it) and returns the model with the LoRA applied.")
    CATEGORY = "DRaFT"
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE", "FLOAT")
    RETURN_NAMES = ("model", "lora_path", "reward_curve", "final_reward")
    OUTPUT_NODE = True
    PREVIEW_EVERY = 5  # steps between sample previews on the node

    @classmethod
    def INPUT_TYPES(cls):
        d = TrainConfig(prompts=[""])
        return {
            "required": {
                "model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",), "reward": ("DRAFT_REWARD",),
                "prompts": ("STRING", {"multiline": True, "default": "a photo of a cat\na lighthouse at dusk",
                                       "tooltip": "One prompt per line; each step samples a batch from them."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
                "variant": (list(VARIANTS), {"default": d.variant}),
                "k": ("INT", {"default": d.grad_steps, "min": 1, "max": 1000, "tooltip": "draft-k: steps differentiated."}),
                "lv_samples": ("INT", {"default": d.lv_samples, "min": 1, "max": 16, "tooltip": "draft-lv: re-noised copies."}),
                "training_steps": ("INT", {"default": 200, "min": 1, "max": 100000}),
                "sampling_steps": ("INT", {"default": d.sampling_steps, "min": 1, "max": 1000}),
                "cfg": ("FLOAT", {"default": d.cfg, "min": 0.0, "max": 100.0, "step": 0.1}),
                "width": SIZE_INPUT,
                "height": SIZE_INPUT,
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "learning_rate": ("FLOAT", {"default": d.lr, "min": 0.0, "max": 1.0, "step": 1e-5, "round": 1e-6}),
                "rank": ("INT", {"default": d.rank, "min": 1, "max": 256}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "save_every": ("INT", {"default": 0, "min": 0, "max": 100000,
                                       "tooltip": "Write a resumable training checkpoint every N steps (0: at the end)."}),
                "lora_name": ("STRING", {"default": "draft/draft_lora"}),
            },
            "optional": {"resume_lora": (["none"] + folder_paths.get_filename_list("loras"),
                                         {"tooltip": "Start from this LoRA (same rank), at step 0."}),
                         "resume_state": (["none"] + training_states(),
                                          {"tooltip": "Continue a saved training state exactly (step, optimizer, "
                                                      "random state) with the same settings; training_steps may "
                                                      "be raised. The state file is updated as training goes on."}),
                         "kl_coef": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e4, "step": 0.01,
                                               "tooltip": "Regulariser against reward hacking: penalise the LoRA "
                                                          "model's noise prediction for straying from the base model's."}),
                         "reward_resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                                       "tooltip": "Decode for the reward at this size to save memory "
                                                                  "(e.g. 256 for 224 px rewards); 0: full size."}),
                         "validation": ("DRAFT_VALIDATION", {"tooltip": "Held-out validation, keep-best and early "
                                                                        "stopping (DRaFT Validation node)."}),
                         "precision": (["auto", "bf16", "fp16", "fp32"],
                                       {"tooltip": "Compute precision (LoRA weights stay fp32). auto: the model's own "
                                                   "half precision on a GPU (bf16 where the card runs it natively, "
                                                   "fp16 with loss scaling otherwise), fp32 on the CPU."}),
                         "accumulation": ("INT", {"default": d.accumulation, "min": 1, "max": 256,
                                                  "tooltip": "Micro-batches per optimizer step: the batch of "
                                                             "batch_size x accumulation in the memory of batch_size."}),
                         "checkpointing": ("BOOLEAN", {"default": True,
                                                       "tooltip": "Recompute UNet calls and the VAE decoder "
                                                                  "in the backward pass: much less memory, a "
                                                                  "little slower."})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # training is never taken from the cache

    def train(self, model, clip, vae, reward, prompts, negative_prompt, variant, k, lv_samples, training_steps,
              sampling_steps, cfg, width, height, batch_size, learning_rate, rank, seed, save_every, lora_name,
              resume_lora="none", resume_state="none", kl_coef=0.0, reward_resolution=0, validation=None,
              precision="auto", accumulation=1, checkpointing=True, unique_id=None):
        if resume_lora != "none" and resume_state != "none":
            raise ValueError("choose resume_lora (a LoRA to start from) or resume_state (a run to continue), not both")
        size = backend.native_size(model)
        width, height = width or size, height or size
        config = TrainConfig(
            prompts=lines(prompts), negative_prompt=negative_prompt,
            variant=variant, grad_steps=k, lv_samples=lv_samples, steps=training_steps, sampling_steps=sampling_steps,
            cfg=cfg, width=width, height=height, batch_size=batch_size, lr=learning_rate, rank=rank, seed=seed,
            save_every=save_every, kl_coef=kl_coef, reward_resolution=reward_resolution, precision=precision,
            accumulation=accumulation, checkpointing=checkpointing)
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            lora_name, folder_paths.get_folder_paths("loras")[0])
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")  # never overwrites
        states = os.path.join(folder_paths.get_output_directory(), "draft_training")
        state = os.path.join(states, resume_state if resume_state != "none" else
                             os.path.join(subfolder, f"{name}_{counter:05}_.state.pt"))
        validator = Validator(*validation) if validation is not None else None
        floor = validator.config.diversity_floor if validator is not None else 0.0
        trainer = Trainer(backend.TrainingBackend(model, clip, vae), reward, config,
                          [self.reporter(unique_id, training_steps, floor)], checkpoint_path=state, validator=validator)
        held_out = validator.config.prompts if validator is not None else []
        trainer.backend.encode([*config.prompts, config.negative_prompt, *held_out])  # CLIP's work done up front
        estimate = trainer.memory_estimate()
        logging.info("DRaFT: %s", memory.describe(estimate))
        # ComfyUI frees memory for inference only: evict cached models (CLIP, other UNets) to make room.
        comfy.model_management.free_memory(estimate["total"], trainer.backend.device)
        if resume_lora != "none":
            lora_file = folder_paths.get_full_path_or_raise("loras", resume_lora)
            trainer.loras.load_kohya_state_dict(load_kohya_file(lora_file)[0], lora_file)
        if resume_state != "none":
            trainer.load_checkpoint(state)  # refuses a state made with other settings, naming them

        def save_snapshot(metrics, images):  # a LoRA per save_every steps, to compare on the canvas
            if save_every and metrics["step"] % save_every == 0 and metrics["step"] < training_steps:
                trainer.save_lora(path.replace("_.safetensors", f"_step{metrics['step']}_.safetensors"))
        trainer.callbacks.append(save_snapshot)
        try:
            history = trainer.train()
        except comfy.model_management.InterruptProcessingException:
            if trainer.step:
                trainer.save_lora(path.replace("_.safetensors", f"_partial_{trainer.step}_.safetensors"))
            raise
        trainer.save_lora(path)
        with torch.inference_mode():
            patched = comfy.sd.load_lora_for_models(model, None, load_kohya_file(path)[0], 1.0, 0)[0]
            curve = torch.from_numpy(curve_image(history, trainer.kept_step, floor)).float().div(255)[None]
        text = (f"{os.path.relpath(path, folder_paths.get_folder_paths('loras')[0])}: "
                f"reward {history[0]['reward']:.4f} -> {history[-1]['reward']:.4f}")
        if validator is not None:
            first, kept = validator.history[0], next(m for m in validator.history if m["step"] == trainer.kept_step)
            text += "\nheld-out: " + ", ".join(f"{k[4:]} {first[k]:.4g} -> {kept[k]:.4g}" for k in first if k.startswith("val_"))
            text += f"\nsaved the LoRA of step {trainer.kept_step} of {trainer.step}"
        skipped = sum(m.get("skipped", 0) for m in history)
        if skipped:
            text += f"\n{skipped} step(s) skipped: the fp16 gradient overflowed (the loss scale was lowered)"
        text += "".join(f"\nWARNING: {w}" for w in trainer.warnings)
        CHART_HISTORY[str(unique_id)]["kept_step"] = trainer.kept_step
        return {"ui": {"text": [text]},
                "result": (patched, path, curve, history[-1]["reward"])}

    def reporter(self, node_id, total, diversity_floor=0.0):
        """Progress bar, sample previews, the chart's websocket event (kept in CHART_HISTORY for replay) and the
        interrupt check, per step."""
        import server
        from PIL import Image

        bar = comfy.utils.ProgressBar(total, node_id=node_id)
        chart = CHART_HISTORY[str(node_id)] = {"total": total, "diversity_floor": diversity_floor, "kept_step": None,
                                               "steps": []}

        def report(metrics, images):
            step = metrics["step"]
            preview = None
            if step % self.PREVIEW_EVERY == 0 or step == total:
                grid = images.movedim(1, -1).flatten(0, 1) if images.shape[0] <= 4 else images[0].movedim(0, -1)
                preview = ("JPEG", Image.fromarray((grid.cpu().numpy() * 255).round().astype("uint8")), 512)
            bar.update_absolute(step, total, preview)
            event = dict(metrics, node=node_id, total=total, diversity_floor=diversity_floor)
            chart["steps"].append(event)
            instance = server.PromptServer.instance
            instance.send_sync("comfy_draft.train_step", event, instance.client_id)
            comfy.model_management.throw_exception_if_processing_interrupted()
        return report


NODE_CLASS_MAPPINGS = {
    "DRaFTDDIMSampler": DRaFTDDIMSampler,
    "DRaFTRewardLoader": DRaFTRewardLoader,
    "DRaFTBuiltinReward": DRaFTBuiltinReward,
    "DRaFTRewardCombine": DRaFTRewardCombine,
    "DRaFTScoreImages": DRaFTScoreImages,
    "DRaFTTrainLoRA": DRaFTTrainLoRA,
    "DRaFTValidation": DRaFTValidation,
    "DRaFTLoRAStrengthSweep": DRaFTLoRAStrengthSweep,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DRaFTDDIMSampler": "DRaFT DDIM Sampler",
    "DRaFTRewardLoader": "DRaFT Reward Loader",
    "DRaFTBuiltinReward": "DRaFT Built-in Reward",
    "DRaFTRewardCombine": "DRaFT Combine Rewards",
    "DRaFTScoreImages": "DRaFT Score Images",
    "DRaFTTrainLoRA": "DRaFT Train LoRA",
    "DRaFTValidation": "DRaFT Validation",
    "DRaFTLoRAStrengthSweep": "DRaFT LoRA Strength Sweep",
}
