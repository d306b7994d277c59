"""Files as ComfyUI's own outputs are (umask permissions), and runs that depend on nothing but their settings."""
import os

import torch
from tiny_diffusers import tiny_pixel_backend

from comfy_draft import rewards
from comfy_draft.lora import load_kohya_file
from comfy_draft.trainer import TrainConfig, Trainer


def train(tmp_path, seed):
    config = TrainConfig(prompts=["a red square"], steps=1, sampling_steps=3, width=16, height=16, batch_size=1,
                         seed=seed)
    trainer = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"), config)
    trainer.train()
    return trainer


def test_lora_files_and_states_take_the_umasks_permissions(tmp_path):
    trainer = train(tmp_path, seed=0)
    old = os.umask(0o022)
    try:
        lora, state = trainer.save_lora(tmp_path / "a.safetensors"), trainer.save_state(tmp_path / "a.state.pt")
        os.umask(0o027)
        group_only = trainer.save_lora(tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert os.stat(lora).st_mode & 0o777 == 0o644 and os.stat(state).st_mode & 0o777 == 0o644
    assert os.stat(group_only).st_mode & 0o777 == 0o640


def test_the_same_seed_gives_the_same_lora_and_another_seed_another(tmp_path):
    runs = [train(tmp_path, seed) for seed in (0, 0, 1)]
    first, again, other = (run.loras.state_dict() for run in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)  # LoRA initialisation included
    assert any(not torch.equal(first[k], other[k]) for k in first)
    files = [run.save_lora(tmp_path / f"{i}.safetensors") for i, run in enumerate(runs)]
    with open(files[0], "rb") as a, open(files[1], "rb") as b:
        assert a.read() == b.read()  # metadata included (safetensors alone writes it in hash order)
    state_dict, metadata = load_kohya_file(files[0])
    assert all(torch.equal(state_dict[k], v) for k, v in runs[0].loras.kohya_state_dict().items())
    assert metadata["comfy_draft_steps"] == "1"
