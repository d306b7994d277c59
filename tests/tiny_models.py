"""Tiny, seeded, randomly initialised models in real on-disk formats (generated at test time, cached)."""
import os
import pathlib

import torch

CACHE = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "models"

# The smallest UNet that ComfyUI's model detection still calls SD15: SD1.5's widths and context
# size (model_channels 320, context_dim 768), one level, one res block.
TINY_SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
    use_spatial_transformer=True, context_dim=768, num_heads=8, num_head_channels=-1, legacy=False,
    use_linear_in_transformer=False,
)
SD_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def reinit_(module, generator):
    """Seeded init that does not depend on the module's own (possibly skipped) init."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            else:
                p.fill_(1.0)  # norm scales
    return module


def write_tiny_sd15_checkpoint(path, seed=0):
    """An SD1.5-layout checkpoint (ldm keys) with a tiny UNet and full-size CLIP-L and SD VAE."""
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    g = torch.Generator().manual_seed(seed)
    ops = comfy.ops.disable_weight_init
    unet = reinit_(UNetModel(**TINY_SD15_UNET, operations=ops), g)
    # Zero-initialised output convs (the usual choice) would make the model ignore its input.
    vae = reinit_(AutoencoderKL(ddconfig=SD_VAE, embed_dim=4), g)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    sd = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                           ("cond_stage_model.transformer.", clip)):
        for k, v in module.state_dict().items():
            if k.endswith("position_ids"):
                continue
            sd[prefix + k] = v.detach().to(torch.float16).contiguous()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)
    return path


def tiny_sd15_checkpoint(seed=0):
    path = CACHE / f"tiny_sd15_seed{seed}.safetensors"
    if not path.exists():
        write_tiny_sd15_checkpoint(path, seed)
    return path


# SD's VAE decoder layout at a quarter of its width (ch 32: 32-64-128-128 channels, still multiples of GroupNorm's
# 32 groups). ComfyUI reads a decoder's width from the file (comfy.sd.VAE: decoder.conv_in's 4 * ch outputs) and
# builds an SD VAE with that decoder, so the file loads like any SD1.5 checkpoint with a decoder 16x cheaper per
# pixel. For the half-precision tests: bf16/fp16 convolutions are emulated on CPUs without AVX-512 (CI's AMD EPYC),
# and what those tests prove is the dtype handling, not the decoder's arithmetic.
SMALL_DECODER_CH = 32


def tiny_sd15_small_decoder_checkpoint(seed=0):
    """`tiny_sd15_checkpoint(seed)` with the VAE decoder replaced by a seeded one of width SMALL_DECODER_CH (the
    UNet, CLIP-L and the VAE encoder are the same tensors)."""
    path = CACHE / f"tiny_sd15_seed{seed}_decoder{SMALL_DECODER_CH}.safetensors"
    if not path.exists():
        from comfy.ldm.modules.diffusionmodules.model import Decoder
        from safetensors.torch import load_file, save_file

        prefix = "first_stage_model.decoder."
        sd = {k: v for k, v in load_file(str(tiny_sd15_checkpoint(seed))).items() if not k.startswith(prefix)}
        decoder = reinit_(Decoder(**dict(SD_VAE, ch=SMALL_DECODER_CH)), torch.Generator().manual_seed(seed + 1))
        sd.update({prefix + k: v.detach().to(torch.float16).contiguous() for k, v in decoder.state_dict().items()})
        tmp = path.with_suffix(".tmp")
        save_file(sd, str(tmp))
        os.replace(tmp, path)
    return path


# SDXL's UNet layout at a tiny size: ldm module names, linear transformer projections, context 2048
# and the 2816-wide ADM input (pooled bigG text + six size embeddings). Too small for ComfyUI's file
# detection to call it SDXL, so `tiny_sdxl` builds it with ComfyUI's own SDXL model class instead.
TINY_SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1,
    use_spatial_transformer=True, legacy=False, num_classes="sequential", adm_in_channels=2816, context_dim=2048,
    num_head_channels=32, use_linear_in_transformer=True, use_temporal_attention=False, use_temporal_resblock=False,
)


def tiny_sdxl(seed=0, disable_dynamic=True):
    """A ComfyUI MODEL of ComfyUI's SDXL class (eps, SDXL latent format) with a tiny seeded UNet, with a
    `cached_patcher_init` factory so that ComfyUI can reload a fresh copy (as training does), like a
    model from UNETLoader."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(TINY_SDXL_UNET)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    reinit_(model.diffusion_model, torch.Generator().manual_seed(seed))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    patcher.cached_patcher_init = (tiny_sdxl, (seed,))
    return patcher


class SDXLTextStandIn:
    """Stands in for SDXL's CLIP (CLIP-L + OpenCLIP bigG: 800M parameters, too large for CI): conditioning
    in exactly the layout ComfyUI's SDXL CLIP returns (context (1, 77, 2048), pooled_output (1, 1280)),
    fixed per prompt."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        import zlib
        g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
