"""DRaFTTrainLoRA inside the real ComfyUI: in-process, through the server (HTTP + websocket), interrupt,
and LoRA blending with ComfyUI's own loaders."""
import json
import pathlib
import sys
import threading
import uuid

import pytest
import torch

from ui_workflows import training_options

from comfy_draft.lora import load_kohya_file

pytestmark = pytest.mark.slow


def train_prompt(ckpt, steps=3, lora_name="draft/test", sampling_steps=4, seed=0, **options):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "DRaFTBuiltinReward", "inputs": {"kind": "brightness"}},
        "3": {"class_type": "DRaFTTrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward": ["2", 0],
            "prompts": "a red apple\na blue car", "negative_prompt": "", "variant": "draft-lv",
            "training_steps": steps, "sampling_steps": sampling_steps, "cfg": 5.0, "width": 64, "height": 64,
            "batch_size": 1, "learning_rate": 0.05, "rank": 4, "seed": seed, "lora_name": lora_name,
            "options": ["20", 0]}},
        "20": training_options(**options),
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "seed": 1, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
    }


def lora_prompt(ckpt, lora_name):
    prompt = train_prompt(ckpt)
    del prompt["2"], prompt["3"], prompt["10"]
    prompt["3"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}}
    return prompt


def pack_nodes(comfyui):
    """The pack's nodes module as ComfyUI loaded it (its chart history lives there)."""
    return sys.modules[comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTTrainLoRA"].__module__]


def test_train_node_in_process_gives_the_seeds_lora_then_lora_loader(comfyui, tiny_sd15):
    history = comfyui.run(train_prompt(tiny_sd15, lora_name="draft/inproc"))
    (curve,) = history["outputs"]["10"]["images"]
    assert comfyui.output_path(curve).stat().st_size > 0
    assert "draft/inproc_00001_.safetensors" in comfyui.folder_paths.get_filename_list("loras")
    assert "reward" in history["outputs"]["3"]["text"][0]
    restarted = pack_nodes(comfyui).load_chart_history()  # what a restarted server starts from: the run's chart, from disk
    assert [m["step"] for m in restarted["3"]["steps"]] == list(range(1, len(restarted["3"]["steps"]) + 1))
    assert restarted["3"] == json.loads(json.dumps(pack_nodes(comfyui).CHART_HISTORY["3"]))
    again = comfyui.run(train_prompt(tiny_sd15, lora_name="draft/inproc"))  # not from cache: trains again
    assert "inproc_00002_" in again["outputs"]["3"]["text"][0]
    comfyui.run(train_prompt(tiny_sd15, lora_name="draft/inproc", seed=1))
    first, same_seed, other_seed = (
        comfyui.folder_paths.get_full_path("loras", f"draft/inproc_0000{i}_.safetensors") for i in (1, 2, 3))
    with open(first, "rb") as a, open(same_seed, "rb") as b:
        assert a.read() == b.read()  # the same settings and seed: the same file, byte for byte
    tensors, others = load_kohya_file(first)[0], load_kohya_file(other_seed)[0]
    assert any(not torch.equal(tensors[k], others[k]) for k in tensors)
    comfyui.run(lora_prompt(tiny_sd15, "draft/inproc_00001_.safetensors"))


class EventLog:
    """A websocket client of the real server, recording every JSON event."""

    def __init__(self, server):
        import websocket
        self.client_id = str(uuid.uuid4())
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={self.client_id}", timeout=600)
        self.events, self.binary_frames = [], 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while True:
            try:
                message = self.ws.recv()
            except Exception:
                return
            if isinstance(message, bytes):  # preview images
                self.binary_frames += 1
            elif message:
                self.events.append(json.loads(message))

    def of(self, kind):
        return [e["data"] for e in self.events if e["type"] == kind]

    def close(self):
        self.ws.close()


def test_train_node_through_server_with_websocket_events(comfy_server, tiny_sd15):
    log = EventLog(comfy_server)
    try:
        prompt_id = comfy_server.queue(train_prompt(tiny_sd15, steps=5, lora_name="draft/served"), log.client_id)
        entry = comfy_server.wait_history(prompt_id)
    finally:
        log.close()
    assert entry["status"]["status_str"] == "success", entry["status"]
    steps = log.of("comfy_draft.train_step")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5] and all(s["node"] == "3" and s["total"] == 5 for s in steps)
    assert all({"reward", "loss", "grad_norm"} <= set(s) for s in steps)
    progress = [p for p in log.of("progress") if p.get("node") == "3"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 5
    assert log.binary_frames >= 1  # the sample preview at step 5
    loras = comfy_server.get("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]["lora_name"]
    assert "draft/served_00001_.safetensors" in json.dumps(loras)
    assert entry["outputs"]["10"]["images"]


def test_interrupt_saves_a_partial_lora_that_loads(comfy_server, tiny_sd15):
    log = EventLog(comfy_server)
    try:
        prompt_id = comfy_server.queue(train_prompt(tiny_sd15, steps=200, lora_name="draft/stopped"), log.client_id)
        import time
        deadline = time.time() + 300
        while not [s for s in log.of("comfy_draft.train_step") if s["step"] >= 2] and time.time() < deadline:
            time.sleep(0.2)
        comfy_server.post("/interrupt", {})
        entry = comfy_server.wait_history(prompt_id)
    finally:
        log.close()
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    done = max(s["step"] for s in log.of("comfy_draft.train_step"))
    assert done < 200
    loras = json.dumps(comfy_server.get("/object_info/LoraLoaderModelOnly"))
    name = f"draft/stopped_00001_.partial-{done}.safetensors"
    assert name in loras, loras[:2000]
    entry = comfy_server.wait_history(comfy_server.queue(lora_prompt(tiny_sd15, name)))
    assert entry["status"]["status_str"] == "success"


def test_alpha_beta_blending_with_chained_lora_loaders(comfyui, tiny_sd15):
    """W + alpha * dW_A + beta * dW_B, with dW read independently from the kohya files."""
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import nodes
    from safetensors.torch import load_file

    from comfy_draft.backends.comfyui import TrainingBackend

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15)))[:3]
    lora_dir = comfyui.folder_paths.get_folder_paths("loras")[0]
    names = []
    for i, tag in enumerate("AB"):
        loras = TrainingBackend(model, clip, vae).add_loras(rank=4)
        with torch.no_grad():
            for lora in loras.values():
                lora.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
        loras.save(f"{lora_dir}/blend_{tag}.safetensors", overwrite=True)
        names.append(f"blend_{tag}.safetensors")
    files = [load_file(f"{lora_dir}/{n}") for n in names]
    kohya_to_key = comfy.lora.model_lora_keys_unet(model.model, {})  # ComfyUI's own name map
    kohya_names = sorted({k.rsplit(".", 2)[0] for k in files[0] if k.endswith(".lora_up.weight")})

    def delta(sd, kohya):
        up, down = sd[f"{kohya}.lora_up.weight"].float(), sd[f"{kohya}.lora_down.weight"].float()
        return sd[f"{kohya}.alpha"].float() / down.shape[0] * (up.flatten(1) @ down.flatten(1))

    state = model.model.state_dict()
    base = {n: state[kohya_to_key[n]].float().clone() for n in kohya_names}
    for alpha in (0.0, 0.5, 1.0, -0.5):
        for beta in (0.0, 0.5, 1.0, -0.5):
            with torch.inference_mode():
                (a,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, names[0], alpha)
                (ab,) = nodes.LoraLoaderModelOnly().load_lora_model_only(a, names[1], beta)
                comfy.model_management.load_models_gpu([ab], force_full_load=True)
                patched = {n: ab.model.state_dict()[kohya_to_key[n]].float().clone() for n in kohya_names}
            for n in kohya_names:
                expected = base[n] + alpha * delta(files[0], n).reshape(base[n].shape) \
                    + beta * delta(files[1], n).reshape(base[n].shape)
                error = (patched[n] - expected).abs().max() / expected.abs().max()
                assert error < 1e-3, (n, alpha, beta, error.item())
                if alpha or beta:
                    assert (patched[n] - base[n]).abs().max() > 10 * (patched[n] - expected).abs().max()
    comfy.model_management.unload_all_models()


def test_validation_node_keeps_the_best_lora(comfyui, tiny_sd15):
    prompt = train_prompt(tiny_sd15, steps=3, lora_name="draft/validated")
    prompt["11"] = {"class_type": "DRaFTBuiltinReward", "inputs": {"kind": "saturation"}}
    prompt["12"] = {"class_type": "DRaFTValidation", "inputs": {
        "prompts": "a green hill", "seeds": 2, "first_seed": 5, "every": 2, "keep": "best", "criterion": "judge_1",
        "diversity_floor": 0.0, "patience": 0, "judge_1": ["11", 0]}}
    prompt["3"]["inputs"]["validation"] = ["12", 0]
    text = comfyui.run(prompt)["outputs"]["3"]["text"][0]
    assert "held-out: reward" in text and "judge_1" in text and "diversity" in text, text
    assert "saved the LoRA of step" in text, text


def test_strength_sweep_node_agrees_with_the_library(comfyui, tiny_sd15):
    """The node applies the LoRA with ComfyUI's loader and decodes with ComfyUI's VAE; the library scales
    its own LoRA weights and decodes with its copy of the decoder: the tables must agree."""
    import comfy.sd

    from comfy_draft.backends.comfyui import TrainingBackend
    from comfy_draft.rewards import builtin_reward
    from comfy_draft.validation import scaled, strength_sweep

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15)))[:3]
    backend = TrainingBackend(model, clip, vae)
    with torch.random.fork_rng(devices=[]):  # the LoRA's random down weights: the same whatever ran before
        torch.manual_seed(3)
        loras = backend.add_loras(rank=4)
    with torch.no_grad():
        for lora in loras.values():
            lora.up.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    lora_dir = comfyui.folder_paths.get_folder_paths("loras")[0]
    loras.save(f"{lora_dir}/sweep_me.safetensors", overwrite=True)
    loras.load_kohya_state_dict(load_kohya_file(f"{lora_dir}/sweep_me.safetensors")[0])  # the file's fp16 values

    settings = dict(prompts="a red apple\na blue car", negative_prompt="", seeds=2, first_seed=11, steps=3, cfg=5.0,
                    width=64, height=64)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15}},
        "2": {"class_type": "DRaFTBuiltinReward", "inputs": {"kind": "brightness"}},
        "3": {"class_type": "DRaFTBuiltinReward", "inputs": {"kind": "contrast"}},
        "4": {"class_type": "DRaFTLoRAStrengthSweep", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "lora_name": "sweep_me.safetensors",
            "reward": ["2", 0], "judge_1": ["3", 0], "strengths": "0, 1, -0.5", **settings}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }
    outputs = comfyui.run(prompt)["outputs"]
    rows = outputs["4"]["rows"]
    assert "| strength | reward | judge_1 | diversity |" in outputs["4"]["text"][0]
    assert outputs["5"]["images"]
    expected, _ = strength_sweep(scaled(backend, loras, [0.0, 1.0, -0.5]), builtin_reward("brightness"),
                                 ["a red apple", "a blue car"], [11, 12], "", 5.0, 3, 64, 64,
                                 {"judge_1": builtin_reward("contrast")})
    assert [r["strength"] for r in rows] == [0.0, 1.0, -0.5]
    for got, want in zip(rows, expected):
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), (key, got, want)
    # the LoRA changes the samples: the grid's rows (strengths 0, 1, -0.5) differ visibly
    import numpy as np
    from PIL import Image
    grid = np.asarray(Image.open(comfyui.output_path(outputs["5"]["images"][0])), dtype=np.float64)
    row = grid.shape[0] // 3
    print(f"mean |strength 1 - strength 0| = {np.abs(grid[row:2 * row] - grid[:row]).mean():.2f} / 255")
    assert np.abs(grid[row:2 * row] - grid[:row]).mean() > 1.0


def resume_prompt(ckpt, lora_name, steps, resume_state="none", lr=0.05):
    prompt = train_prompt(ckpt, steps=steps, lora_name=lora_name, sampling_steps=3)
    prompt = {k: prompt[k] for k in ("1", "2", "3", "20")}
    prompt["3"]["inputs"].update(resume_state=resume_state, learning_rate=lr)
    prompt["20"]["inputs"]["save_every"] = 1
    return prompt


def preview(path):
    """(the metadata, the pixels) of a LoRA snapshot's preview PNG."""
    import json

    import numpy as np
    from PIL import Image
    with Image.open(path) as image:
        return json.loads(image.text["comfy_draft"]), np.asarray(image.convert("RGB"), dtype=np.int16)


def pixel_gap(a, b):
    return abs(a[1] - b[1]).max()


def test_a_saved_state_resumes_on_the_canvas_to_the_uninterrupted_lora(comfyui, tiny_sd15):
    from comfyui_harness import PromptError
    lora_dir = comfyui.folder_paths.get_folder_paths("loras")[0]
    comfyui.run(resume_prompt(tiny_sd15, "draft/straight", 3))
    comfyui.run(resume_prompt(tiny_sd15, "draft/resumed", 2))
    state = "draft/resumed_00001_.state.pt"
    assert state in comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTTrainLoRA"].INPUT_TYPES()["optional"]["resume_state"][0]
    assert (comfyui.base_dir / "models" / "loras" / "draft" / "resumed_00001_.step-1.safetensors").exists()
    history = comfyui.run(resume_prompt(tiny_sd15, "draft/resumed", 3, resume_state=state))
    assert "reward" in history["outputs"]["3"]["text"][0]
    assert [m["step"] for m in pack_nodes(comfyui).CHART_HISTORY["3"]["steps"]] == [1, 2, 3]  # the chart shows the whole run
    straight = load_kohya_file(f"{lora_dir}/draft/straight_00001_.safetensors")
    resumed = load_kohya_file(f"{lora_dir}/draft/resumed_00002_.safetensors")
    assert straight[1]["comfy_draft_steps"] == resumed[1]["comfy_draft_steps"] == "3"
    for key, value in straight[0].items():
        torch.testing.assert_close(resumed[0][key].float(), value.float(), rtol=1e-3, atol=1e-5)

    # a preview beside every LoRA snapshot, from the same noise each time; ComfyUI's model library shows it
    from app.model_manager import ModelFileManager
    previews = {name: preview(f"{lora_dir}/draft/{name}.png") for name in
                ("straight_00001_.step-1", "straight_00001_.step-2", "straight_00001_", "resumed_00001_.step-1",
                 "resumed_00002_")}
    assert all(meta["prompts"] == ["a red apple", "a blue car"] for meta, _ in previews.values())
    assert [meta["step"] for meta, _ in previews.values()] == [1, 2, 3, 1, 3]
    assert pixel_gap(previews["straight_00001_.step-1"], previews["resumed_00001_.step-1"]) <= 1
    assert pixel_gap(previews["straight_00001_"], previews["resumed_00002_"]) <= 1  # resumed = uninterrupted
    assert pixel_gap(previews["straight_00001_.step-1"], previews["straight_00001_"]) > 1  # the LoRA changed them
    assert ModelFileManager().get_model_previews(f"{lora_dir}/draft/straight_00001_.step-1.safetensors") == \
        [f"{lora_dir}/draft/straight_00001_.step-1.png"]

    with pytest.raises(PromptError, match="different configuration .*lr"):
        comfyui.run(resume_prompt(tiny_sd15, "draft/resumed", 4, resume_state=state, lr=0.01))


def test_an_interrupted_node_run_and_cli_run_leave_the_same_files_and_resume_alike(comfyui, tiny_sd15, tmp_path,
                                                                                   monkeypatch):
    """The node and the command line share one run (`comfy_draft.run`): interrupted with a snapshot every step, each
    leaves the same files, named from its LoRA's stem (the step snapshots, the partial LoRA of the step it stopped
    at, the training state and the log), and each resumes from its state to the end with the whole log."""
    import os
    import signal
    import subprocess

    import comfy.model_management
    import server
    from comfyui_harness import PromptError

    def left(folder, stem):  # the run's files, their stem replaced; the node's preview images aside
        return sorted(p.name.replace(stem, "<stem>") for p in folder.iterdir()
                      if p.name.startswith(stem) and p.suffix != ".png")

    def expected(stopped):
        return sorted([f"<stem>.step-{k}.safetensors" for k in range(1, stopped + 1)] +
                      [f"<stem>.partial-{stopped}.safetensors", "<stem>.state.pt", "<stem>.jsonl"])

    # The node, interrupted as Cancel does (ComfyUI's interrupt flag, seen at the end of step 2 of 4).
    instance = server.PromptServer.instance
    send = instance.send_sync

    def send_and_cancel(event, data, *args):
        send(event, data, *args)
        if event == "comfy_draft.train_step" and data["step"] == 2:
            comfy.model_management.interrupt_current_processing()
    monkeypatch.setattr(instance, "send_sync", send_and_cancel)
    with pytest.raises(PromptError):
        comfyui.run(resume_prompt(tiny_sd15, "draft/cancelled", 4))
    monkeypatch.setattr(instance, "send_sync", send)
    loras = comfyui.base_dir / "models" / "loras" / "draft"
    states = pathlib.Path(comfyui.folder_paths.get_output_directory()) / "draft_training" / "draft"
    node_files = left(loras, "cancelled_00001_") + left(states, "cancelled_00001_")
    assert sorted(node_files) == expected(2)

    # The command line, interrupted by Ctrl-C once it has printed a step.
    out = tmp_path / "cli.safetensors"
    command = [sys.executable, "-m", "comfy_draft", "train", "--model", "digits", "--reward", "digit", "--reward-text",
               "prompted", "--cfg", "1", "--sampling-steps", "4", "--prompts", "a 1", "a 7", "--batch-size", "2",
               "--device", "cpu", "--save-every", "1", "--print-every", "1", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # Ctrl-C's default action in the child even when the suite runs in the background (`make test &`), where the
    # shell starts it with SIGINT ignored and Python, seeing that, never raises KeyboardInterrupt.
    proc = subprocess.Popen([*command, "--steps", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if line.startswith("step 2/"):
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted at step" in err, err
    stopped = torch.load(tmp_path / "cli.state.pt", weights_only=True)["step"]
    assert stopped >= 2 and left(tmp_path, "cli") == expected(stopped)

    # Each resumes from its state to the end, its log going on.
    comfyui.run(resume_prompt(tiny_sd15, "draft/cancelled", 4, resume_state="draft/cancelled_00001_.state.pt"))
    resumed = load_kohya_file(loras / "cancelled_00002_.safetensors")[1]
    node_log = (states / "cancelled_00001_.jsonl").read_text().splitlines()
    result = subprocess.run([*command, "--steps", str(stopped + 2), "--resume"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    cli_log = (tmp_path / "cli.jsonl").read_text().splitlines()
    assert resumed["comfy_draft_steps"] == "4" and [json.loads(m)["step"] for m in node_log] == [1, 2, 3, 4]
    assert load_kohya_file(out)[1]["comfy_draft_steps"] == str(stopped + 2)
    assert [json.loads(m)["step"] for m in cli_log] == list(range(1, stopped + 3))
