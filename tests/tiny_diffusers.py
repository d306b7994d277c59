"""A tiny seeded diffusers UNet with Stable Diffusion's DDPM schedule, for library tests."""
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

CONTEXT_DIM = 32


def tiny_unet(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=4, norm_num_groups=8)
    with torch.no_grad():  # diffusers zero-inits the output conv: make the model depend on its input
        unet.conv_out.weight.normal_(0, 0.05)
    return unet.to(dtype).eval()


def sd_scheduler(prediction_type="epsilon", set_alpha_to_one=False):
    """Stable Diffusion 1.5's scheduler config for DDIM."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1,
                         timestep_spacing="leading", prediction_type=prediction_type)
