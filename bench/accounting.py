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

Run: .venv/bin/python bench/accounting.py --models sd15 sdxl
"""
import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/: fixtures, also when loaded by file
from fixtures import SETUP_ALIASES, SETUPS, account_setup, boot_comfyui  # noqa: E402


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    p.add_argument("--configs", nargs="+", default=["before", "after"], choices=[*SETUP_ALIASES, *SETUPS],
                   metavar="CONFIG", help="short names or fixtures.SETUPS names (default: before after)")
    p.add_argument("--out", type=pathlib.Path)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    boot_comfyui(torch.device("cpu"))
    results = [account_setup(name, c) for name in args.models for c in args.configs]
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
