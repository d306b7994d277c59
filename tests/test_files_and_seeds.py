"""Files as ComfyUI's own outputs are (umask permissions), and runs that depend on nothing but their settings."""
import os

import torch
from tiny_diffusers import tiny_pixel_backend

from comfy_draft import rewards
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
        lora, state = trainer.save_lora(tmp_path / "a.safetensors"), trainer.save_checkpoint(tmp_path / "a.state.pt")
        os.umask(0o027)
        group_only = trainer.save_lora(tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert os.stat(lora).st_mode & 0o777 == 0o644 and os.stat(state).st_mode & 0o777 == 0o644
    assert os.stat(group_only).st_mode & 0o777 == 0o640


def test_the_same_seed_gives_the_same_lora_and_another_seed_another(tmp_path):
    first, again, other = (train(tmp_path, seed).loras.state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)  # LoRA initialisation included
    assert any(not torch.equal(first[k], other[k]) for k in first)
