"""Tiny random CLIP-family models, written in the on-disk layouts of the published reward files."""
import torch

# A small open_clip ViT with 2 heads per tower; vocab and context as in every real CLIP (the tokenizer needs them).
OPEN_CLIP = dict(embed_dim=32,
                 vision_cfg=dict(layers=2, width=128, patch_size=8, image_size=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2))
# ViT-H-14's vision width and 80-wide heads (16 of them, not 20), shallow and with a narrow MLP to stay cheap.
OPEN_CLIP_H = dict(embed_dim=32,
                   vision_cfg=dict(layers=1, width=1280, head_width=80, mlp_ratio=0.05, patch_size=4, image_size=8),
                   text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
HF_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
HF_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 image_size=32, patch_size=8)


def open_clip_model(cfg, quick_gelu, seed=0):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(seed)
    model = CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]),
                 quick_gelu=quick_gelu)
    return model.eval()


def write_openai_jit(path, model):
    """An OpenAI-style TorchScript archive (like ViT-L-14.pt): traced encode_image / encode_text, plus the
    input_resolution / context_length / vocab_size entries OpenAI's state dicts carry."""
    size = model.visual.image_size[0]
    for name, value in [("input_resolution", size), ("context_length", 77), ("vocab_size", 49408)]:
        model.__dict__.pop(name, None)  # open_clip keeps some as plain ints
        model.register_buffer(name, torch.tensor(value))
    traced = torch.jit.trace_module(
        model, dict(encode_image=(torch.zeros(1, 3, size, size),), encode_text=(torch.zeros(1, 77, dtype=torch.long),)),
        check_trace=False)  # the re-trace check trips over module name mangling, not over the graph
    traced.save(str(path))
    return traced


def clip_tokenizer_files(folder):
    """Save a transformers CLIPTokenizer built from open_clip's bundled CLIP BPE vocab (as in CLIP's HF repos)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    simple = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(folder)
    return tokenizer


def hf_clip_model(seed=0):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=HF_TEXT, vision_config=HF_VISION, projection_dim=32)
    return CLIPModel(config).eval()


def hf_clip_vision_model(seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=32, **HF_VISION)).eval()


def write_clip_vision(path, model):
    """A ComfyUI clip_vision file (clip_vision_l.safetensors layout), with the position_ids buffer older
    transformers versions saved."""
    from safetensors.torch import save_file
    sd = dict(model.state_dict())
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    sd["vision_model.embeddings.position_ids"] = torch.arange(positions)[None]
    save_file(sd, str(path))


def aesthetic_mlp(in_dim, seed=0):
    """The predictor's MLP as published (improved-aesthetic-predictor's `MLP.layers`), with a tiny input."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(in_dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()


def write_aesthetic_mlp(path, layers):
    """`sac+logos+ava1-l14-linearMSE.pth` layout: torch.save of the module's state dict (keys `layers.N.*`)."""
    torch.save({f"layers.{k}": v for k, v in layers.state_dict().items()}, path)
