"""ComfyUI nodes: thin declarations that hand off to the comfy_draft library."""
import json
import os

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import latent_preview
import torch

from .comfy_draft import plotting, rewards
from .comfy_draft.backends import comfyui as backend
from .comfy_draft.lora import atomic_write, load_kohya_file
from .comfy_draft.run import RunFiles, run
from .comfy_draft.trainer import VARIANTS, TrainConfig, Trainer, check_reward
from .comfy_draft.validation import (FIRST_HELD_OUT_SEED, ValidationConfig, Validator, held_out_images,
                                     strength_sweep, sweep_table)

# models/reward_models: reward weights (files, or Hugging Face folders picked by any file inside).
REWARD_EXTENSIONS = {".pt", ".pth", ".bin", ".safetensors"}
if "reward_models" not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths["reward_models"] = (
        [os.path.join(folder_paths.models_dir, "reward_models")], REWARD_EXTENSIONS)


def latent_output(latent_image, samples):
    """A sampler node's LATENT: the input latent's other entries, as KSampler keeps them, with the new samples."""
    out = {k: v for k, v in latent_image.items() if not k.startswith("downscale_ratio")}
    out["samples"] = samples.to(device=comfy.model_management.intermediate_device(),
                                dtype=comfy.model_management.intermediate_dtype())
    return out


class DRaFTDDIMSampler:
    """DDIM (eta = 0) with classifier-free guidance: the exact sampling path DRaFT differentiates."""

    DESCRIPTION = ("Deterministic DDIM sampling (eta 0, 'ddim_uniform' timesteps) with classifier-free guidance; on "
                   "flow models (Flux.1, SD3/SD3.5, Z-Image) its Euler step on the 'simple' schedule. It is the "
                   "sampler DRaFT training backpropagates through; here it runs without gradients.")
    CATEGORY = "DRaFT"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.x, SD2.x or SDXL model (eps or v-prediction), or a Flux.1, "
                                           "SD3/SD3.5 or Z-Image flow model (then: Euler on 'simple')."}),
            "positive": ("CONDITIONING", {"tooltip": "What the image should show (CLIP Text Encode)."}),
            "negative": ("CONDITIONING", {"tooltip": "What to steer away from (classifier-free guidance)."}),
            "latent_image": ("LATENT", {"tooltip": "The latent to fill, e.g. Empty Latent Image: its size and batch."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "The starting noise."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "DDIM steps."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale."}),
        }}

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg):
        callback = latent_preview.prepare_callback(model, steps)
        samples = backend.sample(model, positive, negative, latent_image, seed, steps, cfg,
                                 callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        return (latent_output(latent_image, samples),)


class DRaFTPGRAFTSampler:
    """P-GRAFT's inference: the LoRA runs the chain from T down to its intermediate step t, the base model finishes."""

    DESCRIPTION = ("Samples with a P-GRAFT LoRA as it was trained: DDIM (eta 0, 'ddim_uniform') with the LoRA on for "
                   "the first part of the steps (down to the intermediate step t recorded in the LoRA file) and the "
                   "base model for the rest. lora_fraction overrides t (the fraction of the steps with the LoRA).")
    CATEGORY = "DRaFT"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        inputs = DRaFTDDIMSampler.INPUT_TYPES()
        inputs["required"].update({
            "lora_name": (folder_paths.get_filename_list("loras"),
                          {"tooltip": "A LoRA trained with pgraft (its file records the step t)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01,
                                   "tooltip": "The LoRA's strength above t (below t the base model runs)."}),
            "lora_fraction": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Fraction of the steps (from the first) with the LoRA on; 0: the "
                                                   "t the LoRA was trained for (its metadata)."}),
        })
        return inputs

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, lora_name, strength, lora_fraction):
        lora, metadata = load_kohya_file(folder_paths.get_full_path_or_raise("loras", lora_name))
        fraction = lora_fraction or float(metadata.get("comfy_draft_pgraft_fraction", 0))
        if not 0 < fraction < 1:
            raise ValueError(f"{lora_name} records no P-GRAFT step t (it was not trained with pgraft): set "
                             f"lora_fraction to the fraction of the steps the LoRA should run")
        lora_model = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]  # a patched clone
        callback = latent_preview.prepare_callback(model, steps)
        samples = backend.sample_lora_then_base(lora_model, model, positive, negative, latent_image, seed, steps, cfg,
                                          fraction, callback=callback,
                                          disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        return (latent_output(latent_image, samples),)


# What 0 means for the training node's sampling_steps and cfg.
USUAL = "; ".join([f"SD {TrainConfig.sampling_steps} steps, cfg {TrainConfig.cfg:g}"]
                  + [f"{f.name} {f.steps}, cfg {f.cfg:g}" for f in backend.FLOW_FAMILIES])
# 0 = the model's own training size (SD1.x 512, SD2.x 768-v 768, SDXL and the flow models 1024).
SIZE_INPUT = ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                      "tooltip": "Image size in pixels; 0: the model's native size "
                                 "(SD1.x 512, SD2 768-v 768, SDXL, Flux, SD3.5, Z-Image 1024)."})


NEGATIVE_TOOLTIP = "The negative prompt of every sample."


def base_model_inputs():
    return {"model": ("MODEL", {"tooltip": "The base model (SD1.x, SD2.x, SDXL, Flux.1, SD3/SD3.5 or Z-Image)."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder, for the prompts."}),
            "vae": ("VAE", {"tooltip": "The model's VAE, to decode samples for the reward."})}


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
                   "imagenet_classifier: a torchvision ResNet/MobileNetV2 .pth, class names in `text`; "
                   "imagereward: ImageReward.pt with med_config.json and BERT's vocab.txt beside it.")
    CATEGORY = "DRaFT"
    FUNCTION = "load"
    RETURN_TYPES = ("DRAFT_REWARD",)

    @classmethod
    def INPUT_TYPES(cls):
        files = reward_files()
        return {"required": {
            "family": (list(rewards.FAMILIES), {"tooltip": "Which kind of reward the file holds (see the node's "
                                                                       "description)."}),
            "file": (files, {"tooltip": "The reward's weights, from models/reward_models."}),
            "clip_file": (["none"] + files, {"tooltip": "aesthetic only: the CLIP ViT-L/14 image tower."}),
            "text": ("STRING", {"default": "", "multiline": False,
                                "tooltip": "clip_similarity: target text. imagenet_classifier: class names or "
                                           "indices, comma separated."}),
            "maximize": ("BOOLEAN", {"default": True,
                                     "tooltip": "imagenet_classifier: False pushes images away from the classes."}),
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
        return {"required": {"kind": (list(rewards.BUILTIN_REWARDS),
                                      {"tooltip": "The image statistic to raise (higher is better)."})}}

    def load(self, kind):
        return (rewards.builtin_reward(kind),)


class DRaFTRewardCombine:
    DESCRIPTION = "weight_a * reward_a + weight_b * reward_b (+ weight_c * reward_c); weights may be negative."
    CATEGORY = "DRaFT"
    FUNCTION = "combine"
    RETURN_TYPES = ("DRAFT_REWARD",)

    @classmethod
    def INPUT_TYPES(cls):
        def weight(name):
            return ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                              "tooltip": f"Weight of {name}; negative pushes it down."})
        return {"required": {"reward_a": ("DRAFT_REWARD", {"tooltip": "A reward to add."}), "weight_a": weight("a"),
                             "reward_b": ("DRAFT_REWARD", {"tooltip": "A reward to add."}), "weight_b": weight("b")},
                "optional": {"reward_c": ("DRAFT_REWARD", {"tooltip": "Optional third reward."}),
                             "weight_c": weight("c")}}

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
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to score."}),
                             "reward": ("DRAFT_REWARD", {"tooltip": "The reward that scores them."}),
                             "prompt": ("STRING", {"default": "", "multiline": True,
                                                   "tooltip": "The prompt the images were made for (used by "
                                                              "prompt-aware rewards such as HPSv2 and PickScore)."})}}

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
            "first_seed": ("INT", {"default": FIRST_HELD_OUT_SEED, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                   "tooltip": "Seeds first_seed, first_seed + 1, ...: far from the training seeds."}),
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
            **base_model_inputs(),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "The LoRA to evaluate."}),
            "reward": ("DRAFT_REWARD", {"tooltip": "The reward the LoRA was trained on."}),
            **held_out_prompt_inputs(),
            "strengths": ("STRING", {"default": "0, 0.25, 0.5, 0.75, 1, 1.5",
                                     "tooltip": "LoRA strengths, comma separated (0: the base model; above 1 "
                                                "extrapolates)."}),
            **held_out_sample_inputs(),
        }, "optional": judge_inputs(2)}

    def sweep(self, model, clip, vae, lora_name, reward, prompts, negative_prompt, strengths, seeds, first_seed,
              steps, cfg, width, height, **judges):
        values = sweep_values(strengths, "strengths", "strength", prompts)
        lora = load_kohya_file(folder_paths.get_full_path_or_raise("loras", lora_name))[0]
        backends = ((s, backend.SamplingBackend(comfy.sd.load_lora_for_models(model, None, lora, s, 0)[0], clip, vae))
                    for s in values)
        rows, table, grid = held_out_sweep(backends, len(values), model, reward, prompts, negative_prompt, seeds,
                                           first_seed, steps, cfg, width, height, judges)
        return {"ui": {"text": [f"{lora_name}\n{table}"], "rows": rows}, "result": (table, grid)}


def sweep_values(text, name, what, prompts):
    """The numbers of a sweep's comma-separated `text` input, with at least one prompt, or a clear error."""
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{name}: give numbers separated by commas, got {text!r}") from None
    if not values or not lines(prompts):
        raise ValueError(f"give at least one {what} and one prompt")
    return values


def held_out_sweep(backends, count, model, reward, prompts, negative_prompt, seeds, first_seed, steps, cfg, width,
                   height, judges, row_key="strength"):
    """`strength_sweep` over (value, backend) pairs at the model's native size where width/height are 0: the rows
    (the value under `row_key`), their Markdown table and an IMAGE grid with one row per value."""
    size = backend.native_size(model)
    rows, images = strength_sweep(backends, reward, lines(prompts), seed_list(first_seed, seeds), negative_prompt,
                                  cfg, steps, width or size, height or size, judges)
    rows = [{row_key: r.pop("strength"), **r} for r in rows]
    grid = torch.from_numpy(plotting.image_grid(images, len(images) // count)).float().div(255)[None]
    return rows, sweep_table(rows), grid


def held_out_prompt_inputs():
    return {"prompts": ("STRING", {"multiline": True, "default": "a portrait of an old sailor\na bowl of fruit",
                                   "tooltip": "Held-out prompts, one per line."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": NEGATIVE_TOOLTIP})}


def held_out_sample_inputs():
    return {"seeds": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Samples per prompt."}),
            "first_seed": ("INT", {"default": FIRST_HELD_OUT_SEED, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                   "tooltip": "Seeds first_seed, first_seed + 1, ...; the same for every value."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "DDIM sampling steps."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1,
                              "tooltip": "Classifier-free guidance scale."}),
            "width": SIZE_INPUT,
            "height": SIZE_INPUT}


def chart_history_file():
    return os.path.join(folder_paths.get_user_directory(), "comfy_draft", "chart_history.json")


def load_chart_history():
    try:
        with open(chart_history_file()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save_chart_history():
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(CHART_HISTORY, f)
    atomic_write(chart_history_file(), write, overwrite=True)


# node id -> its latest run's chart data ({"total", "diversity_floor", "kept_step", "steps": [metrics]}), so the
# canvas can redraw the chart after a page reload, when the workflow is reopened, and after a server restart
# (written to the user directory after every run).
CHART_HISTORY = load_chart_history()


def chart_event(history, node_id, total, diversity_floor):
    """The chart's step for the last metrics of `history`, as the websocket event and the replayed history carry it:
    with the smoothed reward and the panels so far (plotting.py's: the canvas draws what the reward_curve image
    draws)."""
    return dict(history[-1], node=node_id, total=total, diversity_floor=diversity_floor,
                reward_smoothed=plotting.smoothed([m["reward"] for m in history])[-1],
                panels=plotting.curve_panels(history))


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


def policy_inputs(d):
    """The inputs of the variants that need no reward gradient (ddpo, graft, pgraft), named by the variant they
    belong to; the DRaFT variants ignore them."""
    return {
        "inner_epochs": ("INT", {"default": d.inner_epochs, "min": 1, "max": 100,
                                 "tooltip": "ddpo, graft, pgraft: optimizer steps per round of samples (each round's "
                                            "samples are scored once and trained on this many times)."}),
        "graft_samples_per_prompt": ("INT", {"default": d.samples_per_prompt, "min": 1, "max": 64,
                                             "tooltip": "graft, pgraft: N, samples drawn per prompt of the batch."}),
        "graft_accepted_per_prompt": ("INT", {"default": d.accepted_per_prompt, "min": 1, "max": 64,
                                              "tooltip": "graft, pgraft: K, the best K of the N are trained on."}),
        "pgraft_fraction": ("FLOAT", {"default": d.pgraft_fraction, "min": 0.01, "max": 0.99, "step": 0.01,
                                      "tooltip": "pgraft: the intermediate step t, as the fraction of the sampling "
                                                 "steps the LoRA runs (T -> t); the base model finishes. Use the "
                                                 "DRaFT P-GRAFT Sampler (it reads t from the file) to sample."}),
        "ddpo_timestep_fraction": ("FLOAT", {"default": d.timestep_fraction, "min": 0.01, "max": 1.0, "step": 0.01,
                                             "tooltip": "ddpo: fraction of the sampling steps trained per round."}),
        "ddpo_clip_range": ("FLOAT", {"default": d.clip_range, "min": 1e-6, "max": 1.0, "step": 1e-5, "round": 1e-6,
                                      "tooltip": "ddpo: PPO's ratio clip range."}),
        "ddpo_adv_clip_max": ("FLOAT", {"default": d.adv_clip_max, "min": 0.1, "max": 100.0, "step": 0.1,
                                        "tooltip": "ddpo: advantages are clipped to +/- this."}),
    }


GRADIENT_CHECKPOINTING = {"auto": "auto", "on": True, "blocks": "blocks", "off": False}  # options node -> TrainConfig


def training_option_inputs():
    """The trainer's advanced settings, on the DRaFT Training Options node (their defaults apply without it)."""
    d = TrainConfig(prompts=[""])
    return {
        "precision": (["auto", "bf16", "fp16", "fp32"],
                      {"default": d.precision,
                       "tooltip": "Compute precision (LoRA weights stay fp32). auto: the model's own half precision "
                                  "on a GPU (bf16 where the card runs it natively, fp16 with loss scaling "
                                  "otherwise), fp32 on the CPU."}),
        "accumulation": ("INT", {"default": d.accumulation, "min": 1, "max": 256,
                                 "tooltip": "Micro-batches per optimizer step: the batch of batch_size x "
                                            "accumulation in the memory of batch_size."}),
        "gradient_checkpointing": (list(GRADIENT_CHECKPOINTING), {
            "default": "auto", "tooltip": "Recompute activations in the backward pass instead of keeping them: on "
                                         "(each UNet call and decoder block), blocks (also inside each UNet call: "
                                         "least memory), off (fastest), auto (the least recomputation that fits the "
                                         "GPU's memory, or on the CPU the free RAM, by the memory estimate; "
                                         "none where it would save nothing). The choice and its reason are shown "
                                         "after training."}),
        "lv_samples": ("INT", {"default": d.lv_samples, "min": 1, "max": 16,
                               "tooltip": "draft-lv: re-noised copies of the final latent per sample."}),
        "k": ("INT", {"default": d.grad_steps, "min": 1, "max": 1000,
                      "tooltip": "draft-k: the last K sampling steps are differentiated."}),
        "kl_coef": ("FLOAT", {"default": d.kl_coef, "min": 0.0, "max": 1e4, "step": 0.01,
                              "tooltip": "Regulariser against reward hacking: penalise the LoRA model's noise "
                                         "prediction for straying from the base model's (0: off)."}),
        "reward_resolution": ("INT", {"default": d.reward_resolution, "min": 0, "max": 4096, "step": 8,
                                      "tooltip": "Decode for the reward at this size to save memory (e.g. 256 for "
                                                 "224 px rewards); 0: full size."}),
        "save_every": ("INT", {"default": d.save_every, "min": 0, "max": 100000,
                               "tooltip": "Every N steps: update the resumable training state and write the LoRA "
                                          "of that step with a preview image beside it (0: the state at the end "
                                          "only)."}),
    }


def training_options(options):
    """The options node's values as TrainConfig takes them, or the defaults where no options node is connected."""
    inputs = {**training_option_inputs(), **policy_inputs(TrainConfig(prompts=[""]))}
    o = {**{name: spec[1]["default"] for name, spec in inputs.items()}, **(options or {})}
    return dict(o, gradient_checkpointing=GRADIENT_CHECKPOINTING[o["gradient_checkpointing"]])


class DRaFTTrainingOptions:
    DESCRIPTION = ("Advanced settings for DRaFT Train LoRA (connect to its `options` input): precision, gradient "
                   "accumulation and gradient checkpointing (memory), the draft-k and draft-lv parameters, the regulariser, "
                   "the reward's decode size and how often to save. Without it the trainer uses these defaults.")
    CATEGORY = "DRaFT"
    FUNCTION = "build"
    RETURN_TYPES = ("DRAFT_OPTIONS",)
    RETURN_NAMES = ("options",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": training_option_inputs(), "optional": policy_inputs(TrainConfig(prompts=[""]))}

    def build(self, **options):
        return (options,)


# A preview beside each LoRA snapshot: the first prompts at the run's seed (the same noise at every snapshot, so
# snapshots compare like for like); ComfyUI's model library shows <lora>.png as the LoRA's preview.
PREVIEW_PROMPTS = 4


def save_preview(trainer, lora_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    c = trainer.config
    prompts = c.prompts[:PREVIEW_PROMPTS]
    with torch.inference_mode(False):
        images = held_out_images(trainer.backend, prompts, [c.seed], c.negative_prompt, c.cfg, c.sampling_steps,
                                 c.width, c.height)
    info = PngInfo()
    step = trainer.step if trainer.kept_step is None else trainer.kept_step  # keep-best: the kept LoRA's step
    info.add_text("comfy_draft", json.dumps({"step": step, "prompts": prompts, "seed": c.seed}))
    path = os.path.splitext(lora_path)[0] + ".png"
    Image.fromarray(plotting.image_grid(images, len(prompts))).save(path, pnginfo=info)
    return path


class DRaFTTrainLoRA:
    DESCRIPTION = ("Trains a LoRA on the UNet with DRaFT so that sampled images score higher on the reward. Saves it "
                   "into the loras folder (LoraLoader lists it) and returns the model with the LoRA applied. "
                   "The variants ddpo (reinforcement learning), graft and pgraft (rejection sampling) need no reward gradient: "
                   "they train on any reward, e.g. JPEG size. Advanced and per-variant settings: connect a DRaFT "
                   "Training Options node.")
    CATEGORY = "DRaFT"
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE", "FLOAT")
    RETURN_NAMES = ("model", "lora_path", "reward_curve", "final_reward")
    OUTPUT_TOOLTIPS = ("The input model with the trained LoRA applied.", "The LoRA file written.",
                       "The training curves as an image.", "The mean reward of the last step.")
    OUTPUT_NODE = True
    PREVIEW_EVERY = 5  # steps between sample previews on the node

    @classmethod
    def INPUT_TYPES(cls):
        d = TrainConfig(prompts=[""])
        return {
            "required": {
                **base_model_inputs(),
                "reward": ("DRAFT_REWARD", {"tooltip": "What to maximise (DRaFT Reward Loader, Built-in Reward or "
                                                       "Combine Rewards)."}),
                "prompts": ("STRING", {"multiline": True, "default": "a photo of a cat\na lighthouse at dusk",
                                       "tooltip": "One prompt per line; each step samples a batch from them."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": NEGATIVE_TOOLTIP}),
                "variant": (list(VARIANTS), {"default": d.variant,
                                             "tooltip": "What is differentiated: draft-lv (the last step, re-noised "
                                                        "copies), draft-k (the last K steps), draft (all), "
                                                        "alignprop (random K), refl (one random late step)."}),
                "training_steps": ("INT", {"default": 200, "min": 1, "max": 100000,
                                           "tooltip": "Optimizer steps."}),
                "sampling_steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                           "tooltip": "DDIM steps of each training sample; 0: the model's usual "
                                                      f"({USUAL})."}),
                "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                  "tooltip": f"Classifier-free guidance scale while training; 0: the model's usual "
                                             f"({USUAL})."}),
                "width": SIZE_INPUT,
                "height": SIZE_INPUT,
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Samples per step."}),
                "learning_rate": ("FLOAT", {"default": d.lr, "min": 0.0, "max": 1.0, "step": 1e-5, "round": 1e-6,
                                            "tooltip": "AdamW learning rate of the LoRA weights. On the digit model "
                                                       "ddpo wanted more (3e-3), graft and pgraft less (3e-4; at 1e-3 "
                                                       "they collapsed on the model's own samples): docs/methods.md."}),
                "rank": ("INT", {"default": d.rank, "min": 1, "max": 256, "tooltip": "LoRA rank."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Every random choice (LoRA initialisation, prompts, noise): the same "
                                            "settings and seed give the same LoRA."}),
                "lora_name": ("STRING", {"default": "draft/draft_lora",
                                         "tooltip": "File name prefix in the loras folder (a subfolder may be "
                                                    "given); a counter keeps every run's file."}),
            },
            "optional": {"resume_lora": (["none"] + folder_paths.get_filename_list("loras"),
                                         {"tooltip": "Start from this LoRA (same rank), at step 0."}),
                         "resume_state": (["none"] + training_states(),
                                          {"tooltip": "Continue a saved training state exactly (step, optimizer, "
                                                      "random state) with the same settings; training_steps may "
                                                      "be raised. The state file is updated as training goes on."}),
                         "validation": ("DRAFT_VALIDATION", {"tooltip": "Held-out validation, keep-best and early "
                                                                        "stopping (DRaFT Validation node)."}),
                         "options": ("DRAFT_OPTIONS", {"tooltip": "Advanced settings (DRaFT Training Options node): "
                                                                  "precision, accumulation, gradient_checkpointing, k, "
                                                                  "lv_samples, kl_coef, reward_resolution, "
                                                                  "save_every and the ddpo / graft / pgraft "
                                                                  "settings."})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # training is never taken from the cache

    def train(self, model, clip, vae, reward, prompts, negative_prompt, variant, training_steps, sampling_steps, cfg,
              width, height, batch_size, learning_rate, rank, seed, lora_name, resume_lora="none",
              resume_state="none", validation=None, options=None, unique_id=None):
        if resume_lora != "none" and resume_state != "none":
            raise ValueError("choose resume_lora (a LoRA to start from) or resume_state (a run to continue), not both")
        o = training_options(options)
        save_every = o["save_every"]
        size = backend.native_size(model)
        width, height = width or size, height or size
        usual_steps, usual_cfg = backend.usual_steps_and_cfg(model)
        sampling_steps, cfg = sampling_steps or usual_steps, cfg or usual_cfg
        config = TrainConfig(
            prompts=lines(prompts), negative_prompt=negative_prompt, variant=variant, grad_steps=o["k"],
            lv_samples=o["lv_samples"], steps=training_steps, sampling_steps=sampling_steps, cfg=cfg, width=width,
            height=height, batch_size=batch_size, lr=learning_rate, rank=rank, seed=seed, save_every=save_every,
            kl_coef=o["kl_coef"], reward_resolution=o["reward_resolution"], precision=o["precision"],
            accumulation=o["accumulation"], gradient_checkpointing=o["gradient_checkpointing"],
            inner_epochs=o["inner_epochs"], samples_per_prompt=o["graft_samples_per_prompt"], accepted_per_prompt=o["graft_accepted_per_prompt"],
            pgraft_fraction=o["pgraft_fraction"], timestep_fraction=o["ddpo_timestep_fraction"],
            clip_range=o["ddpo_clip_range"], adv_clip_max=o["ddpo_adv_clip_max"])
        config.check()
        check_reward(reward, config)  # before copying the model
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            lora_name, folder_paths.get_folder_paths("loras")[0])
        states = os.path.join(folder_paths.get_output_directory(), "draft_training")
        files = RunFiles(os.path.join(folder, f"{name}_{counter:05}_.safetensors"),  # a counter: never overwrites
                         folder=os.path.join(states, subfolder))
        validator = Validator(*validation) if validation is not None else None
        floor = validator.config.diversity_floor if validator is not None else 0.0
        trainer = Trainer(backend.TrainingBackend(model, clip, vae), reward, config, validator=validator)
        trainer.callbacks.append(self.reporter(trainer, unique_id, training_steps, floor))
        held_out = validator.config.prompts if validator is not None else []
        trainer.backend.encode([*config.prompts, config.negative_prompt, *held_out])  # CLIP's work done up front
        resume = os.path.join(states, resume_state) if resume_state != "none" else None
        init_lora = folder_paths.get_full_path_or_raise("loras", resume_lora) if resume_lora != "none" else None

        def make_room(estimate):  # ComfyUI frees memory for inference only: evict cached models (CLIP, other UNets)
            comfy.model_management.free_memory(estimate["total"], trainer.backend.device)
        try:
            path = run(trainer, files, resume, init_lora, make_room,
                       interrupts=(comfy.model_management.InterruptProcessingException, KeyboardInterrupt),
                       saved=(lambda lora: save_preview(trainer, lora)) if save_every else None)
        finally:
            CHART_HISTORY[str(unique_id)]["kept_step"] = trainer.kept_step
            save_chart_history()
        history = trainer.history
        with torch.inference_mode():
            patched = comfy.sd.load_lora_for_models(model, None, load_kohya_file(path)[0], 1.0, 0)[0]
            curve = torch.from_numpy(plotting.curve_image(history, trainer.kept_step, floor)).float().div(255)[None]
        text = (f"{os.path.relpath(path, folder_paths.get_folder_paths('loras')[0])}: "
                f"reward {history[0]['reward']:.4f} -> {history[-1]['reward']:.4f}")
        text += f"\n{trainer.gradient_checkpointing_reason}"
        if variant == "pgraft":
            text += ("\nP-GRAFT: the model output has the LoRA at every step; sample as trained (LoRA above t, base "
                     "model below) with the DRaFT P-GRAFT Sampler or hook keyframes (workflows/pgraft_lora_above_t.json)")
        if validator is not None:
            first, kept = validator.history[0], next(m for m in validator.history if m["step"] == trainer.kept_step)
            text += "\nheld-out: " + ", ".join(f"{k[4:]} {first[k]:.4g} -> {kept[k]:.4g}" for k in first if k.startswith("val_"))
            text += f"\nsaved the LoRA of step {trainer.kept_step} of {trainer.step}"
        skipped = sum(m.get("skipped", 0) for m in history)
        if skipped:
            text += f"\n{skipped} step(s) skipped: the fp16 gradient overflowed (the loss scale was lowered)"
        text += "".join(f"\nWARNING: {w}" for w in trainer.warnings)
        return {"ui": {"text": [text]},
                "result": (patched, path, curve, history[-1]["reward"])}

    def reporter(self, trainer, node_id, total, diversity_floor=0.0):
        """Progress bar, sample previews, the chart's websocket event (kept in CHART_HISTORY for replay) and the
        interrupt check, per step. A resumed run's chart starts with the steps of its training state."""
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
            if not chart["steps"]:  # a resumed run: its earlier steps first
                chart["steps"] = [chart_event(trainer.history[:i], node_id, total, diversity_floor)
                                  for i in range(1, len(trainer.history))]
            event = chart_event(trainer.history, node_id, total, diversity_floor)
            chart["steps"].append(event)
            instance = server.PromptServer.instance
            instance.send_sync("comfy_draft.train_step", event, instance.client_id)
            comfy.model_management.throw_exception_if_processing_interrupted()
        return report


NODE_CLASS_MAPPINGS = {
    "DRaFTDDIMSampler": DRaFTDDIMSampler,
    "DRaFTPGRAFTSampler": DRaFTPGRAFTSampler,
    "DRaFTRewardLoader": DRaFTRewardLoader,
    "DRaFTBuiltinReward": DRaFTBuiltinReward,
    "DRaFTRewardCombine": DRaFTRewardCombine,
    "DRaFTScoreImages": DRaFTScoreImages,
    "DRaFTTrainLoRA": DRaFTTrainLoRA,
    "DRaFTTrainingOptions": DRaFTTrainingOptions,
    "DRaFTValidation": DRaFTValidation,
    "DRaFTLoRAStrengthSweep": DRaFTLoRAStrengthSweep,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DRaFTDDIMSampler": "DRaFT DDIM Sampler",
    "DRaFTPGRAFTSampler": "DRaFT P-GRAFT Sampler (LoRA above t, base below)",
    "DRaFTRewardLoader": "DRaFT Reward Loader",
    "DRaFTBuiltinReward": "DRaFT Built-in Reward",
    "DRaFTRewardCombine": "DRaFT Combine Rewards",
    "DRaFTScoreImages": "DRaFT Score Images",
    "DRaFTTrainLoRA": "DRaFT Train LoRA",
    "DRaFTTrainingOptions": "DRaFT Training Options",
    "DRaFTValidation": "DRaFT Validation",
    "DRaFTLoRAStrengthSweep": "DRaFT LoRA Strength Sweep",
}


# ----- robust rewards and annealed importance guidance (docs/robust_rewards.md) ---------------------------------------

class DRaFTRewardEOT:
    DESCRIPTION = ("Expectation over transformation: the reward averaged over random, differentiable transformations "
                   "of each image, so that a LoRA cannot raise it with patterns tied to exact pixels (adversarial "
                   "textures). Training draws new transformations every step from the step's seed.")
    CATEGORY = "DRaFT"
    FUNCTION = "wrap"
    RETURN_TYPES = ("DRAFT_REWARD",)

    @classmethod
    def INPUT_TYPES(cls):
        from .comfy_draft.rewards.robust import TRANSFORMS
        return {"required": {
            "reward": ("DRAFT_REWARD", {"tooltip": "The reward to make robust (left as it is: a wrapper is "
                                                   "returned)."}),
            "transforms": ("STRING", {"default": "translate, scale, blur, noise",
                                      "tooltip": f"Comma separated, from: {', '.join(TRANSFORMS)} (or 'all'). "
                                                 "Leave out flip where a mirror image means something else "
                                                 "(text, digits)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05,
                                   "tooltip": "Scales every range: at 1, shifts up to 12.5% of the side, zoom "
                                              "0.8-1.25x, blur up to sigma max(1 px, side/256), noise std up to "
                                              "0.05, colour factors 0.8-1.2."}),
            "draws": ("INT", {"default": 4, "min": 1, "max": 64,
                              "tooltip": "Transformations per image per reward call (each costs one reward "
                                         "evaluation)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Seed of the transformations; training mixes in each step's seed."}),
        }}

    def wrap(self, reward, transforms, strength, draws, seed):
        from .comfy_draft.rewards.robust import ExpectationOverTransforms
        return (ExpectationOverTransforms(reward, transforms, strength, draws, seed),)


class DRaFTRewardEnsemble:
    DESCRIPTION = ("Several rewards as one: their mean, or their soft minimum, so that a LoRA must satisfy all of "
                   "them (an adversarial pattern rarely fools independently trained models at once).")
    CATEGORY = "DRaFT"
    FUNCTION = "combine"
    RETURN_TYPES = ("DRAFT_REWARD",)

    @classmethod
    def INPUT_TYPES(cls):
        reward = ("DRAFT_REWARD", {"tooltip": "A member of the ensemble (rewards on comparable scales)."})
        return {"required": {
            "reward_a": reward, "reward_b": reward,
            "mode": (["min", "mean"], {"tooltip": "min: soft minimum, the gradient goes mostly to the worst reward; "
                                                 "mean: the average."}),
            "temperature": ("FLOAT", {"default": 1.0, "min": 0.001, "max": 1000.0, "step": 0.01,
                                      "tooltip": "min only: towards 0 the hard minimum, large values the mean."}),
        }, "optional": {"reward_c": reward}}

    def combine(self, reward_a, reward_b, mode, temperature, reward_c=None):
        from .comfy_draft.rewards.robust import Ensemble
        members = [reward_a, reward_b] + ([reward_c] if reward_c is not None else [])
        return (Ensemble(members, mode, temperature),)


def aig_inputs():
    from .comfy_draft.guidance import SCHEDULES
    return {
        "schedule": (list(SCHEDULES), {"default": "power_p",
                                       "tooltip": "LoRA share w at step i of N: linear i/N; power_p (i/N)^p; "
                                                  "step_f 1 from i/N >= f on (0 before)."}),
        "p": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                        "tooltip": "power_p: larger p hands over to the LoRA later (more base model, less reward)."}),
        "f": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                        "tooltip": "step_f: the fraction of the chain after which only the LoRA model runs."}),
    }


BASE_MODEL_TOOLTIP = ("The model without the LoRA: the MODEL that went into LoraLoader. (A second copy of the UNet is "
                      "held while sampling when both share one, since ComfyUI merges a LoRA into the weights.)")


class DRaFTAIGSampler:
    DESCRIPTION = ("Annealed importance guidance: DDIM (as DRaFT DDIM Sampler) with the prediction (1 - w) base + "
                   "w LoRA, w growing along the chain, so the base model lays out the image and the LoRA adds "
                   "detail. Trades reward for fidelity without changing the LoRA strength.")
    CATEGORY = "DRaFT"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "base_model": ("MODEL", {"tooltip": BASE_MODEL_TOOLTIP}),
            "model": ("MODEL", {"tooltip": "The same model with the LoRA applied (LoraLoader's output)."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt's conditioning."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt's conditioning."}),
            "latent_image": ("LATENT", {"tooltip": "The latent to sample (e.g. Empty Latent Image)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Noise seed (drawn as KSampler draws it)."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "DDIM steps."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale (for both models)."}),
            **aig_inputs(),
        }}

    def sample(self, base_model, model, positive, negative, latent_image, seed, steps, cfg, schedule, p, f):
        callback = latent_preview.prepare_callback(model, steps)
        samples = backend.sample_mixed(base_model, model, positive, negative, latent_image, seed, steps, cfg,
                                     schedule, p, f, callback=callback,
                                     disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        return (latent_output(latent_image, samples),)


class DRaFTAIGSweep:
    DESCRIPTION = ("The strength sweep's counterpart for annealed importance guidance: held-out reward, judges and "
                   "diversity at several values of the schedule's parameter (p of power_p, f of step_f), LoRA "
                   "strength fixed. p = 0 or f = 0 is the LoRA model throughout, f = 1 the base model.")
    CATEGORY = "DRaFT"
    FUNCTION = "sweep"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("table", "grid")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "base_model": ("MODEL", {"tooltip": BASE_MODEL_TOOLTIP}),
            "model": ("MODEL", {"tooltip": "The same model with the LoRA applied (LoraLoader's output)."}),
            "clip": ("CLIP", {"tooltip": "Encodes the prompts."}),
            "vae": ("VAE", {"tooltip": "Decodes the samples for the reward."}),
            "reward": ("DRAFT_REWARD", {"tooltip": "The reward to report (usually the training reward)."}),
            **held_out_prompt_inputs(),
            "schedule": (["power_p", "step_f"], {"tooltip": "Which parameter is swept: p of power_p or f of step_f."}),
            "values": ("STRING", {"default": "0, 1, 2, 4",
                                  "tooltip": "The parameter values, comma separated."}),
            **held_out_sample_inputs(),
        }, "optional": judge_inputs(2)}

    def sweep(self, base_model, model, clip, vae, reward, prompts, negative_prompt, schedule, values, seeds,
              first_seed, steps, cfg, width, height, **judges):
        numbers = sweep_values(values, "values", "value", prompts)
        key = "p" if schedule == "power_p" else "f"
        lora_backend = backend.AIGSamplingBackend(base_model, model, clip, vae, schedule)  # one copy for the sweep

        def backends():
            for v in numbers:
                setattr(lora_backend, key, v)
                yield v, lora_backend
        rows, table, grid = held_out_sweep(backends(), len(numbers), model, reward, prompts, negative_prompt, seeds,
                                           first_seed, steps, cfg, width, height, judges, row_key=key)
        return {"ui": {"text": [f"AIG {schedule}\n{table}"], "rows": rows}, "result": (table, grid)}


NODE_CLASS_MAPPINGS.update({
    "DRaFTRewardEOT": DRaFTRewardEOT,
    "DRaFTRewardEnsemble": DRaFTRewardEnsemble,
    "DRaFTAIGSampler": DRaFTAIGSampler,
    "DRaFTAIGSweep": DRaFTAIGSweep,
})
NODE_DISPLAY_NAME_MAPPINGS.update({
    "DRaFTRewardEOT": "DRaFT Robust Reward (EOT)",
    "DRaFTRewardEnsemble": "DRaFT Reward Ensemble",
    "DRaFTAIGSampler": "DRaFT AIG Sampler",
    "DRaFTAIGSweep": "DRaFT AIG Sweep",
})


# ----- inverse noise correction (comfy_draft/correction.py) ----------------------------------------------------------

# models/noise_correctors: corrector files (DRaFT Train Noise Corrector writes them, DRaFT Load Noise Corrector reads).
if "noise_correctors" not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths["noise_correctors"] = (
        [os.path.join(folder_paths.models_dir, "noise_correctors")], {".safetensors"})


def interrupting_bar(total, node_id=None):
    """A progress callback: ComfyUI's progress bar and its interrupt check (which raises)."""
    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def update(done):
        bar.update_absolute(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()
    return update


class DRaFTInvertToNoise:
    DESCRIPTION = ("Inverts images to the noise that the deterministic sampler (DDIM on SD models, Euler on flow "
                   "models, as DRaFT DDIM Sampler) turns into them, with this model, conditioning, steps and cfg: "
                   "each step undone exactly on the same step grid (backward Euler by fixed-point iteration). The "
                   "noises train a DRaFT Train Noise Corrector; the node reports how closely sampling from them "
                   "returns the images.")
    CATEGORY = "DRaFT/noise correction"
    FUNCTION = "invert"
    RETURN_TYPES = ("INVERTED_NOISE",)
    RETURN_NAMES = ("inverted_noise",)
    OUTPUT_NODE = True
    INPUT_IS_LIST = True  # a folder's images (Load Image (from Folder) -> VAE Encode) come as a list of latents

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model whose sampler will start from the corrected noise."}),
            "positive": ("CONDITIONING", {"tooltip": "The conditioning you will sample with (one for all images)."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative conditioning you will sample with."}),
            "latent": ("LATENT", {"tooltip": "The images to invert, encoded by VAE Encode: a batch, or a list "
                                             "(Load Image (from Folder)); all of one size."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                              "tooltip": "Sampling steps; the corrector belongs to this step count. 0: the model's "
                                         f"usual ({USUAL})."}),
            "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "The cfg you will sample with (low cfg inverts more exactly). 0: the "
                                         "model's usual."}),
            "iterations": ("INT", {"default": 30, "min": 1, "max": 1000,
                                   "tooltip": "Most fixed-point iterations per step."}),
            "tolerance": ("FLOAT", {"default": 1e-5, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False,
                                    "tooltip": "A step is solved when no image changes by more than this, relative "
                                               "to its norm, in one iteration."}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 4096, "tooltip": "Images inverted at once."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def invert(self, model, positive, negative, latent, steps, cfg, iterations, tolerance, batch_size, unique_id=None):
        from .comfy_draft import correction
        (model, positive, negative, steps, cfg, iterations, tolerance, batch_size, unique_id) = (
            v[0] if isinstance(v, list) else v
            for v in (model, positive, negative, steps, cfg, iterations, tolerance, batch_size, unique_id))
        usual_steps, usual_cfg = backend.usual_steps_and_cfg(model)
        steps, cfg = steps or usual_steps, cfg or usual_cfg
        sampler = backend.ConditionedSampler(model, positive, negative)
        latents = [backend.prepare_latent(model, item).float() for item in latent]
        if len({tuple(x.shape[1:]) for x in latents}) > 1:
            raise ValueError(f"the images to invert differ in size ({sorted({tuple(x.shape[2:]) for x in latents})} "
                             "latent pixels): resize them to one size first")
        clean = sampler.latent_format.process_in(torch.cat(latents))
        total = len(backend.sampling_sigmas(model, steps)) - 1
        bar = interrupting_bar(total * -(-len(clean) // batch_size), unique_id)
        noise, sigmas, residual = correction.invert_latents(
            sampler, clean, [None] * len(clean), cfg=cfg, steps=steps, batch_size=batch_size, iterations=iterations,
            tolerance=tolerance, callback=lambda d: bar(d["batch"] * total + d["i"] + 1))
        returned = correction.sample_latents(sampler, noise, [None] * len(noise), cfg=cfg, steps=steps,
                                             batch_size=batch_size)  # in the model's space, as `clean`
        error = correction.relative_error(returned, clean)
        info = {"model": type(model.model.model_config).__name__, "steps": steps, "cfg": cfg, "images": len(noise),
                "residual": residual, "round_trip_error": error}
        text = (f"{len(noise)} image(s) inverted in {steps} steps at cfg {cfg:g}: largest fixed-point residual "
                f"{residual:.2g}; sampling from the noises returns the latents within {error:.2g} (relative)")
        return {"ui": {"text": [text]}, "result": ((noise, sigmas, info),)}


class DRaFTTrainNoiseCorrector:
    DESCRIPTION = ("Trains a noise corrector: a small flow model that turns Gaussian noise into noise distributed as "
                   "the inverted images' noise (the P-GRAFT paper's inverse noise correction). Saved under "
                   "models/noise_correctors; DRaFT Corrected Noise draws from it.")
    CATEGORY = "DRaFT/noise correction"
    FUNCTION = "train"
    RETURN_TYPES = ("NOISE_CORRECTOR",)
    RETURN_NAMES = ("noise_corrector",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "inverted_noise": ("INVERTED_NOISE", {"tooltip": "From DRaFT Invert To Noise."}),
            "training_steps": ("INT", {"default": 2000, "min": 1, "max": 1000000, "tooltip": "Optimizer steps."}),
            "width": ("INT", {"default": 32, "min": 8, "max": 512, "step": 8,
                              "tooltip": "Channels of the corrector's UNet (its size grows with the square)."}),
            "batch_size": ("INT", {"default": 64, "min": 1, "max": 4096, "tooltip": "Noises per optimizer step."}),
            "learning_rate": ("FLOAT", {"default": 1e-3, "min": 0.0, "max": 1.0, "step": 1e-5, "round": False,
                                        "tooltip": "AdamW's, decayed to 0 over the steps (cosine)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "The corrector's initial weights and training draws: same seed, same file."}),
            "filename": ("STRING", {"default": "corrector", "tooltip": "File name under models/noise_correctors "
                                                                       "(a counter is added: never overwrites)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # training writes a file: never taken from the cache

    def train(self, inverted_noise, training_steps, width, batch_size, learning_rate, seed, filename, unique_id=None):
        from .comfy_draft import correction
        noise, sigmas, info = inverted_noise
        bar = interrupting_bar(training_steps, unique_id)
        with torch.inference_mode(False):
            device = comfy.model_management.get_torch_device()
            corrector = correction.train_corrector(noise.clone().to(device), width, training_steps, batch_size,
                                                   learning_rate, seed, lambda step, loss: bar(step + 1)).cpu()
        folder, name, counter, _, _ = folder_paths.get_save_image_path(
            filename, folder_paths.get_folder_paths("noise_correctors")[0])
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
        correction.save_corrector(path, corrector, sigmas, info)
        text = f"{os.path.basename(path)}: for {info['model']}, {info['steps']} steps, cfg {info['cfg']:g}"
        return {"ui": {"text": [text]}, "result": ((corrector, sigmas, info),)}


class DRaFTLoadNoiseCorrector:
    DESCRIPTION = "Loads a noise corrector from models/noise_correctors (DRaFT Train Noise Corrector's files)."
    CATEGORY = "DRaFT/noise correction"
    FUNCTION = "load"
    RETURN_TYPES = ("NOISE_CORRECTOR",)
    RETURN_NAMES = ("noise_corrector",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"corrector_name": (folder_paths.get_filename_list("noise_correctors"),
                                                {"tooltip": "A file in models/noise_correctors."})}}

    def load(self, corrector_name):
        from .comfy_draft import correction
        try:
            return (correction.load_corrector(folder_paths.get_full_path_or_raise("noise_correctors", corrector_name)),)
        except ValueError as e:
            raise ValueError(f"{corrector_name}: {e}") from None


class DRaFTCorrectedNoise:
    DESCRIPTION = ("A corrected NOISE for SamplerCustomAdvanced: the seed's Gaussian noise carried through a noise "
                   "corrector, and the SIGMAS it belongs to (its inversion's step grid). Sample with the same model, "
                   "conditioning and cfg as the inversion, the 'ddim' sampler on SD models or 'euler' on flow models.")
    CATEGORY = "DRaFT/noise correction"
    FUNCTION = "noise"
    RETURN_TYPES = ("NOISE", "SIGMAS")
    RETURN_NAMES = ("noise", "sigmas")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "noise_corrector": ("NOISE_CORRECTOR", {"tooltip": "From DRaFT Train or Load Noise Corrector."}),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                   "tooltip": "The Gaussian noise before correction (drawn as KSampler draws it)."}),
            "corrector_steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                                        "tooltip": "Euler steps of the corrector's own ODE."}),
        }}

    def noise(self, noise_corrector, noise_seed, corrector_steps):
        corrector, sigmas, _ = noise_corrector
        return (backend.CorrectedNoise(corrector, noise_seed, corrector_steps), sigmas.float())


NODE_CLASS_MAPPINGS.update({
    "DRaFTInvertToNoise": DRaFTInvertToNoise,
    "DRaFTTrainNoiseCorrector": DRaFTTrainNoiseCorrector,
    "DRaFTLoadNoiseCorrector": DRaFTLoadNoiseCorrector,
    "DRaFTCorrectedNoise": DRaFTCorrectedNoise,
})
NODE_DISPLAY_NAME_MAPPINGS.update({
    "DRaFTInvertToNoise": "DRaFT Invert To Noise",
    "DRaFTTrainNoiseCorrector": "DRaFT Train Noise Corrector",
    "DRaFTLoadNoiseCorrector": "DRaFT Load Noise Corrector",
    "DRaFTCorrectedNoise": "DRaFT Corrected Noise",
})
