"""The paper's comparisons in miniature, on the bundled digit model (CPU, tens of minutes).

Every method gets the same number of reward queries (images scored). Adversarial setting: prompts ask
for one digit, the reward is a classifier's log-probability of another. Reports held-out reward (unseen
prompt wording, unseen seeds) against reward queries, the judge classifier's reading, gradient norms as
K grows, and reward against LoRA strength. Writes quality.{json,md} and PNG plots to --out (bench/results/).

Run: .venv/bin/python bench/quality.py [--queries 480] [--seeds 0 1]
"""
import argparse
import json
import pathlib
import time

import numpy as np
import torch
from PIL import Image

from comfy_draft import digits
from comfy_draft.demo import evaluate
from comfy_draft.plotting import line_chart
from comfy_draft.trainer import TrainConfig, Trainer

METHODS = {  # name -> TrainConfig overrides
    "DRaFT-LV (n=2)": dict(variant="draft-lv", lv_samples=2),
    "DRaFT-1": dict(variant="draft-k", grad_steps=1),
    "DRaFT-K (K=2)": dict(variant="draft-k", grad_steps=2),
    "DRaFT-K (K=5)": dict(variant="draft-k", grad_steps=5),
    "DRaFT (full)": dict(variant="draft"),
    "ReFL": dict(variant="refl"),
    "AlignProp (random K)": dict(variant="alignprop"),
}


def run_method(name, overrides, seed, args, reward, judge):
    queries_per_step = args.batch_size * overrides.get("lv_samples", 1)
    steps = args.queries // queries_per_step
    config = TrainConfig(prompts=[f"a {args.prompt_digit}"], steps=steps, lr=args.lr, cfg=args.cfg,
                         sampling_steps=args.sampling_steps, width=16, height=16, batch_size=args.batch_size,
                         seed=seed, weight_decay=0.0, **overrides)
    backend = digits.load_backend()
    held_out = [f"the digit {digits.WORDS[args.prompt_digit]}"]
    seeds = range(10_000, 10_000 + args.eval_seeds)
    eval_args = (backend, reward, judge, held_out, seeds, args.cfg, args.sampling_steps, args.target)
    curve = []

    def checkpoint(metrics, images):
        if metrics["step"] % max(1, steps // args.evals) == 0 or metrics["step"] == steps:
            result, _ = evaluate(*eval_args)
            curve.append(dict(result, queries=metrics["step"] * queries_per_step))

    trainer = Trainer(backend, reward, config, [checkpoint])
    start, _ = evaluate(*eval_args)
    curve.insert(0, dict(start, queries=0))
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    out = {"method": name, "seed": seed, "steps": steps, "seconds": seconds, "curve": curve,
           "grad_norm": float(np.mean([m["grad_norm"] for m in trainer.history])),
           "final": curve[-1]}
    if name == "DRaFT-LV (n=2)" and seed == args.seeds[0]:
        out["strengths"] = {s: evaluate(*eval_args, strength=s)[0] for s in args.strengths}
    print(f"{name:22s} seed {seed}: reward {start['reward']:+.3f} -> {curve[-1]['reward']:+.3f}, judge "
          f"{start['judge_accuracy']:.0%} -> {curve[-1]['judge_accuracy']:.0%}, grad norm {out['grad_norm']:.3g}, "
          f"{seconds:.0f}s", flush=True)
    return out


def report(runs, args):
    lines = [f"Adversarial digits: prompt \"a {args.prompt_digit}\", reward log p({args.target}) from the reward "
             f"classifier; {args.queries} reward queries per run, batch {args.batch_size}, {args.sampling_steps} "
             f"DDIM steps, cfg {args.cfg}, lr {args.lr}, seeds {args.seeds}; held-out: unseen wording and "
             f"{args.eval_seeds} unseen seeds. Judge: a classifier trained on digits neither the model nor the "
             f"reward saw.", "",
             "| method | held-out reward before | after (mean +/- sd over seeds) | judge reads target, after "
             "| mean grad norm (pre-clip) | seconds per run |", "|---|---|---|---|---|---|"]
    for name in METHODS:
        mine = [r for r in runs if r["method"] == name]
        after = np.array([r["final"]["reward"] for r in mine])
        lines.append(f"| {name} | {mine[0]['curve'][0]['reward']:+.3f} | {after.mean():+.3f} +/- {after.std():.3f} "
                     f"| {np.mean([r['final']['judge_accuracy'] for r in mine]):.0%} "
                     f"| {np.mean([r['grad_norm'] for r in mine]):.3g} | {np.mean([r['seconds'] for r in mine]):.0f} |")
    strengths = next(r["strengths"] for r in runs if "strengths" in r)
    lines += ["", "LoRA strength (DRaFT-LV, first seed): " + ", ".join(
        f"{s:g}: reward {v['reward']:+.3f}, judge {v['judge_accuracy']:.0%}" for s, v in strengths.items())]
    return "\n".join(lines) + "\n"


def plots(runs, args, results):
    curves = {}
    for name in METHODS:
        mine = [r["curve"] for r in runs if r["method"] == name]
        xs = [p["queries"] for p in mine[0]]
        curves[name] = (xs, [float(np.mean([c[i]["reward"] for c in mine])) for i in range(len(xs))])
    Image.fromarray(line_chart(curves, "held-out reward vs reward queries (mean over seeds)", "queries", 900, 480)) \
        .save(results / "quality_reward_vs_queries.png")
    ks = [("DRaFT-1", 1), ("DRaFT-K (K=2)", 2), ("DRaFT-K (K=5)", 5), ("DRaFT (full)", args.sampling_steps)]
    norms = {"mean gradient norm": ([k for _, k in ks],
                                    [float(np.mean([r["grad_norm"] for r in runs if r["method"] == n])) for n, _ in ks])}
    Image.fromarray(line_chart(norms, "gradient norm (before clipping) vs K", "K")).save(results / "quality_grad_norm_vs_k.png")
    strengths = next(r["strengths"] for r in runs if "strengths" in r)
    Image.fromarray(line_chart({"held-out reward": (list(strengths), [v["reward"] for v in strengths.values()])},
                               "reward vs LoRA strength (DRaFT-LV)", "strength")).save(results / "quality_lora_strength.png")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=480)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="subset of: " + ", ".join(METHODS))
    p.add_argument("--prompt-digit", type=int, default=3)
    p.add_argument("--target", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sampling-steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--evals", type=int, default=4, help="held-out evaluations per run")
    p.add_argument("--eval-seeds", type=int, default=32)
    p.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    reward = digits.DigitReward(digits.load_classifier("reward_classifier"), args.target)
    judge = digits.load_classifier("judge_classifier")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [run_method(name, METHODS[name], seed, args, reward, judge) for name in args.methods for seed in args.seeds]
    (args.out / "quality.json").write_text(json.dumps({"args": {**vars(args), "out": str(args.out)}, "runs": runs},
                                                      indent=1))
    if set(args.methods) == set(METHODS):
        table = report(runs, args)
        (args.out / "quality.md").write_text(table)
        plots(runs, args, args.out)
        print(table)


if __name__ == "__main__":
    main()
