"""`python -m comfy_draft demo`: DRaFT-LV on the bundled digit model, in a few minutes on a CPU.

By default the paper's "diffusion adversarial examples" in miniature: prompts ask for one digit and
the reward is a classifier's log-probability of another, so the LoRA learns to draw the prompted digit
the way the classifier reads the target. `--target prompted` rewards prompt alignment instead.
"""
import contextlib
import json
import os
import time

import torch
from PIL import Image

from . import digits
from .plotting import curve_image, image_grid
from .sampling import sample_ddim
from .trainer import TrainConfig, Trainer
from .validation import held_out_images


def held_out_samples(backend, prompts, seeds, cfg, steps, strength=None, sampler=sample_ddim):
    """Samples (no gradient) for every prompt x seed; with `strength`, the LoRA's strength; `sampler`: see
    `validation.held_out_images`."""
    with_lora = backend.loras is not None and strength is not None
    scaled = backend.loras.scaled(strength) if with_lora else contextlib.nullcontext()
    with scaled:
        return held_out_images(backend, prompts, seeds, "", cfg, steps, digits.SIZE, digits.SIZE, sampler)


def evaluate(backend, reward, judge, prompts, seeds, cfg, steps, target, strength=None, sampler=sample_ddim):
    """Mean reward, and how often the independent judge reads the target digit (or the prompted one)."""
    images = held_out_samples(backend, prompts, seeds, cfg, steps, strength, sampler)
    expanded = [p for p in prompts for _ in seeds]
    with torch.no_grad():
        rewards = reward(images, expanded)
        wanted = torch.tensor([target if target is not None else digits.digit_of(p) for p in expanded])
        hits = (judge(images).argmax(-1).cpu() == wanted).float()
    return {"reward": rewards.mean().item(), "reward_sem": (rewards.std() / len(rewards) ** 0.5).item(),
            "judge_accuracy": hits.mean().item()}, images


def add_parser(sub):
    p = sub.add_parser("demo", help="DRaFT-LV on the bundled digit model (CPU, a few minutes)")
    p.add_argument("--out", default="demo_output", help="folder for the LoRA, reward curve, grids and log")
    p.add_argument("--prompt-digit", type=int, default=3, help="the digit the prompts ask for")
    p.add_argument("--target", default="8", help="digit the reward wants, or 'prompted' for prompt alignment")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--variant", default="draft-lv")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kl-coef", type=float, default=0.0, help="regulariser towards the base model (DRaFT+)")


def run(args):
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    target = None if args.target == "prompted" else int(args.target)
    backend = digits.load_backend()
    reward = digits.DigitReward(digits.load_classifier("reward_classifier"), target)
    judge = digits.load_classifier("judge_classifier")  # trained on digits neither model nor reward saw
    train_prompts = [f"a {args.prompt_digit}"] if target is not None else [f"a {d}" for d in range(10)]
    held_out = ([f"the digit {digits.WORDS[args.prompt_digit]}"] if target is not None
                else [f"the digit {w}" for w in digits.WORDS])
    held_out_seeds = range(10_000, 10_000 + (32 if target is not None else 8))
    config = TrainConfig(prompts=train_prompts, variant=args.variant, steps=args.steps, lr=args.lr, cfg=args.cfg,
                         sampling_steps=args.sampling_steps, width=digits.SIZE, height=digits.SIZE,
                         batch_size=args.batch_size, seed=args.seed, weight_decay=0.0, kl_coef=args.kl_coef)
    log = open(os.path.join(args.out, "log.jsonl"), "w")

    def report(metrics, images):
        log.write(json.dumps(metrics) + "\n")
        log.flush()
        if metrics["step"] % 10 == 0 or metrics["step"] == 1:
            print(f"step {metrics['step']:4d}/{config.steps}  reward {metrics['reward']:+.3f}  "
                  f"grad norm {metrics['grad_norm']:.3g}  {metrics['seconds']:.2f}s/step", flush=True)

    trainer = Trainer(backend, reward, config, [report])
    eval_args = (backend, reward, judge, held_out, held_out_seeds, args.cfg, args.sampling_steps, target)
    before, before_images = evaluate(*eval_args)
    goal = f"digit {target}" if target is not None else "the prompted digit"
    print(f"before: held-out reward {before['reward']:+.3f} (+/- {before['reward_sem']:.3f}), "
          f"judge reads {goal} in {before['judge_accuracy']:.0%}")
    started = time.time()
    trainer.train()
    after, after_images = evaluate(*eval_args)
    print(f"after {config.steps} steps ({time.time() - started:.0f}s): held-out reward {after['reward']:+.3f} "
          f"(+/- {after['reward_sem']:.3f}), judge reads {goal} in {after['judge_accuracy']:.0%}")
    lora = trainer.save_lora(os.path.join(args.out, "digits_draft.safetensors"), overwrite=True)
    Image.fromarray(curve_image(trainer.history)).save(os.path.join(args.out, "reward_curve.png"))
    columns = len(held_out_seeds) if target is None else 16
    Image.fromarray(image_grid(torch.cat([before_images, after_images]), columns, 4)).save(os.path.join(args.out, "before_after.png"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"before": before, "after": after, "config": vars(args)}, f, indent=1)
    print(f"wrote {lora}, reward_curve.png, before_after.png (top: before, bottom: after), log.jsonl in {args.out}")
    log.close()
