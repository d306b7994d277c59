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
measured by the same harness. The harness is `fixtures.account`; the configurations are `fixtures.SETUPS`, the
table speed.py --accounting measures too (--configs takes its names or the short ones: before, bypass, after,
"after, UNet blocks", "after, no checkpointing", the last with no checkpointing anywhere, decoder included).

Flow models (`fixtures.account_flow`: Flux.1 dev, SD3.5-Medium, Z-Image at 1024, the reward decoded at 512, each
transformer block recomputed, weights stored in bf16 and in fp8 e4m3fn) are counted the same way, with ComfyUI's
own model classes and attention.

Run: .venv/bin/python bench/accounting.py --models sd15 sdxl
     .venv/bin/python bench/accounting.py --models sdxl --configs "after, UNet blocks" --reward-resolution 512
     .venv/bin/python bench/accounting.py --models flux-dev sd3.5-medium z-image
"""
import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/: fixtures, also when loaded by file
from fixtures import (FLOW_ARCHITECTURES, GIB, SETUP_ALIASES, SETUPS, account_flow, account_setup,  # noqa: E402
                      boot_comfyui)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl", *FLOW_ARCHITECTURES])
    p.add_argument("--reward-resolution", type=int, help="decode the reward's image at this side (SD models; the "
                   "flow models' rows decode at 512)")
    p.add_argument("--configs", nargs="+", default=["before", "after"], choices=[*SETUP_ALIASES, *SETUPS],
                   metavar="CONFIG", help="short names or fixtures.SETUPS names (default: before after)")
    p.add_argument("--out", type=pathlib.Path)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    boot_comfyui(torch.device("cpu"))
    results = [account_setup(name, c, args.reward_resolution) for name in args.models if name not in FLOW_ARCHITECTURES
               for c in args.configs]
    for name in (m for m in args.models if m in FLOW_ARCHITECTURES):
        for fp8 in (False, True):
            r = account_flow(name, fp8=fp8)
            print(f"{name} 1024 (reward at 512), {r['storage']} weights: total {r['total'] / GIB:.2f} GiB = weights "
                  f"{r['weights'] / GIB:.2f} + LoRA/optimizer {r['training'] / GIB:.3f} + step live "
                  f"{r['step_live_peak'] / GIB:.2f}", flush=True)
            results.append(r)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
