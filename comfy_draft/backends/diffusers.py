"""A diffusers UNet + its DDPM noise schedule -> the library's `model(x, sigma) -> x0_hat` interface.

Used outside ComfyUI (Python, the command line) with the same sampler as the ComfyUI backend. Sigma
space follows k-diffusion / ComfyUI: x = x_vp / sqrt(alpha_bar) = x0 + sigma * eps,
sigma = sqrt((1 - alpha_bar) / alpha_bar).
"""
import torch

from ..sampling import check_grad_steps, sample_ddim


class DiffusersDenoiser(torch.nn.Module):
    """Wraps a diffusers `UNet2DConditionModel` (eps- or v-prediction) as an x0 predictor in sigma space."""

    def __init__(self, unet, alphas_cumprod, prediction_type="epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        # float64 and not a buffer, so module-wide dtype casts (.half()) leave the schedule exact
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()

    @classmethod
    def from_scheduler(cls, unet, scheduler):
        """From any diffusers DDPM-family scheduler (its `alphas_cumprod` and `prediction_type`)."""
        return cls(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type)

    def sigma_to_t(self, sigma):
        """Fractional timestep of `sigma`, by linear interpolation in log sigma (exact on the table)."""
        log_sigmas = self.sigmas.to(sigma.device, sigma.dtype).log()
        dists = sigma.log() - log_sigmas[:, None]
        low = dists.ge(0).cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
        w = ((log_sigmas[low] - sigma.log()) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def ddim_sigmas(self, steps):
        """diffusers' DDIM 'leading' schedule with steps_offset 1 (ComfyUI's 'ddim_uniform'), then 0."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        timesteps = torch.arange(steps - 1, -1, -1) * (len(self.sigmas) // steps) + 1
        return torch.cat([self.sigmas[timesteps], self.sigmas.new_zeros(1)])

    def forward(self, x, sigma, encoder_hidden_states, **unet_kwargs):
        s = sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        scale = (s ** 2 + 1).rsqrt()
        out = self.unet(x * scale, self.sigma_to_t(sigma.to(x.dtype)), encoder_hidden_states=encoder_hidden_states,
                        **unet_kwargs).sample
        if self.prediction_type == "epsilon":
            return x - s * out
        return x * scale ** 2 - out * s * scale  # v-prediction


def guided(denoiser, cond, uncond, cfg):
    """Classifier-free guidance inside the graph: uncond + cfg * (cond - uncond) on x0, one batched call."""
    def model(x, sigma):
        if cfg == 1:
            return denoiser(x, sigma, cond)
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([uncond, cond]))
        x0_uncond, x0_cond = both.chunk(2)
        return x0_uncond + cfg * (x0_cond - x0_uncond)
    return model


def sample(denoiser, cond, uncond, cfg, noise, steps, grad_steps=0, checkpoint=True, callback=None):
    """DDIM (eta = 0) from unit Gaussian `noise`, started as diffusers does (x_T = noise in DDPM
    space); returns x0 of the last step, differentiable in its last `grad_steps` steps."""
    sigmas = denoiser.ddim_sigmas(steps).to(noise.device, noise.dtype)
    check_grad_steps(grad_steps, steps)
    x = noise * (1 + sigmas[0] ** 2).sqrt()
    return sample_ddim(guided(denoiser, cond, uncond, cfg), x, sigmas, callback=callback,
                       grad_steps=grad_steps, checkpoint=checkpoint)
