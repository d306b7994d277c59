"""`python -m comfy_draft train` end to end on a tiny diffusers pipeline folder."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from tiny_diffusers import tiny_pipeline

from comfy_draft.lora import load_kohya_file


def run_cli(*args, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "comfy_draft", *args], capture_output=True, text=True, env=env)
    if check and result.returncode:
        raise AssertionError(result.stdout + result.stderr)
    return result


@pytest.mark.slow
def test_cli_trains_writes_lora_log_checkpoint_and_resumes(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "bright.safetensors"
    common = ["train", "--model", str(tmp_path / "pipe"), "--out", str(out), "--reward", "brightness",
              "--prompts", "a red square", "a blue circle", "--sampling-steps", "4", "--width", "32", "--height", "32",
              "--batch-size", "1", "--cfg", "3", "--device", "cpu"]
    result = run_cli(*common, "--steps", "2")
    assert "step 2/2" in result.stdout and out.exists()
    log = [json.loads(line) for line in (tmp_path / "bright.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [1, 2] and all("reward" in m and "grad_norm" in m for m in log)
    state_dict, metadata = load_kohya_file(out)
    assert metadata["comfy_draft_variant"] == "draft-lv" and metadata["comfy_draft_steps"] == "2"
    pipe.load_lora_weights(str(out))  # diffusers' own loader converts every key

    refused = run_cli(*common, "--steps", "3", check=False)
    assert refused.returncode and "exists: pass --overwrite" in refused.stderr
    result = run_cli(*common, "--steps", "3", "--resume")
    assert "step 3/3" in result.stdout and "step 1/" not in result.stdout
    assert len((tmp_path / "bright.jsonl").read_text().splitlines()) == 3
    assert load_kohya_file(out)[1]["comfy_draft_steps"] == "3"


@pytest.mark.slow
def test_cli_validation_keep_best_and_sweep_on_the_digit_model(tmp_path):
    out = tmp_path / "digits.safetensors"
    common = ["--model", "digits", "--reward", "digit", "--reward-text", "prompted", "--cfg", "1",
              "--sampling-steps", "5"]  # no --width/--height: the digit model's own 16 x 16
    result = run_cli("train", *common, "--out", str(out), "--prompts", "a 1", "a 7", "--steps", "3",
                     "--batch-size", "2", "--lr", "3e-3", "--val-prompts", "the digit one", "the digit seven",
                     "--val-seeds", "3", "--val-every", "2", "--judge", "digit=judge_classifier,prompted",
                     "--judge", "brightness", "--criterion", "digit")
    log = [json.loads(line) for line in (tmp_path / "digits.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log if "val_digit" in m] == [2, 3]
    assert json.loads(load_kohya_file(out)[1]["comfy_draft_config"])["width"] == 16
    assert {"val_reward", "val_brightness", "val_diversity", "val_feature_diversity"} <= set(log[-1])
    assert "val_digit" in result.stdout and out.exists()
    assert load_kohya_file(out)[1]["comfy_draft_validation"]

    refused = run_cli("train", *common, "--out", str(tmp_path / "x.safetensors"), "--prompts", "a 1",
                      "--val-prompts", "one", "--criterion", "nope", check=False)
    assert refused.returncode and "criterion 'nope'" in refused.stderr

    result = run_cli("sweep", *common, "--lora", str(out), "--out", str(tmp_path / "sweep"), "--prompts", "the digit one",
                     "--strengths", "0", "1", "--seeds", "2", "--judge", "digit=judge_classifier,prompted")
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert [r["strength"] for r in rows] == [0.0, 1.0] and "digit" in rows[0]
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0 and "| strength |" in result.stdout


def test_cli_bad_input_is_refused_with_a_clear_message(tmp_path):
    import torch
    from safetensors.torch import save_file

    common = ["--model", "digits", "--reward", "brightness", "--prompts", "a 1"]
    sweep = ["sweep", *common, "--out", str(tmp_path / "sweep")]
    refused = run_cli(*sweep, "--lora", str(tmp_path / "missing.safetensors"), check=False)
    assert refused.returncode and "LoRA file not found" in refused.stderr
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "empty.safetensors"))
    refused = run_cli(*sweep, "--lora", str(tmp_path / "empty.safetensors"), check=False)
    assert refused.returncode and "holds no kohya LoRA weights" in refused.stderr
    refused = run_cli("train", "--model", "digits", "--reward", "brightnes", "--prompts", "a 1",
                      "--out", str(tmp_path / "x.safetensors"), check=False)
    assert refused.returncode and "unknown reward 'brightnes'" in refused.stderr and "brightness" in refused.stderr


def test_cli_scores_image_files(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from comfy_draft import rewards

    rng = np.random.default_rng(0)
    arrays = {"dark.png": rng.integers(0, 90, (24, 40, 3), dtype=np.uint8),
              "bright.jpg": rng.integers(150, 256, (32, 32, 3), dtype=np.uint8)}
    for name, array in arrays.items():
        Image.fromarray(array).save(tmp_path / name, quality=100)
    result = run_cli("score", "--reward", "brightness", "--device", "cpu", *[str(tmp_path / n) for n in arrays])
    printed = dict(line.rsplit(": ", 1) for line in result.stdout.splitlines())
    reward = rewards.builtin_reward("brightness")
    for name in arrays:  # what the library gives on the decoded file
        pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / name), dtype=np.float32) / 255).permute(2, 0, 1)
        assert float(printed[str(tmp_path / name)]) == pytest.approx(reward(pixels[None], [""]).item(), abs=1e-4)
    assert float(printed[str(tmp_path / "bright.jpg")]) > float(printed[str(tmp_path / "dark.png")])
    assert "mean brightness" in result.stdout

    (tmp_path / "notes.png").write_text("not an image")
    refused = run_cli("score", "--reward", "brightness", str(tmp_path / "notes.png"), check=False)
    assert refused.returncode and "cannot read image" in refused.stderr
    (tmp_path / "resnet50.pth").write_text("<!DOCTYPE html><html>Sign in</html>")  # a saved login page
    refused = run_cli("score", "--reward", "imagenet_classifier", "--reward-file", str(tmp_path / "resnet50.pth"),
                      "--reward-text", "tabby cat", str(tmp_path / "dark.png"), check=False)
    assert refused.returncode and "resnet50.pth" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_cli_trains_a_single_file_checkpoint_through_comfyuis_loader(tmp_path, comfyui, tiny_sd15):
    from comfyui_harness import COMFY_DIR

    checkpoint = str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15))
    out = tmp_path / "apple.safetensors"
    common = ["--model", checkpoint, "--reward", "brightness", "--prompts", "a red apple",
              "--out", str(out)]
    result = run_cli("train", *common, "--comfyui", str(COMFY_DIR), "--variant", "draft-k", "--steps", "2",
                     "--sampling-steps", "3", "--width", "64", "--height", "64", "--batch-size", "1")
    assert "step 2/2" in result.stdout
    state_dict, metadata = load_kohya_file(out)
    assert metadata["ss_base_model_version"] == "sd_v1"  # ComfyUI detected the checkpoint's type itself
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in state_dict
    run_cli("sweep", "--model", checkpoint, "--reward", "brightness", "--lora", str(out), "--prompts", "a red apple",
            "--strengths", "0", "1", "--seeds", "1", "--sampling-steps", "3", "--width", "64", "--height", "64",
            "--comfyui", str(COMFY_DIR), "--out", str(tmp_path / "sweep"))
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert [r["strength"] for r in rows] == [0.0, 1.0] and rows[0]["reward"] != rows[1]["reward"]

    refused = run_cli("train", *common, "--overwrite", "--comfyui", str(tmp_path), check=False)
    assert refused.returncode and "not a ComfyUI folder" in refused.stderr
    (tmp_path / "page.safetensors").write_text("<html>Sign in</html>")  # a download gone wrong
    refused = run_cli("train", *common[:1], str(tmp_path / "page.safetensors"), *common[2:], "--overwrite",
                      "--comfyui", str(COMFY_DIR), check=False)
    assert refused.returncode and "could not load" in refused.stderr and "Traceback" not in refused.stderr


def test_help_names_each_default_once():
    out = run_cli("train", "--help").stdout
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "(default: cuda if available)" in out and "(default: cuda if available) (default" not in out
    assert "--steps STEPS         steps (default: 2000)" in out
    refused = run_cli("train", "--model", "digits", "--reward", "brightness", "--prompts", "a 1",
                      "--out", "x.safetensors", "--print-every", "0", check=False)
    assert refused.returncode and "--print-every must be >= 1, got 0" in refused.stderr


def test_progress_prints_plain_lines_without_a_terminal_and_a_bar_on_one(monkeypatch, capsys):
    from comfy_draft.cli import progress

    def run(first=1):
        show = progress(25, 10)
        for step in range(first, 26):
            show({"step": step, "reward": 0.5, "grad_norm": 0.125}, f"line {step}", news=step == 7)

    run()
    assert capsys.readouterr().out.split("\n")[:-1] == ["line 1", "line 7", "line 10", "line 20", "line 25"]
    run(first=12)  # a resumed run: its first step, then the usual ones
    assert capsys.readouterr().out.split("\n")[:-1] == ["line 12", "line 20", "line 25"]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    run()
    printed = capsys.readouterr()
    assert printed.out.strip() == "line 7"  # news above the bar
    assert "25/25" in printed.err and "reward=0.5000" in printed.err and "grad_norm=0.125" in printed.err
    show = progress(25, 10)  # a run that stops early (patience): closing ends the bar's line
    show({"step": 1, "reward": 0.5, "grad_norm": 0.125}, "line 1", news=False)
    show.close()
    assert capsys.readouterr().err.endswith("\n")


@pytest.mark.slow
def test_cli_same_seed_gives_the_same_lora_file_and_another_seed_another(tmp_path):
    common = ["train", "--model", "digits", "--reward", "digit", "--reward-text", "prompted", "--prompts", "a 1", "a 7",
              "--steps", "2", "--batch-size", "2", "--sampling-steps", "4", "--cfg", "1", "--device", "cpu"]
    for name, seed in (("first", "0"), ("again", "0"), ("other", "1")):
        run_cli(*common, "--seed", seed, "--out", str(tmp_path / f"{name}.safetensors"))
    assert (tmp_path / "first.safetensors").read_bytes() == (tmp_path / "again.safetensors").read_bytes()
    first, other = (load_kohya_file(tmp_path / f"{n}.safetensors")[0] for n in ("first", "other"))
    assert any(not (first[k] == other[k]).all() for k in first)


TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.mark.skipif(TENSORBOARD, reason="tensorboard is installed: the log is written instead")
def test_log_dir_without_tensorboard_says_what_to_install(tmp_path):
    refused = run_cli("train", "--model", "digits", "--reward", "brightness", "--prompts", "a 1",
                      "--out", str(tmp_path / "x.safetensors"), "--log-dir", str(tmp_path / "runs"), check=False)
    assert refused.returncode and "pip install tensorboard" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x.jsonl").exists()  # stopped before any work


@pytest.mark.slow
@pytest.mark.skipif(not TENSORBOARD, reason="tensorboard is optional and not installed")
def test_log_dir_writes_a_tensorboard_log(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli("train", "--model", "digits", "--reward", "brightness", "--prompts", "a 1", "--steps", "2",
            "--batch-size", "1", "--sampling-steps", "3", "--out", str(tmp_path / "x.safetensors"),
            "--log-dir", str(tmp_path / "runs"))
    events = EventAccumulator(str(tmp_path / "runs")).Reload()
    logged = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("reward")] == [1, 2]
    assert [e.value for e in events.Scalars("reward")] == pytest.approx([m["reward"] for m in logged])
