"""Differentiable DDIM (eta = 0) in the sigma parameterisation, with DRaFT's gradient truncation.

Shaped like k-diffusion's samplers: a "model" is any callable `model(x, sigma, **extra_args) -> x0_hat`
(classifier-free guidance included), with `x = x0 + sigma * eps` (flow models: `(1 - sigma) x0 + sigma * eps`, for
which the DDIM step is the Euler step of the flow's ODE) and `sigma` of shape (batch,). The
sampler knows nothing of UNets, prompts or ComfyUI; `comfy.samplers.KSAMPLER(sample_ddim)` runs it
inside ComfyUI's CFGGuider, and `backends.diffusers` wraps a diffusers UNet as such a model.

DRaFT (Clark et al., ICLR 2024) backpropagates a reward through the last `grad_steps` (K) sampling
steps: the first T - K steps run without autograd and the latent is detached at the boundary.
"""
import torch
import torch.utils.checkpoint  # gradient checkpointing: torch's name for recomputation


def ddim_step(x, denoised, sigma, sigma_next, final=False):
    """One DDIM (eta = 0) step: keep the predicted noise, move to `sigma_next`.

    x_next = denoised + sigma_next * (x - denoised) / sigma, equal to DDPM-space DDIM
    `x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps` after dividing by sqrt(a_prev). Written in the
    Euler form that ComfyUI's "ddim" sampler evaluates, so both round alike. The `final` step (to
    sigma 0) returns `denoised` itself, so the last step carries the model's gradient. (`final` is a
    Python bool, so that no step waits for the GPU to compare sigmas.)
    """
    if final:
        return denoised
    return x + (x - denoised) / sigma * (sigma_next - sigma)


def check_grad_steps(grad_steps, steps):
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= grad_steps <= steps:
        raise ValueError(f"grad_steps (K) must be between 0 and the number of sampling steps ({steps}), got {grad_steps}")


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, grad_steps=0, recompute=True):
    """DDIM sampling from `x` (already scaled to `sigmas[0]`) down the schedule `sigmas` (ending at 0).

    grad_steps: K, the number of final steps differentiated. 0 builds no autograd graph at all;
        len(sigmas) - 1 differentiates the full chain (DRaFT); in between is DRaFT-K.
    recompute: recompute each differentiated step's activations in the backward pass, so memory
        holds one latent per differentiated step plus one step's activations.
    callback: called after every step with {'x', 'i', 'sigma', 'sigma_hat', 'denoised'} (k-diffusion's
        convention, which ComfyUI's previews and progress bars consume).
    `disable` is accepted for k-diffusion signature compatibility (progress bars live in callbacks).
    """
    extra_args = {} if extra_args is None else extra_args
    steps = len(sigmas) - 1
    check_grad_steps(grad_steps, steps)
    first_grad_step = steps - grad_steps
    final = (sigmas[1:] == 0).tolist()

    for i in range(steps):
        differentiated = i >= first_grad_step and torch.is_grad_enabled()
        if i == first_grad_step:
            x = x.detach()  # DRaFT-K's stop-gradient at the truncation boundary
        with torch.set_grad_enabled(differentiated):
            denoised = denoise(model, x, sigmas[i], extra_args, recompute and differentiated)
            x_next = ddim_step(x, denoised, sigmas[i], sigmas[i + 1], final[i])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x_next
    return x


def noised(x0, sigma, eps):
    """x0 at noise level `sigma` (a number, or one per sample) with unit noise `eps`, as eps and v models are noised
    in the sigma parameterisation: x0 + sigma * eps. (A flow model's backend has its own: (1 - sigma) x0 +
    sigma eps.)"""
    if sigma.ndim:
        sigma = sigma.reshape(-1, *[1] * (eps.ndim - 1))
    return x0 + sigma * eps


def denoise_renoised(model, x0, sigma, noises, extra_args=None, recompute=True, batched=False, noised=noised):
    """DRaFT-LV's inner loop: for each eps_i in `noises`, re-noise the final latent to the last
    sampling sigma, x_i = noised(stop_grad(x0), sigma, eps_i), and denoise it once with gradient.

    Returns the n predictions x0_hat_i; DRaFT-LV sums their rewards. `batched`: the n copies as one model call of
    n x batch (faster; as much memory as n calls without gradient checkpointing, n times one call's recompute with it).
    """
    extra_args = {} if extra_args is None else extra_args
    x0 = x0.detach()
    if batched:
        x = torch.cat([noised(x0, sigma, eps) for eps in noises])
        return list(denoise(model, x, sigma, extra_args, recompute).chunk(len(noises)))
    return [denoise(model, noised(x0, sigma, eps), sigma, extra_args, recompute) for eps in noises]


def denoise(model, x, sigma, extra_args, recompute=False):
    """One model call at a scalar sigma; with `recompute`, its activations are recomputed in backward."""
    return recomputed(lambda x, sigma: model(x, sigma, **extra_args), x, sigma * x.new_ones([x.shape[0]]),
                        enabled=recompute)


def recomputed(fn, *args, enabled=True, **kwargs):
    """fn(*args, **kwargs), keeping only its inputs for backward and recomputing the rest (when grad is on)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)
