"""One-call GPU check (issues 13 and 25): the pack inside the real ComfyUI server on a CUDA machine, in phases that
each have a time budget, with <out>/gpu_check.json (default: $OUT when set) rewritten before the first and after
every phase: versions, each phase's status, seconds and result, and the traceback of any failure, setup included.

Phases (docs/gpu.md gives budgets, the H200 time estimate and how it was made):
  bundle, bundle_constraints (dry run only): build .gpu_bundle/ (scripts/gpu_bundle.py's layout, downloads cached
      in .cache/gpu_bundle/; cp312 manylinux wheels of what the device lacks), check every carried wheel's
      Requires-Dist against the device's versions (DEVICE_VERSIONS, the device's package list) and the call's size.
  install: the bundle's wheels into --work/site, ComfyUI unpacked.  imports: torch, ComfyUI as a library,
      versions.  installed_constraints (device): the carried wheels' requirements against what is installed.
  models: random real-size SD1.5 and SDXL checkpoints (bench/fixtures.py) and an aesthetic-sized CLIP reward.
  server: ComfyUI's main.py with its default flags (DynamicVRAM on where comfy-aimdo initialises; recorded).
  sd15_fp16, sdxl_bf16: through POST /prompt, DRaFTTrainLoRA with a DRaFTTrainingOptions node setting the
      precision (fp16: GradScaler; each step's `skipped` flag recorded), DRaFT-LV, batch 1; then the saved LoRA
      through LoraLoaderModelOnly into DRaFTDDIMSampler next to the base model (finite, different, no
      "lora key not loaded").
  offload: in this process, one step's LoRA gradient with TrainingBackend(..., offload=True) against the fully
      loaded one (OFFLOAD_RTOL).
  speed (only with --speed or --speed-only: a second call): bench/speed.py, repeats 1.
--fail-at PHASE (or GPU_CHECK_FAIL_AT=a,b) raises in that phase, to test the failure path. Exits 1 on any failure.

On the device, one call (docs/gpu.md; the bundle is git-ignored, so it is carried):
    run(command='mkdir -p "$OUT"; PYTHONUNBUFFERED=1 timeout -s INT -k 20 540 python3 bench/gpu_check.py --out "$OUT"
        2>&1 | tee "$OUT/gpu_check.log"; ...', carry=['.gpu_bundle'], timeout_s=600)

Here, first: OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_check.py --dry-run (builds the bundle; --no-bundle
skips it). The same flow on this CPU: ComfyUI with --cpu, the tests' tiny SD1.5 checkpoint for both runs and a
tiny CLIP reward at 64x64, 2 sampling steps. The bundle's wheels are installed (for Python 3.12, as on the
device) but not used; its stubs and ComfyUI tree are, and an import guard makes the server fail on any package
that is neither in the device's package list nor in the bundle.
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
import traceback
import urllib.error
import uuid

REPO = pathlib.Path(__file__).resolve().parents[1]
MLP_FILE, CLIP_FILE = "sac+logos+ava1-l14-linearMSE.pth", "clip_vision_l.safetensors"
PROMPTS = "a lighthouse on a cliff at dusk, oil painting\na red fox in fresh snow, photograph"
# The published CLIP ViT-L/14 image tower in ComfyUI's clip_vision layout (transformers names).
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
               patch_size=14, projection_dim=768, hidden_act="quick_gelu")
# Phase budgets (s): a phase starts only with at least its budget left of the whole check's. Expected H200 times
# (docs/gpu.md: CPU timings of the dry run and of tests/test_real_size.py scaled by FLOP and bandwidth ratios) are
# about half of each; the sum stays under the whole budget, itself well under a device call's 600 s.
GPU = dict(models={"sd15_fp16": {"checkpoint": "sd15", "resolution": 512},
                   "sdxl_bf16": {"checkpoint": "sdxl", "resolution": 1024}},
           runs={"sd15_fp16": "fp16", "sdxl_bf16": "bf16"}, checkpoints=("sd15", "sdxl"),
           training_steps=3, sampling_steps=10, offload={"resolution": 512, "sampling_steps": 3}, budget_s=420,
           phase_budgets=dict(install=40, imports=40, installed_constraints=10, models=90, server=60, sd15_fp16=45,
                              sdxl_bf16=90, offload=45, speed=300),
           speed_args='--models sd15 sdxl --variants "draft-lv (n=2)" --steps 20 --warmup 1 --repeats 1 '
                      '--sampling-repeats 1')
# The dry run: the tests' tiny SD1.5 checkpoint for both runs (fp16 with loss scaling, then bf16) at 64 x 64.
DRY = dict(models={"sd15_fp16": {"checkpoint": "sd15", "resolution": 64},
                   "sdxl_bf16": {"checkpoint": "sd15", "resolution": 64}},
           runs={"sd15_fp16": "fp16", "sdxl_bf16": "bf16"}, checkpoints=("sd15",),
           training_steps=2, sampling_steps=2, offload={"resolution": 64, "sampling_steps": 2}, budget_s=1500,
           phase_budgets=dict(bundle=300, bundle_constraints=20, install=120, imports=120, installed_constraints=20,
                              models=60, server=180, sd15_fp16=300, sdxl_bf16=200, offload=120, speed=300),
           speed_args='--device cpu --size tiny --models sd15 --variants "draft-lv (n=2)" --steps 2 --resolution 32 '
                      '--warmup 0 --repeats 1 --sampling-repeats 1')
# The device's versions (the device tool's KINDS.md, pip list seen 2026-11); the dry run checks every carried
# wheel's Requires-Dist against these, and against the device's package list for the rest.
DEVICE_VERSIONS = {"torch": "2.11.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0", "accelerate": "1.15.0",
                   "safetensors": "0.8.0", "numpy": "2.5.2", "tokenizers": "0.23.2", "torchvision": "0.26.0",
                   "torchaudio": "2.11.0", "sentencepiece": "0.2.2", "triton": "3.6.0", "jaxtyping": "0.3.11",
                   "onnx": "1.23.1", "sentence-transformers": "6.0.1", "tiktoken": "0.14.0"}
OFFLOAD_RTOL = 1e-3  # offloaded vs full-load LoRA gradient: max |difference| <= this x max |gradient| (fp32)
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
        checkpoints = {name: fixtures.random_checkpoint(name, device) for name in GPU["checkpoints"]}
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
def train_prompt(server, ckpt, res, steps, name, precision="auto", training_steps=3):
    """DRaFTTrainLoRA with every required input (defaults from /object_info), DRaFT-LV, batch 1, and a
    DRaFTTrainingOptions node (its defaults, n = 2) that sets the compute precision."""
    info = server.get("/object_info/DRaFTTrainLoRA")["DRaFTTrainLoRA"]["input"]["required"]
    inputs = {}
    for key, spec in info.items():
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if "default" in options:
            inputs[key] = options["default"]
        elif isinstance(spec[0], list) and spec[0]:
            inputs[key] = spec[0][0]
    links = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward": ["2", 0]}
    inputs.update(links, prompts=PROMPTS, variant="draft-lv", training_steps=training_steps, sampling_steps=steps,
                  width=res, height=res, batch_size=1, seed=0, lora_name=f"gpu_check/{name}", options=["4", 0])
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "DRaFTRewardLoader", "inputs": {"family": "aesthetic", "file": MLP_FILE,
                                                                "clip_file": CLIP_FILE, "text": "", "maximize": True}},
            "3": {"class_type": "DRaFTTrainLoRA", "inputs": inputs},
            "4": {"class_type": "DRaFTTrainingOptions", "inputs": options_inputs(server, precision=precision)}}


def options_inputs(server, **values):
    """DRaFTTrainingOptions' inputs: its defaults (from /object_info) with `values`."""
    info = server.get("/object_info/DRaFTTrainingOptions")["DRaFTTrainingOptions"]["input"]
    inputs = {k: spec[1]["default"] for part in ("required", "optional") for k, spec in info.get(part, {}).items()
              if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}
    return dict(inputs, **values)


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


# ----- the check: phases, each with its own time budget, the JSON written after every one -----------------
class Phases:
    """Runs the check's phases in order. Each one is skipped when one it needs failed or when less time is left
    than its budget; a failure's traceback is recorded; <out>/gpu_check.json is rewritten after every phase (and
    before the first), so a call cut short by the device's time limit still returns what it reached."""

    def __init__(self, out, results, deadline, fail_at=()):
        self.out, self.results, self.deadline, self.fail_at = out, results, deadline, set(fail_at)
        self.results.setdefault("phases", {})
        self.results.setdefault("failures", [])
        self.write()

    def write(self):
        self.results["total_s"] = round(time.time() - self.results["started"], 1)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "gpu_check.json")

    def ok(self, name):
        return self.results["phases"].get(name, {}).get("status") == "ok"

    def run(self, name, budget_s, fn, needs=()):
        phase = self.results["phases"][name] = {"budget_s": budget_s}
        missing = [n for n in needs if not self.ok(n)]
        left = self.deadline - time.time()
        if missing:
            phase["status"] = f"skipped: needs {', '.join(missing)}"
        elif left < budget_s:
            phase["status"] = f"skipped: {left:.0f} s left of the check's budget, the phase has {budget_s} s"
        else:
            print(f"[gpu_check] phase {name} (budget {budget_s} s, {left:.0f} s left)", flush=True)
            started = time.time()
            phase["status"] = "running"
            self.write()
            try:
                if name in self.fail_at:
                    raise RuntimeError(f"injected failure in phase {name!r} (--fail-at / GPU_CHECK_FAIL_AT)")
                value = fn()
                if value is not None:
                    phase["result"] = value
                phase["status"] = "ok"
            except BaseException as e:  # KeyboardInterrupt and SystemExit too: the JSON must say where it stopped
                phase["status"] = "failed"
                phase["traceback"] = traceback.format_exc()
                self.results["failures"].append(f"{name}: {type(e).__name__}: {e}")
                print(f"[gpu_check] FAILED {name}:\n{phase['traceback']}", flush=True)
                if not isinstance(e, Exception):
                    phase["seconds"] = round(time.time() - started, 2)
                    self.write()
                    raise
            phase["seconds"] = round(time.time() - started, 2)
            if phase["seconds"] > budget_s:
                phase["over_budget"] = True
        if not phase["status"].startswith(("ok", "running")):
            print(f"[gpu_check] phase {name}: {phase['status']}", flush=True)
        self.write()
        return self.ok(name)


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_metadata(path):
    import zipfile
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return z.read(name).decode(errors="replace")


def check_requirements(wheels, version_of, present=()):
    """Each wheel's Requires-Dist (outside extras) against the device: `version_of(name)` gives a version (carried
    wheels' own, the device's known ones), `present` the device's packages of unknown version. Returns
    (problems, notes): a requirement nobody satisfies, or a known version outside its specifier, is a problem."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.version import Version
    env = dict(default_environment(), python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", implementation_name="cpython", extra="")
    problems, notes = [], []
    for wheel in wheels:
        meta = wheel_metadata(wheel)
        owner = re.search(r"(?m)^Name: (.*)$", meta).group(1).strip()
        for line in re.findall(r"(?m)^Requires-Dist: (.*)$", meta):
            req = Requirement(line.strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name, version = norm(req.name), version_of(norm(req.name))
            if version is None:
                if name in present:
                    if req.specifier:
                        notes.append(f"{owner}: {req} (on the device, version not listed)")
                    continue
                problems.append(f"{owner} requires {req}: neither carried nor on the device")
            elif req.specifier and not req.specifier.contains(Version(version).public, prereleases=True) \
                    and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{owner} requires {req}: the device / the bundle has {name} {version}")
    return problems, notes


def bundle_wheel_versions(bundle):
    versions = {}
    for w in (bundle / "wheels").glob("*.whl"):
        meta = wheel_metadata(w)
        versions[norm(re.search(r"(?m)^Name: (.*)$", meta).group(1).strip())] = \
            re.search(r"(?m)^Version: (.*)$", meta).group(1).strip()
    return versions


def build_bundle(dest):
    """.gpu_bundle/ (scripts/gpu_bundle.py's layout) with its downloads cached under .cache/gpu_bundle/: cp312
    manylinux wheels of what the device lacks at the versions the tests use, checked against the device's."""
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_bundle as gb
    cache, started = REPO / ".cache" / "gpu_bundle", time.time()
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    how = gb.plan(gb.comfy_requirements())
    pins, files = [], []
    import importlib.metadata
    for name in gb.CARRIED:
        version = importlib.metadata.version(name)
        pins.append(f"{name}=={version}")
        pattern = f"{re.sub(r'[-.]+', '_', name)}-{version}{'+slim' if name == 'comfy-kitchen' else ''}-*.whl"
        found = [w for w in wheels.iterdir() if w.name.lower().startswith(pattern.lower()[:-6])
                 and w.name.endswith(".whl")]
        if not found:
            tmp = cache / "download"
            shutil.rmtree(tmp, ignore_errors=True)
            gb.download([name], tmp)
            (w,) = tmp.glob("*.whl")
            if name == "comfy-kitchen":
                w = gb.slim_kitchen(w)
            found = [w.rename(wheels / w.name)]
            shutil.rmtree(tmp, ignore_errors=True)
        files.append(found[0])
    tarball = cache / "ComfyUI.tar.gz"
    stamp = gb.COMFY_DIR / "comfyui_version.py"
    if not tarball.exists() or tarball.stat().st_mtime < stamp.stat().st_mtime:
        gb.pack_comfyui(tarball)
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "wheels").mkdir(parents=True)
    for f in files:
        shutil.copy(f, dest / "wheels" / f.name)
    shutil.copy(tarball, dest / "ComfyUI.tar.gz")
    gb.write_stubs(dest / "stubs")
    sizes = {f.name: f.stat().st_size for f in sorted((dest / "wheels").iterdir())}
    sizes["ComfyUI.tar.gz"] = tarball.stat().st_size
    manifest = {"pins": pins, "wheels": sorted(f.name for f in files), "stubs": gb.STUBBED,
                "comfyui_requirements": how, "device_packages": sorted({gb.norm(n) for n in gb.DEVICE_PACKAGES}), "sizes": sizes}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    total, repo = gb.folder_size(dest), gb.repo_travel_size()
    result = {"seconds": round(time.time() - started, 1), "bundle_mib": round(gb.mib(total), 2),
              "call_mib": round(gb.mib(total + repo), 2), "limit_mib": gb.CALL_LIMIT_MIB, "wheels": len(files)}
    if gb.mib(total + repo) > gb.CALL_LIMIT_MIB:
        raise Failure(f"bundle {result['bundle_mib']} MiB + repository: {result['call_mib']} MiB, over "
                      f"{gb.CALL_LIMIT_MIB} MiB a call")
    return result


def device_constraints(bundle):
    """The dry run's check of the carried wheels against the device's versions (DEVICE_VERSIONS)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    carried = bundle_wheel_versions(bundle)
    known = {norm(k): v for k, v in DEVICE_VERSIONS.items()}
    problems, notes = check_requirements(sorted((bundle / "wheels").glob("*.whl")),
                                         lambda n: carried.get(n) or known.get(n), set(manifest["device_packages"]))
    overlap = sorted(set(carried) & set(manifest["device_packages"]))
    if problems:
        raise Failure("carried wheels' requirements the device does not meet:\n  " + "\n  ".join(problems))
    return {"carried": carried, "carried_though_on_the_device": overlap, "unchecked_versions": notes}


def installed_constraints(bundle):
    """On the device: the carried wheels' requirements against what is really installed there."""
    import importlib.metadata

    def version_of(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    problems, notes = check_requirements(sorted((bundle / "wheels").glob("*.whl")), version_of)
    if problems:
        raise Failure("requirements not met on this machine:\n  " + "\n  ".join(problems))
    return {"checked_wheels": len(list((bundle / "wheels").glob("*.whl")))}


def versions(device):
    import importlib.metadata
    import torch
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "huggingface-hub", "accelerate", "safetensors", "numpy", "diffusers",
                 "open-clip-torch", "comfy-aimdo", "comfy-kitchen", "pydantic", "typing-extensions", "timm"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if device.type == "cuda":
        out.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
    return out


def check_model(name, ckpt, res, cfg, server, events, memory, deadline, precision):
    """One model through the server: DRaFTTrainLoRA at `precision` (each step's `skipped` flag recorded), then
    its saved LoRA through LoraLoaderModelOnly next to the base model."""
    base, result = server.base_dir, {"resolution": res, "precision": precision}
    started, since, log_start = time.time(), len(events.items), len(server.log())
    steps_wanted = cfg["training_steps"]
    print(f"[gpu_check] {name}: DRaFTTrainLoRA, draft-lv, {steps_wanted} steps at {res}x{res}, {precision}", flush=True)
    entry = run_prompt(server, train_prompt(server, ckpt, res, cfg["sampling_steps"], name, precision, steps_wanted),
                       events.client_id, deadline - time.time())
    steps = events.of("comfy_draft.train_step", since)
    text = entry["outputs"]["3"]["text"][0]
    lora = text.split(": reward")[0]
    estimate = re.findall(r"DRaFT: (estimated peak memory.*)", server.log()[log_start:])
    train = result["train"] = {"seconds": round(time.time() - started, 2), "lora": lora, "node_text": text,
                               "step_seconds": [round(s["seconds"], 3) for s in steps],
                               "rewards": [s.get("reward") for s in steps],
                               "skipped": [s.get("skipped") for s in steps],
                               "grad_norm": [s.get("grad_norm") for s in steps],
                               "memory_estimate": estimate[-1:], "peak_mib": memory.peak(started)}
    print(f"  {text}\n  step seconds {train['step_seconds']}, skipped {train['skipped']}, peak {train['peak_mib']} "
          f"MiB, {'; '.join(estimate[-1:])}", flush=True)
    if len(steps) != steps_wanted:
        raise Failure(f"{name}: expected {steps_wanted} comfy_draft.train_step events, got {len(steps)}")
    if all(train["skipped"]):
        raise Failure(f"{name}: every step was skipped (fp16 overflow): {train['skipped']}")

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
    return result


def offload_gradients(ckpt_path, res, sampling_steps, device):
    """One DRaFT-LV step's LoRA gradient through the ComfyUI backend loaded fully and forced to offload
    (TrainingBackend(..., offload=True): every weight-casting op recomputed in backward), in this process."""
    import comfy.model_management
    import comfy.sd
    import torch
    from comfy_draft import rewards
    from comfy_draft.backends.comfyui import TrainingBackend
    from comfy_draft.trainer import TrainConfig, Trainer

    with torch.inference_mode():
        objects = comfy.sd.load_checkpoint_guess_config(str(ckpt_path))[:3]
    grads, info = {}, {}
    for offload in (False, True):
        backend = TrainingBackend(*objects, offload=offload)
        config = TrainConfig(prompts=["a red apple"], steps=1, sampling_steps=sampling_steps, cfg=4.0, width=res,
                             height=res, batch_size=1, lr=1e-3, seed=0, max_grad_norm=0, lv_samples=1,
                             precision="fp32")
        trainer = Trainer(backend, rewards.builtin_reward("brightness"), config)
        started = time.time()
        with torch.inference_mode():
            trainer.train()
        grads[offload] = torch.cat([p.grad.flatten().float().cpu() for p in trainer.params])
        info["offloaded" if offload else "full_load"] = {"seconds": round(time.time() - started, 2),
                                                         "backend_offloaded": bool(backend.offloaded)}
        del trainer, backend
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
    ref, off = grads[False], grads[True]
    scale = ref.abs().max().item()
    diff = (off - ref).abs().max().item()
    info.update(max_abs_grad=scale, max_abs_diff=diff, relative=diff / scale if scale else None,
                tolerance=OFFLOAD_RTOL, precision="fp32",
                note="max |g_offload - g_full| <= tolerance * max |g_full|, one step, fp32 compute")
    if not scale > 0 or not info["offloaded"]["backend_offloaded"] or not diff <= OFFLOAD_RTOL * scale:
        raise Failure(f"offloaded LoRA gradient differs: max diff {diff:.3e} vs max |g| {scale:.3e} "
                      f"(tolerance {OFFLOAD_RTOL} relative), offloaded {info['offloaded']['backend_offloaded']}")
    return info


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
    if result["returncode"] != 0:
        raise Failure(f"bench/speed.py: exit {result['returncode']}")
    return result


def markdown(results):
    v = results.get("versions", {})
    lines = [f"# GPU check ({results['mode']})", "",
             f"{v.get('device', 'CPU')}; torch {v.get('torch')}; ComfyUI {results.get('comfyui')}; DynamicVRAM "
             f"(server log): {results.get('dynamic_vram')}; {results.get('total_s')} s in all. Memory: "
             f"{results.get('memory_source')}.", "",
             *[f"    {line}" for line in results.get("comfy_log", [])], "",
             "| phase | status | s (budget) | result |", "|---|---|---|---|"]
    for name, p in results["phases"].items():
        r = json.dumps(p.get("result"), default=str)
        lines.append(f"| {name} | {p['status']} | {p.get('seconds')} ({p['budget_s']}) | "
                     f"{r[:400] + ('...' if len(r) > 400 else '')} |")
    lines += ["", "Failures: " + ("none" if not results["failures"] else "")] + [f"- {f}" for f in results["failures"]]
    return "\n".join(lines) + "\n"


def default_out(dry_run, work):
    if os.environ.get("OUT"):
        return pathlib.Path(os.environ["OUT"])
    return work / "results" if dry_run else REPO / "bench" / "results"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="on this CPU, with tiny models")
    p.add_argument("--bundle", type=pathlib.Path, help="default: .gpu_bundle (required on the device)")
    p.add_argument("--no-bundle", action="store_true",
                   help="dry run with .venv and .cache's ComfyUI as they are (no bundle built, checked or installed)")
    p.add_argument("--out", type=pathlib.Path, help="default: $OUT when set, else bench/results (dry run: "
                                                    "<work>/results)")
    p.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/gpu_check"))
    p.add_argument("--speed", action="store_true", help="also bench/speed.py (a second device call: see docs/gpu.md)")
    p.add_argument("--speed-only", action="store_true", help="only the install and bench/speed.py")
    p.add_argument("--speed-args", help="arguments for bench/speed.py (default: see GPU / DRY)")
    p.add_argument("--budget", type=float, help="seconds for the whole check (default: see GPU / DRY)")
    p.add_argument("--fail-at", action="append", default=[],
                   help="raise in this phase (testing the failure path); also GPU_CHECK_FAIL_AT=a,b")
    args = p.parse_args(argv)
    cfg = DRY if args.dry_run else GPU
    fail_at = args.fail_at + [f for f in os.environ.get("GPU_CHECK_FAIL_AT", "").split(",") if f]
    t0 = time.time()
    out = args.out or default_out(args.dry_run, args.work)
    b = cfg["phase_budgets"]
    if args.budget is None and args.speed_only:  # the setup phases and speed.py
        args.budget = sum(b.get(n, 0) for n in ("bundle", "bundle_constraints", "install", "imports",
                                                 "installed_constraints", "speed"))
    elif args.budget is None and args.speed:
        args.budget = cfg["budget_s"] + b["speed"]
    results = {"mode": "dry run, CPU, tiny models" if args.dry_run else "CUDA, real sizes", "started": t0,
               "argv": sys.argv[1:] if argv is None else list(argv), "versions": {"python": sys.version.split()[0]},
               "budget_s": args.budget or cfg["budget_s"]}
    phases = Phases(out, results, t0 + (args.budget or cfg["budget_s"]), fail_at)
    ctx = {}
    try:
        run_phases(args, cfg, phases, ctx, out)
    except BaseException:  # anything outside a phase (Phases.run re-raises only interrupts)
        results["failures"].append("outside a phase: " + traceback.format_exc(limit=-3).strip().splitlines()[-1])
        results["traceback"] = traceback.format_exc()
        raise
    finally:
        memory = ctx.get("memory")
        if memory is not None:
            memory.stopped.set()
        results["phases_reached"] = [n for n, ph in results["phases"].items() if not ph["status"].startswith("skip")]
        phases.write()
        try:
            (out / "gpu_check.md").write_text(markdown(results))
            print(markdown(results))
        except Exception:
            traceback.print_exc()
    if results["failures"]:
        log = out / "gpu_check_server.log"
        if log.exists():
            print("----- server log (tail) -----\n" + log.read_text(errors="replace")[-6000:])
        return 1
    return 0


def run_phases(args, cfg, phases, ctx, out):
    results = phases.results
    bundle = None if args.no_bundle else (args.bundle or REPO / ".gpu_bundle")

    def build():
        return build_bundle(bundle)

    def constraints():
        return device_constraints(bundle)

    def install():
        if bundle is not None and not (bundle / "manifest.json").exists():
            raise Failure(f"no bundle at {bundle}: on the device, carry .gpu_bundle (built by the dry run or "
                          f"scripts/gpu_bundle.py)")
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        # Paths before any import of torch: the bundle's typing_extensions must win over the device's.
        ctx["paths"], ctx["comfy_dir"] = python_path(bundle, args.work, args.dry_run)
        if not args.dry_run:
            sys.path[:0] = ctx["paths"]
        return {"wheels": len(list((bundle / "wheels").glob("*.whl")))} if bundle else None

    def imports():
        os.environ.update(COMFYUI_DIR=str(ctx["comfy_dir"]), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests")]
        import comfyui_harness as harness
        import fixtures
        import torch
        device = ctx["device"] = torch.device("cpu" if args.dry_run else "cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise Failure("no CUDA device: use --dry-run on a CPU")
        results["versions"] = versions(device)
        fixtures.boot_comfyui(device)  # ComfyUI's modules in this process, to write the checkpoints
        from comfyui_version import __version__ as comfyui_version
        results["comfyui"] = comfyui_version
        harness.COMFY_FLAGS = ["--disable-api-nodes", "--database-url", "sqlite:///:memory:"]  # main.py's defaults
        if args.dry_run:
            harness.COMFY_FLAGS.append("--cpu")
        ctx["harness"] = harness
        ctx["env"] = dict(os.environ, PYTHONPATH=os.pathsep.join(ctx["paths"] + [os.environ.get("PYTHONPATH", "")])
                          .strip(os.pathsep))

    def models():
        ctx["base"] = ctx["harness"].make_base_dir(args.work / "base")
        ctx["ckpts"] = write_models(ctx["base"], args.dry_run, ctx["device"])
        return {"checkpoints": ctx["ckpts"]}

    def server():
        harness = ctx["harness"]
        memory = ctx["memory"] = MemoryPoller()
        memory.start()
        time.sleep(0.5)
        results.update(memory_source=memory.source, baseline_mib=memory.peak(0) or 0)
        s = ctx["server"] = harness.ComfyServer(ctx["base"], extra_env={"PYTHONPATH": ctx["env"]["PYTHONPATH"]})
        memory.pid = s.proc.pid
        s.wait_ready(timeout=max(phases.deadline - time.time(), 1))
        log = re.sub(r"\x1b\[[0-9;]*m", "", s.log())  # without the console's colours
        # main.py logs this line exactly when it sets comfy.memory_management.aimdo_enabled = True
        results["dynamic_vram"] = "DynamicVRAM support detected and enabled" in log
        wanted = r"^(?:\[\w+\] )?((?:Total VRAM|Set vram state|Device:|.*DynamicVRAM|comfy-aimdo|comfy-kitchen).*)$"
        results["comfy_log"] = list(dict.fromkeys(re.findall(wanted, log, re.M)))
        failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and harness.PACK_NAME in line]
        if failed:
            raise Failure(f"the pack failed to import: {failed}")
        events = ctx["events"] = Events(s.port)
        events.start()
        if not events.ready.wait(30):
            raise Failure("no websocket connection to the server")
        return {"aimdo_enabled": results["dynamic_vram"], "comfy_log": results["comfy_log"]}

    def model_phase(name, precision):
        def fn():
            model = cfg["models"][name]
            return check_model(name, ctx["ckpts"][model["checkpoint"]], model["resolution"], cfg, ctx["server"],
                               ctx["events"], ctx["memory"], phases.deadline, precision)
        return fn

    def stop_server():
        s = ctx.pop("server", None)
        if s is not None:
            s.stop()
            shutil.copy(s.log_path, out / "gpu_check_server.log")

    def offload():
        stop_server()  # its GPU memory back first
        ckpt = ctx["base"] / "models" / "checkpoints" / ctx["ckpts"]["sd15"]
        o = cfg["offload"]
        return offload_gradients(ckpt.resolve(), o["resolution"], o["sampling_steps"], ctx["device"])

    def speed():
        stop_server()
        return run_speed(args, cfg, ctx["env"], out, phases.deadline)

    b = cfg["phase_budgets"]
    if bundle is not None and args.dry_run:
        phases.run("bundle", b["bundle"], build)
        phases.run("bundle_constraints", b["bundle_constraints"], constraints, needs=["bundle"])
    setup = ["install", "imports"]
    phases.run("install", b["install"], install, needs=["bundle"] if bundle is not None and args.dry_run else [])
    phases.run("imports", b["imports"], imports, needs=["install"])
    if bundle is not None and not args.dry_run:  # recorded; the check goes on whatever it finds
        phases.run("installed_constraints", b["installed_constraints"], lambda: installed_constraints(bundle),
                   needs=["imports"])
    try:
        if not args.speed_only:
            phases.run("models", b["models"], models, needs=setup)
            phases.run("server", b["server"], server, needs=setup + ["models"])
            for name, precision in cfg["runs"].items():
                phases.run(name, b[name], model_phase(name, precision), needs=["server"])
            phases.run("offload", b["offload"], offload, needs=setup + ["models"])
        if args.speed or args.speed_only:
            phases.run("speed", b["speed"], speed, needs=setup)
    finally:
        stop_server()


if __name__ == "__main__":
    sys.exit(main())
