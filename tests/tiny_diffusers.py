"""A tiny seeded diffusers UNet with Stable Diffusion's DDPM schedule, for library tests."""
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

CONTEXT_DIM = 32


def tiny_unet(seed=0, dtype=torch.float32, channels=4):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=4, norm_num_groups=8)
    with torch.no_grad():  # diffusers zero-inits the output conv: make the model depend on its input
        unet.conv_out.weight.normal_(0, 0.05)
    return (unet if dtype == torch.float32 else unet.to(dtype)).eval()


def sd_scheduler(prediction_type="epsilon", set_alpha_to_one=False):
    """Stable Diffusion 1.5's scheduler config for DDIM."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1,
                         timestep_spacing="leading", prediction_type=prediction_type)


def tiny_text_encoder(folder, seed=0):
    """A tiny CLIP text encoder (width CONTEXT_DIM) and a real CLIP tokenizer built offline."""
    from tiny_clip import clip_tokenizer_files
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer_files(folder)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=CONTEXT_DIM, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77))
    return encoder.eval(), tokenizer


def tiny_pixel_backend(tmp_path, seed=0):
    """A pixel-space (no VAE) tiny text-conditioned diffusion model as a training backend."""
    from comfy_draft.backends.diffusers import TrainingBackend

    encoder, tokenizer = tiny_text_encoder(tmp_path / "tokenizer", seed)
    return TrainingBackend(tiny_unet(seed, channels=3), sd_scheduler(), text_encoder=encoder, tokenizer=tokenizer,
                           device="cpu")


def tiny_pipeline(tmp_path, seed=0):
    """A tiny StableDiffusionPipeline (latent space, small VAE) that diffusers can save and reload."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    encoder, tokenizer = tiny_text_encoder(tmp_path / "tokenizer", seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=16)
    return StableDiffusionPipeline(unet=tiny_unet(seed), vae=vae.eval(), text_encoder=encoder, tokenizer=tokenizer,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# SDXL's diffusers layout at a tiny size: two text encoders (context = both widths, pooled text from the
# second), size conditioning through `add_embedding`, two ResNets per level, two transformer blocks.
TINY_SDXL_LAYERS, TINY_SDXL_TRANSFORMERS = 2, 2


def tiny_sdxl_pipeline(tmp_path, seed=0, scheduler=None):
    """A tiny StableDiffusionXLPipeline that diffusers can save and reload."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from tiny_clip import clip_tokenizer_files
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer_files(tmp_path / "tokenizer")
    tokenizer.model_max_length = 77  # as SDXL's tokenizers (diffusers' prompt encoding pads to it)
    text = dict(vocab_size=49408, hidden_size=CONTEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=CONTEXT_DIM)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=TINY_SDXL_LAYERS, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, TINY_SDXL_TRANSFORMERS), cross_attention_dim=2 * CONTEXT_DIM,
        attention_head_dim=4, norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=CONTEXT_DIM + 6 * 8)
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.05)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=16, scaling_factor=0.13025)
    return StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**text)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)).eval(), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet.eval(), scheduler=scheduler or sd_scheduler(), add_watermarker=False)
