"""The library sampler against independent references: diffusers' DDIMScheduler and finite differences."""
import pytest
import torch
from tiny_diffusers import CONTEXT_DIM, sd_scheduler, tiny_unet

from comfy_draft.backends.diffusers import DiffusersDenoiser, guided, sample
from comfy_draft.sampling import sample_ddim

CFG = 7.5


def conds(batch, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, CONTEXT_DIM, generator=g, dtype=dtype),
            torch.randn(batch, 3, CONTEXT_DIM, generator=g, dtype=dtype))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers_ddim_step_for_step(prediction_type):
    steps, dtype = 10, torch.float64
    unet = tiny_unet(dtype=dtype)
    cond, uncond = conds(2, dtype)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=dtype)

    # Reference: the diffusers DDIM loop with SD1.5's scheduler and eps/v-space guidance.
    scheduler = sd_scheduler(prediction_type)
    scheduler.set_timesteps(steps)
    latents, ref_latents = noise.clone(), []
    with torch.no_grad():
        for t in scheduler.timesteps:
            ref_latents.append(latents)
            out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            out_uncond, out_cond = out.chunk(2)
            step = scheduler.step(out_uncond + CFG * (out_cond - out_uncond), t, latents, eta=0.0)
            latents = step.prev_sample
    ref_x0 = step.pred_original_sample  # the last step's x0_hat; our schedule ends at sigma 0 on it

    denoiser = DiffusersDenoiser.from_scheduler(unet, scheduler)
    ours = []
    with torch.no_grad():
        x0 = sample(denoiser, cond, uncond, CFG, noise, steps, callback=lambda d: ours.append((d["x"], d["sigma"])))
    assert len(ours) == steps
    alphas = scheduler.alphas_cumprod.to(dtype)
    for i, (t, (x, sigma), ref) in enumerate(zip(scheduler.timesteps, ours, ref_latents)):
        torch.testing.assert_close(sigma.to(dtype), ((1 - alphas[t]) / alphas[t]).sqrt(), rtol=1e-6, atol=0)
        # sigma space -> DDPM space: x_vp = sqrt(alpha_bar) * x
        err = ((x * alphas[t].sqrt() - ref).abs().max() / ref.abs().max()).item()
        print(f"step {i}: max relative error {err:.1e}")
        torch.testing.assert_close(x * alphas[t].sqrt(), ref, rtol=1e-5, atol=1e-6, msg=f"step {i}")
    torch.testing.assert_close(x0, ref_x0, rtol=1e-5, atol=1e-6)

    # diffusers with set_alpha_to_one=True also ends at sigma 0: its final latent is our output.
    scheduler_to_zero = sd_scheduler(prediction_type, set_alpha_to_one=True)
    scheduler_to_zero.set_timesteps(steps)
    t = scheduler_to_zero.timesteps[-1]
    with torch.no_grad():
        out = unet(torch.cat([ref_latents[-1]] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    out_uncond, out_cond = out.chunk(2)
    last = scheduler_to_zero.step(out_uncond + CFG * (out_cond - out_uncond), t, ref_latents[-1], eta=0.0)
    torch.testing.assert_close(x0, last.prev_sample, rtol=1e-5, atol=1e-6)


def _setup(steps, seed=0):
    unet = tiny_unet(seed, dtype=torch.float64)
    denoiser = DiffusersDenoiser.from_scheduler(unet, sd_scheduler())
    cond, uncond = conds(1, torch.float64)
    model = guided(denoiser, cond, uncond, CFG)
    sigmas = denoiser.sampling_sigmas(steps)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * sigmas[0]
    weight = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
    w_out = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return model, sigmas, x, weight, w_out, direction


@pytest.mark.parametrize("grad_steps", [1, 3, 5])
@pytest.mark.parametrize("checkpoint", [True, False])
def test_truncated_gradient_matches_finite_differences(grad_steps, checkpoint):
    """d/dtheta of <w, sample> with theta differentiated in the last K steps only (K = 5: full chain)."""
    steps = 5
    model, sigmas, x, weight, w_out, direction = _setup(steps)
    weight.requires_grad_(True)
    out = sample_ddim(model, x, sigmas, grad_steps=grad_steps, recompute=checkpoint)
    (grad,) = torch.autograd.grad((out * w_out).sum(), weight)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    analytic = (grad * direction).sum().item()

    # Independent reference: central differences of the function DRaFT-K differentiates, i.e. the
    # prefix run with theta fixed, the last K steps with theta + h * direction.
    first = steps - grad_steps
    with torch.no_grad():
        x_boundary = sample_ddim(model, x, torch.cat([sigmas[:first + 1]]), grad_steps=0) if first else x

        def f(h):
            weight.add_(h * direction)
            try:
                return (sample_ddim(model, x_boundary, sigmas[first:]) * w_out).sum().item()
            finally:
                weight.sub_(h * direction)

        h = 1e-6
        numeric = (f(h) - f(-h)) / (2 * h)
    print(f"K={grad_steps} recompute={checkpoint}: analytic {analytic:.10g}  finite-diff {numeric:.10g}")
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_truncation_changes_the_gradient_and_k0_builds_no_graph():
    model, sigmas, x, weight, w_out, _ = _setup(4)
    weight.requires_grad_(True)
    grads = [torch.autograd.grad((sample_ddim(model, x, sigmas, grad_steps=k) * w_out).sum(), weight)[0]
             for k in (1, 4)]
    assert not torch.allclose(grads[0], grads[1])
    x.requires_grad_(True)
    out = sample_ddim(model, x, sigmas, grad_steps=0)
    assert out.grad_fn is None and not out.requires_grad


def test_argument_errors():
    model, sigmas, x, *_ = _setup(4)
    with pytest.raises(ValueError, match=r"grad_steps \(K\) must be between 0 and the number of sampling steps \(4\), got 5"):
        sample_ddim(model, x, sigmas, grad_steps=5)
    with pytest.raises(ValueError, match="got -1"):
        sample_ddim(model, x, sigmas, grad_steps=-1)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        sample_ddim(model, x, sigmas[:1])
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersDenoiser(tiny_unet(), sd_scheduler().alphas_cumprod, "sample")


def test_checkpointed_full_chain_memory_does_not_grow_with_steps():
    """K = T backward: peak tensor memory from T = 4 to T = 16 grows < 2x with per-step checkpointing
    (and ~4x without it, which shows the measurement sees activations)."""
    from tensor_memory import PeakTensorMemory

    unet = tiny_unet()
    unet.requires_grad_(False)
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.requires_grad_(True)
    denoiser = DiffusersDenoiser.from_scheduler(unet, sd_scheduler())
    cond, uncond = conds(1, torch.float32)
    noise = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    peaks = {}
    for checkpoint in (True, False):
        for steps in (4, 16):
            with PeakTensorMemory() as memory:
                out = sample(denoiser, cond, uncond, CFG, noise, steps, grad_steps=steps, recompute=checkpoint)
                out.square().mean().backward()
            peaks[checkpoint, steps] = memory.peak
            print(f"recompute={checkpoint} T=K={steps}: peak tensor memory {memory.peak / 2**20:.2f} MiB")
    assert peaks[True, 16] < 2 * peaks[True, 4]
    assert peaks[False, 16] > 3 * peaks[False, 4]
    assert peaks[True, 4] < peaks[False, 4]


def test_flow_sampler_equals_diffusers_flow_match_euler_scheduler():
    """The rectified-flow digit model sampled by the library (FlowDenoiser's x0 prediction, the DDIM step) equals
    diffusers' own FlowMatchEulerDiscreteScheduler stepping the raw velocity on the same sigmas."""
    from comfy_draft import digits
    backend = digits.load_backend("cpu", "digits-flow")
    cond = backend.encode(["a 4", "a 7"])
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = sample(backend.denoiser, cond, cond, 1.0, noise, 10)
    scheduler = digits.make_scheduler(flow=True)
    scheduler.set_timesteps(sigmas=backend.denoiser.sampling_sigmas(10)[:-1].numpy())
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            velocity = backend.unet(x, t.expand(2), encoder_hidden_states=cond["encoder_hidden_states"]).sample
            x = scheduler.step(velocity, t, x).prev_sample
    print(f"max |ours - diffusers| = {(ours - x).abs().max():.2e}")
    assert (ours - x).abs().max() < 1e-4  # float32 rounding of two step formulas through 10 network calls
