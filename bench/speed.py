"""Speed and memory of one DRaFT training step through ComfyUI (issue 7).

Builds SD1.5-, SDXL- and (optionally) SD2-architecture checkpoints with random weights (no download:
ComfyUI's own model classes give every tensor name and shape, seeded noise fills them), loads them with
ComfyUI's checkpoint loader, and builds the LAION aesthetic reward (CLIP ViT-L/14 + MLP) at its real
size with random weights. Per model it measures:

- No-grad sampling: ComfyUI's KSampler (ddim, ddim_uniform), the library's DDIM
  (`backends.comfyui.sample`, the DRaFT DDIM Sampler node) on the same ModelPatcher, and the same chain
  as training runs it (the trainer's LoRA-wrapped model copy, training precision), interleaved;
  ratios = KSampler time / ours.
- For draft-lv (n = 2), draft-k (K = 1, 5) and full draft: the real `Trainer.train_step` (median of
  `--repeats` after `--warmup`), split into phases by wrapping the model, decoder and reward, and its
  peak device memory. After each step, the unavoidable parts are timed alone with the trainer's own
  pieces and without checkpointing: the no-grad guided UNet calls (`sample_ddim`), forward + backward
  of one differentiated guided call, VAE decode forward + backward, reward forward + backward, the
  optimizer step. Overhead ratio = step time / sum of the parts the variant needs, so recomputation
  in the backward pass counts as overhead.

`--size real` (default on CUDA) uses the real architectures at 512 (SD1.5), 768 (SD2, v-prediction) and
1024 (SDXL); `--size tiny` (default on CPU) uses the test suite's tiny SD1.5-architecture checkpoint
(SD1.5's UNet widths with one level, full CLIP-L and SD VAE) at 64 x 64 with a small CLIP aesthetic
reward, so that a CPU can run the whole benchmark in minutes; its figures only show that it runs.
Configurations that run out of device memory are recorded as "OOM". Results go to <out>/<name>.json
and <name>.md (name: speed on CUDA, speed_cpu otherwise), rewritten after every configuration.

The model builders, timing helpers, the variants and the table of accounting configurations are in
bench/fixtures.py (shared with accounting.py, gpu_check.py and channels_last.py).

Run: .venv/bin/python bench/speed.py                       # CUDA: SD1.5 and SDXL at real size
     .venv/bin/python bench/speed.py --models sd15 sdxl sd2  # with SD2 768-v
     .venv/bin/python bench/speed.py --threads 1             # CPU, tiny (1 thread: steadier when shared)
"""
import argparse
import collections
import contextlib
import json
import pathlib
import platform
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/: fixtures, also when loaded by file
from fixtures import (  # noqa: E402
    ARCHITECTURES, CFG, GIB, PROMPTS, REPO, RESOLUTION, RUNS_AS, SEED, SETUPS, VARIANTS, PhaseClock, account_setup,
    aesthetic_reward, boot_comfyui, cpu_name, guarded, instrumented, load_models, previous_lora_path, release, timed)
from fixtures import random_checkpoint  # noqa: E402, F401  (tests/test_real_size.py reads speed.random_checkpoint)


# ----- measurements ---------------------------------------------------------------------------------
def compare_sampling(model, clip, vae, reward, res, args, device):
    """ComfyUI's KSampler (ddim / ddim_uniform) vs the library's no-grad DDIM on the same ModelPatcher, both
    as a node runs them (inference mode, noise drawn from the seed), and vs the no-grad chain as training runs
    it (the trainer's LoRA-wrapped model copy, training precision): interleaved, in alternating order."""
    import comfy.sample

    from comfy_draft.backends import comfyui as ours
    from comfy_draft.backends.comfyui import TrainingBackend
    from comfy_draft.sampling import sample_ddim
    from comfy_draft.trainer import Trainer

    latent_format = model.get_model_object("latent_format")
    f = latent_format.spacial_downscale_ratio
    latent = torch.zeros(args.batch_size, latent_format.latent_channels, res // f, res // f)  # EmptyLatentImage
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPTS[0]))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    trainer = Trainer(TrainingBackend(model, clip, vae), reward, train_config("draft-lv (n=2)", res, args))
    outputs = {}

    def ksampler():
        with torch.inference_mode():
            noise = comfy.sample.prepare_noise(latent, SEED)
            outputs["ksampler"] = comfy.sample.sample(model, noise, args.steps, CFG, "ddim", "ddim_uniform", positive,
                                                      negative, latent, disable_pbar=True, seed=SEED)

    def library():
        with torch.inference_mode():
            outputs["ours"] = ours.sample(model, positive, negative, {"samples": latent}, SEED, args.steps, CFG)

    def training_chain():
        def chain(model, x, sigmas):
            with torch.no_grad(), trainer.autocast():
                return sample_ddim(model, x, sigmas)
        trainer.backend.run(chain, [PROMPTS[0]] * args.batch_size, "", CFG, torch.randn(latent.shape), args.steps)

    times = {"ksampler": [], "ours": [], "training_chain": [], "training_chain_rebuilt": []}
    runs = [("ksampler", ksampler, contextlib.nullcontext), ("ours", library, contextlib.nullcontext),
            ("training_chain", training_chain, contextlib.nullcontext),
            ("training_chain_rebuilt", training_chain, lambda: previous_lora_path(trainer.backend))]
    for i in range(args.sampling_repeats + 1):  # round 0 warms up (model loading, kernel selection)
        for name, fn, setup in runs if i % 2 else runs[::-1]:
            with setup():
                seconds = timed(fn, device)
            if i:
                times[name].append(seconds)
    k, o, t, r = (statistics.median(times[name]) for name in times)
    return {"ksampler_s": k, "ours_s": o, "ratio": k / o, "training_chain_s": t, "ratio_training_chain": k / t,
            "training_chain_rebuilt_s": r, "ratio_training_chain_rebuilt": k / r, "runs_s": times,
            "max_abs_diff": (outputs["ksampler"].float().cpu() - outputs["ours"].float().cpu()).abs().max().item()}


def memory_estimate(model, clip, vae, reward, res, args):
    """What the trainer prints before training (`memory.estimate`) for draft-lv (n = 2) at `res`, bf16, batch 1."""
    from comfy_draft import memory
    from comfy_draft.backends.comfyui import TrainingBackend
    from comfy_draft.trainer import TrainConfig, Trainer
    config = TrainConfig(prompts=PROMPTS, sampling_steps=args.steps, cfg=CFG, width=res, height=res, batch_size=1,
                         precision="bf16", variant="draft-lv", lv_samples=2, seed=SEED)
    e = memory.estimate(**Trainer(TrainingBackend(model, clip, vae), reward, config).memory_inputs())
    return {**e, "resolution": res, "checkpointing": config.gradient_checkpointing}


def train_config(variant, res, args):
    from comfy_draft.trainer import TrainConfig
    return TrainConfig(prompts=PROMPTS, sampling_steps=args.steps, cfg=CFG, width=res, height=res,
                       batch_size=args.batch_size, gradient_checkpointing=not args.no_checkpointing, steps=10 ** 9, seed=SEED,
                       **VARIANTS[variant])


def batched_copies(trainer):
    """How many DRaFT-LV copies the step puts in one differentiated call (1: one call per copy)."""
    c = trainer.config
    return c.lv_samples if c.variant == "draft-lv" and trainer.batches_copies else 1


def unit_round(trainer, args, device):
    """One timing of each unavoidable part, alone, with the trainer's own pieces (its LoRA-wrapped model
    copy in ComfyUI's guider, autocast, decoder, reward, optimizer) and without checkpointing: the no-grad
    chain of T guided calls (`sample_ddim`), forward + backward of one differentiated guided call (at the batch
    the step gives it: the n DRaFT-LV copies in one call when the step batches them), VAE decode forward +
    backward, reward forward + backward, optimizer step. Returns T and the seconds."""
    from comfy_draft.sampling import denoise, sample_ddim

    backend, c = trainer.backend, trainer.config
    prompts = (c.prompts * c.batch_size)[:c.batch_size]
    shape = backend.latent_shape(c.batch_size, c.height, c.width)
    seconds = {}

    def guided_calls(model, x, sigmas):
        seconds["T"] = len(sigmas) - 1
        x = x.detach().requires_grad_()  # as inside a differentiated chain (K > 1)

        def chain():
            with torch.no_grad(), trainer.autocast():
                sample_ddim(model, x, sigmas)

        def differentiated_call():
            with trainer.autocast():
                prediction = denoise(model, torch.cat([x] * batched_copies(trainer)), sigmas[-2], {})
            prediction.backward(torch.randn_like(prediction))

        seconds["sampling_chain"] = timed(chain, device)
        seconds["differentiated_call"] = timed(differentiated_call, device)
        return x.detach()

    def decode():
        z = torch.randn(shape, device=device, requires_grad=True)
        with trainer.autocast():
            images = backend.decode(z, recompute=False)
        images.backward(torch.randn_like(images))

    def score():
        images = torch.rand(c.batch_size, 3, c.height, c.width, device=device, requires_grad=True)
        with trainer.autocast():
            scores = trainer.reward(images, prompts)
        scores.sum().backward()

    def optimizer():
        torch.nn.utils.clip_grad_norm_(trainer.params, c.max_grad_norm)
        trainer.optimizer.step()

    backend.run(guided_calls, prompts, c.negative_prompt, c.cfg, torch.randn(shape), c.sampling_steps)
    for name, fn in (("decode", decode), ("reward", score), ("optimizer", optimizer)):
        seconds[name] = timed(fn, device)
    trainer.optimizer.zero_grad(set_to_none=True)
    return seconds.pop("T"), seconds


def unavoidable(variant, T, units, copies=1):
    """The parts a step of `variant` cannot avoid, in seconds, from the unit costs (`copies`: DRaFT-LV copies per
    differentiated call, as `batched_copies`)."""
    v = VARIANTS[variant]
    n = v.get("lv_samples", 1)
    differentiated = {"draft-lv": n // copies, "draft-k": v.get("grad_steps"), "draft": T}[v["variant"]]
    no_grad = T if v["variant"] == "draft-lv" else T - differentiated
    return {"sampling": no_grad * units["sampling_chain"] / T, "differentiated": differentiated * units["differentiated_call"],
            "decode": n * units["decode"], "reward": n * units["reward"], "optimizer": units["optimizer"]}


def measure_variant(model, clip, vae, reward, variant, res, args, device):
    """The real Trainer's steps (median time, median per phase, peak device memory), each followed by one
    round of the unavoidable parts, so that both see the same machine (clocks, other load)."""
    from comfy_draft.backends.comfyui import TrainingBackend
    from comfy_draft.trainer import Trainer

    config = train_config(variant, res, args)
    backend = TrainingBackend(model, clip, vae)
    trainer = Trainer(backend, reward, config)
    backend.encode(config.prompts + [config.negative_prompt])  # cached for the run, as after a node's first step
    release()  # the text encoder and the KSampler's model leave the device; the training copy loads on step 1
    for _ in range(args.warmup):
        trainer.train_step()
        unit_round(trainer, args, device)
    clock = PhaseClock(device)
    steps, peaks, units = [], [], collections.defaultdict(list)
    for _ in range(args.repeats):
        if device.type == "cuda":  # the peak of the step alone: the unit timings run without checkpointing
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        with instrumented(trainer, clock):
            steps.append(clock.measure(trainer.train_step))
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device))
        T, seconds = unit_round(trainer, args, device)
        for name, value in seconds.items():
            units[name].append(value)
    units = {name: statistics.median(values) for name, values in units.items()}
    parts = unavoidable(variant, T, units, batched_copies(trainer))
    totals = [sum(s.values()) for s in steps]
    result = {"sampling_steps": T, "step_s": statistics.median(totals), "steps_s": totals,
              "phases_s": {p: statistics.median([s.get(p, 0.0) for s in steps]) for p in steps[0]},
              "units_s": units, "unavoidable_s": parts, "unavoidable_total_s": sum(parts.values()),
              "overhead_ratio": statistics.median(totals) / sum(parts.values())}
    result["checkpointing"] = trainer.gradient_checkpointing  # as resolved by the policy
    if device.type == "cuda":  # GB = 10^9 bytes, the unit of the issue's targets
        result["peak_gb"] = max(peaks) / 1e9
        result["resident_gb"] = resident / 1e9  # weights, LoRA and optimizer state before a step
    return result


def benchmark_model(name, args, device, reward, results, write):
    res = args.resolution or RESOLUTION[args.size][name]
    entry = results["models"][name] = {"resolution": res, "batch_size": args.batch_size, "cfg": CFG}
    print(f"{name}: loading ({args.size}, {res}x{res})", flush=True)
    model, clip, vae = load_models(name, args.size, device)
    entry["unet_dtype"] = str(model.model_dtype()).replace("torch.", "")
    entry["unet_parameters"] = sum(p.numel() for p in model.model.diffusion_model.parameters())

    print(f"{name}: KSampler vs library DDIM, {args.steps} steps", flush=True)
    entry["sampling"] = s = guarded(compare_sampling, model, clip, vae, reward, res, args, device)
    if s != "OOM":
        print(f"  KSampler {s['ksampler_s']:.3f}s, ours {s['ours_s']:.3f}s, ratio {s['ratio']:.3f} (max |diff| "
              f"{s['max_abs_diff']:.1e}); training chain {s['training_chain_s']:.3f}s, ratio {s['ratio_training_chain']:.3f}",
              flush=True)
    write()
    if args.size == "real":
        entry["estimate"] = e = guarded(memory_estimate, model, clip, vae, reward, RESOLUTION["real"][name], args)
        if e != "OOM":
            print(f"  memory estimate at {e['resolution']}: {e['total'] / GIB:.2f} GiB", flush=True)
        write()

    entry["variants"] = {}
    for variant in args.variants:
        print(f"{name}: {variant}", flush=True)
        r = entry["variants"][variant] = guarded(measure_variant, model, clip, vae, reward, variant, res, args, device)
        print("  " + ("OOM" if r == "OOM" else f"step {r['step_s']:.3f}s, unavoidable {r['unavoidable_total_s']:.3f}s, "
                      f"overhead ratio {r['overhead_ratio']:.3f}" + (f", peak {r['peak_gb']:.2f} GB" if "peak_gb" in r else "")),
              flush=True)
        write()
    del model, clip, vae
    release()


# ----- report ---------------------------------------------------------------------------------------
def fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(results):
    env = results["env"]
    args = results["args"]
    cpu = env["device"] == "cpu"
    lines = [f"# DRaFT step speed and memory ({'CPU, tiny models' if args['size'] == 'tiny' else 'real sizes'})", "",
             f"Device: {env['device_name']}; torch {env['torch']}; ComfyUI {env['comfyui']}; "
             f"{args['steps']} DDIM steps (ddim_uniform), cfg {CFG}, batch {args['batch_size']}, LoRA rank 8 on "
             f"attention, precision auto, checkpointing {'off' if args['no_checkpointing'] else 'on'}; "
             f"{args['warmup']} warm-up + {args['repeats']} measured steps (medians). Reward: LAION aesthetic on "
             + ("CLIP ViT-L/14 (random weights)." if args["size"] == "real" else "a small CLIP ViT (random weights)."),
             ""]
    if args["size"] == "tiny":
        lines += ["Tiny models on the CPU: these figures show that the benchmark runs; the targets of issue 7 "
                  "are about real sizes on a GPU.", ""]
    for name, m in results["models"].items():
        lines += [f"## {name}, {m['resolution']}x{m['resolution']} ({m['unet_parameters'] / 1e6:.0f}M-parameter UNet, "
                  f"{m['unet_dtype']} weights)", ""]
        measured = {v: r for v, r in m.get("variants", {}).items() if r != "OOM"}
        s = m.get("sampling")
        if s == "OOM":
            lines += ["KSampler comparison: OOM", ""]
        elif s:
            lines += [f"No-grad sampling, {args['steps']} steps, medians of {args['sampling_repeats']}: ComfyUI KSampler "
                      f"(ddim) {s['ksampler_s']:.3f} s, library "
                      f"DDIM (DRaFT DDIM Sampler) {s['ours_s']:.3f} s: ratio KSampler / ours **{s['ratio']:.3f}** (max "
                      f"|difference| of the latents {s['max_abs_diff']:.1e}). The same chain as training runs it (the "
                      f"trainer's LoRA-wrapped model copy, training precision): {s['training_chain_s']:.3f} s, ratio "
                      f"KSampler / training chain **{s['ratio_training_chain']:.3f}**; the same chain with the LoRA "
                      f"applied as before issue 14 (W + delta rebuilt in every call): "
                      f"{s['training_chain_rebuilt_s']:.3f} s, ratio **{s['ratio_training_chain_rebuilt']:.3f}**.", ""]
        lines += ["| variant | step s | sampling | differentiated | decode | reward | backward | optimizer | other "
                  "| unavoidable s | overhead ratio | peak GB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for variant, r in m.get("variants", {}).items():
            if r == "OOM":
                lines.append(f"| {variant} | OOM |  |  |  |  |  |  |  |  |  |  |")
                continue
            p = r["phases_s"]
            cells = [p.get(k, 0.0) for k in ("sampling", "differentiated", "decode", "reward", "backward", "optimizer")]
            cells.append(p.get("setup", 0.0) + p.get("other", 0.0))
            lines.append(f"| {variant} | {r['step_s']:.3f} | " + " | ".join(f"{c:.3f}" for c in cells)
                         + f" | {r['unavoidable_total_s']:.3f} | **{r['overhead_ratio']:.3f}** "
                         f"| {'n/a (CPU)' if cpu else fmt(r.get('peak_gb'), 2)} |")
        lines += ["", "Unavoidable parts, each timed alone right after each step (s, medians):", "",
                  "| variant | no-grad guided call | differentiated call fwd+bwd | VAE decode fwd+bwd | reward fwd+bwd "
                  "| optimizer |", "|---|---|---|---|---|---|"]
        for variant, r in measured.items():
            u = r["units_s"]
            lines.append(f"| {variant} | {u['sampling_chain'] / r['sampling_steps']:.4f} | {u['differentiated_call']:.4f} "
                         f"| {u['decode']:.4f} | {u['reward']:.4f} | {u['optimizer']:.4f} |")
        if m.get("estimate"):
            e = m["estimate"]
            lines += [f"The trainer's memory estimate (`memory.estimate`, printed before training) for draft-lv (n=2), "
                      f"{e['resolution']}x{e['resolution']}, bf16, batch 1, checkpointing {e['checkpointing']}: "
                      f"**{e['total'] / GIB:.2f} GiB** (weights {e['weights'] / GIB:.2f}, LoRA and optimizer "
                      f"{e['training'] / GIB:.3f}, activations {e['activations'] / GIB:.2f}).", ""]
        lines.append("")
    lines += accounting_markdown(results.get("accounting"))
    lines += accounting_vs_cuda(results)
    lines += ["Phases (seconds, medians over the measured steps): sampling = no-grad UNet calls; differentiated = "
              "forward of the differentiated calls; backward includes recomputing checkpointed UNet calls and the "
              "decoder; other = prompt/noise draw and ComfyUI's sampling setup and cleanup. Overhead ratio = step "
              "time / sum of the unavoidable parts the variant needs (no-grad calls of the prefix, forward+backward "
              "of each differentiated call, VAE decode and reward forward+backward per scored image, optimizer), "
              "timed without checkpointing. Peak = torch.cuda.max_memory_allocated over the measured steps, in GB "
              "(10^9 bytes).", ""]
    return "\n".join(lines + target_checks(results))


def accounting_markdown(rows):
    """The tensor-accounting table of `bench/accounting.py` (CPU, meta tensors)."""
    if not rows:
        return []
    lines = ["## Peak memory at real sizes by tensor accounting (CPU, meta tensors: no GPU measured)", "",
             "One DRaFT-LV step (n = 2), batch 1, bf16 weights and activations, LoRA rank 8 on attention, aesthetic "
             "reward (CLIP ViT-L/14 + MLP), CFG as one batch of 2; peak of live tensor bytes (`memory.LiveBytes`) "
             "through forward and backward. GiB = 2^30 bytes. Split at the peak: what the UNet, decoder and reward "
             "forwards (and their recomputes) hold.", "",
             "| model | configuration | LoRA | decoder | UNet checkpoint | total GiB | weights | LoRA + AdamW "
             "| step live at peak | of which UNet / decoder / reward | no-grad prefix transient | decoder alone |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["step_split_at_peak"]
        split = " / ".join(f"{p.get(k, 0) / GIB:.2f}" for k in ("unet", "decode", "reward"))
        lines.append(f"| {r['model']} {r['resolution']} | {r['config']} | {r['lora']} | {r['decode']} "
                     f"| {r['unet_checkpoint']} | **{r['total'] / GIB:.2f}** | {r['weights'] / GIB:.2f} "
                     f"| {r['training'] / GIB:.3f} | {r['step_live_peak'] / GIB:.2f} | {split} "
                     f"| {r['prefix_transient'] / GIB:.2f} | {r['decoder_alone'] / GIB:.2f} |")
    return lines + [""]


def accounting_vs_cuda(results):
    """On CUDA: each real-size draft-lv (n = 2) step's torch.cuda.max_memory_allocated against the CPU tensor
    accounting of the configuration it ran with (its resolved checkpointing)."""
    rows = results.get("accounting") or []
    if results["env"]["device"] != "cuda" or not rows or results["args"]["batch_size"] != 1:
        return []
    lines = ["## CPU tensor accounting vs CUDA's max_memory_allocated", "",
             "| model | configuration | CPU accounting GiB | CUDA peak GiB | CUDA / accounting |", "|---|---|---|---|---|"]
    for name, m in results["models"].items():
        r = m.get("variants", {}).get("draft-lv (n=2)")
        if not isinstance(r, dict) or "peak_gb" not in r or m["resolution"] != RESOLUTION["real"].get(name):
            continue
        config = RUNS_AS.get(r.get("checkpointing"))
        row = next((a for a in rows if a["model"] == name and a["config"] == config), None)
        if row is not None:
            peak = r["peak_gb"] * 1e9
            r["accounting_ratio"] = peak / row["total"]
            lines.append(f"| {name} {m['resolution']} | {config} | {row['total'] / GIB:.2f} | {peak / GIB:.2f} "
                         f"| **{r['accounting_ratio']:.3f}** |")
    return lines + ["", "The accounting counts live tensors only (bf16 throughout); CUDA adds the caching "
                    "allocator's rounding and fragmentation, kernel workspaces, and keeps the model's own dtype.", ""]


def target_checks(results):
    """Issue 7's targets, where this run measured their configuration (real sizes on CUDA, batch 1, 50 steps)."""
    args, models = results["args"], results["models"]
    if results["env"]["device"] != "cuda" or args["size"] != "real" or args["batch_size"] != 1 or args["steps"] != 50:
        return []

    def variant(model, name):  # only at the target's resolution
        m = models.get(model, {})
        return m.get("variants", {}).get(name) if m.get("resolution") == RESOLUTION["real"][model] else None

    def check(label, r, key, limit, above=False):
        if r is None:
            return f"- {label}: not measured"
        value = None if r == "OOM" else r.get(key)
        ok = value is not None and (value >= limit if above else value <= limit)
        return f"- {label}: {'OOM' if r == 'OOM' else fmt(value)} -> {'met' if ok else 'NOT met'}"

    lines = ["## Targets (issue 7)", "",
             check("overhead ratio, draft-lv, SD1.5 512 (<= 1.15)", variant("sd15", "draft-lv (n=2)"), "overhead_ratio", 1.15),
             check("peak memory GB, draft-lv, SD1.5 512 (<= 6)", variant("sd15", "draft-lv (n=2)"), "peak_gb", 6),
             check("peak memory GB, draft-lv, SDXL 1024 (<= 14)", variant("sdxl", "draft-lv (n=2)"), "peak_gb", 14),
             check("peak memory GB, full draft (K = 50), SD1.5 512 (<= 24)", variant("sd15", "draft (full)"), "peak_gb", 24)]
    for name, m in models.items():
        s = m.get("sampling")
        lines.append(check(f"KSampler / library DDIM, {name} (>= 0.95)", s, "ratio", 0.95, above=True))
        lines.append(check(f"KSampler / training's no-grad chain, {name} (>= 0.95)", s, "ratio_training_chain", 0.95,
                           above=True))
    return lines + [""]


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    p.add_argument("--size", choices=["tiny", "real"], help="default: real on CUDA, tiny on CPU")
    p.add_argument("--models", nargs="+", choices=list(ARCHITECTURES), help="default: sd15 sdxl (real), sd15 (tiny)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--steps", type=int, help="sampling steps; default 50 (real), 10 (tiny)")
    p.add_argument("--resolution", type=int, help="image size; default 512 SD1.5, 768 SD2, 1024 SDXL, 64 tiny")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sampling-repeats", type=int, default=7,
                   help="rounds of the no-grad sampling comparison (cheap, and its 0.95 target needs a tight median)")
    p.add_argument("--no-checkpointing", action="store_true", help="train without recomputation (more memory)")
    p.add_argument("--accounting", nargs="*", choices=list(SETUPS), help="tensor accounting (bench/accounting.py) "
                   "of a DRaFT-LV step at real size for these configurations; default with --size real: all")
    p.add_argument("--no-timing", action="store_true", help="only the tensor accounting")
    p.add_argument("--accounting-from", type=pathlib.Path,
                   help="take the accounting from this results JSON instead of computing it (on CUDA, default: "
                        "bench/results/speed_real_cpu.json, compared with torch.cuda.max_memory_allocated)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (1 gives steadier timings on a shared machine)")
    p.add_argument("--out", type=pathlib.Path, default=REPO / "bench" / "results")
    p.add_argument("--name", help="file stem; default speed (CUDA) or speed_cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.size = args.size or ("real" if device.type == "cuda" else "tiny")
    args.models = args.models or (["sd15", "sdxl"] if args.size == "real" else ["sd15"])
    args.steps = args.steps or (50 if args.size == "real" else 10)
    args.name = args.name or ("speed" if device.type == "cuda" else "speed_real_cpu" if args.size == "real" else "speed_cpu")
    missing = [m for m in args.models if m not in RESOLUTION[args.size]]
    if missing:
        p.error(f"--size {args.size} has no {', '.join(missing)} model (tiny models exist for sd15 only)")

    if args.threads:
        torch.set_num_threads(args.threads)
    boot_comfyui(device)
    import comfy.model_management
    from comfyui_version import __version__ as comfyui_version
    results = {"env": {"device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)",
                       "torch": torch.__version__, "comfyui": comfyui_version, "python": platform.python_version(),
                       "comfy_vram_state": comfy.model_management.vram_state.name},
               "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()}, "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    previous = args.out / f"{args.name}.json"
    if args.no_timing and previous.exists():  # keep the timings of an earlier run, replace the accounting
        results["models"] = json.loads(previous.read_text())["models"]

    def write():
        (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
        (args.out / f"{args.name}.md").write_text(markdown(results))

    print(f"{results['env']['device_name']}, torch {torch.__version__}, ComfyUI {comfyui_version}; "
          f"{args.size} models {args.models}, {args.steps} steps", flush=True)
    cpu_accounting = REPO / "bench" / "results" / "speed_real_cpu.json"
    if args.accounting_from is None and device.type == "cuda" and args.size == "real" and cpu_accounting.exists():
        args.accounting_from = cpu_accounting
    if args.accounting is None:
        args.accounting = list(SETUPS) if args.size == "real" and args.accounting_from is None else []
    results["args"]["accounting"] = args.accounting
    if args.accounting_from:
        results["args"]["accounting_from"] = str(args.accounting_from)
        results["accounting"] = json.loads(args.accounting_from.read_text()).get("accounting", [])
    elif args.accounting:
        results["accounting"] = []
        for name in args.models:
            for config in args.accounting:
                results["accounting"].append(account_setup(name, config))
                write()
    reward = aesthetic_reward(args.size)
    for name in [] if args.no_timing else args.models:
        benchmark_model(name, args, device, reward, results, write)
    write()
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
