"""Inverse noise correction in miniature (the P-GRAFT paper's second method) on the flow digit model, on the CPU.

The first 1,000 of the diffusion model's 3,000 training digits (--inverted) are inverted to noise through its own N-step Euler sampler
(unconditional: empty prompt, cfg 1); a corrector (a small flow model in noise space) is trained on the noises per
seed; then samples from base at N steps, corrector + base at M + N steps, and base at 2N and 4N steps are compared
with 1,000 held-out real digits (the reward classifier's split: neither the diffusion model nor the judge saw them)
by the Frechet distance in the judge classifier's 128 penultimate features (FID's statistic on other features: not
comparable with published FIDs), with FLOPs per image (torch's FLOP counter: matmuls and convolutions, one model call
per step at cfg 1) and per-class coverage (the judge's reading: how often each digit appears). The distance between
the training digits and the held-out ones is the floor that sampling noise leaves.

Run: .venv/bin/python bench/correction.py [--steps 10] [--corrector-steps 10] [--seeds 0 1] [--samples 500]
(about 15 minutes on 2 cores)
Writes correction.{json,md} to --out (bench/results/).
"""
import argparse
import json
import pathlib
import time

import torch

from comfy_draft import correction, digits

ROOT = pathlib.Path(__file__).resolve().parents[1]


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets (N, D), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    c_a, c_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(c_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ c_b @ root_a).clamp_min(0).sqrt().sum()  # Tr (C_a C_b)^(1/2)
    return ((mu_a - mu_b).square().sum() + c_a.trace() + c_b.trace() - 2 * cross).item()


def judged(judge, images):
    """The judge's features and predicted digits of images in [0, 1]."""
    with torch.no_grad():
        features = judge.features(images)
        return features, judge.net[-1](features).argmax(-1)


def nearest_training_distance(x0, train):
    """Mean RMS pixel distance (in [-1, 1]) from each sample to its nearest training digit: a corrector that only
    recalled the inverted digits' noises would bring this towards 0 (memorisation, not quality)."""
    return (torch.cdist(x0.flatten(1), train.flatten(1)).min(1).values / x0[0].numel() ** 0.5).mean().item()


def coverage(predicted):
    """The share of each digit among the judge's readings."""
    return (torch.bincount(predicted, minlength=10).double() / len(predicted)).tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-flow", choices=list(digits.MODELS))
    parser.add_argument("--steps", type=int, default=10, help="N: the base sampler's steps the corrector belongs to")
    parser.add_argument("--corrector-steps", type=int, default=10, help="M: the corrector's Euler steps")
    parser.add_argument("--corrector-width", type=int, default=32)
    parser.add_argument("--training-steps", type=int, default=1000, help="the corrector's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, default=500, help="generated digits per sampler and seed")
    parser.add_argument("--inverted", type=int, default=1000, help="training digits inverted (of 3,000)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    started = time.time()
    backend = digits.load_backend("cpu", args.model)
    judge = digits.load_classifier("judge_classifier")
    data = digits.splits()
    train, held_out = data["diffusion"][0][:args.inverted], data["reward"][0]
    real_features, real_labels = judged(judge, held_out)
    n, m = args.steps, args.corrector_steps

    latents = backend.latents_of(train.expand(-1, 3, -1, -1))
    prompts = [""] * len(latents)
    t = time.time()
    noise, sigmas, residual = correction.invert_latents(
        backend, latents, prompts, cfg=1.0, steps=n, batch_size=500,
        callback=lambda d: d["i"] + 1 == d["total"] and print(f"batch {d['batch'] + 1}/{d['batches']} inverted "
                                                                f"({time.time() - t:.0f}s)", flush=True))
    invert_seconds = time.time() - t
    returned = correction.sample_latents(backend, noise, prompts, cfg=1.0, steps=n, batch_size=500)
    round_trip = correction.relative_error(returned, latents)
    moments = {"mean": noise.mean().item(), "std": noise.std().item(),
               "per-image std (mean)": noise.flatten(1).std(1).mean().item()}
    print(f"inverted {len(noise)} digits in {invert_seconds:.0f}s: residual {residual:.2g}, round trip {round_trip:.2g}, "
          f"noise {moments}", flush=True)

    base_flops = correction.flops_per_call(backend.denoiser, torch.zeros(1, 1, 16, 16), torch.ones(1),
                                           backend.encode([""])["encoder_hidden_states"])
    rows, corrector_seconds = {}, []
    for seed in args.seeds:
        t = time.time()
        corrector = correction.train_corrector(noise, args.corrector_width, args.training_steps, seed=seed)
        corrector_seconds.append(time.time() - t)
        corrector_flops = correction.flops_per_call(corrector, torch.zeros(1, 1, 16, 16), torch.ones(1))
        z = torch.randn(args.samples, 1, 16, 16, generator=torch.Generator().manual_seed(1000 + seed))
        corrected = corrector.sample(z, m)
        samplers = {f"base, {n} steps": (z, n, n * base_flops),
                    f"corrector + base, {m} + {n} steps": (corrected, n, m * corrector_flops + n * base_flops),
                    f"base, {2 * n} steps": (z, 2 * n, 2 * n * base_flops),
                    f"base, {4 * n} steps": (z, 4 * n, 4 * n * base_flops)}
        for name, (start, steps, flops) in samplers.items():
            x0 = correction.sample_latents(backend, start, [""] * len(start), cfg=1.0, steps=steps, batch_size=500)
            features, predicted = judged(judge, backend.decode(x0, recompute=False))
            row = rows.setdefault(name, {"flops_per_image": flops, "distance": [], "coverage": [], "nearest": []})
            row["distance"].append(frechet_distance(features, real_features))
            row["coverage"].append(coverage(predicted))
            row["nearest"].append(nearest_training_distance(x0, latents))
        print(f"seed {seed}: " + ", ".join(f"{k} {v['distance'][-1]:.3f}" for k, v in rows.items()), flush=True)
    floor = frechet_distance(judged(judge, train[:args.samples])[0], real_features)  # at the samples' count
    result = {"args": vars(args), "inverted": len(noise), "residual": residual, "round_trip_error": round_trip,
              "noise_moments": moments, "invert_seconds": invert_seconds, "corrector_seconds": corrector_seconds,
              "corrector_parameters": sum(p.numel() for p in corrector.parameters()),
              "base_parameters": sum(p.numel() for p in backend.unet.parameters()),
              "real_vs_real_distance": floor, "real_coverage": coverage(real_labels),
              "real_nearest": nearest_training_distance(held_out * 2 - 1, latents), "rows": rows,
              "seconds": time.time() - started}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "correction.json").write_text(json.dumps(result, indent=1))
    (out / "correction.md").write_text(report(result))
    print(report(result))


def report(r):
    a = r["args"]
    lines = [f"Inverse noise correction on the {a['model']} model (CPU, {r['seconds'] / 60:.0f} min): "
             f"{r['inverted']} training digits inverted at {a['steps']} steps (largest fixed-point residual "
             f"{r['residual']:.1g}, round trip within {r['round_trip_error']:.1g} relative; inverted noise mean "
             f"{r['noise_moments']['mean']:+.3f}, std {r['noise_moments']['std']:.3f}); corrector "
             f"{r['corrector_parameters'] / 1e6:.2f}M parameters (base {r['base_parameters'] / 1e6:.2f}M), "
             f"{a['training_steps']} training steps; {a['samples']} samples per sampler and seed, seeds "
             f"{a['seeds']}.", "",
             "Frechet distance to 1,000 held-out real digits in the judge classifier's features (lower is better; the "
             f"inverted training digits themselves, as many as the samples: {r['real_vs_real_distance']:.3f}). Coverage: the rarest and commonest digit "
             "among the judge's readings (held-out real digits: "
             f"{min(r['real_coverage']):.1%} / {max(r['real_coverage']):.1%}).", "",
             "Nearest: the mean RMS pixel distance from a sample to its nearest training digit (memorisation would "
             f"lower it; held-out real digits: {r['real_nearest']:.3f}).", "",
             "| sampler | GFLOPs per image | distance (mean +/- sd over seeds) | per seed | rarest / commonest digit "
             "| nearest |",
             "|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        d = torch.tensor(row["distance"], dtype=torch.float64)
        cover = torch.tensor(row["coverage"]).mean(0)
        sd = d.std().item() if len(d) > 1 else float("nan")
        lines.append(f"| {name} | {row['flops_per_image'] / 1e9:.3f} | {d.mean():.3f} +/- {sd:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in d.tolist())} | {cover.min():.1%} / {cover.max():.1%} "
                     f"| {sum(row['nearest']) / len(row['nearest']):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
