"""DRaFT through the ComfyUI backend on the tiny SD1.5 checkpoint, and its LoRA file through ComfyUI's own loader."""
import logging

import pytest
import torch
from comfyui_harness import assert_loraloader_reproduces, model_outputs

from comfy_draft import rewards
from comfy_draft.lora import load_kohya_file
from comfy_draft.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tiny_sd15_objects(comfyui, tiny_sd15):
    """MODEL, CLIP, VAE as a ComfyUI node makes them: inside inference mode (inference tensors)."""
    import comfy.sd
    with torch.inference_mode():
        return comfy.sd.load_checkpoint_guess_config(
            str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15)))[:3]


def test_vae_decodes_in_comfyuis_dtype_under_fp16_autocast(comfyui, tiny_sd15_objects):
    """ComfyUI never runs SD VAEs in fp16 (they overflow); fp16 training autocast must not either."""
    from comfy_draft.backends.comfyui import TrainingBackend

    backend = TrainingBackend(*tiny_sd15_objects)
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))  # 16 px: the dtype matters, not the size
    with torch.no_grad():
        exact = backend.decode(z)
        with torch.autocast("cpu", dtype=torch.float16):
            ours = backend.decode(z)
    assert backend.vae_dtype == torch.float32  # ComfyUI's choice on this CPU
    assert torch.equal(ours, exact)  # the same float32 decoder and ops on the same input: bit for bit (fp16: 1e-3 off)
    with pytest.raises(ValueError, match="outside torch.inference_mode"):  # a node's model must be copied
        TrainingBackend(*tiny_sd15_objects, copy_model=False)


@pytest.mark.slow
def test_a_model_from_a_custom_loader_trains_from_an_in_memory_copy_with_its_patches_applied_once(comfyui, tiny_sd15):
    """Custom loaders build models from state dicts, leaving ComfyUI no file to reload a fresh copy from."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    from comfy_draft.backends.comfyui import TrainingBackend

    sd = comfy.utils.load_torch_file(str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15)))
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_state_dict_guess_config(sd)[:3]
        patched = model.clone()  # a weight patch on top (as model merges add), applied in place when loaded
        key, weight = next((k, w) for k, w in patched.model_state_dict().items() if k.endswith("attn2.to_k.weight"))
        patched.add_patches({key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)),)}, 0.5)
    assert model.cached_patcher_init is None

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma, cond = torch.tensor([2.0]), torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        base = model_outputs(model, x, sigma, cond)
        reference = model_outputs(patched, x, sigma, cond)  # now patched in place
    backend = TrainingBackend(patched, clip, vae)
    backend.add_loras(rank=4)  # zero-initialised: the model itself
    with torch.inference_mode():
        ours = model_outputs(backend.model, x, sigma, cond)
    comfy.model_management.unload_all_models()
    assert (reference - base).abs().max() > 1e-3 * reference.abs().max()
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())

    config = TrainConfig(prompts=["a red apple"], variant="draft-k", grad_steps=1, steps=1, sampling_steps=3,
                         cfg=3.0, width=64, height=64, batch_size=1, lr=0.05, seed=0)
    trainer = Trainer(backend, rewards.builtin_reward("brightness"), config)
    with torch.inference_mode():
        trainer.train()  # the copy's weights are normal tensors: autograd may save them
    assert all(lora.up.abs().sum() > 0 for lora in trainer.loras.values())


@pytest.mark.slow
def test_trained_lora_loads_in_comfyui_and_reproduces_the_training_model(comfyui, tiny_sd15_objects, caplog):
    import comfy.model_management
    import nodes
    from comfy_draft.backends.comfyui import TrainingBackend

    model, clip, vae = tiny_sd15_objects
    backend = TrainingBackend(model, clip, vae)
    config = TrainConfig(prompts=["a red apple", "a blue car"], variant="draft-k", grad_steps=1, steps=2,
                         sampling_steps=4, cfg=5.0, width=64, height=64, batch_size=2, lr=0.05, seed=3)
    trainer = Trainer(backend, rewards.builtin_reward("brightness"), config)
    with torch.inference_mode():  # as inside a node
        history = trainer.train()
    assert [m["step"] for m in history] == [1, 2] and all(torch.isfinite(torch.tensor(m["reward"])) for m in history)
    assert all(lora.up.abs().sum() > 0 for lora in trainer.loras.values())

    lora_dir = comfyui.folder_paths.get_folder_paths("loras")[0]
    path = trainer.save_lora(f"{lora_dir}/draft_tiny_sd15.safetensors", overwrite=True)
    state_dict, metadata = load_kohya_file(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in state_dict
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert "draft_tiny_sd15.safetensors" in comfyui.folder_paths.get_filename_list("loras")

    with caplog.at_level(logging.WARNING), torch.inference_mode():
        (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "draft_tiny_sd15.safetensors", 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched.patches) == len(trainer.loras)  # every LoRA module found its weight

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0, 3.0])
    cond = backend.encode(["a red apple", "a blue car"])[0][0]
    with torch.inference_mode():
        ours = model_outputs(backend.model, x, sigma, cond)
        theirs = model_outputs(patched, x, sigma, cond)
        base = model_outputs(model, x, sigma, cond)
    comfy.model_management.unload_all_models()
    assert_loraloader_reproduces(ours, theirs, base)
