"""The real-size design paths (issue 14) against the paths they replace: LoRA applied by bypass hooks vs W + delta
rebuilt per call (ComfyUI's weight wrappers), the decoder checkpointed per image and per block vs as one checkpoint,
and what each keeps for backward."""
import pytest
import torch
from tiny_diffusers import tiny_pipeline
from tolerance import assert_close_float32, float32_atol

from comfy_draft import blockwise
from comfy_draft.memory import LiveBytes
from comfy_draft.lora import LoRA, LoRASet, attach
from comfy_draft.sampling import recomputed


def nonzero(loras, seed=1):
    """A trained-looking LoRA: up drawn so that the delta's entries are ~0.01 at rank 4 (down has std 1 / rank)."""
    with torch.no_grad():
        for lora in loras.values():
            lora.up.normal_(0, 0.025, generator=torch.Generator().manual_seed(seed))
    return loras


@pytest.mark.parametrize("layer", [torch.nn.Linear(12, 10), torch.nn.Conv2d(6, 5, 3, stride=2, padding=1),
                                   torch.nn.Conv2d(6, 5, 1)], ids=["linear", "conv3x3-stride2", "conv1x1"])
def test_bypass_equals_the_merged_weight_forward_and_backward(layer):
    # float64: the two paths sum in different orders, and float32 rounding made the gradient check flaky
    torch.manual_seed(0)
    layer.requires_grad_(False).double()
    loras = nonzero(LoRASet({"m": layer.weight.shape}, rank=4, alpha=2.0)).double()
    lora = loras["m"]
    x = torch.randn(3, 12) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 6, 9, 9)
    x = x.double()
    op = torch.nn.functional.linear if isinstance(layer, torch.nn.Linear) else \
        lambda x, w, b: torch.nn.functional.conv2d(x, w, b, layer.stride, layer.padding)

    def merged():  # the previous path: W + delta, as ComfyUI's weight wrappers rebuilt it in every call
        return op(x, lora(layer.weight), layer.bias)
    handle = attach(layer, lora)
    for strength in (1.0, 0.5, 0.0):
        with loras.scaled(strength):
            ours, theirs = layer(x), merged()
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
            if strength:
                grads = torch.autograd.grad(ours.square().sum(), [lora.down, lora.up])
                expected = torch.autograd.grad(theirs.square().sum(), [lora.down, lora.up])
                for g, e in zip(grads, expected):
                    torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
            else:
                assert torch.equal(ours, op(x, layer.weight, layer.bias))  # disabled: the layer's output, bit for bit
    handle.remove()


def test_bypass_keeps_activations_not_a_weight_sized_copy():
    layer = torch.nn.Linear(512, 512).requires_grad_(False)
    lora = LoRA(layer.weight.shape, rank=4)
    x = torch.randn(2, 512, requires_grad=True)  # as inside a UNet, where earlier LoRAs feed this layer
    with LiveBytes() as rebuilt:
        out = torch.nn.functional.linear(x, lora(layer.weight), layer.bias)
    attach(layer, lora)
    with LiveBytes() as bypass:
        out = layer(x)  # noqa: F841 (kept alive with its graph until measured)
    assert rebuilt.peak >= layer.weight.numel() * 4 > 10 * bypass.peak, (rebuilt.peak, bypass.peak)


def test_comfyui_training_model_equals_the_weight_wrapper_path(comfyui, tiny_sd15, monkeypatch):
    """The ComfyUI backend's guided x0 and its LoRA gradients, bypass hooks vs ComfyUI's weight wrappers."""
    import comfy.sd

    from comfy_draft import lora as lora_module
    from comfy_draft.backends.comfyui import TrainingBackend
    with torch.inference_mode():
        objects = comfy.sd.load_checkpoint_guess_config(
            str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15)))[:3]

    def outputs(backend):
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

        def fn(model, x, sigmas):
            with torch.enable_grad():
                x0 = model(x, sigmas[1] * x.new_ones(1))
                grads = torch.autograd.grad(x0.square().sum(), list(backend.loras.parameters()))
            return x0.detach(), grads
        with torch.inference_mode(False):
            out = {}
            backend.run(lambda *a: out.setdefault("r", fn(*a))[0], ["a red apple"], "", 4.0, noise, 4)
        return out["r"]

    bypass = TrainingBackend(*objects)
    torch.manual_seed(0)
    nonzero(bypass.add_loras(rank=4))
    wrapped, attached = TrainingBackend(*objects), []
    monkeypatch.setattr(lora_module, "attach", lambda module, lora: attached.append((module, lora)))
    torch.manual_seed(0)
    nonzero(wrapped.add_loras(rank=4))
    paths = {id(m): n for n, m in wrapped.model.model.diffusion_model.named_modules()}
    for module, lora in attached:  # the previous path: W + delta in every op's weight cast
        wrapped.model.add_weight_wrapper(f"diffusion_model.{paths[id(module)]}.weight", lora)
    (x0, grads), (x0_ref, grads_ref) = outputs(bypass), outputs(wrapped)
    g, e = torch.cat([g.flatten() for g in grads]), torch.cat([e.flatten() for e in grads_ref])
    print(f"max |x0 - x0_ref| {(x0 - x0_ref).abs().max():.2e} (max |x0_ref| {x0_ref.abs().max():.2f}), "
          f"|g - e| / |e| {(g - e).norm() / e.norm():.2e}")
    # ComfyUI's UNet runs in its inference dtype, float32 here: the paths differ by summation order only (x W^T +
    # (x D^T) U^T vs x (W + U D)^T). Tolerances (tests/tolerance.py): the UNet's longest reduction, 320 channels x
    # 3 x 3, with k = 8 for x0 and k = 16 for the gradient (backward sums twice per layer, over positions too).
    # Measured: x0 1.1e-5 (2.0e-5 with AVX2 kernels) of a tolerance of 7.0e-4, gradient 2.6e-6 of 1.0e-4 relative;
    # the LoRA's scale off by 1 % moves x0 by 1.1e-2, another LoRA by 1.7.
    assert_close_float32(x0, x0_ref, reduction=320 * 9, k=8)
    assert (g - e).norm() <= float32_atol(e.norm(), reduction=320 * 9, k=16) and e.norm() > 0


def check_decode_paths(backend, z):
    """Per image and per block vs the whole decoder as one checkpoint: the same images and latent gradient, and
    a lower peak of live tensors through forward and backward.

    In float64 (the callers' decoders and the seeded latent `z`): the two paths sum in different orders, and in
    float32 that left 9 of 6,144 pixels 2.7e-6 apart on an AMD EPYC (AVX2 kernels) against an atol of 1e-6. The
    ComfyUI backend returns float32 images (its decode ends in .float()): float64 values rounded once, so at most
    an ulp apart; the gradients stay float64 and must agree to 1e-12 of their scale."""
    assert z.dtype == torch.float64

    def run(decode):
        latent = z.clone().requires_grad_(True)
        with LiveBytes() as memory:
            images = decode(latent)
            grad, = torch.autograd.grad((images * torch.linspace(0, 1, images.numel()).view_as(images)).sum(), latent)
        return images.detach(), grad, memory.peak
    blocks = run(lambda latent: backend.decode(latent, recompute=True))
    whole = run(lambda latent: recomputed(lambda x: backend.decode(x, recompute=False), latent))
    # float32 images (ComfyUI): an ulp of 1 apart at most; float64 (diffusers): rounding of float64 sums
    atol = 2 * torch.finfo(torch.float32).eps if blocks[0].dtype == torch.float32 else 1e-12
    torch.testing.assert_close(blocks[0], whole[0], rtol=0, atol=atol)
    assert blocks[1].dtype == torch.float64
    torch.testing.assert_close(blocks[1], whole[1], rtol=0, atol=1e-12 * whole[1].abs().max().item())
    assert blocks[2] < whole[2], (blocks[2], whole[2])


def test_comfyui_decode_per_image_and_block_equals_the_whole_checkpoint(comfyui, tiny_sd15):
    import comfy.sd

    from comfy_draft.backends.comfyui import TrainingBackend
    with torch.inference_mode():
        objects = comfy.sd.load_checkpoint_guess_config(
            str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15)))[:3]
    backend = TrainingBackend(*objects)
    assert len(blockwise.blocks(backend.vae_model.decoder, blockwise.DECODER_BLOCKS)) > 6
    backend.vae_model.double()  # the backend's own decoder copy, decoded in its vae_dtype: float64 here
    backend.vae_dtype = torch.float64
    with torch.inference_mode(False):  # 2 x 2 latents (16 px): the full-size SD decoder's blocks, at least FLOPs
        check_decode_paths(backend, torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0),
                                                dtype=torch.float64))


def test_diffusers_decode_per_image_and_block_equals_the_whole_checkpoint(tmp_path):
    from comfy_draft.backends.diffusers import TrainingBackend
    backend = TrainingBackend.from_pipeline(tiny_pipeline(tmp_path), device="cpu")
    assert len(blockwise.blocks(backend.vae.decoder, blockwise.DECODER_BLOCKS)) > 4
    backend.vae.double()
    check_decode_paths(backend, torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0),
                                            dtype=torch.float64))


# ----- UNet blocks, batched DRaFT-LV copies, the checkpointing policy ------------------------------------------------
def lv_outputs(backend, checkpoint, batched, seed=0):
    """DRaFT-LV's n = 2 predictions and the LoRA gradient of a weighted sum of them, through `backend.run`."""
    from comfy_draft.sampling import denoise_renoised
    shape, dtype = backend.latent_shape(1, 16, 16), backend.compute_dtype
    g = torch.Generator().manual_seed(seed)
    noise, noises = torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(2)]
    noise, noises = noise.to(dtype), [n.to(dtype) for n in noises]
    params = list(backend.loras.parameters())

    def fn(model, x, sigmas):
        with torch.inference_mode(False), torch.enable_grad():
            x0s = denoise_renoised(model, x.detach(), sigmas[-2], noises, recompute=False, batched=batched)
            loss = sum((i + 1) * x0.square().mean() for i, x0 in enumerate(x0s))
            out["x0s"], out["grads"] = torch.cat(x0s).detach(), torch.autograd.grad(loss, params)
        return x
    out = {}
    backend.run(fn, ["a red apple"], "", 3.0, noise, 3, recompute=checkpoint)
    return out["x0s"], torch.cat([g.flatten() for g in out["grads"]])


def check_same(reference, *others):
    """The same x0s and LoRA gradient: in float64 (the diffusers backend) up to float64 rounding; in float32
    (ComfyUI's UNet, in its inference dtype) up to tests/tolerance.py's bound for the UNet's longest reduction
    (320 channels x 3 x 3; k = 8 for x0, 16 for the gradient, as in the weight-wrapper test above), as the paths
    (recomputed per call or per block, copies batched) sum in other orders: measured 4.8e-7 of 3.2e-4 and 2.0e-6
    of 1.0e-4 relative."""
    x0_ref, grads_ref = reference
    assert grads_ref.norm() > 0
    for x0s, grads in others:
        print(f"max |x0s - ref| {(x0s - x0_ref).abs().max():.2e} (max |ref| {x0_ref.abs().max():.2f}), "
              f"|grads - ref| / |ref| {(grads - grads_ref).norm() / grads_ref.norm():.2e}")
        if x0s.dtype == torch.float64:
            torch.testing.assert_close(x0s, x0_ref, rtol=0, atol=1e-12 * x0_ref.abs().max().item())
            assert (grads - grads_ref).norm() <= 1e-12 * grads_ref.norm()
        else:
            assert_close_float32(x0s, x0_ref, reduction=320 * 9, k=8)
            assert (grads - grads_ref).norm() <= float32_atol(grads_ref.norm(), reduction=320 * 9, k=16)


def test_unet_blocks_and_batched_copies_equal_the_plain_path_diffusers(tmp_path):
    from tiny_diffusers import tiny_pixel_backend
    backend = tiny_pixel_backend(tmp_path)
    nonzero(backend.add_loras(rank=4))
    for module in (backend.unet, backend.text_encoder, backend.loras):  # float64: see check_same
        module.double()
    assert len(blockwise.blocks(backend.unet, blockwise.UNET_BLOCKS)) > 4
    check_same(lv_outputs(backend, False, False), lv_outputs(backend, True, False),
               lv_outputs(backend, "blocks", False), lv_outputs(backend, False, True))


@pytest.mark.slow
def test_unet_blocks_and_batched_copies_equal_the_plain_path_comfyui(comfyui, tiny_sd15):
    import comfy.sd

    from comfy_draft.backends.comfyui import TrainingBackend
    with torch.inference_mode():
        objects = comfy.sd.load_checkpoint_guess_config(
            str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15)))[:3]
    backend = TrainingBackend(*objects)
    nonzero(backend.add_loras(rank=4))
    assert len(blockwise.blocks(backend.model.model.diffusion_model, blockwise.UNET_BLOCKS)) > 4
    check_same(lv_outputs(backend, False, False), lv_outputs(backend, "blocks", False),
               lv_outputs(backend, False, True))


@pytest.mark.slow
def test_auto_checkpointing_takes_the_least_recomputation_that_fits(tmp_path, monkeypatch):
    """On a GPU's memory (simulated on the CPU with a given budget) and on the CPU's available RAM (patched): off when
    the estimate fits without recomputation, else each call, else each block."""
    from test_trainer import config
    from tiny_diffusers import tiny_pixel_backend

    from comfy_draft import memory, rewards
    from comfy_draft.trainer import Trainer

    def trainer_for(**overrides):
        return Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("sharpness"),
                       config(width=32, height=32, batch_size=2, lv_samples=2, **overrides))
    trainer = trainer_for()
    assert trainer.gradient_checkpointing is None  # chosen once, before the first step (no property runs passes)
    assert trainer.config.gradient_checkpointing == "auto"
    inputs = trainer.memory_inputs()
    off, on = (memory.estimate(**inputs, gradient_checkpointing=c, probed=trainer.probed()) for c in (False, True))
    assert on["total"] < off["total"]

    def gpu(total):  # a GPU's budget counts the weights
        return memory.choose_gradient_checkpointing(**inputs, limit=(total, True, "the GPU"),
                                                    probed=trainer.probed())[0]
    assert gpu(off["total"]) is False and gpu(off["total"] - 1) is True
    assert gpu(on["total"]) is True and gpu(on["total"] - 1) == "blocks"
    for forced, total in ((True, 10 * off["total"]), (False, on["total"] / 2), ("blocks", 10 * off["total"])):
        trainer.config.gradient_checkpointing = forced  # the user's choice stands (True: at least each call)
        assert gpu(total) is forced

    # The CPU: the weights are in RAM already; the rest must fit in 90% of the RAM available.
    for ram, expected in ((off["total"] - off["weights"], False), (on["total"] - on["weights"], True)):
        monkeypatch.setattr(memory, "available_ram", lambda: ram / 0.9)
        cpu = trainer_for()
        assert cpu.choose_gradient_checkpointing() is expected
        name = "on" if expected else "off"
        assert cpu.gradient_checkpointing_reason.startswith(f"gradient checkpointing {name}:")
        assert "of RAM available" in cpu.gradient_checkpointing_reason
    # graft's update is one model call: recomputing it saves nothing, so auto goes from off to blocks. ddpo's update
    # batches 4 timesteps per call when off, one when on (nothing recomputed either way).
    for variant, choices in (("graft", [False, "blocks"]), ("ddpo", [False, True, "blocks"])):
        policy = trainer_for(variant=variant, sampling_steps=6)
        inputs = policy.memory_inputs()
        off, on = (memory.estimate(**inputs, gradient_checkpointing=c, probed=policy.probed())["total"]
                   for c in (False, True))
        assert (off == on) == (variant == "graft") and off >= on
        limits = [off, off - 1] + ([on - 1] if on < off else [])
        assert [memory.choose_gradient_checkpointing(**inputs, limit=(total, True, "the GPU"),
                                                     probed=policy.probed())[0] for total in limits] == choices
    with pytest.raises(ValueError, match="gradient_checkpointing must be"):
        config(gradient_checkpointing="sometimes").check()
