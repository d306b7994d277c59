"""Real size on the CPU (issue 13): the full SD1.5 UNet (860M parameters, random weights) trains two
DRaFT-LV steps through the DRaFTTrainLoRA node in the in-process ComfyUI, and the LoRA file it saves,
applied by ComfyUI's own LoraLoaderModelOnly, reproduces the trained model.

The checkpoint (SD1.5's exact layout, 2 GB in fp16) is written once by bench/speed.py into
.cache/bench/ (15 s). Peaks at about 9.5 GiB resident and under a minute on 2 idle cores.
"""
import gc
import math
import pathlib
import resource
import sys
import time
import weakref

import pytest
import torch
from comfyui_harness import assert_loraloader_reproduces, model_outputs

from comfy_draft.lora import load_kohya_file

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
SD15_UNET_PARAMETERS = 859_520_964  # runwayml/stable-diffusion-v1-5's UNet


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


@pytest.fixture(scope="module")
def real_sd15(comfyui):
    """File name (in ComfyUI's checkpoints folder) of bench/speed.py's full-size random SD1.5 checkpoint."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import speed  # bench/speed.py (it handles its own imports)

    started = time.perf_counter()
    path = speed.random_checkpoint("sd15", torch.device("cpu"))
    print(f"\nreal size: checkpoint {path.name} ready in {time.perf_counter() - started:.1f} s")
    link = comfyui.base_dir / "models" / "checkpoints" / path.name
    if not link.exists():
        link.symlink_to(path)
    return path.name


def train_prompt(ckpt):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "DRaFTBuiltinReward", "inputs": {"kind": "brightness"}},
        "3": {"class_type": "DRaFTTrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward": ["2", 0],
            "prompts": "a red apple", "negative_prompt": "", "variant": "draft-lv", "training_steps": 2,
            "sampling_steps": 4, "cfg": 5.0, "width": 64, "height": 64, "batch_size": 1, "learning_rate": 0.05,
            "rank": 4, "seed": 0, "lora_name": "draft/real_sd15"}},  # default options: draft-lv n = 2
    }


@pytest.mark.slow
def test_full_size_sd15_trains_through_the_node_and_its_lora_loads_in_comfyui(comfyui, real_sd15, monkeypatch,
                                                                               caplog):
    import comfy.model_management

    node_class = comfyui.nodes.NODE_CLASS_MAPPINGS["DRaFTTrainLoRA"]
    node_module = sys.modules[node_class.__module__]
    # Record what the node receives and returns, and its Trainer (whose model is the one trained).
    calls, trainers = [], []
    train = node_class.train

    def recording_train(self, **inputs):
        out = train(self, **inputs)
        calls.append((inputs["model"], out["result"]))
        return out

    class RecordingTrainer(node_module.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(node_class, "train", recording_train)
    monkeypatch.setattr(node_module, "Trainer", RecordingTrainer)

    try:
        started = time.perf_counter()
        history = comfyui.run(train_prompt(real_sd15))
        trained_s = time.perf_counter() - started
        assert len(calls) == len(trainers) == 1, "the node ran once, with one nodes.Trainer"
        ((base_model, (node_model, path, curve, final_reward)),), (trainer,) = calls, trainers
        calls.clear(), trainers.clear()

        unet = base_model.model.diffusion_model
        assert type(base_model.model.model_config).__name__ == "SD15"
        assert sum(p.numel() for p in unet.parameters()) == SD15_UNET_PARAMETERS
        text = history["outputs"]["3"]["text"][0]
        assert "reward" in text and trainer.gradient_checkpointing_reason in text  # the choice of "auto", explained
        assert [m["step"] for m in trainer.history] == [1, 2]
        assert math.isfinite(final_reward) and curve.shape[0] == 1
        # At 64 x 64 the middle block sees 1 x 1 latents: its self-attention has one token, whose softmax
        # is 1 whatever the query and key, so those two LoRAs get no gradient. All others learn.
        untrained = {n for n, lora in trainer.loras.items() if not lora.up.abs().sum() > 0}
        assert untrained == {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
                             "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"}, trainer.history

        state_dict, metadata = load_kohya_file(path)
        assert metadata["ss_base_model_version"] == "sd_v1" and metadata["comfy_draft_steps"] == "2"
        modules = {k.rsplit(".", 2)[0] for k in state_dict if k.endswith(".lora_up.weight")}
        assert len(modules) == len(trainer.loras)
        # Every one of SD1.5's 16 transformer blocks (6 down, 1 mid, 9 up) has its LoRAs in the file.
        assert len([m for m in modules if m.endswith("attn2_to_k")]) == 16
        assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k" in modules
        assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q" in modules

        g = torch.Generator().manual_seed(0)
        x, sigma, cond = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([3.0]), torch.randn(1, 77, 768, generator=g)
        with torch.inference_mode():
            trained = model_outputs(trainer.backend.model, x, sigma, cond)  # the LoRA-wrapped training copy
        copies = (trainer.backend.model.model, trainer.backend.vae_model)  # the node's own copies of UNet and decoder
        training_weights = [weakref.ref(p) for m in copies for p in m.parameters()]
        del copies
        del trainer  # its copy of the UNet: 3.4 GB
        comfy.model_management.unload_all_models()
        gc.collect()

        lora_name = pathlib.Path(path).relative_to(comfyui.folder_paths.get_folder_paths("loras")[0]).as_posix()
        with torch.inference_mode():
            (patched,) = comfyui.nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, lora_name, 1.0)
            assert len(patched.patches) == len(modules)  # every LoRA module found its weight
            theirs = model_outputs(patched, x, sigma, cond)
            returned = model_outputs(node_model, x, sigma, cond)
            base = model_outputs(base_model, x, sigma, cond)
        assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
        assert_loraloader_reproduces(trained, theirs, base, "real SD1.5, trained vs LoraLoader: ")
        assert_loraloader_reproduces(returned, theirs, base, "real SD1.5, node's MODEL vs LoraLoader: ")
        print(f"real size: node run (load, 2 DRaFT-LV steps, save) {trained_s:.1f} s, "
              f"peak RSS {peak_rss_gb():.2f} GiB")
        del patched, node_model
        comfy.model_management.unload_all_models()
        gc.collect()
        # Nothing keeps the node's training copies alive once it has returned (3.4 GB per run here).
        alive = [t for t in (ref() for ref in training_weights) if t is not None]
        assert len(alive) == 0, (f"{len(alive)} of the {len(training_weights)} weights of the node's training copies "
                                 f"({sum(t.nbytes for t in alive) / 2 ** 30:.2f} GiB) outlived the node")
    finally:
        calls.clear(), trainers.clear()
        comfy.model_management.unload_all_models()
        comfyui.executor.reset()  # its output cache holds the 860M-parameter model until the next prompt
        gc.collect()
