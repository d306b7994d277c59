"""Command line: `python -m comfy_draft train ...` with a local diffusers pipeline (no hub)."""
import argparse
import dataclasses
import json
import os
import sys

from .trainer import VARIANTS, TrainConfig, Trainer

TRAIN_DEFAULTS = TrainConfig(prompts=[""])


def load_pipeline(path, config=None, device=None):
    """A StableDiffusionPipeline (SD1.x / SD2.x) from a local folder or a single-file checkpoint."""
    import torch
    from diffusers import StableDiffusionPipeline

    if os.path.isdir(path):
        pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
    elif os.path.isfile(path):
        try:
            pipe = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True,
                                                            safety_checker=None, requires_safety_checker=False)
        except Exception as e:  # diffusers wants the model's config folder, which it would otherwise download
            raise SystemExit(f"could not load {path} as a single-file SD1.x/SD2.x checkpoint without the hub "
                             f"({e}); pass --config with a local diffusers folder of the same model type") from e
    else:
        raise SystemExit(f"model not found: {path}")
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_reward(args):
    from . import rewards
    if args.reward in rewards.BUILTIN_REWARDS:
        return rewards.builtin_reward(args.reward)
    if not args.reward_file:
        raise SystemExit(f"--reward {args.reward} needs --reward-file")
    return rewards.load_reward(args.reward, args.reward_file, args.reward_clip, args.reward_text, not args.minimize)


def train_parser(sub):
    p = sub.add_parser("train", help="train a DRaFT LoRA on a reward",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers folder or single-file SD1.x/SD2.x checkpoint")
    p.add_argument("--config", help="local diffusers folder describing a single-file checkpoint")
    p.add_argument("--out", required=True, help="LoRA file to write (kohya .safetensors); also <out>.ckpt, <out>.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing LoRA file")
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt (same settings)")
    p.add_argument("--init-lora", help="start from this kohya LoRA file (same rank and targets)")
    p.add_argument("--reward", required=True, help="a built-in reward (brightness, saturation, contrast, sharpness, "
                   "compressibility) or a family (aesthetic, hpsv2, pickscore, clip_similarity, imagenet_classifier)")
    p.add_argument("--reward-file", help="the reward's weights file or folder")
    p.add_argument("--reward-clip", help="aesthetic: the CLIP ViT-L/14 tower")
    p.add_argument("--reward-text", default="", help="clip_similarity: target text; imagenet_classifier: classes")
    p.add_argument("--minimize", action="store_true", help="imagenet_classifier: push away from the classes")
    p.add_argument("--prompts", nargs="+", help="training prompts")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--variant", choices=VARIANTS, default=TRAIN_DEFAULTS.variant)
    p.add_argument("--k", dest="grad_steps", type=int, default=TRAIN_DEFAULTS.grad_steps, help="draft-k: K")
    p.add_argument("--lv-samples", type=int, default=TRAIN_DEFAULTS.lv_samples, help="draft-lv: n")
    for name in ("steps", "sampling_steps", "width", "height", "batch_size", "accumulation", "rank", "seed",
                 "save_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(TRAIN_DEFAULTS, name))
    for name in ("cfg", "lr", "weight_decay", "max_grad_norm", "kl_coef"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(TRAIN_DEFAULTS, name))
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank)")
    p.add_argument("--resnet-loras", action="store_true", help="also adapt ResNet convolutions")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="keep activations instead of recomputing them (faster, more memory)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")


def train(args):
    from .backends.diffusers import TrainingBackend
    from .lora import load_kohya_file

    prompts = list(args.prompts or [])
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    config = TrainConfig(prompts=prompts, **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                                             if f.name != "prompts"})
    config.validate()
    if os.path.exists(args.out) and not (args.overwrite or args.resume):
        raise SystemExit(f"{args.out} exists: pass --overwrite to replace it or --resume to continue")
    backend = TrainingBackend.from_pipeline(load_pipeline(args.model, args.config, args.device))
    checkpoint, log_path = args.out + ".ckpt", os.path.splitext(args.out)[0] + ".jsonl"
    log = open(log_path, "a" if args.resume else "w")

    def report(metrics, images):
        log.write(json.dumps(metrics) + "\n")
        log.flush()
        print(f"step {metrics['step']}/{config.steps}  reward {metrics['reward']:.4f}  "
              f"grad norm {metrics['grad_norm']:.3g}  {metrics['seconds']:.2f}s", flush=True)

    trainer = Trainer(backend, build_reward(args), config, [report], checkpoint_path=checkpoint)
    if args.resume:
        trainer.load_checkpoint(checkpoint)
    elif args.init_lora:
        trainer.loras.load_kohya_state_dict(load_kohya_file(args.init_lora)[0], args.init_lora)
    try:
        trainer.train()
    except KeyboardInterrupt:
        partial = os.path.splitext(args.out)[0] + f".partial-{trainer.step}.safetensors"
        trainer.save_lora(partial, overwrite=True)
        print(f"interrupted at step {trainer.step}: LoRA saved as {partial}; resume with --resume", file=sys.stderr)
        raise SystemExit(130)
    finally:
        log.close()
    trainer.save_lora(args.out, overwrite=True)
    print(f"LoRA written to {args.out} (log {log_path}, checkpoint {checkpoint})")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m comfy_draft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser(sub)
    from . import demo
    demo.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args)
    elif args.command == "demo":
        demo.run(args)
