"""The memory estimate against what autograd really keeps, and the memory options of the trainer."""
import pytest
import torch
from test_trainer import config
from tiny_diffusers import tiny_pixel_backend

from comfy_draft import memory, rewards
from comfy_draft.trainer import Trainer


def test_estimate_matches_the_tensors_a_step_saves_without_checkpointing(tmp_path):
    backend = tiny_pixel_backend(tmp_path)
    reward = rewards.builtin_reward("sharpness")
    trainer = Trainer(backend, reward, config(gradient_checkpointing=False, batch_size=3, width=32, height=32, lv_samples=2))
    estimate = trainer.memory_estimate()
    measured = memory.saved_bytes(lambda: trainer.micro_batch(torch.Generator().manual_seed(0)))
    assert 0.8 < estimate["activations"] / measured < 1.25, (estimate, measured)
    assert estimate["weights"] == sum(t.numel() * t.element_size() for m in backend.modules()
                                      for t in [*m.parameters(), *m.buffers()])
    assert estimate["training"] == 16 * sum(p.numel() for p in trainer.params)
    assert "estimated peak memory" in memory.describe(estimate)


@pytest.mark.parametrize("variant,checkpointing", [("draft-lv", True), ("draft", True), ("ddpo", False),
                                                   ("graft", False)])
def test_estimate_matches_the_peak_of_a_step(tmp_path, variant, checkpointing):
    """Against the peak of live tensors through forward and backward, recomputation included: a device-independent
    stand-in for a GPU's max_memory_allocated. ddpo (its update's timesteps batched per call) and graft differentiate
    one model call at a time."""
    from tensor_memory import PeakTensorMemory

    trainer = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("sharpness"),
                      config(variant=variant, batch_size=2, width=32, height=32, gradient_checkpointing=checkpointing))
    estimate = trainer.memory_estimate()["activations"]
    with PeakTensorMemory() as measured:
        trainer.micro_batch(torch.Generator().manual_seed(0))
    print(f"{variant}: estimated {estimate / 2**20:.1f} MiB, peak {measured.peak / 2**20:.1f} MiB")
    assert 0.8 < estimate / measured.peak < 1.25


def test_checkpointing_lowers_the_estimate_and_keeps_only_inputs(tmp_path):
    def trainer(checkpointing):
        return Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"),
                       config(variant="draft", gradient_checkpointing=checkpointing, width=32, height=32))
    full, checkpointed = trainer(False), trainer(True)
    assert checkpointed.memory_estimate()["activations"] * 3 < full.memory_estimate()["activations"]
    kept = memory.saved_bytes(lambda: checkpointed.micro_batch(torch.Generator().manual_seed(0)))
    assert kept * 3 < memory.saved_bytes(lambda: full.micro_batch(torch.Generator().manual_seed(0)))


def test_reward_resolution_decodes_smaller_images(tmp_path):
    trainer = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"),
                      config(width=32, height=32, reward_resolution=16))
    metrics, images = trainer.train_step()
    assert images.shape[-2:] == (16, 16) and torch.isfinite(torch.tensor(metrics["reward"]))
