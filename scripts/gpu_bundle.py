"""Build .gpu_bundle/: what bench/gpu_check.py needs on the lent GPU machine, which has no network.

The device image (Python 3.12, torch 2.11 + CUDA 13, DEVICE_PACKAGES below) lacks ComfyUI, its less common
requirements and the pack's diffusers / open_clip. This writes, at most 60 MiB in all (the repository
travels too, and a call carries 64 MiB):

  wheels/           cp312 manylinux wheels of CARRIED, at the versions installed in the running interpreter
                    (run it with .venv/bin/python: the versions the tests use); comfy-kitchen without its
                    CUDA/HIP kernels (130 MB unpacked; only fp8/fp4 models use them)
  stubs/            av (PyAV, 35 MB, used for video/audio only) and comfyui_frontend_package (78 MB, the
                    web UI, which an API-only check never loads): importable stand-ins
  ComfyUI.tar.gz    the ComfyUI tree of the tests, without tests, blueprints and API nodes
  manifest.json     versions, sizes, and the device's package list (the dry run imports nothing else)

Run: .venv/bin/python scripts/gpu_bundle.py [--out .gpu_bundle]
"""
import argparse
import base64
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]
COMFY_DIR = pathlib.Path(os.environ.get("COMFYUI_DIR", REPO / ".cache" / "comfyui" / "ComfyUI"))
LIMIT_MIB = 60       # the bundle
CALL_LIMIT_MIB = 64  # the bundle plus the repository's files, per device call

# Python packages in the nvidia-h200 image (the device tool's KINDS.md, read 2026-11-17).
DEVICE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()

# Wheels to carry (distribution name: why).
CARRIED = {
    "diffusers": "the pack (pyproject)", "importlib-metadata": "diffusers",
    "lazy-importer": "importlib-metadata >= 10 (found by the dry run's Requires-Dist check)",
    "open-clip-torch": "the pack: CLIP rewards", "ftfy": "open_clip", "wcwidth": "ftfy",
    "comfy-aimdo": "ComfyUI: DynamicVRAM", "comfy-kitchen": "ComfyUI: imported by comfy.model_base (kernels removed)",
    "torchsde": "ComfyUI: k-diffusion samplers", "trampoline": "torchsde",
    "sqlalchemy": "ComfyUI: database", "alembic": "ComfyUI: database", "mako": "alembic",
    "pydantic": "ComfyUI: server routes", "pydantic-core": "pydantic", "annotated-types": "pydantic",
    "typing-inspection": "pydantic", "typing-extensions": "pydantic needs >= 4.16 (the device's may be older)",
    "pydantic-settings": "ComfyUI: custom nodes' pyproject.toml", "python-dotenv": "pydantic-settings",
    "simpleeval": "ComfyUI", "blake3": "ComfyUI: asset hashes",
    "kornia": "ComfyUI: latent and image nodes", "kornia-rs": "kornia", "spandrel": "ComfyUI: upscale-model nodes",
}
STUBBED = {"av": "stubs/av", "comfyui-frontend-package": "stubs/comfyui_frontend_package"}
# ComfyUI requirements neither carried nor stubbed: nodes this check does not use, or optional.
LEFT_OUT = {"comfyui-workflow-templates": "templates for the web UI", "comfyui-embedded-docs": "web UI docs",
            "pyopengl": "GLSL nodes (need OpenGL)", "comfy-angle": "GLSL nodes (need OpenGL)"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
KITCHEN_KERNELS = ("comfy_kitchen/backends/cuda/_C.", "comfy_kitchen/backends/hip/_C.")
COMFY_EXCLUDE = re.compile(r"^ComfyUI/(tests[^/]*|blueprints|comfy_api_nodes)(/|$)|/__pycache__(/|$)")

AV_STUB = '''"""Stand-in for PyAV (a 35 MB wheel) in an API-only ComfyUI check: every `av` module and name
imports, and using one raises. ComfyUI needs PyAV for video and audio nodes only."""
import importlib.abc
import importlib.machinery
import sys
import types


class Unavailable(Exception):  # an exception too, so that `except av.error.X:` works
    def __init__(self, *args, **kwargs):
        raise RuntimeError("PyAV is replaced by a stub in this check (scripts/gpu_bundle.py)")


class StubModule(types.ModuleType):
    """Lower-case names are submodules or functions (av.audio.resampler, av.open), others classes."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = StubModule(f"{self.__name__}.{name}") if name[:1].islower() else type(name, (Unavailable,), {})
        setattr(self, name, value)
        return value

    def __call__(self, *args, **kwargs):
        Unavailable()


class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        return StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


sys.meta_path.append(Finder())
sys.modules[__name__].__class__ = StubModule
__version__ = "0+stub"
'''
FRONTEND_STUB = '"""Stand-in for comfyui-frontend-package (78 MB): ComfyUI serves static/ as its web root."""\n'


def mib(n):
    return n / 2 ** 20


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def download(names, dest):
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in {sys.executable}: run this with .venv/bin/python") from None
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    cmd += [f"--platform={p}" for p in PLATFORMS] + pins
    subprocess.run(cmd, check=True)
    return pins


def record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_kitchen(wheel):
    """comfy-kitchen as `<version>+slim`, without its compiled CUDA/HIP kernels: it then runs its eager and
    triton backends, as it does wherever the kernels do not load."""
    with zipfile.ZipFile(wheel) as z:
        files = {i.filename: z.read(i) for i in z.infolist() if not i.filename.startswith(KITCHEN_KERNELS)}
    old = next(n for n in files if n.endswith(".dist-info/METADATA")).split("/")[0]  # comfy_kitchen-0.2.26.dist-info
    version = old[len("comfy_kitchen-"):-len(".dist-info")]
    new = f"comfy_kitchen-{version}+slim.dist-info"
    files = {n.replace(old + "/", new + "/"): data for n, data in files.items()}
    metadata = f"{new}/METADATA"
    files[metadata] = re.sub(rb"(?m)^Version: .*$", f"Version: {version}+slim".encode(), files[metadata])
    records = [record_line(n, data) for n, data in files.items() if n != f"{new}/RECORD"]
    files[f"{new}/RECORD"] = ("\n".join(records + [f"{new}/RECORD,,"]) + "\n").encode()
    out = wheel.with_name(wheel.name.replace(f"-{version}-", f"-{version}+slim-"))
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    wheel.unlink()
    return out


def comfy_requirements():
    names = []
    for line in (COMFY_DIR / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(norm(re.split(r"[<>=~!;\[ ]", line)[0]))
    return names


def plan(requirements):
    """How each ComfyUI requirement gets to the device; a requirement nobody decided on stops the build."""
    device, how = {norm(n) for n in DEVICE_PACKAGES}, {}
    for name in requirements:
        if name in device:
            how[name] = "on the device"
        elif name in CARRIED:
            how[name] = "carried"
        elif name in STUBBED:
            how[name] = "stub"
        elif name in LEFT_OUT:
            how[name] = f"left out: {LEFT_OUT[name]}"
        else:
            raise SystemExit(f"ComfyUI requirement {name!r} is not on the device: add it to CARRIED, STUBBED or "
                             f"LEFT_OUT")
    return how


def write_stubs(stubs):
    (stubs / "av").mkdir(parents=True)
    (stubs / "av" / "__init__.py").write_text(AV_STUB)
    frontend = stubs / "comfyui_frontend_package"
    (frontend / "static").mkdir(parents=True)
    (frontend / "__init__.py").write_text(FRONTEND_STUB)
    (frontend / "static" / "index.html").write_text("<!doctype html><title>ComfyUI (API only)</title>\n")


def pack_comfyui(path):
    def keep(info):
        return None if COMFY_EXCLUDE.search(info.name) else info
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        tar.add(COMFY_DIR, arcname="ComfyUI", filter=keep)


def folder_size(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def repo_travel_size():
    """Bytes of what a device call sends besides carried folders: tracked and untracked, not ignored files."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                         check=True).stdout.decode().split("\0")
    return sum((REPO / f).stat().st_size for f in out if f and (REPO / f).is_file())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=REPO / ".gpu_bundle")
    args = p.parse_args(argv)
    if not (COMFY_DIR / "main.py").exists():
        raise SystemExit(f"no ComfyUI at {COMFY_DIR}: run scripts/bootstrap.sh first")

    how = plan(comfy_requirements())
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".gpu_bundle.", dir=args.out.parent))
    try:
        wheels = tmp / "wheels"
        pins = download(CARRIED, wheels)
        kitchen = next(wheels.glob("comfy_kitchen-*.whl"))
        print(f"comfy-kitchen: {mib(kitchen.stat().st_size):.1f} MiB", end=" -> ")
        print(f"{mib(slim_kitchen(kitchen).stat().st_size):.2f} MiB without its CUDA/HIP kernels")
        write_stubs(tmp / "stubs")
        pack_comfyui(tmp / "ComfyUI.tar.gz")
        sizes = {f.name: f.stat().st_size for f in sorted(wheels.iterdir())}
        sizes["ComfyUI.tar.gz"] = (tmp / "ComfyUI.tar.gz").stat().st_size
        manifest = {"pins": pins, "wheels": sorted(f.name for f in wheels.iterdir()), "stubs": STUBBED,
                    "comfyui_requirements": how, "device_packages": sorted({norm(n) for n in DEVICE_PACKAGES}),
                    "sizes": sizes}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.rename(args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"  {mib(size):7.2f} MiB  {name}")
    print("ComfyUI requirements the device lacks: " + ", ".join(f"{n} ({h})" for n, h in how.items()
                                                                 if h != "on the device"))
    total, repo = folder_size(args.out), repo_travel_size()
    print(f"bundle {args.out}: {mib(total):.1f} MiB (limit {LIMIT_MIB}); with the repository's "
          f"{mib(repo):.1f} MiB a device call carries {mib(total + repo):.1f} MiB (limit {CALL_LIMIT_MIB})")
    if mib(total) > LIMIT_MIB or mib(total + repo) > CALL_LIMIT_MIB:
        raise SystemExit("too large for one device call")


if __name__ == "__main__":
    main()
