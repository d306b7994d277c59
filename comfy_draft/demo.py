"""`python -m comfy_draft demo`: DRaFT-LV on the bundled digit model, in a few minutes on a CPU.

By default the paper's "diffusion adversarial examples" in miniature: prompts ask for one digit and
the reward is a classifier's log-probability of another, so the LoRA learns to draw the prompted digit
the way the classifier reads the target. `--target prompted` rewards prompt alignment instead.

`--control` picks a control against reward hacking (docs/robust_rewards.md): DEFAULT_CONTROL below is the setting
of bench/hacking.py --robust whose samples became 8s and stayed digits at this budget (EOT over a soft-min ensemble
with a second classifier, and KL 0.3); `--control plain` is plain DRaFT-LV. The verdict printed before and after is
the judge's (a classifier trained on digits neither the model nor the rewards saw): how often it reads the goal
digit and how often it is confident the sample is a digit at all. The judge can be fooled like the reward (noise
read as a confident 8): look at before_after.png too.
"""
import contextlib
import json
import os
import time

import torch
from PIL import Image

from . import digits
from .plotting import curve_image, image_grid
from .run import RunFiles, run
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


CONFIDENT = 0.9  # judge top-class probability from which a sample counts as confidently a digit
# control -> (EOT, ensemble with the second classifier, KL coefficient), as measured by bench/hacking.py --robust
CONTROLS = {"plain": (False, False, 0.0), "kl": (False, False, 0.3), "eot": (True, False, 0.0),
            "ensemble": (False, True, 0.0), "eot+ensemble": (True, True, 0.0), "eot+kl": (True, False, 0.3),
            "ensemble+kl": (False, True, 0.3), "eot+ensemble+kl": (True, True, 0.3)}
DEFAULT_CONTROL = "eot+ensemble+kl"  # the one measured whose samples become 8s and stay digits (robust_rewards.md)


def evaluate(backend, reward, judge, prompts, seeds, cfg, steps, target, strength=None,
             sampler=sample_ddim):
    """Mean reward (plain, untransformed), how often the independent judge reads the target digit (or the prompted
    one), and how often it is confident (p >= CONFIDENT) that the sample is a digit."""
    images = held_out_samples(backend, prompts, seeds, cfg, steps, strength, sampler)
    expanded = [p for p in prompts for _ in seeds]
    with torch.no_grad():
        rewards = reward(images, expanded)
        wanted = torch.tensor([target if target is not None else digits.digit_of(p) for p in expanded])
        probs = judge(images).softmax(-1).cpu()
    return {"reward": rewards.mean().item(), "reward_sem": (rewards.std() / len(rewards) ** 0.5).item(),
            "judge_accuracy": (probs.argmax(-1) == wanted).float().mean().item(),
            "judge_confident": (probs.max(-1).values >= CONFIDENT).float().mean().item()}, images


def verdict(scores, goal):
    return (f"held-out reward {scores['reward']:+.3f} (+/- {scores['reward_sem']:.3f}); judge reads {goal} in "
            f"{scores['judge_accuracy']:.0%}, confidently a digit in {scores['judge_confident']:.0%}")


def add_parser(sub):
    p = sub.add_parser("demo", help="DRaFT-LV on the bundled digit model (CPU, a few minutes)")
    p.add_argument("--out", default="demo_output", help="folder for the LoRA, reward curve, grids and log")
    p.add_argument("--model", choices=["digits", "digits-flow"], default="digits",
                   help="the bundled digit model: DDPM (sampled by DDIM) or rectified flow (sampled by Euler)")
    p.add_argument("--prompt-digit", type=int, default=3, help="the digit the prompts ask for")
    p.add_argument("--target", default="8", help="digit the reward wants, or 'prompted' for prompt alignment")
    # defaults: the setting of bench/results/hacking_robust_120steps.md whose samples stay digits (with the default
    # control); without KL the same budget turns them into noise that every classifier reads as an 8.
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--variant", default="draft-lv")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--sampling-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--control", choices=list(CONTROLS), default=DEFAULT_CONTROL,
                   help="against reward hacking: EOT, an ensemble with a second classifier, KL, or plain DRaFT-LV")
    p.add_argument("--kl-coef", type=float, default=None, help="regulariser towards the base model (DRaFT+); "
                   "default: the control's")
    p.add_argument("--aig-p", type=float, default=None,
                   help="also sample the trained LoRA with annealed importance guidance, power_p schedule")


def main(args):
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    target = None if args.target == "prompted" else int(args.target)
    backend = digits.load_backend("cpu", args.model)
    eot, ensemble, kl_coef = CONTROLS[args.control]
    kl_coef = kl_coef if args.kl_coef is None else args.kl_coef
    train_reward = digits.robust_reward(target, eot, ensemble, seed=args.seed)
    reward = digits.DigitReward(digits.load_classifier("reward_classifier"), target)  # reported: the plain reward
    judge = digits.load_classifier("judge_classifier")  # trained on digits neither model nor reward saw
    train_prompts = [f"a {args.prompt_digit}"] if target is not None else [f"a {d}" for d in range(10)]
    held_out = ([f"the digit {digits.WORDS[args.prompt_digit]}"] if target is not None
                else [f"the digit {w}" for w in digits.WORDS])
    held_out_seeds = range(10_000, 10_000 + (32 if target is not None else 8))
    config = TrainConfig(prompts=train_prompts, variant=args.variant, steps=args.steps, lr=args.lr, cfg=args.cfg,
                         sampling_steps=args.sampling_steps, width=digits.SIZE, height=digits.SIZE,
                         batch_size=args.batch_size, seed=args.seed, weight_decay=0.0, kl_coef=kl_coef)

    def report(metrics, images):
        if metrics["step"] % 10 == 0 or metrics["step"] == 1:
            print(f"step {metrics['step']:4d}/{config.steps}  reward {metrics['reward']:+.3f}  "
                  f"grad norm {metrics['grad_norm']:.3g}  {metrics['seconds']:.2f}s/step", flush=True)

    trainer = Trainer(backend, train_reward, config, [report])
    print(f"training on {train_reward.name}" + (f" with kl_coef {kl_coef:g}" if kl_coef else ""), flush=True)
    eval_args = (backend, reward, judge, held_out, held_out_seeds, args.cfg, args.sampling_steps, target)
    before, before_images = evaluate(*eval_args)
    goal = f"digit {target}" if target is not None else "the prompted digit"
    print(f"before: {verdict(before, goal)}")
    started = time.time()
    files = RunFiles(os.path.join(args.out, "digits_draft.safetensors"))
    lora = run(trainer, files)
    after, after_images = evaluate(*eval_args)
    print(f"after {config.steps} steps ({time.time() - started:.0f}s): {verdict(after, goal)}")
    summary = {"before": before, "after": after}
    if args.aig_p is not None:
        from .guidance import AIGBackend
        aig = AIGBackend(backend, trainer.loras, "power_p", args.aig_p)
        summary["after_aig"] = evaluate(aig, *eval_args[1:])[0]
        print(f"after, sampled with AIG (power_p, p = {args.aig_p:g}): {verdict(summary['after_aig'], goal)}")
    Image.fromarray(curve_image(trainer.history)).save(os.path.join(args.out, "reward_curve.png"))
    columns = len(held_out_seeds) if target is None else 16
    Image.fromarray(image_grid(torch.cat([before_images, after_images]), columns, 4)).save(os.path.join(args.out, "before_after.png"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(dict(summary, config=vars(args)), f, indent=1)
    print(f"wrote {os.path.basename(lora)}, its log {os.path.basename(files.log)} and training state, "
          f"reward_curve.png and before_after.png (top: before, bottom: after) in {args.out}")
