"""Fast checks of the one-call GPU check (bench/gpu_check.py) and its bundle (scripts/gpu_bundle.py). The whole
flow is `bench/gpu_check.py --dry-run` (minutes on 2 cores, so it is not part of the suite)."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import uuid

import tiny_clip

REPO = pathlib.Path(__file__).resolve().parents[1]


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load(REPO / "bench" / "gpu_check.py")
gpu_bundle = load(REPO / "scripts" / "gpu_bundle.py")


def python(code, **env):
    """`code` in a fresh interpreter (stubs and import guards must not reach this test process)."""
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True)


def test_every_comfyui_requirement_is_on_the_device_carried_stubbed_or_left_out():
    how = gpu_bundle.plan(gpu_bundle.comfy_requirements())
    assert how["torch"] == "on the device" and how["comfy-aimdo"] == "carried" and how["av"] == "stub"
    device = {gpu_bundle.norm(n) for n in gpu_bundle.DEVICE_PACKAGES}
    assert device & set(gpu_bundle.CARRIED) == {"typing-extensions"}  # the one carried for its version


def test_stubs_import_as_comfyui_imports_them(tmp_path):
    gpu_bundle.write_stubs(tmp_path)
    out = python("""
import importlib.resources
from typing import Optional

import av
from av.container import InputContainer
from av.subtitles.stream import SubtitleStream
from av.video.reformatter import ColorRange
import comfyui_frontend_package

Optional[av.AudioStream]  # annotations are evaluated when ComfyUI's modules load
try:
    av.open("clip.mp4")
    raise AssertionError("the stub opened a file")
except RuntimeError as e:
    assert "stub" in str(e)
try:
    raise ValueError()
except av.error.InvalidDataError:  # `except av.error.X:` clauses must stay valid
    raise AssertionError()
except ValueError:
    pass
assert (importlib.resources.files(comfyui_frontend_package) / "static" / "index.html").is_file()
print(av.__file__)
""", PYTHONPATH=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(tmp_path))


def test_dry_run_import_guard_refuses_what_the_device_lacks(tmp_path):
    stubs, guard = tmp_path / "stubs", tmp_path / "guard"
    gpu_bundle.write_stubs(stubs)
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(gpu_check.GUARD)
    out = python("""
import numpy
import av
assert "stubs" in av.__file__
try:
    import yaml
    raise AssertionError("imported a package the device lacks")
except ModuleNotFoundError as e:
    assert "on the device" in str(e), e
""", PYTHONPATH=os.pathsep.join([str(guard), str(stubs)]), GPU_CHECK_ALLOWED="numpy", GPU_CHECK_OWN=str(stubs))
    assert out.returncode == 0, out.stderr


def test_prompts_pass_comfyuis_validation_with_the_nodes_as_they_are(comfyui, tiny_sd15):
    """The check's prompts against the real node definitions (required inputs, types, ranges, file lists),
    before any device time is spent on them."""
    rewards = pathlib.Path(comfyui.folder_paths.get_folder_paths("reward_models")[0])
    rewards.mkdir(parents=True, exist_ok=True)
    if not (rewards / gpu_check.CLIP_FILE).exists():
        tiny_clip.write_clip_vision(rewards / gpu_check.CLIP_FILE, tiny_clip.hf_clip_vision_model(seed=5))
    if not (rewards / gpu_check.MLP_FILE).exists():
        tiny_clip.write_aesthetic_mlp(rewards / gpu_check.MLP_FILE, tiny_clip.aesthetic_mlp(32, seed=6))
    lora = pathlib.Path(comfyui.folder_paths.get_folder_paths("loras")[0]) / "gpu_check" / "validation_only.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.touch()  # validation only looks the name up

    required = comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTTrainLoRA"].INPUT_TYPES()["required"]

    class ObjectInfo:  # what GET /object_info/<node> answers
        def get(self, path):
            name = path.rsplit("/", 1)[-1]
            return {name: {"input": comfyui.nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()}}

    prompts = [gpu_check.train_prompt(ObjectInfo(), tiny_sd15, 64, 4, "validation", precision=precision)
               for precision in ("fp16", "bf16")]
    prompts.append(gpu_check.lora_prompt(tiny_sd15, "gpu_check/validation_only.safetensors", 64, 4, "validation"))
    assert set(prompts[0]["3"]["inputs"]) == set(required) | {"options"}
    assert prompts[1]["4"]["inputs"]["precision"] == "bf16"
    for prompt in prompts:
        valid = comfyui.loop.run_until_complete(comfyui._execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        assert valid[0], valid[1:]


def test_cuda_peak_is_compared_with_the_cpu_accounting_of_the_configuration_it_ran():
    """Dry run of the GPU side of issue 14: speed.py's comparison of max_memory_allocated with the committed CPU
    tensor accounting, on a CUDA-shaped results dict (the trainer's resolved checkpointing picks the row)."""
    import json
    speed = load(REPO / "bench" / "speed.py")
    rows = json.loads((REPO / "bench" / "results" / "speed_real_cpu.json").read_text())["accounting"]
    configs = {(r["model"], r["config"]) for r in rows}
    assert configs >= {(m, c) for m in ("sd15", "sdxl") for c in speed.RUNS_AS.values()}
    results = {"env": {"device": "cuda"}, "args": {"batch_size": 1}, "accounting": rows, "models": {
        name: {"resolution": speed.RESOLUTION["real"][name],
               "variants": {"draft-lv (n=2)": {"peak_gb": 5.0, "checkpointing": checkpointing}}}
        for name, checkpointing in (("sd15", True), ("sdxl", "blocks"))}}
    lines = "\n".join(speed.accounting_vs_cuda(results))
    for name, config in (("sd15", speed.RUNS_AS[True]), ("sdxl", speed.RUNS_AS["blocks"])):
        row = next(r for r in rows if r["model"] == name and r["config"] == config)
        ratio = results["models"][name]["variants"]["draft-lv (n=2)"]["accounting_ratio"]
        assert abs(ratio - 5e9 / row["total"]) < 1e-9 and f"**{ratio:.3f}**" in lines


def run_check(tmp_path, *args, **env):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--work", str(tmp_path / "work"),
                           *args], env=dict(os.environ, **env), capture_output=True, text=True, timeout=120)
    return proc, json.loads((out / "gpu_check.json").read_text())


def test_a_failing_phase_still_writes_the_json_with_its_traceback(tmp_path):
    """An injected failure (GPU_CHECK_FAIL_AT) in the phase that imports torch: the JSON under $OUT says which
    phase failed, with the traceback, and that every later one was skipped; the exit status is 1."""
    proc, result = run_check(tmp_path, "--dry-run", "--no-bundle", OUT=str(tmp_path / "out"),
                             GPU_CHECK_FAIL_AT="imports")
    assert proc.returncode == 1, proc.stderr
    phases = result["phases"]
    assert phases["install"]["status"] == "ok", phases["install"]
    assert phases["imports"]["status"] == "failed" and "injected failure" in phases["imports"]["traceback"]
    assert all(p["status"].startswith("skipped: needs") for name, p in phases.items()
               if name not in ("install", "imports"))
    assert result["phases_reached"] == ["install", "imports"]
    assert result["failures"] == ["imports: RuntimeError: injected failure in phase 'imports' (--fail-at / "
                                  "GPU_CHECK_FAIL_AT)"]
    assert (tmp_path / "out" / "gpu_check.md").exists()


def test_a_missing_wheel_fails_the_install_phase_with_its_traceback(tmp_path):
    """The device's setup failing for real (a bundle whose wheel is missing, as pip reports it), before torch is
    imported: the JSON still comes back with pip's error."""
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    (bundle / "manifest.json").write_text(json.dumps({"pins": [], "device_packages": []}))
    (bundle / "wheels" / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"not a wheel")
    proc, result = run_check(tmp_path, "--bundle", str(bundle), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    install = result["phases"]["install"]
    assert install["status"] == "failed" and "Traceback" in install["traceback"], install
    assert result["phases"]["imports"]["status"] == "skipped: needs install"


def test_carried_wheels_requirements_are_checked_against_the_devices_versions(tmp_path):
    import zipfile

    def wheel(name, version, *requires):
        path = tmp_path / f"{name}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(
                ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
                + [f"Requires-Dist: {r}" for r in requires]) + "\n")
        return path
    wheels = [wheel("good", "1.0", "torch>=2.5", "timm>=1.0", "extra-only; extra == 'dev'",
                    "old-python; python_version < '3.10'"),
              wheel("bad", "1.0", "huggingface-hub>=2.0", "nowhere")]
    versions = {"torch": "2.11.0", "huggingface-hub": "1.33.0"}
    problems, notes = gpu_check.check_requirements(wheels, versions.get, present={"timm"})
    assert problems == ["bad requires huggingface-hub>=2.0: the device / the bundle has huggingface-hub 1.33.0",
                        "bad requires nowhere: neither carried nor on the device"]
    assert notes == ["good: timm>=1.0 (on the device, version not listed)"]
