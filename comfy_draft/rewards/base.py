"""The reward interface: images (B, 3, H, W) in [0, 1] plus prompts -> one score per image, higher is better."""
import torch


class Reward(torch.nn.Module):
    """A frozen, differentiable image reward. Subclasses implement `score(images, prompts)`.

    Gradients flow to the images only. A reward without a usable gradient (JPEG size, a 0/1 detector, any
    external scorer) sets `differentiable = False`: DRaFT refuses it, DDPO, GRAFT and P-GRAFT only need scores.
    Weights must be created outside `torch.inference_mode` (loaders use `frozen()`), so that training can
    differentiate through them even when the reward was loaded inside ComfyUI, which runs every node in inference
    mode.
    """

    name = "reward"
    differentiable = True  # the score's gradient with respect to the images is meaningful

    def forward(self, images, prompts=None):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images of shape (batch, 3, height, width), got {tuple(images.shape)}")
        if isinstance(prompts, str) or prompts is None:
            prompts = [prompts or ""] * images.shape[0]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        scores = self.score(images, list(prompts))
        return scores.reshape(images.shape[0])

    def score(self, images, prompts):
        raise NotImplementedError

    def features(self, images):
        """(B, D) image features in which sample diversity is measured (e.g. CLIP embeddings), or None."""
        return None


def frozen(module):
    """Eval mode, no parameter gradients; returns the module."""
    module.eval()
    module.requires_grad_(False)
    return module


class WeightedSum(Reward):
    """sum_i weight_i * reward_i (weights may be negative)."""

    def __init__(self, rewards, weights):
        super().__init__()
        if len(rewards) != len(weights) or not rewards:
            raise ValueError(f"WeightedSum needs one weight per reward, got {len(rewards)} rewards and {len(weights)} weights")
        self.rewards = torch.nn.ModuleList(rewards)
        self.weights = [float(w) for w in weights]
        self.name = " + ".join(f"{w:g}*{r.name}" for r, w in zip(rewards, self.weights))
        self.differentiable = all(r.differentiable for r in rewards)

    def score(self, images, prompts):
        return sum(w * r(images, prompts) for r, w in zip(self.rewards, self.weights))
