"""Boots a real ComfyUI (the tree scripts/bootstrap.sh installs) with this repository as a custom node pack.

In-process: one boot per test process (ComfyUI keeps global state). Server: a real `main.py`
subprocess on 127.0.0.1 and a free port, for HTTP and websocket tests.
"""
import asyncio
import contextlib
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

REPO = pathlib.Path(__file__).resolve().parents[1]
COMFY_DIR = pathlib.Path(os.environ.get("COMFYUI_DIR", REPO / ".cache" / "comfyui" / "ComfyUI"))
PACK_NAME = "comfy-draft"
COMFY_FLAGS = ["--cpu", "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]


def make_base_dir(base):
    """A ComfyUI base directory whose custom_nodes holds (a link to) this repository."""
    base = pathlib.Path(base)
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return base


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class InProcessComfy:
    """ComfyUI booted inside this process; `run(prompt)` executes an API-format prompt."""

    def __init__(self, base_dir):
        self.base_dir = make_base_dir(base_dir)
        if not (COMFY_DIR / "main.py").exists():
            raise RuntimeError(f"no ComfyUI at {COMFY_DIR}: run scripts/bootstrap.sh (or make test)")
        sys.path.insert(0, str(COMFY_DIR))
        argv, sys.argv = sys.argv, ["main.py", *COMFY_FLAGS, "--base-directory", str(self.base_dir)]
        try:
            import comfy.options
            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401  (parses sys.argv once)
        finally:
            sys.argv = argv
        import utils.extra_config  # noqa: F401  (before `nodes`, or comfy/utils.py shadows `utils`)
        import execution
        import folder_paths
        import nodes
        import server

        self.records = _Records()
        logging.getLogger().addHandler(self.records)
        logging.getLogger().setLevel(logging.INFO)
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.server = server.PromptServer(self.loop)
        self.loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        logging.getLogger().removeHandler(self.records)
        self.nodes = nodes
        self.folder_paths = folder_paths
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC,
            cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        self._execution = execution

    @property
    def import_log(self):
        return self.records.lines

    def run(self, prompt, outputs=None):
        """Validate and execute an API-format prompt; return its history entry (`outputs` per node)."""
        prompt_id = str(uuid.uuid4())
        valid = self.loop.run_until_complete(self._execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise PromptError(f"invalid prompt: {valid[1]} {json.dumps(valid[3], indent=1)[:4000]}")
        self.executor.execute(prompt, prompt_id, {"client_id": None}, outputs or valid[2])
        if not self.executor.success:
            errors = [m for m in self.executor.status_messages if m[0] == "execution_error"]
            raise PromptError(errors[0][1] if errors else self.executor.status_messages)
        return self.executor.history_result

    def output_path(self, file_info):
        """Path of a file a node reported in its ui output ({'filename', 'subfolder', 'type'})."""
        root = self.folder_paths.get_directory_by_type(file_info.get("type", "output"))
        return pathlib.Path(root) / file_info.get("subfolder", "") / file_info["filename"]


class PromptError(RuntimeError):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """The real ComfyUI server (`main.py`) in a subprocess on 127.0.0.1."""

    def __init__(self, base_dir, extra_env=None):
        self.base_dir = make_base_dir(base_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "server.log"
        env = dict(os.environ, **(extra_env or {}))
        cmd = [sys.executable, "main.py", *COMFY_FLAGS, "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({self.proc.returncode}):\n{self.log()}")
            with contextlib.suppress(OSError):
                self.get("/system_stats")
                return self
            time.sleep(0.5)
        raise TimeoutError(f"ComfyUI server not ready after {timeout}s:\n{self.log()[-4000:]}")

    def log(self):
        return self.log_path.read_text(errors="replace")

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return json.loads(body) if body else None

    def queue(self, prompt, client_id=None):
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id or str(uuid.uuid4())})["prompt_id"]

    def wait_history(self, prompt_id, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                status = history[prompt_id]["status"]
                if status.get("status_str") in ("success", "error"):
                    return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def model_outputs(model_patcher, x, sigma, cond, **conds):
    """x0 predictions of a ComfyUI MODEL (loaded and patched by ComfyUI), e.g. `y=` SDXL's ADM input."""
    import comfy.model_management
    import torch
    comfy.model_management.load_models_gpu([model_patcher], force_full_load=True)
    with torch.no_grad():
        return model_patcher.model.apply_model(x, sigma, c_crossattn=cond, **conds).float()


def assert_loraloader_reproduces(ours, theirs, base, label=""):
    """The trained model (`ours`) differs from the base, and ComfyUI's LoraLoader result (`theirs`)
    equals it to 1e-3 of the largest output."""
    scale = ours.abs().max()
    print(f"{label}max |LoRA effect| {(ours - base).abs().max() / scale:.2e}, "
          f"max |LoraLoader - trained| {(theirs - ours).abs().max() / scale:.2e} (relative to max |output|)")
    assert (ours - base).abs().max() > 1e-3 * scale
    assert (theirs - ours).abs().max() <= 1e-3 * scale
