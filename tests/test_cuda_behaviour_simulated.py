"""The GPU path, simulated on the CPU: half-precision ComfyUI flags, a shared reward object, DynamicVRAM's native
handles, offloaded weights in a shared cast buffer, memory-dependent cond batching, fp16 loss scaling, and the
models that cannot train. Each test forces the hazard and fails on code that gets it wrong."""
import json
import logging

import pytest
import torch
from ui_workflows import training_options

from comfy_draft import rewards
from comfy_draft.backends import Backend
from comfy_draft.lora import load_kohya_file
from comfy_draft.trainer import TrainConfig, Trainer, autocast_dtype


# ----- precision ---------------------------------------------------------------------------------------------
def test_auto_precision_follows_the_model_and_the_cards_native_bf16(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    native = {}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native["bf16"] or including_emulation)
    native["bf16"] = True  # Ampere and later
    assert autocast_dtype("auto", cuda, torch.float32) == torch.bfloat16
    assert autocast_dtype("auto", cuda, torch.float16) == torch.float16  # fp16 weights: no re-cast per op
    native["bf16"] = False  # T4, V100, RTX 20xx: emulated bf16 only
    assert autocast_dtype("auto", cuda, torch.float32) == torch.float16
    assert autocast_dtype("bf16", cuda) == torch.bfloat16  # asked for explicitly
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cuda) is None


class OverflowOnce(rewards.Reward):
    """A reward whose gradient overflows (inf) in the first backward pass, as fp16 activations do now and then."""

    def __init__(self, reward):
        super().__init__()
        self.reward, self.name, self.fired = reward, reward.name, False

    def score(self, images, prompts):
        if not self.fired and images.requires_grad:
            def overflow(grad):
                self.fired = True
                return torch.full_like(grad, float("inf"))
            images.register_hook(overflow)
        return self.reward(images, prompts)


@pytest.mark.slow
def test_cli_fp16_overflow_skips_the_step_lowers_the_scale_and_trains_on(tmp_path, monkeypatch, capsys):
    from comfy_draft import cli
    build = cli.build_reward
    monkeypatch.setattr(cli, "build_reward", lambda args: OverflowOnce(build(args)))
    out = tmp_path / "fp16.safetensors"
    # two sampling steps of one image: fp16 is emulated on CPUs without AVX-512; the skip and the scale are the point
    cli.main(["train", "--model", "digits", "--reward", "digit", "--reward-text", "prompted", "--cfg", "1",
              "--sampling-steps", "2", "--prompts", "a 1", "a 7", "--steps", "3", "--batch-size", "1",
              "--precision", "fp16", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "step 1/3" in printed and "skipped: fp16 overflow, loss scale now 32768" in printed.splitlines()[1]
    assert "step 3/3" in printed and out.exists()
    log = [json.loads(line) for line in (tmp_path / "fp16.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in log] == [1, 0, 0] and all(m["grad_norm"] > 0 for m in log[1:])


def test_fp16_skips_stop_after_too_many_in_a_row_and_a_nonfinite_reward_stops_at_once(tmp_path, monkeypatch):
    from tiny_diffusers import tiny_pixel_backend

    from comfy_draft import trainer as trainer_module
    from comfy_draft.trainer import NonFiniteError

    class AlwaysOverflows(OverflowOnce):
        def score(self, images, prompts):
            self.fired = False
            return super().score(images, prompts)

    monkeypatch.setattr(trainer_module, "MAX_SKIPPED", 2)
    config = TrainConfig(prompts=["a red square"], steps=5, sampling_steps=2, width=8, height=8, batch_size=1,
                         precision="fp16")  # the least work: fp16 is emulated on CPUs without AVX-512
    trainer = Trainer(tiny_pixel_backend(tmp_path), AlwaysOverflows(rewards.builtin_reward("brightness")), config)
    with pytest.raises(NonFiniteError, match="overflowed 3 steps in a row"):
        trainer.train()
    assert [m["skipped"] for m in trainer.history] == [1, 1]
    assert all(lora.up.abs().sum() == 0 for lora in trainer.loras.values())  # no update from an overflowed step


class ConstantReward(rewards.Reward):
    name = "constant"

    def score(self, images, prompts):
        return images.amax(dim=(1, 2, 3)).clamp(min=2.0)  # saturated: no gradient reaches the images


def test_a_reward_without_gradient_warns_after_the_first_steps(tmp_path, caplog):
    from tiny_diffusers import tiny_pixel_backend
    config = TrainConfig(prompts=["a red square"], steps=4, sampling_steps=3, width=16, height=16, batch_size=1)
    assert isinstance(tiny_pixel_backend(tmp_path), Backend)  # the diffusers backend meets the contract too
    trainer = Trainer(tiny_pixel_backend(tmp_path), ConstantReward(), config)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert len(trainer.warnings) == 1 and "gradient was exactly zero in the first 3 steps" in trainer.warnings[0]
    assert sum("exactly zero" in r.getMessage() for r in caplog.records) == 1
    ok = Trainer(tiny_pixel_backend(tmp_path), rewards.builtin_reward("brightness"), config)
    ok.train()
    assert not ok.warnings


def test_cli_prints_the_zero_gradient_warning(tmp_path, monkeypatch, capsys):
    from comfy_draft import cli
    monkeypatch.setattr(cli, "build_reward", lambda args: ConstantReward())
    cli.main(["train", "--model", "digits", "--reward", "digit", "--prompts", "a 1", "--steps", "3",
              "--sampling-steps", "3", "--batch-size", "1", "--out", str(tmp_path / "flat.safetensors"),
              "--device", "cpu"])
    printed = capsys.readouterr()
    assert "warning: the reward's gradient was exactly zero in the first 3 steps" in printed.err
    assert "step 3/3" in printed.out


# ----- the reward object ComfyUI shares between nodes --------------------------------------------------------
TINY_CLIP, TINY_AESTHETIC_MLP = "tiny_open_clip.bin", "tiny_aesthetic_mlp.pth"


def write_tiny_aesthetic_reward(comfyui):
    """A LAION aesthetic reward file pair in models/reward_models: tiny_clip's 32-px open_clip ViT and an MLP on its
    32-dim embeddings (the family is checked against its reference in test_rewards_clip.py). A reward with weights
    that the trainer copies into half precision, cheap there on any CPU: an ImageNet classifier always runs at 224 px,
    and its fp16 forward and backward alone took 145 s on 2 Xeon cores (fp16 convolutions are emulated)."""
    import tiny_clip
    folder = comfyui.base_dir / "models" / "reward_models"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / TINY_AESTHETIC_MLP).exists():
        torch.save(tiny_clip.open_clip_model(tiny_clip.OPEN_CLIP, quick_gelu=True).state_dict(), folder / TINY_CLIP)
        tiny_clip.write_aesthetic_mlp(folder / TINY_AESTHETIC_MLP, tiny_clip.aesthetic_mlp(32))


def reward_nodes():
    return {"r": {"class_type": "DRaFTRewardLoader", "inputs": {
        "family": "aesthetic", "file": TINY_AESTHETIC_MLP, "clip_file": TINY_CLIP, "text": "", "maximize": True}}}


def score_prompt(text):
    return {**reward_nodes(),
            "i": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x8844cc}},
            "s": {"class_type": "DRaFTScoreImages", "inputs": {"images": ["i", 0], "reward": ["r", 0], "prompt": text}}}


@pytest.mark.slow
@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_half_precision_flags_train_through_the_node_and_leave_the_shared_reward_as_it_was(comfyui, half, monkeypatch):
    """ComfyUI started with --{half}-unet --{half}-vae (read at load time; set here as its command line would),
    a node-trained LoRA in `half`, then the same reward object scores the same image as before training.

    At the least work that takes every half-precision path (bf16/fp16 convolutions are emulated on CPUs without
    AVX-512: the 64-px version took 12 minutes on CI's EPYC): 16-px images (2 x 2 latents), one training step of two
    sampling steps, a checkpoint whose VAE decoder is SD's at a quarter of the width, a tiny CLIP reward."""
    import comfy.cli_args
    import comfy.model_management
    from tiny_models import tiny_sd15_small_decoder_checkpoint

    write_tiny_aesthetic_reward(comfyui)
    # its own names: a fresh load under these flags (and one without them for the sweep), not a cached one
    ckpt, plain = f"tiny_{half}.safetensors", "tiny_small_decoder.safetensors"
    for name in (ckpt, plain):
        if not (comfyui.base_dir / "models" / "checkpoints" / name).exists():
            (comfyui.base_dir / "models" / "checkpoints" / name).symlink_to(tiny_sd15_small_decoder_checkpoint(seed=0))

    before = comfyui.run(score_prompt("before"))["outputs"]["s"]["scores"][0]
    for flag in (f"{half}_unet", f"{half}_vae"):
        monkeypatch.setattr(comfy.cli_args.args, flag, True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[half]
    assert comfy.model_management.unet_dtype() == comfy.model_management.vae_dtype() == dtype  # the flags take
    train = {**reward_nodes(),
             "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
             "3": {"class_type": "DRaFTTrainLoRA", "inputs": {
                 "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward": ["r", 0], "prompts": "a goldfish",
                 "negative_prompt": "", "variant": "draft-lv", "training_steps": 1, "sampling_steps": 2, "cfg": 3.0,
                 "width": 16, "height": 16, "batch_size": 1, "learning_rate": 0.01, "rank": 2, "seed": 0,
                 "lora_name": f"draft/{half}", "options": ["o", 0]}},
             "o": training_options(lv_samples=1, precision=half)}
    history = comfyui.run(train)
    cached = [m[1]["nodes"] for m in comfyui.executor.status_messages if m[0] == "execution_cached"]
    assert "r" in cached[0]  # the very reward object the first prompt scored with
    text = history["outputs"]["3"]["text"][0]
    assert "reward" in text and "WARNING" not in text
    lora_file = comfyui.folder_paths.get_full_path("loras", text.split(":")[0])
    assert json.loads(load_kohya_file(lora_file)[1]["comfy_draft_config"])["precision"] == half  # trained in it
    monkeypatch.undo()
    after = comfyui.run(score_prompt("after"))
    assert "r" in [m[1]["nodes"] for m in comfyui.executor.status_messages if m[0] == "execution_cached"][0]
    # float32 both times, the same image: equal; this reward cast to half in place scores 5e-4 of it off
    assert after["outputs"]["s"]["scores"][0] == pytest.approx(before, rel=1e-6)

    # the sweep with the shared reward scores as with a fresh copy of it (float32 both: a reward cast in place
    # to half scores 5e-4 of it off, and an ImageNet classifier cast in place raised here)
    sweep = {**reward_nodes(),
             "c": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": plain}},
             "w": {"class_type": "DRaFTLoRAStrengthSweep", "inputs": {
                 "model": ["c", 0], "clip": ["c", 1], "vae": ["c", 2], "lora_name": text.split(":")[0],
                 "reward": ["r", 0], "prompts": "a goldfish", "negative_prompt": "", "strengths": "0, 1", "seeds": 1,
                 "first_seed": 5, "steps": 2, "cfg": 3.0, "width": 16, "height": 16}}}
    shared = comfyui.run(sweep)
    assert "r" in [m[1]["nodes"] for m in comfyui.executor.status_messages if m[0] == "execution_cached"][0]
    comfyui.executor.reset()  # forget every cached output: the reward is loaded again from its file
    fresh = comfyui.run(sweep)
    for got, want in zip(shared["outputs"]["w"]["rows"], fresh["outputs"]["w"]["rows"]):
        assert got["reward"] == pytest.approx(want["reward"], rel=1e-6)


# ----- copies without native handles -------------------------------------------------------------------------
class NativeHandle:
    """Stands in for comfy-aimdo's host buffers and VRAM mappings: copying one duplicates a raw pointer."""

    def __deepcopy__(self, memo):
        raise AssertionError("a native handle was duplicated")

    def __reduce_ex__(self, protocol):
        raise AssertionError("a native handle was duplicated")


@pytest.mark.slow
def test_trainable_copies_leave_dynamic_vram_handles_on_the_originals(comfyui, tiny_sd15):
    """A custom-loaded model (no file to reload from) and its VAE, carrying DynamicVRAM-style handles."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    from comfy_draft.backends.comfyui import TrainingBackend

    sd = comfy.utils.load_torch_file(str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15)))
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_state_dict_guess_config(sd)[:3]
    handle, pins = NativeHandle(), {"cuda:0": NativeHandle()}
    unet_linear = next(m for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear))
    vae_conv = next(m for m in vae.first_stage_model.decoder.modules() if isinstance(m, torch.nn.Conv2d))
    for module in (unet_linear, vae_conv):
        module._v = handle
    model.model.dynamic_pins = vae.first_stage_model.dynamic_pins = pins

    backend = TrainingBackend(model, clip, vae)
    assert isinstance(backend, Backend)
    assert model.cached_patcher_init is None  # the in-memory copy path
    copies = [*backend.model.model.modules(), *backend.vae_model.modules()]
    assert not any(hasattr(m, "_v") or hasattr(m, "dynamic_pins") for m in copies)
    assert unet_linear._v is handle and vae_conv._v is handle and model.model.dynamic_pins is pins
    assert backend.vae_model.encoder is None and vae.first_stage_model.encoder is not None
    assert not backend.model.is_dynamic()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = vae.decode(backend.latent_format.process_out(z)).movedim(-1, 1)  # ComfyUI's own decode
    torch.testing.assert_close(backend.decode(z, recompute=False), reference, atol=2e-5, rtol=0)
    comfy.model_management.unload_all_models()


@pytest.mark.slow
def test_fp16_vae_flag_never_decodes_in_fp16(comfyui, tiny_sd15, monkeypatch):
    import comfy.cli_args
    import comfy.sd

    from comfy_draft.backends.comfyui import TrainingBackend
    monkeypatch.setattr(comfy.cli_args.args, "fp16_vae", True)
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15)))[:3]
    assert vae.vae_dtype == torch.float16  # ComfyUI's choice under the flag
    backend = TrainingBackend(model, clip, vae)
    assert {p.dtype for p in backend.vae_model.parameters()} == {torch.float32}
    assert {p.dtype for p in vae.first_stage_model.parameters()} == {torch.float16}  # the original as it was


# ----- offloaded weights and memory-dependent batching -------------------------------------------------------
@pytest.fixture
def tiny_objects(comfyui, tiny_sd15):
    import comfy.model_management
    import comfy.sd
    with torch.inference_mode():  # as a node makes them
        objects = comfy.sd.load_checkpoint_guess_config(
            str(comfyui.folder_paths.get_full_path("checkpoints", tiny_sd15)))
    yield objects[:3]
    comfy.model_management.unload_all_models()


def lora_gradients(objects, offload=None, setup=None, **overrides):
    """The LoRA gradients of one DRaFT-LV step (no clipping) through the ComfyUI backend."""
    from comfy_draft.backends.comfyui import TrainingBackend

    backend = TrainingBackend(*objects, offload=offload)
    config = TrainConfig(**{**dict(prompts=["a red apple"], steps=1, sampling_steps=3, cfg=4.0, width=64, height=64,
                                   batch_size=1, lr=1e-3, seed=0, max_grad_norm=0, lv_samples=1,
                                   gradient_checkpointing=True), **overrides})
    trainer = Trainer(backend, rewards.builtin_reward("brightness"), config)
    trainer.choose_gradient_checkpointing()  # the memory probe's UNet calls, before `setup` and the step's
    if setup is not None:
        setup(backend)
    with torch.inference_mode():
        trainer.train()
    return torch.cat([p.grad.flatten() for p in trainer.params])


def shared_cast_buffer(monkeypatch):
    """ComfyUI's offload path, simulated: every op casts its weights per call (what a partial load sets up), and
    each cast lands in a buffer shared by all weights (and one by all biases) of that shape, which the next cast
    overwrites (comfy.ops.cast_bias_weight with an offload stream). Returns the setup and a call counter."""
    import comfy.model_management
    buffers, calls, roles = {}, [0], {}
    original = comfy.model_management.cast_to

    def cast_to(weight, dtype=None, device=None, non_blocking=False, copy=False, stream=None, r=None):
        out = original(weight, dtype, device, non_blocking, copy, stream)
        if id(weight) not in roles:  # not a UNet weight (conds, for one)
            return out
        with torch.inference_mode(False), torch.no_grad():
            buf = buffers.setdefault((roles[id(weight)], out.shape, out.dtype), torch.empty(out.shape, dtype=out.dtype))
            buf.copy_(out)
        calls[0] += 1
        return buf
    monkeypatch.setattr(comfy.model_management, "cast_to", cast_to)

    def setup(backend):
        for m in backend.model.model.diffusion_model.modules():
            if hasattr(m, "comfy_cast_weights"):
                m.comfy_cast_weights = True
                roles.update({id(m.weight): "weight", id(m.bias): "bias"})
    return setup, calls


@pytest.mark.slow
def test_backward_is_exact_with_offloaded_weights_in_a_shared_cast_buffer(tiny_objects, monkeypatch):
    reference = lora_gradients(tiny_objects)
    setup, calls = shared_cast_buffer(monkeypatch)
    tolerance = dict(rtol=1e-4, atol=1e-6 * reference.abs().max().item())
    # Backward as if fully loaded: the recomputed UNet call reads weights later casts overwrote (no error is raised:
    # a checkpoint's recomputed tensors escape autograd's version check).
    wrong = lora_gradients(tiny_objects, offload=False, setup=setup)
    assert calls[0] > 0 and reference.abs().max() > 0
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong, reference, **tolerance)
    torch.testing.assert_close(lora_gradients(tiny_objects, offload=True, setup=setup), reference, **tolerance)
    # Offloaded, each call is recomputed even when checkpointing is off (what "auto" picks when memory allows)
    off = lora_gradients(tiny_objects, offload=True, setup=setup, gradient_checkpointing=False)
    torch.testing.assert_close(off, reference, **tolerance)


@pytest.mark.slow
def test_recompute_sees_the_forwards_shapes_when_cond_batching_follows_free_memory(tiny_objects, monkeypatch):
    """ComfyUI batches cond and uncond together when memory allows; a checkpoint around the guided call
    recomputes it under other memory conditions, with other shapes. Checkpoints per UNet call do not care."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.model_patcher
    reference = lora_gradients(tiny_objects)

    batches = {"forward": set(), "backward": set()}  # UNet batch sizes seen in the forward pass and in recomputation
    unet_forward = openaimodel.UNetModel.forward

    def counted(self, x, *args, **kwargs):
        batches["backward" if torch._C._current_graph_task_id() != -1 else "forward"].add(x.shape[0])
        return unet_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(openaimodel.UNetModel, "forward", counted)
    # ComfyUI's cond batching follows this figure: with no free memory cond and uncond go one at a time
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", lambda self, device: 0.0)
    def clear(backend):
        batches["forward"].clear(), batches["backward"].clear()
    lora_gradients(tiny_objects, setup=clear)
    assert batches["forward"] == {1}, batches

    def get_free_memory(self, device):  # room to batch in the forward pass, none while backward recomputes
        return 0.0 if torch._C._current_graph_task_id() != -1 else 1e15
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "get_free_memory", get_free_memory)
    torch.testing.assert_close(lora_gradients(tiny_objects, setup=clear), reference, rtol=1e-4,
                               atol=1e-6 * reference.abs().max().item())
    # cond + uncond batched in the forward pass, and the recomputation saw the forward's shapes despite no memory
    assert batches == {"forward": {2}, "backward": {2}}, batches


# ----- models that cannot train ------------------------------------------------------------------------------
@pytest.mark.slow
def test_models_that_cannot_train_are_refused_before_any_work(tiny_objects, monkeypatch):
    import comfy.patcher_extension
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from comfy_draft import lora
    from comfy_draft.backends.comfyui import TrainingBackend
    model, clip, vae = tiny_objects

    compiled = model.clone()
    set_torch_compile_wrapper(compiled, backend="inductor")  # what TorchCompileModel does
    with pytest.raises(ValueError, match=r"sampling wrappers .*torch\.compile.*connect the MODEL from before"):
        TrainingBackend(compiled, clip, vae)

    cached = model.clone()
    cached.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "easycache",
                                lambda executor, *args, **kwargs: executor(*args, **kwargs))
    with pytest.raises(ValueError, match="easycache"):
        TrainingBackend(cached, clip, vae)

    older = model.clone()  # the older ways of caching nodes and torch.compile nodes
    older.set_model_unet_function_wrapper(lambda apply_model, args: apply_model(args["input"], args["timestep"],
                                                                                **args["c"]))
    with pytest.raises(ValueError, match="model_function_wrapper"):
        TrainingBackend(older, clip, vae)
    older = model.clone()
    older.add_object_patch("diffusion_model", model.model.diffusion_model)
    with pytest.raises(ValueError, match="diffusion_model \\(object patch\\)"):
        TrainingBackend(older, clip, vae)

    multigpu = model.clone()
    multigpu.set_additional_models("multigpu", [model.clone()])
    with pytest.raises(ValueError, match="multi-GPU"):
        TrainingBackend(multigpu, clip, vae)

    monkeypatch.setattr(lora, "ATTENTION_TARGETS", ("qkv",))  # as in PixArt, Stable Cascade, HunyuanDiT
    with pytest.raises(ValueError, match="no attention projections"):
        TrainingBackend(model, clip, vae)
