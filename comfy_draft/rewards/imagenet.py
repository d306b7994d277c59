"""ImageNet classifiers as rewards: log-probability of chosen classes (the paper's "diffusion
adversarial examples": prompt for one class, reward another). torchvision-format weights."""
import difflib
import re

import torch

from .base import Reward, frozen
from .files import RewardFileError, load_state_dict, require_keys, strip_prefix, unwrap
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_center_crop

# Residual blocks per stage -> torchvision ResNet depth, for basic (conv1, conv2) and bottleneck blocks.
RESNET_DEPTHS = {("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
                 ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152}


def imagenet_class_names():
    from torchvision.models._meta import _IMAGENET_CATEGORIES
    return list(_IMAGENET_CATEGORIES)


def class_indices(classes, names=None):
    """Class indices from names (case-insensitive, as in torchvision's list) and/or integers."""
    names = names or imagenet_class_names()
    if isinstance(classes, str):
        classes = [c.strip() for c in re.split(r"[,\n]", classes) if c.strip()]
    lookup = {n.lower(): i for i, n in enumerate(names)}
    indices = []
    for c in classes:
        if isinstance(c, int) or str(c).isdigit():
            if not 0 <= int(c) < len(names):
                raise ValueError(f"class index {c} out of range 0..{len(names) - 1}")
            indices.append(int(c))
        elif c.lower() in lookup:
            indices.append(lookup[c.lower()])
        else:
            close = [names[lookup[n]] for n in difflib.get_close_matches(c.lower(), lookup, n=3)]
            raise ValueError(f"unknown ImageNet class {c!r}" + (f"; did you mean {close}?" if close else ""))
    if not indices:
        raise ValueError("no classes given: name at least one ImageNet class (or index)")
    return indices


def build_torchvision_classifier(state_dict, path):
    """A torchvision ImageNet classifier whose architecture is read off the state dict's keys."""
    import torchvision

    if "features.18.0.weight" in state_dict and "classifier.1.weight" in state_dict:
        model = torchvision.models.mobilenet_v2(num_classes=state_dict["classifier.1.weight"].shape[0])
    elif "layer4.0.conv1.weight" in state_dict and "fc.weight" in state_dict:
        block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
        counts = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        depth = RESNET_DEPTHS.get((block, counts))
        if depth is None:
            raise RewardFileError(f"{path}: a ResNet with {block} blocks {counts} is not a torchvision ResNet-18/34/50/101/152")
        model = getattr(torchvision.models, f"resnet{depth}")(num_classes=state_dict["fc.weight"].shape[0])
    else:
        require_keys(state_dict, ["fc.weight", "layer4.0.conv1.weight"], path,
                     "a torchvision ImageNet classifier (ResNet or MobileNetV2)")
    model.load_state_dict(state_dict)
    return model


class ImageNetClassifierReward(Reward):
    """log p(any of `classes` | image) under an ImageNet classifier; negated when `maximize` is False."""

    def __init__(self, model, classes, maximize=True, input_size=224):
        super().__init__()
        self.model = frozen(model)
        self.classes = list(classes)
        self.sign = 1.0 if maximize else -1.0
        self.input_size = input_size
        names = imagenet_class_names()
        label = ", ".join(names[i] if i < len(names) else str(i) for i in self.classes)
        self.name = f"{'' if maximize else '-'}log p({label})"

    def logits(self, images):
        # torchvision's eval transform: bilinear resize of the shortest side to 256, centre crop 224.
        images = resize_center_crop(images, round(self.input_size * 256 / 224), mode="bilinear")
        top = int(round((images.shape[-1] - self.input_size) / 2.0))
        images = images[..., top:top + self.input_size, top:top + self.input_size]
        return self.model(normalize(images, IMAGENET_MEAN, IMAGENET_STD))

    def features(self, images):
        return self.logits(images)

    def score(self, images, prompts):
        log_probs = self.logits(images).log_softmax(-1)
        return self.sign * log_probs[:, self.classes].logsumexp(-1)


def load_imagenet_classifier(path, classes, maximize=True, allow_unsafe_pickle=False):
    """A reward from a torchvision-format ImageNet checkpoint (e.g. `resnet50-0676ba61.pth`,
    `mobilenet_v2-b0353104.pth`); `classes` are names such as "Egyptian cat" or indices."""
    expected = "a torchvision ImageNet classifier state dict (ResNet or MobileNetV2)"
    with torch.inference_mode(False):  # normal tensors, so training can backprop through them
        state_dict = strip_prefix(unwrap(load_state_dict(path, expected, allow_unsafe_pickle),
                                         "state_dict", "model"), "module.")
        model = build_torchvision_classifier(state_dict, path)
        return ImageNetClassifierReward(model, class_indices(classes), maximize)
