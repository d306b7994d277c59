"""Rewards on CLIP towers: LAION aesthetic predictor v2, HPSv2 / v2.1, PickScore, CLIP similarity to a text.

Everything loads from local files. Architectures are inferred from tensor shapes, so any size of a
family works; weights are created outside inference mode so training can backpropagate through them.
"""
import json
import os

import torch
import torch.nn.functional as F

from .base import Reward, frozen
from .files import RewardFileError, load_state_dict, require_keys, strip_prefix, unwrap
from .preprocess import CLIP_MEAN, CLIP_STD, normalize, resize_center_crop, resize_longest_pad

CLIP_FILE = ("a CLIP checkpoint (an open_clip/OpenAI state dict or TorchScript .pt, an HPSv2 .pt, "
             "a ComfyUI clip_vision .safetensors, or a Hugging Face CLIPModel folder)")
OPEN_CLIP_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
                  "positional_embedding", "text_projection", "ln_final.weight")
CLIP_VISION_KEYS = ("vision_model.embeddings.patch_embedding.weight",
                    "vision_model.embeddings.position_embedding.weight",
                    "vision_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight")
# Entries of TorchScript state dicts that are not weights: OpenAI's (ViT-L-14.pt ...) carry the first
# three, traced open_clip models also the causal attention mask that open_clip rebuilds itself.
JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

# Attention head width by ViT width, from open_clip's model_configs (ViT-H-14: 80, ViT-g-14: 88,
# ViT-bigG-14: 104, ViT-e-14: 112); all other CLIP towers, and every text tower, use 64.
VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104, 1792: 112}


def head_width(width):
    return VISION_HEAD_WIDTH.get(width, 64)


def default_quick_gelu(vision_width):
    """OpenAI's CLIPs (ViT-B: 768, ViT-L: 1024) use QuickGELU; wider towers only exist as
    LAION-style models (ViT-H, g, bigG), which use GELU."""
    return vision_width <= 1024


def _count_blocks(sd, prefix):
    """Number of numbered blocks `prefix<N>.` in a state dict."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _mlp_ratio(hidden, width):
    # open_clip builds the MLP with int(width * mlp_ratio); the half guards against float truncation.
    return (hidden + 0.5) / width


def _load_strict(model, sd, path):
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RewardFileError(f"{path} does not match the CLIP architecture inferred from its tensor shapes: {e}") from e


class OpenClipTowers(torch.nn.Module):
    """An open_clip CLIP with its bundled BPE tokenizer."""

    has_text = True

    def __init__(self, model, image_size):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer
        self.model = model
        self.image_size = image_size
        self.embed_dim = model.visual.proj.shape[1]
        self.tokenizer = SimpleTokenizer(context_length=model.positional_embedding.shape[0])

    @property
    def logit_scale(self):
        return self.model.logit_scale

    def encode_image(self, pixels):
        return self.model.encode_image(pixels.to(self.model.visual.conv1.weight.dtype))

    def encode_text(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.model.token_embedding.weight.device))

    def drop_text(self):
        """Free the text tower (image-only rewards never use it)."""
        for name in ("transformer", "token_embedding", "ln_final", "positional_embedding", "text_projection"):
            setattr(self.model, name, None)
        self.has_text = False
        return self


class HFClipTowers(torch.nn.Module):
    """A transformers CLIPModel, or a CLIPVisionModelWithProjection (image tower only)."""

    def __init__(self, model, image_size, path, tokenizer=None):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.path = path
        self.embed_dim = model.visual_projection.out_features
        self.has_text = hasattr(model, "text_model")
        self.hf_tokenizer = tokenizer
        if self.has_text and tokenizer is None:
            # Same ids as CLIPTokenizer (start 49406, end 49407); padding ids are never attended to
            # by the end-of-text token, which is what gets pooled.
            from open_clip.tokenizer import SimpleTokenizer
            self.tokenizer = SimpleTokenizer(context_length=model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self):
        return getattr(self.model, "logit_scale", None)

    def encode_image(self, pixels):
        pixels = pixels.to(self.model.visual_projection.weight.dtype)
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    def encode_text(self, texts):
        if not self.has_text:
            raise RewardFileError(f"{self.path} holds only a CLIP image tower (clip_vision); it cannot encode text")
        if self.hf_tokenizer is not None:
            batch = self.hf_tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                                      max_length=self.model.config.text_config.max_position_embeddings)
            ids, mask = batch["input_ids"], batch["attention_mask"]
        else:
            ids, mask = self.tokenizer(texts), None
        device = self.model.text_projection.weight.device
        out = self.model.text_model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device))
        return self.model.text_projection(out.pooler_output)

    def drop_text(self):
        """Free the text tower (image-only rewards never use it)."""
        if self.has_text:
            self.model.text_model = self.model.text_projection = None
            self.has_text = False
        return self


def _open_clip_from_state_dict(sd, path, quick_gelu):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    if "visual.proj" not in sd:
        raise RewardFileError(f"{path}: only ViT CLIP image towers are supported (this one has no visual.proj: "
                              f"a ResNet or timm tower?)")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    image_size = patch * round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    vision_cfg = CLIPVisionCfg(
        layers=_count_blocks(sd, "visual.transformer.resblocks."), width=width, head_width=head_width(width),
        mlp_ratio=_mlp_ratio(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], width),
        patch_size=patch, image_size=image_size)
    text_cfg = CLIPTextCfg(
        context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
        width=text_width, heads=text_width // 64, layers=_count_blocks(sd, "transformer.resblocks."),
        mlp_ratio=_mlp_ratio(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], text_width))
    model = CLIP(sd["text_projection"].shape[1], vision_cfg, text_cfg,
                 quick_gelu=default_quick_gelu(width) if quick_gelu is None else quick_gelu)
    _load_strict(model, {k: v for k, v in sd.items() if k not in JIT_EXTRAS}, path)
    return OpenClipTowers(model, image_size)


def _clip_vision_from_state_dict(sd, path, quick_gelu):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    require_keys(sd, CLIP_VISION_KEYS, path, "a ComfyUI clip_vision file (CLIPVisionModelWithProjection)")
    # Older transformers saved the position_ids buffer; a full CLIPModel file also has a text tower we do not use.
    sd = {k: v for k, v in sd.items()
          if k.startswith(("vision_model.", "visual_projection.")) and not k.endswith("position_ids")}
    hidden, _, patch, _ = sd["vision_model.embeddings.patch_embedding.weight"].shape
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    image_size = patch * round((positions - 1) ** 0.5)
    quick_gelu = default_quick_gelu(hidden) if quick_gelu is None else quick_gelu
    config = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection_dim=sd["visual_projection.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, "vision_model.encoder.layers."),
        num_attention_heads=hidden // head_width(hidden), patch_size=patch, image_size=image_size,
        hidden_act="quick_gelu" if quick_gelu else "gelu")
    model = CLIPVisionModelWithProjection(config)
    _load_strict(model, sd, path)
    return HFClipTowers(model, image_size, path)


def _clip_folder(path, quick_gelu):
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel
    config_file = os.path.join(path, "config.json")
    expected = "a Hugging Face CLIPModel folder (config.json + model.safetensors or pytorch_model.bin)"
    if not os.path.isfile(config_file):
        raise RewardFileError(f"{path} is a folder without config.json; expected {expected}")
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "clip":
        raise RewardFileError(f"{path} holds a '{model_type}' model; expected {expected}")
    config = CLIPConfig.from_pretrained(path, local_files_only=True)
    if quick_gelu is not None:
        config.text_config.hidden_act = config.vision_config.hidden_act = "quick_gelu" if quick_gelu else "gelu"
    try:
        model = CLIPModel.from_pretrained(path, config=config, local_files_only=True).float()
    except (OSError, ValueError) as e:
        raise RewardFileError(f"{path} could not be loaded as {expected}: {e}") from e
    tokenizer = None
    if any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "vocab.json")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return HFClipTowers(model, config.vision_config.image_size, path, tokenizer)


def _clip_state_dict(path, expected, allow_unsafe_pickle):
    """(state dict, whether it was wrapped as {'state_dict': ...}) from a single checkpoint file."""
    obj = load_state_dict(path, expected, allow_unsafe_pickle)
    wrapped = isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)
    sd = unwrap(obj, "state_dict")
    require_keys(sd, (), path, expected)  # a dict of tensors, before looking at its key names
    return strip_prefix(sd, "module."), wrapped


def load_clip(path, quick_gelu=None, allow_unsafe_pickle=False):
    """A frozen CLIP from a local file or folder, with `encode_image(normalised pixels)`,
    `encode_text(list of str)` (unnormalised embeddings), `image_size`, `logit_scale`, `embed_dim`.

    Accepts open_clip / OpenAI state dicts (`open_clip_pytorch_model.bin`, `.safetensors`, also wrapped
    as {'state_dict': ...} like `HPS_v2_compressed.pt`, or with a `module.` prefix), OpenAI TorchScript
    archives (`ViT-L-14.pt`), ComfyUI clip_vision files (`clip_vision_l.safetensors`, image tower only)
    and Hugging Face CLIPModel folders (`openai/clip-vit-large-patch14`, `yuvalkirstain/PickScore_v1`).
    `quick_gelu=None` picks the activation: from config.json for folders, GELU for {'state_dict': ...}
    training checkpoints, otherwise QuickGELU for OpenAI-sized towers (width <= 1024) and GELU beyond.
    """
    path = os.fspath(path)
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; weights must be normal tensors
        if os.path.isdir(path):
            return frozen(_clip_folder(path, quick_gelu))
        sd, wrapped = _clip_state_dict(path, CLIP_FILE, allow_unsafe_pickle)
        if "vision_model.embeddings.patch_embedding.weight" in sd:
            return frozen(_clip_vision_from_state_dict(sd, path, quick_gelu))
        require_keys(sd, OPEN_CLIP_KEYS, path, CLIP_FILE)
        if quick_gelu is None and wrapped:
            quick_gelu = False
        return frozen(_open_clip_from_state_dict(sd, path, quick_gelu))


def _require_text(clip, path, reward):
    if not clip.has_text:
        raise RewardFileError(f"{path} holds only a CLIP image tower (clip_vision layout); {reward} needs a text tower "
                              f"too: give an open_clip/OpenAI checkpoint or a Hugging Face CLIPModel folder")


def _crop_pixels(images, size):
    return normalize(resize_center_crop(images, size), CLIP_MEAN, CLIP_STD)


def _cosine(a, b):
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


class ClipReward(Reward):
    """A reward on a CLIP image embedding; `features` are those embeddings, L2-normalised."""

    def pixels(self, images):
        return _crop_pixels(images, self.clip.image_size)

    def features(self, images):
        return F.normalize(self.clip.encode_image(self.pixels(images)), dim=-1)

    def text_features(self, prompts):
        """L2-normalised text embeddings, each prompt encoded once per dtype and device (training asks for the
        same prompts every step; no gradient flows to text)."""
        cache = self.__dict__.setdefault("_text_features", {})
        weight = next(self.clip.parameters())
        key = (weight.dtype, weight.device)
        missing = [p for p in dict.fromkeys(prompts) if (p, key) not in cache]
        if missing:
            with torch.no_grad():
                for p, f in zip(missing, F.normalize(self.clip.encode_text(missing), dim=-1)):
                    cache[p, key] = f
        return torch.stack([cache[p, key] for p in prompts])


class AestheticReward(ClipReward):
    """LAION aesthetic predictor v2: an MLP on the L2-normalised CLIP ViT-L/14 image embedding (about 1-10)."""

    def __init__(self, clip, mlp):
        super().__init__()
        self.clip = clip
        self.mlp = mlp
        self.name = "LAION aesthetic v2"

    def score(self, images, prompts):
        return self.mlp(self.features(images)).squeeze(-1)


class AestheticMLP(torch.nn.Module):
    """The predictor's `layers` Sequential; the Dropout slots keep the published key indices (0, 2, 4, 6, 7)."""

    def __init__(self, sizes):
        super().__init__()
        linear = [torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
        self.layers = torch.nn.Sequential(linear[0], torch.nn.Dropout(0.2), linear[1], torch.nn.Dropout(0.2),
                                          linear[2], torch.nn.Dropout(0.1), linear[3], linear[4])

    def forward(self, x):
        return self.layers(x)


def load_aesthetic(mlp_path, clip_path, allow_unsafe_pickle=False):
    """LAION aesthetic predictor v2: `mlp_path` is `sac+logos+ava1-l14-linearMSE.pth` (the MLP's state dict),
    `clip_path` OpenAI CLIP ViT-L/14 in any form `load_clip` accepts (`ViT-L-14.pt`, `clip_vision_l.safetensors`, ...)."""
    expected = "the LAION aesthetic predictor MLP (sac+logos+ava1-l14-linearMSE.pth)"
    with torch.inference_mode(False):
        sd, _ = _clip_state_dict(mlp_path, expected, allow_unsafe_pickle)
        require_keys(sd, [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")], mlp_path, expected)
        sizes = [sd["layers.0.weight"].shape[1]] + [sd[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)]
        mlp = AestheticMLP(sizes)
        try:
            mlp.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise RewardFileError(f"{mlp_path} does not look like {expected}: {e}") from e
        clip = load_clip(clip_path, allow_unsafe_pickle=allow_unsafe_pickle).drop_text()
    if clip.embed_dim != sizes[0]:
        raise RewardFileError(f"{mlp_path} takes {sizes[0]}-dim CLIP image embeddings but {os.fspath(clip_path)} gives "
                              f"{clip.embed_dim}-dim ones (the predictor was trained on OpenAI CLIP ViT-L/14)")
    return frozen(AestheticReward(clip, mlp))


class HPSv2Reward(ClipReward):
    """Human Preference Score v2 / v2.1: cosine similarity of image and prompt in a fine-tuned ViT-H-14."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.name = "HPSv2"

    def pixels(self, images):
        # HPSv2 keeps the whole image: longest side to size, black padding (0 before normalisation).
        return normalize(resize_longest_pad(images, self.clip.image_size, fill=0.0), CLIP_MEAN, CLIP_STD)

    def score(self, images, prompts):
        return _cosine(self.features(images), self.text_features(prompts))


def load_hpsv2(path, allow_unsafe_pickle=False):
    """HPSv2 from `HPS_v2_compressed.pt` or `HPS_v2.1_compressed.pt` ({'state_dict': open_clip ViT-H-14})."""
    clip = load_clip(path, allow_unsafe_pickle=allow_unsafe_pickle)
    _require_text(clip, path, "HPSv2")
    return frozen(HPSv2Reward(clip))


class PickScoreReward(ClipReward):
    """PickScore: exp(logit_scale) * cosine(image, prompt), about 20-23 on real images."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.name = "PickScore"

    def score(self, images, prompts):
        return self.clip.logit_scale.exp() * _cosine(self.features(images), self.text_features(prompts))


def load_pickscore(folder):
    """PickScore from a local copy of the Hugging Face folder `yuvalkirstain/PickScore_v1` (a CLIPModel)."""
    clip = load_clip(folder)
    _require_text(clip, folder, "PickScore")
    return frozen(PickScoreReward(clip))


class ClipSimilarityReward(ClipReward):
    """Cosine similarity between the image and a fixed text (e.g. "a pencil sketch"); prompts are ignored."""

    def __init__(self, clip, target_text):
        super().__init__()
        self.clip = clip
        self.name = f"CLIP similarity to {target_text!r}"
        with torch.inference_mode(False), torch.no_grad():
            self.register_buffer("target", F.normalize(clip.encode_text([target_text]), dim=-1))

    def score(self, images, prompts):
        return _cosine(self.features(images), self.target)


def load_clip_similarity(path, target_text, allow_unsafe_pickle=False):
    """CLIP similarity to `target_text` with any CLIP that `load_clip` accepts and that has a text tower."""
    clip = load_clip(path, allow_unsafe_pickle=allow_unsafe_pickle)
    _require_text(clip, path, "CLIP similarity")
    return frozen(ClipSimilarityReward(clip, target_text))
