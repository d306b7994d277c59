"""Training backends from model files, without a hub: the bundled digit model, diffusers folders, and
single-file checkpoints (through ComfyUI's own loader when a ComfyUI is at hand, which detects the model
type and needs no configs; else through diffusers with a local config folder)."""
import json
import os
import sys

from .trainer import TrainConfig

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_pipeline(path, config=None, device=None):
    """A StableDiffusionPipeline (SD1.x / SD2.x) or StableDiffusionXLPipeline from a local folder or a
    single-file checkpoint."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd_only = dict(safety_checker=None, requires_safety_checker=False)
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        xl = False
        if os.path.isfile(index):
            with open(index) as f:
                xl = "XL" in json.load(f).get("_class_name", "")
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        pipe = cls.from_pretrained(path, local_files_only=True, **({} if xl else sd_only))
    elif os.path.isfile(path):
        xl = is_sdxl_checkpoint(path)
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        try:
            pipe = cls.from_single_file(path, config=config, local_files_only=True, **({} if xl else sd_only))
        except Exception as e:  # diffusers wants the model's config folder, which it would otherwise download
            raise ValueError(f"could not load {path} as a single-file {'SDXL' if xl else 'SD1.x/SD2.x'} checkpoint "
                             f"without the hub ({e}); give a ComfyUI folder (comfyui), or a local diffusers folder of "
                             f"the same model type (config)") from e
    else:
        raise ValueError(f"model not found: {path}")
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def is_sdxl_checkpoint(path):
    """An original-layout SDXL checkpoint has a second text encoder under conditioner.embedders.1."""
    if not path.endswith(".safetensors"):
        return False
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return any(k.startswith("conditioner.embedders.1.") for k in f.keys())
    except Exception:  # not readable as safetensors: the loader reports it properly
        return False


def native_size(model):
    """The resolution a model was made for: the UNet's sample size times the VAE's downscaling for a
    diffusers folder (SD1.5 512, SD2 768, SDXL 1024), 1024 for an SDXL file, else 512; digits: 16."""
    from . import digits
    if model in digits.MODELS:
        return digits.SIZE
    if os.path.isdir(model):
        try:
            with open(os.path.join(model, "unet", "config.json")) as f:
                sample_size = json.load(f)["sample_size"]
            with open(os.path.join(model, "vae", "config.json")) as f:
                return sample_size * 2 ** (len(json.load(f)["block_out_channels"]) - 1)
        except (OSError, KeyError, TypeError, ValueError):
            return TrainConfig.width
    return 1024 if os.path.isfile(model) and is_sdxl_checkpoint(model) else TrainConfig.width


def comfyui_dir(given=None):
    """A ComfyUI folder for single-file checkpoints: `given`, $COMFYUI_DIR, or the ComfyUI this pack is
    installed in (ComfyUI/custom_nodes/<pack>)."""
    if given:
        if not os.path.isfile(os.path.join(given, "comfy", "sd.py")):
            raise ValueError(f"{given}: not a ComfyUI folder (no comfy/sd.py)")
        return given
    for candidate in (os.environ.get("COMFYUI_DIR"), os.path.dirname(os.path.dirname(PACK_DIR))):
        if candidate and os.path.isfile(os.path.join(candidate, "comfy", "sd.py")):
            return candidate
    return None


def load_comfyui_backend(path, comfy_dir, device=None):
    """A single-file checkpoint through ComfyUI's own loader (whatever ComfyUI recognises; no configs
    needed), trained through the ComfyUI backend exactly as the DRaFTTrainLoRA node trains."""
    import torch
    if os.path.abspath(comfy_dir) not in sys.path:
        sys.path.insert(0, os.path.abspath(comfy_dir))
    if "comfy.model_management" not in sys.modules:  # ComfyUI not started yet (by us or a host process)
        import comfy.cli_args
        # ComfyUI's --cpu, read when comfy.model_management is first imported; else ComfyUI picks the GPU.
        no_gpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
        comfy.cli_args.args.cpu = device == "cpu" or (device is None and no_gpu)
    import comfy.sd

    from .backends.comfyui import TrainingBackend
    try:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(path)[:3]
        if clip is None or vae is None:
            raise ValueError(f"{path} has no text encoder or VAE: give a full checkpoint")
        return TrainingBackend(model, clip, vae, copy_model=False)  # loaded here, outside inference mode
    except Exception as e:  # a damaged or unknown file: ComfyUI's loader says what it found
        raise ValueError(f"ComfyUI could not load {path} for training: {e}") from None


def load_backend(model, config=None, comfyui=None, device=None):
    """A training backend for `model`: "digits" or "digits-flow" (the bundled demo models), a diffusers folder (SD1.x,
    SD2.x, SDXL), or a single-file checkpoint, loaded by ComfyUI's own loader when a ComfyUI is at hand
    (see `comfyui_dir`) and `config` is not given, else by diffusers with `config`, a local diffusers
    folder of the same model type. Raises ValueError with what went wrong."""
    from . import digits
    if model in digits.MODELS:
        return digits.load_backend(device or "cpu", model)
    if os.path.isfile(model) and not config:
        comfy_dir = comfyui_dir(comfyui)
        if comfy_dir:
            return load_comfyui_backend(model, comfy_dir, device)
    from .backends.diffusers import TrainingBackend
    return TrainingBackend.from_pipeline(load_pipeline(model, config, device))
