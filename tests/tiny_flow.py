"""Tiny, seeded flow-matching models in the families' published layouts (generated at test time, cached).

Flux.1 (dev and schnell) and SD3.5 are written as diffusion-model files in the original repositories' key layout,
which ComfyUI's own model detection reads as that family (`comfy.model_detection`: Flux's width and depth from
img_in / txt_in / the block counts, its dev/schnell split from guidance_in; MMDiT's depth from x_embedder, SD3.5's
RMS q/k norms and second attention from their keys). Z-Image is detected by its exact width (dim 3840, about 6 B
parameters: no small file can pass as one), so `tiny_zimage` builds ComfyUI's own ZImage model class at a tiny width,
as `tiny_models.tiny_sdxl` does for SDXL. All three decode with a 16-channel VAE of Flux's/SD3's layout at a quarter
of its width. Text encoders (T5-XXL, CLIP-G, Qwen3-4B) are far too large for CI: `FlowTextStandIn` returns
conditioning in each family's layout.
"""
import os
import zlib

import torch
from tiny_models import CACHE, SD_VAE, reinit_

TINY_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                 hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                 theta=10000, patch_size=2, qkv_bias=True, txt_ids_dims=[])
# SD3.5-Medium's layout (RMS q/k norms, a second attention in the first block) at depth 2: width 128, 2 heads.
TINY_SD35 = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=2048, input_size=None,
                 context_embedder_config={"target": "torch.nn.Linear",
                                          "params": {"in_features": 4096, "out_features": 128}},
                 num_patches=256, pos_embed_max_size=16, qk_norm="rms", x_block_self_attn_layers=[0],
                 pos_embed_scaling_factor=None)
TINY_ZIMAGE = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=2560, n_layers=1,
                   n_refiner_layers=1, qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48],
                   axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                   z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)
# What each family's text encoders hand the model: context tokens x width, and the pooled vector (None: none).
TEXT = {"flux": (256, 4096, 768), "sd3": (154, 4096, 2048), "zimage": (32, 2560, None)}


def seeded_(module, seed):
    """`reinit_`, and the floating-point buffers too: some are allocated with torch.empty (MMDiT's pos_embed) and
    would otherwise be whatever memory held, NaN now and then."""
    g = torch.Generator().manual_seed(seed)
    reinit_(module, g)
    with torch.no_grad():
        for b in module.buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    return module


def save(sd, path):
    from safetensors.torch import save_file
    assert all(v.float().isfinite().all() for v in sd.values()), f"{path.name}: non-finite values"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def tiny_flux_file(guidance=True, seed=0):
    """A Flux.1 dev (`guidance`: with guidance_in) or schnell diffusion-model file, in BFL's key layout (RMSNorm
    weights named `.scale`)."""
    path = CACHE / f"tiny_flux_{'dev' if guidance else 'schnell'}_buffers_seed{seed}.safetensors"
    if not path.exists():
        import comfy.ops
        from comfy.ldm.flux.model import Flux
        model = seeded_(Flux(**TINY_FLUX, guidance_embed=guidance, operations=comfy.ops.disable_weight_init), seed)
        save({k[:-len(".weight")] + ".scale" if k.endswith("_norm.weight") else k: v
              for k, v in model.state_dict().items()}, path)
    return path


def tiny_flux_fp8_values_file(seed=0):
    """`tiny_flux_file()` with every tensor rounded to float8 e4m3fn (stored as bf16, which holds those exactly): the
    same values UNETLoader's `fp8_e4m3fn` storage keeps, so a model loaded from it at full precision is the fp8 one's
    reference."""
    path = CACHE / f"tiny_flux_dev_fp8_values_buffers_seed{seed}.safetensors"
    if not path.exists():
        from safetensors.torch import load_file
        save({k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(tiny_flux_file(True, seed))).items()}, path)
    return path


def tiny_sd35_file(seed=0):
    """An SD3.5-Medium-layout MMDiT diffusion-model file (the keys of Stability's sd3.5 files without the
    `model.diffusion_model.` prefix, as ComfyUI's split diffusion models are)."""
    path = CACHE / f"tiny_sd35_buffers_seed{seed}.safetensors"
    if not path.exists():
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
        model = seeded_(OpenAISignatureMMDITWrapper(**TINY_SD35, operations=comfy.ops.disable_weight_init), seed)
        save(model.state_dict(), path)
    return path


def tiny_zimage(seed=0, disable_dynamic=True):
    """A ComfyUI MODEL of ComfyUI's ZImage class (flow, shift 3, Flux latents) with a tiny seeded NextDiT and a
    `cached_patcher_init` factory (ComfyUI can reload a fresh copy, as training does), like UNETLoader's models."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.ZImage(TINY_ZIMAGE)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    seeded_(model.diffusion_model, seed)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    patcher.cached_patcher_init = (tiny_zimage, (seed,))
    return patcher


def tiny_flow_vae_file(seed=0):
    """The decoder of a 16-channel VAE in the layout of Flux's and SD3's ae.safetensors, at a quarter of their width
    (ch 32: ComfyUI reads a decoder's width from the file). No encoder: ComfyUI sizes it from the standard config
    whatever the file holds, and training never encodes."""
    path = CACHE / f"tiny_flow_vae_decoder_seed{seed}.safetensors"
    if not path.exists():
        from comfy.ldm.modules.diffusionmodules.model import Decoder
        decoder = reinit_(Decoder(**dict(SD_VAE, z_channels=16, ch=32)), torch.Generator().manual_seed(seed))
        save({"decoder." + k: v for k, v in decoder.state_dict().items()}, path)
    return path


class FlowTextStandIn:
    """Stands in for a flow family's text encoders (`TEXT`): conditioning in the layout ComfyUI's encoders return
    (context (1, tokens, width), pooled_output where the family has one), fixed per prompt."""

    def __init__(self, family):
        self.tokens, self.width, self.pooled = TEXT[family]

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        extra = {"pooled_output": torch.randn(1, self.pooled, generator=g)} if self.pooled else {}
        return [[torch.randn(1, self.tokens, self.width, generator=g), extra]]
