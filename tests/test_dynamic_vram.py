"""ComfyUI's DynamicVRAM (comfy-aimdo), forced on the CPU: the training copy of a MODEL has one weight dtype.

On NVIDIA with torch >= 2.8, ComfyUI's main.py enables DynamicVRAM when comfy-aimdo initialises: it sets
`comfy.memory_management.aimdo_enabled` and `comfy.model_patcher.CoreModelPatcher = ModelPatcherDynamic`. The
backend's training copy is then reloaded through the memory-mapped loader (`comfy.utils.load_safetensors`), and
comfy.ops builds the Linear weights lazily from the file's tensors, in the file's dtype, while the convolutions are
made in ComfyUI's dtype: a copy of mixed dtypes, on which sampling fails ("mat1 and mat2 must have the same dtype").
Here the file is fp16 and ComfyUI (--cpu) chooses fp32 weights."""
import collections

import torch

from comfy_draft import rewards
from comfy_draft.trainer import TrainConfig, Trainer
from comfy_draft.validation import FIRST_HELD_OUT_SEED, held_out_images


def force_dynamic_vram(monkeypatch):
    """What main.py sets when comfy-aimdo initialises, undone by `monkeypatch` after the test. comfy-aimdo's native
    memory map needs a GPU; on the CPU a stand-in reads the same tensors, in the file's dtype, as it does."""
    import comfy.memory_management
    import comfy.model_patcher
    import comfy.utils
    import safetensors

    def load_safetensors(ckpt):  # comfy.utils.load_safetensors without comfy_aimdo.model_mmap
        with safetensors.safe_open(ckpt, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}

    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcherDynamic)
    monkeypatch.setattr(comfy.memory_management, "aimdo_enabled", True)
    monkeypatch.setattr(comfy.utils, "load_safetensors", load_safetensors)


def test_the_training_copy_reloaded_under_dynamic_vram_has_the_models_dtype(comfyui, tiny_sd15, monkeypatch):
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    from comfy_draft.backends.comfyui import TrainingBackend

    path = str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15))
    # The node's objects, made in inference mode as a node makes them, without DynamicVRAM: on a GPU its own patcher
    # casts each weight per op; on the CPU ComfyUI falls back to the plain ModelPatcher, which does not.
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(path)[:3]
    dtype = model.model.get_dtype()
    file_dtypes = {t.dtype for k, t in comfy.utils.load_torch_file(path).items() if k.startswith("model.")}
    assert file_dtypes == {torch.float16} and dtype == torch.float32  # the file's dtype is not ComfyUI's choice
    original = {n: p for n, p in model.model.diffusion_model.named_parameters()}

    force_dynamic_vram(monkeypatch)
    try:
        backend = TrainingBackend(model, clip, vae)  # reloads the UNet from its file, through the lazy ops
        copy = dict(backend.model.model.diffusion_model.named_parameters())
        dtypes = collections.Counter(str(p.dtype) for p in copy.values() if p.is_floating_point())
        assert set(dtypes) == {str(dtype)}, f"the training copy's UNet weights: {dict(dtypes)}"
        assert all(p.dtype == dtype and p is not copy[n] for n, p in original.items())  # the MODEL as it was

        def train_one_step(backend, precision):
            config = TrainConfig(prompts=["a red apple"], steps=1, sampling_steps=2, cfg=3.0, width=64, height=64,
                                 batch_size=1, lr=1e-3, seed=0, lv_samples=1, precision=precision)
            trainer = Trainer(backend, rewards.builtin_reward("brightness"), config)
            with torch.inference_mode():  # as the node trains
                trainer.train()
            assert len(trainer.history) == 1 and torch.cat([p.grad.flatten() for p in trainer.params]).abs().max() > 0

        train_one_step(backend, "bf16")  # under autocast, as on a GPU ("auto")
        images = held_out_images(backend, ["a green pear"], [FIRST_HELD_OUT_SEED], "", 3.0, 2, 64, 64)  # no autocast
        assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
        train_one_step(TrainingBackend(model, clip, vae), "fp32")  # a fresh copy: one set of LoRAs on each
    finally:
        comfy.model_management.unload_all_models()
