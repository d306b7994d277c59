"""One-call GPU check (issue 13): the pack inside the real ComfyUI server on a CUDA machine, then bench/speed.py.

1. Installs the bundle (scripts/gpu_bundle.py: wheels the device lacks, stubs, the ComfyUI tree) into --work.
2. Writes random real-size SD1.5 and SDXL checkpoints (bench/fixtures.py) and a random LAION aesthetic reward
   (MLP .pth + a CLIP ViT-L/14 clip_vision tower) into a ComfyUI base directory that links this repository.
3. Boots ComfyUI's main.py with its default flags (so DynamicVRAM is on where comfy-aimdo works) and, through
   POST /prompt: DRaFTTrainLoRA, 3 DRaFT-LV steps, 20 sampling steps, batch 1, on SD1.5 at 512 and SDXL at
   1024; then each saved LoRA through LoraLoaderModelOnly into DRaFTDDIMSampler, next to the base model
   (the latents must differ, be finite, and the log must not say "lora key not loaded").
4. Runs bench/speed.py on both models (draft-lv, 50 steps; --speed-args to change), which compares each step's
   torch.cuda.max_memory_allocated with the CPU tensor accounting of the same configuration
   (bench/results/speed_real_cpu.json, issue 14) and reports the ratio ("accounting_ratio").
Step times come from the node's comfy_draft.train_step websocket events; peak GPU memory from NVML (or
nvidia-smi) polling of the whole GPU's memory.used, per phase, minus the reading before the server started.
Results: <out>/gpu_check.json and .md, speed.py's as <out>/gpu_check_speed.*, the server log as
<out>/gpu_check_server.log. Exits 1 on any failure, printing the server log's tail.

On the device (one call; the bundle is git-ignored, so it is carried):
    run(command='PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT', carry=['.gpu_bundle'], timeout_s=600)

Here, first: .venv/bin/python scripts/gpu_bundle.py && .venv/bin/python bench/gpu_check.py --dry-run
--dry-run is the same flow on this CPU: ComfyUI with --cpu, the tests' tiny SD1.5 checkpoint and a tiny CLIP
reward at 64x64, 4 sampling steps, SD1.5 only, speed.py's tiny size. The bundle's wheels are installed (for
Python 3.12, as on the device) but not used; its stubs and ComfyUI tree are, and an import guard makes the
server and speed.py fail on any package that is neither in the device's package list nor in the bundle.
"""
import argparse
import asyncio
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import uuid

REPO = pathlib.Path(__file__).resolve().parents[1]
MLP_FILE, CLIP_FILE = "sac+logos+ava1-l14-linearMSE.pth", "clip_vision_l.safetensors"
PROMPTS = "a lighthouse on a cliff at dusk, oil painting\na red fox in fresh snow, photograph"
# The published CLIP ViT-L/14 image tower in ComfyUI's clip_vision layout (transformers names).
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
               patch_size=14, projection_dim=768, hidden_act="quick_gelu")
GPU = dict(models={"sd15": 512, "sdxl": 1024}, sampling_steps=20, budget_s=480,
           speed_args='--models sd15 sdxl --variants "draft-lv (n=2)" --steps 50 --warmup 1 --repeats 2 '
                      '--sampling-repeats 3')
DRY = dict(models={"sd15": 64}, sampling_steps=4, budget_s=1200,
           speed_args='--device cpu --size tiny --models sd15 --variants "draft-lv (n=2)" --steps 2 --resolution 32 '
                      '--warmup 0 --repeats 1 --sampling-repeats 1')
# Python 3.12 wheels installed from another Python (the dry run): tags to accept.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64"]

GUARD = '''# Written by bench/gpu_check.py --dry-run: packages the device lacks fail to import, as they would there.
import importlib.abc, importlib.machinery, importlib.metadata, os, re, sys


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_dependencies(names):
    """Here, with what they require here (not for extras): the device has its versions' own dependencies."""
    requires = {_norm(d.metadata["Name"]): d.requires or [] for d in importlib.metadata.distributions()}
    todo, seen = list(names), set(names)
    while todo:
        for r in requires.get(todo.pop(), []):
            dep = _norm(re.match(r"[A-Za-z0-9._-]+", r).group())
            if "extra ==" not in r and dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


_ALLOWED = _with_dependencies(os.environ["GPU_CHECK_ALLOWED"].split(","))
_OWN = [p for p in os.environ["GPU_CHECK_OWN"].split(os.pathsep) if p]
_PROVIDERS = importlib.metadata.packages_distributions()


class _DeviceGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        dists = _PROVIDERS.get(name) if "." not in name else None
        if not dists or any(_norm(d) in _ALLOWED for d in dists):
            return None
        if importlib.machinery.PathFinder.find_spec(name, _OWN):  # a stub of the bundle
            return None
        raise ModuleNotFoundError(f"No module named {name!r} on the device (from {dists[0]}; not in the bundle)",
                                  name=name)


sys.meta_path.insert(0, _DeviceGuard())
'''


class Failure(Exception):
    pass


# ----- environment -----------------------------------------------------------------------------------
def install_bundle(bundle, work):
    """pip-install the bundle's wheels into work/site, unpack ComfyUI into work/; returns (site, stubs, comfy)."""
    site, wheels = work / "site", sorted(str(w) for w in (bundle / "wheels").glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check", "--target", str(site)]
    if sys.version_info[:2] != (3, 12):  # the device's Python; never installs into this environment
        cmd += ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
        cmd += [f"--platform={p}" for p in PLATFORMS]
    subprocess.run(cmd + wheels, check=True)
    with tarfile.open(bundle / "ComfyUI.tar.gz") as tar:
        tar.extractall(work, filter="data")
    print(f"[gpu_check] installed {len(wheels)} wheels into {site}; ComfyUI into {work / 'ComfyUI'}", flush=True)
    return site, bundle / "stubs", work / "ComfyUI"


def python_path(bundle, work, dry_run):
    """PYTHONPATH entries for ComfyUI and speed.py: the bundle's packages (device), or on this CPU the
    import guard and the stubs over .venv (its cp312 wheels cannot load here)."""
    if bundle is None:
        return [], REPO / ".cache" / "comfyui" / "ComfyUI"
    site, stubs, comfy = install_bundle(bundle, work)
    if not dry_run:
        return [str(site), str(stubs)], comfy
    manifest = json.loads((bundle / "manifest.json").read_text())
    carried = [re.sub(r"[-_.]+", "-", p.split("==")[0]).lower() for p in manifest["pins"]]
    (work / "guard").mkdir()
    (work / "guard" / "sitecustomize.py").write_text(GUARD)
    os.environ["GPU_CHECK_ALLOWED"] = ",".join(manifest["device_packages"] + carried + ["comfy-draft"])
    os.environ["GPU_CHECK_OWN"] = str(stubs)
    return [str(work / "guard"), str(stubs)], comfy


# ----- models ----------------------------------------------------------------------------------------
def write_models(base, dry_run, device):
    """Checkpoints (links to cached files) and the aesthetic reward's two files in the base directory."""
    import fixtures
    import tiny_clip
    import torch
    from safetensors.torch import save_file
    if dry_run:
        from tiny_models import tiny_sd15_checkpoint
        checkpoints = {"sd15": tiny_sd15_checkpoint(seed=0)}
        tower, width = tiny_clip.hf_clip_vision_model(seed=5), 32
        sd = dict(tower.state_dict())
    else:
        checkpoints = {name: fixtures.random_checkpoint(name, device) for name in GPU["models"]}
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
        with torch.device("meta"):  # names and shapes; the checkpoints' seeded noise fills them
            shapes = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_L14)).state_dict()
        generator = torch.Generator(device).manual_seed(0)
        sd, width = {k: fixtures.random_tensor(k, v, generator).contiguous() for k, v in shapes.items()}, 768
    rewards = base / "models" / "reward_models"
    rewards.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(rewards / CLIP_FILE))
    tiny_clip.write_aesthetic_mlp(rewards / MLP_FILE, tiny_clip.aesthetic_mlp(width, seed=6))
    names = {}
    for name, path in checkpoints.items():
        link = base / "models" / "checkpoints" / path.name
        link.symlink_to(path)
        names[name] = path.name
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return names


# ----- observing the server --------------------------------------------------------------------------
class MemoryPoller(threading.Thread):
    """Samples used device memory (MiB): NVML or nvidia-smi for the whole GPU, else the server's RSS (CPU)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.pid, self.stopped = [], None, threading.Event()
        try:
            import pynvml  # nvidia-ml-py, on the device
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.read, self.source, self.every = self.nvml, "NVML memory.used of the whole GPU", 0.05
        except Exception:
            if shutil.which("nvidia-smi"):
                self.read, self.source, self.every = self.nvidia_smi, "nvidia-smi memory.used of the whole GPU", 0.25
            else:
                self.read, self.source, self.every = self.rss, "RSS of the server process (no GPU)", 0.25

    def nvml(self):
        import pynvml
        return pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2 ** 20

    @staticmethod
    def nvidia_smi():
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])

    def rss(self):
        import psutil
        if self.pid is None:
            return 0.0
        proc = psutil.Process(self.pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2 ** 20

    def run(self):
        while not self.stopped.wait(self.every):
            try:
                self.samples.append((time.time(), self.read()))
            except Exception:
                pass

    def peak(self, start, end=None):
        values = [v for t, v in self.samples if t >= start and (end is None or t <= end)]
        return round(max(values)) if values else None


class Events(threading.Thread):
    """The server's websocket messages (JSON ones), through aiohttp (on the device; websocket-client is not)."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.client_id, self.port, self.items, self.ready = str(uuid.uuid4()), port, [], threading.Event()

    def run(self):
        asyncio.run(self.listen())

    async def listen(self):
        import aiohttp
        url = f"http://127.0.0.1:{self.port}/ws?clientId={self.client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
            self.ready.set()
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self.items.append(json.loads(message.data))

    def of(self, kind, since=0):
        return [e["data"] for e in self.items[since:] if e.get("type") == kind]


# ----- prompts ---------------------------------------------------------------------------------------
def train_prompt(server, ckpt, res, steps, name):
    """DRaFTTrainLoRA with every required input (defaults from /object_info), DRaFT-LV, 3 steps, batch 1."""
    info = server.get("/object_info/DRaFTTrainLoRA")["DRaFTTrainLoRA"]["input"]["required"]
    inputs = {}
    for key, spec in info.items():
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if "default" in options:
            inputs[key] = options["default"]
        elif isinstance(spec[0], list) and spec[0]:
            inputs[key] = spec[0][0]
    links = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward": ["2", 0]}
    inputs.update(links, prompts=PROMPTS, variant="draft-lv", training_steps=3, sampling_steps=steps, width=res,
                  height=res, batch_size=1, seed=0, lora_name=f"gpu_check/{name}")  # default options: n = 2
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "DRaFTRewardLoader", "inputs": {"family": "aesthetic", "file": MLP_FILE,
                                                                "clip_file": CLIP_FILE, "text": "", "maximize": True}},
            "3": {"class_type": "DRaFTTrainLoRA", "inputs": inputs}}


def lora_prompt(ckpt, lora, res, steps, name):
    """The base model and the base + LoRA (LoraLoaderModelOnly), sampled alike by DRaFTDDIMSampler."""
    common = {"positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": 1, "steps": steps,
              "cfg": 7.5}
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                                  "strength_model": 1.0}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPTS.splitlines()[0], "clip": ["1", 1]}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": res, "height": res, "batch_size": 1}},
            "6": {"class_type": "DRaFTDDIMSampler", "inputs": dict(common, model=["1", 0])},
            "7": {"class_type": "DRaFTDDIMSampler", "inputs": dict(common, model=["2", 0])},
            "8": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"gpu_check/{name}"}},
            "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"gpu_check/{name}"}}}


def run_prompt(server, prompt, client_id, timeout):
    try:
        prompt_id = server.queue(prompt, client_id)
    except urllib.error.HTTPError as e:  # validation errors come back as a 400 with a JSON body
        raise Failure(f"POST /prompt refused: {e.read().decode(errors='replace')[:3000]}") from None
    entry = server.wait_history(prompt_id, timeout=max(timeout, 1))
    if entry["status"]["status_str"] != "success":
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        e = errors[0] if errors else entry["status"]
        raise Failure(f"prompt failed: {e.get('node_type')}: {e.get('exception_message')}" if errors else str(e))
    return entry


def saved_latent(base, entry, node):
    from safetensors.torch import load_file
    (info,) = entry["outputs"][node]["latents"]
    return load_file(str(base / "output" / info["subfolder"] / info["filename"]))["latent_tensor"].float()


# ----- the check -------------------------------------------------------------------------------------
def check_model(name, ckpt, res, cfg, server, events, memory, deadline, result):
    base = server.base_dir
    started, since, log_start = time.time(), len(events.items), len(server.log())
    print(f"[gpu_check] {name}: DRaFTTrainLoRA, draft-lv, 3 steps at {res}x{res}", flush=True)
    entry = run_prompt(server, train_prompt(server, ckpt, res, cfg["sampling_steps"], name), events.client_id,
                       deadline - time.time())
    steps = events.of("comfy_draft.train_step", since)
    text = entry["outputs"]["3"]["text"][0]
    lora = text.split(": reward")[0]
    estimate = re.findall(r"DRaFT: (estimated peak memory.*)", server.log()[log_start:])
    train = result["train"] = {"seconds": round(time.time() - started, 2), "lora": lora, "node_text": text,
                               "step_seconds": [round(s["seconds"], 3) for s in steps],
                               "rewards": [s.get("reward") for s in steps], "memory_estimate": estimate[-1:],
                               "peak_mib": memory.peak(started)}
    print(f"  {text}\n  step seconds {train['step_seconds']}, peak {train['peak_mib']} MiB, "
          f"{'; '.join(estimate[-1:])}", flush=True)
    if len(steps) != 3:
        raise Failure(f"{name}: expected 3 comfy_draft.train_step events, got {len(steps)}")

    started, log_start = time.time(), len(server.log())
    entry = run_prompt(server, lora_prompt(ckpt, lora, res, cfg["sampling_steps"], name), None, deadline - time.time())
    base_latent, lora_latent = saved_latent(base, entry, "8"), saved_latent(base, entry, "9")
    not_loaded = server.log()[log_start:].count("lora key not loaded")
    effect = ((lora_latent - base_latent).abs().max() / base_latent.abs().max()).item()
    result["lora_roundtrip"] = r = {"seconds": round(time.time() - started, 2), "lora_keys_not_loaded": not_loaded,
                                    "finite": bool(lora_latent.isfinite().all()), "relative_effect": effect,
                                    "peak_mib": memory.peak(started)}
    print(f"  LoraLoaderModelOnly round trip: max |LoRA - base| / max |base| = {effect:.2e}, "
          f"{not_loaded} 'lora key not loaded', peak {r['peak_mib']} MiB", flush=True)
    if not_loaded or not r["finite"] or not effect > 0:
        raise Failure(f"{name}: LoRA round trip: {not_loaded} keys not loaded, finite {r['finite']}, effect {effect}")


def run_speed(args, cfg, env, out, deadline):
    cmd = [sys.executable, str(REPO / "bench" / "speed.py"), *shlex.split(args.speed_args or cfg["speed_args"]),
           "--out", str(out), "--name", "gpu_check_speed"]
    print(f"[gpu_check] {shlex.join(cmd[1:])}", flush=True)
    started, result = time.time(), {}
    try:
        result["returncode"] = subprocess.run(cmd, env=env, timeout=max(deadline - time.time(), 1)).returncode
    except subprocess.TimeoutExpired:
        result["returncode"] = "timeout"
    result["seconds"] = round(time.time() - started, 1)
    path = out / "gpu_check_speed.json"
    if path.exists():  # rewritten after every configuration, so a cut run still has its first models
        for name, m in json.loads(path.read_text())["models"].items():
            s, variants = m.get("sampling"), m.get("variants", {})
            result[name] = {"ksampler_over_ours": s.get("ratio") if isinstance(s, dict) else s,
                            **{v: r if r == "OOM" else {k: r.get(k) for k in ("step_s", "overhead_ratio", "peak_gb",
                                                                                "checkpointing", "accounting_ratio")}
                               for v, r in variants.items()}}
    return result


def markdown(results):
    def net(mib):  # peak minus what was used before the server started
        return "n/a" if mib is None else mib - results["baseline_mib"]
    lines = [f"# GPU check ({results['mode']})", "",
             f"{results['device']}; torch {results['torch']}; ComfyUI {results['comfyui']}; DynamicVRAM: "
             f"{results.get('dynamic_vram')}; {results['total_s']} s in all. Memory: {results['memory_source']}, peak "
             f"minus {results['baseline_mib']} MiB used before the server started.", "",
             *[f"    {line}" for line in results.get("comfy_log", [])], "",
             "| model | train s | step s | peak MiB (train) | estimate | LoRA round trip | peak MiB (sampling) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        t, r = m.get("train", {}), m.get("lora_roundtrip", {})
        trip = (f"{r['lora_keys_not_loaded']} keys not loaded, effect {r['relative_effect']:.1e}" if r else "n/a")
        lines.append(f"| {name} {m['resolution']} | {t.get('seconds')} | {t.get('step_seconds')} | "
                     f"{net(t.get('peak_mib'))} | {'; '.join(t.get('memory_estimate', []))} | {trip} | "
                     f"{net(r.get('peak_mib'))} |")
    s = results.get("speed", {})
    lines += ["", f"bench/speed.py: exit {s.get('returncode')}, {s.get('seconds')} s"]
    lines += [f"- {name}: {json.dumps(v)}" for name, v in s.items() if isinstance(v, dict)]
    lines += ["", "Failures: " + ("none" if not results["failures"] else "")] + [f"- {f}" for f in results["failures"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="on this CPU, with tiny models")
    p.add_argument("--bundle", type=pathlib.Path, help="default: .gpu_bundle (required on the device)")
    p.add_argument("--no-bundle", action="store_true", help="dry run with .venv and .cache's ComfyUI as they are")
    p.add_argument("--out", type=pathlib.Path, help="default: bench/results (dry run: <work>/results)")
    p.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/gpu_check"))
    p.add_argument("--speed-args", help="arguments for bench/speed.py (default: see GPU / DRY)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--budget", type=float, help="seconds for the whole check (default 480 GPU, 1200 dry run)")
    args = p.parse_args(argv)
    cfg = DRY if args.dry_run else GPU
    t0 = time.time()
    deadline = t0 + (args.budget or cfg["budget_s"])
    bundle = None if args.no_bundle else (args.bundle or REPO / ".gpu_bundle")
    if bundle is not None and not (bundle / "manifest.json").exists():
        raise SystemExit(f"no bundle at {bundle}: run .venv/bin/python scripts/gpu_bundle.py (or --no-bundle)")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    out = args.out or (args.work / "results" if args.dry_run else REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)

    # Paths before any import of torch: the bundle's typing_extensions must win over the device's.
    paths, comfy_dir = python_path(bundle, args.work, args.dry_run)
    if not args.dry_run:
        sys.path[:0] = paths
    os.environ.update(COMFYUI_DIR=str(comfy_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests")]
    import comfyui_harness as harness
    import fixtures
    import torch
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --dry-run on a CPU")
    fixtures.boot_comfyui(device)  # ComfyUI's modules in this process, to write the checkpoints
    from comfyui_version import __version__ as comfyui_version
    harness.COMFY_FLAGS = ["--disable-api-nodes", "--database-url", "sqlite:///:memory:"]  # main.py's defaults besides
    if args.dry_run:
        harness.COMFY_FLAGS.append("--cpu")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).strip(os.pathsep))

    base = harness.make_base_dir(args.work / "base")
    print(f"[gpu_check] writing models ({time.time() - t0:.0f} s)", flush=True)
    ckpts = write_models(base, args.dry_run, device)
    memory = MemoryPoller()
    memory.start()
    time.sleep(0.5)
    baseline = memory.peak(t0) or 0
    results = {"mode": "dry run, CPU, tiny models" if args.dry_run else "CUDA, real sizes",
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU", "torch": torch.__version__,
               "comfyui": comfyui_version, "python": sys.version.split()[0], "memory_source": memory.source,
               "baseline_mib": baseline, "models": {}, "failures": []}
    server = None
    try:
        print(f"[gpu_check] starting ComfyUI ({time.time() - t0:.0f} s)", flush=True)
        server = harness.ComfyServer(base, extra_env={"PYTHONPATH": env["PYTHONPATH"]})
        memory.pid = server.proc.pid
        server.wait_ready(timeout=max(deadline - time.time(), 1))
        log = re.sub(r"\x1b\[[0-9;]*m", "", server.log())  # without the console's colours
        results["dynamic_vram"] = "DynamicVRAM support detected and enabled" in log
        wanted = r"^(?:\[\w+\] )?((?:Total VRAM|Set vram state|Device:|.*DynamicVRAM|comfy-aimdo|comfy-kitchen).*)$"
        results["comfy_log"] = list(dict.fromkeys(re.findall(wanted, log, re.M)))
        failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and harness.PACK_NAME in line]
        if failed:
            raise Failure(f"the pack failed to import: {failed}")
        print(f"[gpu_check] ComfyUI up ({time.time() - t0:.0f} s): " + "; ".join(results["comfy_log"]), flush=True)
        events = Events(server.port)
        events.start()
        if not events.ready.wait(30):
            raise Failure("no websocket connection to the server")
        for name, res in cfg["models"].items():
            result = results["models"][name] = {"resolution": res}
            try:
                check_model(name, ckpts[name], res, cfg, server, events, memory, deadline, result)
            except Exception as e:  # the next model still runs: one device call should tell all
                results["failures"].append(f"{name}: {type(e).__name__}: {e}")
                print(f"[gpu_check] FAILED {name}: {e}", flush=True)
    except Exception as e:
        results["failures"].append(f"server: {type(e).__name__}: {e}")
    finally:
        if server is not None:
            server.stop()
            shutil.copy(server.log_path, out / "gpu_check_server.log")
    if not args.no_speed:
        started = time.time()
        results["speed"] = run_speed(args, cfg, env, out, deadline)
        results["speed"]["peak_mib"] = memory.peak(started)
        if results["speed"]["returncode"] != 0:
            results["failures"].append(f"bench/speed.py: exit {results['speed']['returncode']}")
    memory.stopped.set()
    results["total_s"] = round(time.time() - t0, 1)
    if results["total_s"] > (args.budget or cfg["budget_s"]):
        results["failures"].append(f"took {results['total_s']} s, over the budget")

    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    (out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))
    if results["failures"]:
        log = (out / "gpu_check_server.log")
        print("----- server log (tail) -----\n" + (log.read_text(errors="replace")[-6000:] if log.exists() else "none"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
