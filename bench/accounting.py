"""Peak memory of one DRaFT-LV step at real sizes by tensor accounting, without real weights or compute.

The models are ComfyUI's own classes (UNetModel, the SD VAE's decoder) and the aesthetic reward (open_clip CLIP
ViT-L/14 image tower + the LAION MLP), built on the meta device in bf16: every op runs its shape function only, and
a TorchDispatchMode (`LiveBytes`) tracks the bytes of every live tensor storage, so the peak is that of the same
tensors a GPU would hold (CUDA's caching allocator adds fragmentation on top). Attention is counted as CUDA's
memory-efficient SDPA kernel saves it (q, k, v, output, log-sum-exp): on meta, PyTorch would pick its math
fallback, which materialises the attention matrix.

One step follows `Trainer.micro_batch` for draft-lv: a no-grad guided UNet call (the prefix's peak: weights plus one
call's transient tensors), then n guided calls with gradient (cond and uncond in one batch, as ComfyUI batches them
when memory allows), n decodes, n reward calls, backward. The LoRA, decoder and UNet checkpointing use the pack's
own code (`lora.attach` or the old weight-rebuilding path, `checkpointing`), so before/after design changes are
measured by the same harness.

Run: .venv/bin/python bench/accounting.py --models sd15 sdxl
"""
import argparse
import contextlib
import json
import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from comfy_draft.memory import LiveBytes  # noqa: E402
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
GIB = 1024 ** 3


@contextlib.contextmanager
def tagging(mode, **models):
    """Tag what each model's forward (and its checkpoint recomputes, which re-run its submodules) creates."""
    handles = []
    for name, model in models.items():
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(lambda m, a, name=name: mode.tags.append(name)))
            handles.append(m.register_forward_hook(lambda m, a, o: mode.tags.pop() and None))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class EfficientAttention(torch.autograd.Function):
    """SDPA as CUDA's memory-efficient kernel runs it (what the meta device cannot pick by itself)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
        ctx.save_for_backward(q, k, v, out, lse, seed, offset)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, seed, offset = ctx.saved_tensors
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False])
        return dq, dk, dv


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
    if attn_mask is not None or is_causal:
        raise NotImplementedError("masked attention is not used by these models")
    return EfficientAttention.apply(q, k, v)


@contextlib.contextmanager
def gpu_attention():
    """ComfyUI's attention as on CUDA (`attention_pytorch`, VAE `pytorch_attention`) through `sdpa`."""
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.model as vae_model
    saved = attention.optimized_attention, vae_model.vae_attention, torch.nn.functional.scaled_dot_product_attention
    attention.optimized_attention = attention.attention_pytorch
    vae_model.vae_attention = lambda: vae_model.pytorch_attention
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        attention.optimized_attention, vae_model.vae_attention, torch.nn.functional.scaled_dot_product_attention = saved


def meta_models(name, dtype=torch.bfloat16):
    """UNet, VAE (first stage model, encoder dropped) and aesthetic reward of architecture `name` on meta."""
    import comfy.supported_models
    import speed
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from tiny_models import SD_VAE

    class_name, unet_config = speed.ARCHITECTURES[name]
    config = getattr(comfy.supported_models, class_name)(dict(unet_config))
    with torch.device("meta"):
        unet = config.get_model({}, device="meta").diffusion_model
        vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
        reward = speed.aesthetic_reward("real")
    vae.encoder = None
    for m in (unet, vae, reward):
        m.to(dtype).requires_grad_(False).eval()
    return unet, vae, reward, unet_config


def lora_targets(unet):
    from comfy_draft.lora import is_target
    return {n: m for n, m in unet.named_modules() if is_target(n) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def add_loras(unet, rank, path):
    """The pack's LoRAs on `unet`: `bypass` (lora.attach) or `weights` (the previous path: ComfyUI's weight
    wrappers, W + delta rebuilt inside every op's weight cast)."""
    from comfy_draft.lora import LoRASet, attach
    targets = lora_targets(unet)
    with torch.device("meta"):
        loras = LoRASet({n.replace(".", "_"): m.weight.shape for n, m in targets.items()}, rank)
    for n, m in targets.items():
        lora = loras[n.replace(".", "_")]
        if path == "bypass":
            attach(m, lora)
        else:
            m.weight_function = [lora]  # what ModelPatcher.add_weight_wrapper installs at load
    return loras


def tensor_bytes(*modules):
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def account(name, resolution, lora="bypass", decode="blocks", unet_checkpoint="call", lv_samples=2, lv_batched=False,
            rank=8, dtype=torch.bfloat16):
    """Peak bytes of one DRaFT-LV step (batch 1): a dict of its parts (see the module docstring).

    decode: "blocks" (per image, each decoder block checkpointed), "whole" (the decoder as one checkpoint, the
    previous path) or "off". unet_checkpoint: "call" (each guided call), "blocks" (each UNet block inside each
    call) or "off".
    lv_batched: the n re-noised copies as one guided call of batch n.
    """
    from comfy_draft import checkpointing
    from comfy_draft.sampling import checkpointed

    with gpu_attention():
        unet, vae, reward, unet_config = meta_models(name, dtype)
        loras = add_loras(unet, rank, lora)
        f = 8
        latent = (1, 4, resolution // f, resolution // f)
        context_dim = unet_config["context_dim"]

        def guided(x, sigma):
            """CFG: uncond and cond in one batch, x0 = x - sigma * eps."""
            b = x.shape[0]
            context = torch.empty(2 * b, 77, context_dim, device="meta", dtype=dtype)
            extra = {"y": torch.empty(2 * b, unet_config["adm_in_channels"], device="meta", dtype=dtype)} \
                if unet_config.get("adm_in_channels") else {}
            eps = unet(torch.cat([x, x]).to(dtype), torch.empty(2 * b, device="meta"), context=context, **extra).float()
            uncond, cond = eps.chunk(2)
            return x - sigma * (uncond + 7.5 * (cond - uncond))

        # As the backends run them: "blocks" nests each UNet block's checkpoint inside the call's.
        call = checkpointing.within(guided, checkpointing.blocks(unet, checkpointing.UNET_BLOCKS)) \
            if unet_checkpoint == "blocks" else guided

        def model(x, sigma):
            return checkpointed(call, x, sigma, enabled=unet_checkpoint != "off")

        def decode_one(z):
            return vae.decode(z.to(dtype)).float()

        def decode_images(x0):
            if decode == "blocks":
                blocks = checkpointing.blocks(vae.decoder, checkpointing.DECODER_BLOCKS)
                images = checkpointing.per_image(decode_one, x0, blocks)
            else:
                images = checkpointed(decode_one, x0, enabled=decode == "whole")
            return ((images + 1) / 2).clamp(0, 1)

        sigma = torch.tensor(0.03)
        x0 = torch.empty(latent, device="meta")

        prefix = LiveBytes()
        with torch.no_grad(), prefix, tagging(prefix, unet=unet):
            model(torch.empty(latent, device="meta"), sigma)

        step = LiveBytes()
        with torch.enable_grad(), step, tagging(step, unet=unet, decode=vae, reward=reward):
            noises = [torch.empty(latent, device="meta") for _ in range(lv_samples)]
            if lv_batched:
                x0s = model(torch.cat([x0 + sigma * eps for eps in noises]), sigma).chunk(lv_samples)
            else:
                x0s = [model(x0 + sigma * eps, sigma) for eps in noises]
            images = [decode_images(x) for x in x0s]
            rewards = torch.stack([reward(im, ["a prompt"]).float() for im in images])
            step.phase = "backward"
            (-rewards.sum()).backward()

        decoder = LiveBytes()  # one decode's forward + backward alone: the decoder's share
        with torch.enable_grad(), decoder, tagging(decoder, decode=vae):
            x = torch.empty(latent, device="meta", requires_grad=True)
            decode_images(x).sum().backward()

    weights = tensor_bytes(unet, vae, reward)
    lora_bytes = sum(p.numel() * 4 for p in loras.parameters())
    training = 4 * lora_bytes  # fp32 weights, gradients, AdamW's two moments
    peak = max(prefix.peak, step.peak)
    split = {k: int(v) for k, v in step.at_peak.items()}
    return {"model": name, "resolution": resolution, "dtype": str(dtype).replace("torch.", ""), "lora": lora,
            "decode": decode, "unet_checkpoint": unet_checkpoint, "lv_samples": lv_samples, "lv_batched": lv_batched,
            "weights": weights, "training": training, "prefix_transient": prefix.peak, "step_live_peak": step.peak,
            "step_split_at_peak": split, "decoder_alone": decoder.peak, "total": weights + training + peak}


def describe(r):
    split = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(r["step_split_at_peak"].items()))
    return (f"{r['model']} {r['resolution']} lora={r['lora']} decode={r['decode']} unet={r['unet_checkpoint']} "
            f"lv_batched={r['lv_batched']}: total {r['total'] / GIB:.2f} GiB = weights {r['weights'] / GIB:.2f} + "
            f"LoRA/optimizer {r['training'] / GIB:.3f} + step live {r['step_live_peak'] / GIB:.2f} (at peak: {split}); "
            f"prefix transient {r['prefix_transient'] / GIB:.2f}; decoder alone {r['decoder_alone'] / GIB:.2f}")


def main(argv=None):
    import speed
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    p.add_argument("--configs", nargs="+", default=["before", "after"])
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args(argv)
    speed.boot_comfyui(torch.device("cpu"))
    configs = {"before": dict(lora="weights", decode="whole", unet_checkpoint="call"),
               "bypass": dict(lora="bypass", decode="whole", unet_checkpoint="call"),
               "after": dict(lora="bypass", decode="blocks", unet_checkpoint="call"),
               "after, UNet blocks": dict(lora="bypass", decode="blocks", unet_checkpoint="blocks"),
               "after, no checkpointing": dict(lora="bypass", decode="blocks", unet_checkpoint="off")}
    results = []
    for name in args.models:
        for c in args.configs:
            r = account(name, speed.RESOLUTION["real"][name], **configs[c])
            r["config"] = c
            print(describe(r), flush=True)
            results.append(r)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
