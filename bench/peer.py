"""Side by side with the peer: TRL's AlignProp and DDPO trainers against the pack's trainer, on this machine.

    .venv/bin/python bench/peer.py [--rounds 3] [--steps 12] [--rows alignprop-k1 alignprop-rand ddpo]
                                   [--pack-checkpointing auto|on|blocks|off]

trl 0.12.2 is the last release with `AlignPropTrainer` and `DDPOTrainer`; it runs in its own venv,
.cache/peer-venv (built on first use with the versions in PEER, the project's torch pinned by constraints.txt so
that nothing pulls a CUDA build). Both systems train LoRA rank 4 (alpha 4) on the q/k/v/out projections of one tiny
SD1.5-architecture pipeline with random weights (saved once under .cache/bench/peer/), with the same prompt, reward,
DDIM schedule, sampling steps, cfg, batch, learning rate and gradient clipping. Each (system, row) runs in a fresh
process, and the systems alternate within each round. Per run: seconds per optimizer step (median over the steps
after the first), reward queries per second, the peak of live tensor bytes over one step (`memory.LiveBytes`, both
systems, so device-independent) and the process's peak RSS, and the reward of fixed-noise eta-0 samples (the same
noise for both) before and after training: the reward gained per query. Writes bench/results/peer_cpu.{md,json}
(`--out`).

Rows: alignprop-k1 (TRL: truncated_backprop_rand=False, the last step differentiated; the pack: draft-k, K = 1),
alignprop-rand (TRL: truncated_backprop_rand over (0, T); the pack: alignprop), ddpo (TRL: DDPOTrainer; the pack:
ddpo). The pack runs at its defaults (gradient checkpointing "auto": `--pack-checkpointing` sets it; precision
"auto"); TRL at its own (it recomputes each UNet call, AlignProp always, DDPO never), except
where a setting is shared (mixed precision "no": fp32 on the CPU as the pack's "auto"; DDIM eta 0 for AlignProp's
samples, as the pack's sampler; no checkpoint saving every epoch). The differences that remain are listed with the
results in the README ("Against the peer").
"""
import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
PEER_VENV = REPO / ".cache" / "peer-venv"
PIPELINE = REPO / ".cache" / "bench" / "peer" / "pipeline"
PEER = ["trl==0.12.2", "diffusers==0.32.2", "transformers==4.46.3", "peft==0.13.2", "accelerate==1.1.1"]
PROMPT = "a photograph of a lighthouse at dusk"
SETTINGS = dict(sampling_steps=20, cfg=5.0, size=64, batch=2, lr=1e-3, rank=4, max_grad_norm=1.0, seed=0)
EVAL_SAMPLES = 4
ROWS = ("alignprop-k1", "alignprop-rand", "ddpo")


class Reward(torch.nn.Module):
    """The shared reward: a seeded random conv net on the image (a stand-in for an aesthetic model: smooth,
    differentiable, in (0, 1)), built identically by both venvs' torch."""

    name = "peer_bench"
    differentiable = True

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.conv1 = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(32, 1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * (1 / max(1, p[0].numel()) ** 0.5)
        self.requires_grad_(False)

    def forward(self, images, prompts=None):
        h = torch.nn.functional.silu(self.conv1(images * 2 - 1))
        h = torch.nn.functional.silu(self.conv2(h)).mean((2, 3))
        return torch.sigmoid(self.head(h)).flatten()


def eval_noise(pipeline_latent_side):
    return torch.randn(EVAL_SAMPLES, 4, pipeline_latent_side, pipeline_latent_side,
                       generator=torch.Generator().manual_seed(99))


def write_bpe(folder):
    """CLIP's BPE vocabulary (open_clip's bundled copy) as a CLIPTokenizer's vocab.json and merges.txt."""
    from open_clip.tokenizer import SimpleTokenizer
    simple = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({names.get(t, t): i for t, i in simple.encoder.items()}))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def build_pipeline(bpe):
    """The shared pipeline: SD1.5's architecture in miniature (CLIP text encoder and tokenizer, a UNet with
    cross-attention at two levels, a VAE with a 4x latent), random weights, SD1.5's DDIM scheduler. Written by the
    peer's venv: its transformers 4.46 cannot read the text encoder and tokenizer files that the project's
    transformers 5 writes, while 5 reads 4.46's."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_diffusers import sd_scheduler
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=SETTINGS["size"])
    with torch.no_grad():  # diffusers zero-inits the output conv: make the model depend on its input
        unet.conv_out.weight.normal_(0, 0.05)
    tokenizer = CLIPTokenizer(str(bpe / "vocab.json"), str(bpe / "merges.txt"), model_max_length=77,
                              pad_token="<|endoftext|>")
    pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=encoder.eval(), tokenizer=tokenizer,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(PIPELINE)


def ensure_peer_venv():
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"),
                        "torch==2.13.0", *PEER], check=True)
    return python


# ----- the two systems, each in its own process -----------------------------------------------------------------

def peak_step_bytes(step):
    sys.path.insert(0, str(REPO))
    from comfy_draft.memory import LiveBytes
    with LiveBytes() as live:
        step()
    return live.peak


def run_pack(row, steps, checkpointing="auto"):
    sys.path.insert(0, str(REPO))
    from comfy_draft.loading import load_backend
    from comfy_draft.sampling import sample_ddim
    from comfy_draft.trainer import TrainConfig, Trainer
    s = SETTINGS
    variant = {"alignprop-k1": "draft-k", "alignprop-rand": "alignprop", "ddpo": "ddpo"}[row]
    backend = load_backend(str(PIPELINE), device="cpu")
    reward = Reward()
    config = TrainConfig(prompts=[PROMPT], variant=variant, grad_steps=1, steps=steps + 2,
                         sampling_steps=s["sampling_steps"], cfg=s["cfg"], width=s["size"], height=s["size"],
                         batch_size=s["batch"], lr=s["lr"], rank=s["rank"], alpha=s["rank"],
                         max_grad_norm=s["max_grad_norm"], seed=s["seed"],
                         gradient_checkpointing={"on": True, "off": False}.get(checkpointing, checkpointing))
    trainer = Trainer(backend, reward, config)
    trainer.memory_estimate()  # as a run starts: the checkpointing chosen

    def evaluate():
        noise = eval_noise(s["size"] // 4)
        out = {}

        def fn(model, x, sigmas):
            x0 = sample_ddim(model, x, sigmas)
            out["reward"] = reward(backend.decode(x0, False), None).mean().item()
            return x0
        with torch.no_grad():
            backend.run(fn, [PROMPT] * EVAL_SAMPLES, "", s["cfg"], noise, s["sampling_steps"])
        return out["reward"]
    return measure(trainer.train_step, evaluate, steps,
                   extra={"gradient_checkpointing": trainer.gradient_checkpointing_reason})


def run_trl(row, steps):
    import trl
    s = SETTINGS
    pipeline = trl.DefaultDDPOStableDiffusionPipeline(str(PIPELINE), use_lora=True)
    reward = Reward()

    def reward_fn(images, prompts, metadata):
        return reward(images), {}

    def prompt_fn():
        return PROMPT, {}
    common = dict(mixed_precision="no", seed=s["seed"], sample_num_steps=s["sampling_steps"],
                  sample_guidance_scale=s["cfg"], train_batch_size=s["batch"], train_learning_rate=s["lr"],
                  train_max_grad_norm=s["max_grad_norm"], save_freq=10 ** 9, log_with=None)
    if row == "ddpo":
        config = trl.DDPOConfig(**common, sample_batch_size=s["batch"], sample_num_batches_per_epoch=1,
                                train_num_inner_epochs=1, train_timestep_fraction=1.0)
        trainer = trl.DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    else:
        rand = row == "alignprop-rand"
        config = trl.AlignPropConfig(**common, sample_eta=0.0, truncated_backprop_rand=rand,
                                     truncated_backprop_timestep=s["sampling_steps"] - 1,
                                     truncated_rand_backprop_minmax=(0, s["sampling_steps"]))
        trainer = trl.AlignPropTrainer(config, reward_fn, prompt_fn, pipeline)
    sd = pipeline.sd_pipeline
    sd.set_progress_bar_config(disable=True)
    epoch = [0]

    def step():
        trainer.step(epoch[0], epoch[0])
        epoch[0] += 1

    def evaluate():
        ids = sd.tokenizer([PROMPT] * EVAL_SAMPLES, return_tensors="pt", padding="max_length", truncation=True,
                           max_length=sd.tokenizer.model_max_length).input_ids
        neg = sd.tokenizer([""] * EVAL_SAMPLES, return_tensors="pt", padding="max_length", truncation=True,
                           max_length=sd.tokenizer.model_max_length).input_ids
        with torch.no_grad():
            out = pipeline(prompt_embeds=sd.text_encoder(ids)[0], negative_prompt_embeds=sd.text_encoder(neg)[0],
                           num_inference_steps=s["sampling_steps"], guidance_scale=s["cfg"], eta=0.0,
                           output_type="pt", latents=eval_noise(s["size"] // 4))
            return reward(out.images).mean().item()
    return measure(step, evaluate, steps)


def measure(step, evaluate, steps, extra=None):
    before = evaluate()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    after = evaluate()
    peak = peak_step_bytes(step)
    return dict(extra or {}, before=before, after=after, seconds=seconds,
                rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, tensor_peak_bytes=peak)


# ----- the comparison ---------------------------------------------------------------------------------------------

def one_run(system, row, steps, checkpointing):
    python = ensure_peer_venv() if system == "trl" else sys.executable
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    done = subprocess.run([str(python), __file__, "worker", system, row, str(steps), checkpointing],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"{system} {row} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs):
    """Per system: median seconds per step (steps after the first), queries/s, reward gain per query, memory."""
    per_step = statistics.median(t for r in runs for t in r["seconds"][1:])
    queries = SETTINGS["batch"] * len(runs[0]["seconds"])
    gains = [(r["after"] - r["before"]) / queries for r in runs]
    return dict(seconds_per_step=per_step, queries_per_second=SETTINGS["batch"] / per_step,
                round_seconds=[statistics.median(r["seconds"][1:]) for r in runs],
                gain_per_query=statistics.mean(gains), gains_per_query=gains, before=runs[0]["before"],
                after=[r["after"] for r in runs], tensor_peak_bytes=max(r["tensor_peak_bytes"] for r in runs),
                rss_bytes=max(r["rss_bytes"] for r in runs),
                gradient_checkpointing=runs[0].get("gradient_checkpointing"))


def table(results):
    mib = 2 ** 20
    lines = ["| row | pack s/step | TRL s/step | pack queries/s / TRL's | pack time per step / TRL's (rounds) | "
             "reward gain per query, pack / TRL | tensor peak MiB pack / TRL | peak RSS MiB pack / TRL |",
             "|---|---|---|---|---|---|---|---|"]
    for row, r in results.items():
        p, t = r["pack"], r["trl"]
        rounds = ", ".join(f"{a / b:.2f}" for a, b in zip(p["round_seconds"], t["round_seconds"]))
        lines.append(f"| {row} | {p['seconds_per_step']:.3f} | {t['seconds_per_step']:.3f} | "
                     f"{p['queries_per_second'] / t['queries_per_second']:.2f} | "
                     f"{p['seconds_per_step'] / t['seconds_per_step']:.2f} ({rounds}) | "
                     f"{p['gain_per_query']:.2e} / {t['gain_per_query']:.2e} | "
                     f"{p['tensor_peak_bytes'] / mib:.0f} / {t['tensor_peak_bytes'] / mib:.0f} | "
                     f"{p['rss_bytes'] / mib:.0f} / {t['rss_bytes'] / mib:.0f} |")
    return "\n".join(lines)


def main():
    if sys.argv[1:2] == ["build"]:
        return build_pipeline(pathlib.Path(sys.argv[2]))
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        torch.set_num_threads(int(os.environ.get("PEER_THREADS", torch.get_num_threads())))
        system, row, steps, checkpointing = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        print(json.dumps(run_pack(row, steps, checkpointing) if system == "pack" else run_trl(row, steps)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="training steps per run")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--pack-checkpointing", default="auto", choices=("auto", "on", "blocks", "off"),
                        help="the pack's gradient_checkpointing (auto: its default)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "peer_cpu"))
    args = parser.parse_args()
    python = ensure_peer_venv()
    if not (PIPELINE / "model_index.json").exists():
        write_bpe(PIPELINE.parent / "bpe")
        subprocess.run([str(python), __file__, "build", str(PIPELINE.parent / "bpe")], check=True)
    from fixtures import cpu_name
    runs = {row: {"pack": [], "trl": []} for row in args.rows}
    for i in range(args.rounds):
        for row in args.rows:
            order = ("pack", "trl") if i % 2 == 0 else ("trl", "pack")  # alternate who goes first
            for system in order:
                runs[row][system].append(one_run(system, row, args.steps, args.pack_checkpointing))
                r = runs[row][system][-1]
                print(f"round {i + 1} {row} {system}: {statistics.median(r['seconds'][1:]):.3f} s/step, reward "
                      f"{r['before']:.5f} -> {r['after']:.5f}", flush=True)
    results = {row: {s: summary(r) for s, r in systems.items()} for row, systems in runs.items()}
    heading = (f"Measured {time.strftime('%Y-%m-%d')} on {cpu_name()}, {torch.get_num_threads()} threads; pack: torch "
               f"{torch.__version__}, gradient checkpointing {args.pack_checkpointing}; TRL: {', '.join(PEER)}; "
               f"{args.rounds} alternating rounds of {args.steps} steps; settings {SETTINGS}")
    text = f"{heading}\n\n{table(results)}\n\n" + "".join(
        f"- the pack's {row}: {r['pack']['gradient_checkpointing']}\n" for row, r in results.items())
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": SETTINGS, "peer": PEER, "runs": runs, "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "bench"))
    main()
