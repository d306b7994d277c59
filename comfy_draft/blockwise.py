"""Gradient checkpointing at block granularity: each block of a module keeps only its inputs for backward and is
recomputed there, so a backward pass holds the block boundaries plus one block's activations at a time.

The VAE decoder for the reward is recomputed this way (one image at a time: `backends.*.decode`); the UNet too
when `TrainConfig.gradient_checkpointing` is "blocks" (chosen by `memory.choose_gradient_checkpointing` under "auto").
Both nest the block recomputation inside one recomputation per image or per UNet call, so only one image's or call's
block boundaries are held at a time; the price is one more forward of that image's decoder or that call. Blocks are
found by class name, the same rule for ComfyUI's and diffusers' models, without re-implementing their forward passes.
"""
import contextlib
import copy
import functools

import torch

from .sampling import recomputed

# ComfyUI's (comfy/ldm/modules/diffusionmodules/model.py) and diffusers' VAE decoder blocks: each up-block's ResNet
# blocks, attention and upsampler, and the mid-block's.
DECODER_BLOCKS = ("ResnetBlock", "AttnBlock", "Upsample", "ResnetBlock2D", "Attention", "Upsample2D")
# ComfyUI's (openaimodel.py, attention.py) and diffusers' UNet blocks, and the transformer blocks of ComfyUI's flow
# models (Flux: flux/layers.py, SD3: mmdit.py, Z-Image: lumina/model.py).
UNET_BLOCKS = ("ResBlock", "SpatialTransformer", "Upsample", "Downsample",
               "ResnetBlock2D", "Transformer2DModel", "Upsample2D", "Downsample2D",
               "DoubleStreamBlock", "SingleStreamBlock", "JointBlock", "JointTransformerBlock")


def blocks(root, names):
    """The outermost submodules of `root` whose class is named in `names`."""
    found = []

    def visit(module):
        for child in module.children():
            if type(child).__name__ in names:
                found.append(child)
            else:
                visit(child)
    visit(root)
    return found


def _own(value):
    """A tensor cloned, a dict copied: what a block may change in place (Flux's blocks add to their input with `+=`;
    ComfyUI updates transformer_options between blocks) without touching what the recompute starts from."""
    return value.clone() if torch.is_tensor(value) else copy.copy(value) if isinstance(value, dict) else value


def _recomputed_forward(forward, *args, **kwargs):
    def run(*args, **kwargs):  # on copies: the saved inputs stay as they were for the recompute
        return forward(*map(_own, args), **{k: _own(v) for k, v in kwargs.items()})
    args = [copy.copy(a) if isinstance(a, dict) else a for a in args]  # the options as they are now, not later
    kwargs = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
    return recomputed(run, *args, **kwargs)


@contextlib.contextmanager
def each(modules, enabled=True):
    """Within the block, each of `modules` recomputes its own forward (whatever forward it had: ComfyUI's
    per-op recomputation of offloaded weights nests inside). The recompute keeps working after the block ends:
    backward may run later."""
    saved = [(m, m.__dict__.get("forward")) for m in modules] if enabled else []
    for m, own in saved:
        m.forward = functools.partial(_recomputed_forward, own or type(m).forward.__get__(m))
    try:
        yield
    finally:
        for m, own in saved:
            if own is None:
                del m.forward
            else:
                m.forward = own


def within(fn, modules):
    """fn, with each of `modules` recomputed in backward while it runs (and while a recomputation around it re-runs it)."""
    def run(*args, **kwargs):
        with each(modules):
            return fn(*args, **kwargs)
    return run


def per_image(decode, x0, recompute_blocks):
    """`decode(latent)`, recomputed per image, with each decoder block in `recompute_blocks` recomputed inside
    (an empty list: no recomputation). Backward recomputes one image's decode keeping only its block boundaries,
    then one block at a time: the decoder holds one image's boundaries and one block, whatever the batch or n."""
    if not recompute_blocks or not torch.is_grad_enabled():
        return decode(x0)
    return torch.cat([recomputed(within(decode, recompute_blocks), x0[i:i + 1]) for i in range(x0.shape[0])])
