"""ImageReward: a small random file in the published key layout (ImageReward.pt + med_config.json), loaded through
transformers' BLIP classes, against a reference written with plain torch ops from the state dict."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from tolerance import float32_atol

from comfy_draft import rewards
from comfy_draft.rewards.files import RewardFileError

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "lighthouse", "at", "dusk"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
WIDTH, DEPTH, PATCH, GRID = 64, 2, 16, 14        # vision tower (ViT-L: 1024, 24, 16, 14)
HIDDEN, LAYERS, HEADS, FFN = 64, 2, 2, 128       # BERT (ImageReward: 768, 12, 12, 3072)
MLP = [HIDDEN, 1024, 128, 64, 16, 1]             # the published head sizes, on this BERT's width


def published_state_dict(seed=0):
    """Every key of ImageReward.pt (its `ImageReward` module: blip.visual_encoder, blip.text_encoder, blip.vision_proj,
    blip.text_proj, mlp), small and random."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix, n):
        return {f"{prefix}.weight": 1 + r(n, scale=0.05), f"{prefix}.bias": r(n, scale=0.05)}

    def linear(prefix, n_out, n_in):
        return {f"{prefix}.weight": r(n_out, n_in, scale=1 / math.sqrt(n_in)), f"{prefix}.bias": r(n_out, scale=0.05)}

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    sd = {v + "cls_token": r(1, 1, WIDTH), v + "pos_embed": r(1, GRID * GRID + 1, WIDTH),
          v + "patch_embed.proj.weight": r(WIDTH, 3, PATCH, PATCH, scale=0.05), v + "patch_embed.proj.bias": r(WIDTH)}
    for i in range(DEPTH):
        b = f"{v}blocks.{i}."
        sd.update(**ln(b + "norm1", WIDTH), **linear(b + "attn.qkv", 3 * WIDTH, WIDTH),
                  **linear(b + "attn.proj", WIDTH, WIDTH), **ln(b + "norm2", WIDTH),
                  **linear(b + "mlp.fc1", 4 * WIDTH, WIDTH), **linear(b + "mlp.fc2", WIDTH, 4 * WIDTH))
    sd.update(ln(v + "norm", WIDTH))
    sd.update({t + "embeddings.position_ids": torch.arange(512)[None],
               t + "embeddings.word_embeddings.weight": r(len(VOCAB) + 2, HIDDEN),  # + BLIP's [DEC] and [ENC]
               t + "embeddings.position_embeddings.weight": r(512, HIDDEN)})
    sd.update(ln(t + "embeddings.LayerNorm", HIDDEN))
    for i in range(LAYERS):
        b = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention", HIDDEN), ("crossattention", WIDTH)):
            sd.update(**linear(f"{b}{att}.self.query", HIDDEN, HIDDEN),
                      **linear(f"{b}{att}.self.key", HIDDEN, kv_width),
                      **linear(f"{b}{att}.self.value", HIDDEN, kv_width),
                      **linear(f"{b}{att}.output.dense", HIDDEN, HIDDEN), **ln(f"{b}{att}.output.LayerNorm", HIDDEN))
        sd.update(**linear(b + "intermediate.dense", FFN, HIDDEN), **linear(b + "output.dense", HIDDEN, FFN),
                  **ln(b + "output.LayerNorm", HIDDEN))
    sd.update(**linear("blip.vision_proj", 256, WIDTH), **linear("blip.text_proj", 256, HIDDEN))
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(MLP, MLP[1:])):
        sd.update(linear(f"mlp.layers.{i}", n_out, n_in))
    return sd


MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": FFN,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
              "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": len(VOCAB) + 2, "encoder_width": 768, "add_cross_attention": True}


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward")
    sd = published_state_dict()
    torch.save(sd, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(MED_CONFIG))
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder, sd


def reference_scores(sd, images, prompts):
    """ImageReward's forward written out with plain torch ops from the state dict (BLIP's vit.py and med.py)."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = TF.resize(images, 224, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, 224)
    x = TF.normalize(x, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])

    def lin(h, p):
        return h @ sd[p + ".weight"].T + sd[p + ".bias"]

    def norm(h, p, eps):
        return F.layer_norm(h, h.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def attention(q, k, v_, heads, mask=None):
        b, lq, d = q.shape
        split = lambda h: h.reshape(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
        if mask is not None:
            scores = scores + (1 - mask[:, None, None, :].float()) * -10000.0  # BLIP's extended attention mask
        return (scores.softmax(-1) @ split(v_)).transpose(1, 2).reshape(b, lq, d)

    # vision: patches + [CLS] + positions, pre-norm blocks, final norm (eps 1e-6)
    h = F.conv2d(x, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([sd[v + "cls_token"].expand(len(h), -1, -1), h], 1) + sd[v + "pos_embed"]
    for i in range(DEPTH):
        b = f"{v}blocks.{i}."
        q, k, v_ = lin(norm(h, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1)
        h = h + lin(attention(q, k, v_, WIDTH // 64), b + "attn.proj")
        h = h + lin(F.gelu(lin(norm(h, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = norm(h, v + "norm", 1e-6)
    # text: WordPiece ids by hand ([CLS] words [SEP], padded to 35), BERT layers with cross-attention
    ids = torch.zeros(len(prompts), 35, dtype=torch.long)
    for row, p in enumerate(prompts):
        tokens = [2, *[VOCAB.index(w) for w in p.lower().split()], 3]
        ids[row, :len(tokens)] = torch.tensor(tokens)
    mask = (ids != 0).long()
    h = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:35]
    h = norm(h, t + "embeddings.LayerNorm", 1e-12)
    for i in range(LAYERS):
        b = f"{t}encoder.layer.{i}."
        a = attention(lin(h, b + "attention.self.query"), lin(h, b + "attention.self.key"),
                      lin(h, b + "attention.self.value"), HEADS, mask)
        h = norm(h + lin(a, b + "attention.output.dense"), b + "attention.output.LayerNorm", 1e-12)
        a = attention(lin(h, b + "crossattention.self.query"), lin(image, b + "crossattention.self.key"),
                      lin(image, b + "crossattention.self.value"), HEADS)
        h = norm(h + lin(a, b + "crossattention.output.dense"), b + "crossattention.output.LayerNorm", 1e-12)
        h = norm(h + lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense"), b + "output.LayerNorm", 1e-12)
    out = h[:, 0]
    for i in (0, 2, 4, 6, 7):  # no activations
        out = lin(out, f"mlp.layers.{i}")
    return ((out.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072)


def test_published_layout_loads_and_matches_reference(imagereward_files):
    folder, sd = imagereward_files
    reward = rewards.load_reward("imagereward", folder / "ImageReward.pt")
    assert "imagereward" in rewards.FAMILIES
    images = torch.rand(3, 3, 256, 320, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a cat", "a red lighthouse at dusk", "a blue dog"]
    with torch.no_grad():
        ours, ref = reward(images, prompts), reference_scores(sd, images, prompts)
    print("ImageReward (tiny random):", ours.tolist(), "reference:", ref.tolist())
    assert ref.std() > 1e-3  # the scores depend on the inputs
    # float32 (the reward casts its head's input to float32): transformers' BLIP and the plain ops above sum in
    # different orders. Tolerance (tests/tolerance.py): the widest reduction (the head's 1024), k = 16 for the depth
    # of two towers and the head: 1.4e-5 here; measured 0 (9e-8 with AVX2 kernels); swapped prompts move it by 3e-3.
    torch.testing.assert_close(ours, ref, rtol=0, atol=float32_atol(ref.abs().max(), reduction=1024, k=16))
    swapped = reward(images, prompts[::-1])  # the prompt matters
    assert not torch.allclose(swapped, ours)


def test_gradient_reaches_the_image_under_outer_inference_mode(imagereward_files):
    folder, _ = imagereward_files
    with torch.inference_mode():  # as ComfyUI runs every node, loader included
        reward = rewards.load_reward("imagereward", folder / "ImageReward.pt")
        with torch.inference_mode(False), torch.enable_grad():  # as the trainer scores
            images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
            reward(images, "a photo of a cat").sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # usable as a judge: held-out scoring with it beside another reward
    from comfy_draft.validation import score_images
    out = score_images(images.detach(), ["a photo of a cat"], 2, rewards.builtin_reward("brightness"),
                       {"imagereward": reward})
    assert math.isfinite(out["imagereward"])


def test_missing_files_are_named(imagereward_files, tmp_path):
    folder, sd = imagereward_files
    (tmp_path / "ImageReward.pt").symlink_to(folder / "ImageReward.pt")
    with pytest.raises(RewardFileError, match="med_config.json"):
        rewards.load_reward("imagereward", tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED_CONFIG))
    with pytest.raises(RewardFileError, match="vocab.txt"):
        rewards.load_reward("imagereward", tmp_path / "ImageReward.pt")
    torch.save({k: v for k, v in sd.items() if not k.startswith("mlp.")}, tmp_path / "broken.pt")
    with pytest.raises(RewardFileError, match="mlp.layers.0.weight"):
        rewards.load_reward("imagereward", tmp_path / "broken.pt", clip_path=folder / "vocab.txt")
