"""The paper's comparisons in miniature, on the bundled digit model (CPU; the committed run: ~18 min on 2 idle
cores, as 2 processes).

Every method gets the same number of reward queries (images scored). Table 1 (differentiable reward,
adversarial): prompts ask for one digit, the reward is a classifier's log-probability of another; the DRaFT
family, ReFL and AlignProp against DDPO (reinforcement learning), GRAFT and P-GRAFT (rejection sampling, P-GRAFT
at two intermediate steps t). Tables 2 and 3 (rewards without gradient; DDPO, GRAFT and P-GRAFT only, at a larger
budget): 1 if the reward classifier's argmax is the target digit, else 0 (the adversarial task as a "did the
detector fire" reward, at a low guidance scale where the base model draws the target now and then); and minus the
JPEG size of the sample (DDPO's compressibility).
Reports held-out reward (unseen prompt wording, unseen seeds) against reward queries, the queries each method
needs to reach fixed held-out reward thresholds (and their ratio to DRaFT-LV's), the judge classifier's
reading, gradient norms as K grows, reward against LoRA strength, and wall time. Writes quality.{json,md} and PNG
plots to --out (bench/results/). Runs single-threaded: on a shared 2-core CPU one thread per process is several
times faster than two.

Run: .venv/bin/python bench/quality.py [--queries 128] [--no-gradient-queries 512] [--seeds 0 1]
                                      [--tables differentiable nondifferentiable jpeg]
(split over processes with --methods/--tables and --out folders, then report them together with --merge FOLDERS)
"""
import argparse
import json
import pathlib
import time

import numpy as np
import torch
from PIL import Image

from comfy_draft import digits, policy
from comfy_draft.demo import evaluate
from comfy_draft.plotting import line_chart
from comfy_draft.trainer import TrainConfig, Trainer

# At 1e-3, (P-)GRAFT's long runs on the model's own samples rose, then collapsed (JPEG table: digits lost by 512
# queries; docs/methods.md); at 3e-4 they stay legible.
GRAFT = dict(samples_per_prompt=4, accepted_per_prompt=1, inner_epochs=4, lr=3e-4)
DDPO = dict(variant="ddpo", inner_epochs=1, timestep_fraction=0.5, lr=3e-3)  # at 1e-3 it did not move in 512 queries
NO_GRADIENT_METHODS = {  # name -> TrainConfig overrides: rewards need no gradient
    "DDPO": DDPO,
    "GRAFT (top 1 of 4)": dict(variant="graft", **GRAFT),
    "P-GRAFT (t = 0.5)": dict(variant="pgraft", pgraft_fraction=0.5, **GRAFT),
    "P-GRAFT (t = 0.8)": dict(variant="pgraft", pgraft_fraction=0.8, **GRAFT),
}
METHODS = {  # name -> TrainConfig overrides
    "DRaFT-LV (n=2)": dict(variant="draft-lv", lv_samples=2),
    "DRaFT-1": dict(variant="draft-k", grad_steps=1),
    "DRaFT-K (K=2)": dict(variant="draft-k", grad_steps=2),
    "DRaFT-K (K=5)": dict(variant="draft-k", grad_steps=5),
    "DRaFT (full)": dict(variant="draft"),
    "ReFL": dict(variant="refl"),
    "AlignProp (random K)": dict(variant="alignprop"),
    **NO_GRADIENT_METHODS,
}
# The same methods, unchanged, on the rectified-flow digit model (same architecture and data; Euler sampling)
FLOW_NO_GRADIENT_METHODS = {"P-GRAFT (t = 0.5), flow model": dict(variant="pgraft", pgraft_fraction=0.5,
                                                                 model="digits-flow", **GRAFT)}
METHODS.update({"DRaFT-LV (n=2), flow model": dict(variant="draft-lv", lv_samples=2, model="digits-flow"),
                "DRaFT (full), flow model": dict(variant="draft", model="digits-flow"), **FLOW_NO_GRADIENT_METHODS})
TABLES = {
    "differentiable": dict(methods=list(METHODS), file="quality", thresholds=(-20.5, -15.0, -10.0, -5.0, -2.0)),
    "nondifferentiable": dict(methods=[*NO_GRADIENT_METHODS, *FLOW_NO_GRADIENT_METHODS], file="quality_no_gradient",
                              thresholds=(0.25, 0.5, 0.9)),
    "jpeg": dict(methods=list(NO_GRADIENT_METHODS), file="quality_jpeg", thresholds=(-0.83, -0.82, -0.80)),
}


def budget(table, args):
    """Reward queries per run: methods without reward gradient get more (they learn from the reward's values only)."""
    return args.queries if table == "differentiable" else args.no_gradient_queries


def schedule(overrides, args, queries):
    """(batch size, optimizer steps, reward queries per step) for a method at the budget: one round of GRAFT
    scores N samples for each of batch / N prompts and serves `inner_epochs` steps; DRaFT-LV scores n per sample."""
    variant, epochs = overrides["variant"], overrides.get("inner_epochs", 1)
    graft = variant in ("graft", "pgraft")
    batch = max(1, args.batch_size // overrides["samples_per_prompt"]) if graft else args.batch_size
    per_round = batch * overrides.get("samples_per_prompt", 1) if graft else batch
    per_round *= overrides.get("lv_samples", 1) if variant == "draft-lv" else 1
    rounds = max(1, queries // per_round)
    return batch, rounds * epochs, per_round / epochs


def task(table, args):
    """Training prompts, held-out prompts and seeds, reward, judge target, cfg of a table."""
    if table in ("differentiable", "nondifferentiable"):
        classifier = digits.load_classifier("reward_classifier")
        if table == "differentiable":
            reward, cfg, seeds = digits.DigitReward(classifier, args.target), args.cfg, args.eval_seeds
        else:
            reward, cfg, seeds = digits.DigitHit(classifier, args.target), args.hit_cfg, args.hit_eval_seeds
        return ([f"a {args.prompt_digit}"], [f"the digit {digits.WORDS[args.prompt_digit]}"],
                range(10_000, 10_000 + seeds), reward, args.target, cfg)
    from comfy_draft.rewards import builtin_reward
    reward, cfg = builtin_reward("jpeg_compressibility"), args.cfg
    return ([f"a {d}" for d in range(10)], [f"the digit {w}" for w in digits.WORDS],
            range(10_000, 10_000 + max(1, args.eval_seeds // 4)), reward, None, cfg)


def run_method(table, name, overrides, seed, args, judge):
    overrides = dict(overrides)
    model = overrides.pop("model", "digits")
    prompts, held_out, seeds, reward, target, cfg = task(table, args)
    batch, steps, queries_per_step = schedule(overrides, args, budget(table, args))
    config = TrainConfig(prompts=prompts, steps=steps, cfg=cfg, sampling_steps=args.sampling_steps, width=16,
                         height=16, seed=seed, weight_decay=0.0, **{"lr": args.lr, **overrides, "batch_size": batch})
    backend = digits.load_backend("cpu", model)
    curve, eval_seconds = [], [0.0]
    trainer = Trainer(backend, reward, config)
    sampler = policy.sampler_for(config, trainer.loras)
    eval_args = (backend, reward, judge, held_out, seeds, cfg, args.sampling_steps, target)

    def checkpoint(metrics, images):
        if metrics["step"] % max(1, steps // args.evals) == 0 or metrics["step"] == steps:
            started = time.time()
            result, _ = evaluate(*eval_args, sampler=sampler)
            eval_seconds[0] += time.time() - started
            curve.append(dict(result, queries=round(metrics["step"] * queries_per_step)))

    trainer.callbacks.append(checkpoint)
    start, _ = evaluate(*eval_args, sampler=sampler)
    curve.insert(0, dict(start, queries=0))
    started = time.time()
    trainer.train()
    seconds = time.time() - started - eval_seconds[0]  # training alone, without the held-out evaluations
    out = {"table": table, "method": name, "seed": seed, "steps": steps, "batch": batch, "seconds": seconds,
           "curve": curve, "grad_norm": float(np.mean([m["grad_norm"] for m in trainer.history])), "final": curve[-1]}
    if name == "DRaFT-LV (n=2)" and seed == args.seeds[0]:
        out["strengths"] = {s: evaluate(*eval_args, strength=s)[0] for s in args.strengths}
    print(f"[{table}] {name:22s} seed {seed}: reward {start['reward']:+.3f} -> {curve[-1]['reward']:+.3f}, judge "
          f"{start['judge_accuracy']:.0%} -> {curve[-1]['judge_accuracy']:.0%}, {steps} steps, {seconds:.0f}s",
          flush=True)
    return out


def mean_curve(runs):
    """(queries, mean held-out reward over seeds) of runs with the same evaluation points."""
    xs = [p["queries"] for p in runs[0]["curve"]]
    return xs, [float(np.mean([r["curve"][i]["reward"] for r in runs])) for i in range(len(xs))]


def queries_to_reach(xs, ys, threshold):
    """The first query count at which the mean curve reaches `threshold` (linear between evaluations), or None."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y >= threshold:
            if i == 0:
                return 0.0
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (threshold - y0) / (y - y0) * (x - x0)
    return None


def report(runs, table, args):
    spec = TABLES[table]
    methods = [m for m in spec["methods"] if any(r["method"] == m for r in runs)]
    prompts, held_out, seeds, reward, target, cfg = task(table, args)
    if table == "differentiable":
        head = (f"Adversarial digits: prompt \"a {args.prompt_digit}\", reward log p({args.target}) from the reward "
                f"classifier (differentiable)")
    elif table == "jpeg":
        head = ("Compressibility without gradient: prompts \"a 0\" .. \"a 9\", reward minus the JPEG size in kB "
                "(Pillow, quality 95; no gradient); held-out: \"the digit zero\" .. \"nine\"; the judge reads the "
                "prompted digit (do the digits stay legible?)")
    else:
        head = (f"Adversarial digits without gradient: prompt \"a {args.prompt_digit}\", reward 1 if the reward "
                f"classifier's argmax is {args.target}, else 0 (no gradient)")
    lines = [f"{head}; {budget(table, args)} reward queries per run, {args.sampling_steps} DDIM steps, cfg {cfg}, lr "
             f"{args.lr} (DDPO {DDPO['lr']:g}, GRAFT and P-GRAFT {GRAFT['lr']:g}), seeds {args.seeds}; held-out: "
             f"unseen wording and {len(seeds)} unseen seeds per prompt. Judge: a classifier trained on digits "
             f"neither the model nor the reward saw.", "",
             "| method | held-out reward before | after (mean +/- sd over seeds) | seed-to-seed gain sd | judge reads "
             "target, after | optimizer steps | mean grad norm (pre-clip) | seconds per run |",
             "|---|---|---|---|---|---|---|---|"]
    for name in methods:
        mine = [r for r in runs if r["method"] == name]
        before = np.array([r["curve"][0]["reward"] for r in mine])
        after = np.array([r["final"]["reward"] for r in mine])
        lines.append(f"| {name} | {before.mean():+.3f} | {after.mean():+.3f} +/- {after.std():.3f} "
                     f"| {(after - before).std():.3f} | {np.mean([r['final']['judge_accuracy'] for r in mine]):.0%} "
                     f"| {mine[0]['steps']} | {np.mean([r['grad_norm'] for r in mine]):.3g} "
                     f"| {np.mean([r['seconds'] for r in mine]):.0f} |")
    reference = methods[0]
    lines += ["", f"Reward queries to reach a held-out reward (mean curve over seeds, linear between the {args.evals} "
              f"evaluations; '-' = not reached within {budget(table, args)}); in brackets the ratio to "
              f"{reference}'s:", "",
              "| method | " + " | ".join(f">= {t:g}" for t in spec["thresholds"]) + " |",
              "|---|" + "---|" * len(spec["thresholds"])]
    reached = {name: [queries_to_reach(*mean_curve([r for r in runs if r["method"] == name]), t)
                      for t in spec["thresholds"]] for name in methods}
    for name in methods:
        cells = []
        for q, ref in zip(reached[name], reached[reference]):
            ratio = f" ({q / ref:.2g}x)" if q is not None and ref else ""
            cells.append("-" if q is None else f"{q:.0f}{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    strengths = next((r["strengths"] for r in runs if "strengths" in r), None)
    if strengths:
        lines += ["", "LoRA strength (DRaFT-LV, first seed): " + ", ".join(
            f"{float(s):g}: reward {v['reward']:+.3f}, judge {v['judge_accuracy']:.0%}" for s, v in strengths.items())]
    return "\n".join(lines) + "\n"


def plots(runs, table, args, results):
    spec = TABLES[table]
    curves = {name: mean_curve([r for r in runs if r["method"] == name])
              for name in spec["methods"] if any(r["method"] == name for r in runs)}
    title = "held-out reward vs reward queries (mean over seeds)" + {
        "differentiable": "", "nondifferentiable": ", argmax digit (no gradient)",
        "jpeg": ", JPEG size (no gradient)"}[table]
    Image.fromarray(line_chart(curves, title, "queries", 900, 480)).save(
        results / f"{spec['file']}_reward_vs_queries.png")
    if table != "differentiable":
        return
    ks = [("DRaFT-1", 1), ("DRaFT-K (K=2)", 2), ("DRaFT-K (K=5)", 5), ("DRaFT (full)", args.sampling_steps)]
    if all(any(r["method"] == n for r in runs) for n, _ in ks):
        norms = {"mean gradient norm": ([k for _, k in ks], [float(np.mean([r["grad_norm"] for r in runs
                                                                             if r["method"] == n])) for n, _ in ks])}
        Image.fromarray(line_chart(norms, "gradient norm (before clipping) vs K", "K")).save(
            results / "quality_grad_norm_vs_k.png")
    strengths = next((r["strengths"] for r in runs if "strengths" in r), None)
    if strengths:
        Image.fromarray(line_chart({"held-out reward": ([float(s) for s in strengths],
                                                        [v["reward"] for v in strengths.values()])},
                                   "reward vs LoRA strength (DRaFT-LV)", "strength")).save(
            results / "quality_lora_strength.png")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=128)
    p.add_argument("--no-gradient-queries", type=int, default=512, help="budget of the tables without gradient")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="subset of: " + ", ".join(METHODS))
    p.add_argument("--prompt-digit", type=int, default=3)
    p.add_argument("--target", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sampling-steps", type=int, default=8)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--hit-cfg", type=float, default=0.5, help="cfg of the argmax table (no gradient)")
    p.add_argument("--hit-eval-seeds", type=int, default=64, help="held-out seeds of the argmax table")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--evals", type=int, default=4, help="held-out evaluations per run")
    p.add_argument("--eval-seeds", type=int, default=16, help="(the JPEG table: a quarter per prompt)")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    p.add_argument("--merge", type=pathlib.Path, nargs="+",
                   help="instead of training: report the runs of these result folders together (runs split over "
                        "processes with --methods)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    judge = digits.load_classifier("judge_classifier")
    args.out.mkdir(parents=True, exist_ok=True)
    for table in args.tables:
        spec = TABLES[table]
        methods = [m for m in args.methods if m in spec["methods"]]
        if args.merge:
            runs = [r for folder in args.merge if (folder / f"{spec['file']}.json").exists()
                    for r in json.loads((folder / f"{spec['file']}.json").read_text())["runs"]]
            runs = [r for m in methods for r in runs if r["method"] == m]
        else:
            runs = [run_method(table, name, METHODS[name], seed, args, judge)
                    for name in methods for seed in args.seeds]
        (args.out / f"{spec['file']}.json").write_text(json.dumps(
            {"args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()
                      if k != "merge"}, "runs": runs}, indent=1))
        if not runs:
            continue
        text = report(runs, table, args)
        (args.out / f"{spec['file']}.md").write_text(text)
        plots(runs, table, args, args.out)
        print(text, flush=True)


if __name__ == "__main__":
    main()
