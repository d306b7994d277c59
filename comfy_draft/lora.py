"""LoRA as weight deltas, and kohya-format files that ComfyUI, A1111/Forge and diffusers load.

A `LoRA` is a rank-r update of a base weight: W -> W + (alpha / rank) * up @ down, exactly what a kohya file
encodes and what ComfyUI's LoraLoader merges, so the model being trained and the model a LoraLoader builds from
the saved file are the same model. Training applies it to the activations instead (`attach`, ComfyUI's bypass
mode): y = f(x) + scale * up(down(x)), the same function without rebuilding W + delta on every call.
Names are kohya's `lora_unet_<module path with _>`: diffusers-style paths for SD1.x/SD2.x, ldm paths
for SDXL (what kohya's scripts write, and what ComfyUI maps).
"""
import contextlib
import hashlib
import json
import os
import tempfile

import torch
import torch.nn.functional as F

# Attention projections of the UNet's transformer blocks (the paper's LoRA targets).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# ResNet convolutions, optional (`conv1`, `conv2` of each res block: `in_layers.2`/`out_layers.3` in ldm).
RESNET_TARGETS = ("conv1", "conv2", "in_layers.2", "out_layers.3")


class LoRA(torch.nn.Module):
    """A rank-r update of one Linear or Conv weight, trained in float32.

    up starts at zero, so training starts from the base model; down starts Gaussian with standard deviation 1 / rank:
    peft's `init_lora_weights="gaussian"`, as TRL's AlignProp and DDPO trainers use it. (kohya's and peft's default,
    kaiming-uniform, gives down a standard deviation of 1 / sqrt(3 * fan_in): on wide layers its down(x) is small,
    and since Adam moves `up` by about the learning rate per step whatever its gradient, the LoRA's output then moves
    less per step: on bench/peer.py's model the reward rose 1.7x less per query than TRL's at the same learning
    rate, and 1.9x more with this one.) Conv weights use kohya's conv LoRA: down (r, in, kh, kw), up (out, r, 1, 1).
    """

    def __init__(self, weight_shape, rank, alpha=None):
        super().__init__()
        out_features, in_features, *kernel = weight_shape
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.weight_shape = tuple(weight_shape)
        self.down = torch.nn.Parameter(torch.empty(rank, in_features, *kernel))
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank, *[1] * len(kernel)))
        torch.nn.init.normal_(self.down, std=1 / rank)  # the scale is pinned by a test (test_trainer)

    strength = 1.0  # as a LoraLoader's strength; 0 is the base model (the regulariser's reference)

    def delta(self):
        scale = self.strength * self.alpha / self.rank
        return scale * (self.up.flatten(1) @ self.down.flatten(1)).reshape(self.weight_shape)

    def forward(self, weight):
        """W + delta, as a LoraLoader merges it (the reference that `attach`'s bypass is tested against)."""
        return weight + self.delta().to(weight.dtype) if self.strength else weight

    def bypass(self, x, conv=None):
        """strength * alpha / rank * up(down(x)): the LoRA's share of a layer's output for its input x; `conv`
        holds the base convolution's stride, padding and dilation (None for a Linear)."""
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if conv is None:
            h = F.linear(F.linear(x, down), up)
        else:
            h = F.conv2d(F.conv2d(x, down, None, **conv), up)
        return h * (self.strength * self.alpha / self.rank)


def attach(module, lora):
    """Apply `lora` to a Linear or Conv2d `module` as a forward hook (bypass: module(x) + lora.bypass(x)). No
    weight is rebuilt per call, and autograd keeps x and down(x), not a weight-sized W + delta. Returns the
    hook's handle."""
    conv = None
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError(f"LoRA on a grouped or {module.padding_mode}-padded convolution is not supported")
        conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)

    def hook(module, args, out):
        return out + lora.bypass(args[0], conv) if lora.strength else out
    return module.register_forward_hook(hook)


def is_target(module_path, include_resnets=False):
    targets = ATTENTION_TARGETS + (RESNET_TARGETS if include_resnets else ())
    return any(module_path.endswith("." + t) for t in targets)


def kohya_name(module_path):
    return "lora_unet_" + module_path.replace(".", "_")


def ldm_module_path(path, layers_per_block):
    """The ldm (original Stable Diffusion) path of a diffusers UNet module, as kohya names SDXL LoRAs:
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`,
    ResNet `conv1`/`conv2` -> `in_layers.2`/`out_layers.3`."""
    parts = path.split(".")
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        block = f"middle_block.{1 if kind == 'attentions' else 2 * j}"
    else:
        level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if parts[0] == "down_blocks":  # input_blocks.0 is conv_in; each level: its blocks and a downsampler
            block = f"input_blocks.{1 + level * (layers_per_block + 1) + j}"
        else:  # each up level has layers_per_block + 1 blocks (and its upsampler shares the last one)
            block = f"output_blocks.{level * (layers_per_block + 1) + j}"
        block += ".1" if kind == "attentions" else ".0"
    if kind == "resnets":
        rest = [{"conv1": "in_layers.2", "conv2": "out_layers.3"}.get(r, r) for r in rest]
    return ".".join([block, *rest])


class LoRASet(torch.nn.ModuleDict):
    """kohya name -> LoRA for every adapted UNet weight."""

    def __init__(self, shapes, rank=8, alpha=None):
        super().__init__({name: LoRA(shape, rank, alpha) for name, shape in shapes.items()})

    @contextlib.contextmanager
    def scaled(self, strength):
        """Temporarily base + strength * delta (what a LoraLoader with that strength builds)."""
        saved = [lora.strength for lora in self.values()]
        for lora in self.values():
            lora.strength = float(strength)
        try:
            yield
        finally:
            for lora, s in zip(self.values(), saved):
                lora.strength = s

    def disabled(self):
        """Temporarily the frozen base model."""
        return self.scaled(0.0)

    def kohya_state_dict(self, dtype=torch.float16):
        out = {}
        for name, lora in self.items():
            out[f"{name}.lora_down.weight"] = lora.down.detach().to(dtype).contiguous().cpu()
            out[f"{name}.lora_up.weight"] = lora.up.detach().to(dtype).contiguous().cpu()
            out[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=dtype)
        return out

    def load_kohya_state_dict(self, state_dict, source="LoRA file"):
        """Load a kohya state dict into this set (same names and ranks), for continued training."""
        names = {k.rsplit(".", 2)[0] for k in state_dict if k.endswith(".lora_down.weight")}
        missing, unexpected = sorted(set(self) - names), sorted(names - set(self))
        if missing or unexpected:
            raise ValueError(f"{source} does not match this model's LoRA targets: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]} ({len(missing)} missing, {len(unexpected)} unexpected)")
        with torch.no_grad():
            for name, lora in self.items():
                down, up = state_dict[f"{name}.lora_down.weight"], state_dict[f"{name}.lora_up.weight"]
                if down.shape != lora.down.shape or up.shape != lora.up.shape:
                    raise ValueError(f"{source}: {name} has rank {down.shape[0]} or shape {tuple(up.shape)}, "
                                     f"expected rank {lora.rank} and {tuple(lora.up.shape)}")
                lora.down.copy_(down)
                lora.up.copy_(up)
                lora.alpha = float(state_dict.get(f"{name}.alpha", torch.tensor(lora.rank)))

    def save(self, path, metadata=None, overwrite=False):
        """Write a kohya-format fp16 safetensors file atomically; metadata values become strings. The same LoRA
        and metadata give the same bytes."""
        from safetensors.torch import save

        first = next(iter(self.values()))
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(first.rank),
                "ss_network_alpha": str(first.alpha)}
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
        data = sorted_metadata(save(self.kohya_state_dict(), metadata=meta))

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
        atomic_write(path, write, overwrite)
        return path


def sorted_metadata(data):
    """safetensors bytes with the header's metadata in sorted order (safetensors writes it in hash order, which
    changes from one save to the next); the header stays padded to 8 bytes with spaces, as safetensors pads it."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def load_kohya_file(path):
    from safetensors.torch import load_file, safe_open

    with safe_open(os.fspath(path), "pt") as f:
        metadata = f.metadata() or {}
    return load_file(os.fspath(path)), metadata


def atomic_write(path, write, overwrite=False):
    """`write(tmp_path)`, then rename onto `path`: readers never see a half-written file."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def digest(texts):
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
