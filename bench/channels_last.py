"""channels_last against the default memory format on the real SD1.5 UNet (random weights, ComfyUI's loader):
one CFG-batched no-grad call and one forward + backward, interleaved rounds, medians (docs/speed.md).

Run: .venv/bin/python bench/channels_last.py [--resolution 128] [--rounds 3]
"""
import argparse
import statistics
import time

import torch

import fixtures


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds, after one warm-up round")
    args = p.parse_args()
    device = torch.device("cpu")
    fixtures.boot_comfyui(device)
    from comfy_draft.backends.comfyui import plain_copy

    model, _, _ = fixtures.load_models("sd15", "real", device)
    with torch.inference_mode(False):
        unet = plain_copy(model.model.diffusion_model).requires_grad_(False)  # normal tensors: backward works
        del model
        x = torch.randn(2, 4, args.resolution // 8, args.resolution // 8)
        t, context = torch.full((2,), 500.0), torch.randn(2, 77, 768)

        def call(x, grad):
            if grad:
                unet(x.clone().requires_grad_(True), timesteps=t, context=context).sum().backward()
            else:
                with torch.no_grad():
                    unet(x, timesteps=t, context=context)

        times = {}
        for i in range(args.rounds + 1):
            for fmt in (torch.contiguous_format, torch.channels_last):
                unet.to(memory_format=fmt)
                for grad in (False, True):
                    started = time.perf_counter()
                    call(x.contiguous(memory_format=fmt), grad)
                    if i:
                        times.setdefault((str(fmt).split(".")[-1], grad), []).append(time.perf_counter() - started)
    for (fmt, grad), values in times.items():
        print(f"{fmt:18s} {'forward + backward' if grad else 'no-grad call':18s} {statistics.median(values):.3f} s")


if __name__ == "__main__":
    main()
