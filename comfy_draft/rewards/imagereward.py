"""ImageReward (Xu et al. 2023, THUDM): BLIP's ViT image encoder, a BERT text encoder that cross-attends to the image
tokens, and an MLP on the text [CLS] feature; score = (mlp - 0.16717) / 1.03334.

Loaded offline from the published files through transformers' BLIP classes (ImageReward's own package does not
import under transformers 5): `ImageReward.pt` (the state dict of its `ImageReward` module), `med_config.json` (the
BERT config, beside it) and a BERT WordPiece vocabulary (`vocab.txt` of bert-base-uncased, beside it or given).
The architecture is read from the tensor shapes (ViT width, depth, patch and image size; MLP sizes) and the config.

Key renames, ImageReward.pt -> transformers (`BlipVisionModel`, `BlipTextModel` without pooler):
  blip.visual_encoder.cls_token                  -> vision.embeddings.class_embedding
  blip.visual_encoder.pos_embed                  -> vision.embeddings.position_embedding
  blip.visual_encoder.patch_embed.proj.*         -> vision.embeddings.patch_embedding.*
  blip.visual_encoder.blocks.N.norm1 / norm2     -> vision.encoder.layers.N.layer_norm1 / layer_norm2
  blip.visual_encoder.blocks.N.attn.qkv / proj   -> vision.encoder.layers.N.self_attn.qkv / projection
  blip.visual_encoder.blocks.N.mlp.fc1 / fc2     -> vision.encoder.layers.N.mlp.fc1 / fc2
  blip.visual_encoder.norm                       -> vision.post_layernorm
  blip.text_encoder.*                            -> text.* (BLIP's `med` BERT and transformers' BlipText share names)
  mlp.layers.{0,2,4,6,7}                         -> mlp.layers.{0,2,4,6,7} (no activations: the ReLUs are commented
                                                    out in ImageReward.py, so the head is affine)
  blip.vision_proj, blip.text_proj, embeddings.position_ids: not used by the score (left out).
"""
import json
import os

import torch

from .base import Reward, frozen
from .clip import AestheticMLP, _count_blocks
from .files import RewardFileError, load_state_dict, require_keys, unwrap
from .preprocess import CLIP_MEAN, CLIP_STD, normalize, resize_center_crop

EXPECTED = "ImageReward.pt (THUDM's ImageReward: BLIP ViT + BERT with cross-attention + MLP)"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
VISION_RENAMES = (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
                  ("patch_embed.proj.", "embeddings.patch_embedding."), ("norm.", "post_layernorm."))
BLOCK_RENAMES = (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
                 ("attn.proj.", "self_attn.projection."), ("mlp.", "mlp."))
REQUIRED = ("blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
            "blip.visual_encoder.patch_embed.proj.weight",
            "blip.visual_encoder.blocks.0.attn.qkv.weight", "blip.text_encoder.embeddings.word_embeddings.weight",
            "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight", "mlp.layers.0.weight")


def vision_key(key):
    """A BLIP ViT key (after `blip.visual_encoder.`) -> transformers' BlipVisionModel key (None: not used)."""
    if key.startswith("blocks."):
        _, n, rest = key.split(".", 2)
        for old, new in BLOCK_RENAMES:
            if rest.startswith(old):
                return f"encoder.layers.{n}.{new}{rest[len(old):]}"
        return None
    for old, new in VISION_RENAMES:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return None


def vision_heads(width):
    """BLIP's ViTs: base (768) 12 heads, large (1024) 16, i.e. 64-wide heads; smaller test towers likewise."""
    return max(1, width // 64)


class ImageRewardModel(torch.nn.Module):
    def __init__(self, vision, text, mlp, tokenizer):
        super().__init__()
        self.vision, self.text, self.mlp = vision, text, mlp
        self.tokenizer = tokenizer
        self.image_size = vision.config.image_size

    def tokens(self, prompts, device):
        t = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return t.input_ids.to(device), t.attention_mask.to(device)

    def forward(self, pixels, prompts):
        """Scores of normalised `pixels` (B, 3, S, S) for `prompts`."""
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        ids, mask = self.tokens(prompts, pixels.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device)
        text = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask, return_dict=True)
        return (self.mlp(text.last_hidden_state[:, 0].float()).squeeze(-1) - MEAN) / STD


class ImageRewardReward(Reward):
    """ImageReward's score of (image, prompt): roughly standard-normal over its training data, higher is better."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.name = "ImageReward"

    def score(self, images, prompts):
        size = self.model.image_size
        pixels = normalize(resize_center_crop(images, size), CLIP_MEAN, CLIP_STD)  # bicubic, as its PIL transform
        return self.model(pixels, prompts)


def find_vocab(path, vocab):
    """The WordPiece vocabulary: `vocab` (a vocab.txt or a folder holding one), else vocab.txt beside the model."""
    candidates = [vocab] if vocab else [os.path.join(os.path.dirname(os.fspath(path)), "vocab.txt")]
    for c in candidates:
        c = os.fspath(c)
        if os.path.isdir(c):
            c = os.path.join(c, "vocab.txt")
        if os.path.isfile(c):
            return c
    raise RewardFileError(f"ImageReward needs BERT's WordPiece vocabulary (vocab.txt of bert-base-uncased): put it "
                          f"beside {path} or give its path; looked for {', '.join(map(str, candidates))}")


def load_imagereward(path, med_config=None, vocab=None, allow_unsafe_pickle=False):
    """ImageReward from `ImageReward.pt`, `med_config.json` (default: beside it) and BERT's vocab.txt (`find_vocab`)."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    med_config = med_config or os.path.join(os.path.dirname(os.fspath(path)), "med_config.json")
    if not os.path.isfile(med_config):
        raise RewardFileError(f"ImageReward needs its med_config.json (the BERT config published with "
                              f"ImageReward.pt); not found at {med_config}")
    with open(med_config) as f:
        med = json.load(f)
    tokenizer = BertTokenizer(find_vocab(path, vocab), do_lower_case=True)
    with torch.inference_mode(False):
        sd = unwrap(load_state_dict(path, EXPECTED, allow_unsafe_pickle), "state_dict", "model")
        require_keys(sd, REQUIRED, path, EXPECTED)
        v = "blip.visual_encoder."
        width = sd[v + "cls_token"].shape[-1]
        patch = sd[v + "patch_embed.proj.weight"].shape[-1]
        grid = round((sd[v + "pos_embed"].shape[1] - 1) ** 0.5)
        vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=width, intermediate_size=sd[v + "blocks.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=_count_blocks(sd, v + "blocks."), num_attention_heads=vision_heads(width),
            image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6))  # BLIP's ViT: eps 1e-6
        text = BlipTextModel(BlipTextConfig(
            vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
            intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
            hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
            pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, eos_token_id=None, sep_token_id=None),
            add_pooling_layer=False)  # (special-token ids only matter for generation)
        sizes = [sd["mlp.layers.0.weight"].shape[1]] + [sd[f"mlp.layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)]
        mlp = AestheticMLP(sizes)  # the same Sequential (Linear/Dropout slots 0-7, no activations)
        renamed = {"vision": {}, "text": {}, "mlp": {}}
        for key, value in sd.items():
            if key.startswith(v) and vision_key(key[len(v):]) is not None:
                renamed["vision"][vision_key(key[len(v):])] = value
            elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
                renamed["text"][key[len("blip.text_encoder."):]] = value
            elif key.startswith("mlp."):
                renamed["mlp"][key[len("mlp."):]] = value
        for name, module in (("vision", vision), ("text", text), ("mlp", mlp)):
            missing, unexpected = module.load_state_dict(renamed[name], strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise RewardFileError(f"{path} does not match ImageReward's {name} encoder as inferred from its shapes "
                                      f"and {med_config}: missing {missing[:4]}, unexpected {unexpected[:4]}")
        model = ImageRewardModel(vision.eval(), text.eval(), mlp.eval(), tokenizer)
    return frozen(ImageRewardReward(model))
